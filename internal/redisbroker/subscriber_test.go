package redisbroker

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func waitWake(t *testing.T, w *Watch, within time.Duration, what string) {
	t.Helper()
	select {
	case <-w.C():
	case <-time.After(within):
		t.Fatalf("no wake-up within %v: %s", within, what)
	}
}

func noWake(t *testing.T, w *Watch, what string) {
	t.Helper()
	select {
	case <-w.C():
		t.Fatalf("unexpected wake-up: %s", what)
	default:
	}
}

func numsub(ctx context.Context, c *redis.Client, ch string) int64 {
	m, err := c.PubSubNumSub(ctx, ch).Result()
	if err != nil {
		return -1
	}
	return m[ch]
}

func TestSubscriberWakes(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	c := r.client(t)
	b := New(c, Options{})
	sub := b.NewSubscriber()
	defer sub.Close()
	s, s2 := b.Stream("k"), b.Stream("k2")
	l, _, _ := s.Acquire(ctx)

	w := sub.Watch(ctx, s)
	waitWake(t, w, 2*time.Second, "subscription confirmed")
	if n := numsub(ctx, c, s.Channel()); n != 1 {
		t.Fatalf("NUMSUB %d", n)
	}
	other := sub.Watch(ctx, s2)
	waitWake(t, other, 2*time.Second, "second key subscribed")

	mustAppend(t, s, l, ev("", "1"))
	waitWake(t, w, 2*time.Second, "append noticed")
	noWake(t, other, "another key's append")

	// A second watcher of the key is woken at once (no confirmation comes)
	// and shares the subscription.
	w2 := sub.Watch(ctx, s)
	waitWake(t, w2, time.Second, "second watcher")
	w.Close()
	if n := numsub(ctx, c, s.Channel()); n != 1 {
		t.Fatalf("NUMSUB %d after one of two watchers left", n)
	}
	mustAppend(t, s, l, ev("", "2"))
	waitWake(t, w2, 2*time.Second, "append noticed by the remaining watcher")
	w2.Close()
	eventually(t, 2*time.Second, "last watcher unsubscribes", func() bool {
		return numsub(ctx, c, s.Channel()) == 0
	})
	other.Close()
}

// TestSubscriberNotDeafAfterRestart is the anti-"deaf node" rule: after
// Redis comes back, watchers are woken (to gap-fill) and later appends are
// noticed, with no action from the caller.
func TestSubscriberNotDeafAfterRestart(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	c := r.client(t)
	b := New(c, Options{})
	sub := b.NewSubscriber()
	defer sub.Close()
	s := b.Stream("k")
	w := sub.Watch(ctx, s)
	waitWake(t, w, 2*time.Second, "subscription confirmed")

	for round, down := range []time.Duration{0, 1500 * time.Millisecond} {
		r.Kill()
		time.Sleep(down) // Redis stays down a while: the subscriber backs off
		r.Start()
		waitWake(t, w, 5*time.Second, "wake-up after Redis came back")
		eventually(t, 5*time.Second, "resubscribed", func() bool {
			return numsub(ctx, c, s.Channel()) == 1
		})
		// Drain a wake from a confirmation that may race the check above.
		select {
		case <-w.C():
		default:
		}
		var l Lease
		eventually(t, 5*time.Second, "lease after restart", func() bool {
			var ok bool
			l, ok, _ = s.Acquire(ctx)
			return ok
		})
		mustAppend(t, s, l, ev("", "after restart"))
		waitWake(t, w, 2*time.Second, "append after restart noticed (round "+string(rune('0'+round))+")")
	}
}

func TestSubscriberWatchWhileDown(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	c := r.client(t)
	b := New(c, Options{})
	sub := b.NewSubscriber()
	defer sub.Close()
	s := b.Stream("k")
	r.Kill()
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	w := sub.Watch(wctx, s)
	cancel()
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Watch with Redis down took %v", d)
	}
	r.Start()
	waitWake(t, w, 5*time.Second, "subscribed once Redis is back")
	eventually(t, 5*time.Second, "subscribed", func() bool { return numsub(ctx, c, s.Channel()) == 1 })
	select {
	case <-w.C():
	default:
	}
	l, _, _ := s.Acquire(ctx)
	mustAppend(t, s, l, ev("", "x"))
	waitWake(t, w, 2*time.Second, "append noticed")
}

func TestSubscriberClose(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	c := r.client(t)
	sub := New(c, Options{}).NewSubscriber()
	w := sub.Watch(ctx, New(c, Options{}).Stream("k"))
	done := make(chan struct{})
	go func() { sub.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Close hangs")
	}
	w.Close() // after the subscriber: must not block or panic
	w3 := sub.Watch(ctx, New(c, Options{}).Stream("k3"))
	if _, open := <-w3.C(); open {
		t.Fatal("a watch on a closed subscriber is not closed")
	}
}

// blackhole is a TCP proxy to a target whose existing connections can be
// made to swallow all traffic without closing: a half-open connection, as
// when a NAT or firewall drops state, which gives the client no error.
type blackhole struct {
	Addr string
	l    net.Listener
	mu   sync.Mutex
	dead []*atomic.Bool
	all  []net.Conn
}

func startBlackhole(t *testing.T, target string) *blackhole {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &blackhole{Addr: l.Addr().String(), l: l}
	done := make(chan struct{})
	go func() { // accept loop; ends when the listener is closed
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			dead := new(atomic.Bool)
			p.mu.Lock()
			p.dead = append(p.dead, dead)
			p.all = append(p.all, c, u)
			p.mu.Unlock()
			// Each copier ends when either side is closed (Cleanup).
			go pump(c, u, dead)
			go pump(u, c, dead)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
		p.mu.Lock()
		for _, c := range p.all {
			c.Close()
		}
		p.mu.Unlock()
	})
	return p
}

func pump(dst, src net.Conn, dead *atomic.Bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		if !dead.Load() {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
	}
}

// swallow makes every connection open so far silent; new ones work.
func (p *blackhole) swallow() {
	p.mu.Lock()
	for _, d := range p.dead {
		d.Store(true)
	}
	p.mu.Unlock()
}

func TestSubscriberReplacesSilentConnection(t *testing.T) {
	r := startRedis(t, redisOpts{})
	ctx := testCtx(t)
	p := startBlackhole(t, r.Addr)
	c, err := NewClient("redis://" + p.Addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sub := New(c, Options{PingEvery: 200 * time.Millisecond}).NewSubscriber()
	defer sub.Close()
	direct := New(r.client(t), Options{}).Stream("k")
	w := sub.Watch(ctx, direct)
	waitWake(t, w, 2*time.Second, "subscription confirmed")

	p.swallow()
	waitWake(t, w, 3*time.Second, "wake-up when the silent connection is replaced")
	dc := r.client(t)
	eventually(t, 3*time.Second, "subscribed on a new connection", func() bool {
		return numsub(ctx, dc, direct.Channel()) >= 2 // the swallowed one lingers in Redis
	})
	l, _, _ := direct.Acquire(ctx)
	// Twice: a stray confirmation could answer the first wait, not both.
	for i := 0; i < 2; i++ {
		select {
		case <-w.C():
		default:
		}
		mustAppend(t, direct, l, ev("", "x"))
		waitWake(t, w, 2*time.Second, "append noticed on the new connection")
	}
}
