package caddysse

import (
	"bytes"
	"context"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"
)

// The hand-over between two upstream connections of one hub (a reload, or
// a new handler taking over): the old connection keeps publishing until the
// new one is known to carry on where it stopped, so an id-less backend's
// in-flight event is neither lost nor sent twice.

// handover is the new upstream connection of a backend without ids while
// the one it replaces still publishes: its events are held until the two
// streams meet, so that the switch neither loses nor repeats an event.
type handover struct {
	gen    uint64
	ctx    context.Context // the new connection's, and its lease: what its held events are published with
	lease  Lease
	events []heldEvent
	timer  *time.Timer // ends the wait (endHandover) if the streams never meet
}

// heldEvent is an event of the new connection held during a hand-over.
// Its info carries no id (a backend without ids): nothing in it aliases
// the framer's memory.
type heldEvent struct {
	raw  []byte
	info sse.Event
}

// handoverWait bounds a hand-over: if the old and the new connection of a
// backend without ids do not send a common event within it (the backend
// sends each connection something else, or the old one stalls), the new
// one takes over with what it holds, as it would at its header. A
// variable so that tests can shorten it.
var handoverWait = time.Second

// handoverMetLocked reports whether an event the new connection holds is
// one the old one published since it was replaced (hb.overlap): from
// there on the new connection repeats the old one, and can take over.
func (hb *hub) handoverMetLocked() bool {
	for _, ev := range hb.handover.events {
		for _, seen := range hb.overlap {
			if bytes.Equal(seen, ev.raw) {
				return true
			}
		}
	}
	return false
}

// switchLocked makes the hand-over's new connection the one that
// publishes, closes the old one, and returns the events the new one held:
// the caller (holding pubMu, not mu) publishes them with publishHeld.
func (hb *hub) switchLocked() []heldEvent {
	ho := hb.handover
	hb.handover = nil
	ho.timer.Stop()
	hb.liveGen = ho.gen
	hb.old.stopAsync()
	hb.old = nil
	hb.broadcastLocked() // the admin API's upstream state changed
	return ho.events
}

// publishHeld publishes what the new connection held during a hand-over,
// minus what the old one published already (repeatsOverlap). pubMu is
// held, mu is not.
func (hb *hub) publishHeld(ctx context.Context, lease Lease, evs []heldEvent) error {
	for _, ev := range evs {
		hb.mu.Lock()
		if err := hb.publishLocked(ctx, lease, ev.raw, ev.info); err != nil {
			return err
		}
	}
	return nil
}

// endHandover ends the hand-over ho, if it is still the hub's, without
// the streams having met: the old connection ended, or handoverWait
// passed. The new connection takes over with what it held.
func (hb *hub) endHandover(ho *handover) {
	hb.pubMu.Lock()
	defer hb.pubMu.Unlock()
	hb.mu.Lock()
	if hb.handover != ho || hb.destroyed {
		hb.mu.Unlock()
		return
	}
	hb.logger.Debug("upstream hand-over: the old and new connections sent no common event; switching")
	evs := hb.switchLocked()
	hb.mu.Unlock()
	_ = hb.publishHeld(ho.ctx, ho.lease, evs) // a broker failure is logged, and ends the new connection at its next event
}

// dropHandoverLocked forgets a hand-over whose new connection will not
// take over (it ended, was replaced, or the hub is destroyed): the old
// connection, which sent the same events, goes on publishing.
func (hb *hub) dropHandoverLocked() {
	if hb.handover != nil {
		hb.handover.timer.Stop()
		hb.handover = nil
	}
}

// repeatsOverlap handles the moment one upstream connection replaces
// another (a config reload): the backend sends the same events on both
// until the new one's header switches publishing to it. While both run,
// the old one's events are remembered; the new one's first events that
// repeat them are dropped, so the switch adds no duplicate. A backend with
// ids is matched by id; one without, by the event's bytes.
func (hb *hub) repeatsOverlap(raw []byte, info sse.Event) bool {
	if hb.old != nil { // the new connection has not switched yet
		if len(hb.overlap) < maxBatch {
			hb.overlap = append(hb.overlap, append([]byte(nil), raw...))
		}
		return false
	}
	if len(hb.overlap) == 0 {
		return false
	}
	for i, seen := range hb.overlap {
		if bytes.Equal(seen, raw) || (info.HasID() && len(info.ID()) > 0 && bytes.Contains(seen, append([]byte("id: "), info.ID()...))) {
			hb.overlap = hb.overlap[i+1:]
			return true
		}
	}
	hb.overlap = nil // the new connection is past the overlap
	return false
}
