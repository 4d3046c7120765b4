package redisbroker

import (
	"context"
	"strings"
	"testing"
	"time"
)

// BenchmarkAppendNotify measures one fenced append of a ~200 B event until
// the node's subscriber wakes its watcher: the latency a follower node adds
// before it can gap-fill.
func BenchmarkAppendNotify(b *testing.B) {
	r := startRedis(b, redisOpts{})
	ctx := context.Background()
	br := New(r.client(b), Options{MaxEvents: 1000})
	sub := br.NewSubscriber()
	defer sub.Close()
	s := br.Stream("bench")
	l, _, err := s.Acquire(ctx)
	if err != nil {
		b.Fatal(err)
	}
	w := sub.Watch(ctx, s)
	defer w.Close()
	<-w.C() // subscription confirmed
	e := Event{Data: []byte("data: " + strings.Repeat("x", 192) + "\n\n")}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Append(ctx, l, e); err != nil {
			b.Fatal(err)
		}
		select {
		case <-w.C():
		case <-time.After(5 * time.Second):
			b.Fatal("no wake-up")
		}
	}
}

// BenchmarkRange100 measures reading 100 events of ~200 B after a position:
// a node joining a key, or a client resuming 100 events back.
func BenchmarkRange100(b *testing.B) {
	r := startRedis(b, redisOpts{})
	ctx := context.Background()
	br := New(r.client(b), Options{})
	s := br.Stream("bench")
	l, _, _ := s.Acquire(ctx)
	evs := make([]Event, 101)
	for i := range evs {
		evs[i] = Event{ID: "", Data: []byte("data: " + strings.Repeat("x", 192) + "\n\n")}
	}
	pos, err := s.Append(ctx, l, evs...)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		es, err := s.Range(ctx, pos[0], 100)
		if err != nil || len(es) != 100 {
			b.Fatal(len(es), err)
		}
	}
}
