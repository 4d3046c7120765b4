package caddysse

import (
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// br in fan-out: each br client compresses its own stream (a hub cannot
// share brotli output, see sharedCodings), and a real brotli decoder
// (andybalholm/brotli's reader) decodes every event as soon as it is
// published, the same text its uncompressed twin gets, on a handed-over
// HTTP/1.1 connection and on HTTP/2, for a client that joined live and one
// that resumed from the replay cache; the end has a valid brotli trailer.
func TestFanoutBrotliDecodesEachEvent(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{
		"padding": 512, "retry": "2s", "heartbeat": 0, "compress": []string{"zstd", "br", "gzip"}}))
	events := realisticEvents(40)
	plain := openDecoding(t, base+"/events", false, "")
	clients := map[string]*decodingClient{
		"HTTP/1.1 br": openDecoding(t, base+"/events", false, "br, gzip"), // Safari before 26.3
		"HTTP/2 br":   openDecoding(t, base+"/events", true, "gzip, deflate, br"),
	}
	for name, c := range clients {
		if ce := c.Resp.Header.Get("Content-Encoding"); ce != "br" {
			t.Fatalf("%s: Content-Encoding %q, want br", name, ce)
		}
	}
	e.waitJoined(t, 1)
	// What follows the prelude (the padding line, noise when compressed,
	// and the retry line).
	events0 := func(s string) string {
		_, rest, _ := strings.Cut(s, "retry: 2000\n")
		return rest
	}
	for i, ev := range events {
		if i == 20 {
			// A reconnect with the id of event 10: events 11-20 come from
			// the cache, then it goes on live with the others.
			id := strings.TrimPrefix(strings.SplitN(string(events[10]), "\n", 2)[0], "id: ")
			clients["resumed br"] = openDecoding(t, base+"/events", false, "br", "Last-Event-ID", id)
		}
		e.emit(string(ev))
		want := events0(plain.waitUntil(t, "the event", func(s string) bool { return strings.HasSuffix(s, string(ev)) }))
		for name, c := range clients {
			got := events0(c.waitUntil(t, name+": the event", func(s string) bool { return strings.HasSuffix(s, string(ev)) }))
			if name != "resumed br" && got != want {
				t.Fatalf("%s decoded %q, its uncompressed twin %q", name, tail(got), tail(want))
			}
		}
	}
	if got, _ := clients["resumed br"].state(); !strings.Contains(got, string(events[11])) || strings.Contains(got, string(events[10])) {
		t.Fatalf("resumed client did not get events 11 on from the cache: %q", tail(got))
	}
	if err := caddy.Stop(); err != nil { // the streams end from our side, with a trailer
		t.Fatal(err)
	}
	for name, c := range clients {
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: still open 5s after the server stopped", name)
		}
		if err := c.waitEnd(t); err != nil {
			t.Fatalf("%s: decoding the end of the stream: %v", name, err)
		}
	}
	waitNoLiveEncoders(t)
}
