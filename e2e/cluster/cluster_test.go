package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The tests of issue #13's list, against three nodes sharing a
// redis-server. Paths under /ids/ are a backend that sends ids and resumes
// from Last-Event-ID; other paths are a legacy backend without ids (the
// plugin's ids, from Redis, are the only ones).

// onNode is a client's target list: n while it runs, else any running node
// (where a client of a killed node goes, with its Last-Event-ID).
func (cl *cluster) onNode(n *node) func() []string {
	return func() []string {
		if n.Alive() {
			return []string{n.Base()}
		}
		return cl.aliveNodes()
	}
}

// anywhere is every running node and the load balancer.
func (cl *cluster) anywhere() []string { return append(cl.aliveNodes(), cl.lb.Base()) }

// perNode starts k clients on each node that stay there (reconnecting
// elsewhere only when their node dies), and returns them per node.
func (cl *cluster) perNode(g *clientGroup, path string, k int) map[*node][]*sseClient {
	out := map[*node][]*sseClient{}
	for _, n := range cl.nodes {
		for i := 0; i < k; i++ {
			target := cl.onNode(n)
			c := g.add(newClient(fmt.Sprintf("%s-client%d", n.name, i), path), func(c *sseClient, stop <-chan struct{}) {
				c.stay(target, stop)
			})
			out[n] = append(out[n], c)
		}
	}
	return out
}

// events is how many backend events pass in d.
func (cl *cluster) events(d time.Duration) int64 { return int64(d / cl.opts.interval) }

// TestClusterOneUpstreamPerKey: clients of two keys on every node and
// through the load balancer; the backend sees one connection per key for
// the whole cluster, one node leads each key, and every node hands out the
// same id for the same event.
func TestClusterOneUpstreamPerKey(t *testing.T) {
	needCluster(t)
	oneUpstreamPerKey(t, startCluster(t, clusterOpts{}), true)
}

func oneUpstreamPerKey(t *testing.T, cl *cluster, leaders bool) {
	paths := []string{"/ids/one", "/legacy/one"}
	g := newGroup(t)
	for _, path := range paths {
		cl.perNode(g, path, 2)
		for i := 0; i < 2; i++ {
			g.add(newClient(fmt.Sprintf("lb-client%d%s", i, path), path), func(c *sseClient, stop <-chan struct{}) {
				c.stay(cl.lbOnly, stop)
			})
		}
	}
	var target int64
	for _, p := range paths {
		target = max(target, cl.backend.feed(p).Seq()+cl.events(2*time.Second))
	}
	g.waitPast(t, target, 15*time.Second)
	for _, p := range paths {
		if leaders {
			leader := cl.waitLeader(p, 5*time.Second)
			t.Logf("%s: led by %s", p, leader.name)
		}
	}
	g.stop()
	checkClients(t, g.clients, checkOpts{noResets: true})
	for _, p := range paths {
		if _, maxConc, connects := cl.backend.feed(p).Conns(); maxConc != 1 || connects != 1 {
			t.Errorf("%s: the backend saw %d connections at once and %d in all; want 1 and 1 for the whole cluster", p, maxConc, connects)
		}
	}
	for _, c := range g.clients {
		if ends := c.Ends(); len(ends) > 0 {
			t.Errorf("%s: streams ended by the server: %v", c.name, ends)
		}
	}
}

// TestClusterHoppingClients: clients that move between nodes and the load
// balancer every 100-400 ms, resuming with Last-Event-ID wherever they
// land, get every event exactly once and in order, for a backend with ids
// and for a legacy one (whose ids the cluster makes up, the same on every
// node).
func TestClusterHoppingClients(t *testing.T) {
	needCluster(t)
	hoppingClients(t, startCluster(t, clusterOpts{}))
}

func hoppingClients(t *testing.T, cl *cluster) {
	for _, path := range []string{"/ids/hop", "/legacy/hop"} {
		t.Run(path, func(t *testing.T) {
			g := newGroup(t)
			for i := 0; i < 6; i++ {
				g.add(newClient(fmt.Sprintf("hopper%d", i), path), func(c *sseClient, stop <-chan struct{}) {
					c.hop(cl.anywhere, stop, 100*time.Millisecond, 400*time.Millisecond)
				})
			}
			f := cl.backend.feed(path)
			g.waitPast(t, f.Seq()+cl.events(4*time.Second), 20*time.Second)
			g.stop()
			checkClients(t, g.clients, checkOpts{noResets: true})
			for _, c := range g.clients {
				nodes := map[string]bool{}
				for _, e := range c.Events() {
					nodes[e.Node] = true
				}
				if c.Conns() < 5 || len(nodes) < 2 {
					t.Errorf("%s: %d connections on %d nodes; the test wants it to hop between nodes", c.name, c.Conns(), len(nodes))
				}
			}
			if _, maxConc, connects := f.Conns(); maxConc != 1 || connects != 1 {
				t.Errorf("the backend saw %d connections at once and %d in all; want 1 and 1", maxConc, connects)
			}
		})
	}
}

// TestClusterLeaderKilled: kill -9 of the node running the upstream. Another
// node takes over within the lease TTL; clients on the other nodes stay
// connected throughout. With a backend that has ids the new leader resumes
// it with Last-Event-ID and nobody misses anything; with a legacy backend
// what was sent while nobody led is lost, but it is bounded by the failover
// time and every client is told (a reset event before the gap).
func TestClusterLeaderKilled(t *testing.T) {
	needCluster(t)
	for _, path := range []string{"/ids/kill", "/legacy/kill"} {
		t.Run(path, func(t *testing.T) {
			cl := startCluster(t, clusterOpts{})
			g := newGroup(t)
			byNode := cl.perNode(g, path, 2)
			f := cl.backend.feed(path)
			g.waitPast(t, f.Seq()+cl.events(500*time.Millisecond), 15*time.Second)
			leader := cl.waitLeader(path, 5*time.Second)
			conns := map[*sseClient]int{}
			for n, cs := range byNode {
				if n != leader {
					for _, c := range cs {
						conns[c] = c.Conns()
					}
				}
			}

			leader.Kill9()
			killed := time.Now()
			// The killed node's connection closes with it; from then on
			// the backend must never see two at once.
			waitFor(t, 2*time.Second, "the backend noticing the kill", func() string {
				if cur, _, _ := f.Conns(); cur != 0 {
					return fmt.Sprintf("%d open", cur)
				}
				return ""
			})
			f.ResetMax()
			next := cl.waitLeader(path, leaseTTL+time.Second)
			took := time.Since(killed)
			t.Logf("%s took over after %v", next.name, took.Round(10*time.Millisecond))
			if next == leader {
				t.Fatal("the killed node still leads")
			}
			g.waitPast(t, f.Seq()+cl.events(time.Second), 10*time.Second)
			for c := range conns {
				if !c.connected() {
					t.Errorf("%s (on a surviving node) lost its stream", c.name)
				}
			}
			g.stop()

			for c, n := range conns {
				if c.Conns() != n || len(c.Ends()) > 0 {
					t.Errorf("%s (on a surviving node) did not stay connected: %d connections, ended: %v", c.name, c.Conns(), c.Ends())
				}
			}
			if _, maxConc, connects := f.Conns(); maxConc != 1 || connects < 2 {
				t.Errorf("after the kill the backend saw %d connections at once, %d in all; want 1 at a time, and a new one", maxConc, connects)
			}
			if path == "/ids/kill" {
				checkClients(t, g.clients, checkOpts{noResets: true})
				if ids := f.LastIDs(); len(ids) < 2 || ids[len(ids)-1] == "" {
					t.Errorf("the new leader did not resume the backend with Last-Event-ID: %q", ids)
				}
				return
			}
			checkClients(t, g.clients, checkOpts{resetGaps: true})
			// What a client of a surviving node missed: at most what the
			// backend sent from the kill until the new leader connected
			// (took), plus a second of slack.
			bound := cl.events(took + time.Second)
			for c := range conns {
				evs := c.Events()
				if missed := missedSeqs(evs); missed > bound {
					t.Errorf("%s missed %d events; the failover took %v, so at most %d", c.name, missed, took, bound)
				} else if missed > 0 && count(evs, resetEvent) == 0 {
					t.Errorf("%s missed %d events without a reset event", c.name, missed)
				}
			}
		})
	}
}

// missedSeqs counts the seqs between a record's first and last that it
// does not hold.
func missedSeqs(evs []event) int64 {
	var first, last, n int64 = -1, -1, 0
	for _, e := range evs {
		if e.Seq < 0 {
			continue
		}
		if first < 0 {
			first = e.Seq
		}
		last = max(last, e.Seq)
		n++
	}
	if first < 0 {
		return 0
	}
	return last - first + 1 - n
}

// TestClusterPausedLeaderFenced: kill -STOP of the leader past its lease
// TTL, then kill -CONT. Another node leads meanwhile and resumes the
// backend; the old leader wakes up with the events it had read before it
// stopped and those the kernel buffered for it, tries to append them, and
// is refused by the fence: no client anywhere sees an event twice or out of
// order, and nothing is missing. Afterwards one node leads and the backend
// is down to one connection.
func TestClusterPausedLeaderFenced(t *testing.T) {
	needCluster(t)
	path := "/ids/pause"
	cl := startCluster(t, clusterOpts{})
	g := newGroup(t)
	cl.perNode(g, path, 2)
	f := cl.backend.feed(path)
	g.waitPast(t, f.Seq()+cl.events(500*time.Millisecond), 15*time.Second)
	old := cl.waitLeader(path, 5*time.Second)

	old.Pause()
	paused := time.Now()
	next := cl.waitLeader(path, leaseTTL+time.Second)
	t.Logf("%s took over after %v", next.name, time.Since(paused).Round(10*time.Millisecond))
	// Past the TTL for sure, and with a few hundred events buffered for the
	// stopped node.
	time.Sleep(time.Until(paused.Add(leaseTTL + 2*time.Second)))
	old.Resume()

	g.waitPast(t, f.Seq()+cl.events(2*time.Second), 15*time.Second)
	// The old leader learns it lost the lease at its first renewal after
	// waking up (overdue at once).
	waitFor(t, 5*time.Second, "only "+next.name+" leading", func() string {
		ls, err := cl.leaders(path)
		if err != nil {
			return err.Error()
		}
		if len(ls) != 1 || ls[0] != next {
			return fmt.Sprintf("leaders %v", names(ls))
		}
		return ""
	})
	waitFor(t, 5*time.Second, "the backend down to one connection", func() string {
		if cur, _, _ := f.Conns(); cur != 1 {
			return fmt.Sprintf("%d open", cur)
		}
		return ""
	})
	g.stop()
	checkClients(t, g.clients, checkOpts{noResets: true})

	// The fence itself: the log in Redis never got a late append (a seq
	// again, or one out of order), whatever the clients were sent.
	logs := cl.logSeqs(t)
	if len(logs) == 0 {
		t.Error("no stream log found in Redis (sse:{...}:log, internal/redisbroker's layout)")
	}
	for k, seqs := range logs {
		for i := 1; i < len(seqs); i++ {
			if seqs[i] <= seqs[i-1] {
				t.Errorf("Redis log %s: entry %d is seq %d after seq %d: an append the fence should have refused", k, i, seqs[i], seqs[i-1])
				break
			}
		}
		t.Logf("Redis log %s: %d entries, seq %d..%d", k, len(seqs), seqs[0], seqs[len(seqs)-1])
	}
}

func names(ns []*node) []string {
	var out []string
	for _, n := range ns {
		out = append(out, n.name)
	}
	return out
}

// TestClusterRedisRestart: redis-server restarted under load, with and
// without persistence, and once killed and down for 3 s (long enough for
// every node's Redis connections to fail and back off). No node stays deaf:
// within a bound after Redis is back, clients on every node get new events
// again, and every event from then on. With persistence nothing is lost at
// all (the backend has ids, so the leader can resume it). Without, the
// history is gone: a gap is always announced by a reset event, and a client
// that comes back with an id from before the restart is resumed exactly or
// gets a reset event, never a silent jump.
func TestClusterRedisRestart(t *testing.T) {
	needCluster(t)
	for _, tc := range []struct {
		name    string
		persist bool
		down    time.Duration // 0: a clean restart (SIGTERM); else SIGKILL and this long down
	}{{"persist", true, 0}, {"no-persist", false, 0}, {"killed-3s", false, 3 * time.Second}} {
		persist := tc.persist
		t.Run(tc.name, func(t *testing.T) {
			path := "/ids/redis"
			cl := startCluster(t, clusterOpts{persist: persist})
			g := newGroup(t)
			cl.perNode(g, path, 2)
			f := cl.backend.feed(path)
			g.waitPast(t, f.Seq()+cl.events(500*time.Millisecond), 15*time.Second)
			cl.waitLeader(path, 5*time.Second)
			before := g.clients[0].LastID()
			beforeSeq := g.clients[0].LastSeq()

			if tc.down == 0 {
				cl.redis.Restart()
			} else {
				cl.redis.Kill()
				// The outage itself, not a wait for something.
				time.Sleep(tc.down)
				cl.redis.Start()
			}
			back := time.Now()
			// Deaf nodes would never pass this.
			g.waitPast(t, f.Seq()+cl.events(500*time.Millisecond), 10*time.Second)
			t.Logf("every client got new events %v after Redis was back", time.Since(back).Round(10*time.Millisecond))
			from := f.Seq() + 1
			g.waitPast(t, from+cl.events(time.Second), 10*time.Second)

			// A client that was away during the restart, back with its
			// old id on some node.
			late := newClient("late", path)
			late.lastID = before
			if err := late.connect(cl.nodes[2].Base()); err != nil {
				t.Fatal(err)
			}
			lateGroup := &clientGroup{clients: []*sseClient{late}}
			lateGroup.waitPast(t, f.Seq()+cl.events(500*time.Millisecond), 5*time.Second)
			late.disconnect()
			g.stop()

			evs := late.Events()
			first := evs[0]
			if persist {
				checkClients(t, append(g.clients, late), checkOpts{noResets: true})
				if first.Seq != beforeSeq+1 {
					t.Errorf("a client back with id %q (seq %d) got %v first; want seq %d: the history survived", before, beforeSeq, first, beforeSeq+1)
				}
				return
			}
			checkClients(t, g.clients, checkOpts{resetGaps: true, from: from})
			// The late client asks for an id of the lost history: it is
			// resumed exactly (a node may still hold those events) or
			// told (a reset event), and any gap later is announced too.
			if first.Type != resetEvent && first.Seq != beforeSeq+1 {
				t.Errorf("a client back with id %q (seq %d) from before the history was lost got %v first; want seq %d or a %s event", before, beforeSeq, first, beforeSeq+1, resetEvent)
			}
			for _, e := range checkRecord(evs, checkOpts{resetGaps: true}) {
				t.Errorf("late client: %s", e)
			}
		})
	}
}

// TestClusterReloadUnderLoad: a config reload on one node while clients
// stream from every node and hop through the load balancer. Reloading the
// leader (backend with ids) hands the upstream over; reloading a follower
// (legacy backend) must not touch it. Either way nobody misses an event or
// gets one twice, and the reloaded node's clients come back to its new
// config.
func TestClusterReloadUnderLoad(t *testing.T) {
	needCluster(t)
	reloadUnderLoad(t, startCluster(t, clusterOpts{}), true)
}

// reloadUnderLoad runs the reload scenario; without leaders (a memory
// cluster) it reloads node1 for the "leader" case and node2 for the other,
// and does not check the backend's connections.
func reloadUnderLoad(t *testing.T, cl *cluster, leaders bool) {
	for _, tc := range []struct {
		path   string
		leader bool
	}{{"/ids/reload", true}, {"/legacy/reload", false}} {
		t.Run(tc.path, func(t *testing.T) {
			g := newGroup(t)
			cl.perNode(g, tc.path, 2)
			for i := 0; i < 3; i++ {
				g.add(newClient(fmt.Sprintf("hopper%d", i), tc.path), func(c *sseClient, stop <-chan struct{}) {
					c.hop(cl.anywhere, stop, 200*time.Millisecond, 500*time.Millisecond)
				})
			}
			f := cl.backend.feed(tc.path)
			g.waitPast(t, f.Seq()+cl.events(500*time.Millisecond), 15*time.Second)
			target := cl.nodes[0]
			if !tc.leader {
				target = cl.nodes[1]
			}
			if leaders {
				leader := cl.waitLeader(tc.path, 5*time.Second)
				target = leader
				if !tc.leader {
					for _, n := range cl.nodes {
						if n != leader {
							target = n
							break
						}
					}
				}
			}
			_, _, connects := f.Conns()
			label := target.name + "-reloaded-" + fmt.Sprint(time.Now().UnixNano())
			cl.reload(target, label)
			g.waitPast(t, f.Seq()+cl.events(2*time.Second), 15*time.Second)
			if leaders {
				cl.waitLeader(tc.path, leaseTTL)
			}
			g.stop()

			checkClients(t, g.clients, checkOpts{noResets: true})
			onNew := 0
			for _, c := range g.clients {
				for _, e := range c.Events() {
					if e.Node == label {
						onNew++
						break
					}
				}
			}
			if onNew == 0 {
				t.Errorf("no client got an event from %s's new config", target.name)
			}
			if !leaders {
				return
			}
			if _, _, after := f.Conns(); !tc.leader && after != connects {
				t.Errorf("reloading a follower made the backend see %d new connections", after-connects)
			}
			waitFor(t, 5*time.Second, "the backend down to one connection", func() string {
				if cur, _, _ := f.Conns(); cur != 1 {
					return fmt.Sprintf("%d open", cur)
				}
				return ""
			})
		})
	}
}

// TestClusterConfigJSON: the Caddyfile's cluster block adapts to the JSON
// agreed for cluster mode, "fanout": {"broker": {"name": "redis",
// "address": ..., "prefix": ...}}, and a node runs that JSON (loaded
// through its admin API) as one of the cluster.
func TestClusterConfigJSON(t *testing.T) {
	needCluster(t)
	cl := startCluster(t, clusterOpts{})
	n := cl.nodes[1]
	path := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(path, []byte(n.cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(caddyBin, "adapt", "--config", path, "--adapter", "caddyfile").Output()
	if err != nil {
		t.Fatalf("caddy adapt: %v", err)
	}
	var cfg any
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	handlers := findHandlers(cfg, "sse")
	if len(handlers) != 1 {
		t.Fatalf("want one sse handler in the adapted config, found %d:\n%s", len(handlers), out)
	}
	fanout, _ := handlers[0]["fanout"].(map[string]any)
	broker, _ := fanout["broker"].(map[string]any)
	want := map[string]any{"name": "redis", "address": "redis://" + cl.redis.Addr + "/0", "prefix": "sse:"}
	for k, v := range want {
		if broker[k] != v {
			t.Errorf("fanout.broker.%s = %v, want %v (adapted: %v)", k, broker[k], v, fanout)
		}
	}

	req, _ := http.NewRequest("POST", n.AdminBase()+"/load", bytes.NewReader(out))
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("POST /load of the JSON: %s: %s", resp.Status, body)
	}
	g := newGroup(t)
	byNode := cl.perNode(g, "/legacy/json", 1)
	f := cl.backend.feed("/legacy/json")
	g.waitPast(t, f.Seq()+cl.events(time.Second), 10*time.Second)
	g.stop()
	checkClients(t, g.clients, checkOpts{noResets: true})
	if len(byNode[n][0].Events()) == 0 {
		t.Errorf("the node running the JSON config served nothing")
	}
	if _, _, connects := f.Conns(); connects != 1 {
		t.Errorf("the backend saw %d connections; the JSON-configured node is not part of the cluster", connects)
	}
}

// findHandlers returns every JSON object with "handler": name, anywhere in v.
func findHandlers(v any, name string) []map[string]any {
	var out []map[string]any
	switch x := v.(type) {
	case map[string]any:
		if x["handler"] == name {
			out = append(out, x)
		}
		for _, e := range x {
			out = append(out, findHandlers(e, name)...)
		}
	case []any:
		for _, e := range x {
			out = append(out, findHandlers(e, name)...)
		}
	}
	return out
}

// logSeqs reads every stream log the cluster keeps in Redis (the layout of
// internal/redisbroker: stream "<prefix>{<key>}:log", the event's bytes in
// field "d") and returns, per log key, the seq of each entry in log order.
// It shows what was appended, whatever any node delivered.
func (cl *cluster) logSeqs(t testing.TB) map[string][]int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rc := redis.NewClient(&redis.Options{Addr: cl.redis.Addr})
	defer rc.Close()
	keys, err := rc.Keys(ctx, "sse:*:log").Result()
	if err != nil {
		t.Fatalf("redis KEYS: %v", err)
	}
	out := map[string][]int64{}
	for _, k := range keys {
		entries, err := rc.XRange(ctx, k, "-", "+").Result()
		if err != nil {
			t.Fatalf("redis XRANGE %s: %v", k, err)
		}
		for _, e := range entries {
			d, _ := e.Values["d"].(string)
			seq := int64(-1)
			if _, after, ok := strings.Cut(d, "data: seq="); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(strings.SplitN(after, "\n", 2)[0]), 10, 64)
				seq = n
			}
			out[k] = append(out[k], seq)
		}
	}
	return out
}
