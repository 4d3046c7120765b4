// Connects to process.argv[2] with @microsoft/fetch-event-source, as a page
// would, and prints what the client sees, one JSON object a line:
// {"on":"open"}, {"on":"message","id":..,"event":..,"data":..},
// {"on":"error","error":..} (the client then retries), {"on":"close"} (a
// clean end: the client stops). Runs in Node (20+, which has fetch).
// It retries like a page would (jsclient_test.go's reconnection tests);
// fetch-event-source-once.cjs next to it is the one-connection client of
// e2e/fetcheventsource_test.go.
'use strict';
// The library is written for browsers: it reaches for window and document.
globalThis.window = globalThis;
globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };
const { fetchEventSource } = require('@microsoft/fetch-event-source');

const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
fetchEventSource(process.argv[2], {
  openWhenHidden: true,
  async onopen(res) {
    out({ on: 'open', status: res.status });
  },
  onmessage(ev) {
    out({ on: 'message', id: ev.id, event: ev.event, data: ev.data });
  },
  onerror(err) {
    out({ on: 'error', error: String(err) });
    // undefined: retry after the server's retry (or the default).
  },
  onclose() {
    out({ on: 'close' });
  },
}).then(() => out({ on: 'done' }), (err) => out({ on: 'failed', error: String(err) }));
