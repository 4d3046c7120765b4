package caddysse

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// Fan-out defaults.
const (
	defaultBufferEvents = 1000
	defaultBufferBytes  = 8 << 20
	defaultLinger       = 30 * time.Second
	defaultClientQueue  = 256
	defaultResetEvent   = "sse-reset"
	defaultMaxStreams   = 1000
	maxBatch            = 256 // events written to a client before one flush
	maxBackoff          = 30 * time.Second
)

// Fanout shares one upstream stream among all clients with the same key,
// and answers Last-Event-ID reconnects from a replay cache, so that even a
// backend that knows nothing of Last-Event-ID gets loss-free resume.
type Fanout struct {
	// Key decides which requests share one upstream stream; Caddy
	// placeholders are expanded per request. By default (streamkey.go)
	// requests share only if the backend could not tell them apart: the
	// key covers method, scheme, host, path, query, the TLS client
	// certificate and every request header except a short list that
	// carries no identity (Accept, User-Agent, ...; see the README). The
	// client IP is not part of it. A key you set replaces all of that, to
	// widen sharing on purpose: everyone whose requests give the same key
	// shares one stream, whatever their credentials. {sse.default_key}
	// in it stands for the default key, to narrow it instead, e.g. by
	// client IP: "{sse.default_key} {client_ip}".
	Key string `json:"key,omitempty"`

	// BufferEvents bounds the replay cache by count. Default: 1000.
	BufferEvents int `json:"buffer_events,omitempty"`

	// BufferBytes bounds the replay cache by size. Default: 8 MiB.
	BufferBytes int `json:"buffer_bytes,omitempty"`

	// BufferAge bounds the replay cache by age. Default: no age bound.
	BufferAge caddy.Duration `json:"buffer_age,omitempty"`

	// Linger keeps the upstream open this long after the last client left,
	// so that reconnects and reloads find it (and its cache) still there.
	// Default: 30s. 0 closes it at once.
	Linger *caddy.Duration `json:"linger,omitempty"`

	// IDs says which event ids clients see. "auto" (default): the
	// backend's ids where it sends them, otherwise ids the plugin assigns,
	// so that browsers send them back on reconnect. "upstream": only the
	// backend's. "synthesize": always the plugin's own.
	IDs string `json:"ids,omitempty"`

	// ReplayOnConnect is how many cached events a new client (one without
	// Last-Event-ID) is sent before the live stream. Default: 0.
	ReplayOnConnect int `json:"replay_on_connect,omitempty"`

	// OnUnknownID says what happens when a client's Last-Event-ID is not
	// in the cache (unknown, or evicted). "reset" (default): the client
	// joins the live stream and is first sent an event of type ResetEvent,
	// whose data is the id it asked for, so that a page can refetch its
	// state (EventSource cannot read response headers). "backend": the
	// request goes to the backend by itself, with its Last-Event-ID, for
	// backends that can resume. Never "resend everything".
	OnUnknownID string `json:"on_unknown_id,omitempty"`

	// OnEnd says what happens when the backend ends its response cleanly
	// (after a complete event, without an error), as a stream that ends by
	// design does. "auto" (default): a backend that sends ids is
	// reconnected with Last-Event-ID (it can resume); otherwise the end is
	// honoured: the clients' streams end too, with the backend's last
	// retry (or the configured one), and the next client that connects
	// opens the backend again. "end": always honour the end. "reconnect":
	// always reconnect at once, as after a failure. A failure (an error,
	// or an end in the middle of an event) is always reconnected.
	OnEnd string `json:"on_end,omitempty"`

	// ResetEvent is the event type of the reset event. Default: sse-reset.
	ResetEvent string `json:"reset_event,omitempty"`

	// ClientQueue is accepted for compatibility and no longer used. It was
	// how many events a client could fall behind before it was cut, which
	// cut every client, however fast, when a backend wrote a burst. A
	// client is now cut when its bytes stop leaving (a write not done
	// within write_timeout) or when its next event left the cache (it then
	// resumes from its Last-Event-ID); the cache bounds what it can be
	// behind, so one slow reader never holds back the others.
	ClientQueue int `json:"client_queue,omitempty"`

	// MaxClients limits the clients of one key; MaxClientsTotal those of
	// this handler. Past a limit a client gets 503 with Retry-After.
	// Default: 0, no limit.
	MaxClients      int `json:"max_clients,omitempty"`
	MaxClientsTotal int `json:"max_clients_total,omitempty"`

	// MaxStreams limits the hubs this handler opens: distinct keys, each
	// with its own upstream connection and replay cache. Past it, a client
	// whose key has no hub yet is refused as past MaxClients; clients of
	// existing hubs are not. With BufferBytes it bounds the handler's cache
	// memory: at most MaxStreams × BufferBytes. A hub that never streamed
	// to a client (its clients all left before the upstream answered, or
	// the backend did not answer with a stream) is closed at once, without
	// linger, so it does not hold a place. Default: 1000.
	MaxStreams int `json:"max_streams,omitempty"`

	// AnyAccept lets GET requests fan out whatever their Accept header,
	// as long as it admits an event stream: none, */*, text/* or
	// text/event-stream (not with q=0). By default only requests that
	// name text/event-stream, as EventSource does, join a hub; curl and
	// fetch-based clients, which send */*, get one upstream each and no
	// replay. Requests that ask for something else (application/json)
	// never fan out, so that their answer cannot become the hub's
	// upstream request. A response that is not a stream still passes
	// through. Default: false.
	AnyAccept bool `json:"any_accept,omitempty"`

	// BrokerRaw is where the stream's shared history lives (events, ids,
	// and which node runs the upstream): a module of the
	// http.handlers.sse.brokers namespace, chosen by its "name". Default:
	// memory, this node's memory. Handlers share a hub only when they name
	// the same broker configuration.
	BrokerRaw json.RawMessage `json:"broker,omitempty" caddy:"namespace=http.handlers.sse.brokers inline_key=name"`
}

// fanoutRuntime is a handler's fan-out state at run time, kept out of the
// JSON config. A hub knows the handlers that can run its upstream by it
// (hub.sources), never by the Handler itself.
type fanoutRuntime struct {
	broker     Broker
	policy     *clientPolicy
	poolPrefix string       // what every pool key of this handler starts with
	cfg        hubConfig    // applied to a hub when this handler first joins it
	clients    atomic.Int64 // connected clients of this handler
	hubs       atomic.Int64 // hubs this handler opened and that are not destroyed yet (max_streams)
}

// clientPolicy is what a fan-out client needs of its handler's
// configuration, handed to it when admitted: the client holds no Handler.
type clientPolicy struct {
	logger         *zap.Logger
	metrics        *sseMetrics
	streams        *streamSet    // the handler's live streams, ended at shutdown
	clients        *atomic.Int64 // the handler's client count, for max_clients_total
	heartbeatBytes []byte
	retry          time.Duration // the configured retry, 0 for none
	retryHint      []byte
	maxAge         time.Duration
	writeTimeout   time.Duration
	linger         time.Duration
}

// newClientPolicy is the policy of this handler's fan-out clients; it runs
// in Provision. Without fanout (benchmarks build clients that way), the
// defaults apply.
func (h *Handler) newClientPolicy(clients *atomic.Int64) *clientPolicy {
	p := &clientPolicy{
		logger:         h.logger,
		metrics:        h.metrics,
		streams:        h.streams,
		clients:        clients,
		heartbeatBytes: h.heartbeatBytes,
		retry:          time.Duration(h.Retry),
		retryHint:      h.retryHint,
		maxAge:         time.Duration(h.MaxAge),
		writeTimeout:   time.Duration(h.WriteTimeout),
	}
	if f := h.Fanout; f != nil {
		p.linger = defaultLinger
		if f.Linger != nil {
			p.linger = time.Duration(*f.Linger)
		}
	}
	return p
}

func (f *Fanout) provision() {
	if f.BufferEvents == 0 {
		f.BufferEvents = defaultBufferEvents
	}
	if f.BufferBytes == 0 {
		f.BufferBytes = defaultBufferBytes
	}
	if f.IDs == "" {
		f.IDs = "auto"
	}
	if f.OnUnknownID == "" {
		f.OnUnknownID = "reset"
	}
	if f.ResetEvent == "" {
		f.ResetEvent = defaultResetEvent
	}
	if f.OnEnd == "" {
		f.OnEnd = "auto"
	}
	if f.ClientQueue == 0 {
		f.ClientQueue = defaultClientQueue
	}
	if f.MaxStreams == 0 {
		f.MaxStreams = defaultMaxStreams
	}
}

// fanoutKey is the stream key of a request (see Fanout.Key).
func (h *Handler) fanoutKey(r *http.Request) string {
	if h.Fanout.Key != "" {
		return templateKey(r, h.Fanout.Key) // streamkey.go
	}
	return streamKey(r) // streamkey.go
}

// hubConfig is what a hub needs of its handler's configuration. It is
// not part of the pool key: handlers with other settings (a reload that
// changes them) share the hub, and the settings of the handler that
// joined it last apply.
type hubConfig struct {
	limits       replayLimits
	ids          string
	maxEventSize int
	heartbeat    time.Duration
	resetEvent   string // the type of the event that tells clients of a gap
	onEnd        string
}

func (h *Handler) hubConfig() hubConfig {
	return hubConfig{
		limits:       replayLimits{events: h.Fanout.BufferEvents, bytes: h.Fanout.BufferBytes, age: time.Duration(h.Fanout.BufferAge)},
		ids:          h.Fanout.IDs,
		maxEventSize: h.MaxEventSize,
		heartbeat:    h.heartbeatEvery,
		resetEvent:   h.Fanout.ResetEvent,
		onEnd:        h.Fanout.OnEnd,
	}
}

// errTooManyClients answers a client past a max_clients limit.
var errTooManyClients = errors.New("sse: too many clients for this stream")

// errTooManyStreams answers a client whose key would open a hub past
// max_streams.
var errTooManyStreams = errors.New("sse: too many fan-out streams")

// serveFanout serves one client from the hub of its key.
func (h *Handler) serveFanout(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	f, run := h.Fanout, h.fan
	if n := run.clients.Add(1); f.MaxClientsTotal > 0 && n > int64(f.MaxClientsTotal) {
		run.clients.Add(-1)
		return h.refuse(w, r, "max_clients_total")
	}
	c := &fanoutClient{pol: run.policy}
	// Whoever ends the stream releases the client: this request, or the
	// hub's delivery loop once the connection is handed to it (detach.go).
	defer func() {
		if !c.detached {
			c.release()
		}
	}()

	key := h.fanoutKey(r)
	cfg := h.hubConfig()
	poolKey := run.poolPrefix + key
	v, _, err := hubs.LoadOrNew(poolKey, func() (caddy.Destructor, error) {
		if n := run.hubs.Add(1); n > int64(f.MaxStreams) {
			run.hubs.Add(-1)
			return nil, errTooManyStreams
		}
		limits := HistoryLimits{Events: cfg.limits.events, Bytes: cfg.limits.bytes, Age: cfg.limits.age}
		stream, err := run.broker.Stream(r.Context(), key, limits) // the key alone: the same on every node
		if err != nil {
			run.hubs.Add(-1)
			return nil, fmt.Errorf("fanout: broker: %w", err)
		}
		hb := newHub(poolKey, h.hashKey(key), cfg, h.logger, stream)
		hb.count = &run.hubs
		return hb, nil
	})
	if errors.Is(err, errTooManyStreams) {
		return h.refuse(w, r, "max_streams")
	}
	if err != nil {
		return err
	}
	hb := v.(*hub)
	c.hub = hb

	joinedAt, ends, ok := hb.join(run, f.MaxClients, r, next)
	if !ok {
		return h.refuse(w, r, "max_clients")
	}
	c.ends = ends
	c.joined = true

	header, status, ok := hb.waitStream(r.Context())
	if !ok {
		if r.Context().Err() != nil {
			return nil // the client left while the upstream connected
		}
		// The backend did not answer with a stream: let this client's own
		// request get the backend's answer.
		c.leave()
		return h.servePassthrough(w, r, next)
	}
	hb.served.Store(true) // from now on, linger keeps it for reconnects
	lastID := r.Header.Get("Last-Event-ID")
	cursor, behind, reset, found := hb.position(r.Context(), lastID, f.ReplayOnConnect, joinedAt)
	switch {
	case found:
		h.metrics.replayServed(int(behind))
	case lastID != "":
		h.metrics.replayMissed()
	}
	if lastID != "" && !found && f.OnUnknownID == "backend" {
		c.leave()
		return h.servePassthrough(w, r, next)
	}
	c.cursor = cursor

	copyStreamHeader(w.Header(), header)
	prepareStreamHeader(w.Header(), r.ProtoMajor)
	encoding := h.negotiateStream(w.Header(), clientAcceptEncoding(r))
	c.encoding = encoding
	c.sub = &subscriber{ended: make(chan struct{}), poke: c.poke}
	srv, _ := r.Context().Value(http.ServerContextKey).(*http.Server)
	if !h.streams.add(c.sub, srv) {
		c.sub = nil
		return h.refuseWith(w, r, errStreamEnded) // shutting down
	}
	hb.out[encoding].clients.Add(1) // until release, with c.sub
	// A compressed client writes what the hub's shared compressor encoded
	// once for all clients (compress_shared.go); it holds no compressor itself.
	c.z = hb.attachShared(encoding)
	first := hb.withRetry(h.preludeFor(encoding))
	if reset {
		first = append(append([]byte(nil), first...), sse.ResetEvent(f.ResetEvent, lastID)...)
		hb.logger.Debug("Last-Event-ID not in the replay cache; sent a reset event")
	}
	liftServerTimeouts(r.Context())
	if c.detach(w, r, status, first) {
		return nil
	}
	if !c.headerSent {
		w.WriteHeader(status)
	}
	c.out = newClientConn(wireCounter{ResponseWriter: belowIdleTimeout(r.Context(), w), n: &c.wire}, time.Duration(h.WriteTimeout))
	if err := c.ownEncoder(); err != nil {
		return err // not expected: an encoder in memory
	}
	err = c.run(r.Context(), first)
	if !c.clean && r.Context().Err() == nil {
		// Cut off (its next event left the cache, or a write failed): abort
		// the response (an HTTP/2 stream reset, an HTTP/1.1 body without its
		// last chunk), so that the client sees a cut and reconnects. A
		// handler that returns ends the response cleanly, which
		// fetch-event-source takes as "done". The deferred release runs.
		panic(http.ErrAbortHandler)
	}
	c.endEncoding()
	return err
}

// refuse answers a client past a limit.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, limit string) error {
	h.logger.Warn("refusing a client: fan-out limit reached", zap.String("limit", limit))
	h.metrics.clientRefused(limit)
	return h.refuseWith(w, r, errTooManyClients)
}

// refuseWith answers a client the plugin will not serve now (a limit, a
// shutdown) so that it comes back later. An EventSource that gets
// anything but 200 text/event-stream "fails the connection" and never
// retries (WHATWG), so a request that asks for an event stream gets one:
// a retry field, jittered between the configured retry (1s when none) and
// twice that so that refused clients do not all return at once, and an
// immediate end, which EventSource and fetch-event-source answer by
// reconnecting after it. Other clients get 503 with Retry-After.
func (h *Handler) refuseWith(w http.ResponseWriter, r *http.Request, cause error) error {
	base := max(time.Duration(h.Retry), time.Second)
	w.Header().Set("Retry-After", strconv.Itoa(int((base+time.Second-1)/time.Second)))
	if !acceptsEventStream(r.Header) {
		return caddyhttp.Error(http.StatusServiceUnavailable, cause)
	}
	hdr := w.Header()
	for _, k := range []string{"Content-Encoding", "Content-Length", "Transfer-Encoding"} {
		hdr.Del(k) // what a stream answer set (shutdown): this one is plain
	}
	hdr.Set("Content-Type", "text/event-stream")
	prepareStreamHeader(hdr, r.ProtoMajor)
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(sse.RetryField(base + rand.N(base)))
	return nil
}

// release drops a client's reference to the hub after linger, so that
// the hub, its upstream and its cache outlive a reconnect or a reload.
// A hub that never streamed to a client has nothing to keep (no cache a
// reconnect would resume from; maybe a backend that does not stream) and
// goes at once: many requests with distinct keys that leave before their
// upstream answers must not hold as many upstream connections for linger.
func (p *clientPolicy) release(hb *hub) {
	if p.linger <= 0 || !hb.served.Load() {
		hubs.Delete(hb.poolKey)
		return
	}
	time.AfterFunc(p.linger, func() { hubs.Delete(hb.poolKey) })
}

// hopHeaders are not copied from the upstream's response to clients.
var hopHeaders = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "Content-Length", "Set-Cookie"}

func copyStreamHeader(dst, src http.Header) {
	for k, v := range src {
		dst[k] = append([]string(nil), v...)
	}
	for _, k := range hopHeaders {
		dst.Del(k)
	}
}

// cleanupFanout runs at the handler's Cleanup.
// Every hub this handler may be a source of is asked: the hubs are few,
// and so no handler keeps a list that hubs would have to update.
func (h *Handler) cleanupFanout() {
	var list []*hub
	hubs.Range(func(_, v any) bool {
		list = append(list, v.(*hub))
		return true
	})
	exiting := caddy.Exiting()
	for _, hb := range list { // not under the pool's lock
		hb.dropSource(h.fan)
		if exiting {
			hb.stopForExit() // hub_follow.go
		}
	}
}
