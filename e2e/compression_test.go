package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestCompressedEventsArriveOneByOne forces each encoding the plugin has
// by its compress list and checks, in the browser, that events sent 200ms
// apart are still dispatched one by one (the compressor is flushed at
// every event, never waits for more input) and that the response really
// was compressed: the browser's network stack received it with that
// Content-Encoding and decoded it, and the plugin counted the bytes it
// wrote under that encoding.
func TestCompressedEventsArriveOneByOne(t *testing.T) {
	requireBrowser(t)
	cases := []struct {
		name     string
		handler  string
		encoding string
		mode     string // the plugin's metric label for the stream
	}{
		{"zstd", `{"handler":"sse","heartbeat":"1s","padding":2048,"compress":["zstd"]}`, "zstd", "passthrough"},
		{"gzip", `{"handler":"sse","heartbeat":"1s","padding":2048,"compress":["gzip"]}`, "gzip", "passthrough"},
		{"zstd-fanout", `{"handler":"sse","heartbeat":"1s","padding":2048,"compress":["zstd"],"fanout":{"linger":"0s"}}`, "zstd", "fanout"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := startCaddy(t, c.handler)
			p := newPage(t, h)
			nl := p.recordNetwork(t)
			if c.mode == "fanout" {
				// The first tick waits until the page is attached to the
				// hub: the client that opens a hub loses what the backend
				// sends at once (TestFanoutFirstClientGetsEventsSentOnConnect),
				// which is not what this test is about.
				start := make(chan struct{})
				handleTicksAfter(h.backend, start)
				p.open(t, "sse", "/sse/ticks")
				p.waitJS(t, "sse", "streams.sse.opens.length > 0", "EventSource open", 10*time.Second)
				close(start)
				checkTicks(t, p, "sse", "/sse/ticks")
			} else {
				handleTicks(h.backend)
				checkOneByOne(t, p, "sse", "/sse/ticks")
			}

			list := nl.waitExchanges(t, "/sse/ticks", 1, 5*time.Second)
			if len(list) != 1 {
				t.Fatalf("%d requests for /sse/ticks, want 1: %v", len(list), list)
			}
			ex := list[0]
			t.Logf("%v; Accept-Encoding sent: %q", ex, ex.RequestHeaders.Get("Accept-Encoding"))
			if !headerHasToken(ex.RequestHeaders.Values("Accept-Encoding"), c.encoding) {
				// The premise: the browser must offer the encoding.
				t.Fatalf("the browser did not offer %s: Accept-Encoding %q", c.encoding, ex.RequestHeaders.Get("Accept-Encoding"))
			}
			if got := ex.ResponseHeaders.Get("Content-Encoding"); got != c.encoding {
				t.Errorf("the stream came with Content-Encoding %q, want %q", got, c.encoding)
			}
			wire := h.metric(t, fmt.Sprintf(`caddy_sse_bytes_written_total{encoding=%q,mode=%q}`, c.encoding, c.mode))
			plain := h.metric(t, fmt.Sprintf(`caddy_sse_bytes_uncompressed_total{encoding=%q,mode=%q}`, c.encoding, c.mode))
			t.Logf("plugin: %.0f bytes written as %s for %.0f bytes of stream", wire, c.encoding, plain)
			if wire == 0 || plain == 0 {
				t.Errorf("the plugin counted no bytes written as %s (%v compressed, %v uncompressed)", c.encoding, wire, plain)
			}
		})
	}
}

// headerHasToken reports whether a comma-separated header field contains
// token, case-insensitively, ignoring parameters such as q.
func headerHasToken(values []string, token string) bool {
	for _, v := range values {
		for part := range strings.SplitSeq(v, ",") {
			name, _, _ := strings.Cut(part, ";")
			if strings.EqualFold(strings.TrimSpace(name), token) {
				return true
			}
		}
	}
	return false
}
