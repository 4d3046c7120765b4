// Connects to an event stream with @microsoft/fetch-event-source, as a
// page would, and prints one JSON line per message it dispatches, then
// {"done": ...} when the stream ends or after the given time.
//
// usage: node fetch-event-source-once.cjs <url> <milliseconds>
//
// It stops at the first message whose data is "end" (the tests' last event),
// and never retries: e2e/fetcheventsource_test.go wants one connection.
// fetch-event-source.cjs next to it is the client that retries
// (jsclient_test.go's reconnection tests); both share this folder's
// package.json and package-lock.json.
//
// fetch-event-source is written for browsers: it reads window and document
// (for its retry timer and page visibility). Node has neither, so they are
// stood in for here; openWhenHidden keeps it from watching visibility.
'use strict';
globalThis.window = globalThis;
globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };

const { fetchEventSource } = require('@microsoft/fetch-event-source');

const [url, ms] = process.argv.slice(2);
const ctrl = new AbortController();
const started = Date.now();
const print = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const timer = setTimeout(() => {
  ctrl.abort();
  print({ done: 'timeout' });
}, Number(ms));

fetchEventSource(url, {
  signal: ctrl.signal,
  openWhenHidden: true,
  async onopen(res) {
    print({ open: res.status, contentType: res.headers.get('content-type') });
  },
  onmessage(m) {
    print({ at: Date.now() - started, id: m.id, event: m.event, data: m.data, retry: m.retry });
    if (m.data === 'end') {
      clearTimeout(timer);
      print({ done: 'end' });
      ctrl.abort();
    }
  },
  onclose() {
    // A clean end: fetch-event-source would call it done; stop here.
    clearTimeout(timer);
    print({ done: 'closed' });
    ctrl.abort();
  },
  onerror(err) {
    clearTimeout(timer);
    print({ done: 'error', error: String(err) });
    throw err; // no retry: the test wants one connection
  },
}).catch(() => {});
