package caddysse

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// hubs holds the fan-out hubs and their replay caches. A UsagePool, so
// that a config reload, whose new handlers ask for the same keys while the
// old ones still hold them, keeps the caches: clients of the old config
// reconnect to the new one and resume with nothing lost.
var hubs = caddy.NewUsagePool()

// Fan-out defaults.
const (
	defaultBufferEvents = 1000
	defaultBufferBytes  = 8 << 20
	defaultLinger       = 30 * time.Second
	defaultClientQueue  = 256
	defaultResetEvent   = "sse-reset"
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

	// ResetEvent is the event type of the reset event. Default: sse-reset.
	ResetEvent string `json:"reset_event,omitempty"`

	// ClientQueue is how many events a client may fall behind the live
	// stream before it is disconnected (it reconnects and catches up from
	// the cache), so one slow reader never holds back the others.
	// Default: 256.
	ClientQueue int `json:"client_queue,omitempty"`

	// MaxClients limits the clients of one key; MaxClientsTotal those of
	// this handler. Past a limit a client gets 503 with Retry-After.
	// Default: 0, no limit.
	MaxClients      int `json:"max_clients,omitempty"`
	MaxClientsTotal int `json:"max_clients_total,omitempty"`

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

	linger     time.Duration
	poolPrefix string       // the hub settings, which are part of every pool key
	clients    atomic.Int64 // connected clients of this handler
	mu         sync.Mutex
	runs       map[*hub]struct{} // hubs this handler is a source of
}

func (f *Fanout) provision() {
	if f.BufferEvents == 0 {
		f.BufferEvents = defaultBufferEvents
	}
	if f.BufferBytes == 0 {
		f.BufferBytes = defaultBufferBytes
	}
	f.linger = defaultLinger
	if f.Linger != nil {
		f.linger = time.Duration(*f.Linger)
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
	if f.ClientQueue == 0 {
		f.ClientQueue = defaultClientQueue
	}
	f.runs = make(map[*hub]struct{})
}

// fanoutKey is the stream key of a request (see Fanout.Key).
func (h *Handler) fanoutKey(r *http.Request) string {
	if h.Fanout.Key != "" {
		return templateKey(r, h.Fanout.Key) // streamkey.go
	}
	return streamKey(r) // streamkey.go
}

// hubConfig is what a hub needs of its handler's configuration. Handlers
// share a hub only when they agree on it (it is part of the pool key).
type hubConfig struct {
	limits       replayLimits
	ids          string
	maxEventSize int
	heartbeat    time.Duration
}

func (h *Handler) hubConfig() hubConfig {
	return hubConfig{
		limits:       replayLimits{events: h.Fanout.BufferEvents, bytes: h.Fanout.BufferBytes, age: time.Duration(h.Fanout.BufferAge)},
		ids:          h.Fanout.IDs,
		maxEventSize: h.MaxEventSize,
		heartbeat:    h.heartbeatEvery,
	}
}

// hub is one shared upstream stream and its replay cache. Clients are
// cursors into the cache: an event is stored once and its bytes are
// written to every client from there.
type hub struct {
	poolKey string
	keyHash string // for logs and the admin API: keys can hold credentials
	path    string // the request path, without its query
	cfg     hubConfig
	logger  *zap.Logger
	created time.Time

	mu         sync.Mutex
	buf        replayBuffer
	seq        uint64        // last published event
	wake       chan struct{} // closed and replaced when seq or beats change, or the hub ends
	beats      uint64        // heartbeats due to idle clients
	lastPub    time.Time
	header     http.Header // the upstream's response header, once it streams
	status     int
	streamedAt time.Time // when the current upstream connection began streaming
	failed     bool      // the upstream answered with something that is not a stream
	clients    int
	sources    map[*Handler]*source // handlers whose clients can run the upstream
	up         *upstream            // the newest upstream connection loop
	old        *upstream            // the one it replaces, until the new one streams
	liveGen    uint64               // the upstream whose events are published
	gens       uint64
	overlap    [][]byte // what the replaced upstream published while the new one connected
	backendIDs bool     // the backend sends ids: resume it with Last-Event-ID
	lastBackID string   // the last id the backend sent
	retry      time.Duration
	reconnects int
	epoch      string // prefix of synthesized ids, new at every discontinuity
	heartbeat  *time.Timer
	destroyed  bool
	zc         [numZ]sharedCompressor // one per encoding clients use (compress.go)
	dlOnce     sync.Once
	dl         []*deliverer // delivery loops of detached clients (detach.go)
}

// upstream is one loop that keeps the backend connected through one
// handler's route.
type upstream struct {
	h      *Handler
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

func newHub(poolKey, keyHash string, cfg hubConfig, logger *zap.Logger) *hub {
	hb := &hub{
		poolKey: poolKey,
		keyHash: keyHash,
		cfg:     cfg,
		created: time.Now(),
		buf:     newMemoryReplay(cfg.limits),
		wake:    make(chan struct{}),
		sources: make(map[*Handler]*source),
		epoch:   newEpoch(),
	}
	hb.logger = logger.With(zap.String("stream", hb.keyHash))
	for i := range hb.zc {
		hb.zc[i].enc = i
	}
	return hb
}

// newEpoch makes synthesized ids unique across restarts: the time in base
// 36 and a little randomness.
func newEpoch() string {
	return strconv.FormatInt(time.Now().UnixMilli(), 36) + strconv.FormatUint(uint64(rand.Uint32()%1296), 36)
}

// Destruct runs when the last reference to the hub is gone (no client for
// longer than linger, and no handler holding it): it stops the upstream.
func (hb *hub) Destruct() error {
	hb.mu.Lock()
	hb.destroyed = true
	up, old := hb.up, hb.old
	hb.up, hb.old = nil, nil
	for h := range hb.sources {
		h.Fanout.mu.Lock()
		delete(h.Fanout.runs, hb)
		h.Fanout.mu.Unlock()
	}
	if hb.heartbeat != nil {
		hb.heartbeat.Stop()
	}
	hb.idleShared()
	hb.broadcastLocked()
	hb.mu.Unlock()
	up.stop()
	old.stop()
	return nil
}

func (hb *hub) broadcastLocked() {
	close(hb.wake)
	hb.wake = make(chan struct{})
}

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

// errTooManyClients answers a client past a max_clients limit.
var errTooManyClients = errors.New("sse: too many clients for this stream")

// serveFanout serves one client from the hub of its key.
func (h *Handler) serveFanout(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	f := h.Fanout
	if n := f.clients.Add(1); f.MaxClientsTotal > 0 && n > int64(f.MaxClientsTotal) {
		f.clients.Add(-1)
		return h.refuse(w, "max_clients_total")
	}
	c := &fanoutClient{h: h, queue: uint64(f.ClientQueue)}
	// Whoever ends the stream releases the client: this request, or the
	// hub's delivery loop once the connection is handed to it (detach.go).
	defer func() {
		if !c.detached {
			c.release()
		}
	}()

	key := h.fanoutKey(r)
	cfg := h.hubConfig()
	poolKey := f.poolPrefix + key
	v, _, err := hubs.LoadOrNew(poolKey, func() (caddy.Destructor, error) {
		return newHub(poolKey, h.hashKey(key), cfg, h.logger), nil
	})
	if err != nil {
		return err
	}
	hb := v.(*hub)
	c.hub = hb

	joinedAt, ok := hb.join(h, r, next)
	if !ok {
		return h.refuse(w, "max_clients")
	}
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
	lastID := r.Header.Get("Last-Event-ID")
	cursor, behind, reset, found := hb.position(lastID, f.ReplayOnConnect, joinedAt)
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
	c.encoding = cmp.Or(encoding, encIdentity)
	c.sub = &subscriber{ended: make(chan struct{}), poke: c.poke}
	srv, _ := r.Context().Value(http.ServerContextKey).(*http.Server)
	if !h.streams.add(c.sub, srv) {
		c.sub = nil
		return caddyhttp.Error(http.StatusServiceUnavailable, errStreamEnded) // shutting down
	}
	// A compressed client writes what the hub's shared compressor encoded
	// once for all clients (compress.go); it holds no compressor itself.
	c.z = hb.attachShared(encoding)
	first := h.preludeFor(encoding)
	if reset {
		first = append(append([]byte(nil), first...), resetEvent(f.ResetEvent, lastID)...)
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
	err = c.run(r.Context(), first)
	c.endEncoding()
	return err
}

// refuse answers a client past a limit: 503 with Retry-After.
func (h *Handler) refuse(w http.ResponseWriter, limit string) error {
	h.logger.Warn("refusing a client: fan-out limit reached", zap.String("limit", limit))
	h.metrics.clientRefused(limit)
	retry := max(time.Duration(h.Retry), time.Second)
	w.Header().Set("Retry-After", strconv.Itoa(int((retry+time.Second-1)/time.Second)))
	return caddyhttp.Error(http.StatusServiceUnavailable, errTooManyClients)
}

// release drops this client's reference to the hub after linger, so that
// the hub, its upstream and its cache outlive a reconnect or a reload.
func (h *Handler) release(hb *hub) {
	if h.Fanout.linger <= 0 {
		hubs.Delete(hb.poolKey)
		return
	}
	time.AfterFunc(h.Fanout.linger, func() { hubs.Delete(hb.poolKey) })
}

// resetEvent tells a page that the events after lastID are lost.
func resetEvent(typ, lastID string) []byte {
	return []byte("event: " + typ + "\ndata: " + lastID + "\n\n")
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
		c.h.streams.remove(c.sub)
	}
	c.leave()
	if c.hub != nil {
		c.h.release(c.hub)
	}
	c.h.Fanout.clients.Add(-1)
}

// endEncoding finishes a compressed stream (gzip trailer, last zstd block)
// when the stream ended on our side and the client is still there.
func (c *fanoutClient) endEncoding() {
	if c.z != nil && c.clean {
		_ = c.z.end(&c.out)
	}
}

// join adds a client of handler h and makes sure the upstream runs.
// It returns the last event published before the client joined: the
// events after it answer the client's request, even those published while
// it waited for the upstream's header (a backend's welcome event).
func (hb *hub) join(h *Handler, r *http.Request, next caddyhttp.Handler) (joinedAt uint64, ok bool) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if h.Fanout.MaxClients > 0 && hb.clients >= h.Fanout.MaxClients {
		return 0, false
	}
	hb.clients++
	if _, ok := hb.sources[h]; !ok {
		tmpl := r.Clone(context.WithoutCancel(r.Context()))
		tmpl.Body = http.NoBody
		tmpl.Header.Del("Last-Event-ID")
		hb.sources[h] = &source{next: next, tmpl: tmpl, added: time.Now()}
		hb.path = r.URL.Path
		h.Fanout.mu.Lock()
		h.Fanout.runs[hb] = struct{}{}
		h.Fanout.mu.Unlock()
	}
	if hb.failed && hb.up == nil {
		hb.failed = false // a new client asks again
	}
	// No upstream, or one whose config was unloaded: run it through this
	// handler's route (the old one hands over once the new one streams).
	if (hb.up == nil || hb.up.orphan) && !hb.destroyed {
		hb.startUpstreamLocked()
	}
	return hb.seq, true
}

func (hb *hub) leave() {
	hb.mu.Lock()
	hb.clients--
	hb.mu.Unlock()
}

// waitStream waits until the upstream streams (its header and status) or
// fails before ever streaming.
func (hb *hub) waitStream(ctx context.Context) (http.Header, int, bool) {
	for {
		hb.mu.Lock()
		header, status, failed, wake := hb.header, hb.status, hb.failed || hb.destroyed, hb.wake
		hb.mu.Unlock()
		switch {
		case header != nil:
			return header, status, true
		case failed:
			return nil, 0, false
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return nil, 0, false
		}
	}
}

// position is where a new client starts reading: after its Last-Event-ID
// if the cache has it, otherwise where it joined (reset is true when an id
// was asked for and not found), minus replayOnConnect for a client that
// asked for none. Taken under the hub's lock, so nothing is missed or sent
// twice between the replay and the live stream.
func (hb *hub) position(lastID string, replayOnConnect int, joinedAt uint64) (cursor, behind uint64, reset, found bool) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if lastID != "" {
		if seq, ok := hb.buf.find(lastID); ok {
			return seq, hb.seq - seq, false, true
		}
		return joinedAt, 0, true, false
	}
	held, _ := hb.buf.stats()
	heldBefore := max(held-int(hb.seq-joinedAt), 0)
	back := uint64(min(replayOnConnect, heldBefore))
	return joinedAt - back, back, false, false
}

// fanoutClient is one client of a hub: a cursor into the hub's cache and
// the connection its events are written to. It is served either on its
// own request goroutine (run) or, once its connection is handed over, by
// the hub's delivery loop (detach.go); both go through step.
type fanoutClient struct {
	hub        *hub
	h          *Handler
	out        clientConn
	sub        *subscriber
	cursor     uint64
	queue      uint64
	beats      uint64 // the hub's heartbeat count last answered
	prevLag    uint64
	encoding   string
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
	c.h.metrics.bytesWritten(modeFanout, c.encoding, int(c.wire-c.counted), raw)
	c.counted = c.wire
}

// writeFailed reports a client cut off by write_timeout, and returns err.
func (c *fanoutClient) writeFailed(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) {
		c.h.metrics.slowClientCut(modeFanout)
		c.hub.logger.Warn("client did not take a write within write_timeout; disconnecting it")
	}
	return err
}

// start writes the client's first bytes and takes the hub's heartbeat
// count, so that only heartbeats due from now on are written.
func (c *fanoutClient) start(first []byte) error {
	c.prevLag = ^uint64(0)
	c.hub.mu.Lock()
	c.beats = c.hub.beats
	c.hub.mu.Unlock()
	if err := c.writeOwn(time.Now(), first); err != nil {
		return c.writeFailed(err)
	}
	return nil
}

// maxAgeAfter is when a stream ends under max_age: 80-100% of it.
func (c *fanoutClient) maxAgeAfter() time.Duration {
	return time.Duration(float64(c.h.MaxAge) * (0.8 + 0.2*rand.Float64()))
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
	if c.h.MaxAge > 0 {
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
// for falling behind, failed, or its upstream gone). batch is scratch
// space, handed back for reuse.
func (c *fanoutClient) step(batch []*event) (wake <-chan struct{}, done bool, _ []*event) {
	hb := c.hub
	for {
		hb.mu.Lock()
		var ok bool
		batch, ok = hb.buf.after(batch[:0], c.cursor, maxBatch)
		lag, nowBeats, gone := hb.seq-c.cursor, hb.beats, hb.destroyed || (hb.failed && hb.up == nil)
		wake = hb.wake
		if c.z != nil {
			hb.noteWaitingLocked(c.z, batch)
		}
		hb.mu.Unlock()
		if !ok || (lag > c.queue && lag >= c.prevLag) {
			clear(batch)
			c.cutBehind(lag, !ok)
			return nil, true, batch
		}
		c.prevLag = lag
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
			if err := c.writeOwn(now, c.h.heartbeatBytes); err != nil {
				_ = c.writeFailed(err)
				return nil, true, batch
			}
			c.h.metrics.heartbeatsSent(modeFanout, 1)
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
	c.h.metrics.slowClientCut(modeFanout)
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
	c.h.metrics.eventsForwarded(modeFanout, len(batch))
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
	hint := c.h.retryHint
	if reason == endShutdown {
		base := max(time.Duration(c.h.Retry), time.Second)
		hint = retryField(base + rand.N(base))
	}
	if len(hint) > 0 {
		if err := c.writeOwn(time.Now(), hint); err != nil {
			c.clean = false // no trailer for a client that is gone
		}
	}
	return nil
}

// startUpstreamLocked runs the upstream through the newest source. A
// running upstream keeps publishing until the new one streams.
func (hb *hub) startUpstreamLocked() {
	var src *source
	var runner *Handler
	for h, s := range hb.sources {
		if src == nil || s.added.After(src.added) {
			src, runner = s, h
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
	hb.up = &upstream{h: runner, gen: hb.gens, cancel: cancel, done: make(chan struct{})}
	go hb.runUpstream(ctx, src, hb.up)
}

func (u *upstream) stopAsync() {
	if u != nil {
		u.cancel() // its loop ends on its own
	}
}

// dropSource forgets handler h (its config is being unloaded). If its
// route runs the upstream, another handler's route takes over when there
// is one; otherwise the upstream keeps its connection (but no longer
// reconnects) so that nothing is missed until a client of the new config
// arrives and takes over.
func (hb *hub) dropSource(h *Handler) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	delete(hb.sources, h)
	if hb.up == nil || hb.up.h != h {
		return
	}
	hb.up.orphan = true
	if !hb.destroyed && len(hb.sources) > 0 {
		hb.startUpstreamLocked()
	}
}

// cleanupFanout runs at the handler's Cleanup.
func (h *Handler) cleanupFanout() {
	h.Fanout.mu.Lock()
	runs := h.Fanout.runs
	h.Fanout.runs = make(map[*hub]struct{})
	h.Fanout.mu.Unlock()
	for hb := range runs {
		hb.dropSource(h)
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
		streamed, notStream, err := hb.connect(ctx, src, u.gen)
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
		u.h.metrics.upstreamFailed()
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
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
}

// connect runs one upstream request through the handler's route.
func (hb *hub) connect(ctx context.Context, src *source, gen uint64) (streamed, notStream bool, err error) {
	hw := &hubWriter{hub: hb, gen: gen, header: make(http.Header)}
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
	gen         uint64 // which upstream connection this is
	header      http.Header
	wroteHeader bool
	streaming   bool
	notStream   bool
	scan        eventScanner
	pending     []byte
	oversize    bool // dropping the rest of an event larger than max_event_size
	first       bool // the first event was published (the BOM is behind us)
}

func (w *hubWriter) Header() http.Header { return w.header }

func (w *hubWriter) WriteHeader(status int) {
	if w.wroteHeader || (status >= 100 && status < 200) {
		return
	}
	w.wroteHeader = true
	ce := w.header.Get("Content-Encoding")
	if status < 200 || status > 299 || status == http.StatusNoContent || status == http.StatusResetContent ||
		!isEventStreamType(w.header.Get("Content-Type")) || (ce != "" && ce != "identity") {
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
		n, complete := w.scan.next(p[off:])
		off += n
		if !complete {
			continue
		}
		if raw := p[start:off]; !w.oversize {
			if len(w.pending) > 0 {
				w.pending = append(w.pending, raw...)
				raw = w.pending
			}
			if len(raw) > w.hub.cfg.maxEventSize {
				w.dropOversize()
			} else {
				w.publish(raw)
			}
		}
		w.oversize = false
		w.pending = w.pending[:0]
		start = off
	}
	rest := p[start:]
	switch {
	case len(rest) == 0 || w.oversize:
	case len(w.pending)+len(rest) > w.hub.cfg.maxEventSize:
		w.dropOversize()
		w.oversize = true
		w.pending = nil
	default:
		w.pending = append(w.pending, rest...)
	}
	if cap(w.pending) > pendingKeep && len(w.pending) == 0 {
		w.pending = nil
	}
	return len(p), nil
}

func (w *hubWriter) dropOversize() {
	w.hub.logger.Warn("dropping an event larger than max_event_size: fan-out delivers and caches whole events only",
		zap.Int("max_event_size", w.hub.cfg.maxEventSize))
}

func (w *hubWriter) publish(raw []byte) {
	info := w.scan.event()
	if !w.first {
		w.first = true
		if w.scan.sawBOM() {
			raw = raw[3:]
		}
	}
	if info.leadingLF {
		raw = raw[1:] // the partner of the previous event's CR
	}
	if !info.hasFields {
		return // the backend's own heartbeats: the hub sends its own
	}
	w.hub.publish(w.gen, raw, info)
}

// FlushError: events are published as they complete; nothing to flush.
func (w *hubWriter) FlushError() error { return nil }

// finish drops an unfinished event left when the upstream ended.
func (w *hubWriter) finish() {
	if len(w.pending) > 0 {
		w.hub.logger.Debug("backend stream ended in the middle of an event; dropped it", zap.Int("bytes", len(w.pending)))
	}
	w.pending = nil
}

// streamStarted records the upstream's response and starts heartbeats.
func (hb *hub) streamStarted(gen uint64, status int, header http.Header) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if hb.up == nil || gen != hb.up.gen {
		return // a replaced upstream
	}
	// From now on only this connection publishes: the one it replaces is
	// closed (events it still had in flight are the ones this one sends).
	hb.liveGen = gen
	hb.old.stopAsync()
	hb.old = nil
	hb.up.h.metrics.upstreamConnected(hb.header != nil)
	if hb.header != nil && !hb.backendIDs {
		// A new upstream connection to a backend without ids: no way to
		// know what was missed in between, but clients stay connected and
		// the cache stays valid up to here.
		hb.logger.Debug("reconnected to a backend without ids; events sent while disconnected cannot be recovered")
	}
	hb.header, hb.status, hb.streamedAt = header, status, time.Now()
	hb.lastPub = hb.streamedAt
	if hb.heartbeat == nil && hb.cfg.heartbeat > 0 {
		hb.heartbeat = time.AfterFunc(hb.cfg.heartbeat, hb.onHeartbeat)
	}
	hb.broadcastLocked()
}

// onHeartbeat asks the clients to write a heartbeat when the stream has
// been idle: one timer per hub, not one per client.
func (hb *hub) onHeartbeat() {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if hb.destroyed {
		return
	}
	every := hb.cfg.heartbeat
	if idle := time.Since(hb.lastPub); idle < every {
		hb.heartbeat.Reset(every - idle)
		return
	}
	hb.beatLocked()
	hb.heartbeat.Reset(every)
}

// beatLocked has the caught-up clients write a heartbeat. Each writes it
// on its own, which takes compressed clients out of their shared epoch, so
// the shared compressors restart at the next event (and, the stream being
// idle, give back their memory meanwhile).
func (hb *hub) beatLocked() {
	hb.beats++
	hb.lastPub = time.Now()
	hb.idleShared()
	hb.broadcastLocked()
}

// publish stores one complete event and wakes the clients.
func (hb *hub) publish(gen uint64, raw []byte, info eventInfo) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if gen != hb.liveGen {
		return // a replaced upstream's late event
	}
	if hb.repeatsOverlap(raw, info) {
		return
	}
	id := ""
	if info.hasID && !info.idTooLong {
		id = string(info.id)
	}
	if info.hasID {
		hb.backendIDs = true
		hb.lastBackID = id
	}
	if info.retry >= 0 {
		hb.retry = time.Duration(min(info.retry, int64(maxBackoff/time.Millisecond))) * time.Millisecond
	}
	hb.seq++
	var data []byte
	if hb.cfg.ids == "synthesize" || (hb.cfg.ids == "auto" && !info.hasID) {
		id = hb.epoch + "-" + strconv.FormatUint(hb.seq, 36)
		data = withID(raw, id)
	} else {
		data = append([]byte(nil), raw...)
	}
	now := time.Now()
	hb.buf.add(&event{seq: hb.seq, id: id, data: data, at: now, z: hb.compressShared(data)})
	hb.lastPub = now
	hb.broadcastLocked()
}

// repeatsOverlap handles the moment one upstream connection replaces
// another (a config reload): the backend sends the same events on both
// until the new one's header switches publishing to it. While both run,
// the old one's events are remembered; the new one's first events that
// repeat them are dropped, so the switch adds no duplicate. A backend with
// ids is matched by id; one without, by the event's bytes.
func (hb *hub) repeatsOverlap(raw []byte, info eventInfo) bool {
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
		if bytes.Equal(seen, raw) || (info.hasID && len(info.id) > 0 && bytes.Contains(seen, append([]byte("id: "), info.id...))) {
			hb.overlap = hb.overlap[i+1:]
			return true
		}
	}
	hb.overlap = nil // the new connection is past the overlap
	return false
}

// withID copies an event with an id line added just before the blank line
// that ends it, where it is the event's last id and so the one that counts.
func withID(raw []byte, id string) []byte {
	cut := len(raw) - 1 // the blank line is "\n" or "\r"...
	if len(raw) >= 2 && raw[len(raw)-2] == '\r' && raw[len(raw)-1] == '\n' {
		cut = len(raw) - 2 // ... or "\r\n"
	}
	out := make([]byte, 0, len(raw)+len(id)+5)
	out = append(out, raw[:cut]...)
	out = append(out, "id: "...)
	out = append(out, id...)
	out = append(out, '\n')
	return append(out, raw[cut:]...)
}

// report describes the hub for the admin API.
func (hb *hub) report(now time.Time) streamStatus {
	handedOver := hb.handedOver() // takes the delivery loops' locks: never under hb.mu
	hb.mu.Lock()
	defer hb.mu.Unlock()
	events, bytes := hb.buf.stats()
	st := streamStatus{
		Mode:          modeFanout.String(),
		Key:           hb.keyHash,
		Path:          hb.path,
		Clients:       hb.clients,
		HandedOver:    handedOver,
		UptimeSeconds: now.Sub(hb.created).Seconds(),
		CacheEvents:   events,
		CacheBytes:    bytes,
		Reconnects:    hb.reconnects,
		Events:        int64(hb.seq),
	}
	if ev, _ := hb.buf.after(nil, hb.seq-1, 1); len(ev) == 1 {
		st.LastEventID = formatID([]byte(ev[0].id))
	}
	switch {
	case hb.destroyed:
		st.Upstream = upstreamClosed
	case hb.up == nil:
		st.Upstream = "disconnected"
	case hb.header == nil || hb.liveGen != hb.up.gen:
		st.Upstream = "connecting"
	default:
		st.Upstream = upstreamStreaming
	}
	return st
}
