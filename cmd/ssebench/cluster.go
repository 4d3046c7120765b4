package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The "cluster" proxy: -cluster-nodes Caddy processes with the plugin in
// cluster mode, sharing one redis-server the bench starts, in front of the
// same emitter. Clients are spread evenly over the nodes (no load balancer:
// it would add its own CPU and latency to what is measured). The proxy's
// CPU and memory are the sum over the nodes, so CPU per delivered event
// compares with single-node fan-out as the cost of the whole cluster;
// redis-server's CPU and its command counts (INFO commandstats) are
// reported apart.
//
// The "nodes" proxy is the same without the cluster block and without
// Redis: -cluster-nodes independent fan-out nodes, each with its own
// upstream and cache (what several nodes behind a load balancer did before
// cluster mode). It is the baseline that shows what sharing costs.

// clusterRun is one running cluster.
type clusterRun struct {
	redis     *proc
	redisAddr string
	nodes     []*proc
	addrs     []string // the nodes' listen addresses, in order
}

// launchCluster starts redis-server and the nodes in dir, and returns once
// every node serves the emitter's stream (probeSSE on each: the first probe
// also elects the leader).
func launchCluster(cfg config, kind, dir, upstream string, startTO, probeTO time.Duration, wantEvent bool) (*clusterRun, error) {
	if kind == "cluster" && cfg.redisBin == "" {
		return nil, errors.New("cluster: no redis-server binary (put one on PATH or pass -redis)")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cl := &clusterRun{}
	ok := false
	defer func() {
		if !ok {
			cl.stop(time.Second)
		}
	}()
	if kind == "cluster" {
		var err error
		if cl.redisAddr, err = freePort(); err != nil {
			return nil, err
		}
		_, port, _ := net.SplitHostPort(cl.redisAddr)
		// No persistence: the bench measures the steady state, not fsyncs.
		cl.redis, err = startProc("redis-server", []string{cfg.redisBin, "--port", port, "--bind", "127.0.0.1",
			"--dir", dir, "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"}, dir, os.Environ())
		if err != nil {
			return nil, err
		}
		if err := cl.redis.waitReady(cl.redisAddr, startTO); err != nil {
			return nil, err
		}
	}
	for i := 1; i <= cfg.clusterNodes; i++ {
		listen, err := freePort()
		if err != nil {
			return nil, err
		}
		ndir := filepath.Join(dir, fmt.Sprintf("node%d", i))
		if err := os.MkdirAll(ndir, 0o755); err != nil {
			return nil, err
		}
		cf, err := caddyfile(proxySpec{kind: kind, listen: listen, upstream: upstream, sseOpts: cfg.sseOpts, h2: cfg.h2, redis: cl.redisAddr})
		if err != nil {
			return nil, err
		}
		path := filepath.Join(ndir, "Caddyfile")
		if err := os.WriteFile(path, []byte(cf), 0o644); err != nil {
			return nil, err
		}
		env := append(os.Environ(), "XDG_CONFIG_HOME="+ndir, "XDG_DATA_HOME="+ndir)
		p, err := startProc(fmt.Sprintf("%s node%d", kind, i), []string{cfg.caddyBin, "run", "--config", path, "--adapter", "caddyfile"}, ndir, env)
		if err != nil {
			return nil, err
		}
		cl.nodes = append(cl.nodes, p)
		cl.addrs = append(cl.addrs, listen)
		if err := p.waitReady(listen, startTO); err != nil {
			return nil, err
		}
	}
	for i, addr := range cl.addrs {
		if err := probeSSE(addr, "/events", probeTO, wantEvent, cfg.h2); err != nil {
			return nil, fmt.Errorf("%s node%d listens on %s but does not serve the emitter's SSE: %v; its output ends with:\n%s", kind, i+1, addr, err, cl.nodes[i].out.indented())
		}
	}
	ok = true
	return cl, nil
}

// stop ends the nodes, then redis-server.
func (cl *clusterRun) stop(grace time.Duration) {
	for _, p := range cl.nodes {
		p.stop(grace)
	}
	if cl.redis != nil {
		cl.redis.stop(grace)
	}
}

// exited returns an error naming the first process of the cluster that
// exited.
func (cl *clusterRun) exited() error {
	for _, p := range append(append([]*proc{}, cl.nodes...), cl.redis) {
		if p == nil {
			continue
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited during the run (%v); its output ends with:\n%s", p.name, p.err, p.out.indented())
		default:
		}
	}
	return nil
}

// sampleNodes sums the samples of every node.
func (cl *clusterRun) sampleNodes() (procSample, error) {
	var pids []int
	for _, p := range cl.nodes {
		pids = append(pids, p.pid())
	}
	return sampleSum(pids)
}

// sampleSum measures several process trees as one: CPU, schedstat and RSS
// add up; the schedstat sum is unavailable (-1) if any is.
func sampleSum(pids []int) (procSample, error) {
	sum := procSample{at: time.Now()}
	var firstErr error
	for _, pid := range pids {
		s, err := sampleTree(pid)
		if err != nil && firstErr == nil {
			firstErr = err
		}
		sum.cpu += s.cpu
		if sum.sched >= 0 && s.sched >= 0 {
			sum.sched += s.sched
		} else {
			sum.sched = -1
		}
		sum.rss += s.rss
		sum.procs += s.procs
	}
	return sum, firstErr
}

// redisStats are the counters read from INFO commandstats.
type redisStats struct {
	calls map[string]int64 // per command name (lower case), every call, those made by scripts included
}

// total sums the calls of every command but those in skip.
func (s redisStats) total(skip ...string) int64 {
	var n int64
outer:
	for name, c := range s.calls {
		for _, k := range skip {
			if name == k {
				continue outer
			}
		}
		n += c
	}
	return n
}

// diff returns b - a per command.
func (b redisStats) diff(a redisStats) redisStats {
	d := redisStats{calls: map[string]int64{}}
	for name, c := range b.calls {
		if c -= a.calls[name]; c != 0 {
			d.calls[name] = c
		}
	}
	return d
}

// top lists the n commands called most, "name=calls".
func (s redisStats) top(n int) string {
	type kv struct {
		k string
		v int64
	}
	var l []kv
	for k, v := range s.calls {
		l = append(l, kv{k, v})
	}
	sort.Slice(l, func(i, j int) bool { return l[i].v > l[j].v || l[i].v == l[j].v && l[i].k < l[j].k })
	var parts []string
	for i, e := range l {
		if i == n {
			break
		}
		parts = append(parts, fmt.Sprintf("%s=%d", e.k, e.v))
	}
	return strings.Join(parts, " ")
}

// parseCommandStats reads the body of INFO commandstats: lines like
// "cmdstat_evalsha:calls=10,usec=...". Sub-commands ("cmdstat_client|setname")
// keep their full name.
func parseCommandStats(body string) (redisStats, error) {
	s := redisStats{calls: map[string]int64{}}
	for _, line := range strings.Split(body, "\n") {
		line = strings.TrimSpace(line)
		name, rest, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		for _, f := range strings.Split(rest, ",") {
			if v, ok := strings.CutPrefix(f, "calls="); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					return s, fmt.Errorf("commandstats %q: %v", line, err)
				}
				s.calls[strings.ToLower(strings.TrimPrefix(name, "cmdstat_"))] = n
			}
		}
	}
	return s, nil
}

// readRedisStats asks redis-server at addr for INFO commandstats, over a
// fresh connection in plain RESP (the bench has no Redis client library,
// and needs none for one command).
func readRedisStats(addr string) (redisStats, error) {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return redisStats{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n"); err != nil {
		return redisStats{}, err
	}
	br := bufio.NewReader(c)
	head, err := br.ReadString('\n')
	if err != nil {
		return redisStats{}, err
	}
	head = strings.TrimRight(head, "\r\n")
	if !strings.HasPrefix(head, "$") {
		return redisStats{}, fmt.Errorf("INFO commandstats: unexpected reply %q", head)
	}
	n, err := strconv.Atoi(head[1:])
	if err != nil || n < 0 {
		return redisStats{}, fmt.Errorf("INFO commandstats: reply %q", head)
	}
	body := make([]byte, n+2)
	if _, err := io.ReadFull(br, body); err != nil {
		return redisStats{}, err
	}
	return parseCommandStats(string(bytes.TrimRight(body, "\r\n")))
}

// redisSample is redis-server's CPU and command counts at one instant.
type redisSample struct {
	proc  procSample
	stats redisStats
	err   error
}

// sampleRedis samples redis-server; on a nil cluster it returns nothing.
func (cl *clusterRun) sampleRedis() redisSample {
	if cl == nil || cl.redis == nil {
		return redisSample{}
	}
	var s redisSample
	s.proc, s.err = sampleTree(cl.redis.pid())
	if st, err := readRedisStats(cl.redisAddr); err != nil {
		s.err = errors.Join(s.err, err)
	} else {
		s.stats = st
	}
	return s
}

// clusterSummary fills the cluster's own columns of res from the Redis
// samples taken at the window's ends: Redis CPU per delivered event (to add
// to the nodes' for the whole cost) and commands per event the emitter
// sent, which must not grow with the clients.
func clusterSummary(res *result, cl *clusterRun, r0, r1 redisSample) {
	res.Nodes = len(cl.nodes)
	if cl.redis == nil {
		return
	}
	if err := errors.Join(r0.err, r1.err); err != nil {
		logf("  sampling redis-server: %v", err)
		return
	}
	cpu := cpuBetween(r0.proc, r1.proc)
	res.RedisCPUPercent = 100 * cpu.Seconds() / r1.proc.at.Sub(r0.proc.at).Seconds()
	if res.Delivered > 0 {
		res.RedisCPUPerEvUs = float64(cpu) / float64(time.Microsecond) / float64(res.Delivered)
	}
	d := r1.stats.diff(r0.stats)
	// Our own INFO is not the cluster's work.
	delete(d.calls, "info")
	res.RedisTop = d.top(8)
	if res.Emitted > 0 {
		res.RedisCallsPerEv = float64(d.total()) / float64(res.Emitted)
		res.RedisScriptsPerEv = float64(d.calls["evalsha"]+d.calls["eval"]+d.calls["fcall"]) / float64(res.Emitted)
	}
}
