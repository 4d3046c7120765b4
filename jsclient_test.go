package caddysse

import (
	"bufio"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// installJSClients installs the npm SSE clients of testdata/js (exact
// versions, from its package-lock.json) into a temporary directory and
// returns it. Only the folder's files are copied: a node_modules there
// (.ci/run installs one in place for e2e/) is not this test's. Without
// node and npm, or when npm cannot install them (no registry), the test is
// skipped, unless SSE_REQUIRE_NODE=1 (CI).
func installJSClients(t *testing.T) string {
	t.Helper()
	unavailable := t.Skipf
	if os.Getenv("SSE_REQUIRE_NODE") == "1" {
		unavailable = t.Fatalf
	}
	for _, prog := range []string{"node", "npm"} {
		if _, err := exec.LookPath(prog); err != nil {
			unavailable("%s not found: the npm client tests need Node.js 20+ and npm", prog)
		}
	}
	dir := t.TempDir()
	files, _ := filepath.Glob("testdata/js/*")
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil && fi.IsDir() {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(f)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "npm", "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		unavailable("npm ci in testdata/js: %v\n%s", err, out)
	}
	return dir
}

// nodeClient is a Node.js script run from a test, whose stdout lines are
// collected.
type nodeClient struct {
	mu    sync.Mutex
	lines []string
	more  chan struct{}
}

// startNode runs node script args in dir until the test ends.
func startNode(t *testing.T, dir, script string, args ...string) *nodeClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "node", append([]string{script}, args...)...)
	cmd.Dir = dir
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n := &nodeClient{more: make(chan struct{}, 1)}
	done := make(chan struct{})
	go func() { // ends when node's stdout closes: at its exit
		defer close(done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			n.mu.Lock()
			n.lines = append(n.lines, sc.Text())
			n.mu.Unlock()
			select {
			case n.more <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		_ = cmd.Wait()
	})
	return n
}

// count is how many lines so far contain s.
func (n *nodeClient) count(s string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	k := 0
	for _, l := range n.lines {
		if strings.Contains(l, s) {
			k++
		}
	}
	return k
}

// waitFor waits until k lines contain s.
func (n *nodeClient) waitFor(t *testing.T, s string, k int, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for n.count(s) < k {
		select {
		case <-n.more:
		case <-deadline:
			n.mu.Lock()
			defer n.mu.Unlock()
			t.Fatalf("no %d lines with %s within %s; the client printed:\n%s", k, s, within, strings.Join(n.lines, "\n"))
		}
	}
}

// relay forwards TCP connections to a target, and can cut them all: what a
// proxy, a load balancer or a network change does to a long stream.
type relay struct {
	addr  string
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func startRelay(t *testing.T, target string) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{addr: ln.Addr().String(), ln: ln, conns: make(map[net.Conn]struct{})}
	r.wg.Add(1)
	go func() { // ends when the listener closes
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			r.mu.Lock()
			r.conns[c], r.conns[up] = struct{}{}, struct{}{}
			r.mu.Unlock()
			r.wg.Add(2)
			pipe := func(dst, src net.Conn) { // ends when either side closes
				defer r.wg.Done()
				_, _ = io.Copy(dst, src)
				dst.Close()
				src.Close()
			}
			go pipe(up, c)
			go pipe(c, up)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		r.cut()
		r.wg.Wait()
	})
	return r
}

// cut closes every connection through the relay; new ones are forwarded.
func (r *relay) cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		c.Close()
		delete(r.conns, c)
	}
}

// @microsoft/fetch-event-source stops for good at a clean end of the body
// and retries after a failure. A handed-over HTTP/1.1 fan-out stream that
// is cut (here by a proxy in between) must look like a failure to it, not
// like an end, so that it reconnects and goes on receiving.
func TestFanoutFetchEventSourceReconnectsAfterACut(t *testing.T) {
	dir := installJSClients(t)
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"retry": "250ms"}))
	r := startRelay(t, strings.TrimPrefix(base, "http://"))
	via := "http://" + r.addr // the Host the client sends, in its hub's key
	n := startNode(t, dir, "fetch-event-source.cjs", via+"/events")
	n.waitFor(t, `"on":"open"`, 1, 10*time.Second)
	e.waitJoined(t, 1)
	waitHubClients(t, via, 1)
	for deadline := time.Now().Add(5 * time.Second); detachedClients(via) != 1; {
		if time.Now().After(deadline) {
			t.Fatalf("%d handed-over clients, want the npm client", detachedClients(via))
		}
		time.Sleep(10 * time.Millisecond) // polling a condition with a deadline
	}
	e.emit("data: one\n\n")
	n.waitFor(t, `"data":"one"`, 1, 5*time.Second)

	r.cut()
	n.waitFor(t, `"on":"open"`, 2, 10*time.Second) // it reconnected
	waitHubClients(t, via, 1)
	e.emit("data: two\n\n")
	n.waitFor(t, `"data":"two"`, 1, 5*time.Second)
	if k := n.count(`"on":"close"`); k != 0 {
		t.Fatalf("the client saw %d clean ends", k)
	}
}
