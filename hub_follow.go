package caddysse

// Cluster mode: leading and following a stream.
//
// With a shared broker (broker_redis.go) one node of the cluster holds a
// stream's lease and runs its upstream (it leads); every other node with
// clients of that stream follows it: it reads the broker's history into
// its window, where its clients read it exactly as they read a leader's
// (shared compression, hand-over, heartbeats unchanged). The hub's lease
// is the hub's, not an upstream connection's, so that a reload's new
// upstream takes over from the old one without a new election.
//
// Goroutines: follow (one per hub, started the first time the lease is
// refused, ended by Destruct through followCtx). The upstream loop
// (runUpstream) asks for the lease every lease.Every while it is refused.

import (
	"context"
	"errors"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"go.uber.org/zap"
)

// brokerOutage is how long the broker may fail before the hub's clients are
// ended with a retry (they reconnect, and find the stream again once the
// broker answers): heartbeats keep them connected meanwhile, but nothing
// reaches them.
var brokerOutage = 30 * time.Second // a variable for tests

// lead returns the hub's lease: the one it holds, or a new one if the
// broker grants it (fresh is then true). A refused lease starts the
// follower loop.
func (hb *hub) lead(ctx context.Context) (lease Lease, fresh, ok bool, err error) {
	hb.mu.Lock()
	if hb.leaseHeld {
		if !isClosed(hb.lease.Lost) {
			lease := hb.lease
			hb.mu.Unlock()
			return lease, false, true, nil
		}
		hb.leaseHeld, hb.leading = false, false
	}
	hb.mu.Unlock()
	lease, ok, err = hb.stream.Lead(ctx)
	if err != nil || !ok {
		hb.mu.Lock()
		hb.shared = true
		hb.mu.Unlock()
		hb.followOnce.Do(func() { go hb.follow() })
		return lease, false, false, err
	}
	hb.mu.Lock()
	hb.lease, hb.leaseHeld, hb.leading = lease, true, true
	hb.shared = hb.shared || lease.Lost != nil
	destroyed := hb.destroyed
	hb.mu.Unlock()
	if destroyed {
		hb.stream.Resign(lease)
		return Lease{}, false, false, context.Canceled
	}
	return lease, true, true, nil
}

// lostLease forgets a lease the broker took back: the hub follows.
func (hb *hub) lostLease(lease Lease) {
	hb.mu.Lock()
	if hb.leaseHeld && hb.lease.Token == lease.Token {
		hb.leaseHeld, hb.leading = false, false
	}
	hb.mu.Unlock()
	hb.followOnce.Do(func() { go hb.follow() })
}

// resignIfIdle gives the lease up when no upstream loop is left to use
// it (the hub is destroyed, or its upstream ended for good), so that
// another node takes over at once rather than after the lease's TTL.
func (hb *hub) resignIfIdle() {
	hb.mu.Lock()
	idle := hb.up == nil || hb.destroyed
	lease, held := hb.lease, hb.leaseHeld
	if idle && held {
		hb.leaseHeld, hb.leading = false, false
	}
	hb.mu.Unlock()
	if idle && held {
		hb.stream.Resign(lease)
	}
}

func isClosed(c <-chan struct{}) bool {
	if c == nil {
		return false
	}
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// follow keeps the window in step with the broker while another node
// leads: after every notification, and every couple of seconds in case
// one was lost (or the broker was down).
func (hb *hub) follow() {
	ctx := hb.followCtx
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	notified := false
	for {
		hb.mu.Lock()
		leading := hb.leading
		hb.mu.Unlock()
		if !leading {
			cctx, cancel := context.WithTimeout(ctx, redisCallTimeout)
			added, err := hb.catchUp(cctx)
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				hb.logger.Debug("could not read the stream from the broker; trying again", zap.Error(err))
			} else if notified && added == 0 {
				// A wake-up without events: the leader released the lease
				// (or the subscription came back). Ask for it now.
				select {
				case hb.leadNow <- struct{}{}:
				default:
				}
			}
		}
		notified = false
		select {
		case <-ctx.Done():
			return
		case <-hb.stream.Notify():
			notified = true
		case <-tick.C:
		}
	}
}

// catchUp reads what the broker holds after the window's newest event into
// the window, and the upstream's response if the hub has none yet. A
// history that lost events after the window's newest (trimmed past it,
// a new epoch) puts the reset event in the window before what follows:
// clients are told, never handed a silent gap.
func (hb *hub) catchUp(ctx context.Context) (added int, err error) {
	added, err = hb.readBroker(ctx)
	hb.brokerAnswered(err)
	return added, err
}

func (hb *hub) readBroker(ctx context.Context) (added int, _ error) {
	hb.mu.Lock()
	needHeader := hb.header == nil
	hb.mu.Unlock()
	if needHeader {
		resp, ok, err := hb.stream.Response(ctx)
		if err != nil {
			return 0, err
		}
		if !ok {
			return 0, nil // nobody streamed yet: nothing to read either
		}
		// Clients are answered once the backlog is in the window: a client
		// resuming with a Last-Event-ID finds it there.
		defer hb.followerStarted(resp)
	}
	hb.pubMu.Lock()
	defer hb.pubMu.Unlock()
	hb.mu.Lock()
	batch := max(hb.cfg.limits.events, 0) // cfg changes under mu (a reload applies its settings)
	hb.mu.Unlock()
	if batch == 0 || batch > 1000 {
		batch = 1000
	}
	var evs []StoredEvent
	for {
		hb.mu.Lock()
		after := hb.head
		had := after != (Position{})
		hb.mu.Unlock()
		var gapless bool
		var err error
		evs, gapless, err = hb.stream.Read(ctx, after, batch, evs[:0])
		if err != nil {
			return added, err
		}
		reset := false
		if !gapless {
			// Lost after our newest: go on from the oldest held.
			reset = true
			if evs, _, err = hb.stream.Read(ctx, Position{}, batch, evs[:0]); err != nil {
				return added, err
			}
		}
		hb.mu.Lock()
		if reset && had {
			hb.logger.Warn("the stream's shared history lost events this node had not read; sending clients the reset event")
			hb.addResetLocked()
		}
		if reset && had {
			evs = hb.skipResentLocked(after, evs)
		}
		for _, ev := range evs {
			if reset && ev.Pos.Epoch == after.Epoch && ev.Pos.Offset <= after.Offset {
				continue // the backlog of the same epoch: what the window has already
			}
			if ev.ID != "" {
				if p, ok := ParseSynthesizedID(ev.ID); !ok || p != ev.Pos {
					hb.backendIDs, hb.lastBackID = true, ev.ID
				}
			}
			hb.addLocked(ev.Pos, ev.ID, ev.Data, ev.At)
			added++
		}
		if !hb.backlogDone && len(evs) < batch {
			// The first load of a new hub: clients that joined while it was
			// loading start after it, like clients of a running stream.
			hb.backlogDone, hb.backlogSeq = true, hb.seq
		}
		hb.mu.Unlock()
		if len(evs) < batch || reset {
			return added, nil
		}
	}
}

// skipResentLocked drops from evs, the start of a new history (after is
// the window's newest, of the old one), the events up to the window's last
// backend id. A leader that took over (Redis restarted without its data)
// resumed the backend after the last backend id it had read, which can be
// older than this node's: the events in between were in this node's window
// already (read from the old history before it was lost), and would reach
// its clients twice. The window's head moves to the last one dropped, so
// the next read goes on after it. The hub's lock is held.
func (hb *hub) skipResentLocked(after Position, evs []StoredEvent) []StoredEvent {
	if !hb.backendIDs || hb.lastBackID == "" {
		return evs
	}
	for i, ev := range evs {
		if ev.Pos.Epoch != after.Epoch && ev.ID == hb.lastBackID {
			hb.head = ev.Pos
			return evs[i+1:]
		}
	}
	return evs
}

// addResetLocked puts the reset event in the window (this node's only,
// without an id): what comes next does not follow what came before.
func (hb *hub) addResetLocked() {
	if hb.resetLast {
		return // clients were told already, and nothing came since
	}
	hb.resetLast = true
	last := ""
	if ev, _ := hb.win.after(nil, hb.seq-1, 1); len(ev) == 1 {
		last = ev[0].id
	}
	data := sse.ResetEvent(hb.cfg.resetEvent, last)
	now := time.Now()
	hb.seq++
	hb.win.add(&event{seq: hb.seq, data: data, at: now, z: hb.compressShared(data)})
	hb.lastPub = now
	hb.broadcastLocked()
}

// followerStarted takes the leader's response head from the broker: the
// hub's clients are answered with it, and heartbeats start.
func (hb *hub) followerStarted(resp Response) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if hb.header != nil || hb.destroyed {
		return
	}
	hb.header, hb.status, hb.streamedAt = resp.Header, resp.Status, time.Now()
	hb.lastPub = hb.streamedAt
	if hb.heartbeat == nil && hb.cfg.heartbeat > 0 {
		hb.heartbeat = time.AfterFunc(hb.cfg.heartbeat, hb.onHeartbeat)
	}
	hb.broadcastLocked()
}

// brokerAnswered tracks broker outages: past brokerOutage the hub's
// clients are ended (with a retry) and new ones too, until it answers.
func (hb *hub) brokerAnswered(err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	hb.mu.Lock()
	defer hb.mu.Unlock()
	switch {
	case err == nil:
		if hb.unavailable {
			hb.logger.Info("the broker answers again")
		}
		hb.brokerDown, hb.unavailable = time.Time{}, false
	case hb.brokerDown.IsZero():
		hb.brokerDown = time.Now()
	case !hb.unavailable && time.Since(hb.brokerDown) > brokerOutage:
		hb.logger.Error("the broker has failed for too long; ending this stream's clients with a retry", zap.Error(err))
		hb.unavailable = true
		hb.broadcastLocked()
	}
}

// stopForExit runs when Caddy is stopping (not reloading): a leader whose
// handlers are all gone stops its upstream and gives the lease up now, so
// that another node takes over at once rather than after lease_ttl.
func (hb *hub) stopForExit() {
	hb.mu.Lock()
	if len(hb.sources) > 0 || !hb.leaseHeld || !hb.shared {
		hb.mu.Unlock()
		return
	}
	up, old := hb.up, hb.old
	hb.up, hb.old = nil, nil
	lease := hb.lease
	hb.leaseHeld, hb.leading = false, false
	hb.mu.Unlock()
	up.stopAsync()
	old.stopAsync()
	hb.stream.Resign(lease)
}
