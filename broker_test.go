package caddysse

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// testBrokerContract checks what the hub relies on of any Broker: run it
// with a constructor of the implementation under test (each call a fresh
// broker with nothing stored).
func testBrokerContract(t *testing.T, newBroker func(t *testing.T) Broker) {
	ctx := context.Background()
	open := func(t *testing.T, key string, limits HistoryLimits) BrokerStream {
		t.Helper()
		s, err := newBroker(t).Stream(ctx, key, limits)
		if err != nil {
			t.Fatalf("Stream: %v", err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	lead := func(t *testing.T, s BrokerStream) Lease {
		t.Helper()
		lease, ok, err := s.Lead(ctx)
		if err != nil || !ok {
			t.Fatalf("Lead on a fresh stream: ok %v, err %v", ok, err)
		}
		return lease
	}
	appendN := func(t *testing.T, s BrokerStream, lease Lease, from, to int) []Position {
		t.Helper()
		var list []Position
		for i := from; i <= to; i++ {
			next, err := s.Next(ctx)
			if err != nil {
				t.Fatalf("Next: %v", err)
			}
			pos, err := s.Append(ctx, lease, StoredEvent{ID: fmt.Sprint("id", i), Data: []byte(fmt.Sprintf("data: %d\n\n", i)), At: time.Now()})
			if err != nil {
				t.Fatalf("Append %d: %v", i, err)
			}
			if pos != next {
				t.Fatalf("Append %d at %+v; Next announced %+v", i, pos, next)
			}
			list = append(list, pos)
		}
		return list
	}

	t.Run("positions are gapless within an epoch", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		pos := appendN(t, s, lead(t, s), 1, 5)
		for i, p := range pos {
			if p.Epoch == "" || p.Epoch != pos[0].Epoch || p.Offset != pos[0].Offset+uint64(i) {
				t.Fatalf("positions %+v: not one epoch with consecutive offsets", pos)
			}
		}
	})

	t.Run("read after a position, bounded", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		pos := appendN(t, s, lead(t, s), 1, 5)
		evs, gapless, err := s.Read(ctx, pos[1], 2, nil)
		if err != nil || !gapless || len(evs) != 2 {
			t.Fatalf("Read after the 2nd, max 2: %d events, gapless %v, err %v", len(evs), gapless, err)
		}
		if evs[0].Pos != pos[2] || evs[0].ID != "id3" || string(evs[0].Data) != "data: 3\n\n" || evs[1].Pos != pos[3] {
			t.Fatalf("Read returned %+v", evs)
		}
		evs, gapless, err = s.Read(ctx, pos[4], 10, nil)
		if err != nil || !gapless || len(evs) != 0 {
			t.Fatalf("Read after the newest: %d events, gapless %v, err %v", len(evs), gapless, err)
		}
	})

	t.Run("find an id", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		pos := appendN(t, s, lead(t, s), 1, 3)
		if p, found, err := s.Find(ctx, "id2"); err != nil || !found || p != pos[1] {
			t.Fatalf("Find(id2) = %+v %v %v, want %+v", p, found, err, pos[1])
		}
		if _, found, err := s.Find(ctx, "nope"); err != nil || found {
			t.Fatalf("Find of an unknown id: found %v, err %v", found, err)
		}
	})

	t.Run("eviction is a gap, and evicted ids are gone", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{Events: 3})
		pos := appendN(t, s, lead(t, s), 1, 6)
		if _, gapless, err := s.Read(ctx, pos[0], 10, nil); err != nil || gapless {
			t.Fatalf("Read after an evicted event: gapless %v, err %v", gapless, err)
		}
		if evs, gapless, err := s.Read(ctx, pos[2], 10, nil); err != nil || !gapless || len(evs) != 3 {
			t.Fatalf("Read after the oldest held one: %d events, gapless %v, err %v", len(evs), gapless, err)
		}
		if _, found, _ := s.Find(ctx, "id1"); found {
			t.Fatal("an evicted id is still found")
		}
	})

	t.Run("another epoch is a gap", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		pos := appendN(t, s, lead(t, s), 1, 2)
		old := Position{Epoch: pos[0].Epoch + "x", Offset: 1}
		if _, gapless, err := s.Read(ctx, old, 10, nil); err != nil || gapless {
			t.Fatalf("Read after another epoch's position: gapless %v, err %v", gapless, err)
		}
	})

	t.Run("notify fires after an append", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		lease := lead(t, s)
		wake := s.Notify()
		select {
		case <-wake:
			t.Fatal("Notify fired before any append")
		default:
		}
		appendN(t, s, lease, 1, 1)
		select {
		case <-wake:
		case <-time.After(5 * time.Second):
			t.Fatal("Notify did not fire within 5s of an append")
		}
	})

	t.Run("a foreign lease is fenced", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		lease := lead(t, s)
		_, err := s.Append(ctx, Lease{Token: lease.Token + 1000}, StoredEvent{Data: []byte("data: x\n\n"), At: time.Now()})
		if !errors.Is(err, ErrFenced) {
			t.Fatalf("Append with a stale token: %v, want ErrFenced", err)
		}
	})

	t.Run("a done context fails every call", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		lease := lead(t, s)
		done, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := s.Append(done, lease, StoredEvent{Data: []byte("data: x\n\n")}); err == nil {
			t.Error("Append with a done context succeeded")
		}
		if _, _, err := s.Read(done, Position{}, 1, nil); err == nil {
			t.Error("Read with a done context succeeded")
		}
		if _, _, err := s.Find(done, "x"); err == nil {
			t.Error("Find with a done context succeeded")
		}
		if _, err := s.Next(done); err == nil {
			t.Error("Next with a done context succeeded")
		}
	})

	t.Run("synthesized ids map back to their position", func(t *testing.T) {
		s := open(t, "k", HistoryLimits{})
		pos := appendN(t, s, lead(t, s), 1, 40)
		for _, p := range pos {
			if got, ok := ParseSynthesizedID(SynthesizedID(p)); !ok || got != p {
				t.Fatalf("ParseSynthesizedID(SynthesizedID(%+v)) = %+v %v", p, got, ok)
			}
		}
	})
}
