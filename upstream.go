package caddysse

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"strings"
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
	route routeState // what the route before sse set on the first request
}

// routeState is what the handlers and matchers before sse left in a
// request's context for the handlers after it: Caddy's vars (where `root`
// and `vars` put their values, php_fastcgi and file_server read root
// there), the placeholders they set on the replacer (regexp captures,
// `map`), which route groups matched, and the request as it arrived. The
// upstream request is made with a fresh replacer and vars (the client it
// was cloned from keeps using its own), so without carrying these the
// rest of the route would see another request: php_fastcgi's
// DOCUMENT_ROOT would be Caddy's working directory.
type routeState struct {
	vars   map[string]any
	groups map[string]struct{}
	repl   *caddy.Replacer
	orig   any // the caddyhttp.OriginalRequestCtxKey value
}

// routeGroupCtxKey is caddyhttp's key of the matched route groups
// (unexported there; a caddy.CtxKey is a string, so this is the same key).
const routeGroupCtxKey = caddy.CtxKey("route_group")

// snapshotRoute copies r's route state, on r's own goroutine: vars and
// groups are plain maps that r's handlers may still change.
func snapshotRoute(r *http.Request) routeState {
	ctx := r.Context()
	var st routeState
	if vars, ok := ctx.Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		st.vars = maps.Clone(vars)
	}
	if groups, ok := ctx.Value(routeGroupCtxKey).(map[string]struct{}); ok {
		st.groups = maps.Clone(groups)
	}
	st.repl, _ = ctx.Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	st.orig = ctx.Value(caddyhttp.OriginalRequestCtxKey)
	return st
}

// apply gives req, fresh from caddyhttp.PrepareRequest, the route state.
func (st routeState) apply(req *http.Request) *http.Request {
	ctx := req.Context()
	if vars, ok := ctx.Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		for k, v := range st.vars {
			if k != "start_time" { // this request's own
				vars[k] = v
			}
		}
	}
	if st.groups != nil {
		ctx = context.WithValue(ctx, routeGroupCtxKey, maps.Clone(st.groups))
	}
	if st.orig != nil {
		ctx = context.WithValue(ctx, caddyhttp.OriginalRequestCtxKey, st.orig)
	}
	if repl, ok := ctx.Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok && st.repl != nil {
		// Last in line: only what this request's own placeholders do not
		// answer (its http.* are about the same request). The client's
		// replacer is safe to read concurrently; its response and error
		// placeholders are that client's, not this request's.
		repl.Map(func(key string) (any, bool) {
			if strings.HasPrefix(key, "http.response.") || strings.HasPrefix(key, "http.error") {
				return nil, false
			}
			return st.repl.Get(key)
		})
	}
	return req.WithContext(ctx)
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
	switch {
	case hb.up != nil && hb.old != nil && hb.liveGen == hb.old.gen:
		// The connection that publishes (old) stays until its successor
		// streams; the one that was connecting (or handing over) gives way
		// to this one. Stopping the live one here would lose what the
		// backend sends until this one streams: a reload of a config with
		// several handlers of the hub drops their sources one by one, each
		// starting the upstream anew.
		hb.dropHandoverLocked()
		hb.up.stopAsync()
	case hb.up != nil:
		hb.old.stopAsync()
		hb.old = hb.up
		hb.overlap = nil // what it publishes from now on is the overlap
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
	defer hb.resignIfIdle()
	attempt := 0 // reconnects since the backend last sent an event
	leadBackoff := time.Duration(0)
	for {
		// Only the lease holder runs the upstream (the memory broker always
		// grants it). A node without the lease follows the stream from the
		// broker (hub_follow.go) and asks again every lease.Every.
		lease, fresh, ok, err := hb.lead(ctx)
		if err != nil || !ok {
			if ctx.Err() != nil {
				return
			}
			wait := lease.Every
			if err != nil || wait <= 0 {
				leadBackoff = min(max(2*leadBackoff, 500*time.Millisecond), maxBackoff)
				wait = leadBackoff
			}
			if err != nil {
				hb.logger.Debug("broker could not tell who leads this stream; asking again later", zap.Duration("after", wait), zap.Error(err))
			}
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-hb.leadNow: // the lease was released (hub_follow.go)
			case <-ctx.Done():
				t.Stop()
				return
			}
			t.Stop()
			continue
		}
		leadBackoff = 0
		if lease.Lost != nil {
			// A shared history: take what the previous leader (or this node,
			// before a failed append) put in it, so that the window is
			// complete and the backend is resumed after its last event.
			cctx, cancel := context.WithTimeout(ctx, redisCallTimeout)
			_, err := hb.catchUp(cctx)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				leadBackoff = min(max(2*leadBackoff, 500*time.Millisecond), maxBackoff)
				hb.logger.Warn("broker unreachable; the upstream waits for it", zap.Duration("after", leadBackoff), zap.Error(err))
				if !sleepCtx(ctx, leadBackoff) {
					return
				}
				continue
			}
			if fresh {
				// What the backend sent while nobody led is lost: for a
				// backend without ids, a gap (publishGap).
				hb.mu.Lock()
				hb.down = hb.down || hb.seq > 0
				hb.mu.Unlock()
			}
		}
		// The connection ends at once when the lease is lost: another node
		// may be running the upstream already.
		cctx, cancel := context.WithCancel(ctx)
		if lease.Lost != nil {
			go func() {
				select {
				case <-lease.Lost:
					cancel()
				case <-cctx.Done():
				}
			}()
		}
		res, err := hb.connect(cctx, src, u.gen, lease)
		cancel()
		notStream, clean := res.notStream, res.clean
		if ctx.Err() != nil {
			return
		}
		if isClosed(lease.Lost) {
			hb.lostLease(lease)
			hb.logger.Warn("lost the lease of this stream; following it from the broker")
			continue
		}
		hb.mu.Lock()
		if ho := hb.handover; ho != nil && ho.gen == u.gen {
			hb.dropHandoverLocked() // its next connection starts a hand-over anew
		}
		if ho := hb.handover; ho != nil && hb.old == u && hb.liveGen == u.gen {
			// The old connection of a hand-over ended first: the new one
			// takes over with what it held.
			hb.mu.Unlock()
			hb.endHandover(ho)
			hb.mu.Lock()
		}
		if hb.liveGen == u.gen {
			// After a failure, what the backend sends until the next
			// connection streams is lost. A clean end is the backend's
			// own decision: what it starts anew is no gap.
			hb.down = !clean
		}
		if hb.up != u || u.orphan {
			// Replaced, or its config is gone: a newer upstream (or the next
			// client) takes over.
			if hb.up == u {
				hb.up = nil
			}
			hb.mu.Unlock()
			return
		}
		if clean && hb.header != nil && hb.honoursEndLocked() {
			// The stream ended by design: end its clients (with the
			// backend's retry) rather than republish it; the next client
			// opens it again.
			hb.up = nil
			hb.ends++
			hb.broadcastLocked()
			hb.mu.Unlock()
			hb.logger.Info("backend ended its stream; ending its clients (on_end)")
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
		// The backend's retry (or 500ms), doubling while it keeps failing
		// or ending before an event, up to maxReconnect (or its retry, if
		// longer); back to the start once it sends an event. Full jitter
		// (anywhere from 0 to that), so that the hubs of a backend that
		// restarted do not come back all at once.
		if res.events > 0 {
			attempt = 0
		}
		base := cmp.Or(hb.retry, 500*time.Millisecond)
		backoff := reconnectJitter(min(base<<attempt, max(maxReconnect, base)))
		attempt = min(attempt+1, 16)
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

// maxReconnect bounds the delay between upstream reconnects (unless the
// backend's retry is longer): clients are waiting meanwhile.
const maxReconnect = 5 * time.Second

// reconnectJitter picks the delay before a reconnect, up to limit: full
// jitter. A variable so that tests can see the limits.
var reconnectJitter = func(limit time.Duration) time.Duration {
	return rand.N(limit + 1)
}

// connResult is how one upstream connection went.
type connResult struct {
	streamed  bool // the backend answered with a stream
	notStream bool // the backend answered with something else
	clean     bool // the stream ended without an error, after a complete event
	events    int  // events the backend sent
}

// errUpstreamAborted is a handler behind sse that aborted the response
// (reverse_proxy does when the backend's stream breaks).
var errUpstreamAborted = errors.New("sse: upstream response aborted")

// connect runs one upstream request through the handler's route.
func (hb *hub) connect(ctx context.Context, src *source, gen uint64, lease Lease) (res connResult, err error) {
	hw := &hubWriter{hub: hb, ctx: ctx, gen: gen, lease: lease, header: make(http.Header)}
	req := src.tmpl.Clone(ctx)
	req.Header.Del("Accept-Encoding")
	hb.mu.Lock()
	hw.maxSize = hb.cfg.maxEventSize // a reload may change it (applyLocked)
	if hb.backendIDs && hb.lastBackID != "" {
		req.Header.Set("Last-Event-ID", hb.lastBackID)
	}
	hb.mu.Unlock()
	server, _ := req.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	// A fresh replacer and vars: the client whose request this was made
	// from may still be using its own.
	req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), hw, server)
	req = src.route.apply(req)
	func() {
		defer func() {
			switch rec := recover(); {
			case rec == http.ErrAbortHandler:
				err = errUpstreamAborted
			case rec != nil:
				err = fmt.Errorf("upstream handler panicked: %v", rec)
			}
		}()
		err = src.next.ServeHTTP(hw, req)
	}()
	partial := hw.finish()
	return connResult{
		streamed:  hw.streaming,
		notStream: hw.notStream,
		clean:     hw.streaming && err == nil && !partial,
		events:    hw.events,
	}, err
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
	events      int  // events published
	maxSize     int  // max_event_size when it connected
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
	header := w.header.Clone()
	w.hub.streamStarted(w.ctx, w.gen, w.lease, status, header)
	// Followers answer their clients with it (cluster mode).
	if err := w.hub.stream.SetResponse(w.ctx, w.lease, Response{Status: status, Header: header}); err != nil && !errors.Is(err, context.Canceled) {
		w.hub.logger.Warn("broker did not take the upstream's response head", zap.Error(err))
	}
	w.hub.publishGap(w.ctx, w.gen, w.lease)
}

var errNotStream = errors.New("sse: upstream response is not an event stream")

func (w *hubWriter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.notStream {
		return 0, errNotStream
	}
	if err := w.ctx.Err(); err != nil {
		// The upstream was stopped. Not every transport ends its response
		// when its request's context does (php_fastcgi reads on while
		// php-fpm writes): failing the write is what ends it.
		return 0, err
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
		case w.frame.Held()+len(chunk) > w.maxSize:
			w.dropOversize()
			w.frame.Drop()
		default:
			err := w.publish(w.frame.Take(chunk))
			w.frame.Release()
			if err != nil {
				return off, err // the broker failed: this connection ends, runUpstream decides what next
			}
		}
		w.oversize = false
		start = off
	}
	rest := p[start:]
	switch {
	case len(rest) == 0 || w.oversize:
	case w.frame.Held()+len(rest) > w.maxSize:
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
		zap.Int("max_event_size", w.maxSize))
}

func (w *hubWriter) publish(raw []byte) error {
	info := w.frame.Event()
	if info.LeadingLF() {
		raw = raw[1:] // the partner of the previous event's CR
	}
	if !info.HasFields() {
		return nil // the backend's own heartbeats: the hub sends its own
	}
	w.events++
	return w.hub.publish(w.ctx, w.gen, w.lease, raw, info)
}

// FlushError: events are published as they complete; nothing to flush.
func (w *hubWriter) FlushError() error { return nil }

// finish drops an unfinished event left when the upstream ended, and
// reports whether there was one: an end in the middle of an event is a
// failure, not a clean end.
func (w *hubWriter) finish() (partial bool) {
	partial = w.frame.Held() > 0 || w.oversize
	if w.frame.Held() > 0 {
		w.hub.logger.Debug("backend stream ended in the middle of an event; dropped it", zap.Int("bytes", w.frame.Held()))
	}
	w.frame.Drop()
	return partial
}
