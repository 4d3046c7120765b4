package caddysse

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"go.uber.org/zap"
)

// subscriber is one client of a hub.
type subscriber struct {
	endOnce sync.Once
	ended   chan struct{}
	reason  endReason
	poke    func() // wakes whoever serves the client
}

func (s *subscriber) end(reason endReason) {
	s.endOnce.Do(func() {
		s.reason = reason
		close(s.ended)
		s.poke()
	})
}

// leave takes the client out of its hub's count before its request is
// served some other way.
func (c *fanoutClient) leave() {
	if c.joined {
		c.joined = false
		c.hub.leave()
	}
}

// release undoes what admitting the client did, once its stream is over.
func (c *fanoutClient) release() {
	if c.z != nil {
		c.hub.detachShared(c.z)
	}
	if c.sub != nil {
		c.pol.streams.remove(c.sub)
		c.hub.out[c.encoding].clients.Add(-1)
	}
	c.leave()
	c.out.endEncoding(false) // an own encoder's memory, if endEncoding did not run
	if c.hub != nil {
		c.pol.release(c.hub)
	}
	if c.pol.clients != nil {
		c.pol.clients.Add(-1)
	}
}

// endEncoding finishes a compressed stream (gzip trailer, last zstd block)
// when the stream ended on our side and the client is still there. A
// client's own encoder (br) is finished then too, and released in any case.
func (c *fanoutClient) endEncoding() {
	if c.z != nil && c.clean {
		_ = c.z.end(&c.out)
	}
	c.out.endEncoding(c.clean)
}

// ownEncoder gives a client whose coding the hub does not compress for
// all (br, see sharedCodings) an encoder of its own, once its connection
// is set up: everything it writes then goes through it.
func (c *fanoutClient) ownEncoder() error {
	if c.encoding == codingIdentity || sharedCodings[c.encoding] {
		return nil
	}
	return c.out.compress(c.encoding)
}

// fanoutClient is one client of a hub: a cursor into the hub's cache and
// the connection its events are written to. It is served either on its
// own request goroutine (run) or, once its connection is handed over, by
// the hub's delivery loop (detach.go); both go through step.
type fanoutClient struct {
	hub        *hub
	pol        *clientPolicy // its handler's settings
	out        clientConn
	sub        *subscriber
	cursor     uint64
	beats      uint64 // the hub's heartbeat count last answered
	ends       uint64 // the hub's count of honoured backend ends when the client joined
	encoding   coding
	z          *sharedWriter // a compressed stream's writer; nil for identity
	wire       int64         // bytes on the wire, after compression
	counted    int64         // wire bytes already reported to the metrics
	clean      bool          // the stream ended on our side, not by a failed write
	joined     bool          // counted in the hub's clients
	detached   bool          // served by the hub's delivery loop (detach.go)
	headerSent bool          // by detach, before it found it could not take over
	wc         *wireConn     // the handed-over connection, when detached
	dl         atomic.Pointer[deliverer]
	peerGone   atomic.Bool // the detached connection was closed by the client
	maxAge     *time.Timer
}

// poke wakes the delivery loop of a detached client.
func (c *fanoutClient) poke() {
	if d := c.dl.Load(); d != nil {
		d.poke()
	}
}

// flushed reports a batch of raw bytes and the wire bytes they became.
func (c *fanoutClient) flushed(raw int) {
	wire := c.wire - c.counted
	c.pol.metrics.bytesWritten(modeFanout, c.encoding, int(wire), raw)
	c.counted = c.wire
	out := &c.hub.out[c.encoding]
	out.raw.Add(int64(raw))
	out.wire.Add(wire)
}

// writeFailed reports a client cut off by write_timeout, and returns err.
func (c *fanoutClient) writeFailed(err error) error {
	if c.out.isWriteTimeout(err) {
		c.pol.metrics.slowClientCut(modeFanout)
		c.hub.logger.Warn("client did not take a write within write_timeout; disconnecting it")
	}
	return err
}

// start writes the client's first bytes and takes the hub's heartbeat
// count, so that only heartbeats due from now on are written.
func (c *fanoutClient) start(first []byte) error {
	c.beats = c.hub.heartbeats()
	if err := c.writeOwn(time.Now(), first); err != nil {
		return c.writeFailed(err)
	}
	return nil
}

// maxAgeAfter is when a stream ends under max_age: 80-100% of it.
func (c *fanoutClient) maxAgeAfter() time.Duration {
	return jitter(c.pol.maxAge)
}

// run serves the client on its request goroutine until its stream ends.
func (c *fanoutClient) run(ctx context.Context, first []byte) error {
	if c.start(first) != nil {
		return nil // the client is gone: not an error of the handler
	}
	var (
		batch  []*event
		maxAge <-chan time.Time
	)
	if c.pol.maxAge > 0 {
		t := time.NewTimer(c.maxAgeAfter())
		defer t.Stop()
		maxAge = t.C
	}
	for {
		var wake <-chan struct{}
		var done bool
		wake, done, batch = c.step(batch)
		if done {
			return nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return nil
		case <-c.sub.ended:
			return c.finish(c.sub.reason)
		case <-maxAge:
			return c.finish(endMaxAge)
		}
	}
}

// step writes what is due: the events after the cursor (in batches of
// one flush each), or a heartbeat. It returns the channel the hub closes
// when there is more, or done when the client's stream is over (cut off
// for falling out of the cache, failed, or its upstream gone). batch is
// scratch space, handed back for reuse.
//
// How far behind the live stream a client is does not cut it: a backend
// that writes thousands of events at once (a history replay, a batch)
// puts every client that far behind for a moment, however fast it reads.
// A client is slow when its bytes stop leaving: a write that does not
// complete within write_timeout cuts it (writeFailed, and wireConn's
// drain for a handed-over one). What it can be behind is bounded by the
// cache: once its next event is evicted, it is cut and resumes (or gets
// the reset event) from its Last-Event-ID.
func (c *fanoutClient) step(batch []*event) (wake <-chan struct{}, done bool, _ []*event) {
	hb := c.hub
	for {
		hb.mu.Lock()
		var ok bool
		batch, ok = hb.win.after(batch[:0], c.cursor, maxBatch)
		lag, nowBeats, gone := hb.seq-c.cursor, hb.beats, hb.destroyed || (hb.failed && hb.up == nil) || hb.ends != c.ends || hb.unavailable
		wake = hb.wake
		if c.z != nil {
			hb.noteWaitingLocked(c.z, batch)
		}
		hb.mu.Unlock()
		if !ok {
			c.cutBehind(lag, true)
			return nil, true, batch
		}
		now := time.Now()
		switch {
		case len(batch) > 0:
			err := c.deliver(now, batch)
			clear(batch) // hold no evicted event
			if err != nil {
				return nil, true, batch
			}
			// A heartbeat due meanwhile is moot: the client just got events.
			// (Written now, it would also take a compressed client out of
			// the shared epoch the heartbeat's restart began.)
			c.beats = nowBeats
			continue
		case nowBeats != c.beats:
			c.beats = nowBeats
			if err := c.writeOwn(now, c.pol.heartbeatBytes); err != nil {
				_ = c.writeFailed(err)
				return nil, true, batch
			}
			c.pol.metrics.heartbeatsSent(modeFanout, 1)
		case gone:
			_ = c.finish(endBackend)
			return nil, true, batch
		}
		return wake, false, batch
	}
}

// cutBehind disconnects a client that fell behind the stream.
func (c *fanoutClient) cutBehind(lag uint64, evicted bool) {
	c.hub.logger.Warn("client fell behind the stream; disconnecting it (it resumes from the cache)",
		zap.Uint64("behind", lag), zap.Bool("evicted", evicted))
	c.pol.metrics.slowClientCut(modeFanout)
}

// deliver writes a batch of events with one flush and moves the cursor.
func (c *fanoutClient) deliver(now time.Time, batch []*event) error {
	raw := 0
	for _, ev := range batch {
		var err error
		if c.z != nil {
			err = c.z.event(&c.out, now, ev)
		} else {
			err = c.out.write(now, ev.data)
		}
		if err != nil {
			return c.writeFailed(err)
		}
		raw += len(ev.data)
	}
	c.cursor = batch[len(batch)-1].seq
	if err := c.flush(now); err != nil {
		return c.writeFailed(err)
	}
	c.pol.metrics.eventsForwarded(modeFanout, len(batch))
	c.flushed(raw)
	return nil
}

// writeOwn writes and flushes bytes of this client's own (prelude,
// heartbeat, retry hint): as they are, or as blocks of a compressed
// stream that are not shared.
func (c *fanoutClient) writeOwn(now time.Time, p []byte) error {
	var err error
	if c.z != nil {
		err = c.z.own(&c.out, now, p)
	} else if len(p) > 0 {
		err = c.out.write(now, p)
	}
	if err == nil {
		err = c.flush(now)
	}
	if err != nil {
		return err
	}
	c.flushed(len(p))
	return nil
}

// flush pushes out what was written (the header too).
func (c *fanoutClient) flush(now time.Time) error {
	if err := c.out.arm(now); err != nil {
		return err
	}
	if c.z != nil {
		return c.z.flush(&c.out, now)
	}
	return c.out.flush()
}

// finish ends the client's stream cleanly, with a retry hint: on
// shutdown a random one between the configured retry (1s when none) and
// twice that, so that a reload's reconnects do not arrive all at once.
func (c *fanoutClient) finish(reason endReason) error {
	c.clean = true
	hint := c.pol.retryHint
	if reason == endBackend {
		hint = c.hub.endRetry(hint)
	}
	if reason == endShutdown {
		base := max(c.pol.retry, time.Second)
		hint = sse.RetryField(base + rand.N(base))
	}
	if len(hint) > 0 {
		if err := c.writeOwn(time.Now(), hint); err != nil {
			c.clean = false // no trailer for a client that is gone
		}
	}
	return nil
}
