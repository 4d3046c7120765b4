package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// Ticks: the backend stream "ticks" sends tickCount events tickEvery apart.
const (
	tickCount = 10
	tickEvery = 200 * time.Millisecond
	// minTickGap is the least time between two dispatches that counts as
	// "one by one": a burst delivers events well within it, while jitter on
	// a busy machine rarely eats 150ms of a 200ms gap.
	minTickGap = 50 * time.Millisecond
)

// handleTicks registers the stream "ticks" on the backend.
func handleTicks(b *backend) { handleTicksAfter(b, nil) }

// handleTicksAfter registers the stream "ticks", whose first tick waits
// until start is closed (nil: no wait).
func handleTicksAfter(b *backend, start <-chan struct{}) {
	b.handle("ticks", func(s *stream) {
		if start != nil {
			select {
			case <-start:
			case <-s.r.Context().Done():
				return
			case <-s.quit:
				return
			}
		}
		for i := range tickCount {
			if !s.send(fmt.Sprintf("id: %d\ndata: tick %d\n\n", i, i), tickEvery) {
				return
			}
		}
	})
}

// checkOneByOne opens path (a route to the "ticks" stream) under key and
// checks that the ticks are dispatched intact, each on its own, about
// tickEvery after the previous one.
func checkOneByOne(t *testing.T, p *page, key, path string) {
	p.open(t, key, path)
	checkTicks(t, p, key, path)
}

// checkTicks is checkOneByOne for an EventSource already open under key.
func checkTicks(t *testing.T, p *page, key, path string) {
	st := p.waitEvents(t, key, tickCount, tickCount*tickEvery+5*time.Second)
	if len(st.Errors) != 0 {
		t.Errorf("stream broke: %s", st.summary())
	}
	var gaps []string
	for i := 1; i < len(st.Events); i++ {
		gap := time.Duration((st.Events[i].At - st.Events[i-1].At) * float64(time.Millisecond))
		gaps = append(gaps, gap.Round(time.Millisecond).String())
		if gap < minTickGap {
			t.Errorf("event %d was dispatched %v after event %d, though sent %v later: delivered in a burst",
				i, gap, i-1, tickEvery)
		}
	}
	t.Logf("%s: gaps between dispatches (sent every %v): %s", path, tickEvery, strings.Join(gaps, " "))
	for i, e := range st.Events[:tickCount] {
		if want := msg(fmt.Sprintf("tick %d", i), fmt.Sprint(i)); !sameEvents([]event{e}, []event{want}) {
			t.Errorf("event %d = %v, want %v", i, e, want)
		}
	}
}

// TestEventsArriveOneByOne sends an event every 200ms and checks that the
// browser dispatches each one on its own, about 200ms after the previous:
// any buffering in the plugin (waiting for more bytes, a flush interval)
// would deliver events in bursts. The route without the plugin runs first,
// as a baseline that shows the measurement itself holds on this machine.
func TestEventsArriveOneByOne(t *testing.T) {
	requireBrowser(t)
	h := startCaddy(t, `{"handler":"sse","heartbeat":"1s","padding":2048}`)
	handleTicks(h.backend)
	p := newPage(t, h)
	t.Run("direct", func(t *testing.T) { checkOneByOne(t, p, "direct", "/direct/ticks") })
	t.Run("sse", func(t *testing.T) { checkOneByOne(t, p, "sse", "/sse/ticks") })
}
