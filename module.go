// Package caddysse is a Caddy HTTP handler, `sse`, that makes Server-Sent
// Events work behind any other handler (reverse_proxy, php_fastcgi, ...):
// it detects text/event-stream responses, sends their headers at once,
// flushes at every event boundary, keeps idle streams alive with comment
// heartbeats and releases buffering middleboxes with a padding block.
// Every other response passes through untouched.
package caddysse

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

// Defaults and limits of the configuration.
const (
	defaultHeartbeat        = 15 * time.Second
	defaultHeartbeatComment = "heartbeat"
	defaultPadding          = 2048
	maxPadding              = 64 << 10
	defaultWriteTimeout     = 30 * time.Second
	defaultMaxEventSize     = 1 << 20
	minMaxEventSize         = 1 << 10
)

// Handler is the `sse` HTTP handler. It wraps the response of the handlers
// after it in the route; only a 2xx response whose media type is
// text/event-stream is treated as an event stream, everything else passes
// through byte for byte.
type Handler struct {
	// Heartbeat is how long a stream may stay idle (nothing written to the
	// client) before a comment line is written to keep proxies and load
	// balancers from closing it. Heartbeats are only written between
	// events. Default: 15s. 0 disables heartbeats; otherwise at least 1s.
	Heartbeat *caddy.Duration `json:"heartbeat,omitempty"`

	// HeartbeatComment is the text of the heartbeat comment line, written
	// as ": <text>" and a line end, without a blank line after it: the
	// plugin never adds a dispatch boundary of its own, since some clients
	// (fetch-event-source) dispatch an empty message for every blank line.
	// Default: "heartbeat".
	HeartbeatComment string `json:"heartbeat_comment,omitempty"`

	// Padding is the size in bytes of one comment block written as the very
	// first bytes of every stream, so that buffering middleboxes, antivirus
	// proxies and old polyfills release the stream at once. Default: 2048.
	// 0 disables padding; otherwise from 2 to 65536.
	Padding *int `json:"padding,omitempty"`

	// Retry, when set, is sent to clients as a `retry:` field right after
	// the padding and again when the plugin ends a stream (max_age, config
	// reload), so that EventSource reconnects after that delay. Default: off.
	Retry caddy.Duration `json:"retry,omitempty"`

	// MaxAge, when set, ends each stream after that long, jittered over
	// 80-100% of it, at an event boundary and after the retry hint, so that
	// long-lived connections spread over a cluster's nodes and reconnects do
	// not line up. Default: off.
	MaxAge caddy.Duration `json:"max_age,omitempty"`

	// WriteTimeout bounds each single write to a client. The server's own
	// read_timeout and write_timeout (and minimum rates) are lifted for
	// streams, since a stream never ends and Caddy would otherwise cut it
	// that long after it began; this is what drops a client that stopped
	// reading. Default: 30s. A negative value (the Caddyfile's `off`
	// adapts to -1) means no bound on a write: a client that stops reading
	// can then hold its stream (and in pass-through its upstream request)
	// indefinitely.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// MaxEventSize bounds the bytes of one unfinished event held while
	// waiting for its end. Past it, what is held is forwarded and the rest
	// of that event streams through unbuffered (logged once per stream).
	// Default: 1 MiB; at least 1 KiB. In fan-out mode, larger events are
	// dropped (logged), since only whole events can be cached and shared.
	MaxEventSize int `json:"max_event_size,omitempty"`

	// Fanout, when set, shares one upstream stream among all clients with
	// the same key and answers Last-Event-ID from a replay cache.
	Fanout *Fanout `json:"fanout,omitempty"`

	// Compress lists the encodings the plugin may compress streams with,
	// in preference order, chosen per client by its Accept-Encoding; the
	// compressor is flushed at every event boundary and heartbeat, so each
	// event decodes at once. Default: ["zstd", "gzip"]; ["off"] disables.
	// See compress.go and docs/compression.md.
	Compress []string `json:"compress,omitempty"`

	heartbeatEvery time.Duration
	heartbeatBytes []byte // ": <comment>\n", no blank line (see HeartbeatComment)
	prelude        []byte // padding block and retry field, written first
	retryHint      []byte // "retry: N\n", or nil
	logger         *zap.Logger
	streams        *streamSet
	metrics        *sseMetrics    // nil without a metrics registry (metrics.go)
	keySecret      []byte         // keys hashKey (admin.go)
	comp           compression    // compress.go
	fan            *fanoutRuntime // fanout.go; nil without fanout
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults and builds the bytes the handler writes.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.streams = new(streamSet)
	if err := h.provisionObservability(ctx); err != nil { // metrics, admin listing
		return err
	}
	h.heartbeatEvery = defaultHeartbeat
	if h.Heartbeat != nil {
		h.heartbeatEvery = time.Duration(*h.Heartbeat)
	}
	if h.HeartbeatComment == "" {
		h.HeartbeatComment = defaultHeartbeatComment
	}
	switch {
	case h.WriteTimeout == 0:
		h.WriteTimeout = caddy.Duration(defaultWriteTimeout)
	case h.WriteTimeout < 0:
		h.WriteTimeout = 0 // off: every writer takes 0 as "no bound"
	}
	if h.MaxEventSize == 0 {
		h.MaxEventSize = defaultMaxEventSize
	}
	h.heartbeatBytes = []byte(": " + h.HeartbeatComment + "\n")
	if h.Retry > 0 {
		h.retryHint = sse.RetryField(time.Duration(h.Retry))
	}
	h.prelude = append(sse.PaddingBlock(h.padding()), h.retryHint...)
	if err := h.provisionCompression(); err != nil {
		return err
	}
	if h.Fanout != nil {
		h.Fanout.provision()
		h.fan = new(fanoutRuntime)
		h.fan.policy = h.newClientPolicy(&h.fan.clients)
		// The hub settings are not part of the pool key: a reload that
		// changes them keeps the hub and its cache, and the new handler's
		// settings apply to it (hub.join). Its broker is: a history
		// cannot move from one broker to another (LoadModule below
		// forgets the raw config).
		h.fan.cfg = h.hubConfig()
		h.fan.poolPrefix = fmt.Sprintf("%s\x00", h.Fanout.BrokerRaw)
		h.fan.broker = new(MemoryBroker)
		if h.Fanout.BrokerRaw != nil {
			mod, err := ctx.LoadModule(h.Fanout, "BrokerRaw")
			if err != nil {
				return fmt.Errorf("fanout: broker: %v", err)
			}
			h.fan.broker = mod.(Broker)
		}
	}
	return nil
}

// Validate rejects configurations that cannot work, naming the field.
// The ranges are in limits.go, shared with the Caddyfile parser.
func (h *Handler) Validate() error {
	heartbeat := time.Duration(0)
	if h.Heartbeat != nil {
		heartbeat = time.Duration(*h.Heartbeat)
	}
	if err := firstError(
		named("heartbeat", checkHeartbeat(heartbeat)),
		named("heartbeat_comment", checkCommentLine(h.HeartbeatComment)),
		named("padding", checkPadding(h.padding())),
		named("retry", checkRetry(time.Duration(h.Retry))),
		named("max_age", checkMaxAge(time.Duration(h.MaxAge))),
		named("max_event_size", checkMaxEventSize(h.MaxEventSize)),
	); err != nil {
		return err
	}
	if _, err := compressionPrefs(h.Compress); err != nil {
		return err
	}
	if h.Fanout != nil {
		return h.Fanout.validate()
	}
	return nil
}

// Cleanup ends the streams this handler still serves: Caddy unloads a
// config only after its servers shut down, so this is the last resort when
// a grace period ran out; streams usually end earlier, when the server
// begins to shut down (see streamSet.watch).
func (h *Handler) Cleanup() error {
	h.unlistHandler()
	if h.streams == nil {
		return nil // never provisioned
	}
	h.streams.endAll()
	if h.Fanout != nil {
		h.cleanupFanout()
	}
	return nil
}

func (h *Handler) padding() int {
	if h.Padding == nil {
		return defaultPadding
	}
	return *h.Padding
}

// ServeHTTP passes the request on and turns an event-stream response into
// a stream that is flushed per event; any other response is untouched.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if !acceptsEventStream(r.Header) && !h.fansOutAnyAccept(r) {
		return h.servePassthrough(w, r, next)
	}
	// The backend must send a plain stream we can read; compressing it is
	// this handler's job (compress.go), with the client's Accept-Encoding.
	r = keepClientAcceptEncoding(r)
	r.Header.Del("Accept-Encoding")
	if h.Fanout != nil && r.Method == http.MethodGet {
		return h.serveFanout(w, r, next)
	}
	return h.servePassthrough(w, r, next)
}

// servePassthrough serves one client from its own upstream response.
func (h *Handler) servePassthrough(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) (err error) {
	ctx, cancel := context.WithCancelCause(r.Context())
	defer cancel(nil)
	rw := &responseWriter{
		ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		h:                     h,
		req:                   r,
		cancel:                cancel,
		acceptEncoding:        clientAcceptEncoding(r),
	}
	defer func() {
		if rw.stream == nil {
			return
		}
		// Deferred: reverse_proxy ends a broken stream with
		// panic(http.ErrAbortHandler), and the stream must still be finished.
		endedByPlugin := rw.stream.finish()
		rec := recover()
		switch {
		case rec == nil:
			if endedByPlugin && errors.Is(err, context.Canceled) {
				err = nil // the handler behind us only saw its context end
			}
		case endedByPlugin && rec == http.ErrAbortHandler:
			err = nil // we ended the stream: end the response cleanly, not aborted
		default:
			panic(rec)
		}
	}()
	return next.ServeHTTP(rw, r.WithContext(ctx))
}

// acceptsEventStream reports whether the Accept header names
// text/event-stream, as EventSource sends it.
func acceptsEventStream(hdr http.Header) bool {
	for _, v := range hdr.Values("Accept") {
		for part := range strings.SplitSeq(v, ",") {
			if sse.IsEventStreamType(part) {
				return true
			}
		}
	}
	return false
}

// fansOutAnyAccept reports whether r fans out under fanout's any_accept
// although it does not name text/event-stream.
func (h *Handler) fansOutAnyAccept(r *http.Request) bool {
	return h.Fanout != nil && h.Fanout.AnyAccept && r.Method == http.MethodGet && admitsEventStream(r.Header)
}

// admitsEventStream reports whether the Accept header lets the response be
// an event stream: no Accept at all, or a media range */*, text/* or
// text/event-stream whose q is not 0.
func admitsEventStream(hdr http.Header) bool {
	values := hdr.Values("Accept")
	if len(values) == 0 {
		return true
	}
	for _, v := range values {
		for part := range strings.SplitSeq(v, ",") {
			mt, params, _ := strings.Cut(part, ";")
			switch strings.ToLower(strings.TrimSpace(mt)) {
			case "*/*", "text/*", "text/event-stream":
				if !zeroQ(params) {
					return true
				}
			}
		}
	}
	return false
}

// zeroQ reports whether media type parameters hold q=0 ("not acceptable").
func zeroQ(params string) bool {
	for p := range strings.SplitSeq(params, ";") {
		name, val, _ := strings.Cut(p, "=")
		if strings.EqualFold(strings.TrimSpace(name), "q") {
			q, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
			return err == nil && q == 0
		}
	}
	return false
}

// isEventStream reports whether a response with this status and header is
// an event stream the plugin can read: a 2xx with content (not 204 or 205)
// of media type text/event-stream, not content-coded. A stream that only
// its coding disqualifies returns that coding as compressedBy, so the
// caller can say why it passes it through.
func isEventStream(status int, hdr http.Header) (ok bool, compressedBy string) {
	if status < 200 || status > 299 || status == http.StatusNoContent || status == http.StatusResetContent {
		return false, ""
	}
	if !sse.IsEventStreamType(hdr.Get("Content-Type")) {
		return false, ""
	}
	if ce := hdr.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return false, ce
	}
	return true, ""
}

// jitter spreads a max_age over 80-100% of it, so that streams begun
// together (a reload's reconnects) do not end together.
func jitter(maxAge time.Duration) time.Duration {
	return time.Duration(float64(maxAge) * (0.8 + 0.2*rand.Float64()))
}

// endable is a live client stream the plugin can end: a pass-through
// stream or a fan-out subscriber.
type endable interface {
	end(endReason)
}

// streamSet is the set of live client streams of one handler, so they can
// be ended when their server shuts down or the config is unloaded.
type streamSet struct {
	mu      sync.Mutex
	streams map[endable]*http.Server  // each stream and the server it is served by
	servers map[*http.Server]struct{} // servers whose shutdown we watch
	ending  bool
}

// add registers s and, once per server, asks the server to tell us when it
// begins to shut down: Caddy's default grace period is eternal, so without
// this a config reload would wait for never-ending streams forever.
func (ss *streamSet) add(s endable, srv *http.Server) (ok bool) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.ending {
		return false
	}
	if ss.streams == nil {
		ss.streams = make(map[endable]*http.Server)
		ss.servers = make(map[*http.Server]struct{})
	}
	ss.streams[s] = srv
	if _, seen := ss.servers[srv]; srv != nil && !seen {
		ss.servers[srv] = struct{}{}
		srv.RegisterOnShutdown(func() { ss.endServer(srv) })
	}
	return true
}

func (ss *streamSet) remove(s endable) {
	ss.mu.Lock()
	delete(ss.streams, s)
	ss.mu.Unlock()
}

// endServer ends the streams served by srv.
func (ss *streamSet) endServer(srv *http.Server) {
	for _, s := range ss.snapshot(srv, false) {
		s.end(endShutdown)
	}
}

// endAll ends every stream and refuses new ones.
func (ss *streamSet) endAll() {
	for _, s := range ss.snapshot(nil, true) {
		s.end(endShutdown)
	}
}

func (ss *streamSet) snapshot(srv *http.Server, stop bool) []endable {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if stop {
		ss.ending = true
	}
	var list []endable
	for s, server := range ss.streams {
		if srv == nil || server == srv {
			list = append(list, s)
		}
	}
	return list
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
