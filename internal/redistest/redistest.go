// Package redistest starts a throwaway redis-server for a test: on a
// loopback port of its own, with its data and log in the test's temp dir,
// killed when the test ends. It is the one copy the tests of every package
// (the plugin's, internal/redisbroker's, e2e/cluster's) share, so that how
// a test Redis is started, restarted and told apart from a missing one is
// decided in one place.
//
// It talks to the server in raw RESP, without a client library, so that
// the helper tests nothing but the server.
package redistest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Options choose how a test's redis-server runs.
type Options struct {
	// Persist turns on appendonly with fsync always: a restart (or even
	// SIGKILL) keeps everything written. Without it a restart starts empty.
	Persist bool
	// Cluster makes it a one-node Redis Cluster owning all 16384 slots.
	Cluster bool
}

// Server is a redis-server owned by one test.
type Server struct {
	// Addr is host:port on 127.0.0.1; it stays the same over restarts.
	Addr string

	t    testing.TB
	dir  string
	opts Options
	cmd  *exec.Cmd
	exit chan struct{} // closed once cmd has been waited for
}

// Require skips t when redis-server is not installed, or fails it when
// SSE_REQUIRE_REDIS=1 (CI), where a missing Redis must not pass quietly.
func Require(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("SSE_REQUIRE_REDIS") == "1" {
			t.Fatalf("redis-server not found and SSE_REQUIRE_REDIS=1: %v", err)
		}
		t.Skip("redis-server not installed (apt-get install redis-server)")
	}
}

// Start starts a redis-server for t (see Require for when there is none)
// and waits until it answers; it is killed when t ends, and when t fails
// the end of its log is logged.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	Require(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := &Server{t: t, Addr: addr, dir: t.TempDir(), opts: opts}
	s.Start()
	t.Cleanup(s.Kill)
	t.Cleanup(func() { // runs before Kill: cleanups run last-in first-out
		if t.Failed() {
			t.Logf("redis-server's log ends with:\n%s", tail(s.logPath(), 20))
		}
	})
	return s
}

func (s *Server) logPath() string { return filepath.Join(s.dir, "redis.log") }

// Start runs redis-server (again) on the same port and dir, and waits
// until it answers PING (and, in cluster mode, until the cluster is ok).
func (s *Server) Start() {
	s.t.Helper()
	_, port, _ := net.SplitHostPort(s.Addr)
	args := []string{"--port", port, "--bind", "127.0.0.1", "--dir", s.dir,
		"--save", "", "--daemonize", "no", "--protected-mode", "no", "--logfile", ""}
	if s.opts.Persist {
		args = append(args, "--appendonly", "yes", "--appendfsync", "always")
	} else {
		args = append(args, "--appendonly", "no")
	}
	if s.opts.Cluster {
		args = append(args, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
	}
	out, err := os.OpenFile(s.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	cmd := exec.Command("redis-server", args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		out.Close()
		s.t.Fatalf("start redis-server: %v", err)
	}
	exit := make(chan struct{})
	go func() { _ = cmd.Wait(); out.Close(); close(exit) }()
	s.cmd, s.exit = cmd, exit
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := s.Do("PING"); err == nil {
			if s.opts.Cluster {
				s.clusterReady(deadline)
			}
			return
		}
		select {
		case <-exit:
			s.t.Fatalf("redis-server exited at start:\n%s", tail(s.logPath(), 20))
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server on %s not answering after 10 s", s.Addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// clusterReady gives the node every slot (once; nodes.conf keeps them over
// restarts) and waits for cluster_state:ok.
func (s *Server) clusterReady(deadline time.Time) {
	s.t.Helper()
	for {
		info, err := s.Do("CLUSTER", "INFO")
		if err == nil && strings.Contains(info, "cluster_state:ok") {
			return
		}
		if err == nil && strings.Contains(info, "cluster_slots_assigned:0") {
			if _, err := s.Do("CLUSTER", "ADDSLOTSRANGE", "0", "16383"); err != nil {
				s.t.Fatalf("cluster addslots: %v", err)
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("cluster on %s not ok: %v %s", s.Addr, err, info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill ends redis-server with SIGKILL (nothing more is written) and waits.
func (s *Server) Kill() { s.end(syscall.SIGKILL, 0) }

// Stop ends redis-server with SIGTERM (it flushes its AOF) and waits up to
// 10 s before it kills it.
func (s *Server) Stop() { s.end(syscall.SIGTERM, 10*time.Second) }

// Restart stops redis-server (SIGTERM) and starts it again on the same
// port and dir.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.Start()
}

// end sends sig and waits up to grace, then SIGKILLs and waits.
func (s *Server) end(sig syscall.Signal, grace time.Duration) {
	if s.cmd == nil {
		return
	}
	signal(s.cmd, sig)
	select {
	case <-s.exit:
	case <-time.After(grace):
		signal(s.cmd, syscall.SIGKILL)
		<-s.exit
	}
	s.cmd = nil
}

// Do sends one command over a fresh connection and returns the reply's
// first line, or for a bulk string its payload ("" for a nil one). An
// error reply is an error.
func (s *Server) Do(args ...string) (string, error) {
	c, err := net.DialTimeout("tcp", s.Addr, 200*time.Millisecond)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	var b bytes.Buffer
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write(b.Bytes()); err != nil {
		return "", err
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	switch {
	case strings.HasPrefix(line, "-"):
		return "", fmt.Errorf("redis: %s", line[1:])
	case strings.HasPrefix(line, "$"):
		var n int
		fmt.Sscanf(line[1:], "%d", &n)
		if n < 0 {
			return "", nil
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(br, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return strings.TrimPrefix(strings.TrimPrefix(line, "+"), ":"), nil
}

// tail returns the last n lines of the file at path.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.SplitAfter(string(b), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "")
}
