package caddysse

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// A fan-out client on plain HTTP/1.1 needs nothing of net/http once its
// header is sent: it only receives bytes the hub already has. Keeping it
// in net/http costs a handler goroutine (whose stack Caddy's chain grows to
// 16 KiB), a background reader, ~10 KiB of buffers and, per event, a
// goroutine wake-up, a deadline reset and a chunked write. So its
// connection is handed over: taken from net/http (Hijack) and written by
// the hub's delivery loops, a few goroutines for all of its clients, each
// write a single non-blocking syscall for everything due to that client.
// A write the socket cannot take at once is finished by a goroutine of its
// own (wireConn.drain), so that one slow reader never holds up the loop.
//
// The response stays chunked, one chunk per write, and only a clean end
// writes the last chunk: were it delimited by the end of the connection,
// a connection cut midway would look like a clean end, and clients that
// take a clean end as "done" (fetch-event-source) would never reconnect.
// Nor does it say "Connection: close": Node's HTTP client (undici, under
// fetch-event-source) takes the end of such a connection as the end of
// the response, chunked or not. The connection is closed after the
// stream all the same; a client that would reuse it finds it closed, as
// after any keep-alive timeout.
//
// HTTP/2 and HTTP/3 streams, TLS connections and HTTP/1.0 stay on their
// request goroutine (run).

// detach hands the client's connection over to the hub, after writing the
// header through the handlers that wrap this one (so their header changes
// and Caddy's access log see it). It reports false when the client must
// stay on its request goroutine: at once, or when the connection could not
// be taken over (then with the header already sent: c.headerSent).
func (c *fanoutClient) detach(w http.ResponseWriter, r *http.Request, status int, first []byte) bool {
	if r.ProtoMajor != 1 || r.ProtoMinor < 1 || r.TLS != nil {
		return false
	}
	hj, ok := innermost(w).(http.Hijacker)
	if !ok {
		return false
	}
	w.WriteHeader(status) // chunked: net/http frames the body of an HTTP/1.1 response of unknown length
	c.headerSent = true
	if err := http.NewResponseController(w).Flush(); err != nil {
		return true // the client is gone; nothing more to do
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		// The header is out: the stream goes on from here, chunked by net/http.
		c.pol.logger.Debug("could not take over a fan-out connection; serving it on its request", zap.Error(err))
		return false
	}
	c.detached = true
	// Deadlines net/http or Caddy set for the request no longer apply.
	_ = conn.SetDeadline(time.Time{})
	c.wc = newWireConn(conn, c.pol.writeTimeout, c.poke)
	c.wc.chunked = true // the header said so (net/http chose it, and wrote the header)
	c.out = clientConn{w: wireCounter{ResponseWriter: c.wc, n: &c.wire}, rc: http.NewResponseController(c.wc)}
	if err := c.ownEncoder(); err != nil {
		c.wc.abort()
		c.release()
		return true
	}
	if err := c.start(first); err != nil || c.wc.failed() != nil {
		c.wc.abort()
		c.release()
		return true
	}
	if c.pol.maxAge > 0 {
		c.maxAge = time.AfterFunc(c.maxAgeAfter(), func() { c.sub.end(endMaxAge) })
	}
	go c.watchPeer(conn, brw.Reader)
	c.hub.deliverTo(c)
	return true
}

// belowIdleTimeout returns the writer under Caddy's IdleTimeoutWriter in
// w's chain, or w when there is none. A fan-out client that stays on its
// request (HTTP/2, TLS) writes its stream's body there, once its header
// went through the whole chain: that writer resets the write deadline
// before and after every write and flush, which on HTTP/2 is a message to
// the connection's serve loop each time (~15% of such a client's CPU),
// while the client's own write_timeout is armed every half-timeout. What
// the wrappers between it and this handler no longer see are the body's
// bytes, as for a handed-over connection.
func belowIdleTimeout(ctx context.Context, w http.ResponseWriter) http.ResponseWriter {
	_, iw := caddyhttp.IdleTimeoutsFromContext(ctx)
	if iw == nil {
		return w
	}
	for x := w; ; {
		if x == http.ResponseWriter(iw) {
			return iw.Unwrap()
		}
		u, ok := x.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return w
		}
		x = u.Unwrap()
	}
}

// innermost unwraps w down to the writer of the server itself.
func innermost(w http.ResponseWriter) http.ResponseWriter {
	for {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return w
		}
		w = u.Unwrap()
	}
}

// watchPeer reads the detached connection until the client closes it, so
// that the client leaves its hub at once rather than at the next write.
// What a client sends after its request is read and ignored.
func (c *fanoutClient) watchPeer(conn net.Conn, buffered *bufio.Reader) {
	var buf [256]byte
	if buffered != nil && buffered.Buffered() > 0 {
		_, _ = buffered.Discard(buffered.Buffered())
	}
	for {
		_, err := conn.Read(buf[:])
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			// One the server left behind after the request (Caddy sets them
			// through the response it no longer owns): not the client's doing.
			_ = conn.SetReadDeadline(time.Time{})
		default:
			c.peerGone.Store(true)
			c.poke()
			return
		}
	}
}

// serveDetached is one turn of the delivery loop for one client. It
// returns done when the client's stream is over (clean only if finish
// wrote its end).
func (c *fanoutClient) serveDetached(batch []*event) (done bool, _ []*event) {
	if c.peerGone.Load() {
		return true, batch
	}
	if err := c.wc.failed(); err != nil {
		_ = c.writeFailed(err)
		return true, batch
	}
	ended := false
	select {
	case <-c.sub.ended:
		ended = true
	default:
	}
	if c.wc.draining() {
		// The client has not taken its last write yet: no more for now.
		// The drain is bounded by write_timeout; being behind is not being
		// slow (step), but a client whose next event left the cache is cut
		// like any other, so that write_timeout off cannot hold it forever.
		if ended {
			return true, batch
		}
		if lag, out := c.hub.fellOut(c.cursor); out {
			c.cutBehind(lag, true)
			return true, batch
		}
		return false, batch
	}
	if ended {
		_ = c.finish(c.sub.reason)
		return true, batch
	}
	_, done, batch = c.step(batch)
	return done, batch
}

// closeDetached ends a detached client's stream: the trailer of a
// compressed stream if it ended cleanly, then the connection (after what
// is still draining, if anything), and releases it.
func (c *fanoutClient) closeDetached() {
	if c.maxAge != nil {
		c.maxAge.Stop()
	}
	c.dl.Store(nil)
	if c.clean {
		c.endEncoding()
		c.wc.close()
	} else {
		c.wc.abort()
	}
	c.release()
}

// deliverer is one delivery loop of a hub: a goroutine that runs while it
// has clients, wakes when the hub publishes (or beats) or a client needs
// it, and gives each client its turn.
type deliverer struct {
	hub     *hub
	poked   chan struct{}
	mu      sync.Mutex
	clients []*fanoutClient
	running bool
	// Only the loop's goroutine uses these.
	turn  []*fanoutClient
	batch []*event
}

// deliverTo gives a detached client to the least busy delivery loop.
// There are as many loops as processors, so that writes to thousands of
// clients use them all.
func (hb *hub) deliverTo(c *fanoutClient) {
	var d *deliverer
	least := -1
	for _, x := range hb.deliverers() {
		x.mu.Lock()
		n := len(x.clients)
		x.mu.Unlock()
		if least < 0 || n < least {
			d, least = x, n
		}
	}
	c.dl.Store(d)
	d.mu.Lock()
	d.clients = append(d.clients, c)
	start := !d.running
	d.running = true
	d.mu.Unlock()
	if start {
		go d.run()
	} else {
		d.poke()
	}
}

// deliverers returns the hub's delivery loops, made at first use.
func (hb *hub) deliverers() []*deliverer {
	hb.dlOnce.Do(func() {
		hb.dl = make([]*deliverer, runtime.GOMAXPROCS(0))
		for i := range hb.dl {
			hb.dl[i] = &deliverer{hub: hb, poked: make(chan struct{}, 1)}
		}
	})
	return hb.dl
}

// handedOver counts the clients in the hub's delivery loops.
func (hb *hub) handedOver() int {
	n := 0
	for _, d := range hb.deliverers() {
		d.mu.Lock()
		n += len(d.clients)
		d.mu.Unlock()
	}
	return n
}

func (d *deliverer) poke() {
	select {
	case d.poked <- struct{}{}:
	default:
	}
}

// run gives every client a turn each time something happened, and ends
// when the loop has no client left.
func (d *deliverer) run() {
	hb := d.hub
	for {
		// Taken before the turns: whatever is published during them wakes
		// the next round.
		wake := hb.wakeChan()
		d.mu.Lock()
		d.turn = append(d.turn[:0], d.clients...)
		d.mu.Unlock()
		for _, c := range d.turn {
			var done bool
			done, d.batch = c.serveDetached(d.batch)
			if done {
				d.remove(c)
				c.closeDetached()
			}
		}
		clear(d.turn)
		d.mu.Lock()
		if len(d.clients) == 0 {
			d.running = false
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
		select {
		case <-wake:
		case <-d.poked:
		}
	}
}

func (d *deliverer) remove(c *fanoutClient) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, x := range d.clients {
		if x == c {
			last := len(d.clients) - 1
			d.clients[i] = d.clients[last]
			d.clients[last] = nil
			d.clients = d.clients[:last]
			return
		}
	}
}
