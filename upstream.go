package caddysse

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// upstream is one loop that keeps the backend connected through one
// handler's route.
type upstream struct {
	owner  *fanoutRuntime // the handler whose route it runs through
	gen    uint64
	cancel context.CancelFunc
	done   chan struct{}
	orphan bool // its handler's config was unloaded: no reconnects
}

func (u *upstream) stop() {
	if u == nil {
		return
	}
	u.cancel()
	select {
	case <-u.done:
	case <-time.After(5 * time.Second):
	}
}

// source is how one handler reaches the backend: the rest of its route,
// and a request to clone for each upstream connection.
type source struct {
	next  caddyhttp.Handler
	tmpl  *http.Request
	added time.Time
}

// startUpstreamLocked runs the upstream through the newest source. A
// running upstream keeps publishing until the new one streams.
func (hb *hub) startUpstreamLocked() {
	var src *source
	var runner *fanoutRuntime
	for run, s := range hb.sources {
		if src == nil || s.added.After(src.added) {
			src, runner = s, run
		}
	}
	if src == nil {
		return
	}
	if hb.up != nil {
		hb.old.stopAsync()
		hb.old = hb.up
	}
	// The template's context carries the server's values and is already
	// detached from its client; the upstream gets a cancel of its own.
	ctx, cancel := context.WithCancel(src.tmpl.Context())
	hb.gens++
	hb.up = &upstream{owner: runner, gen: hb.gens, cancel: cancel, done: make(chan struct{})}
	go hb.runUpstream(ctx, src, hb.up)
}

func (u *upstream) stopAsync() {
	if u != nil {
		u.cancel() // its loop ends on its own
	}
}

// dropSource forgets the handler whose runtime is run (its config is being unloaded). If its
// route runs the upstream, another handler's route takes over when there
// is one; otherwise the upstream keeps its connection (but no longer
// reconnects) so that nothing is missed until a client of the new config
// arrives and takes over.
func (hb *hub) dropSource(run *fanoutRuntime) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	delete(hb.sources, run)
	if hb.up == nil || hb.up.owner != run {
		return
	}
	hb.up.orphan = true
	if !hb.destroyed && len(hb.sources) > 0 {
		hb.startUpstreamLocked()
	}
}

// runUpstream keeps the hub's upstream connected for as long as ctx
// lives: when the backend's stream ends or fails, it reconnects with
// backoff, honouring the backend's retry, so that connected clients see
// one continuous stream. A backend answer that is not a stream ends it.
func (hb *hub) runUpstream(ctx context.Context, src *source, u *upstream) {
	defer close(u.done)
	backoff := time.Duration(0)
	for {
		// Only the lease holder runs the upstream (the memory broker always
		// grants it). A node without the lease asks again later.
		// TODO(cluster): meanwhile follow the broker (Notify, then Read
		// into the window) and share the upstream's header through it.
		lease, ok, err := hb.stream.Lead(ctx)
		if err != nil || !ok {
			if ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, 500*time.Millisecond), maxBackoff)
			hb.logger.Debug("not leading this stream; asking again later", zap.Duration("after", backoff), zap.Error(err))
			if !sleepCtx(ctx, backoff) {
				return
			}
			continue
		}
		streamed, notStream, err := hb.connect(ctx, src, u.gen, lease)
		if ctx.Err() != nil {
			return
		}
		hb.mu.Lock()
		if hb.up != u || u.orphan {
			// Replaced, or its config is gone: a newer upstream (or the next
			// client) takes over.
			if hb.up == u {
				hb.up = nil
			}
			hb.mu.Unlock()
			return
		}
		u.owner.policy.metrics.upstreamFailed()
		if notStream || hb.header == nil {
			hb.failed = true
			hb.up = nil
			hb.header = nil
			hb.broadcastLocked()
			hb.mu.Unlock()
			hb.logger.Warn("backend did not answer with an event stream; closing its clients", zap.Error(err))
			return
		}
		// The backend's retry (or 500ms) after a stream that lasted; doubling
		// up to maxBackoff while it keeps failing or ending at once.
		base := cmp.Or(hb.retry, 500*time.Millisecond)
		if streamed && time.Since(hb.streamedAt) > 10*time.Second {
			backoff = base
		} else {
			backoff = min(max(2*backoff, base), maxBackoff)
		}
		hb.reconnects++
		hb.mu.Unlock()
		hb.logger.Info("backend stream ended; reconnecting", zap.Duration("after", backoff), zap.Error(err))
		if !sleepCtx(ctx, backoff) {
			return
		}
	}
}

// sleepCtx waits d, or less if ctx ends first (then it returns false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// connect runs one upstream request through the handler's route.
func (hb *hub) connect(ctx context.Context, src *source, gen uint64, lease Lease) (streamed, notStream bool, err error) {
	hw := &hubWriter{hub: hb, ctx: ctx, gen: gen, lease: lease, header: make(http.Header)}
	req := src.tmpl.Clone(ctx)
	req.Header.Del("Accept-Encoding")
	hb.mu.Lock()
	if hb.backendIDs && hb.lastBackID != "" {
		req.Header.Set("Last-Event-ID", hb.lastBackID)
	}
	hb.mu.Unlock()
	server, _ := req.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	// A fresh replacer and vars: the client whose request this was made
	// from may still be using its own.
	req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), hw, server)
	func() {
		defer func() {
			if rec := recover(); rec != nil && rec != http.ErrAbortHandler {
				err = fmt.Errorf("upstream handler panicked: %v", rec)
			}
		}()
		err = src.next.ServeHTTP(hw, req)
	}()
	hw.finish()
	return hw.streaming, hw.notStream, err
}

// hubWriter is the ResponseWriter the upstream request writes into: it
// splits the stream into events and publishes each one to the hub.
type hubWriter struct {
	hub         *hub
	ctx         context.Context // the upstream's: ends when it is stopped
	gen         uint64          // which upstream connection this is
	lease       Lease           // fences its appends to the broker
	header      http.Header
	wroteHeader bool
	streaming   bool
	notStream   bool
	frame       sse.Framer
	oversize    bool // dropping the rest of an event larger than max_event_size
}

func (w *hubWriter) Header() http.Header { return w.header }

func (w *hubWriter) WriteHeader(status int) {
	if w.wroteHeader || (status >= 100 && status < 200) {
		return
	}
	w.wroteHeader = true
	if ok, _ := isEventStream(status, w.header); !ok {
		w.notStream = true
		return
	}
	w.streaming = true
	w.hub.streamStarted(w.gen, status, w.header.Clone())
}

var errNotStream = errors.New("sse: upstream response is not an event stream")

func (w *hubWriter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.notStream {
		return 0, errNotStream
	}
	start := 0
	for off := 0; off < len(p); {
		n, complete := w.frame.Next(p[off:])
		off += n
		if !complete {
			continue
		}
		switch chunk := p[start:off]; {
		case w.oversize:
			w.frame.Drop()
		case w.frame.Held()+len(chunk) > w.hub.cfg.maxEventSize:
			w.dropOversize()
			w.frame.Drop()
		default:
			w.publish(w.frame.Take(chunk))
			w.frame.Release()
		}
		w.oversize = false
		start = off
	}
	rest := p[start:]
	switch {
	case len(rest) == 0 || w.oversize:
	case w.frame.Held()+len(rest) > w.hub.cfg.maxEventSize:
		w.dropOversize()
		w.oversize = true
		w.frame.Drop()
	default:
		w.frame.Hold(rest)
	}
	return len(p), nil
}

func (w *hubWriter) dropOversize() {
	w.hub.logger.Warn("dropping an event larger than max_event_size: fan-out delivers and caches whole events only",
		zap.Int("max_event_size", w.hub.cfg.maxEventSize))
}

func (w *hubWriter) publish(raw []byte) {
	info := w.frame.Event()
	if info.LeadingLF() {
		raw = raw[1:] // the partner of the previous event's CR
	}
	if !info.HasFields() {
		return // the backend's own heartbeats: the hub sends its own
	}
	w.hub.publish(w.ctx, w.gen, w.lease, raw, info)
}

// FlushError: events are published as they complete; nothing to flush.
func (w *hubWriter) FlushError() error { return nil }

// finish drops an unfinished event left when the upstream ended.
func (w *hubWriter) finish() {
	if w.frame.Held() > 0 {
		w.hub.logger.Debug("backend stream ended in the middle of an event; dropped it", zap.Int("bytes", w.frame.Held()))
	}
	w.frame.Drop()
}
