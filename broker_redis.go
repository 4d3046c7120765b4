package caddysse

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/redisbroker"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(RedisBroker))
}

// Redis broker defaults.
const (
	defaultRedisPrefix   = "sse:"
	defaultRedisLeaseTTL = 6 * time.Second
	// redisKeyTTL is how long an idle stream's keys stay in Redis (longer
	// when buffer_age asks for more): well past linger, so that a stream
	// whose clients all left for a moment finds its history again.
	redisKeyTTL = 10 * time.Minute
	// redisCallTimeout bounds one broker call of a hub: Redis answers in
	// well under a millisecond, an unreachable one must not hold a hub.
	redisCallTimeout = 2 * time.Second
)

// RedisBroker keeps each stream's history, ids and upstream lease in Redis
// (or Valkey), so that several Caddy nodes serve one stream with one
// upstream connection between them: cluster mode (see the README). The
// keys and their costs are described in internal/redisbroker.
type RedisBroker struct {
	// Address is the Redis server, as a redis:// or rediss:// URL
	// (redis://user:password@host:6379/0). Timeouts may be given in its
	// query (dial_timeout=...); by default every call fails within about 2
	// s when Redis is unreachable.
	Address string `json:"address,omitempty"`

	// Addresses are several host:port instead of Address: the Sentinels
	// when MasterName is set, else the nodes of a Redis Cluster.
	Addresses []string `json:"addresses,omitempty"`

	// MasterName is the Sentinel master's name (with Addresses).
	MasterName string `json:"master_name,omitempty"`

	// Username and Password authenticate with Addresses (Address carries
	// its own in the URL).
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`

	// Prefix starts every Redis key of the plugin, so that several
	// clusters (or other users) can share one Redis. Default: sse:.
	Prefix string `json:"prefix,omitempty"`

	// LeaseTTL is how long the lease of a stream's leader (the node that
	// runs its upstream) lasts without renewal: the longest a crashed
	// leader leaves the stream without upstream. The leader renews it every
	// third of it. Default: 6s.
	LeaseTTL caddy.Duration `json:"lease_ttl,omitempty"`

	conn    *redisConn
	connKey string
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*RedisBroker) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse.brokers.redis",
		New: func() caddy.Module { return new(RedisBroker) },
	}
}

// redisConns holds the Redis clients and their Pub/Sub subscribers, one per
// address and prefix. Hubs outlive config reloads and so must their
// client: a broker module (per config) and every stream it opened each
// hold a reference, and the last one to go closes the connection.
var redisConns = caddy.NewUsagePool()

// redisConn is one Redis deployment as this process reaches it.
type redisConn struct {
	client  redis.UniversalClient
	base    *redisbroker.Broker // the subscriber's; streams make their own (their bounds differ)
	sub     *redisbroker.Subscriber
	metrics atomic.Pointer[redisMetrics] // of the newest config
}

func (c *redisConn) Destruct() error {
	c.sub.Close()
	return c.client.Close()
}

var redisLoggerOnce sync.Once

// redisLogger routes go-redis's own log lines (reconnects, pool errors)
// to Caddy's log at debug level: the broker reports what matters itself.
type redisLogger struct{ l *zap.Logger }

func (r redisLogger) Printf(_ context.Context, format string, v ...any) {
	r.l.Debug(strings.TrimSpace(fmt.Sprintf(format, v...)))
}

// Provision connects (or shares the connection of an earlier config).
func (b *RedisBroker) Provision(ctx caddy.Context) error {
	b.logger = ctx.Logger()
	redisLoggerOnce.Do(func() { redis.SetLogger(redisLogger{caddy.Log().Named("sse.redis")}) })
	if b.Prefix == "" {
		b.Prefix = defaultRedisPrefix
	}
	if b.LeaseTTL == 0 {
		b.LeaseTTL = caddy.Duration(defaultRedisLeaseTTL)
	}
	if err := b.validate(); err != nil {
		return err
	}
	b.connKey = fmt.Sprintf("%q %q %q %q %q %q %d", b.Address, b.Addresses, b.MasterName, b.Username, b.Password, b.Prefix, b.LeaseTTL)
	v, _, err := redisConns.LoadOrNew(b.connKey, func() (caddy.Destructor, error) {
		var client redis.UniversalClient
		if b.Address != "" {
			c, err := redisbroker.NewClient(b.Address)
			if err != nil {
				return nil, fmt.Errorf("address: %v", err)
			}
			client = c
		} else {
			client = redisbroker.NewUniversalClient(&redis.UniversalOptions{
				Addrs: b.Addresses, MasterName: b.MasterName, Username: b.Username, Password: b.Password,
			})
		}
		base := redisbroker.New(client, redisbroker.Options{Prefix: b.Prefix, LeaseTTL: time.Duration(b.LeaseTTL)})
		return &redisConn{client: client, base: base, sub: base.NewSubscriber()}, nil
	})
	if err != nil {
		return fmt.Errorf("redis: %v", err)
	}
	b.conn = v.(*redisConn)
	m, err := newRedisMetrics(ctx.GetMetricsRegistry())
	if err != nil {
		b.logger.Warn("redis broker metrics not registered", zap.Error(err))
	}
	if m != nil {
		b.conn.metrics.Store(m)
	}
	return nil
}

// validate checks the fields; Provision calls it after the defaults.
func (b *RedisBroker) validate() error {
	switch {
	case b.Address == "" && len(b.Addresses) == 0:
		return errors.New("redis: address (or addresses) is required")
	case b.Address != "" && len(b.Addresses) > 0:
		return errors.New("redis: address and addresses are exclusive")
	case b.Address != "" && !strings.HasPrefix(b.Address, "redis://") && !strings.HasPrefix(b.Address, "rediss://") && !strings.HasPrefix(b.Address, "unix://"):
		return fmt.Errorf("redis: address %q: want a redis:// or rediss:// URL", b.Address)
	case b.MasterName != "" && len(b.Addresses) == 0:
		return errors.New("redis: master_name needs addresses (the Sentinels)")
	}
	if err := checkLeaseTTL(time.Duration(b.LeaseTTL)); err != nil {
		return fmt.Errorf("redis: lease_ttl: %v", err)
	}
	return nil
}

// checkLeaseTTL: renewals every third of it must fit Redis round trips,
// and a crashed leader is replaced within it.
func checkLeaseTTL(d time.Duration) error {
	switch {
	case d < time.Second:
		return fmt.Errorf("%v is below 1s", d)
	case d > 5*time.Minute:
		return fmt.Errorf("%v is over the maximum of 5m", d)
	}
	return nil
}

// Cleanup drops this config's reference to the connection; streams keep
// theirs.
func (b *RedisBroker) Cleanup() error {
	if b.conn != nil {
		_, err := redisConns.Delete(b.connKey)
		b.conn = nil
		return err
	}
	return nil
}

// redisStreamKey is the name of a stream in Redis: a hash of the hub's
// key, which holds request headers (credentials, too) that have no
// business in Redis key names, and whose length is the client's.
func redisStreamKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:16])
}

// Stream opens the shared history of key.
func (b *RedisBroker) Stream(ctx context.Context, key string, limits HistoryLimits) (BrokerStream, error) {
	if b.conn == nil {
		return nil, errors.New("redis broker not provisioned")
	}
	// The stream's own reference to the connection, for as long as its hub lives.
	v, _, err := redisConns.LoadOrNew(b.connKey, func() (caddy.Destructor, error) { return b.conn, nil })
	if err != nil {
		return nil, err
	}
	conn := v.(*redisConn)
	ttl := time.Duration(b.LeaseTTL)
	rb := redisbroker.New(conn.client, redisbroker.Options{
		Prefix: b.Prefix, MaxEvents: limits.Events, MaxBytes: limits.Bytes, MaxAge: limits.Age,
		KeyTTL: max(redisKeyTTL, limits.Age+time.Minute), LeaseTTL: ttl,
	})
	s := &redisStream{conn: conn, connKey: b.connKey, st: rb.Stream(redisStreamKey(key)), ttl: ttl}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisCallTimeout)
	s.watch = conn.sub.Watch(wctx, s.st)
	cancel()
	return s, nil
}

// redisStream is one stream's history in Redis, as one hub uses it.
type redisStream struct {
	conn    *redisConn
	connKey string
	st      *redisbroker.Stream
	watch   *redisbroker.Watch
	ttl     time.Duration

	mu   sync.Mutex
	held *redisLease          // the lease this node holds, nil when none
	next redisbroker.Position // the leader's next position, known after Lead and each append; zero when unknown
}

// redisLease is a lease this node holds and renews.
type redisLease struct {
	l      redisbroker.Lease
	keeper *redisbroker.Keeper
	lost   chan struct{}
	once   sync.Once
}

func (rl *redisLease) markLost() { rl.once.Do(func() { close(rl.lost) }) }

func (s *redisStream) metrics() *redisMetrics { return s.conn.metrics.Load() }

// observe records one Redis call's latency and failure.
func (s *redisStream) observe(op string, start time.Time, err error) {
	m := s.metrics()
	if m == nil {
		return
	}
	m.latency.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if err != nil && !errors.Is(err, context.Canceled) {
		m.errors.WithLabelValues(op).Inc()
	}
}

func (s *redisStream) lease(rl *redisLease) Lease {
	return Lease{Token: rl.l.Token, Lost: rl.lost, Every: s.ttl / 3}
}

func (s *redisStream) Lead(ctx context.Context) (Lease, bool, error) {
	s.mu.Lock()
	if rl := s.held; rl != nil {
		select {
		case <-rl.lost:
			s.held = nil
		default:
			s.mu.Unlock()
			return s.lease(rl), true, nil
		}
	}
	s.mu.Unlock()
	start := time.Now()
	l, ok, err := s.st.Acquire(ctx)
	s.observe("acquire", start, err)
	if err != nil || !ok {
		// Ask again every third of the TTL, or just after the holder's
		// lease runs out if that comes first: a crashed leader is replaced
		// within the TTL.
		every := s.ttl / 3
		if !l.Expires.IsZero() {
			every = max(min(every, time.Until(l.Expires)+20*time.Millisecond), 20*time.Millisecond)
		}
		return Lease{Every: every}, false, err
	}
	head, err := s.st.Head(ctx)
	s.observe("head", start, err)
	if err != nil {
		_ = s.st.Release(context.WithoutCancel(ctx), l)
		return Lease{Every: s.ttl / 3}, false, err
	}
	rl := &redisLease{l: l, lost: make(chan struct{})}
	rl.keeper = s.st.Keep(context.Background(), l)
	// The keeper's loss becomes the lease's; this goroutine ends with the
	// keeper (Resign, Close, or the loss itself).
	go func() {
		select {
		case <-rl.keeper.Lost():
			rl.markLost()
			if m := s.metrics(); m != nil {
				m.leaseLosses.Inc()
			}
		case <-rl.keeper.Done():
		}
	}()
	if m := s.metrics(); m != nil {
		m.leaseAcquired.Inc()
	}
	s.mu.Lock()
	s.held, s.next = rl, redisbroker.Position{Epoch: head.Epoch, Offset: head.Offset + 1}
	s.mu.Unlock()
	return s.lease(rl), true, nil
}

// current is the held lease if lease names it.
func (s *redisStream) current(lease Lease) *redisLease {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held == nil || s.held.l.Token != lease.Token {
		return nil
	}
	return s.held
}

func (s *redisStream) Resign(lease Lease) {
	s.mu.Lock()
	rl := s.held
	if rl == nil || rl.l.Token != lease.Token {
		s.mu.Unlock()
		return
	}
	s.held, s.next = nil, redisbroker.Position{}
	s.mu.Unlock()
	rl.keeper.Stop() // releases the lease in Redis (bounded: a dead Redis lets it expire)
	rl.markLost()
}

// fenced records that Redis refused the lease: it is gone.
func (s *redisStream) fenced(rl *redisLease) {
	s.mu.Lock()
	if s.held == rl {
		s.held, s.next = nil, redisbroker.Position{}
	}
	s.mu.Unlock()
	rl.keeper.Stop()
	rl.markLost()
	if m := s.metrics(); m != nil {
		m.leaseLosses.Inc()
	}
}

func (s *redisStream) Next(ctx context.Context) (Position, error) {
	s.mu.Lock()
	next := s.next
	s.mu.Unlock()
	if next.Epoch != "" {
		return Position(next), nil
	}
	start := time.Now()
	head, err := s.st.Head(ctx)
	s.observe("head", start, err)
	if err != nil {
		return Position{}, err
	}
	return Position{Epoch: head.Epoch, Offset: head.Offset + 1}, nil
}

func (s *redisStream) Append(ctx context.Context, lease Lease, ev StoredEvent) (Position, error) {
	rl := s.current(lease)
	if rl == nil {
		return Position{}, ErrFenced
	}
	start := time.Now()
	pos, err := s.st.Append(ctx, rl.l, redisbroker.Event{ID: ev.ID, Data: ev.Data})
	s.observe("append", start, err)
	if errors.Is(err, redisbroker.ErrNotLeader) {
		s.fenced(rl)
		return Position{}, ErrFenced
	}
	s.mu.Lock()
	if err != nil {
		// It may or may not have been applied: ask Redis next time.
		s.next = redisbroker.Position{}
	} else if s.held == rl {
		s.next = redisbroker.Position{Epoch: pos[0].Epoch, Offset: pos[0].Offset + 1}
	}
	s.mu.Unlock()
	if err != nil {
		return Position{}, err
	}
	if m := s.metrics(); m != nil {
		m.appends.Inc()
	}
	return Position(pos[0]), nil
}

func (s *redisStream) Read(ctx context.Context, after Position, max int, dst []StoredEvent) ([]StoredEvent, bool, error) {
	start := time.Now()
	entries, err := s.st.Range(ctx, redisbroker.Position(after), max)
	s.observe("range", start, err)
	if errors.Is(err, redisbroker.ErrHistoryLost) {
		return dst, false, nil
	}
	if err != nil {
		return dst, false, err
	}
	if m := s.metrics(); m != nil {
		m.reads.Inc()
	}
	for _, e := range entries {
		dst = append(dst, StoredEvent{Pos: Position(e.Pos), ID: e.ID, Data: e.Data, At: e.Time})
	}
	return dst, true, nil
}

func (s *redisStream) Find(ctx context.Context, id string) (Position, bool, error) {
	start := time.Now()
	pos, ok, err := s.st.Find(ctx, id)
	s.observe("find", start, err)
	return Position(pos), ok, err
}

// redisResponse is how a Response is stored.
type redisResponse struct {
	Status int                 `json:"s"`
	Header map[string][]string `json:"h"`
}

func (s *redisStream) SetResponse(ctx context.Context, lease Lease, resp Response) error {
	rl := s.current(lease)
	if rl == nil {
		return ErrFenced
	}
	data, err := json.Marshal(redisResponse{Status: resp.Status, Header: resp.Header})
	if err != nil {
		return err
	}
	start := time.Now()
	err = s.st.SetResponse(ctx, rl.l, data)
	s.observe("set_response", start, err)
	if errors.Is(err, redisbroker.ErrNotLeader) {
		s.fenced(rl)
		return ErrFenced
	}
	return err
}

func (s *redisStream) Response(ctx context.Context) (Response, bool, error) {
	start := time.Now()
	data, ok, err := s.st.Response(ctx)
	s.observe("response", start, err)
	if err != nil || !ok {
		return Response{}, false, err
	}
	var r redisResponse
	if err := json.Unmarshal(data, &r); err != nil {
		return Response{}, false, fmt.Errorf("redis: stored response: %v", err)
	}
	return Response{Status: r.Status, Header: r.Header}, true, nil
}

// Notify: the subscriber's wake-up channel receives (coalesced) after
// appends, and after every (re)subscription, when some may have been
// missed.
func (s *redisStream) Notify() <-chan struct{} { return s.watch.C() }

// Close releases the lease at once and drops the stream's reference to the
// connection.
func (s *redisStream) Close() error {
	s.mu.Lock()
	rl := s.held
	s.mu.Unlock()
	if rl != nil {
		s.Resign(s.lease(rl))
	}
	s.watch.Close()
	_, err := redisConns.Delete(s.connKey)
	return err
}

// redisMetrics are the cluster's collectors in a config's registry (see
// metrics.go for the others).
//
//	caddy_sse_broker_lease_acquisitions_total  counter    leases this node took (it became a stream's leader)
//	caddy_sse_broker_lease_losses_total        counter    leases lost without resigning (expired, fenced)
//	caddy_sse_broker_appends_total             counter    events appended to Redis
//	caddy_sse_broker_reads_total               counter    reads of the log (backlogs and gap fills after a notification)
//	caddy_sse_broker_errors_total{op}          counter    Redis calls that failed
//	caddy_sse_broker_latency_seconds{op}       histogram  Redis call latency
type redisMetrics struct {
	leaseAcquired prometheus.Counter
	leaseLosses   prometheus.Counter
	appends       prometheus.Counter
	reads         prometheus.Counter
	errors        *prometheus.CounterVec
	latency       *prometheus.HistogramVec
}

func newRedisMetrics(reg prometheus.Registerer) (*redisMetrics, error) {
	if reg == nil {
		return nil, nil
	}
	const ns, sub = "caddy", "sse"
	var errs []error
	counter := func(name, help string) prometheus.Counter {
		return register(reg, prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}), &errs)
	}
	m := &redisMetrics{
		leaseAcquired: counter("broker_lease_acquisitions_total", "Stream leases this node acquired (it became the stream's leader)."),
		leaseLosses:   counter("broker_lease_losses_total", "Stream leases this node lost without resigning (expired or fenced)."),
		appends:       counter("broker_appends_total", "Events appended to the shared log."),
		reads:         counter("broker_reads_total", "Reads of the shared log: backlogs of joining nodes and gap fills after notifications."),
		errors: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "broker_errors_total", Help: "Calls to the broker's store (Redis) that failed."}, []string{"op"}), &errs),
		latency: register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub,
			Name: "broker_latency_seconds", Help: "Latency of calls to the broker's store (Redis).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1}}, []string{"op"}), &errs),
	}
	return m, errors.Join(errs...)
}

// Interface guards
var (
	_ Broker             = (*RedisBroker)(nil)
	_ BrokerStream       = (*redisStream)(nil)
	_ caddy.Provisioner  = (*RedisBroker)(nil)
	_ caddy.CleanerUpper = (*RedisBroker)(nil)
	_ caddy.Module       = (*RedisBroker)(nil)
)
