package caddysse

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// A backend that writes far more than client_queue events at once (a
// history replay, a batch) must not cut clients that read at full speed:
// every one of them, handed over (HTTP/1.1) or on its request (HTTP/2),
// gets every event, in order. Only a client whose bytes stop leaving is
// cut (TestFanoutSlowClientCutOff, TestFanoutStalledHTTP2ClientCutByWriteTimeout).
func TestFanoutBurstKeepsFastClients(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	const n = 5000
	base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"buffer_events": 2 * n}}))
	clients := []*client{
		openStream(t, base+"/events", false),
		openStream(t, base+"/events", false),
		openStream(t, base+"/events", true),
		openStream(t, base+"/events", true),
	}
	e.waitJoined(t, 1)
	waitHubClients(t, base, len(clients))
	var burst strings.Builder
	for i := range n {
		fmt.Fprintf(&burst, "data: %d %s\n\n", i, strings.Repeat("x", 100))
	}
	e.emit(burst.String())
	for i, c := range clients {
		waitCount(t, c, n, 10*time.Second)
		for j, ev := range eventsOf(c) {
			if want := fmt.Sprintf("%d %s", j, strings.Repeat("x", 100)); ev.Data != want {
				t.Fatalf("client %d: event %d is %.20q, want %.20q", i, j, ev.Data, want)
			}
		}
	}
	waitHubClients(t, base, len(clients))
}

// waitCount waits until c parsed n events, and fails with a short account
// (not the whole stream) if it does not within d.
func waitCount(t testing.TB, c *client, n int, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		got, _, _ := parseEvents(c.bytes())
		if len(got) >= n {
			return
		}
		select {
		case <-c.more:
		case <-c.eof:
			if got, _, _ := parseEvents(c.bytes()); len(got) >= n {
				return
			}
			t.Fatalf("stream ended (%v) after %d of %d events", c.err, len(got), n)
		case <-deadline:
			t.Fatalf("%d of %d events within %s", len(got), n, d)
		}
	}
}

// A client refused by a limit must come back later. An EventSource gets
// 200 text/event-stream with a jittered retry and an immediate end (a
// non-200 answer would stop it for good); a client that did not ask for
// an event stream gets 503 with Retry-After.
func TestFanoutRefusalEventSourceComesBack(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"retry": "2s", "fanout": map[string]any{"max_clients": 1, "any_accept": true}}))
	openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	waitHubClients(t, base, 1)
	retries := map[string]bool{}
	for _, h2 := range []bool{false, true, false, true} {
		c := openStream(t, base+"/events", h2)
		got := string(c.waitEOF(t, 5*time.Second))
		if c.Resp.StatusCode != http.StatusOK || c.Resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("refused EventSource (h2 %v) got %d %q", h2, c.Resp.StatusCode, c.Resp.Header.Get("Content-Type"))
		}
		var ms int
		if _, err := fmt.Sscanf(got, "retry: %d\n\n", &ms); err != nil || got != fmt.Sprintf("retry: %d\n\n", ms) || ms < 2000 || ms >= 4000 {
			t.Fatalf("refused EventSource (h2 %v) got body %q, want one retry field in [2000, 4000)", h2, got)
		}
		retries[got] = true
	}
	if len(retries) < 2 {
		t.Errorf("four refusals all got %v: the retry is not jittered", retries)
	}
	// Not an EventSource: 503, as before.
	req, _ := http.NewRequest("GET", base+"/events", nil)
	req.Header.Set("Accept", "*/*")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "2" {
		t.Fatalf("refused non-EventSource client got %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	waitHubClients(t, base, 1)
}
