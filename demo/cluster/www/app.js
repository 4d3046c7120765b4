// caddy-sse cluster demo page. It reads /events with fetch() and a stream
// reader instead of EventSource, because a "move" must reconnect to a node
// of our choosing with a Last-Event-ID header, which EventSource cannot set.
// The backend puts a sequence number ("seq") in every event: the page checks
// that each event is the one after the previous, whichever node sent it.
'use strict';

const NODES = ['node1', 'node2', 'node3'];
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' }[c]));

const st = { events: 0, moves: 0, gaps: 0, dups: 0, resets: 0, lastSeq: null, lastId: '', node: '', resetPending: false };
let ctrl = null;       // AbortController of the current stream
let pendingMove = null; // the moves-table row waiting for its first event

// One event-stream parser per response (WHATWG rules: CRLF, LF or CR line
// ends; comments; dispatch on a blank line when there is data).
function parser(onEvent) {
  let line = '', data = [], type = '', skipLF = false;
  const endLine = () => {
    if (line === '') {
      if (data.length) onEvent(type || 'message', data.join('\n'));
      data = []; type = '';
      return;
    }
    if (line[0] === ':') return;
    const k = line.indexOf(':');
    const field = k < 0 ? line : line.slice(0, k);
    let value = k < 0 ? '' : line.slice(k + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') type = value;
    else if (field === 'id' && !value.includes('\0')) st.lastId = value;
  };
  return (chunk) => {
    let start = 0;
    for (let j = 0; j < chunk.length; j++) {
      const c = chunk[j];
      if (c === '\n' && skipLF) { skipLF = false; start = j + 1; continue; }
      skipLF = false;
      if (c === '\r' || c === '\n') {
        line += chunk.slice(start, j);
        endLine();
        line = '';
        start = j + 1;
        skipLF = c === '\r'; // a CRLF split across two reads is one line end
      }
    }
    line += chunk.slice(start);
  };
}

function onEvent(type, data) {
  if (type === 'sse-reset') {
    // The cluster could not resume from our id (its history is gone): it
    // says so, and the page would refetch its state here.
    st.resets++;
    st.resetPending = true;
    row('events', [['—', ''], [st.node, ''], [st.lastId, 'mono'], ['sse-reset: the node could not resume after ' + data, 'ko']]);
    render();
    return;
  }
  let d;
  try { d = JSON.parse(data); } catch { return; }
  if (d.type === 'hello' || typeof d.seq !== 'number') return;
  st.events++;
  let note = '';
  if (st.lastSeq !== null) {
    if (d.seq <= st.lastSeq) { st.dups++; note = 'duplicate'; }
    else if (d.seq > st.lastSeq + 1) {
      const missed = d.seq - st.lastSeq - 1;
      if (st.resetPending) note = `${missed} lost, announced`;
      else { st.gaps += missed; note = `${missed} missing`; }
    }
  }
  if (pendingMove) {
    const want = st.lastSeq === null ? null : st.lastSeq + 1;
    const ok = want === null || d.seq === want;
    pendingMove.lastElementChild.innerHTML = want === null ? `seq ${d.seq}` :
      `<span class="${ok ? 'ok' : 'ko'}">seq ${d.seq} ${ok ? '&#10003; the next one' : '(expected ' + want + ')'}</span>`;
    pendingMove = null;
  }
  if (d.seq > (st.lastSeq ?? -1)) st.lastSeq = d.seq;
  st.resetPending = false;
  const what = d.sym ? `${d.sym} ${d.px}` : data.slice(0, 40);
  row('events', [[d.seq, ''], [st.node, ''], [st.lastId, 'mono'], [what + (note ? ' — ' + note : ''), note ? 'ko' : '']]);
  render();
}

function row(tbodyId, cells) {
  const tb = $(tbodyId);
  const tr = document.createElement('tr');
  tr.innerHTML = cells.map(([v, cls]) => `<td class="${cls}">${esc(v)}</td>`).join('');
  tb.prepend(tr);
  while (tb.children.length > 60) tb.lastElementChild.remove();
  return tr;
}

function render() {
  $('node').textContent = st.node || '…';
  for (const k of ['events', 'moves', 'gaps', 'dups', 'resets']) $('s-' + k).textContent = st[k];
  $('c-gaps').className = 'stat ' + (st.gaps ? 'bad' : 'good');
  $('c-dups').className = 'stat ' + (st.dups ? 'bad' : 'good');
  $('lastid').textContent = st.lastId || 'none yet';
}

// connect reads url until it ends or is aborted; a stream that ends on its
// own (a node stopped, a reload) is picked up again through the load
// balancer, with our last id, after the retry delay.
async function connect(url, via) {
  if (ctrl) ctrl.abort();
  const my = new AbortController();
  ctrl = my;
  const from = st.node;
  const headers = { Accept: 'text/event-stream' };
  if (st.lastId) headers['Last-Event-ID'] = st.lastId;
  $('state').textContent = 'connecting to ' + url + '…';
  try {
    const resp = await fetch(url, { cache: 'no-store', headers, signal: my.signal });
    if (!resp.ok) throw new Error('HTTP ' + resp.status);
    st.node = resp.headers.get('X-SSE-Node') || '?';
    $('via').textContent = via;
    if (from) {
      st.moves++;
      pendingMove = row('moves', [[from, ''], [st.node, ''], [headers['Last-Event-ID'] || '(none)', 'mono'], ['waiting…', '']]);
    }
    $('state').textContent = 'streaming from ' + st.node + ' ' + via;
    render();
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    const feed = parser(onEvent);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      feed(dec.decode(value, { stream: true }));
    }
    $('state').textContent = st.node + ' ended the stream; reconnecting through the load balancer';
  } catch (e) {
    if (my.signal.aborted) return;
    $('state').textContent = 'stream failed (' + (e.message || e) + '); reconnecting through the load balancer';
  }
  if (ctrl !== my) return;
  await new Promise((r) => setTimeout(r, 2000));
  if (ctrl === my) connect('/events', '(via the load balancer)');
}

$('move').onclick = () => {
  const others = NODES.filter((n) => n !== st.node);
  const to = others[Math.floor(Math.random() * others.length)];
  connect(`/${to}/events`, '(directly)');
};
$('lb').onclick = () => connect('/events', '(via the load balancer)');

// The nodes' own view, from their admin API.
async function pollNodes() {
  const rows = await Promise.all(NODES.map(async (n) => {
    try {
      const resp = await fetch(`/${n}/streams`, { cache: 'no-store', signal: AbortSignal.timeout(1500) });
      if (!resp.ok) throw new Error('HTTP ' + resp.status);
      const hub = ((await resp.json()).streams || []).find((s) => s.mode === 'fanout' && s.path === '/events');
      if (!hub) return [n, '—', 0, 'no stream'];
      return [n, hub.leader ? 'leader' : 'follower', hub.clients, hub.last_event_id || ''];
    } catch (e) {
      return [n, 'down', '—', String(e.message || e)];
    }
  }));
  $('nodes').innerHTML = rows.map(([n, lead, clients, id]) =>
    `<tr><td${n === st.node ? ' class="ok"' : ''}>${esc(n)}${n === st.node ? ' (this tab)' : ''}</td>` +
    `<td class="${lead === 'leader' ? 'ok' : lead === 'down' ? 'ko' : ''}">${esc(lead)}</td>` +
    `<td>${esc(clients)}</td><td class="mono">${esc(id)}</td></tr>`).join('');
}

render();
connect('/events', '(via the load balancer)');
pollNodes();
setInterval(pollNodes, 2000);
