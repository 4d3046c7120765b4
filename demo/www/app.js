// caddy-sse demo page. No build step, no dependencies.
//
// Each panel watches one URL in two ways at once:
//   - fetch() + a stream reader: the raw bytes, parsed here by the
//     WHATWG event stream rules, so comments (padding, heartbeats) and
//     the way bytes are cut into network reads are visible;
//   - a real EventSource: what an application actually gets (events,
//     lastEventId, reconnects), shown in the grey line above the log.
'use strict';

const MAX_ROWS = 200;
const LONG_GAP_MS = 10000; // a gap this long is shown in red
const PADDING_MIN = 256;   // a comment block this big is padding, not a heartbeat

const fmtTime = (t) => {
  const d = new Date(t);
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
};
const fmtSec = (ms) => (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + ' s';
const fmtBytes = (n) => (n < 1024 ? n + ' B' : (n / 1024).toFixed(n < 10240 ? 1 : 0) + ' KiB');
const fmtBytesShort = (n) => (n < 1024 ? n + ' B' : (n / 1024).toFixed(n < 10240 ? 1 : 0) + 'K');

// SSEParser parses an event stream incrementally, by the rules EventSource
// uses: lines end in LF, CRLF or a lone CR (a CRLF may be split across
// reads), lines starting with ':' are comments, a blank line ends a block.
// For every block it reports what was in it and how many reads it spanned.
class SSEParser {
  constructor(onBlock) {
    this.onBlock = onBlock;
    this.line = '';
    this.skipLF = false;
    this.readNo = 0;
    this.retry = null;   // last retry: value (ms)
    this.idBuffer = '';  // last event ID buffer
    this.newBlock();
  }

  newBlock() {
    this.b = { data: [], event: '', id: null, retry: null, comments: [], commentBytes: 0, fields: 0, reads: 0, lastRead: 0 };
  }

  touch() {
    if (this.b.lastRead !== this.readNo) { this.b.reads++; this.b.lastRead = this.readNo; }
  }

  // feed takes one network read, already decoded.
  feed(text) {
    this.readNo++;
    let i = 0;
    while (i < text.length) {
      if (this.skipLF) {
        this.skipLF = false;
        if (text[i] === '\n') { i++; continue; } // second half of a CRLF split across reads
      }
      let j = i;
      while (j < text.length && text[j] !== '\n' && text[j] !== '\r') j++;
      this.touch();
      if (j === text.length) { this.line += text.slice(i); break; }
      this.line += text.slice(i, j);
      if (text[j] === '\r') {
        if (j + 1 < text.length) { if (text[j + 1] === '\n') j++; } else this.skipLF = true;
      }
      i = j + 1;
      const line = this.line;
      this.line = '';
      this.processLine(line);
    }
  }

  // atBoundary: nothing of an unfinished block has been read.
  atBoundary() { return this.line === '' && this.b.reads === 0; }

  processLine(line) {
    const b = this.b;
    if (line === '') { this.dispatch(); return; }
    if (line[0] === ':') { b.comments.push(line.slice(1)); b.commentBytes += line.length + 1; return; }
    const c = line.indexOf(':');
    const name = c < 0 ? line : line.slice(0, c);
    let value = c < 0 ? '' : line.slice(c + 1);
    if (value[0] === ' ') value = value.slice(1);
    b.fields++;
    switch (name) {
      case 'data': b.data.push(value); break;
      case 'event': b.event = value; break;
      case 'id': if (!value.includes('\0')) { b.id = value; this.idBuffer = value; } break;
      case 'retry': if (/^\d+$/.test(value)) { b.retry = +value; this.retry = +value; } break;
    }
  }

  dispatch() {
    const b = this.b;
    this.newBlock();
    if (b.fields === 0 && b.comments.length === 0) return; // a lone blank line
    b.lastEventId = this.idBuffer;
    this.onBlock(b);
  }
}

// Describe an event's data (the demo backend's JSON) in a few words.
function describe(type, data) {
  let j;
  try { j = JSON.parse(data); } catch { return { text: JSON.stringify(data).slice(0, 120) }; }
  const seq = j.seq;
  if (j.type === 'hello') {
    return { text: `hello: state on connect, after #${seq}`, ts: j.ts };
  }
  if (j.sym) {
    const chg = Number(j.chg) || 0;
    const arrow = chg > 0 ? `<span class="up">&#9650;${chg.toFixed(2)}</span>`
      : chg < 0 ? `<span class="down">&#9660;${(-chg).toFixed(2)}</span>` : '&middot;0.00';
    return { seq, ts: j.ts, html: `#${seq} <b>${esc(j.sym)}</b> ${Number(j.px).toFixed(2)} ${arrow}` };
  }
  if (j.order) {
    return { seq, ts: j.ts, text: `#${seq} ${type} ${j.order} ${j.status} ${j.qty}\u00d7 ${j.sku}` };
  }
  return { seq, ts: j.ts, text: data.slice(0, 120) };
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

const STATS = [
  ['events', 'events'], ['heartbeats', 'heartbeats'], ['padding', 'padding'], ['reads', 'reads'],
  ['split', 'split reads'], ['reconnects', 'reconnects'], ['idle', 'idle now'],
];

class Panel {
  constructor(el) {
    this.el = el;
    this.key = el.dataset.panel;
    this.url = el.dataset.url;
    this.tbody = el.querySelector('tbody');
    this.stateEl = el.querySelector('.state');
    this.esEl = el.querySelector('.es');
    this.s = { events: 0, heartbeats: 0, padding: 0, reads: 0, split: 0, reconnects: 0, bytes: 0 };
    this.lastRowAt = 0;
    this.lastByteAt = 0;
    this.rowsBySeq = new Map();
    this.esSeqs = new Set();
    this.es = { state: 'connecting', events: 0, opens: 0, lastId: null, last: '' };

    const stats = el.querySelector('.stats');
    this.statEls = {};
    for (const [k, label] of STATS) {
      const d = document.createElement('div');
      d.className = 'stat';
      d.innerHTML = `<span class="v">0</span><span class="k">${label}</span>`;
      stats.appendChild(d);
      this.statEls[k] = d;
    }
    this.render();
  }

  setState(text, cls) {
    this.stateEl.textContent = text;
    this.stateEl.className = 'state ' + (cls || '');
  }

  row(kind, detail, { html = false, lag = null, reads = null, seq = null, at = performance.timeOrigin + performance.now() } = {}) {
    const empty = this.tbody.querySelector('.empty');
    if (empty) empty.remove();
    const tr = document.createElement('tr');
    tr.className = 'new';
    const dt = this.lastRowAt ? at - this.lastRowAt : null;
    this.lastRowAt = at;
    const cells = [
      `<td>${fmtTime(at)}</td>`,
      `<td class="num${dt !== null && dt > LONG_GAP_MS ? ' long' : ''}">${dt === null ? '' : '+' + fmtSec(dt)}</td>`,
      `<td><span class="kind k-${kind}">${kind}</span></td>`,
      `<td title="${html ? '' : esc(detail)}">${html ? detail : esc(detail)}</td>`,
      `<td class="num${lag !== null && lag > 1000 ? ' late' : ''}">${lag === null ? '' : fmtSec(Math.max(0, lag))}</td>`,
      `<td class="num">${reads ?? ''}</td>`,
      seq === null ? '<td></td>' : `<td class="${this.esSeqs.has(seq) ? 'es-yes' : 'es-no'}">${this.esSeqs.has(seq) ? '&#10003;' : '&middot;'}</td>`,
    ];
    tr.innerHTML = cells.join('');
    this.tbody.prepend(tr);
    if (seq !== null) this.rowsBySeq.set(seq, tr);
    while (this.tbody.children.length > MAX_ROWS) {
      const last = this.tbody.lastElementChild;
      for (const [k, v] of this.rowsBySeq) if (v === last) this.rowsBySeq.delete(k);
      last.remove();
    }
  }

  // One block parsed from the raw bytes.
  onBlock(b, at) {
    if (b.comments.length) {
      if (b.commentBytes >= PADDING_MIN) {
        this.s.padding += b.commentBytes;
        this.row('padding', `${fmtBytes(b.commentBytes)} of comment (${b.comments.length} line${b.comments.length > 1 ? 's' : ''})`, { at, reads: b.reads });
      } else {
        this.s.heartbeats += b.comments.length;
        const text = b.comments.map((c) => ':' + c).join(' ');
        this.row('heartbeat', text, { at, reads: b.reads });
      }
    }
    if (b.retry !== null) this.row('retry', `retry: ${b.retry} (reconnect after ${fmtSec(b.retry)})`, { at });
    if (b.data.length) {
      this.s.events++;
      const type = b.event || 'message';
      const d = describe(type, b.data.join('\n'));
      let detail = d.html ?? esc(d.text);
      if (b.id !== null) detail += ` <span title="id field">id=${esc(b.id)}</span>`;
      if (type !== 'message' && !d.text?.includes(type)) detail = `<i>${esc(type)}</i> ` + detail;
      this.row('event', detail, { html: true, at, lag: d.ts ? at - d.ts : null, reads: b.reads, seq: d.seq ?? null });
    } else if (b.id !== null && b.retry === null) {
      this.row('id', `id: ${b.id} (no data)`, { at });
    }
  }

  async readLoop() {
    for (;;) {
      let parser = new SSEParser(() => {});
      try {
        this.setState('connecting');
        const resp = await fetch(this.url, { cache: 'no-store', headers: { Accept: 'text/event-stream' } });
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
        this.setState('open', 'open');
        const enc = resp.headers.get('Content-Encoding');
        this.row('open', `HTTP ${resp.status} ${resp.headers.get('Content-Type')}${enc ? ', ' + enc : ''}`);
        const reader = resp.body.getReader();
        const dec = new TextDecoder(); // drops a leading BOM, as EventSource does
        let at = 0;
        parser = new SSEParser((b) => this.onBlock(b, at));
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          at = performance.timeOrigin + performance.now();
          this.lastByteAt = at;
          this.s.reads++;
          this.s.bytes += value.length;
          parser.feed(dec.decode(value, { stream: true }));
          if (!parser.atBoundary()) this.s.split++;
          this.render();
        }
        this.row('closed', 'the server ended the stream');
      } catch (e) {
        this.row('error', String(e.message || e));
      }
      const delay = parser.retry ?? 3000;
      this.setState('reconnecting', 'down');
      this.s.reconnects++;
      this.row('reconnect', `again in ${fmtSec(delay)} (${parser.retry === null ? 'browser default' : 'retry: from the stream'})`);
      this.render();
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  runEventSource() {
    const es = new EventSource(this.url);
    const states = ['connecting', 'open', 'closed'];
    const update = () => { this.es.state = states[es.readyState]; this.render(); };
    es.onopen = () => { this.es.opens++; update(); };
    es.onerror = update;
    const onEvent = (e) => {
      this.es.events++;
      this.es.lastId = e.lastEventId;
      const d = describe(e.type, e.data);
      this.es.last = d.seq !== undefined ? `#${d.seq}` : (d.text || '').slice(0, 40);
      if (d.seq !== undefined) {
        this.esSeqs.add(d.seq);
        const tr = this.rowsBySeq.get(d.seq);
        if (tr) { const td = tr.lastElementChild; td.className = 'es-yes'; td.innerHTML = '&#10003;'; }
      }
      update();
    };
    es.onmessage = onEvent;
    es.addEventListener('order', onEvent);
  }

  render() {
    const s = this.s;
    const now = performance.timeOrigin + performance.now();
    const idle = this.lastByteAt ? now - this.lastByteAt : 0;
    const vals = {
      events: s.events, heartbeats: s.heartbeats, padding: fmtBytesShort(s.padding), reads: s.reads,
      split: s.split, reconnects: s.reconnects, idle: this.lastByteAt ? fmtSec(idle) : '\u2013',
    };
    for (const [k] of STATS) this.statEls[k].querySelector('.v').textContent = vals[k];
    this.statEls.idle.className = 'stat' + (idle > LONG_GAP_MS ? ' warn' : '');
    this.statEls.split.className = 'stat' + (s.split > 0 ? ' warn' : s.reads > 0 ? ' good' : '');
    this.statEls.heartbeats.className = 'stat' + (s.heartbeats > 0 ? ' good' : '');
    const e = this.es;
    const sep = '<span class="sep">|</span>';
    this.esEl.innerHTML = `<b>EventSource</b> ${esc(e.state)}${sep}${e.events} events${sep}last ${esc(e.last || '\u2013')}` +
      `${sep}lastEventId ${e.lastId ? '"' + esc(e.lastId) + '"' : '<i>(none)</i>'}${sep}reconnects ${Math.max(0, e.opens - 1)}`;
  }
}

// The "live figures" area: the plugin's admin endpoint (GET /sse/streams,
// see docs/admin.md), one line per live stream, then the raw JSON.
function figuresTable(streams) {
  if (streams.length === 0) return 'no live stream';
  const cols = [
    ['mode', (s) => s.mode],
    ['path', (s) => s.path || ''],
    ['key', (s) => s.key],
    ['clients', (s) => String(s.clients)],
    ['upstream', (s) => s.upstream],
    ['uptime', (s) => fmtSec(s.uptime_seconds * 1000)],
    ['events', (s) => String(s.events)],
    ['bytes', (s) => fmtBytes(s.bytes)],
    ['encoding', (s) => s.encoding || ''],
    ['last id', (s) => s.last_event_id || '\u2013'],
    ['cache', (s) => (s.mode === 'fanout' ? `${s.cache_events} ev / ${fmtBytes(s.cache_bytes)}` : '\u2013')],
    ['reconnects', (s) => String(s.reconnects)],
  ];
  const rows = [cols.map(([h]) => h), ...streams.map((s) => cols.map(([, f]) => f(s)))];
  const widths = cols.map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  const line = (r) => r.map((v, i) => v.padEnd(widths[i])).join('  ').trimEnd();
  const clients = streams.reduce((n, s) => n + s.clients, 0);
  return `${streams.length} live stream${streams.length === 1 ? '' : 's'}, ${clients} client${clients === 1 ? '' : 's'}\n\n` +
    rows.map(line).join('\n');
}

// metricSums adds up the samples of a Prometheus text exposition by
// metric name and one label (e.g. encoding), for the plugin's caddy_sse_*.
function metricSums(text) {
  const sums = {};
  for (const line of text.split('\n')) {
    const m = /^(caddy_sse_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$/.exec(line);
    if (!m) continue;
    const enc = /encoding="([^"]+)"/.exec(m[2] || '');
    const mode = /mode="([^"]+)"/.exec(m[2] || '');
    for (const key of [m[1], m[1] + '/' + (enc ? enc[1] : ''), m[1] + '@' + (mode ? mode[1] : '')]) {
      sums[key] = (sums[key] || 0) + Number(m[3]);
    }
  }
  return sums;
}

function kib(n) { return (n / 1024).toFixed(1) + ' KiB'; }

// summary is the line a person reads first: how many clients share how
// many upstream connections, and what compression saved.
async function summary() {
  const resp = await fetch('/admin/metrics', { cache: 'no-store' });
  if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
  const m = metricSums(await resp.text());
  const clients = m['caddy_sse_clients_active@fanout'] || 0;
  const hubs = m['caddy_sse_streams_active@fanout'] || 0;
  const lines = [`fan-out: ${clients} client(s) on ${hubs} upstream connection(s); ` +
    `${m['caddy_sse_upstream_connects_total'] || 0} upstream connect(s) so far, ` +
    `${m['caddy_sse_events_replayed_total'] || 0} event(s) replayed to reconnecting clients`];
  for (const enc of ['zstd', 'gzip', 'identity']) {
    const raw = m['caddy_sse_bytes_uncompressed_total/' + enc] || 0;
    const wire = m['caddy_sse_bytes_written_total/' + enc] || 0;
    if (raw > 0) lines.push(`${enc}: ${kib(wire)} on the wire for ${kib(raw)} of stream` +
      (enc === 'identity' ? '' : ` (${Math.round(100 * (1 - wire / raw))}% saved)`));
  }
  return lines.join('\n');
}

async function pollFigures() {
  const pre = document.getElementById('figures-streams');
  let head = '';
  try { head = await summary() + '\n\n'; } catch (e) { head = `metrics not available (${e.message || e})\n\n`; }
  try {
    const resp = await fetch('/admin/sse/streams', { cache: 'no-store' });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const text = await resp.text();
    try {
      const data = JSON.parse(text);
      pre.textContent = head + figuresTable(data.streams || []) + '\n\n' + JSON.stringify(data, null, 2);
    } catch { pre.textContent = head + text; }
  } catch (e) {
    pre.textContent = `not available (${e.message || e})`;
  }
  setTimeout(pollFigures, 2000);
}

const panels = [...document.querySelectorAll('.panel')].map((el) => new Panel(el));
for (const p of panels) { p.readLoop(); p.runEventSource(); }
setInterval(() => panels.forEach((p) => p.render()), 250);
pollFigures();
