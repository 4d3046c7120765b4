package caddysse

import (
	"fmt"
	"testing"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"
)

func addEvents(m *memoryReplay, from, to int, size int, at time.Time) {
	for i := from; i <= to; i++ {
		id := ""
		if i%2 == 0 {
			id = fmt.Sprint("id", i)
		}
		m.add(&event{seq: uint64(i), id: id, data: make([]byte, size), at: at})
	}
}

func seqs(evs []*event) []uint64 {
	var s []uint64
	for _, e := range evs {
		s = append(s, e.seq)
	}
	return s
}

func TestReplayBoundsAndGaps(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, tc := range []struct {
		name   string
		limits replayLimits
		added  int
		held   int
	}{
		{"count", replayLimits{events: 5}, 12, 5},
		{"bytes", replayLimits{bytes: 35}, 12, 3}, // 10-byte events
		{"newest always kept", replayLimits{bytes: 5}, 12, 1},
		{"no bound", replayLimits{}, 12, 12},
	} {
		m := newMemoryReplay(tc.limits)
		m.now = func() time.Time { return now }
		addEvents(m, 1, tc.added, 10, now)
		if n, b := m.stats(); n != tc.held || b != 10*tc.held {
			t.Errorf("%s: holds %d events, %d bytes; want %d", tc.name, n, b, tc.held)
		}
		first := uint64(tc.added - tc.held + 1)
		got, ok := m.after(nil, first-1, 0)
		if !ok || len(got) != tc.held || got[0].seq != first {
			t.Errorf("%s: after(%d) = %v, %v", tc.name, first-1, seqs(got), ok)
		}
		if first > 1 {
			if _, ok := m.after(nil, first-2, 0); ok {
				t.Errorf("%s: a reader behind the evicted events was not told", tc.name)
			}
			if _, ok := m.find(fmt.Sprint("id", (first-1)&^1)); ok && (first-1)&^1 > 0 {
				t.Errorf("%s: an evicted id is still found", tc.name)
			}
		}
		if seq, ok := m.find(fmt.Sprint("id", tc.added&^1)); !ok || seq != uint64(tc.added&^1) {
			t.Errorf("%s: newest even id not found: %d %v", tc.name, seq, ok)
		}
	}
}

func TestReplayAgeAndBatch(t *testing.T) {
	now := time.Unix(1000, 0)
	m := newMemoryReplay(replayLimits{age: time.Minute})
	m.now = func() time.Time { return now }
	addEvents(m, 1, 4, 1, now.Add(-2*time.Minute))
	addEvents(m, 5, 8, 1, now)
	if n, _ := m.stats(); n != 4 {
		t.Fatalf("holds %d events; events older than the age bound were kept", n)
	}
	if _, ok := m.find("id4"); ok {
		t.Fatal("an expired id is still found")
	}
	got, ok := m.after(nil, 4, 2)
	if !ok || fmt.Sprint(seqs(got)) != "[5 6]" {
		t.Fatalf("after(4, max 2) = %v %v", seqs(got), ok)
	}
	if got, ok := m.after(nil, 8, 0); !ok || len(got) != 0 {
		t.Fatalf("after the newest: %v %v", seqs(got), ok)
	}
	// Time passes with no new event: the old ones expire on read too.
	now = now.Add(2 * time.Minute)
	if _, ok := m.find("id8"); ok {
		t.Fatal("id8 should have expired")
	}
}

// The ring must not keep the memory of evicted events alive.
func TestReplayDoesNotRetainEvicted(t *testing.T) {
	m := newMemoryReplay(replayLimits{events: 10})
	addEvents(m, 1, 100000, 1, time.Now())
	if c := cap(m.events); c > 1000 {
		t.Fatalf("backing array of %d slots for 10 events", c)
	}
}

func TestWithIDBeforeTheBlankLine(t *testing.T) {
	for in, want := range map[string]string{
		"data: x\n\n":        "data: x\nid: 7\n\n",
		"data: x\r\n\r\n":    "data: x\r\nid: 7\r\n\r\n",
		"data: x\r\n\r":      "data: x\r\nid: 7\r\n\r\n", // the LF comes with the next event
		"data: x\r\r":        "data: x\rid: 7\r\r",
		"data: x\r\n\n":      "data: x\r\nid: 7\r\n\n",
		"id: 1\ndata: x\n\n": "id: 1\ndata: x\nid: 7\n\n",
	} {
		got := string(sse.WithID([]byte(in), "7"))
		if got != want {
			t.Errorf("sse.WithID(%q) = %q, want %q", in, got, want)
		}
		if evs, _, _ := parseEvents([]byte(got)); len(evs) != 1 || evs[0].ID != "7" || evs[0].Data != "x" {
			t.Errorf("sse.WithID(%q) parses as %+v", in, evs)
		}
	}
}
