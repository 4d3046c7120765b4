package caddysse

import (
	"cmp"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// wireConn is the connection of a detached fan-out client (detach.go).
// What is written between two flushes is collected and sent by the flush
// in one non-blocking write. What the socket does not take at once is
// sent by a goroutine of its own, bounded by the write timeout, and
// whatever is flushed meanwhile queues behind it, so bytes always leave in
// order and the delivery loop never blocks on one client.
//
// With chunked set, each flush goes out as one HTTP/1.1 chunk, and only a
// clean end (close) writes the last, empty chunk: a connection cut before
// it (abort, a dropped connection) is then a truncated body to the client,
// not the end of the stream, so that clients that stop at a clean end
// (fetch-event-source) reconnect after a cut.
type wireConn struct {
	conn    net.Conn
	try     func(p []byte) (int, error) // one non-blocking write; nil when the connection has none
	timeout time.Duration
	drained func() // called when a drain finished
	chunked bool   // frame every flush as a chunk (set before the first write)
	buf     *[]byte

	mu       sync.Mutex
	queued   []byte // flushed while a drain was running, sent after it
	busy     bool
	err      error // a drain's failure
	closing  bool  // close once the drain is done
	isClosed bool
}

// wireBufs holds write buffers between flushes: a detached client holds
// none while it waits for the next event.
var wireBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// maxPooledBuf is the largest buffer put back in wireBufs.
const maxPooledBuf = 64 << 10

func putWireBuf(b *[]byte) {
	if cap(*b) <= maxPooledBuf {
		*b = (*b)[:0]
		wireBufs.Put(b)
	}
}

func newWireConn(conn net.Conn, timeout time.Duration, drained func()) *wireConn {
	return &wireConn{conn: conn, try: nonBlockingWriter(conn), timeout: timeout, drained: drained}
}

// Header and WriteHeader are never used: the header is already out.
func (w *wireConn) Header() http.Header { return http.Header{} }
func (w *wireConn) WriteHeader(int)     {}

// chunkRoom is the room kept before a flush's bytes for its chunk header:
// up to 8 hex digits of the size, and CRLF.
const chunkRoom = 10

// lastChunk ends a chunked body (no trailer).
var lastChunk = []byte("0\r\n\r\n")

// Write collects p for the next flush.
func (w *wireConn) Write(p []byte) (int, error) {
	if w.buf == nil {
		w.buf = wireBufs.Get().(*[]byte)
		if w.chunked {
			var room [chunkRoom]byte
			*w.buf = append(*w.buf, room[:]...)
		}
	}
	*w.buf = append(*w.buf, p...)
	return len(p), nil
}

// FlushError sends what was written, as one chunk if chunked: at once if
// the socket takes it, otherwise through a drain. Only the failure of this
// write is returned; a drain's failure is reported by failed.
func (w *wireConn) FlushError() error {
	b := w.buf
	if b == nil {
		return nil
	}
	w.buf = nil
	start := 0
	if w.chunked {
		size := len(*b) - chunkRoom
		if size == 0 {
			putWireBuf(b) // an empty chunk would end the body
			return nil
		}
		var hdr [chunkRoom]byte
		h := append(strconv.AppendUint(hdr[:0], uint64(size), 16), '\r', '\n')
		start = chunkRoom - len(h)
		copy((*b)[start:], h)
		*b = append(*b, '\r', '\n')
	}
	return w.send(b, start)
}

// send writes (*b)[start:] after what is already on its way, and gives b
// back to the pool once it is sent.
func (w *wireConn) send(b *[]byte, start int) error {
	p := (*b)[start:]
	w.mu.Lock()
	if w.busy {
		w.queued = append(w.queued, p...)
		w.mu.Unlock()
		putWireBuf(b)
		return nil
	}
	w.mu.Unlock()
	n := 0
	if w.try != nil {
		var err error
		if n, err = w.try(p); err != nil {
			putWireBuf(b)
			return err
		}
	}
	if n == len(p) {
		putWireBuf(b)
		return nil
	}
	w.mu.Lock()
	w.busy = true
	w.mu.Unlock()
	go w.drain(b, start+n)
	return nil
}

// drain sends the rest of a write the socket could not take at once, and
// what was flushed behind it, each write bounded by the write timeout.
func (w *wireConn) drain(b *[]byte, off int) {
	p := (*b)[off:]
	var err error
	for {
		if w.timeout > 0 {
			_ = w.conn.SetWriteDeadline(time.Now().Add(w.timeout))
		}
		_, err = w.conn.Write(p)
		w.mu.Lock()
		if err != nil || len(w.queued) == 0 {
			break // with the lock held
		}
		*b = append((*b)[:0], w.queued...)
		w.queued = w.queued[:0]
		p = *b
		w.mu.Unlock()
	}
	if w.timeout > 0 && err == nil {
		_ = w.conn.SetWriteDeadline(time.Time{})
	}
	putWireBuf(b)
	w.queued = nil
	w.busy = false
	w.err = err
	closing := w.closing
	w.mu.Unlock()
	if closing {
		w.abort()
		return
	}
	w.drained()
}

// draining reports whether a drain is running.
func (w *wireConn) draining() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.busy
}

// failed returns the failure of the last drain, if any.
func (w *wireConn) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// close ends the body (the last chunk, if chunked) and closes the
// connection once everything flushed has been sent, or when the write
// timeout (the default one if there is none) ran out.
func (w *wireConn) close() {
	if w.chunked {
		_ = w.FlushError() // anything written and not flushed
		b := wireBufs.Get().(*[]byte)
		*b = append(*b, lastChunk...)
		if err := w.send(b, 0); err != nil {
			w.abort()
			return
		}
	}
	w.mu.Lock()
	if w.busy {
		w.closing = true
		w.mu.Unlock()
		_ = w.conn.SetWriteDeadline(time.Now().Add(cmp.Or(w.timeout, defaultWriteTimeout)))
		return
	}
	w.mu.Unlock()
	w.abort()
}

// abort closes the connection now; a running drain fails.
func (w *wireConn) abort() {
	w.mu.Lock()
	closed := w.isClosed
	w.isClosed = true
	w.mu.Unlock()
	if w.buf != nil {
		putWireBuf(w.buf)
		w.buf = nil
	}
	if !closed {
		_ = w.conn.Close()
	}
}
