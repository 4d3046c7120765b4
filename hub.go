package caddysse

import (
	"context"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
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

// hub is one shared upstream stream on this node. Its history is its
// broker's (broker.go); the hub keeps a window of the recent events with
// what its shared compressors made of them, and its clients are cursors
// into that window: an event is stored once and its bytes are written to
// every client from there.
//
// Locks, in the order they are taken: pubMu (one publisher at a time,
// held across broker calls), then mu (the hub's state; never held across
// a broker call or a client write), then a deliverer's mu (detach.go).
// Outside the hub's own files (hub.go, hub_publish.go, hub_handover.go,
// hub_follow.go) only the hub's methods in compress_shared.go and the
// client's step (fanout_client.go) take mu; the rest use the accessors.
//
// Goroutines of a hub: the upstream loop (runUpstream, one per upstream
// connection, ended by its cancel or by Destruct), the heartbeat timer's
// callback, and the delivery loops (deliverer.run, one per processor at
// most, each ending when it has no client left) with one peer watcher per
// handed-over client (watchPeer, ending when the connection closes); in
// cluster mode, the follow loop of a node that does not hold the lease
// (hub_follow.go, ended by Destruct).
// Clients on their own request goroutine run fanoutClient.run.
type hub struct {
	poolKey string
	keyHash string // for logs and the admin API: keys can hold credentials
	path    string // the request path, without its query
	cfg     hubConfig
	logger  *zap.Logger
	created time.Time

	stream BrokerStream // the shared history (broker.go)
	pubMu  sync.Mutex   // one publish at a time: taken before mu, held across broker calls

	mu         sync.Mutex
	win        *memoryReplay // this node's window of the stream (window.go)
	seq        uint64        // last event in the window
	wake       chan struct{} // closed and replaced when seq or beats change, or the hub ends
	beats      uint64        // heartbeats due to idle clients
	lastPub    time.Time
	header     http.Header // the upstream's response header, once it streams
	status     int
	streamedAt time.Time // when the current upstream connection began streaming
	failed     bool      // the upstream answered with something that is not a stream
	clients    int
	sources    map[*fanoutRuntime]*source // handlers whose clients can run the upstream
	up         *upstream                  // the newest upstream connection loop
	old        *upstream                  // the one it replaces, until the new one streams
	liveGen    uint64                     // the upstream whose events are published
	gens       uint64
	overlap    [][]byte // what the replaced upstream published while the new one connected
	backendIDs bool     // the backend sends ids: resume it with Last-Event-ID
	lastBackID string   // the last id the backend sent
	retry      time.Duration
	// The backend's last retry field, for clients that join after it.
	retryField []byte
	// The new connection of a backend without ids, streaming but not yet
	// published: the old one publishes until they meet (switchLocked).
	handover   *handover
	reconnects int
	epoch      string   // the broker epoch of the window's events
	epochSeq   uint64   // the window seq of offset 0 of that epoch
	epochFrom  uint64   // the first offset of that epoch the mapping holds for (a gap re-bases it)
	head       Position // the broker position of the window's newest event from the broker
	// Cluster mode (a shared broker): whether this node leads the stream
	// (runs its upstream, with lease), or follows it from the broker
	// (follow, started the first time the lease is refused).
	leading     bool
	shared      bool   // the broker is shared with other nodes (a lease can be refused or lost)
	resetLast   bool   // the window's newest event is a reset event of this node's (addResetLocked)
	backlogDone bool   // the broker's backlog was read into the window (readBroker)
	backlogSeq  uint64 // the window's seq after that backlog: where clients that joined before it start
	leaseHeld   bool
	lease       Lease
	brokerDown  time.Time // when the broker began failing, zero while it answers
	unavailable bool      // the broker failed for longer than brokerOutage: clients end with a retry
	followOnce  sync.Once
	leadNow     chan struct{}   // the follower loop's hint that the lease may be free (buffer 1)
	followCtx   context.Context // ends with the hub
	followStop  context.CancelFunc
	down        bool   // the live upstream connection failed: the next one follows a gap
	gap         bool   // a gap's reset event is due, before the new connection's events
	ends        uint64 // backend ends honoured (on_end): the clients of before end too
	heartbeat   *time.Timer
	destroyed   bool
	zc          [numCodings]sharedCompressor // one per coding clients use (compress_shared.go)
	dlOnce      sync.Once
	dl          []*deliverer          // delivery loops of detached clients (detach.go)
	out         [numCodings]hubOutput // per content coding, for the admin API

	served atomic.Bool   // a client got its stream: only then does linger keep the hub (fanout.go)
	count  *atomic.Int64 // the max_streams count of the handler that opened it, given back at Destruct
}

// hubOutput is what a hub's clients of one content coding were sent. Its
// counters are atomic: clients update them from their own goroutines (the
// request's or a delivery loop's) without the hub's lock.
type hubOutput struct {
	clients   atomic.Int64 // clients streaming now
	raw, wire atomic.Int64 // bytes written to them, before and after compression
}

func newHub(poolKey, keyHash string, cfg hubConfig, logger *zap.Logger, stream BrokerStream) *hub {
	hb := &hub{
		poolKey: poolKey,
		keyHash: keyHash,
		cfg:     cfg,
		created: time.Now(),
		stream:  stream,
		win:     newWindow(cfg.limits),
		wake:    make(chan struct{}),
		sources: make(map[*fanoutRuntime]*source),
	}
	hb.followCtx, hb.followStop = context.WithCancel(context.Background())
	hb.leadNow = make(chan struct{}, 1)
	hb.logger = logger.With(zap.String("stream", hb.keyHash))
	for i := range hb.zc {
		hb.zc[i].enc = coding(i)
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
	hb.dropHandoverLocked()
	if hb.heartbeat != nil {
		hb.heartbeat.Stop()
	}
	hb.idleShared()
	hb.broadcastLocked()
	hb.mu.Unlock()
	if hb.count != nil {
		hb.count.Add(-1) // before the upstream is closed, which a test may wait for
	}
	hb.followStop()
	up.stop()
	old.stop()
	return hb.stream.Close()
}

// fellOut reports how many events the window holds after cursor, and
// whether the one right after it has left the window: a client there can
// no longer be served without a gap (fanoutClient.step).
func (hb *hub) fellOut(cursor uint64) (lag uint64, out bool) {
	var next [1]*event
	hb.mu.Lock()
	defer hb.mu.Unlock()
	_, ok := hb.win.after(next[:0], cursor, 1)
	return hb.seq - cursor, !ok
}

// wakeChan is the channel closed at the next change (event, heartbeat,
// end).
func (hb *hub) wakeChan() <-chan struct{} {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	return hb.wake
}

// heartbeats is the count of heartbeats the hub has asked for.
func (hb *hub) heartbeats() uint64 {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	return hb.beats
}

// liveClients reports the hub's clients, and whether it is still live.
func (hb *hub) liveClients() (int, bool) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	return hb.clients, !hb.destroyed
}

func (hb *hub) broadcastLocked() {
	close(hb.wake)
	hb.wake = make(chan struct{})
}

// join adds a client of the handler whose runtime is run, and makes sure
// the upstream runs.
// It returns the last event published before the client joined: the
// events after it answer the client's request, even those published while
// it waited for the upstream's header (a backend's welcome event).
// ends is the count of honoured backend ends so far: the client's stream
// ends at the next one.
func (hb *hub) join(run *fanoutRuntime, maxClients int, r *http.Request, next caddyhttp.Handler) (joinedAt, ends uint64, ok bool) {
	hb.mu.Lock()
	if maxClients > 0 && hb.clients >= maxClients {
		hb.mu.Unlock()
		return 0, 0, false
	}
	hb.clients++
	relimit := false
	if _, ok := hb.sources[run]; !ok {
		relimit = hb.applyLocked(run.cfg)
		tmpl := r.Clone(context.WithoutCancel(r.Context()))
		tmpl.Body = http.NoBody
		tmpl.Header.Del("Last-Event-ID")
		hb.sources[run] = &source{next: next, tmpl: tmpl, added: time.Now(), route: snapshotRoute(r)}
		hb.path = r.URL.Path
	}
	if hb.failed && hb.up == nil {
		hb.failed = false // a new client asks again
	}
	// No upstream, or one whose config was unloaded: run it through this
	// handler's route (the old one hands over once the new one streams).
	if (hb.up == nil || hb.up.orphan) && !hb.destroyed {
		hb.startUpstreamLocked()
	}
	joinedAt, ends = hb.seq, hb.ends
	hb.mu.Unlock()
	if l, ok := hb.stream.(historyLimiter); ok && relimit {
		l.setLimits(historyLimits(run.cfg.limits)) // a broker, outside the hub's lock
	}
	return joinedAt, ends, true
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
// if the window has it, otherwise where it joined (reset is true when an
// id was asked for and not found), minus replayOnConnect for a client that
// asked for none. The id is looked up first (a synthesized id names its
// position; another asks the broker); the cursor is then taken under the
// hub's lock, so nothing is missed or sent twice between the replay and
// the live stream.
func (hb *hub) position(ctx context.Context, lastID string, replayOnConnect int, joinedAt uint64) (cursor, behind uint64, reset, found bool) {
	var pos Position
	var known bool
	if lastID != "" {
		hb.mu.Lock()
		epoch := hb.epoch
		hb.mu.Unlock()
		pos, known = ParseSynthesizedID(lastID)
		if !known || pos.Epoch != epoch {
			var err error
			pos, known, err = hb.stream.Find(ctx, lastID)
			if err != nil {
				hb.logger.Warn("broker could not look up a Last-Event-ID; treating it as unknown", zap.Error(err))
			}
		}
		hb.mu.Lock()
		head, leading := hb.head, hb.leading
		hb.mu.Unlock()
		if known && !leading && (pos.Epoch != head.Epoch || pos.Offset > head.Offset) {
			// A client from a node further on (cluster mode): take in what
			// the broker has before placing it.
			if _, err := hb.catchUp(ctx); err != nil {
				hb.logger.Warn("broker could not be read for a Last-Event-ID ahead of this node", zap.Error(err))
			}
		}
	}
	hb.mu.Lock()
	defer hb.mu.Unlock()
	// A client that joined a new hub before it loaded the broker's backlog
	// joined after it: the backlog is history, not news.
	joinedAt = max(joinedAt, hb.backlogSeq)
	if lastID != "" {
		if known && pos.Epoch == hb.epoch && pos.Offset >= hb.epochFrom {
			if seq := hb.epochSeq + pos.Offset; seq <= hb.seq && hb.win.held(seq) {
				return seq, hb.seq - seq, false, true
			}
		}
		return joinedAt, 0, true, false
	}
	held, _ := hb.win.stats()
	heldBefore := max(held-int(hb.seq-joinedAt), 0)
	back := uint64(min(replayOnConnect, heldBefore))
	return joinedAt - back, back, false, false
}

// withRetry appends to a joining client's first bytes the backend's last
// retry field: the clients connected when it was sent got it in its
// event, and a joiner must reconnect with the same delay, not the
// browser's default.
func (hb *hub) withRetry(first []byte) []byte {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if hb.retryField == nil {
		return first
	}
	return append(append([]byte(nil), first...), hb.retryField...)
}

// applyLocked makes cfg the hub's settings: a handler of a new config
// joined it (a reload), and its settings are the ones that hold now. The
// cache is kept, and bounded anew (relimit: the broker's history too, by
// the caller); new events follow the new ids mode and max_event_size
// (from the next upstream connection, which the new handler's route
// opens); heartbeats take the new interval.
func (hb *hub) applyLocked(cfg hubConfig) (relimit bool) {
	if cfg == hb.cfg {
		return false
	}
	relimit = cfg.limits != hb.cfg.limits
	hb.cfg = cfg
	hb.win.limits = cfg.limits
	hb.win.evict()
	switch {
	case cfg.heartbeat <= 0 && hb.heartbeat != nil:
		hb.heartbeat.Stop()
		hb.heartbeat = nil
	case cfg.heartbeat > 0 && hb.heartbeat == nil && hb.header != nil && !hb.destroyed:
		hb.heartbeat = time.AfterFunc(cfg.heartbeat, hb.onHeartbeat)
	}
	return relimit
}

// historyLimiter is a broker stream whose history bounds can change (the
// memory broker's): a reload's new buffer settings apply to it.
type historyLimiter interface {
	setLimits(HistoryLimits)
}

// historyLimits are a hub's cache bounds as a broker's history bounds.
func historyLimits(l replayLimits) HistoryLimits {
	return HistoryLimits{Events: l.events, Bytes: l.bytes, Age: l.age}
}

// endRetry is the retry hint of a stream the backend ended: the backend's
// own last retry, which its clients were sent, or else the configured one.
func (hb *hub) endRetry(configured []byte) []byte {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if hb.retryField != nil {
		return hb.retryField
	}
	return configured
}

// honoursEndLocked reports whether a clean end of the backend's response
// ends the stream (on_end), rather than being reconnected.
func (hb *hub) honoursEndLocked() bool {
	return hb.cfg.onEnd == "end" || (hb.cfg.onEnd == "auto" && !hb.backendIDs)
}

// streamStarted records the upstream's response and starts heartbeats.
func (hb *hub) streamStarted(ctx context.Context, gen uint64, lease Lease, status int, header http.Header) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if hb.up == nil || gen != hb.up.gen {
		return // a replaced upstream
	}
	if hb.old != nil && hb.liveGen == hb.old.gen && hb.header != nil && !hb.down && !hb.backendIDs {
		// A backend without ids starts the new connection at its live
		// edge, which the old one may not have delivered yet: an event it
		// sent just before the new connection was accepted can still be on
		// its way through the old one. The old one publishes on until the
		// two streams meet (handoverMetLocked), the new one's events are
		// held meanwhile; switching now would lose that event.
		hb.dropHandoverLocked()
		hb.handover = &handover{gen: gen, ctx: ctx, lease: lease}
		ho := hb.handover
		ho.timer = time.AfterFunc(handoverWait, func() { hb.endHandover(ho) })
	} else {
		// From now on only this connection publishes: the one it replaces
		// is closed (a backend with ids is resumed after the last id this
		// hub holds, so the new connection repeats what the old one still
		// had in flight, and repeatsOverlap drops the repeats).
		hb.liveGen = gen
		hb.old.stopAsync()
		hb.old = nil
	}
	hb.up.owner.policy.metrics.upstreamConnected(hb.header != nil)
	gap := hb.down && hb.seq > 0 && !hb.backendIDs
	hb.down = false
	hb.header, hb.status, hb.streamedAt = header, status, time.Now()
	hb.lastPub = hb.streamedAt
	hb.gap = gap // its reset event goes first (publishGap)
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
	if every <= 0 || hb.heartbeat == nil {
		return // turned off by a reload (applyLocked)
	}
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

// report describes the hub for the admin API.
func (hb *hub) report(now time.Time) streamStatus {
	handedOver := hb.handedOver() // takes the delivery loops' locks: never under hb.mu
	hb.mu.Lock()
	defer hb.mu.Unlock()
	events, bytes := hb.win.stats()
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
	if hb.shared {
		leading := hb.leading
		st.Leader = &leading
	}
	var codings []string
	for i := range hb.out {
		o := &hb.out[i]
		es := encodingStatus{Encoding: coding(i).String(), Clients: o.clients.Load(), Bytes: o.raw.Load(), WireBytes: o.wire.Load()}
		if es.Clients == 0 && es.Bytes == 0 {
			continue // a coding no client of this hub ever used
		}
		st.Encodings = append(st.Encodings, es)
		st.Bytes += es.Bytes
		st.WireBytes += es.WireBytes
		if es.Clients > 0 {
			codings = append(codings, es.Encoding)
		}
	}
	st.Encoding = strings.Join(codings, ",")
	if ev, _ := hb.win.after(nil, hb.seq-1, 1); len(ev) == 1 {
		st.LastEventID = formatID([]byte(ev[0].id))
	}
	switch {
	case hb.destroyed:
		st.Upstream = upstreamClosed
	case hb.shared && !hb.leading:
		st.Upstream = "following" // another node runs it (cluster mode)
	case hb.up == nil:
		st.Upstream = "disconnected"
	case hb.header == nil || hb.liveGen != hb.up.gen:
		st.Upstream = "connecting"
	default:
		st.Upstream = upstreamStreaming
	}
	return st
}
