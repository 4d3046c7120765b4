package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// emitter is the SSE backend behind the proxies: every connection gets the
// same live sequence of events at the same instant. Each event (or burst of
// events) is serialized once, already framed as an HTTP/1.1 chunk, into a
// frame that all connection writers share; publishing a frame costs one
// allocation and one channel close, whatever the number of connections.
//
// It speaks just enough HTTP/1.1 for a proxy: it reads the request head,
// answers 200 text/event-stream with chunked encoding, sends a comment so
// that headers reach the client at once, then only events. Connections
// start at the live edge (no replay).
type emitter struct {
	ln   net.Listener
	addr string

	mu     sync.Mutex
	ring   [][]byte // frames by publish number modulo len(ring)
	nFrame uint64   // frames published so far
	wake   chan struct{}
	conns  map[net.Conn]struct{}
	closed bool

	lastSeq  atomic.Uint64 // seq of the last event published
	accepted atomic.Int64  // upstream connections accepted (ever)
	open     atomic.Int64  // upstream connections currently streaming
	maxOpen  atomic.Int64
	lagged   atomic.Int64 // connections dropped for falling a whole ring behind
	wg       sync.WaitGroup
}

// emitterRing is how many frames a connection may fall behind before the
// emitter drops it (it then counts in lagged). At 100 events/s that is 40 s.
const emitterRing = 4096

var (
	emitterHead = []byte("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n")
	helloChunk  = chunk([]byte(": ssebench emitter\n\n"))
)

func startEmitter() (*emitter, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("emitter: %w", err)
	}
	e := &emitter{
		ln:    ln,
		addr:  ln.Addr().String(),
		ring:  make([][]byte, emitterRing),
		wake:  make(chan struct{}),
		conns: map[net.Conn]struct{}{},
	}
	e.wg.Add(1)
	goSafe(func() {
		defer e.wg.Done()
		e.acceptLoop()
	})
	return e, nil
}

func (e *emitter) acceptLoop() {
	for {
		c, err := e.ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return
		}
		e.mu.Lock()
		if e.closed {
			e.mu.Unlock()
			c.Close()
			return
		}
		e.conns[c] = struct{}{}
		e.mu.Unlock()
		e.accepted.Add(1)
		e.wg.Add(1)
		goSafe(func() {
			defer e.wg.Done()
			e.serve(c)
		})
	}
}

func (e *emitter) forget(c net.Conn) {
	c.Close()
	e.mu.Lock()
	delete(e.conns, c)
	e.mu.Unlock()
}

// serve handles one upstream connection: one request, then the stream
// until either side closes.
func (e *emitter) serve(c net.Conn) {
	defer e.forget(c)
	br := bufio.NewReaderSize(c, 1024)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := br.ReadSlice('\n')
	if err != nil {
		return
	}
	if !bytes.HasPrefix(line, []byte("GET ")) {
		c.Write([]byte("HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
		return
	}
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return
		}
		if len(bytes.TrimRight(line, "\r\n")) == 0 {
			break
		}
	}
	c.SetReadDeadline(time.Time{})

	// Start at the live edge, then send the head.
	e.mu.Lock()
	next := e.nFrame
	e.mu.Unlock()
	if _, err := c.Write(emitterHead); err != nil {
		return
	}
	if _, err := c.Write(helloChunk); err != nil {
		return
	}
	n := e.open.Add(1)
	defer e.open.Add(-1)
	for {
		m := e.maxOpen.Load()
		if n <= m || e.maxOpen.CompareAndSwap(m, n) {
			break
		}
	}

	// The peer never sends anything more; a read returning means it closed.
	gone := make(chan struct{})
	goSafe(func() {
		var b [64]byte
		for {
			if _, err := c.Read(b[:]); err != nil {
				close(gone)
				return
			}
		}
	})

	var pending [16][]byte
	for {
		frames, nx, wake, lagged := e.since(next, pending[:0])
		next = nx
		if lagged {
			e.lagged.Add(1)
			return
		}
		for _, f := range frames {
			if _, err := c.Write(f); err != nil {
				return
			}
		}
		if len(frames) == 0 {
			select {
			case <-wake:
			case <-gone:
				return
			}
		}
	}
}

// since appends to dst the frames published from number next on (at most
// cap(dst)), and returns the number to ask for next, the channel closed by
// the next publish, and whether next already fell out of the ring.
func (e *emitter) since(next uint64, dst [][]byte) ([][]byte, uint64, chan struct{}, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.nFrame-next > uint64(len(e.ring)) {
		return dst, next, e.wake, true
	}
	for next < e.nFrame && len(dst) < cap(dst) {
		dst = append(dst, e.ring[next%uint64(len(e.ring))])
		next++
	}
	return dst, next, e.wake, false
}

// publish hands one frame (already chunk-framed) to every connection.
func (e *emitter) publish(frame []byte, lastSeq uint64) {
	e.mu.Lock()
	e.ring[e.nFrame%uint64(len(e.ring))] = frame
	e.nFrame++
	close(e.wake)
	e.wake = make(chan struct{})
	e.lastSeq.Store(lastSeq)
	e.mu.Unlock()
}

// atomically calls f with the seq of the last event published, while no
// other event can be published.
func (e *emitter) atomically(f func(lastSeq uint64)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f(e.lastSeq.Load())
}

// chunk frames p as one HTTP/1.1 chunk.
func chunk(p []byte) []byte {
	b := make([]byte, 0, len(p)+12)
	b = strconv.AppendInt(b, int64(len(p)), 16)
	b = append(b, "\r\n"...)
	b = append(b, p...)
	return append(b, "\r\n"...)
}

// eventFrame builds the chunk for events first..first+k-1, all stamped now.
func eventFrame(first uint64, k int, size int) []byte {
	now := time.Now().UnixNano()
	body := make([]byte, 0, k*(size+40))
	for i := 0; i < k; i++ {
		body = appendEvent(body, first+uint64(i), now, size)
	}
	return chunk(body)
}

// run publishes events until stop is closed: every interval, a frame of
// perTick events (1 normally, K in burst mode). An interval of 0 publishes
// nothing (idle mode).
func (e *emitter) run(stop <-chan struct{}, interval time.Duration, perTick int, size int) {
	if interval <= 0 {
		<-stop
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	seq := e.lastSeq.Load()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		f := eventFrame(seq+1, perTick, size)
		seq += uint64(perTick)
		e.publish(f, seq)
	}
}

// closeConns drops every upstream connection (between proxies, so that a
// proxy that did not close its upstreams does not cost the next one CPU).
func (e *emitter) closeConns() {
	e.mu.Lock()
	for c := range e.conns {
		c.Close()
	}
	e.mu.Unlock()
}

// waitIdle waits until no upstream connection is open, up to d.
func (e *emitter) waitIdle(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		e.mu.Lock()
		n := len(e.conns)
		e.mu.Unlock()
		if n == 0 {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func (e *emitter) close() {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	e.ln.Close()
	e.closeConns()
	e.wg.Wait()
}
