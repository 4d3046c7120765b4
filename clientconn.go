package caddysse

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// prepareStreamHeader turns off buffering and caching for a stream.
func prepareStreamHeader(hdr http.Header, protoMajor int) {
	hdr.Del("Content-Length")
	cc := hdr.Get("Cache-Control")
	switch {
	case cc == "":
		hdr.Set("Cache-Control", "no-cache, no-transform")
	case !strings.Contains(strings.ToLower(cc), "no-transform"):
		hdr.Set("Cache-Control", cc+", no-transform")
	}
	hdr.Set("X-Accel-Buffering", "no")
	// RFC 10036: intermediaries that know the Incremental field forward the
	// response as it comes instead of buffering it (Caddy 2.11 does).
	hdr.Set("Incremental", "?1")
	if protoMajor >= 2 {
		for _, h := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"} {
			hdr.Del(h)
		}
	}
}

// clientConn writes to one client. It bounds every write by the write
// timeout and flushes through http.ResponseController, so it works behind
// any wrapping middleware that keeps Unwrap.
type clientConn struct {
	w        http.ResponseWriter
	rc       *http.ResponseController
	timeout  time.Duration
	deadline time.Time // write deadline now set on the connection
	enc      encoder   // compresses what is written, or nil (compress.go)
}

func newClientConn(w http.ResponseWriter, timeout time.Duration) clientConn {
	rc := http.NewResponseController(w)
	// A stream never ends, so the server's own read and write timeouts
	// would cut it; each write gets its own deadline instead.
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	return clientConn{w: w, rc: rc, timeout: timeout}
}

// liftServerTimeouts frees a stream from the server's read_timeout,
// write_timeout and minimum rates. Caddy's idle-timeout wrappers keep them
// as a ceiling under any deadline a handler sets, so every stream would
// end read_timeout or write_timeout after it began (and a trickle of
// events never keeps up a minimum rate). Their idle timeouts, which bound
// each read and write, stay; so does the plugin's own write_timeout.
// Called once the response is known to be a stream, before its first
// write.
func liftServerTimeouts(ctx context.Context) {
	reader, writer := caddyhttp.IdleTimeoutsFromContext(ctx)
	if reader != nil {
		reader.Deadline.HardDeadline = time.Time{}
		reader.Deadline.MinRate = 0
	}
	if writer != nil {
		writer.Deadline.HardDeadline = time.Time{}
		writer.Deadline.MinRate = 0
	}
}

// arm makes sure the next write has at least half the write timeout left,
// without touching the connection's deadline on every write.
func (c *clientConn) arm(now time.Time) error {
	if c.timeout <= 0 || c.deadline.Sub(now) >= c.timeout/2 {
		return nil
	}
	c.deadline = now.Add(c.timeout)
	err := c.rc.SetWriteDeadline(c.deadline)
	if errors.Is(err, http.ErrNotSupported) {
		c.timeout = 0 // no deadline support (a test recorder); nothing to arm
		return nil
	}
	return err
}

// write writes p to the client without flushing it, so that a backlog of
// events can go out with one flush.
func (c *clientConn) write(now time.Time, p []byte) error {
	if err := c.arm(now); err != nil {
		return err
	}
	if c.enc != nil {
		_, err := c.enc.Write(p)
		return err
	}
	_, err := c.w.Write(p)
	return err
}

// flush pushes everything written (and the header) to the client; a
// compressed stream gets one sync flush of its encoder.
func (c *clientConn) flush() error {
	if c.enc != nil {
		if err := c.enc.Flush(); err != nil {
			return err
		}
	}
	return c.rc.Flush()
}

// writeFlush writes p (if any) and flushes.
func (c *clientConn) writeFlush(now time.Time, p []byte) error {
	if len(p) > 0 {
		if err := c.write(now, p); err != nil {
			return err
		}
	} else if err := c.arm(now); err != nil {
		return err
	}
	return c.flush()
}

// isWriteTimeout reports whether a failed write failed for want of the
// client reading within the write timeout: the connection reports a
// timeout (HTTP/1, a handed-over connection), or the write failed once
// its deadline had passed (HTTP/2 resets the stream instead).
func (c *clientConn) isWriteTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) ||
		(c.timeout > 0 && !c.deadline.IsZero() && !time.Now().Before(c.deadline))
}
