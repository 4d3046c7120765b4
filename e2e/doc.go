// Package e2e holds the browser end-to-end tests of the sse handler: a real
// Caddy, started in-process, sits between a headless Chromium and a Go SSE
// backend, and the tests compare what the browser's own EventSource
// dispatches through the plugin with what it dispatches without it.
//
// Run them with
//
//	go test -race ./e2e/ -v
//
// They need Chromium (Debian: apt-get install chromium). They look for
// $SSE_E2E_CHROMIUM, then /usr/bin/chromium, then chromium or
// chromium-browser on PATH. Without a browser they skip, unless
// SSE_E2E_REQUIRE_BROWSER=1 is set (as in CI), in which case they fail.
//
// Layout of the files:
//
//   - browser_test.go: TestMain starts one shared browser; newPage opens a
//     tab on the test page, and page's methods open EventSources and poll
//     what they dispatched (waitEvents, waitType, waitJS).
//   - harness_test.go: startCaddy loads a config with the sse handler under
//     test in front of a scriptable backend, plus a route without it and an
//     idle-timeout guard; see startCaddy for the routes.
//   - server_test.go: the server's side as tests see it: the plugin's
//     GET /sse/streams and the metrics on Caddy's admin endpoint, a backend
//     stream the test writes event by event (feed), and a TCP forwarder
//     that cuts the browser's connections (cutter).
//   - network_test.go: the tab's requests and responses as the browser's
//     network stack saw them (headers on the wire both ways).
//   - testdata/page.html: the page, which records every dispatched event.
//   - demo_test.go: the demo (demo/Caddyfile, demo/www) as a person sees
//     it; SSE_E2E_SCREENSHOTS=<dir> keeps its screenshot.
//   - *_test.go: one file per behaviour.
package e2e
