package e2e

import (
	"testing"
	"time"
)

// TestRefusedEventSourceComesBack: a browser's EventSource that gets
// anything but 200 text/event-stream fails for good. A client refused by
// max_clients must come back once there is room: the refusal is a stream
// with a retry and an immediate end, which EventSource answers by
// reconnecting.
func TestRefusedEventSourceComesBack(t *testing.T) {
	requireBrowser(t)
	h := startCaddy(t, `{"handler":"sse","retry":"300ms","fanout":{"linger":"10s","max_clients":1}}`)
	name := uniqueName("fanout/refused")
	path := "/sse/" + name
	f := h.backend.handleFeed(name)

	first, second := newPage(t, h), newPage(t, h)
	first.open(t, "s", path)
	first.waitJS(t, "s", "streams.s.opens.length > 0", "the first tab's EventSource open", 10*time.Second)
	h.waitHub(t, path, "one client", 5*time.Second, func(s hubStatus) bool { return s.Clients == 1 })

	second.open(t, "s", path)
	// Refused twice: each time its stream ends at once, and it stays
	// CONNECTING (0) to try again, not CLOSED (2) as after a 503.
	st := second.waitJS(t, "s", "streams.s.errors.length >= 2", "the second tab refused and retrying", 10*time.Second)
	for _, e := range st.Errors {
		if e.ReadyState != 0 {
			t.Fatalf("the refused EventSource gave up (readyState %d): %s", e.ReadyState, st.summary())
		}
	}
	if len(st.Events) != 0 {
		t.Fatalf("the refused tab dispatched events: %s", st.summary())
	}

	// Once there is room, it joins: the events it is sent from then on
	// (one per half second, on the one upstream linger keeps) reach it.
	first.close(t, "s")
	for deadline := time.Now().Add(10 * time.Second); ; {
		f.emit(t, "data: welcome back\n\n")
		if st = second.state(t, "s"); len(st.Events) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the refused tab did not come back within 10s of a place freeing up: %s", st.summary())
		}
		time.Sleep(500 * time.Millisecond) // polling a condition with a deadline
	}
	if st.Events[0].Data != "welcome back" {
		t.Fatalf("the tab that came back got %v", st.Events)
	}
}
