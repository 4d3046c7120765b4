package redisbroker

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Subscriber turns the append notifications of the keys this node watches
// into wake-ups, over one Pub/Sub connection. See the package doc for why
// every (re)subscription also wakes.
type Subscriber struct {
	b *Broker

	// subMu serializes changes of the Redis subscriptions (network calls)
	// so that a Subscribe and an Unsubscribe of one channel reach Redis in
	// the order the watchers came and went. Taken before mu.
	subMu sync.Mutex
	ps    *redis.PubSub // replaced only by run, under subMu

	mu       sync.Mutex
	watchers map[string]map[*Watch]struct{} // channel -> watchers
	closed   bool

	cancel    context.CancelFunc
	done      chan struct{}
	pingEvery time.Duration // Options.PingEvery
}

// Watch is one watcher's wake-up channel.
type Watch struct {
	s       *Subscriber
	channel string
	c       chan struct{}
}

// C receives a value (coalesced, never blocks the sender) whenever the stream
// may have new entries: after an append, and after the subscription was
// (re)established, when notifications may have been missed. The reader then
// calls Range from its position.
func (w *Watch) C() <-chan struct{} { return w.c }

func (w *Watch) wake() {
	select {
	case w.c <- struct{}{}:
	default:
	}
}

// NewSubscriber starts the node's subscriber; Close stops it.
func (b *Broker) NewSubscriber() *Subscriber {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Subscriber{
		b:         b,
		ps:        b.client.Subscribe(ctx),
		watchers:  make(map[string]map[*Watch]struct{}),
		cancel:    cancel,
		done:      make(chan struct{}),
		pingEvery: b.opts.PingEvery,
	}
	go s.run(ctx)
	return s
}

// Watch starts watching a stream. The first watcher of a key subscribes its
// channel; if Redis is unreachable the subscription is made when the
// connection comes back, and the watcher is woken then. The returned watch is
// also woken once the subscription is confirmed.
func (s *Subscriber) Watch(ctx context.Context, st *Stream) *Watch {
	w := &Watch{s: s, channel: st.channel, c: make(chan struct{}, 1)}
	s.subMu.Lock()
	defer s.subMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		close(w.c) // a closed subscriber wakes forever: the reader finds out on its next call
		return w
	}
	set := s.watchers[w.channel]
	first := set == nil
	if first {
		set = make(map[*Watch]struct{})
		s.watchers[w.channel] = set
	}
	set[w] = struct{}{}
	s.mu.Unlock()
	if first {
		// An error leaves the channel recorded in go-redis, which
		// subscribes it on the next (re)connection.
		_ = s.ps.Subscribe(ctx, w.channel)
	} else {
		w.wake() // the channel is already subscribed: no confirmation will come
	}
	return w
}

// Close stops watching; the last watcher of a key unsubscribes its channel.
func (w *Watch) Close() {
	s := w.s
	s.subMu.Lock()
	defer s.subMu.Unlock()
	s.mu.Lock()
	set := s.watchers[w.channel]
	_, had := set[w]
	delete(set, w)
	last := had && len(set) == 0
	if last {
		delete(s.watchers, w.channel)
	}
	closed := s.closed
	s.mu.Unlock()
	if last && !closed {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = s.ps.Unsubscribe(ctx, w.channel)
		cancel()
	}
}

// Close stops the subscriber and waits for its goroutine.
func (s *Subscriber) Close() {
	s.subMu.Lock()
	s.mu.Lock()
	already := s.closed
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	if !already {
		_ = s.ps.Close() // unblocks run's receive
	}
	s.subMu.Unlock()
	<-s.done
}

func (s *Subscriber) wakeChannel(ch string) {
	s.mu.Lock()
	for w := range s.watchers[ch] {
		w.wake()
	}
	s.mu.Unlock()
}

func (s *Subscriber) wakeAll() {
	s.mu.Lock()
	for _, set := range s.watchers {
		for w := range set {
			w.wake()
		}
	}
	s.mu.Unlock()
}

// run receives from the Pub/Sub connection until Close. go-redis reconnects
// and resubscribes by itself after errors; the confirmations of those
// subscriptions wake the watchers. A connection that stops answering pings
// (a half-open TCP connection gives no error) is replaced here.
func (s *Subscriber) run(ctx context.Context) {
	defer close(s.done)
	ps := s.ps
	lastHeard := time.Now()
	pinged := false
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		msg, err := ps.ReceiveTimeout(ctx, s.pingEvery)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if time.Since(lastHeard) > 3*s.pingEvery {
					ps = s.replace(ctx)
					lastHeard, pinged = time.Now(), false
					continue
				}
				if !pinged {
					pctx, cancel := context.WithTimeout(ctx, s.pingEvery)
					_ = ps.Ping(pctx)
					cancel()
					pinged = true
				}
				continue
			}
			// Redis is unreachable: go-redis redials on the next receive.
			// Pause so that a dead Redis is not dialled in a busy loop.
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			lastHeard = time.Now()
			continue
		}
		backoff = 50 * time.Millisecond
		lastHeard, pinged = time.Now(), false
		switch m := msg.(type) {
		case *redis.Message:
			s.wakeChannel(m.Channel)
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				s.wakeChannel(m.Channel)
			}
		}
	}
}

// replace closes the silent connection and opens a new one subscribed to
// every watched channel; everyone is woken, as notifications may be lost.
func (s *Subscriber) replace(ctx context.Context) *redis.PubSub {
	s.subMu.Lock()
	defer s.subMu.Unlock()
	if ctx.Err() != nil {
		return s.ps // closing; run exits
	}
	_ = s.ps.Close()
	s.mu.Lock()
	chans := make([]string, 0, len(s.watchers))
	for ch := range s.watchers {
		chans = append(chans, ch)
	}
	s.mu.Unlock()
	s.ps = s.b.client.Subscribe(ctx, chans...)
	s.wakeAll()
	return s.ps
}
