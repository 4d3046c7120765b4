package caddysse

import (
	"fmt"
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
