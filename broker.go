package caddysse

// The broker boundary.
//
// A fan-out hub keeps two things apart. What every node serving a stream
// must agree on lives in a Broker: the stream's history (events in order,
// at positions), the index from event ids to positions, and who runs the
// upstream. What is this node's own stays on the hub: a window of recent
// events with the bytes its shared compressors made of them (event.z), the
// cursors of its clients into that window, its delivery loops and its
// heartbeats. The in-memory broker (broker_memory.go) is the default; a
// broker that fronts a shared store (Redis Streams) lets several Caddy
// nodes serve one stream with one upstream connection between them.
//
// Every call takes a context and may fail, since a broker may be remote;
// the hub never calls one under its lock. A hub calls Append from one
// goroutine at a time (its publish lock), in the order of the stream.

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"time"
)

// Position is where an event sits in a stream's history. Offsets count
// the events of an epoch from 1, without gaps; a new epoch means the
// history before it is gone (a new stream, a store that lost its data),
// so a position of another epoch can no longer be resumed from.
type Position struct {
	Epoch  string
	Offset uint64
}

// StoredEvent is one event of a stream's shared history.
type StoredEvent struct {
	Pos  Position
	ID   string    // the id clients see (the backend's or a synthesized one); "" for none
	Data []byte    // the bytes clients are sent; brokers keep the slice, they do not copy it
	At   time.Time // when it was appended, for the age bound
}

// HistoryLimits bound a stream's history; a zero field is no bound. The
// newest event is always kept.
type HistoryLimits struct {
	Events int
	Bytes  int
	Age    time.Duration
}

// Lease is the right to run a stream's upstream and append to its
// history. Token fences appends: a broker refuses an append whose token
// is not the current one (a node that lost its lease without noticing).
type Lease struct {
	Token uint64
}

// Broker is a fan-out history backend, a Caddy module in the
// http.handlers.sse.brokers namespace.
type Broker interface {
	// Stream opens the shared history of one stream key (the hub's pool
	// key, which includes the broker's config but not the hub settings:
	// a reload that changes them keeps the history).
	Stream(ctx context.Context, key string, limits HistoryLimits) (BrokerStream, error)
}

// BrokerStream is the shared history of one stream.
type BrokerStream interface {
	// Lead asks whether this node may run the upstream: ok with a lease
	// whose token fences its appends, or not ok while another node holds
	// it. The memory broker always says yes.
	Lead(ctx context.Context) (lease Lease, ok bool, err error)
	// Next is the position the next append will get. The leader names
	// synthesized ids after it (SynthesizedID), so that any node can map
	// such an id back to its position without a look-up.
	Next(ctx context.Context) (Position, error)
	// Append adds an event at the next position, fenced by lease, and
	// returns that position (ev.Pos is ignored).
	Append(ctx context.Context, lease Lease, ev StoredEvent) (Position, error)
	// Read appends to dst the events after pos, at most max of them (max
	// > 0). gapless is false when some of them are gone (evicted, or pos
	// is of another epoch): a reader at pos cannot get a gapless stream.
	Read(ctx context.Context, after Position, max int, dst []StoredEvent) (_ []StoredEvent, gapless bool, err error)
	// Find returns the position of the newest held event with this id.
	Find(ctx context.Context, id string) (pos Position, found bool, err error)
	// Notify returns a channel that is closed after the next append (by
	// this node or, with a shared store, any node); call it again after
	// it fired.
	Notify() <-chan struct{}
	// Close releases what the stream holds on this node (and the lease).
	Close() error
}

// ErrFenced is returned by Append when the lease is no longer current.
var ErrFenced = errors.New("sse: broker: lease lost; another node runs the upstream")

// SynthesizedID is the id the plugin gives an event at pos: its epoch and
// offset, so that any node can map it back (ParseSynthesizedID).
func SynthesizedID(pos Position) string {
	return pos.Epoch + "-" + strconv.FormatUint(pos.Offset, 36)
}

// ParseSynthesizedID is the position a synthesized id names; ok is false
// for any other id (the backend's own).
func ParseSynthesizedID(id string) (pos Position, ok bool) {
	i := strings.LastIndexByte(id, '-')
	if i <= 0 {
		return Position{}, false
	}
	off, err := strconv.ParseUint(id[i+1:], 36, 64)
	if err != nil || off == 0 {
		return Position{}, false
	}
	return Position{Epoch: id[:i], Offset: off}, true
}
