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
    if (line[0] === ':') {
      b.comments.push(line.slice(1)); b.commentBytes += line.length + 1;
      // The plugin writes its comments (padding, heartbeats) as lines at an
      // event boundary with no blank line after them, so that no client
      // dispatches an empty message: show such a comment when it arrives,
      // not with the next event.
      if (b.fields === 0) this.dispatch();
      return;
    }
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
    return { key: `hello#${seq}`, text: `hello: state on connect, after #${seq}`, ts: j.ts };
  }
  if (j.sym) {
    const chg = Number(j.chg) || 0;
    const arrow = chg > 0 ? `<span class="up">&#9650;${chg.toFixed(2)}</span>`
      : chg < 0 ? `<span class="down">&#9660;${(-chg).toFixed(2)}</span>` : '&middot;0.00';
    return { seq, key: `#${seq}`, ts: j.ts, html: `#${seq} <b>${esc(j.sym)}</b> ${Number(j.px).toFixed(2)} ${arrow}` };
  }
  if (j.order) {
    return { seq, key: `#${seq}`, ts: j.ts, text: `#${seq} ${type} ${j.order} ${j.status} ${j.qty}\u00d7 ${j.sku}` };
  }
  return { seq, ts: j.ts, text: data.slice(0, 120) };
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

// The numbers above each log. Every panel counts the same things, so the
// two rows of boxes compare at a glance. "backend drops" is how often the
// backend ended a connection behind this panel: for the raw panel, this
// page's own connection; for the plugin panel, the plugin's upstream
// connection (from its admin API), which the page's connection never sees.
const STATS = [
  ['events', 'events'], ['heartbeats', 'heartbeats'], ['padding', 'padding'], ['reads', 'reads'],
  ['split', 'split reads'], ['drops', 'drops'], ['reconnects', 'reconnects'], ['idle', 'idle now'],
];
const STAT_TITLES = {
  events: 'events received (replayed ones included)',
  split: 'network reads that ended in the middle of an event',
  drops: 'times the backend dropped the connection behind this panel',
  reconnects: 'times this panel had to reconnect',
  idle: 'time since the last byte arrived',
};

// eventKey identifies an event for the log's ES column, which marks the
// rows the EventSource got too: by the backend's sequence number, or for a
// greeting, by the one it follows (the log's and the EventSource's
// connections are greeted at slightly different times), else by its data.
const eventKey = (type, data, d) => type + '\n' + (d.key ?? data);
// An event is shown as replayed when the backend sent it this long before
// the response began: the first client of a new upstream connection gets
// the backend's greeting a few milliseconds before its own headers.
const REPLAY_SLACK_MS = 1000;
const MAX_KEYS = 1000;

class Panel {
  constructor(el) {
    this.el = el;
    this.key = el.dataset.panel;
    this.url = el.dataset.url;
    // Behind the plugin, the backend's drops hit the plugin's upstream
    // connection, not this one: they are counted from its admin API.
    this.viaPlugin = this.key === 'plugin';
    this.tbody = el.querySelector('tbody');
    this.stateEl = el.querySelector('.state');
    this.esEl = el.querySelector('.es');
    this.s = { events: 0, replayed: 0, heartbeats: 0, padding: 0, reads: 0, split: 0, drops: 0, reconnects: 0, bytes: 0 };
    this.lastRowAt = 0;
    this.lastByteAt = 0;
    this.openAt = 0;      // when this panel's current response began
    this.rowsByKey = new Map();
    this.seqs = new Set(); // the backend's sequence numbers of the events received
    this.esKeys = new Set();
    this.es = { state: 'connecting', events: 0, opens: 0, lastId: null, last: '' };

    const stats = el.querySelector('.stats');
    this.statEls = {};
    for (const [k, label] of STATS) {
      const d = document.createElement('div');
      d.className = 'stat';
      d.dataset.stat = k;
      if (STAT_TITLES[k]) d.title = STAT_TITLES[k];
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

  row(kind, detail, { html = false, lag = null, reads = null, key = null, at = performance.timeOrigin + performance.now() } = {}) {
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
      key === null ? '<td></td>' : `<td class="${this.esKeys.has(key) ? 'es-yes' : 'es-no'}">${this.esKeys.has(key) ? '&#10003;' : '&middot;'}</td>`,
    ];
    tr.innerHTML = cells.join('');
    tr.dataset.kind = kind;
    this.tbody.prepend(tr);
    if (key !== null) this.rowsByKey.set(key, tr);
    while (this.tbody.children.length > MAX_ROWS) {
      const last = this.tbody.lastElementChild;
      for (const [k, v] of this.rowsByKey) if (v === last) this.rowsByKey.delete(k);
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
      const data = b.data.join('\n');
      const d = describe(type, data);
      let detail = d.html ?? esc(d.text);
      if (b.id !== null) detail += ` <span title="id field">id=${esc(b.id)}</span>`;
      if (type !== 'message' && !d.text?.includes(type)) detail = `<i>${esc(type)}</i> ` + detail;
      // An event the backend sent before this response began can only
      // come from the plugin's cache (replay_on_connect, or a
      // Last-Event-ID): its lag is its age, not a delay.
      const replayed = this.viaPlugin && d.ts && d.ts < this.openAt - REPLAY_SLACK_MS;
      if (replayed) this.s.replayed++;
      if (d.seq !== undefined) this.seqs.add(d.seq);
      this.row(replayed ? 'replay' : 'event', detail,
        { html: true, at, lag: d.ts && !replayed ? at - d.ts : null, reads: b.reads, key: eventKey(type, data, d) });
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
        this.openAt = performance.timeOrigin + performance.now();
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
        if (!this.viaPlugin) this.s.drops++;
        this.row('closed', 'the server ended the stream');
      } catch (e) {
        if (this.openAt && !this.viaPlugin) this.s.drops++;
        this.row('error', String(e.message || e));
      }
      this.openAt = 0;
      const delay = parser.retry ?? 3000;
      this.setState('reconnecting', 'down');
      this.s.reconnects++;
      this.row('reconnect', `again in ${fmtSec(delay)} (${parser.retry === null ? 'browser default' : 'retry: from the stream'})`);
      this.render();
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  // upstreamDrops takes the number of times the plugin had to reconnect to
  // the backend (its hubs' reconnects), and counts and logs the ones since
  // the page loaded: a tab that joins a running hub starts at 0.
  upstreamDrops(n) {
    if (this.dropsBase === undefined) this.dropsBase = n;
    if (n < this.dropsBase + this.s.drops) this.dropsBase = n - this.s.drops; // a new hub counts from 0 again
    if (n - this.dropsBase <= this.s.drops) return;
    this.s.drops = n - this.dropsBase;
    this.row('upstream', 'backend drop: plugin reconnected, this stream stayed open');
    this.render();
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
      const key = eventKey(e.type, e.data, d);
      this.esKeys.add(key);
      if (this.esKeys.size > MAX_KEYS) this.esKeys.delete(this.esKeys.values().next().value);
      const tr = this.rowsByKey.get(key);
      if (tr) { const td = tr.lastElementChild; td.className = 'es-yes'; td.innerHTML = '&#10003;'; }
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
      split: s.split, drops: s.drops, reconnects: s.reconnects, idle: this.lastByteAt ? fmtSec(idle) : '\u2013',
    };
    for (const [k] of STATS) this.statEls[k].querySelector('.v').textContent = vals[k];
    this.statEls.idle.className = 'stat' + (idle > LONG_GAP_MS ? ' warn' : '');
    this.statEls.split.className = 'stat' + (s.split > 0 ? ' warn' : s.reads > 0 ? ' good' : '');
    this.statEls.heartbeats.className = 'stat' + (s.heartbeats > 0 ? ' good' : '');
    this.statEls.reconnects.className = 'stat' + (s.reconnects > 0 ? ' warn' : s.drops > 0 ? ' good' : '');
    const e = this.es;
    const sep = '<span class="sep">|</span>';
    this.esEl.innerHTML = `<b>EventSource</b> ${esc(e.state)}${sep}${e.events} events${sep}last ${esc(e.last || '\u2013')}` +
      `${sep}lastEventId ${e.lastId ? '"' + esc(e.lastId) + '"' : '<i>(none)</i>'}${sep}reconnects ${Math.max(0, e.opens - 1)}`;
  }
}


// The "live figures" area: the plugin's admin endpoint (GET /sse/streams,
// see docs/admin.md) and its metrics (caddy_sse_*, Caddy's /metrics), every
// 2 s. The summary's client count and the table come from the same
// /sse/streams answer, so they always agree.
const FIG_COLS = [
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

function renderTable(streams) {
  const table = document.getElementById('figures-table');
  const head = `<tr>${FIG_COLS.map(([h]) => `<th>${esc(h)}</th>`).join('')}</tr>`;
  const body = streams.length === 0
    ? `<tr class="empty"><td colspan="${FIG_COLS.length}">no live stream</td></tr>`
    : streams.map((s) => `<tr>${FIG_COLS.map(([h, f]) => `<td data-col="${esc(h)}">${esc(f(s))}</td>`).join('')}</tr>`).join('');
  table.innerHTML = `<thead>${head}</thead><tbody>${body}</tbody>`;
}

// metricSums adds up the samples of a Prometheus text exposition by
// metric name, by name and encoding label (name/enc), and by name and mode
// label (name@mode), for the plugin's caddy_sse_*.
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

const kib = (n) => (n / 1024).toFixed(1) + ' KiB';
const ENCODINGS = ['zstd', 'br', 'gzip'];

// Compression, measured on events. The plugin's byte counters include
// what each new connection gets first (2 KiB of padding, noise on purpose,
// so it takes its full size on the wire) and the heartbeats (each client
// writes them on its own, uncompressed: docs/compression.md): early on,
// these dominate, and the ratio of all bytes says nothing about events.
// So the page adds up the counters' growth over the 2 s poll intervals that
// carried events and nothing else: no heartbeat, and no client joining or
// leaving in that interval or the one before (a join's padding may be
// counted a moment after the client is).
const comp = { hist: [], events: {} };

function measureCompression(m) {
  comp.hist.push(m);
  if (comp.hist.length > 3) comp.hist.shift();
  if (comp.hist.length < 3) return;
  const [a, b, c] = comp.hist;
  const clients = (x) => x['caddy_sse_clients_active'] || 0;
  const d = (k) => (c[k] || 0) - (b[k] || 0);
  if (clients(a) !== clients(b) || clients(b) !== clients(c)) return;
  if (d('caddy_sse_events_total') <= 0 || d('caddy_sse_heartbeats_total') !== 0) return;
  for (const enc of ENCODINGS) {
    const raw = d('caddy_sse_bytes_uncompressed_total/' + enc);
    const wire = d('caddy_sse_bytes_written_total/' + enc);
    if (raw <= 0) continue;
    const e = comp.events[enc] ||= { raw: 0, wire: 0 };
    e.raw += raw;
    e.wire += wire;
  }
}

function compressionLines(m) {
  const lines = [];
  for (const enc of ENCODINGS) {
    const raw = m['caddy_sse_bytes_uncompressed_total/' + enc] || 0;
    const wire = m['caddy_sse_bytes_written_total/' + enc] || 0;
    if (raw === 0) continue;
    const e = comp.events[enc];
    lines.push(!e
      ? `<b>${enc}</b> on events: measuring&hellip; (needs a burst of events while no client connects)`
      // A client that joins mid-stream sends events uncompressed (a few
      // bytes of framing more) until the shared compressor restarts:
      // early on, after a reload, that may be all there is.
      : e.wire >= e.raw ? `<b>${enc}</b> on events: nothing saved yet (${kib(e.raw)} of events took ${kib(e.wire)} on the wire) ` +
        `<span class="mute">&mdash; a client that joins mid-stream sends events uncompressed until the shared compressor ` +
        `starts afresh, after the next silence (docs/compression.md)</span>`
      : `<b>${enc}</b> on events: <span class="fig-saved" data-enc="${enc}">${Math.round(100 * (1 - e.wire / e.raw))}% saved</span> ` +
        `(${kib(e.raw)} of events took ${kib(e.wire)} on the wire) <span class="mute">&mdash; after each silence, the first ` +
        `event compresses least: the shared compressor starts afresh after a heartbeat (docs/compression.md)</span>`);
    lines.push(`<span class="mute">${enc}, all bytes: ${kib(raw)} of stream, ${kib(wire)} on the wire. That includes each connection's ` +
      `2 KiB of padding, noise on purpose so that it still fills buffers when compressed, and the heartbeats, ` +
      `which each client writes uncompressed.</span>`);
  }
  if (lines.length === 0) lines.push('compression: no compressed stream yet');
  return lines;
}

async function getText(url) {
  const resp = await fetch(url, { cache: 'no-store' });
  if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
  return resp.text();
}

async function pollFigures() {
  const summary = document.getElementById('figures-summary');
  const json = document.getElementById('figures-json');
  const lines = [];
  let m = null;
  try {
    m = metricSums(await getText('/admin/metrics'));
    measureCompression(m);
  } catch (e) {
    lines.push(`metrics not available (${esc(e.message || e)})`);
  }
  try {
    const text = await getText('/admin/sse/streams');
    const streams = (JSON.parse(text).streams || []);
    json.textContent = JSON.stringify({ streams }, null, 2);
    renderTable(streams);
    const hubs = streams.filter((s) => s.mode === 'fanout');
    const clients = hubs.reduce((n, s) => n + s.clients, 0);
    const drops = hubs.reduce((n, s) => n + s.reconnects, 0);
    lines.unshift(
      `<span id="fig-clients">${clients}</span> client${clients === 1 ? '' : 's'} share ` +
      `<span id="fig-upstreams">${hubs.length}</span> upstream connection${hubs.length === 1 ? '' : 's'} to the backend ` +
      `<span class="mute">(a client is one open response of <code>/events</code>: this page opens 2, its log's fetch() and its ` +
      `EventSource, and every other tab adds 2; without fan-out, the backend would hold one connection per client)</span>`,
      `the backend dropped the plugin's upstream connection <span id="fig-drops">${drops}</span> time${drops === 1 ? '' : 's'}; ` +
      `the plugin reconnected on its own and no client noticed`,
    );
    const plugin = panels.find((p) => p.viaPlugin);
    if (plugin) plugin.upstreamDrops(drops);
  } catch (e) {
    lines.unshift(`/sse/streams not available (${esc(e.message || e)})`);
  }
  if (m) lines.push(...compressionLines(m));
  summary.innerHTML = lines.map((l) => `<li>${l}</li>`).join('');
  story();
  setTimeout(pollFigures, 2000);
}

// story ticks off what the page is there to show, with the numbers that
// show it, so that a newcomer sees the point within half a minute.
function story() {
  const [plugin, raw] = ['plugin', 'raw'].map((k) => panels.find((p) => p.key === k));
  if (!plugin || !raw) return;
  const P = plugin.s;
  const R = raw.s;
  // Events the raw panel never got (its reconnects) that the plugin
  // panel did: the backend cannot resume a connection, the plugin's
  // upstream connection was back before the next event.
  const rawFirst = Math.min(...raw.seqs);
  const missed = [...plugin.seqs].filter((n) => n > rawFirst && !raw.seqs.has(n)).sort((a, b) => a - b);
  const items = {
    start: [P.padding > 0 && P.events > 0 && R.events > 0,
      `<b>Joining.</b> Without the plugin, the backend's greeting (<code>hello</code>): ${R.events > 0 ? 'got it' : 'waiting'}. ` +
      `With it: ${fmtBytes(P.padding)} of padding first, then ` + (P.replayed > 0
        ? `${P.replayed} recent event${P.replayed === 1 ? '' : 's'} from the plugin's cache (<span class="kind k-replay">replay</span>): ` +
          `the shared upstream greeted its first client only.`
        : `the greeting of the shared upstream, which this page opened (a later tab gets recent events from the cache instead).`)],
    quiet: [P.heartbeats > 0,
      `<b>Backend quiet.</b> With the plugin: ${P.heartbeats} heartbeat${P.heartbeats === 1 ? '' : 's'}, one per 5 s of silence. ` +
      `Without: nothing at all, the connection looks dead.`],
    pieces: [R.split > 0,
      `<b>Events cut up.</b> Without the plugin, ${R.split} network read${R.split === 1 ? '' : 's'} ended mid-event (split reads). ` +
      `With it: ${P.split}, every event arrives whole.`],
    drop: [R.drops > 0 && P.drops > 0,
      `<b>Backend drops the connection</b> (every 20 s). Without the plugin: ${R.drops} drop${R.drops === 1 ? '' : 's'}, ` +
      `${R.reconnects} reconnect${R.reconnects === 1 ? '' : 's'} by the browser` +
      (missed.length ? `, ${missed.length} event${missed.length === 1 ? '' : 's'} lost meanwhile (${missed.slice(0, 4).map((n) => '#' + n).join(' ')})` : '') +
      `. With it: the plugin reconnected ${P.drops} time${P.drops === 1 ? '' : 's'}, this page ${P.reconnects}.`],
  };
  for (const [k, [done, html]] of Object.entries(items)) {
    const li = document.querySelector(`#story [data-check="${k}"]`);
    if (!li) continue;
    li.className = done ? 'done' : '';
    li.querySelector('.txt').innerHTML = html;
  }
}

const panels = [...document.querySelectorAll('.panel')].map((el) => new Panel(el));
for (const p of panels) { p.readLoop(); p.runEventSource(); }
setInterval(() => { panels.forEach((p) => p.render()); story(); }, 250);
pollFigures();
