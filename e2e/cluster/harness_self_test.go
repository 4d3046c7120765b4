package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/redisbroker"
	"github.com/seed-b7710c89/caddy-sse/internal/redistest"
)

// The harness's own tests: they run against the in-memory broker (each
// node alone, no Redis), so they work today and show that the harness, the
// backend and the client are sound before any cluster test relies on them.

// TestHarnessSingleNode: clients through the load balancer and straight to
// one node, hopping between connections with Last-Event-ID, get every event
// once and in order; the backend sees one connection per path.
func TestHarnessSingleNode(t *testing.T) {
	cl := startCluster(t, clusterOpts{nodes: 1, memory: true})
	for _, path := range []string{"/ids/one", "/legacy/one"} {
		t.Run(path, func(t *testing.T) {
			g := newGroup(t)
			targets := func() []string { return []string{cl.nodes[0].Base(), cl.lb.Base()} }
			for i := 0; i < 3; i++ {
				g.add(newClient("hopper", path), func(c *sseClient, stop <-chan struct{}) {
					c.hop(targets, stop, 100*time.Millisecond, 300*time.Millisecond)
				})
			}
			f := cl.backend.feed(path)
			g.waitPast(t, f.Seq()+75, 10*time.Second)
			g.stop()
			checkClients(t, g.clients, checkOpts{noResets: true})
			for _, c := range g.clients {
				if c.Conns() < 3 {
					t.Errorf("%s made %d connections; the test wants it to hop", c.name, c.Conns())
				}
				for _, e := range c.Events() {
					if e.Node != "node1" {
						t.Fatalf("%s: event %v not from node1 (X-SSE-Node header)", c.name, e)
					}
				}
			}
			if _, maxConc, connects := f.Conns(); maxConc != 1 || connects != 1 {
				t.Errorf("backend: %d connections at most at once, %d made; want 1 and 1", maxConc, connects)
			}
		})
	}
}

// TestCheckRecordCatches: the checks fail on a gap, a duplicate, a
// reordering and an unsignalled gap, and pass a signalled one.
func TestCheckRecordCatches(t *testing.T) {
	ev := func(seqs ...int64) []event {
		var out []event
		for _, s := range seqs {
			if s == 0 {
				out = append(out, event{Type: resetEvent, Seq: -1})
				continue
			}
			out = append(out, event{Type: "message", Seq: s})
		}
		return out
	}
	cases := []struct {
		name string
		evs  []event
		o    checkOpts
		bad  bool
	}{
		{"complete", ev(1, 2, 3), checkOpts{}, false},
		{"gap", ev(1, 3), checkOpts{}, true},
		{"dup", ev(1, 2, 2, 3), checkOpts{}, true},
		{"backwards", ev(1, 3, 2), checkOpts{resetGaps: true}, true},
		{"gap after reset, not allowed", ev(1, 0, 5), checkOpts{}, true},
		{"gap after reset, allowed", ev(1, 0, 5, 6), checkOpts{resetGaps: true}, false},
		{"reset forbidden", ev(1, 0, 2), checkOpts{noResets: true}, true},
		{"gap after from", ev(1, 0, 5, 0, 8), checkOpts{resetGaps: true, from: 5}, true},
		{"from missing", ev(1, 0, 6, 7), checkOpts{resetGaps: true, from: 5}, true},
		{"from present", ev(1, 0, 5, 6), checkOpts{resetGaps: true, from: 5}, false},
	}
	for _, c := range cases {
		errs := checkRecord(c.evs, c.o)
		if bad := len(errs) > 0; bad != c.bad {
			t.Errorf("%s: errors %q, want bad=%v", c.name, errs, c.bad)
		}
	}
}

// TestClientParser: the client dispatches as EventSource does.
func TestClientParser(t *testing.T) {
	c := newClient("parser", "/")
	in := ":pad\r\nid: 7\r\ndata: seq=1\r\n\r\nevent: sse-reset\rdata: x\r\rid\n\ndata:seq=2\ndata\n\n"
	c.read(stringsReader(in), &clientConn{n: 1, node: "n"})
	got := c.Events()
	want := []event{
		{ID: "7", Type: "message", Data: "seq=1", Seq: 1},
		{ID: "7", Type: "sse-reset", Data: "x", Seq: -1},
		{ID: "", Type: "message", Data: "seq=2\n", Seq: -1},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		g := got[i]
		if g.ID != want[i].ID || g.Type != want[i].Type || g.Data != want[i].Data || g.Seq != want[i].Seq {
			t.Errorf("event %d: got %+v, want %+v", i, g, want[i])
		}
	}
}

// TestHarnessReloadOneNode: a reload through the admin API under load, on
// one node alone: its clients come back to the new config and, from the
// replay cache that survives reloads, miss nothing. It exercises the
// helpers the cluster's reload test uses, on behaviour that exists today.
func TestHarnessReloadOneNode(t *testing.T) {
	cl := startCluster(t, clusterOpts{nodes: 1, memory: true})
	path := "/legacy/reload"
	n := cl.nodes[0]
	g := newGroup(t)
	for i := 0; i < 3; i++ {
		g.add(newClient(fmt.Sprintf("client%d", i), path), func(c *sseClient, stop <-chan struct{}) {
			c.stay(func() []string { return []string{n.Base()} }, stop)
		})
	}
	f := cl.backend.feed(path)
	g.waitPast(t, f.Seq()+10, 10*time.Second)
	hubs, err := n.Streams()
	if err != nil {
		t.Fatal(err)
	}
	if len(hubs) != 1 || hubs[0].Path != path || hubs[0].Clients != 3 || hubs[0].Leader != nil {
		t.Fatalf("GET /sse/streams: %+v; want one hub of %s with 3 clients and no leader field", hubs, path)
	}
	n.Reload(cl.nodeConfig(n, "node1-new"))
	waitFor(t, 10*time.Second, "every client on the new config", func() string {
		for _, c := range g.clients {
			if evs := c.Events(); evs[len(evs)-1].Node != "node1-new" {
				return c.name + " is not"
			}
		}
		return ""
	})
	g.waitPast(t, f.Seq()+10, 10*time.Second)
	g.stop()
	checkClients(t, g.clients, checkOpts{noResets: true})
	for _, c := range g.clients {
		if c.Conns() < 2 {
			t.Errorf("%s made %d connections; the reload should have ended its first", c.name, c.Conns())
		}
	}
}

// TestHarnessSignals: kill -9 moves a node's clients to another node,
// SIGSTOP makes its admin API silent until SIGCONT.
func TestHarnessSignals(t *testing.T) {
	cl := startCluster(t, clusterOpts{nodes: 2, memory: true})
	path := "/ids/signals"
	g := newGroup(t)
	byNode := cl.perNode(g, path, 1)
	f := cl.backend.feed(path)
	g.waitPast(t, f.Seq()+5, 10*time.Second)

	n2 := cl.nodes[1]
	n2.Pause()
	if _, err := n2.Streams(); err == nil {
		t.Error("a stopped node answered its admin API")
	}
	if got := cl.aliveNodes(); len(got) != 1 {
		t.Errorf("alive nodes while one is stopped: %v", got)
	}
	n2.Resume()
	if _, err := n2.Streams(); err != nil {
		t.Errorf("after SIGCONT: %v", err)
	}

	n1 := cl.nodes[0]
	n1.Kill9()
	c := byNode[n1][0]
	waitFor(t, 10*time.Second, "node1's client on node2", func() string {
		if evs := c.Events(); evs[len(evs)-1].Node != "node2" {
			return "not yet"
		}
		return ""
	})
	if len(c.Ends()) == 0 {
		t.Error("the killed node's stream did not end")
	}
}

// TestDemoConfigs: the cluster demo's Caddyfiles adapt with this build. The
// nodes' need the redis broker module; without it their check skips (or,
// with SSE_REQUIRE_CLUSTER=1, fails).
func TestDemoConfigs(t *testing.T) {
	needCaddy(t)
	adapt := func(t *testing.T, file string) any {
		out, err := exec.Command(caddyBin, "adapt", "--config", filepath.Join("..", "..", "demo", "cluster", file), "--adapter", "caddyfile").Output()
		if err != nil {
			t.Fatalf("caddy adapt %s: %v\n%s", file, err, out)
		}
		var cfg any
		if err := json.Unmarshal(out, &cfg); err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	t.Run("lb", func(t *testing.T) {
		cfg := adapt(t, "lb.Caddyfile")
		// findHandlers, which TestClusterConfigJSON relies on, finds the
		// one backend and no sse handler.
		if n, m := len(findHandlers(cfg, "legacy_sse_demo")), len(findHandlers(cfg, "sse")); n != 1 || m != 0 {
			t.Errorf("lb.Caddyfile: %d backends and %d sse handlers, want 1 and 0", n, m)
		}
	})
	for _, n := range []string{"node1", "node2", "node3"} {
		t.Run(n, func(t *testing.T) {
			needCluster(t)
			adapt(t, n+".Caddyfile")
		})
	}
}

// TestClusterLogicOnSharedHub runs the one-upstream, hopping and reload
// scenarios of the cluster tests against one Caddy process serving three
// "nodes" (ports with their own X-SSE-Node), whose hubs are shared
// in-process: what a perfect cluster looks like to clients. It shows the scenarios and
// their checks pass where they should, before any cluster exists.
func TestClusterLogicOnSharedHub(t *testing.T) {
	cl := startCluster(t, clusterOpts{memory: true, oneProcess: true})
	t.Run("one upstream", func(t *testing.T) { oneUpstreamPerKey(t, cl, false) })
	t.Run("hopping", func(t *testing.T) { hoppingClients(t, cl) })
	t.Run("reload", func(t *testing.T) { reloadUnderLoad(t, cl, false) })
}

// TestLogSeqs: logSeqs reads what internal/redisbroker appends (the layout
// the paused-leader test inspects), and sees a late append if one got in.
func TestLogSeqs(t *testing.T) {
	cl := &cluster{t: t, redis: redistest.Start(t, redistest.Options{})}
	rc, err := redisbroker.NewClient("redis://" + cl.redis.Addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	ctx := context.Background()
	s := redisbroker.New(rc, redisbroker.Options{Prefix: "sse:"}).Stream("some key")
	lease, ok, err := s.Acquire(ctx)
	if err != nil || !ok {
		t.Fatalf("acquire: %v %v", ok, err)
	}
	for _, seq := range []int{1, 2, 3, 2} {
		data := []byte(fmt.Sprintf("id: %d\ndata: seq=%d\n\n", seq, seq))
		if _, err := s.Append(ctx, lease, redisbroker.Event{ID: fmt.Sprint(seq), Data: data}); err != nil {
			t.Fatal(err)
		}
	}
	logs := cl.logSeqs(t)
	if len(logs) != 1 {
		t.Fatalf("logs %v, want one", logs)
	}
	for k, seqs := range logs {
		if fmt.Sprint(seqs) != "[1 2 3 2]" {
			t.Errorf("%s: seqs %v, want [1 2 3 2]", k, seqs)
		}
	}
}
