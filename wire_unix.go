//go:build unix

package caddysse

import (
	"errors"
	"net"
	"os"
	"syscall"
	"time"
)

// nonBlockingWriter returns a function that makes one write(2) on the
// connection's socket without waiting for it to become writable (Go keeps
// its sockets non-blocking), or nil for a connection that is no socket of
// its own (a TLS or PROXY-protocol wrapper): those are written by drains.
func nonBlockingWriter(conn net.Conn) func([]byte) (int, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return func(p []byte) (int, error) {
		var n int
		var errno error
		write := func(fd uintptr) bool {
			for {
				n, errno = syscall.Write(int(fd), p)
				if errno != syscall.EINTR {
					return true // done, whatever it gave: never wait here
				}
			}
		}
		err := raw.Write(write)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// A deadline the server left from the request: not ours.
			_ = conn.SetWriteDeadline(time.Time{})
			err = raw.Write(write)
		}
		switch {
		case err != nil:
			return 0, err
		case errno == syscall.EAGAIN:
			return 0, nil
		case errno != nil:
			return 0, errno
		}
		return n, nil
	}
}
