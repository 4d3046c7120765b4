package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/redistest"
)

// brokerModule is the module the cluster tests need in the Caddy binary.
const brokerModule = "http.handlers.sse.brokers.redis"

// leaseTTL is the longest a crashed leader may keep a key leaderless
// (issue #13: "a crashed leader is replaced within the TTL (target <= 6 s)").
const leaseTTL = 6 * time.Second

var (
	caddyBin string // the Caddy binary with the plugin
	// clusterSkip, when not "", is why the cluster tests cannot run.
	clusterSkip string
	buildErr    error
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "sse-cluster-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	caddyBin = os.Getenv("SSE_CLUSTER_CADDY")
	if caddyBin == "" {
		caddyBin = filepath.Join(tmp, "caddy")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		out, err := exec.CommandContext(ctx, "go", "build", "-o", caddyBin, "github.com/seed-b7710c89/caddy-sse/cmd/caddy").CombinedOutput()
		cancel()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	}
	if buildErr == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := exec.CommandContext(ctx, caddyBin, "list-modules").Output()
		cancel()
		switch {
		case err != nil:
			buildErr = fmt.Errorf("%s list-modules: %v", caddyBin, err)
		case !hasLine(string(out), brokerModule):
			clusterSkip = fmt.Sprintf("the Caddy binary has no %s module (cluster mode not integrated yet)", brokerModule)
		}
	}
	if _, err := exec.LookPath("redis-server"); err != nil && clusterSkip == "" {
		clusterSkip = "redis-server not installed (apt-get install redis-server)"
	}
	return m.Run()
}

func hasLine(s, line string) bool {
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}

// needCaddy fails the test when the binary could not be built.
func needCaddy(t testing.TB) {
	t.Helper()
	if buildErr != nil {
		t.Fatal(buildErr)
	}
}

// needCluster skips the test when cluster mode cannot run here, or fails
// it when SSE_REQUIRE_CLUSTER=1.
func needCluster(t testing.TB) {
	t.Helper()
	needCaddy(t)
	if clusterSkip == "" {
		return
	}
	if os.Getenv("SSE_REQUIRE_CLUSTER") == "1" {
		t.Fatalf("%s, and SSE_REQUIRE_CLUSTER=1", clusterSkip)
	}
	t.Skip(clusterSkip)
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// proc is a process a test started, in its own process group, killed with
// the test binary (Pdeathsig) if that dies first.
type proc struct {
	name string
	cmd  *exec.Cmd
	exit chan struct{} // closed once waited for
}

func startProc(t testing.TB, name, logPath string, env []string, argv ...string) *proc {
	t.Helper()
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, exit: make(chan struct{})}
	go func() { _ = cmd.Wait(); out.Close(); close(p.exit) }()
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.exit:
		return true
	default:
		return false
	}
}

// signal sends sig to the process group.
func (p *proc) signal(sig syscall.Signal) {
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
}

// end sends sig (SIGCONT first, in case it is stopped) and waits up to
// grace, then SIGKILLs and waits.
func (p *proc) end(sig syscall.Signal, grace time.Duration) {
	if p == nil || p.exited() {
		return
	}
	p.signal(syscall.SIGCONT)
	p.signal(sig)
	select {
	case <-p.exit:
		return
	case <-time.After(grace):
	}
	p.signal(syscall.SIGKILL)
	select {
	case <-p.exit:
	case <-time.After(10 * time.Second):
	}
}

// waitListen polls addr until it accepts a connection.
func waitListen(t testing.TB, p *proc, addr, logPath string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if p.exited() {
			t.Fatalf("%s exited before listening on %s; its log ends with:\n%s", p.name, addr, tail(logPath, 30))
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening on %s after %v; its log ends with:\n%s", p.name, addr, within, tail(logPath, 30))
		}
		time.Sleep(20 * time.Millisecond)
	}
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

// node is one Caddy process: a cluster node (or, with lb, the load
// balancer), with its own HTTP and admin ports and its Caddyfile.
type node struct {
	t     testing.TB
	name  string
	port  int
	admin int
	dir   string
	log   string
	cfg   string // the Caddyfile it runs (the latest loaded)
	p     *proc

	mu      sync.Mutex
	stopped bool // SIGSTOPped
}

func (n *node) Base() string      { return fmt.Sprintf("http://127.0.0.1:%d", n.port) }
func (n *node) AdminBase() string { return fmt.Sprintf("http://127.0.0.1:%d", n.admin) }

// start runs caddy with n.cfg and waits until it serves.
func (n *node) start() {
	n.t.Helper()
	path := filepath.Join(n.dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(n.cfg), 0o644); err != nil {
		n.t.Fatal(err)
	}
	env := append(os.Environ(), "HOME="+n.dir, "XDG_CONFIG_HOME="+n.dir, "XDG_DATA_HOME="+n.dir)
	n.p = startProc(n.t, n.name, n.log, env, caddyBin, "run", "--config", path, "--adapter", "caddyfile")
	n.mu.Lock()
	n.stopped = false
	n.mu.Unlock()
	waitListen(n.t, n.p, fmt.Sprintf("127.0.0.1:%d", n.port), n.log, 20*time.Second)
}

// Alive reports whether the process runs and is not stopped.
func (n *node) Alive() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.p != nil && !n.p.exited() && !n.stopped
}

// Kill9 kills the node at once (SIGKILL): no lease release, no goodbye.
func (n *node) Kill9() {
	n.t.Helper()
	n.p.end(syscall.SIGKILL, 0)
	n.t.Logf("%s killed (SIGKILL)", n.name)
}

// Stop ends the node with SIGTERM: Caddy stops gracefully (grace_period
// 2s), so a leader can give its leases up.
func (n *node) Stop() {
	n.t.Helper()
	n.p.end(syscall.SIGTERM, 10*time.Second)
	n.t.Logf("%s stopped (SIGTERM)", n.name)
}

// Pause stops the node with SIGSTOP; Resume continues it.
func (n *node) Pause() {
	n.mu.Lock()
	n.stopped = true
	n.mu.Unlock()
	n.p.signal(syscall.SIGSTOP)
	n.t.Logf("%s stopped (SIGSTOP)", n.name)
}

func (n *node) Resume() {
	n.p.signal(syscall.SIGCONT)
	n.mu.Lock()
	n.stopped = false
	n.mu.Unlock()
	n.t.Logf("%s continued (SIGCONT)", n.name)
}

// Reload loads cfg through the admin API (POST /load, as `caddy reload`
// does) and makes it the node's config.
func (n *node) Reload(cfg string) {
	n.t.Helper()
	req, _ := http.NewRequest("POST", n.AdminBase()+"/load", strings.NewReader(cfg))
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		n.t.Fatalf("reload %s: %v", n.name, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		n.t.Fatalf("reload %s: %s: %s", n.name, resp.Status, body)
	}
	n.cfg = cfg
	n.t.Logf("%s reloaded", n.name)
}

// hub is one stream as the node's GET /sse/streams reports it
// (docs/admin.md), with the cluster's "leader".
type hub struct {
	Mode        string `json:"mode"`
	Path        string `json:"path"`
	Clients     int    `json:"clients"`
	Upstream    string `json:"upstream"`
	LastEventID string `json:"last_event_id"`
	Leader      *bool  `json:"leader"`
}

// Streams reads the node's GET /sse/streams (1 s timeout: a stopped node
// does not answer).
func (n *node) Streams() ([]hub, error) {
	resp, err := (&http.Client{Timeout: time.Second}).Get(n.AdminBase() + "/sse/streams")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("%s GET /sse/streams: %s: %s", n.name, resp.Status, body)
	}
	var v struct {
		Streams []hub `json:"streams"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return nil, fmt.Errorf("%s GET /sse/streams: %v: %s", n.name, err, body)
	}
	return v.Streams, nil
}

// Leads reports whether the node says it leads the fan-out hub of path.
func (n *node) Leads(path string) (bool, error) {
	hubs, err := n.Streams()
	if err != nil {
		return false, err
	}
	for _, h := range hubs {
		if h.Mode == "fanout" && h.Path == path && h.Leader != nil && *h.Leader {
			return true, nil
		}
	}
	return false, nil
}

// cluster is a redis-server, N nodes, a load balancer and a backend.
type cluster struct {
	t       testing.TB
	redis   *redistest.Server // nil in memory mode
	backend *backend
	nodes   []*node
	lb      *node
	opts    clusterOpts
}

type clusterOpts struct {
	nodes    int           // default 3
	persist  bool          // redis appendonly
	memory   bool          // no cluster block: each node alone (harness self-tests)
	interval time.Duration // the backend's event interval; default 20 ms
	sseExtra string        // lines added to each node's sse block
	// oneProcess serves every node's port from one Caddy process (with
	// memory): hubs are shared in-process, so it behaves as a perfect
	// cluster would for clients, and checks the cluster tests' own logic
	// today. Signals then hit every "node" at once.
	oneProcess bool
}

// startCluster starts everything; all of it ends when t does.
func startCluster(t testing.TB, o clusterOpts) *cluster {
	t.Helper()
	needCaddy(t)
	if o.nodes == 0 {
		o.nodes = 3
	}
	if o.interval == 0 {
		o.interval = 20 * time.Millisecond
	}
	cl := &cluster{t: t, opts: o}
	if !o.memory {
		cl.redis = redistest.Start(t, redistest.Options{Persist: o.persist})
	}
	cl.backend = startBackend(t, o.interval)
	for i := 1; i <= o.nodes; i++ {
		n := cl.newNode(fmt.Sprintf("node%d", i))
		n.cfg = cl.nodeConfig(n, n.name)
		cl.nodes = append(cl.nodes, n)
		if !o.oneProcess {
			n.start()
		}
	}
	if o.oneProcess {
		first := cl.nodes[0]
		first.cfg = globalOptions(first, "INFO")
		for _, n := range cl.nodes {
			first.cfg += cl.siteBlock(n, n.name)
		}
		first.start()
		for _, n := range cl.nodes[1:] {
			n.p = first.p
			waitListen(t, n.p, fmt.Sprintf("127.0.0.1:%d", n.port), first.log, 10*time.Second)
		}
	}
	cl.lb = cl.newNode("lb")
	cl.lb.cfg = cl.lbConfig()
	cl.lb.start()
	// Runs before the nodes stop (cleanups run last first): with the
	// backend's streams ended, no hub holds a node's shutdown up.
	t.Cleanup(cl.backend.stop)
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range append(cl.nodes, cl.lb) {
				t.Logf("%s's log ends with:\n%s", n.name, tail(n.log, 25))
			}
		}
	})
	return cl
}

func (cl *cluster) newNode(name string) *node {
	dir := cl.t.TempDir()
	n := &node{t: cl.t, name: name, port: freePort(cl.t), admin: freePort(cl.t), dir: dir, log: filepath.Join(dir, "caddy.log")}
	cl.t.Cleanup(func() { n.p.end(syscall.SIGTERM, 3*time.Second) })
	return n
}

// globalOptions is the head of every Caddyfile: admin on its own port,
// nothing persisted or written outside the node's dir, a short grace
// period so a reload or stop never waits long, logs to stderr (the log
// file) from level on.
func globalOptions(n *node, level string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	auto_https off
	grace_period 2s
	storage file_system {
		root %s
	}
	log {
		output stderr
		level %s
	}
}
`, n.admin, filepath.Join(n.dir, "storage"), level)
}

// nodeConfig is a node's Caddyfile; label goes into its X-SSE-Node header
// (a reload can change it, to tell old and new config apart). The key is
// the path alone: the default key holds the Host, which differs per node
// when clients address nodes directly.
func (cl *cluster) nodeConfig(n *node, label string) string {
	return globalOptions(n, "INFO") + cl.siteBlock(n, label)
}

// siteBlock is a node's site: its port, its X-SSE-Node header, sse with
// fan-out (in cluster mode unless opts.memory) and reverse_proxy to the
// backend.
func (cl *cluster) siteBlock(n *node, label string) string {
	clusterBlock := ""
	if !cl.opts.memory {
		clusterBlock = fmt.Sprintf(`
				cluster redis {
					address redis://%s/0
					prefix  sse:
				}`, cl.redis.Addr)
	}
	return fmt.Sprintf(`
:%d {
	bind 127.0.0.1
	header X-SSE-Node %s
	route {
		sse {
			retry 300ms
			%s
			fanout {
				key {http.request.uri.path}%s
			}
		}
		reverse_proxy %s
	}
}
`, n.port, label, cl.opts.sseExtra, clusterBlock, cl.backend.addr)
}

// reload gives target the label (its X-SSE-Node) in a config reload. With
// oneProcess the one process reloads, with only target's label changed.
func (cl *cluster) reload(target *node, label string) {
	cl.t.Helper()
	if !cl.opts.oneProcess {
		target.Reload(cl.nodeConfig(target, label))
		return
	}
	owner := cl.nodes[0]
	cfg := globalOptions(owner, "INFO")
	for _, n := range cl.nodes {
		l := n.name
		if n == target {
			l = label
		}
		cfg += cl.siteBlock(n, l)
	}
	owner.Reload(cfg)
}

// lbConfig balances over the nodes at random, streaming (flush_interval
// -1); a node that refuses connections is skipped and retried for 3 s.
func (cl *cluster) lbConfig() string {
	var ups []string
	for _, n := range cl.nodes {
		ups = append(ups, fmt.Sprintf("127.0.0.1:%d", n.port))
	}
	// ERROR: every client that hops away is an "aborting with incomplete
	// response" warning of reverse_proxy, which would bury the output.
	return globalOptions(cl.lb, "ERROR") + fmt.Sprintf(`
:%d {
	bind 127.0.0.1
	reverse_proxy %s {
		lb_policy random
		flush_interval -1
		lb_try_duration 3s
		lb_try_interval 100ms
		fail_duration 5s
	}
}
`, cl.lb.port, strings.Join(ups, " "))
}

// aliveNodes returns the base URLs of the nodes that run and are not
// stopped.
func (cl *cluster) aliveNodes() []string {
	var out []string
	for _, n := range cl.nodes {
		if n.Alive() {
			out = append(out, n.Base())
		}
	}
	return out
}

// lbOnly is the load balancer's URL, as a target list.
func (cl *cluster) lbOnly() []string { return []string{cl.lb.Base()} }

// leaders returns the running nodes that say they lead path.
func (cl *cluster) leaders(path string) ([]*node, error) {
	var out []*node
	for _, n := range cl.nodes {
		if !n.Alive() {
			continue
		}
		ok, err := n.Leads(path)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, n)
		}
	}
	return out, nil
}

// waitLeader waits until exactly one running node leads path, and returns
// it.
func (cl *cluster) waitLeader(path string, within time.Duration) *node {
	cl.t.Helper()
	var leader *node
	waitFor(cl.t, within, "one leader for "+path, func() string {
		ls, err := cl.leaders(path)
		if err != nil {
			return err.Error()
		}
		if len(ls) != 1 {
			var names []string
			for _, n := range ls {
				names = append(names, n.name)
			}
			return fmt.Sprintf("%d leaders %v", len(ls), names)
		}
		leader = ls[0]
		return ""
	})
	return leader
}
