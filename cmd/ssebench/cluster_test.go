package main

import (
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestClusterCaddyfile(t *testing.T) {
	cf, err := caddyfile(proxySpec{kind: "cluster", listen: "127.0.0.1:8080", upstream: "127.0.0.1:9090", redis: "127.0.0.1:6379", sseOpts: []string{"heartbeat 5s"}})
	if err != nil {
		t.Fatal(err)
	}
	want := "\t\tsse {\n\t\t\tfanout {\n\t\t\t\tkey {http.request.uri.path}\n\t\t\t\tcluster redis {\n\t\t\t\t\taddress redis://127.0.0.1:6379/0\n\t\t\t\t\tprefix sse:\n\t\t\t\t}\n\t\t\t}\n\t\t\theartbeat 5s\n\t\t}\n\t\treverse_proxy 127.0.0.1:9090\n"
	if !strings.Contains(cf, want) {
		t.Errorf("cluster Caddyfile lacks\n%s\nin\n%s", want, cf)
	}
	if strings.Count(cf, "{") != strings.Count(cf, "}") {
		t.Errorf("unbalanced braces:\n%s", cf)
	}
}

func TestParseCommandStats(t *testing.T) {
	body := "# Commandstats\r\ncmdstat_evalsha:calls=100,usec=900,usec_per_call=9.00,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_xadd:calls=100,usec=100,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_client|setname:calls=3,usec=1,usec_per_call=0.33,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_info:calls=7,usec=70,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n"
	s, err := parseCommandStats(body)
	if err != nil {
		t.Fatal(err)
	}
	if s.calls["evalsha"] != 100 || s.calls["xadd"] != 100 || s.calls["client|setname"] != 3 || s.calls["info"] != 7 {
		t.Fatalf("parsed %v", s.calls)
	}
	if n := s.total(); n != 210 {
		t.Errorf("total %d, want 210", n)
	}
	if n := s.total("info"); n != 203 {
		t.Errorf("total without info %d, want 203", n)
	}
	before := redisStats{calls: map[string]int64{"evalsha": 40, "xadd": 40, "info": 6}}
	d := s.diff(before)
	if d.calls["evalsha"] != 60 || d.calls["info"] != 1 || d.calls["client|setname"] != 3 {
		t.Errorf("diff %v", d.calls)
	}
	if got := d.top(2); got != "evalsha=60 xadd=60" {
		t.Errorf("top(2) = %q", got)
	}
	if _, err := parseCommandStats("cmdstat_x:calls=abc"); err == nil {
		t.Error("a bad count must be an error")
	}
}

func TestLoadGenSpreadsOverNodes(t *testing.T) {
	g := newLoadGen(clientConfig{addr: "a", more: []string{"b", "c"}}, newLoadStats())
	counts := map[string]int{}
	for i := 0; i < 9; i++ {
		counts[g.target()]++
	}
	if counts["a"] != 3 || counts["b"] != 3 || counts["c"] != 3 {
		t.Errorf("9 connections over 3 nodes: %v", counts)
	}
	one := newLoadGen(clientConfig{addr: "a"}, newLoadStats())
	for i := 0; i < 2; i++ {
		if got := one.target(); got != "a" {
			t.Errorf("without more addresses every connection goes to addr, not %q", got)
		}
	}
}

func TestClusterTable(t *testing.T) {
	rs := []result{
		{Proxy: "fanout", Clients: 900, Mode: "stream", CPUPerEvUs: 2, P99us: 5000, Delivered: 1},
		{Proxy: "cluster", Clients: 900, Mode: "stream", Nodes: 3, CPUPerEvUs: 2.4, RedisCPUPerEvUs: 0.2, P99us: 7500, Delivered: 1, RedisCallsPerEv: 12, RedisScriptsPerEv: 1, RedisTop: "evalsha=10"},
	}
	var b strings.Builder
	writeClusterTable(&b, rs)
	for _, w := range []string{"| cluster | 900 | 3 | 2.40 | 1.20× | 0.20 | 1.30× | 7.5 | +2.5 |", "12.0 | 1.00 | evalsha=10 |"} {
		if !strings.Contains(b.String(), w) {
			t.Errorf("table lacks %q:\n%s", w, b.String())
		}
	}
	b.Reset()
	writeClusterTable(&b, append(rs, result{Proxy: "nodes", Clients: 900, Mode: "stream", Nodes: 3, CPUPerEvUs: 2.2, P99us: 5000, Delivered: 1}))
	if w := "| nodes | 900 | 3 | 2.20 | 1.10× | – | – | 5.0 | +0.0 | – | – | – |  |"; !strings.Contains(b.String(), w) {
		t.Errorf("table lacks %q:\n%s", w, b.String())
	}
	b.Reset()
	writeClusterTable(&b, rs[:1])
	if b.Len() != 0 {
		t.Errorf("no cluster results, yet a table:\n%s", b.String())
	}
}

// startTestRedis starts a redis-server for t (skipped without one).
func startTestRedis(t *testing.T) (*proc, string) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("SSE_REQUIRE_REDIS") == "1" {
			t.Fatalf("redis-server not found and SSE_REQUIRE_REDIS=1: %v", err)
		}
		t.Skip("redis-server not installed")
	}
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(addr)
	dir := t.TempDir()
	p, err := startProc("redis-server", []string{bin, "--port", port, "--bind", "127.0.0.1", "--dir", dir, "--save", "", "--appendonly", "no"}, dir, os.Environ())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.stop(time.Second) })
	if err := p.waitReady(addr, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return p, addr
}

// TestReadRedisStats asks a real redis-server.
func TestReadRedisStats(t *testing.T) {
	_, addr := startTestRedis(t)
	if _, err := readRedisStats(addr); err != nil {
		t.Fatal(err)
	}
	s, err := readRedisStats(addr)
	if err != nil {
		t.Fatal(err)
	}
	if s.calls["info"] < 1 {
		t.Errorf("after one INFO, commandstats say %v", s.calls)
	}
}

// TestClusterSummary: Redis's commands in the window, per emitted event,
// without the bench's own INFO.
func TestClusterSummary(t *testing.T) {
	p, addr := startTestRedis(t)
	cl := &clusterRun{redis: p, redisAddr: addr, nodes: []*proc{p}}
	r0 := cl.sampleRedis()
	for i := 0; i < 10; i++ { // 10 "events", 2 commands each
		for _, cmd := range []string{"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"} {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte(cmd))
			c.Read(make([]byte, 64))
			c.Close()
		}
	}
	r1 := cl.sampleRedis()
	res := result{Emitted: 10, Delivered: 100}
	clusterSummary(&res, cl, r0, r1)
	if res.Nodes != 1 || res.RedisCallsPerEv != 2 || res.RedisScriptsPerEv != 0 {
		t.Errorf("nodes %d, calls/event %v, scripts/event %v; want 1, 2, 0 (%s)", res.Nodes, res.RedisCallsPerEv, res.RedisScriptsPerEv, res.RedisTop)
	}
	if res.RedisTop != "get=10 set=10" {
		t.Errorf("top commands %q", res.RedisTop)
	}
}

// TestSampleSum: the cluster's sample adds its nodes' up.
func TestSampleSum(t *testing.T) {
	self := os.Getpid()
	one, err := sampleTree(self)
	if err != nil {
		t.Fatal(err)
	}
	two, err := sampleSum([]int{self, self})
	if err != nil {
		t.Fatal(err)
	}
	if two.procs != 2*one.procs || two.rss < one.rss*3/2 || two.cpu < one.cpu*2 {
		t.Errorf("one sample %+v, the same process twice %+v: not a sum", one, two)
	}
	if _, err := sampleSum([]int{self, 1 << 30}); err == nil {
		t.Error("a missing process must be reported")
	}
}
