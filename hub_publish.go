package caddysse

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"
	"go.uber.org/zap"
)

// Publishing: how an event of the upstream becomes part of the stream. The
// broker is asked first (outside the hub's lock; pubMu keeps publishers in
// order), then the event joins this node's window and the clients are
// woken. Gap events and broker failures are published here too.

// publishGap publishes the reset event of a gap, if one is due: the
// upstream of a backend without ids was re-opened (restart, failover),
// and what it produced meanwhile is gone. Clients stay connected and the
// history stays valid up to here, but the gap must not be silent: every
// client (and every replay across this point) gets the reset event, whose
// data is the last id before the gap, so a page can refetch its state.
// It has an id of ours (unless ids upstream), so clients that got it
// resume after it. A backend with ids is resumed with Last-Event-ID
// instead: no gap. The connection's header calls it, before its events.
func (hb *hub) publishGap(ctx context.Context, gen uint64, lease Lease) {
	hb.pubMu.Lock()
	defer hb.pubMu.Unlock()
	hb.mu.Lock()
	if !hb.gap || gen != hb.liveGen {
		hb.mu.Unlock()
		return
	}
	hb.gap = false
	lastID := ""
	if ev, _ := hb.win.after(nil, hb.seq-1, 1); len(ev) == 1 {
		lastID = ev[0].id
	}
	raw, synthesize := sse.ResetEvent(hb.cfg.resetEvent, lastID), hb.cfg.ids != "upstream"
	hb.mu.Unlock()
	hb.logger.Info("reconnected to a backend without ids; events sent while disconnected are lost: sending clients the reset event")
	_ = hb.store(ctx, lease, raw, "", synthesize, false) // a failure is logged; the connection's next event fails too
}

// publish appends one complete event to the broker, then adds it to the
// window and wakes the clients.
func (hb *hub) publish(ctx context.Context, gen uint64, lease Lease, raw []byte, info sse.Event) error {
	hb.pubMu.Lock()
	defer hb.pubMu.Unlock()
	hb.mu.Lock()
	if ho := hb.handover; ho != nil && gen == ho.gen {
		// The new connection of a hand-over: held until it meets the old.
		ho.events = append(ho.events, heldEvent{raw: append([]byte(nil), raw...), info: info})
		if !hb.handoverMetLocked() && len(ho.events) < maxBatch && !(info.HasID() && len(info.ID()) > 0) {
			hb.mu.Unlock()
			return nil
		}
		// Met (or too much held, or the backend now sends ids, which
		// match on their own): the new connection takes over.
		evs := hb.switchLocked()
		hb.mu.Unlock()
		return hb.publishHeld(ctx, lease, evs)
	}
	if gen != hb.liveGen {
		hb.mu.Unlock()
		return nil // a replaced upstream's late event
	}
	if err := hb.publishLocked(ctx, lease, raw, info); err != nil {
		return err
	}
	hb.mu.Lock()
	if ho := hb.handover; ho != nil && gen == hb.liveGen && hb.handoverMetLocked() {
		// The old connection delivered what the new one began with.
		evs := hb.switchLocked()
		hb.mu.Unlock()
		return hb.publishHeld(ho.ctx, ho.lease, evs)
	}
	hb.mu.Unlock()
	return nil
}

// publishLocked publishes an event of the live upstream connection. pubMu
// and mu are held; mu is released.
func (hb *hub) publishLocked(ctx context.Context, lease Lease, raw []byte, info sse.Event) error {
	if hb.repeatsOverlap(raw, info) {
		hb.mu.Unlock()
		return nil
	}
	id := ""
	if info.HasID() && !info.IDTooLong() {
		id = string(info.ID())
	}
	// An empty id (r3labs/sse writes "id: " on every event) only clears
	// the client's last id: the backend has no ids to resume from, and
	// under ids auto the event gets one of ours.
	backendID := info.HasID() && len(info.ID()) > 0
	if backendID {
		hb.backendIDs = true
	}
	if info.Retry() >= 0 {
		hb.retry = time.Duration(min(info.Retry(), int64(maxBackoff/time.Millisecond))) * time.Millisecond
		hb.retryField = []byte("retry: " + strconv.FormatInt(info.Retry(), 10) + "\n") // a line, as sse.RetryField
	}
	synthesize := hb.cfg.ids == "synthesize" || (hb.cfg.ids == "auto" && !backendID)
	hb.mu.Unlock()

	// The broker, outside the hub's lock.
	return hb.store(ctx, lease, raw, id, synthesize, backendID)
}

// store appends an event to the broker, with an id of ours when
// synthesize is set (its own, id, otherwise), then adds it to the window
// and wakes the clients. pubMu is held, mu is not. backendID says id is the
// backend's: once stored, the next upstream connection resumes after it.
// An error (the broker failed) ends the upstream connection.
func (hb *hub) store(ctx context.Context, lease Lease, raw []byte, id string, synthesize, backendID bool) error {
	var data []byte
	var next Position
	if synthesize {
		var err error
		if next, err = hb.stream.Next(ctx); err != nil {
			return hb.brokerFailed("next position", err)
		}
		id = SynthesizedID(next)
		data = sse.WithID(raw, id)
	} else {
		data = sse.Terminated(raw)
	}
	now := time.Now()
	pos, err := hb.stream.Append(ctx, lease, StoredEvent{ID: id, Data: data, At: now})
	if err != nil {
		return hb.brokerFailed("append", err)
	}
	if synthesize && pos != next {
		// Only the lease holder appends, so this is not expected; the id
		// still names an event, just not this one's position.
		hb.logger.Error("broker appended at another position than announced", zap.String("id", id))
	}

	hb.mu.Lock()
	defer hb.mu.Unlock()
	if head := hb.head; head != (Position{}) && (pos.Epoch != head.Epoch || pos.Offset != head.Offset+1) {
		// The store lost events after the window's newest (Redis restarted
		// without its data, a failover to a replica that lagged): say so.
		hb.logger.Warn("the stream's shared history lost events; sending clients the reset event")
		hb.addResetLocked()
	}
	if backendID {
		// Only once it is in the history: a new upstream connection resumes
		// the backend after the last event the stream holds.
		hb.lastBackID = id
	}
	hb.addLocked(pos, id, data, now)
	return nil
}

// addLocked adds an event of the broker's history to the window and wakes
// the clients. The hub's lock is held.
func (hb *hub) addLocked(pos Position, id string, data []byte, at time.Time) {
	if pos.Epoch != hb.epoch || hb.epochSeq+pos.Offset != hb.seq+1 {
		if hb.epoch != "" && pos.Epoch != hb.epoch {
			// The broker's history restarted: clients go on from the window,
			// ids of the old epoch are no longer found.
			hb.logger.Warn("broker history began a new epoch; ids from before it can no longer be resumed")
		}
		// A new epoch, or offsets that skip (a follower that missed
		// trimmed events, or a local reset event before them): offsets map
		// to window seqs from here on only, so that no id from before the
		// jump can name the wrong event.
		hb.epoch, hb.epochSeq, hb.epochFrom = pos.Epoch, hb.seq+1-pos.Offset, pos.Offset
	}
	hb.seq++
	hb.head = pos
	hb.resetLast = false
	hb.win.add(&event{seq: hb.seq, id: id, data: data, at: at, z: hb.compressShared(data)})
	hb.lastPub = at
	hb.broadcastLocked()
}

// brokerFailed logs an event the broker did not take: clients do not get
// it (it has no position, and nothing is made up). The error ends the
// upstream connection: the leader connects again once the broker answers
// (resuming a backend with ids after the last event held), or another node
// takes over if the lease is lost meanwhile.
func (hb *hub) brokerFailed(op string, err error) error {
	if errors.Is(err, context.Canceled) {
		return err // the upstream is being stopped
	}
	hb.mu.Lock()
	hb.down = true // an id-less backend cannot resend what was dropped: a gap (publishGap)
	hb.mu.Unlock()
	if errors.Is(err, ErrFenced) {
		hb.logger.Warn("lost the lease of this stream; another node runs the upstream", zap.String("op", op))
		return err
	}
	hb.logger.Error("broker failed; dropping the event and reconnecting the upstream", zap.String("op", op), zap.Error(err))
	return err
}
