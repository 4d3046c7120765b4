package caddysse

import "time"

// memoryReplay holds the latest complete events of one stream, bounded by
// count, bytes and age, in this process's memory. It serves twice:
//
//   - as a hub's window (newWindow): this node's recent events with the
//     bytes its shared compressors made of them, which every client's queue
//     is (a client is a cursor into it). No id index: ids are the broker's.
//   - as the memory broker's history (newMemoryReplay, broker_memory.go),
//     with an index from id to seq.
//
// The memory broker keeps the same data slices the window does: an event's
// bytes exist once.

// event is one complete event of a fan-out stream, serialized once: every
// client's queue shares the same bytes.
type event struct {
	seq  uint64    // position in the hub's window (or the broker's offset), from 1, without gaps
	id   string    // the id clients see (the backend's or a synthesized one); "" for none
	data []byte    // the bytes every client is sent
	at   time.Time // when the hub received it, for the age bound
	z    *eventZ   // data as the hub's shared compressors encoded it (compress_shared.go), or nil
}

// replayLimits bound a memoryReplay; a zero field is no bound.
type replayLimits struct {
	events int
	bytes  int
	age    time.Duration
}

// memoryReplay is a queue of events, and an index from id to seq unless
// it is a window.
type memoryReplay struct {
	limits replayLimits
	now    func() time.Time
	events []*event // oldest first; events[0].seq is the oldest held
	bytes  int
	byID   map[string]uint64 // nil for a window
}

func newMemoryReplay(limits replayLimits) *memoryReplay {
	return &memoryReplay{limits: limits, now: time.Now, byID: make(map[string]uint64)}
}

// newWindow is a hub's window: no id index.
func newWindow(limits replayLimits) *memoryReplay {
	return &memoryReplay{limits: limits, now: time.Now}
}

func (m *memoryReplay) add(ev *event) {
	m.events = append(m.events, ev)
	m.bytes += len(ev.data)
	if ev.id != "" && m.byID != nil {
		m.byID[ev.id] = ev.seq
	}
	m.evict()
}

// evict drops the oldest events beyond the bounds; the newest event always
// stays, so live clients can still be handed it.
func (m *memoryReplay) evict() {
	drop := 0
	var oldest time.Time
	if m.limits.age > 0 {
		oldest = m.now().Add(-m.limits.age)
	}
	for n := len(m.events); drop < n-1; drop++ {
		ev := m.events[drop]
		held := n - drop
		if (m.limits.events > 0 && held > m.limits.events) ||
			(m.limits.bytes > 0 && m.bytes > m.limits.bytes) ||
			(!oldest.IsZero() && ev.at.Before(oldest)) {
			m.bytes -= len(ev.data)
			if ev.id != "" && m.byID != nil && m.byID[ev.id] == ev.seq {
				delete(m.byID, ev.id)
			}
			m.events[drop] = nil
			continue
		}
		break
	}
	if drop == 0 {
		return
	}
	m.events = m.events[drop:]
	// Reslicing from the front leaks the array's head; copy into a fresh
	// array once the dead part is as large as the live one.
	if cap(m.events) > 2*len(m.events)+64 {
		m.events = append(make([]*event, 0, 2*len(m.events)+16), m.events...)
	}
}

func (m *memoryReplay) after(dst []*event, seq uint64, max int) ([]*event, bool) {
	if m.limits.age > 0 {
		m.evict()
	}
	if len(m.events) == 0 {
		return dst, true
	}
	first := m.events[0].seq
	if seq+1 < first {
		return dst, false
	}
	i := int(seq + 1 - first)
	if i >= len(m.events) {
		return dst, true
	}
	end := len(m.events)
	if max > 0 && end-i > max {
		end = i + max
	}
	return append(dst, m.events[i:end]...), true
}

func (m *memoryReplay) find(id string) (uint64, bool) {
	seq, ok := m.byID[id]
	if !ok {
		return 0, false
	}
	return seq, m.held(seq)
}

// held reports whether a replay may start after seq: the event is held
// and, under an age bound, not expired (the newest event outlives the age
// bound for live readers, not for a replay).
func (m *memoryReplay) held(seq uint64) bool {
	if m.limits.age > 0 {
		m.evict()
	}
	if len(m.events) == 0 || seq < m.events[0].seq || seq > m.events[len(m.events)-1].seq {
		return false
	}
	return m.limits.age <= 0 || !m.events[seq-m.events[0].seq].at.Before(m.now().Add(-m.limits.age))
}

func (m *memoryReplay) stats() (int, int) {
	return len(m.events), m.bytes
}
