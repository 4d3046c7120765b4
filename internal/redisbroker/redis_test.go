package redisbroker

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisOpts choose how a test's redis-server runs.
type redisOpts struct {
	persist bool // appendonly yes, fsync always: a restart keeps everything
	cluster bool // a one-node Redis Cluster owning all 16384 slots
}

// redisProc is a redis-server owned by one test, on a loopback port of its
// own, with its data in the test's temp dir.
type redisProc struct {
	t    testing.TB
	Addr string
	dir  string
	opts redisOpts
	cmd  *exec.Cmd
	exit chan struct{} // closed when cmd has been waited for
}

// startRedis starts a redis-server for t and stops it when t ends. Without
// /usr/bin/redis-server (or redis-server on PATH) the test is skipped, unless
// SSE_REQUIRE_REDIS=1 (CI), when it fails.
func startRedis(t testing.TB, opts redisOpts) *redisProc {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("SSE_REQUIRE_REDIS") == "1" {
			t.Fatalf("redis-server not found and SSE_REQUIRE_REDIS=1: %v", err)
		}
		t.Skip("redis-server not installed (apt-get install redis-server)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	r := &redisProc{t: t, Addr: addr, dir: t.TempDir(), opts: opts}
	r.Start()
	t.Cleanup(r.Kill)
	return r
}

// Start runs redis-server (again) on the same port and dir, and waits until
// it answers PING.
func (r *redisProc) Start() {
	r.t.Helper()
	_, port, _ := net.SplitHostPort(r.Addr)
	args := []string{"--port", port, "--bind", "127.0.0.1", "--dir", r.dir,
		"--save", "", "--daemonize", "no", "--protected-mode", "no", "--logfile", ""}
	if r.opts.persist {
		args = append(args, "--appendonly", "yes", "--appendfsync", "always")
	} else {
		args = append(args, "--appendonly", "no")
	}
	if r.opts.cluster {
		args = append(args, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
	}
	cmd := exec.Command("redis-server", args...)
	out, err := os.Create(r.dir + "/redis.log")
	if err != nil {
		r.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	exit := make(chan struct{})
	go func() { _ = cmd.Wait(); out.Close(); close(exit) }()
	r.cmd, r.exit = cmd, exit
	deadline := time.Now().Add(10 * time.Second)
	for {
		if ping(r.Addr) == nil {
			if r.opts.cluster {
				r.clusterReady(deadline)
			}
			return
		}
		select {
		case <-exit:
			log, _ := os.ReadFile(r.dir + "/redis.log")
			r.t.Fatalf("redis-server exited at start:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("redis-server on %s not answering after 10 s", r.Addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ping sends a raw PING, without go-redis, so the helper tests nothing but
// the server.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("ping: %q", line)
	}
	return nil
}

// clusterReady gives the node every slot (once; nodes.conf keeps them over
// restarts) and waits for cluster_state:ok.
func (r *redisProc) clusterReady(deadline time.Time) {
	r.t.Helper()
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	for {
		info, err := c.ClusterInfo(ctx).Result()
		if err == nil && strings.Contains(info, "cluster_state:ok") {
			return
		}
		if err == nil && strings.Contains(info, "cluster_slots_assigned:0") {
			if err := c.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", 0, 16383).Err(); err != nil {
				r.t.Fatalf("cluster addslots: %v", err)
			}
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("cluster on %s not ok: %v %s", r.Addr, err, info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill ends redis-server with SIGKILL (nothing more is written) and waits.
func (r *redisProc) Kill() { r.signal(syscall.SIGKILL) }

// Stop ends redis-server with SIGTERM (it flushes its AOF) and waits.
func (r *redisProc) Stop() { r.signal(syscall.SIGTERM) }

func (r *redisProc) signal(sig syscall.Signal) {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Signal(sig)
	select {
	case <-r.exit:
	case <-time.After(10 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.exit
	}
	r.cmd = nil
}

// Restart stops (SIGTERM) and starts redis-server again on the same port.
func (r *redisProc) Restart() {
	r.t.Helper()
	r.Stop()
	r.Start()
}

// client returns a go-redis client for r made by NewClient (1 s timeouts,
// no retries), closed when the test ends.
func (r *redisProc) client(t testing.TB) *redis.Client {
	t.Helper()
	c, err := NewClient("redis://" + r.Addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
