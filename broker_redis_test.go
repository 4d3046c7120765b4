package caddysse

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"
	"github.com/seed-b7710c89/caddy-sse/internal/redistest"
)

// testRedis starts a redis-server for t (internal/redistest: a loopback
// port of its own, no persistence, killed when t ends) and returns its
// address. Without redis-server the test is skipped, unless
// SSE_REQUIRE_REDIS=1 (CI), when it fails.
func testRedis(t *testing.T) string { return startTestRedis(t).Addr }

func startTestRedis(t *testing.T) *redistest.Server {
	t.Helper()
	return redistest.Start(t, redistest.Options{})
}

var redisPrefixes atomic.Int64

// newTestRedisBroker provisions a Redis broker module on addr, with a
// prefix of its own unless one is given (a fresh broker, nothing stored).
func newTestRedisBroker(t *testing.T, addr, prefix string, ttl time.Duration) *RedisBroker {
	t.Helper()
	if prefix == "" {
		prefix = fmt.Sprintf("t%d:", redisPrefixes.Add(1))
	}
	b := &RedisBroker{Address: "redis://" + addr + "/0", Prefix: prefix, LeaseTTL: caddy.Duration(ttl)}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := b.Provision(ctx); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = b.Cleanup()
		cancel()
	})
	return b
}

func TestRedisBrokerContract(t *testing.T) {
	addr := testRedis(t)
	testBrokerContract(t, func(t *testing.T) Broker { return newTestRedisBroker(t, addr, "", 0) })
}

// Two nodes (two connections, one prefix) open the same stream: one leads,
// the other is refused and told when to ask again; the leader's appends,
// response head and notifications reach the other; a resigned lease is
// taken at once; and the old leader's appends are fenced once it lost it.
func TestRedisBrokerTwoNodes(t *testing.T) {
	addr := testRedis(t)
	ctx := t.Context()
	// Another lease_ttl: another connection (connKey), like another node.
	b1 := newTestRedisBroker(t, addr, "two:", 3*time.Second)
	b2 := newTestRedisBroker(t, addr, "two:", 4*time.Second)
	open := func(b *RedisBroker) BrokerStream {
		s, err := b.Stream(ctx, "key", HistoryLimits{Events: 100})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	s1, s2 := open(b1), open(b2)

	l1, ok, err := s1.Lead(ctx)
	if err != nil || !ok || l1.Lost == nil {
		t.Fatalf("first Lead: %+v %v %v", l1, ok, err)
	}
	l2, ok, err := s2.Lead(ctx)
	if err != nil || ok {
		t.Fatalf("second node's Lead while the first holds it: ok %v, err %v", ok, err)
	}
	if l2.Every <= 0 || l2.Every > 4*time.Second/3 {
		t.Fatalf("a refused Lead says ask again after %v; want (0, ttl/3]", l2.Every)
	}

	hdr := http.Header{"Content-Type": {"text/event-stream"}, "X-App": {"1"}}
	if err := s1.SetResponse(ctx, l1, Response{Status: 200, Header: hdr}); err != nil {
		t.Fatal(err)
	}
	if r, ok, err := s2.Response(ctx); err != nil || !ok || r.Status != 200 || r.Header.Get("X-App") != "1" {
		t.Fatalf("follower's Response: %+v %v %v", r, ok, err)
	}
	wake := s2.Notify()
	// The first wake-up may be the subscription's confirmation: drain until
	// the append's arrives with the event readable.
	pos, err := s1.Append(ctx, l1, StoredEvent{ID: "a", Data: []byte("data: 1\n\n")})
	if err != nil {
		t.Fatal(err)
	}
	if !eventually(5*time.Second, func() bool {
		select {
		case <-wake:
		case <-time.After(100 * time.Millisecond):
		}
		evs, gapless, err := s2.Read(ctx, Position{}, 10, nil)
		return err == nil && gapless && len(evs) == 1 && evs[0].Pos == pos && evs[0].ID == "a"
	}) {
		t.Fatal("the follower did not read the leader's append")
	}

	// Resign: the other node leads at once, and the old lease is fenced.
	s1.Resign(l1)
	select {
	case <-l1.Lost:
	default:
		t.Fatal("a resigned lease's Lost is not closed")
	}
	l2, ok, err = s2.Lead(ctx)
	if err != nil || !ok || l2.Token == l1.Token {
		t.Fatalf("Lead after the holder resigned: %+v %v %v", l2, ok, err)
	}
	if _, err := s1.Append(ctx, l1, StoredEvent{Data: []byte("data: late\n\n")}); !errors.Is(err, ErrFenced) {
		t.Fatalf("the old leader's append: %v, want ErrFenced", err)
	}
	if err := s1.SetResponse(ctx, l1, Response{Status: 200}); !errors.Is(err, ErrFenced) {
		t.Fatalf("the old leader's SetResponse: %v, want ErrFenced", err)
	}
	pos2, err := s2.Append(ctx, l2, StoredEvent{Data: []byte("data: 2\n\n")})
	if err != nil || pos2.Epoch != pos.Epoch || pos2.Offset != pos.Offset+1 {
		t.Fatalf("the new leader appends at %+v (%v), want right after %+v", pos2, err, pos)
	}

	// The metrics of each node's connection counted what it did.
	m1, m2 := b1.conn.metrics.Load(), b2.conn.metrics.Load()
	if m1 == nil || m2 == nil {
		t.Fatal("no broker metrics registered")
	}
	for _, c := range []struct {
		name string
		c    prometheus.Metric
		min  float64
	}{
		{"node 1 lease acquisitions", m1.leaseAcquired, 1},
		{"node 2 lease acquisitions", m2.leaseAcquired, 1},
		{"node 1 appends", m1.appends, 1},
		{"node 2 appends", m2.appends, 1},
		{"node 2 reads", m2.reads, 1},
		{"node 1 append latency observations", m1.latency.WithLabelValues("append").(prometheus.Metric), 1},
	} {
		if got := metricCount(t, c.c); got < c.min {
			t.Errorf("%s: %v, want at least %v", c.name, got, c.min)
		}
	}

	// A lease taken away in Redis (expired while this node was paused, or
	// lost with Redis' data) is reported through Lost within the TTL.
	rc := redis.NewClient(&redis.Options{Addr: addr})
	defer rc.Close()
	keys, err := rc.Keys(ctx, "two:*:lease").Result()
	if err != nil || len(keys) != 1 {
		t.Fatalf("lease keys %v %v", keys, err)
	}
	if err := rc.Del(ctx, keys[0]).Err(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l2.Lost:
	case <-time.After(4 * time.Second):
		t.Fatal("a lease deleted in Redis was not reported lost within the TTL")
	}
	if !eventually(time.Second, func() bool { return metricCount(t, m2.leaseLosses) >= 1 }) {
		t.Error("the lost lease was not counted")
	}
}

// The Redis client outlives a config reload: a stream opened under one
// config keeps working after that config's broker module is cleaned up,
// and the connection closes once the stream is closed too.
func TestRedisBrokerConnOutlivesConfig(t *testing.T) {
	addr := testRedis(t)
	ctx := t.Context()
	b := &RedisBroker{Address: "redis://" + addr + "/0", Prefix: "reload:"}
	cctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := b.Provision(cctx); err != nil {
		t.Fatal(err)
	}
	s, err := b.Stream(ctx, "key", HistoryLimits{})
	if err != nil {
		t.Fatal(err)
	}
	key := b.connKey
	lease, ok, err := s.Lead(ctx)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	if err := b.Cleanup(); err != nil { // the config is unloaded; the hub lives on
		t.Fatal(err)
	}
	if _, err := s.Append(ctx, lease, StoredEvent{Data: []byte("data: x\n\n")}); err != nil {
		t.Fatalf("append after the config's Cleanup: %v", err)
	}
	if _, loaded := redisConns.References(key); !loaded {
		t.Fatal("the connection is gone while a stream uses it")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, loaded := redisConns.References(key); loaded {
		t.Fatal("the connection outlived its last user")
	}
}

// Redis down: connected clients keep their heartbeats and get nothing made
// up; once the broker has failed for longer than brokerOutage, their
// streams end with the retry hint; when Redis is back, a client that
// comes back is served again, with no operator action.
func TestClusterRedisOutageEndsStreams(t *testing.T) {
	r := startTestRedis(t)
	defer func(d time.Duration) { brokerOutage = d }(brokerOutage)
	brokerOutage = time.Second
	e := newEmitter(t)
	broker := map[string]any{"name": "redis", "address": "redis://" + r.Addr + "/0", "prefix": "outage:", "lease_ttl": "2s"}
	base := startCaddy(t, fanoutRoute(e, map[string]any{"retry": "300ms", "fanout": map[string]any{"broker": broker}}))
	c := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	e.emit("data: before\n\n")
	first := waitEvents(t, c, 1)

	r.Kill()
	e.emit("data: lost\n\n") // the leader cannot append it: nobody gets it
	got := c.waitEOF(t, 15*time.Second)
	if !bytes.HasSuffix(got, []byte("retry: 300\n")) {
		t.Fatalf("the stream did not end with the retry hint: %q", got)
	}
	if evs, _, _ := parseEvents(got); len(evs) != 1 || evs[0].Data != "before" {
		t.Fatalf("during the outage the client got %+v; want only the event from before it", evs)
	}
	if !bytes.Contains(got, []byte(": heartbeat")) {
		t.Errorf("no heartbeat while Redis was down: %q", got)
	}

	r.Start()
	var c2 *client
	if !eventually(15*time.Second, func() bool {
		if c2 != nil {
			c2.close()
		}
		c2 = openStream(t, base+"/events", false, "Last-Event-ID", first[0].ID)
		e.emit("data: after\n\n")
		select {
		case <-c2.eof:
			return false
		case <-time.After(500 * time.Millisecond):
		}
		for _, ev := range eventsOf(c2) {
			if ev.Data == "after" {
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no event after Redis came back: %q", c2.bytes())
	}
}

// Two nodes in one process: two handlers whose Redis brokers differ only
// in lease_ttl (so their hubs are not shared in memory) but name the same
// Redis stream. The second follows the first: one backend connection; a
// new client there gets the live stream, not the backlog as news; a
// client resuming there with an id handed out by the first node gets
// exactly what followed it, with the same ids.
func TestClusterFollowerInProcess(t *testing.T) {
	r := startTestRedis(t)
	e := newEmitter(t)
	node := func(path, ttl string) string {
		broker := map[string]any{"name": "redis", "address": "redis://" + r.Addr + "/0", "prefix": "inproc:", "lease_ttl": ttl}
		f := map[string]any{"padding": 0, "heartbeat": "1s", "fanout": map[string]any{"linger": 0, "key": "one", "broker": broker}}
		return route(path, sseHandler(f), proxyTo(e.addr))
	}
	base := startCaddy(t, node("/a", "3s"), node("/b", "4s"))
	a := openStream(t, base+"/a", false)
	e.waitJoined(t, 1)
	for i := 1; i <= 5; i++ {
		e.emit(fmt.Sprintf("data: %d\n\n", i))
	}
	evsA := waitEvents(t, a, 5)

	b := openStream(t, base+"/b", false)
	c := openStream(t, base+"/b", false, "Last-Event-ID", evsA[2].ID)
	// Both answered (the follower has the leader's response head) before
	// the next event, so neither can take it for backlog.
	waitHeader := func(cl *client) {
		if cl.Resp.StatusCode != 200 || cl.Resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("follower answered %s %q", cl.Resp.Status, cl.Resp.Header.Get("Content-Type"))
		}
	}
	waitHeader(b)
	waitHeader(c)
	e.emit("data: 6\n\n")
	evsA = waitEvents(t, a, 6)
	evsB := waitEvents(t, b, 1)
	evsC := waitEvents(t, c, 3)
	if got := datas(evsB); got != "6" || evsB[0].ID != evsA[5].ID {
		t.Fatalf("a new client of the follower got %q (%+v); want only the live event 6 with the leader's id %q", got, evsB, evsA[5].ID)
	}
	if got := datas(evsC); got != "4,5,6" || evsC[2].ID != evsA[5].ID {
		t.Fatalf("a client resuming on the follower after %q got %q (%+v)", evsA[2].ID, got, evsC)
	}
	if n := e.requests(); n != 1 {
		t.Fatalf("the backend got %d requests for one stream on two nodes", n)
	}
}

// metricCount is a counter's value, or a histogram's count of observations.
func metricCount(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		t.Fatal(err)
	}
	if h := out.GetHistogram(); h != nil {
		return float64(h.GetSampleCount())
	}
	return out.GetCounter().GetValue()
}

// Redis loses the stream's history (restarted without persistence; here
// FLUSHALL) and the new leader resumes the backend after an older id than
// the nodes following it had read (the last event's notification was lost
// with Redis): the new history starts with events the followers' windows
// hold already. Their clients get them once, not again after the reset
// event.
func TestClusterNewHistoryResentEventsOnce(t *testing.T) {
	r := startTestRedis(t)
	e := newEmitter(t)
	node := func(path, ttl string) string {
		broker := map[string]any{"name": "redis", "address": "redis://" + r.Addr + "/0", "prefix": "resent:", "lease_ttl": ttl}
		f := map[string]any{"padding": 0, "heartbeat": "1s", "fanout": map[string]any{"linger": 0, "key": "one", "broker": broker}}
		return route(path, sseHandler(f), proxyTo(e.addr))
	}
	base := startCaddy(t, node("/a", "3s"), node("/b", "4s"))
	a := openStream(t, base+"/a", false)
	e.waitJoined(t, 1)
	b := openStream(t, base+"/b", false)
	for i := 1; i <= 3; i++ {
		e.emit(fmt.Sprintf("id: %d\ndata: %d\n\n", i, i))
	}
	waitEvents(t, a, 3)
	waitEvents(t, b, 3)

	if _, err := r.Do("FLUSHALL"); err != nil {
		t.Fatal(err)
	}
	// The new leader, resuming the backend after id 2: it re-sends 3.
	leader := newTestRedisBroker(t, r.Addr, "resent:", 10*time.Second)
	ctx := context.Background()
	st, err := leader.Stream(ctx, "one", HistoryLimits{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	lease, ok, err := st.Lead(ctx)
	if err != nil || !ok {
		t.Fatalf("the stand-in leader did not get the lease: %v %v", ok, err)
	}
	for _, i := range []int{3, 4} {
		ev := StoredEvent{ID: fmt.Sprint(i), Data: []byte(fmt.Sprintf("id: %d\ndata: %d\n\n", i, i)), At: time.Now()}
		if _, err := st.Append(ctx, lease, ev); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*client{a, b} {
		c.waitFor(t, 10*time.Second, "event 4", func(b []byte) bool {
			evs, _, _ := parseEvents(b)
			return len(evs) > 0 && evs[len(evs)-1].Data == "4"
		})
		var got []string
		for _, ev := range eventsOf(c) {
			if ev.Type == "message" {
				got = append(got, ev.Data)
			}
		}
		if s := strings.Join(got, ","); s != "1,2,3,4" {
			t.Errorf("a client got %q (reset events left out); want 1,2,3,4: the events the new history re-sent were delivered again", s)
		}
	}
}
