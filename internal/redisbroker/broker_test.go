package redisbroker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// newTest starts a redis-server and returns a broker on it and a stream
// whose lease the test holds.
func newTest(t *testing.T, ropts redisOpts, opts Options) (*redisProc, *redis.Client, *Broker, *Stream, Lease) {
	t.Helper()
	r := startRedis(t, ropts)
	c := r.client(t)
	b := New(c, opts)
	s := b.Stream("chat/1")
	l, ok, err := s.Acquire(testCtx(t))
	if err != nil || !ok {
		t.Fatalf("acquire: ok=%v err=%v", ok, err)
	}
	return r, c, b, s, l
}

func ev(id, data string) Event { return Event{ID: id, Data: []byte(data)} }

func mustAppend(t *testing.T, s *Stream, l Lease, evs ...Event) []Position {
	t.Helper()
	pos, err := s.Append(testCtx(t), l, evs...)
	if err != nil {
		t.Fatalf("append: %v", err)
	}
	return pos
}

func datas(es []Entry) string {
	var b []string
	for _, e := range es {
		b = append(b, fmt.Sprintf("%d:%s:%s", e.Pos.Offset, e.ID, e.Data))
	}
	return strings.Join(b, " ")
}

func TestAppendRangeFind(t *testing.T) {
	_, _, _, s, l := newTest(t, redisOpts{}, Options{})
	ctx := testCtx(t)
	pos := mustAppend(t, s, l, ev("a", "data: 1\n\n"), ev("b", "data: 2\n\n"), ev("", "data: 3\n\n"))
	ep := pos[0].Epoch
	if ep == "" || pos[0] != (Position{ep, 1}) || pos[2] != (Position{ep, 3}) {
		t.Fatalf("positions %v", pos)
	}
	es, err := s.Range(ctx, Position{ep, 0}, 10)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := datas(es), "1:a:data: 1\n\n 2:b:data: 2\n\n 3::data: 3\n\n"; got != want {
		t.Fatalf("range: %q, want %q", got, want)
	}
	for _, e := range es {
		if e.Pos.Epoch != ep || time.Since(e.Time) > time.Minute {
			t.Fatalf("entry %+v", e)
		}
	}
	es, err = s.Range(ctx, Position{ep, 1}, 1)
	if err != nil || datas(es) != "2:b:data: 2\n\n" {
		t.Fatalf("range after 1 max 1: %q %v", datas(es), err)
	}
	es, err = s.Range(ctx, Position{ep, 3}, 10)
	if err != nil || len(es) != 0 {
		t.Fatalf("range at head: %v %v", es, err)
	}
	p, ok, err := s.Find(ctx, "b")
	if err != nil || !ok || p != (Position{ep, 2}) {
		t.Fatalf("find b: %v %v %v", p, ok, err)
	}
	if _, ok, err := s.Find(ctx, "nope"); ok || err != nil {
		t.Fatalf("find nope: %v %v", ok, err)
	}
	h, err := s.Head(ctx)
	if err != nil || h != (Position{ep, 3}) {
		t.Fatalf("head %v %v", h, err)
	}
	if _, err := s.Range(ctx, Position{ep, 4}, 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range after a future offset: %v, want ErrHistoryLost", err)
	}
	if _, err := s.Range(ctx, Position{"other", 1}, 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range in another epoch: %v, want ErrHistoryLost", err)
	}
	// Binary data survives Lua and back.
	bin := string([]byte{0, 1, 2, 0xff, '\n'})
	mustAppend(t, s, l, ev("bin", bin))
	es, err = s.Range(ctx, Position{ep, 3}, 10)
	if err != nil || len(es) != 1 || string(es[0].Data) != bin {
		t.Fatalf("binary: %v %v", es, err)
	}
}

func TestGaplessOffsetsAndBatch(t *testing.T) {
	_, c, _, s, l := newTest(t, redisOpts{}, Options{})
	ctx := testCtx(t)
	// The first run of a script is EVALSHA, NOSCRIPT, then EVAL: warm up.
	mustAppend(t, s, l, ev("id1", "x"))
	want := uint64(1)
	for i := 0; i < 30; i++ {
		n := 1 + i%4
		evs := make([]Event, n)
		for j := range evs {
			evs[j] = ev("id"+strconv.Itoa(int(want)+j+1), "x")
		}
		calls := evalCalls(t, c)
		pos := mustAppend(t, s, l, evs...)
		if got := evalCalls(t, c) - calls; got != 1 {
			t.Fatalf("batch of %d took %d script calls, want 1", n, got)
		}
		for j, p := range pos {
			want++
			if p.Offset != want {
				t.Fatalf("batch %d event %d at offset %d, want %d", i, j, p.Offset, want)
			}
		}
	}
	ids, err := c.XRange(ctx, s.log, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	if uint64(len(ids)) != want {
		t.Fatalf("log holds %d entries, want %d", len(ids), want)
	}
	for i, m := range ids {
		if m.ID != strconv.Itoa(i+1)+"-0" {
			t.Fatalf("entry %d has id %s", i, m.ID)
		}
	}
	ep := ids[0].Values["e"]
	es, err := s.Range(ctx, Position{ep.(string), 0}, 1000)
	if err != nil || uint64(len(es)) != want {
		t.Fatalf("range all: %d %v", len(es), err)
	}
}

// evalCalls counts script executions (EVAL + EVALSHA) so far.
func evalCalls(t *testing.T, c *redis.Client) int {
	t.Helper()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(info, "\n") {
		if strings.HasPrefix(line, "cmdstat_evalsha:calls=") || strings.HasPrefix(line, "cmdstat_eval:calls=") {
			v, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(line, "cmdstat_evalsha:calls="), "cmdstat_eval:calls="), ",")
			x, _ := strconv.Atoi(v)
			n += x
		}
	}
	return n
}

func TestFencing(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	opts := Options{LeaseTTL: 300 * time.Millisecond}
	a := New(r.client(t), opts).Stream("k")
	b := New(r.client(t), opts).Stream("k")
	la, ok, err := a.Acquire(ctx)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	mustAppend(t, a, la, ev("1", "one"))
	if _, ok, _ := b.Acquire(ctx); ok {
		t.Fatal("B acquired a held lease")
	}
	// A pauses past its TTL (no renewal); B takes over.
	var lb Lease
	eventually(t, 3*time.Second, "B acquires the expired lease", func() bool {
		lb, ok, err = b.Acquire(ctx)
		return err == nil && ok
	})
	if lb.Token <= la.Token {
		t.Fatalf("B's token %d not above A's %d", lb.Token, la.Token)
	}
	before, _ := a.Head(ctx)
	if _, err := a.Append(ctx, la, ev("2", "stale")); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("stale append: %v, want ErrNotLeader", err)
	}
	after, _ := a.Head(ctx)
	if before != after {
		t.Fatalf("stale append moved head %v -> %v", before, after)
	}
	if _, ok, _ := a.Find(ctx, "2"); ok {
		t.Fatal("stale append indexed its id")
	}
	if _, err := a.Renew(ctx, la); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("stale renew: %v", err)
	}
	if err := a.Release(ctx, la); err != nil {
		t.Fatal(err)
	}
	// A's release of a lease it lost must not free B's.
	pos := mustAppend(t, b, lb, ev("2", "two"))
	if pos[0].Offset != 2 {
		t.Fatalf("B appended at %v", pos)
	}
	es, err := b.Range(ctx, Position{pos[0].Epoch, 0}, 10)
	if err != nil || datas(es) != "1:1:one 2:2:two" {
		t.Fatalf("log %q %v", datas(es), err)
	}
}

func TestRenewRelease(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	opts := Options{LeaseTTL: time.Second}
	a := New(r.client(t), opts).Stream("k")
	b := New(r.client(t), opts).Stream("k")
	la, ok, err := a.Acquire(ctx)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	held, ok, _ := b.Acquire(ctx)
	if ok || held.Token != la.Token {
		t.Fatalf("B: ok=%v holder token %d, want %d", ok, held.Token, la.Token)
	}
	if _, err := a.Append(ctx, held, ev("", "x")); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("append with the holder's description, not its lease: %v", err)
	}
	// Renewing keeps it past its first TTL.
	for i := 0; i < 4; i++ {
		time.Sleep(400 * time.Millisecond)
		if la, err = a.Renew(ctx, la); err != nil {
			t.Fatalf("renew %d: %v", i, err)
		}
	}
	if _, ok, _ := b.Acquire(ctx); ok {
		t.Fatal("B acquired a renewed lease")
	}
	// Release hands over at once.
	if err := a.Release(ctx, la); err != nil {
		t.Fatal(err)
	}
	lb, ok, err := b.Acquire(ctx)
	if err != nil || !ok {
		t.Fatalf("B after release: %v %v", ok, err)
	}
	if _, err := a.Renew(ctx, la); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("renew after release: %v", err)
	}
	if lb.Token != la.Token+1 {
		t.Fatalf("tokens %d then %d", la.Token, lb.Token)
	}
}

func TestKeeper(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	opts := Options{LeaseTTL: 300 * time.Millisecond}
	c := r.client(t)
	a := New(c, opts).Stream("k")
	b := New(r.client(t), opts).Stream("k")
	la, _, _ := a.Acquire(ctx)
	k := a.Keep(ctx, la)
	// Held across several TTLs.
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if _, ok, _ := b.Acquire(ctx); ok {
			t.Fatal("B acquired a kept lease")
		}
	}
	select {
	case <-k.Lost():
		t.Fatal("keeper reported loss of a held lease")
	default:
	}
	k.Stop()
	if _, ok, _ := b.Acquire(ctx); !ok {
		t.Fatal("Stop did not release the lease")
	}

	// Loss: another holder takes the key (as after an expiry during a pause).
	c.Del(ctx, b.lease)
	la, _, _ = a.Acquire(ctx)
	k = a.Keep(ctx, la)
	c.Set(ctx, a.lease, "999:someone", 0)
	select {
	case <-k.Lost():
	case <-time.After(2 * time.Second):
		t.Fatal("keeper did not report the lost lease")
	}
	<-k.Done()
	if v, _ := c.Get(ctx, a.lease).Result(); v != "999:someone" {
		t.Fatalf("keeper touched the new holder's lease: %q", v)
	}

	// Loss while Redis is down: reported once the lease's TTL has passed.
	c.Del(ctx, a.lease)
	la, _, _ = a.Acquire(ctx)
	k = a.Keep(ctx, la)
	r.Kill()
	select {
	case <-k.Lost():
	case <-time.After(3 * time.Second):
		t.Fatal("keeper did not report loss with Redis down")
	}
	<-k.Done()
}

func TestEpochChangeAfterFlushAll(t *testing.T) {
	_, c, _, s, l := newTest(t, redisOpts{}, Options{})
	ctx := testCtx(t)
	old := mustAppend(t, s, l, ev("a", "1"), ev("b", "2"))
	if err := c.FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Range(ctx, old[0], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range after flush: %v, want ErrHistoryLost", err)
	}
	if _, ok, _ := s.Find(ctx, "a"); ok {
		t.Fatal("found an id of the lost history")
	}
	l, ok, err := s.Acquire(ctx) // the lease went with the data
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	pos := mustAppend(t, s, l, ev("c", "3"))
	if pos[0].Epoch == old[0].Epoch || pos[0].Offset != 1 {
		t.Fatalf("after flush appended at %v (old epoch %s)", pos[0], old[0].Epoch)
	}
	// The old position stays lost even though offset 1 exists again.
	if _, err := s.Range(ctx, old[0], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("old position after re-append: %v", err)
	}
}

func TestRestartWithoutPersistence(t *testing.T) {
	r, _, _, s, l := newTest(t, redisOpts{}, Options{})
	ctx := testCtx(t)
	old := mustAppend(t, s, l, ev("a", "1"))
	r.Restart()
	var err error
	eventually(t, 5*time.Second, "range answers after restart", func() bool {
		_, err = s.Range(ctx, Position{old[0].Epoch, 0}, 10)
		return errors.Is(err, ErrHistoryLost)
	})
	h, err := s.Head(ctx)
	if err != nil || h.Epoch == old[0].Epoch || h.Offset != 0 {
		t.Fatalf("head after restart %v %v", h, err)
	}
	if _, err := s.Append(ctx, l, ev("b", "2")); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("append on the lost lease: %v", err)
	}
}

func TestRestartWithPersistence(t *testing.T) {
	r, _, _, s, l := newTest(t, redisOpts{Persist: true}, Options{})
	ctx := testCtx(t)
	old := mustAppend(t, s, l, ev("a", "1"), ev("b", "2"))
	r.Kill() // appendfsync always: even SIGKILL keeps acknowledged appends
	r.Start()
	var es []Entry
	var err error
	eventually(t, 5*time.Second, "range answers after restart", func() bool {
		es, err = s.Range(ctx, Position{old[0].Epoch, 0}, 10)
		return err == nil
	})
	if datas(es) != "1:a:1 2:b:2" {
		t.Fatalf("after restart: %q", datas(es))
	}
	if p, ok, _ := s.Find(ctx, "b"); !ok || p != old[1] {
		t.Fatalf("find after restart: %v %v", p, ok)
	}
	pos := mustAppend(t, s, l, ev("c", "3")) // the lease survived too
	if pos[0] != (Position{old[0].Epoch, 3}) {
		t.Fatalf("append after restart at %v", pos[0])
	}
}

func TestLostLogOrMeta(t *testing.T) {
	_, c, _, s, l := newTest(t, redisOpts{}, Options{})
	ctx := testCtx(t)
	p := mustAppend(t, s, l, ev("a", "1"), ev("b", "2"), ev("c", "3"))
	ep := p[0].Epoch

	// The log is lost, the meta kept: offsets go on, old positions are lost.
	c.Del(ctx, s.log)
	if _, err := s.Range(ctx, p[0], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range with the log lost: %v", err)
	}
	q := mustAppend(t, s, l, ev("d", "4"))
	if q[0] != (Position{ep, 4}) {
		t.Fatalf("append after log loss at %v", q[0])
	}
	if _, err := s.Range(ctx, p[0], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range across the lost part: %v", err)
	}
	if es, err := s.Range(ctx, p[2], 10); err != nil || datas(es) != "4:d:4" {
		t.Fatalf("range after 3: %q %v", datas(es), err)
	}
	if _, ok, _ := s.Find(ctx, "a"); ok {
		t.Fatal("index kept ids of the lost log")
	}

	// The meta is lost, the log kept: a new epoch, the old log is dead.
	c.Del(ctx, s.meta)
	h, err := s.Head(ctx)
	if err != nil || h.Epoch == ep || h.Offset != 0 {
		t.Fatalf("head after meta loss: %v %v", h, err)
	}
	if es, err := s.Range(ctx, Position{}, 10); err != nil || len(es) != 0 {
		t.Fatalf("backlog of the new epoch shows the dead log: %q %v", datas(es), err)
	}
	if _, err := s.Range(ctx, q[0], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("old epoch position: %v", err)
	}
	if p, ok, _ := s.Find(ctx, "d"); ok {
		if _, err := s.Range(ctx, p, 10); !errors.Is(err, ErrHistoryLost) {
			t.Fatalf("an id of the dead log resumes: %v %v", p, err)
		}
	}
	r := mustAppend(t, s, l, ev("e", "5"))
	if r[0] != (Position{h.Epoch, 1}) {
		t.Fatalf("first append of the new epoch at %v (head said %v)", r[0], h)
	}
	if n := c.XLen(ctx, s.log).Val(); n != 1 {
		t.Fatalf("log holds %d entries, want only the new one", n)
	}
	if _, ok, _ := s.Find(ctx, "d"); ok {
		t.Fatal("index kept ids of the dead log")
	}
}

func TestTrimEvents(t *testing.T) {
	_, c, _, s, l := newTest(t, redisOpts{}, Options{MaxEvents: 5})
	ctx := testCtx(t)
	var p []Position
	for i := 1; i <= 20; i++ {
		p = append(p, mustAppend(t, s, l, ev("id"+strconv.Itoa(i), strconv.Itoa(i)))...)
	}
	mustAppend(t, s, l, ev("", "21"), ev("", "22"), ev("", "23")) // a batch trims too
	if n := c.XLen(ctx, s.log).Val(); n != 5 {
		t.Fatalf("log holds %d, want 5", n)
	}
	if n := c.HLen(ctx, s.ids).Val(); n != 2 {
		t.Fatalf("id index holds %d, want 2 (ids 19, 20)", n)
	}
	if _, err := s.Range(ctx, p[16], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range after trimmed 17: %v", err)
	}
	es, err := s.Range(ctx, p[17], 10)
	if err != nil || datas(es) != "19:id19:19 20:id20:20 21::21 22::22 23::23" {
		t.Fatalf("range after 18: %q %v", datas(es), err)
	}
	if _, ok, _ := s.Find(ctx, "id3"); ok {
		t.Fatal("found a trimmed id")
	}
}

func TestTrimBytes(t *testing.T) {
	_, c, _, s, l := newTest(t, redisOpts{}, Options{MaxBytes: 100})
	ctx := testCtx(t)
	for i := 0; i < 10; i++ {
		mustAppend(t, s, l, ev(strconv.Itoa(i), strings.Repeat("x", 30)))
	}
	if n := c.XLen(ctx, s.log).Val(); n != 3 {
		t.Fatalf("log holds %d events of 30 B, want 3 under 100 B", n)
	}
	if b := c.HGet(ctx, s.meta, "bytes").Val(); b != "90" {
		t.Fatalf("bytes %s, want 90", b)
	}
	// One event over the bound alone stays: the newest is always kept.
	mustAppend(t, s, l, ev("big", strings.Repeat("y", 500)))
	if n := c.XLen(ctx, s.log).Val(); n != 1 {
		t.Fatalf("log holds %d, want 1", n)
	}
	if n := c.HLen(ctx, s.ids).Val(); n != 1 {
		t.Fatalf("id index holds %d, want 1", n)
	}
}

func TestMaxAgeOnRead(t *testing.T) {
	var mu sync.Mutex
	now := time.UnixMilli(1_800_000_000_000)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	set := func(t time.Time) { mu.Lock(); now = t; mu.Unlock() }
	t0 := clock()
	_, _, _, s, l := newTest(t, redisOpts{}, Options{MaxAge: 2500 * time.Millisecond, Now: clock})
	ctx := testCtx(t)
	var p []Position
	for i := 0; i < 5; i++ {
		set(t0.Add(time.Duration(i) * time.Second))
		p = append(p, mustAppend(t, s, l, ev(strconv.Itoa(i+1), strconv.Itoa(i+1)))...)
	}
	set(t0.Add(5 * time.Second)) // entries 1-3 (t0..t0+2s) are older than 2.5 s
	if _, err := s.Range(ctx, p[1], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range whose next entry is too old: %v", err)
	}
	if es, err := s.Range(ctx, p[2], 10); err != nil || datas(es) != "4:4:4 5:5:5" {
		t.Fatalf("range after 3: %q %v", datas(es), err)
	}
	if es, err := s.Range(ctx, Position{}, 10); err != nil || datas(es) != "4:4:4 5:5:5" {
		t.Fatalf("backlog: %q %v", datas(es), err)
	}
	set(t0.Add(time.Hour)) // the newest stays readable however old
	if es, err := s.Range(ctx, p[3], 10); err != nil || datas(es) != "5:5:5" {
		t.Fatalf("newest after an hour: %q %v", datas(es), err)
	}
}

func TestKeyExpiry(t *testing.T) {
	_, c, _, s, l := newTest(t, redisOpts{}, Options{KeyTTL: 400 * time.Millisecond})
	ctx := testCtx(t)
	p := mustAppend(t, s, l, ev("a", "1"))
	for _, k := range []string{s.meta, s.log, s.ids} {
		if d := c.PTTL(ctx, k).Val(); d <= 0 || d > 400*time.Millisecond {
			t.Fatalf("%s has TTL %v", k, d)
		}
	}
	// Appends refresh the TTL: keep appending past it.
	for i := 0; i < 4; i++ {
		time.Sleep(200 * time.Millisecond)
		if _, err := s.Renew(ctx, l); err != nil {
			t.Fatal(err)
		}
		mustAppend(t, s, l, ev("", "x"))
	}
	if c.Exists(ctx, s.meta, s.log).Val() != 2 {
		t.Fatal("keys expired while appends went on")
	}
	eventually(t, 3*time.Second, "idle keys expire", func() bool {
		return c.Exists(ctx, s.meta, s.log, s.ids).Val() == 0
	})
	if _, err := s.Range(ctx, p[0], 10); !errors.Is(err, ErrHistoryLost) {
		t.Fatalf("range after expiry: %v", err)
	}
}

func TestRedisDownFailsPromptly(t *testing.T) {
	r, _, b, s, l := newTest(t, redisOpts{}, Options{})
	p := mustAppend(t, s, l, ev("a", "1"))
	r.Kill()
	calls := map[string]func(ctx context.Context) error{
		"append":  func(ctx context.Context) error { _, err := s.Append(ctx, l, ev("", "x")); return err },
		"range":   func(ctx context.Context) error { _, err := s.Range(ctx, p[0], 10); return err },
		"find":    func(ctx context.Context) error { _, _, err := s.Find(ctx, "a"); return err },
		"head":    func(ctx context.Context) error { _, err := s.Head(ctx); return err },
		"acquire": func(ctx context.Context) error { _, _, err := b.Stream("x").Acquire(ctx); return err },
	}
	for name, call := range calls {
		start := time.Now()
		err := call(context.Background()) // no deadline from the caller
		if err == nil || errors.Is(err, ErrHistoryLost) {
			t.Fatalf("%s with Redis down: %v", name, err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("%s took %v to fail", name, d)
		}
	}
}

// TestClusterClient runs the scripts, the MULTI read and Pub/Sub through a
// ClusterClient against a Redis Cluster node: every key of a stream must
// hash to one slot (else CROSSSLOT errors).
func TestClusterClient(t *testing.T) {
	r := startRedis(t, redisOpts{Cluster: true})
	ctx := testCtx(t)
	c := NewUniversalClient(&redis.UniversalOptions{Addrs: []string{r.Addr}, IsClusterMode: true})
	defer c.Close()
	if _, ok := c.(*redis.ClusterClient); !ok {
		t.Fatalf("got a %T", c)
	}
	b := New(c, Options{MaxEvents: 3})
	sub := b.NewSubscriber()
	defer sub.Close()
	for _, key := range []string{"chat/1", "", "a}b{c"} {
		s := b.Stream(key)
		w := sub.Watch(ctx, s)
		waitWake(t, w, 2*time.Second, "subscribed")
		l, ok, err := s.Acquire(ctx)
		if err != nil || !ok {
			t.Fatalf("%q: acquire %v %v", key, ok, err)
		}
		var p []Position
		for i := 0; i < 5; i++ {
			p = append(p, mustAppend(t, s, l, ev(strconv.Itoa(i), strconv.Itoa(i)))...)
		}
		waitWake(t, w, 2*time.Second, "append noticed")
		es, err := s.Range(ctx, p[1], 10)
		if err != nil || datas(es) != "3:2:2 4:3:3 5:4:4" {
			t.Fatalf("%q: range %q %v", key, datas(es), err)
		}
		if q, ok, err := s.Find(ctx, "3"); err != nil || !ok || q != p[3] {
			t.Fatalf("%q: find %v %v %v", key, q, ok, err)
		}
		if _, err := s.Renew(ctx, l); err != nil {
			t.Fatal(err)
		}
		if err := s.Release(ctx, l); err != nil {
			t.Fatal(err)
		}
		w.Close()
	}
}

// TestContextDeadline: a caller's deadline shorter than the read timeout
// ends a call to a Redis that stopped answering.
func TestContextDeadline(t *testing.T) {
	r := startRedis(t, redisOpts{})
	p := startBlackhole(t, r.Addr)
	c, err := NewClient("redis://" + p.Addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := New(c, Options{}).Stream("k")
	if _, err := s.Head(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	p.swallow()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = s.Head(ctx)
	if d := time.Since(start); err == nil || d > 700*time.Millisecond {
		t.Fatalf("head on a silent Redis: %v after %v", err, d)
	}
}

// The leader's response head: fenced like an append, readable by anyone,
// and kept alive by the leader's renewals past KeyTTL (a quiet stream must
// not lose it); a refused Acquire says when the holder's lease runs out;
// a Release wakes the stream's watchers.
func TestResponseHeadAndHandover(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	opts := Options{LeaseTTL: 600 * time.Millisecond, KeyTTL: 800 * time.Millisecond}
	ba := New(r.client(t), opts)
	a := ba.Stream("k")
	b := New(r.client(t), opts).Stream("k")
	la, ok, err := a.Acquire(ctx)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	if _, ok, err := b.Response(ctx); err != nil || ok {
		t.Fatalf("response before any: %v %v", ok, err)
	}
	if err := a.SetResponse(ctx, la, []byte("head")); err != nil {
		t.Fatal(err)
	}
	if err := b.SetResponse(ctx, Lease{}, []byte("other")); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("SetResponse without the lease: %v", err)
	}
	held, ok, _ := b.Acquire(ctx)
	if ok || held.Expires.IsZero() || time.Until(held.Expires) > opts.LeaseTTL {
		t.Fatalf("refused Acquire: ok %v, holder's lease runs out in %v", ok, time.Until(held.Expires))
	}
	k := a.Keep(context.Background(), la)
	time.Sleep(2 * opts.KeyTTL) // past KeyTTL: only the renewals keep the head
	if data, ok, err := b.Response(ctx); err != nil || !ok || string(data) != "head" {
		t.Fatalf("response after KeyTTL with the leader renewing: %q %v %v", data, ok, err)
	}
	sub := ba.NewSubscriber()
	defer sub.Close()
	w := sub.Watch(ctx, b)
	defer w.Close()
	select { // the subscription's confirmation
	case <-w.C():
	case <-time.After(5 * time.Second):
		t.Fatal("no wake-up for the subscription")
	}
	k.Stop() // releases
	select {
	case <-w.C():
	case <-time.After(5 * time.Second):
		t.Fatal("a release did not wake the stream's watchers")
	}
	if _, ok, err := b.Acquire(ctx); err != nil || !ok {
		t.Fatalf("Acquire after the release: %v %v", ok, err)
	}
}
