package caddysse

import (
	"context"
	"sync"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(new(MemoryBroker))
}

// MemoryBroker keeps each stream's history in this process's memory: the
// default broker. One node, so it always grants the lease; its history
// lives as long as the hub (which a reload keeps), and a restart begins a
// new epoch. It stores the bytes it is given, without copying them.
type MemoryBroker struct{}

// CaddyModule returns the Caddy module information.
func (*MemoryBroker) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse.brokers.memory",
		New: func() caddy.Module { return new(MemoryBroker) },
	}
}

// Stream opens a new history: in memory, nothing is shared to find again.
func (*MemoryBroker) Stream(ctx context.Context, _ string, limits HistoryLimits) (BrokerStream, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return newMemoryStream(limits), nil
}

// memoryStream is one stream's history in memory: the events (as *event
// with seq the offset, no compressed bytes) and their id index, in a
// memoryReplay.
type memoryStream struct {
	mu    sync.Mutex
	epoch string
	last  uint64 // offset of the last append
	buf   *memoryReplay
	wake  chan struct{} // closed at the next append; made by Notify, nil when nobody waits
}

// memoryLease is the one lease of a memory stream.
const memoryLease = 1

func newMemoryStream(limits HistoryLimits) *memoryStream {
	return &memoryStream{
		epoch: newEpoch(),
		buf:   newMemoryReplay(replayLimits{events: limits.Events, bytes: limits.Bytes, age: limits.Age}),
	}
}

func (m *memoryStream) Lead(ctx context.Context) (Lease, bool, error) {
	if err := ctx.Err(); err != nil {
		return Lease{}, false, err
	}
	return Lease{Token: memoryLease}, true, nil
}

func (m *memoryStream) Next(ctx context.Context) (Position, error) {
	if err := ctx.Err(); err != nil {
		return Position{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return Position{Epoch: m.epoch, Offset: m.last + 1}, nil
}

func (m *memoryStream) Append(ctx context.Context, lease Lease, ev StoredEvent) (Position, error) {
	if err := ctx.Err(); err != nil {
		return Position{}, err
	}
	if lease.Token != memoryLease {
		return Position{}, ErrFenced
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.last++
	m.buf.add(&event{seq: m.last, id: ev.ID, data: ev.Data, at: ev.At})
	if m.wake != nil { // made only when asked for: the hub that appends does not wait
		close(m.wake)
		m.wake = nil
	}
	return Position{Epoch: m.epoch, Offset: m.last}, nil
}

func (m *memoryStream) Read(ctx context.Context, after Position, max int, dst []StoredEvent) ([]StoredEvent, bool, error) {
	if err := ctx.Err(); err != nil {
		return dst, false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if after.Epoch != m.epoch && after != (Position{}) {
		return dst, false, nil // another epoch's position: its history is gone
	}
	evs, gapless := m.buf.after(nil, after.Offset, max)
	for _, ev := range evs {
		dst = append(dst, StoredEvent{Pos: Position{Epoch: m.epoch, Offset: ev.seq}, ID: ev.id, Data: ev.data, At: ev.at})
	}
	return dst, gapless, nil
}

func (m *memoryStream) Find(ctx context.Context, id string) (Position, bool, error) {
	if err := ctx.Err(); err != nil {
		return Position{}, false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	seq, ok := m.buf.find(id)
	if !ok {
		return Position{}, false, nil
	}
	return Position{Epoch: m.epoch, Offset: seq}, true, nil
}

func (m *memoryStream) Notify() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.wake == nil {
		m.wake = make(chan struct{})
	}
	return m.wake
}

func (m *memoryStream) Close() error { return nil }

// setLimits bounds the history anew (a reload changed the buffer).
func (m *memoryStream) setLimits(limits HistoryLimits) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.buf.limits = replayLimits{events: limits.Events, bytes: limits.Bytes, age: limits.Age}
	m.buf.evict()
}

// Interface guards
var (
	_ Broker       = (*MemoryBroker)(nil)
	_ BrokerStream = (*memoryStream)(nil)
)
