package e2e

import (
	"testing"
	"time"
)

// TestHeartbeatKeepsIdleStreamOpen puts the plugin behind a proxy that
// drops a response it could read nothing from for guardReadTimeout (the
// /guarded/ route), and leaves the stream silent for about twice that.
func TestHeartbeatKeepsIdleStreamOpen(t *testing.T) {
	requireBrowser(t)

	// The control: with heartbeats off the guard really does kill a silent
	// stream, and EventSource notices. Without this, the case below could
	// pass because the guard never fires.
	t.Run("heartbeat off: the idle timeout kills the stream", func(t *testing.T) {
		h := startCaddy(t, `{"handler":"sse","heartbeat":0}`)
		h.backend.handle("silent", func(s *stream) { s.send("data: hello\n\n") })
		p := newPage(t, h)
		p.open(t, "s", "/guarded/silent")
		st := p.waitEvents(t, "s", 1, 5*time.Second)
		hello := st.Events[0].At
		st = p.waitErrors(t, "s", 1, guardReadTimeout+5*time.Second)
		after := time.Duration((st.Errors[0].At - hello) * float64(time.Millisecond))
		t.Logf("stream broke %v after its last event (guard read_timeout %v); %s", after.Round(time.Millisecond), guardReadTimeout, st.summary())
		// Well before the timeout would mean something else broke it. (The
		// guard counts from its last read, a little before the browser
		// dispatched "hello", hence the slack.)
		if after < guardReadTimeout/2 {
			t.Errorf("stream broke after %v, before the guard's %v idle timeout could fire", after, guardReadTimeout)
		}
		if st.Errors[0].ReadyState != 0 {
			t.Errorf("EventSource readyState after the error = %d, want 0 (reconnecting)", st.Errors[0].ReadyState)
		}
	})

	// Heartbeats every 1s (the smallest the plugin accepts) are written
	// while the backend is silent, so the guard always has something to
	// read: no error, no reconnect, and the late event comes on the first
	// and only connection.
	t.Run("heartbeat 1s: the stream stays open", func(t *testing.T) {
		const silence = 2*guardReadTimeout + 500*time.Millisecond
		h := startCaddy(t, `{"handler":"sse","heartbeat":"1s"}`)
		h.backend.handle("silent", func(s *stream) {
			s.send("data: hello\n\n", silence, "data: late\n\n")
		})
		p := newPage(t, h)
		p.open(t, "s", "/guarded/silent")
		st := p.waitEvents(t, "s", 2, silence+5*time.Second)
		t.Logf("%s", st.summary())
		want := []event{msg("hello", ""), msg("late", "")}
		if !sameEvents(st.Events, want) {
			t.Errorf("events differ:%s", diffEvents(st.Events, want))
		}
		if len(st.Errors) != 0 || len(st.Opens) != 1 {
			t.Errorf("stream broke or reconnected during %v of backend silence: %d errors, %d opens", silence, len(st.Errors), len(st.Opens))
		}
		if n := len(h.backend.requestsFor("silent")); n != 1 {
			t.Errorf("backend got %d requests, want 1: the late event must come on the first connection", n)
		}
		gap := time.Duration((st.Events[len(st.Events)-1].At - st.Events[0].At) * float64(time.Millisecond))
		if gap < silence-time.Second {
			t.Errorf("late event came %v after the first, before the backend's %v of silence ended", gap, silence)
		}
	})
}
