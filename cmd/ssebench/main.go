// Command ssebench is caddy-sse's reproducible load benchmark. It compares,
// on one machine and in one run, the plugin in fan-out mode, the plugin in
// pass-through mode, plain reverse_proxy and optionally encode gzip and
// nginx, all as real processes in front of the same SSE backend.
//
// Usage (from the repository root):
//
//	go run ./cmd/ssebench -clients 100,1000,5000 -duration 10s -out docs/bench
//	go run ./cmd/ssebench -idle -clients 10000 -proxies passthrough,reverse_proxy
//	go run ./cmd/ssebench -burst 50 -rate 1 -clients 1000
//
// What it does, for every client count (-clients) and every proxy
// (-proxies), one after another:
//
//  1. An in-process emitter (the backend) sends the same events to all of
//     its connections at the same instant, -rate events per second; each
//     event (id = sequence number, ~-size bytes of JSON carrying its send
//     time in nanoseconds) is serialized once and the same bytes are written
//     to every connection.
//  2. The proxy runs as its own process group, built from ./cmd/caddy (or
//     -caddy PATH), with a generated Caddyfile (admin off, auto_https off,
//     log level WARN) or nginx.conf (proxy_buffering off). The bench waits
//     for its port and one SSE probe request, with deadlines; when it does
//     not come up the run fails with the tail of its output.
//  3. Its idle CPU time and VmRSS are read from /proc, then -clients SSE
//     clients (one HTTP/1.1 TCP connection each, or with -h2 one h2c
//     connection carrying one stream each, spread over several loopback
//     source addresses) connect at -ramp-rate per second. After
//     -settle, a window of -duration measures delivered events/s (and the
//     share of what the emitter sent times the connected clients), latency
//     from send time to receipt (p50, p99, max; from a log-linear
//     histogram), connect errors and disconnects, and the proxy's CPU time
//     and RSS growth over its idle baseline: CPU µs per delivered event and
//     KiB per client.
//  4. Everything it started is ended (SIGTERM then SIGKILL to the process
//     group), also on errors, SIGINT, panics and the global -timeout.
//
// It prints a markdown table (ratios against plain reverse_proxy at the
// same client count are the headline: absolute figures drift on a shared
// machine) and with -out DIR writes DIR/<name>.md, .svg and .json (-replot
// FILE.json writes the .md and .svg of a JSON file again). With
// -repeat R the proxies take turns R times per client count and each row is
// the run with the median CPU cost. Events sent during the window count
// however late they arrive (up to -drain after it), so the delivered share
// is exact and slow deliveries show in the latency instead of vanishing.
//
// Modes: the default streams events; -idle sends no events (the plugin's
// heartbeat set by -heartbeat keeps streams alive) to measure memory per
// idle connection; -burst K sends K events at once, -rate times per
// second, and reports deliveries per second across clients (clients*K
// over the median time until a burst's last delivery).
//
// Proxies: fanout (sse { fanout } + reverse_proxy), passthrough (sse +
// reverse_proxy), reverse_proxy, encode_gzip (encode gzip +
// reverse_proxy), nginx (when an nginx binary is on PATH or given with
// -nginx) and direct (no proxy; measures the load generator itself). The
// default "auto" runs fanout and passthrough when the Caddy binary accepts
// them, reverse_proxy, and nginx when found. Two multi-process proxies are
// only run when named: cluster (-cluster-nodes Caddy nodes in fan-out
// cluster mode sharing a redis-server the bench starts; clients spread
// evenly over the nodes; CPU summed over the nodes, Redis's CPU and INFO
// commandstats reported apart) and nodes (the same nodes without the
// cluster block or Redis: independent fan-out nodes). See cluster.go.
//
// It needs Linux (/proc, process groups). Run it on an otherwise quiet
// machine; the clients and emitter share the CPUs with the proxy, and the
// table reports the bench's own CPU use for that reason.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type config struct {
	caddyBin  string
	nginxBin  string
	redisBin  string
	proxies   []string
	clients   []int
	rate      float64
	size      int
	duration  time.Duration
	settle    time.Duration
	drain     time.Duration
	startTO   time.Duration
	repeat    int
	rampRate  float64
	timeout   time.Duration
	compress  string
	idle      bool
	heartbeat string
	sseOpts   []string
	burst     int
	srcAddrs  int
	h2        bool
	out       string
	name      string
	keep      bool
	verbose   bool
	// clusterNodes is how many Caddy nodes the "cluster" proxy runs.
	clusterNodes int
}

func main() {
	if err := mainErr(); err != nil {
		fmt.Fprintln(os.Stderr, "ssebench:", err)
		killAll()
		os.Exit(1)
	}
}

func mainErr() (err error) {
	var cfg config
	var proxies, clients, sseOpts string
	flag.StringVar(&cfg.caddyBin, "caddy", "", "Caddy binary with the plugin (default: go build ./cmd/caddy into a temp dir)")
	flag.StringVar(&cfg.nginxBin, "nginx", "", "nginx binary (default: nginx on PATH, if any)")
	flag.StringVar(&cfg.redisBin, "redis", "", "redis-server binary for the cluster proxy (default: redis-server on PATH, if any)")
	flag.IntVar(&cfg.clusterNodes, "cluster-nodes", 3, "Caddy nodes of the cluster proxy; its clients are spread evenly over them")
	flag.StringVar(&proxies, "proxies", "auto", "comma-separated proxies: "+strings.Join(proxyKinds, ",")+"; auto = those available of fanout,passthrough,reverse_proxy,nginx")
	flag.StringVar(&clients, "clients", "100,1000", "comma-separated client counts")
	flag.Float64Var(&cfg.rate, "rate", 10, "events per second (bursts per second with -burst)")
	flag.IntVar(&cfg.size, "size", 200, "approximate bytes of each event's data line")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "measurement window per proxy and client count")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "wait between the last client connecting and the window")
	flag.DurationVar(&cfg.drain, "drain", 5*time.Second, "after the window, how long to wait at most for its events still in flight")
	flag.IntVar(&cfg.repeat, "repeat", 1, "run every proxy this many times per client count, taking turns, and report the run with the median CPU cost")
	flag.DurationVar(&cfg.startTO, "start-timeout", 30*time.Second, "how long a proxy may take to listen before the run fails")
	flag.Float64Var(&cfg.rampRate, "ramp-rate", 2000, "new client connections per second")
	flag.DurationVar(&cfg.timeout, "timeout", 15*time.Minute, "bound on the whole run")
	flag.StringVar(&cfg.compress, "compress", "auto", "Accept-Encoding of the clients: none, gzip, zstd, or auto (gzip for encode_gzip, none otherwise)")
	flag.BoolVar(&cfg.idle, "idle", false, "idle streams: no events, only the plugin's heartbeats; measures memory per connection")
	flag.StringVar(&cfg.heartbeat, "heartbeat", "5s", "plugin heartbeat interval in -idle mode (\"\" leaves the plugin's default)")
	flag.StringVar(&sseOpts, "sse-opts", "", "extra lines for the sse block, separated by ';' (e.g. \"padding off;retry 2s\")")
	flag.IntVar(&cfg.burst, "burst", 0, "burst mode: send this many events at once, -rate times per second")
	flag.IntVar(&cfg.srcAddrs, "src-addrs", 8, "loopback source addresses to spread client connections over (127.0.0.2 and up)")
	flag.BoolVar(&cfg.h2, "h2", false, "clients speak HTTP/2 over cleartext (h2c, prior knowledge), one TCP connection with one stream each, instead of HTTP/1.1; Caddy proxies then accept h2c (protocols h1 h2c), nginx gets listen ... http2, direct is refused (the emitter speaks HTTP/1.1 only). Wire bytes then count the response body bytes read (compressed, without HTTP/2 framing: there is no chunk framing)")
	flag.StringVar(&cfg.out, "out", "", "directory to write <name>.md, <name>.svg and <name>.json into (e.g. docs/bench)")
	flag.StringVar(&cfg.name, "name", "", "base name of the -out files (default: stream, idle or burst; with -h2 stream-h2 etc.)")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the temp dir with configs and binaries")
	flag.BoolVar(&cfg.verbose, "v", false, "log progress details")
	replotFile := flag.String("replot", "", "write the .md and .svg of an earlier -out JSON file again, without measuring")
	emitOnly := flag.Bool("emit-only", false, "only run the emitter (at -rate, -burst, -size) until interrupted or -timeout, and print its address: for debugging a proxy by hand")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	if *replotFile != "" {
		return replot(*replotFile)
	}
	if cfg.clients, err = parseInts(clients); err != nil {
		return fmt.Errorf("-clients: %w", err)
	}
	if cfg.clusterNodes < 1 {
		return errors.New("-cluster-nodes must be at least 1")
	}
	if cfg.repeat < 1 {
		return errors.New("-repeat must be at least 1")
	}
	if cfg.idle && cfg.burst > 0 {
		return errors.New("-idle and -burst exclude each other")
	}
	if cfg.rate <= 0 && !cfg.idle {
		return errors.New("-rate must be positive")
	}
	switch cfg.compress {
	case "auto", "none", "gzip", "zstd":
	default:
		return fmt.Errorf("-compress %q: want none, gzip, zstd or auto", cfg.compress)
	}
	for _, o := range strings.Split(sseOpts, ";") {
		if o = strings.TrimSpace(o); o != "" {
			cfg.sseOpts = append(cfg.sseOpts, o)
		}
	}
	if cfg.idle && cfg.heartbeat != "" {
		cfg.sseOpts = append([]string{"heartbeat " + cfg.heartbeat}, cfg.sseOpts...)
	}
	if cfg.name == "" {
		cfg.name = mode(cfg)
		if cfg.h2 {
			cfg.name += "-h2"
		}
	}

	// Bounded in time, whatever happens: the context ends the work, and a
	// watchdog kills everything if cleanup itself hangs.
	sigCtx, interrupt := context.WithCancelCause(context.Background())
	defer interrupt(nil)
	ctx, cancel := context.WithTimeoutCause(sigCtx, cfg.timeout, fmt.Errorf("-timeout %s reached", cfg.timeout))
	defer cancel()
	watchdog := time.AfterFunc(cfg.timeout+30*time.Second, func() {
		fmt.Fprintln(os.Stderr, "ssebench: -timeout passed and cleanup did not finish; killing everything")
		killAll()
		os.Exit(3)
	})
	defer watchdog.Stop()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "ssebench: %v: stopping (again to kill at once)\n", s)
		interrupt(fmt.Errorf("interrupted (%v)", s))
		<-sigs
		killAll()
		os.Exit(130)
	}()
	defer func() {
		if r := recover(); r != nil {
			killAll()
			panic(r)
		}
	}()
	defer killAll()

	nofile, err := raiseNoFile()
	if err != nil {
		logf("could not raise RLIMIT_NOFILE (%d): %v", nofile, err)
	}
	if *emitOnly {
		em, err := startEmitter()
		if err != nil {
			return err
		}
		defer em.close()
		stop := make(chan struct{})
		defer close(stop)
		goSafe(func() { em.run(stop, emitInterval(cfg), max(cfg.burst, 1), cfg.size) })
		fmt.Printf("emitter on http://%s/ (any path); stop with ^C\n", em.addr)
		<-ctx.Done()
		return nil
	}

	tmp, err := os.MkdirTemp("", "ssebench-")
	if err != nil {
		return err
	}
	os.Chmod(tmp, 0o755) // nginx workers may run as another user
	if cfg.keep {
		logf("keeping %s", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}

	if err := resolveBinaries(ctx, &cfg, tmp); err != nil {
		return err
	}
	if cfg.proxies, err = resolveProxies(ctx, proxies, cfg, tmp); err != nil {
		return err
	}
	var tooMany []string
	for _, n := range cfg.clients {
		for _, kind := range cfg.proxies {
			if need := fdsNeeded(kind, n); uint64(need) > nofile {
				tooMany = append(tooMany, fmt.Sprintf("%s with %d clients needs about %d", kind, n, need))
			}
		}
	}
	if len(tooMany) > 0 {
		return fmt.Errorf("RLIMIT_NOFILE is %d and cannot be raised further here (that needs root with CAP_SYS_RESOURCE, or a higher hard limit): %s file descriptors in one process", nofile, strings.Join(tooMany, "; "))
	}

	em, err := startEmitter()
	if err != nil {
		return err
	}
	defer em.close()
	stopEmit := make(chan struct{})
	defer close(stopEmit)
	goSafe(func() { em.run(stopEmit, emitInterval(cfg), max(cfg.burst, 1), cfg.size) })

	env := describeMachine(cfg)
	fmt.Println(env)
	fmt.Printf("mode %s, proxies %s, clients %v (%s), window %s\n\n", mode(cfg), strings.Join(cfg.proxies, ","), cfg.clients, protocol(cfg), cfg.duration)

	var results []result
	var runErr error
outer:
	for _, n := range cfg.clients {
		// With -repeat, the proxies take turns, so that a noisy moment on
		// the machine hits one repetition of each rather than all of one.
		reps := map[string][]result{}
		for rep := 1; rep <= cfg.repeat; rep++ {
			for _, kind := range cfg.proxies {
				if ctx.Err() != nil {
					runErr = fmt.Errorf("stopped before %s with %d clients: %w", kind, n, context.Cause(ctx))
					break outer
				}
				if cfg.repeat > 1 {
					logf("%s, %d clients (%d/%d) ...", kind, n, rep, cfg.repeat)
				} else {
					logf("%s, %d clients ...", kind, n)
				}
				r, err := runOne(ctx, cfg, em, kind, n, filepath.Join(tmp, fmt.Sprintf("%s-%d-%d", kind, n, rep)))
				if err != nil {
					runErr = fmt.Errorf("%s with %d clients: %w", kind, n, err)
					break outer
				}
				logf("  %s", summary(r))
				reps[kind] = append(reps[kind], r)
			}
		}
		for _, kind := range cfg.proxies {
			if rs := reps[kind]; len(rs) > 0 {
				results = append(results, medianRun(rs, cfg.idle))
			}
		}
	}

	fmt.Println()
	writeTable(os.Stdout, results)
	writeClusterTable(os.Stdout, results)
	if cfg.out != "" && len(results) > 0 {
		if err := writeOutputs(filepath.Join(cfg.out, cfg.name), newReport(cfg, env, results), true); err != nil && runErr == nil {
			runErr = err
		}
	}
	return runErr
}

// fdsNeeded estimates the file descriptors the busiest process (the proxy,
// or the bench holding the clients and the emitter's ends) needs for n
// clients: two per client where every client has its own upstream.
func fdsNeeded(kind string, n int) int {
	const spare = 128
	if kind == "fanout" || kind == "cluster" || kind == "nodes" {
		return n + spare
	}
	return 2*n + spare
}

// candidateKinds lists the proxies a -proxies value may run, before
// checking what is available.
func candidateKinds(list string) []string {
	if list == "auto" {
		return []string{"fanout", "passthrough", "reverse_proxy", "nginx"}
	}
	var out []string
	for _, p := range strings.Split(list, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// medianRun picks, of repetitions of one proxy at one client count, the
// run with the median proxy CPU cost (per event, or in total when idle),
// so that a row of the table stays one consistent measurement.
func medianRun(rs []result, idle bool) result {
	sorted := append([]result(nil), rs...)
	key := func(r result) float64 {
		if idle || r.Delivered == 0 {
			return r.CPUPercent
		}
		return r.CPUPerEvUs
	}
	sort.SliceStable(sorted, func(i, j int) bool { return key(sorted[i]) < key(sorted[j]) })
	m := sorted[(len(sorted)-1)/2]
	m.Runs = len(rs)
	return m
}

// emitInterval is the time between the emitter's frames; 0 when idle.
func emitInterval(cfg config) time.Duration {
	if cfg.idle {
		return 0
	}
	return time.Duration(float64(time.Second) / cfg.rate)
}

// Client protocols, as results and reports record them.
const (
	protoH1  = "HTTP/1.1"
	protoH2C = "h2c"
)

func protocol(cfg config) string {
	if cfg.h2 {
		return protoH2C
	}
	return protoH1
}

// protocolDesc describes the clients' protocol for a report's header, and
// what its wire bytes count.
func protocolDesc(p string) string {
	switch p {
	case protoH2C:
		return "Clients: HTTP/2 over cleartext (h2c, prior knowledge), one TCP connection with one stream each. Wire bytes are the response body bytes read (as sent, compressed; HTTP/2 frame headers not counted)."
	case protoH1, "":
		return "Clients: HTTP/1.1, one TCP connection each. Wire bytes are the bytes read from the sockets (response bodies as sent: compressed, with chunk framing)."
	}
	return "Clients: " + p + "."
}

func mode(cfg config) string {
	switch {
	case cfg.idle:
		return "idle"
	case cfg.burst > 0:
		return "burst"
	}
	return "stream"
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("empty list")
	}
	return out, nil
}

// resolveBinaries builds Caddy unless -caddy was given and finds nginx.
func resolveBinaries(ctx context.Context, cfg *config, tmp string) error {
	if cfg.caddyBin == "" {
		cfg.caddyBin = filepath.Join(tmp, "caddy")
		logf("building ./cmd/caddy into %s ...", cfg.caddyBin)
		bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(bctx, "go", "build", "-o", cfg.caddyBin, "github.com/seed-b7710c89/caddy-sse/cmd/caddy")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("building cmd/caddy failed (run from the repository, or pass -caddy PATH): %v\n%s", err, tail(string(out), 20))
		}
	} else if _, err := os.Stat(cfg.caddyBin); err != nil {
		return fmt.Errorf("-caddy: %w", err)
	}
	if cfg.nginxBin == "" {
		cfg.nginxBin, _ = exec.LookPath("nginx")
	}
	if cfg.redisBin == "" {
		cfg.redisBin, _ = exec.LookPath("redis-server")
	}
	return nil
}

// resolveProxies expands "auto" and checks that the Caddy binary accepts
// the configuration of each Caddy-based proxy (caddy adapt), so that a
// missing plugin or a missing fanout option fails in a second, not after
// the first runs.
func resolveProxies(ctx context.Context, list string, cfg config, tmp string) ([]string, error) {
	auto := list == "auto"
	want := candidateKinds(list)
	known := map[string]bool{}
	for _, k := range proxyKinds {
		known[k] = true
	}
	var out []string
	for _, kind := range want {
		if !known[kind] {
			return nil, fmt.Errorf("-proxies: unknown proxy %q (known: %s)", kind, strings.Join(proxyKinds, ", "))
		}
		var err error
		switch {
		case kind == "direct" && cfg.h2:
			err = errors.New("-h2: the emitter (direct) speaks HTTP/1.1 only, so there is no h2c to measure without a proxy")
		case kind == "cluster" && cfg.redisBin == "":
			err = errors.New("no redis-server binary on PATH (pass -redis)")
		case isCaddyKind(kind):
			err = adaptCheck(ctx, cfg, kind, tmp)
		case kind == "nginx" && cfg.nginxBin == "":
			err = errors.New("no nginx binary on PATH (pass -nginx)")
		case kind == "nginx" && cfg.h2:
			err = nginxH2Check(ctx, cfg.nginxBin)
		}
		if err != nil {
			if auto {
				logf("skipping %s: %v", kind, firstLine(err.Error()))
				continue
			}
			return nil, fmt.Errorf("proxy %s is not available: %w", kind, err)
		}
		out = append(out, kind)
	}
	if len(out) == 0 {
		return nil, errors.New("no proxy to run")
	}
	return out, nil
}

// nginxH2Check fails unless the nginx binary was built with HTTP/2.
func nginxH2Check(ctx context.Context, nginxBin string) error {
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(vctx, nginxBin, "-V").CombinedOutput()
	if err != nil {
		return fmt.Errorf("-h2: %s -V: %v", nginxBin, err)
	}
	if !strings.Contains(string(out), "--with-http_v2_module") {
		return fmt.Errorf("-h2: %s was built without --with-http_v2_module, so it cannot serve h2c", nginxBin)
	}
	return nil
}

func adaptCheck(ctx context.Context, cfg config, kind, tmp string) error {
	cf, err := caddyfile(proxySpec{kind: kind, listen: "127.0.0.1:1", upstream: "127.0.0.1:2", sseOpts: cfg.sseOpts, h2: cfg.h2, redis: "127.0.0.1:3"})
	if err != nil {
		return err
	}
	path := filepath.Join(tmp, "adapt-"+kind+".Caddyfile")
	if err := os.WriteFile(path, []byte(cf), 0o644); err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(actx, cfg.caddyBin, "adapt", "--config", path, "--adapter", "caddyfile").CombinedOutput()
	if err != nil {
		return fmt.Errorf("caddy adapt rejects its Caddyfile: %s", strings.TrimSpace(tail(string(out), 5)))
	}
	return nil
}

// runOne measures one proxy at one client count.
func runOne(ctx context.Context, cfg config, em *emitter, kind string, n int, dir string) (res result, err error) {
	res = result{Proxy: kind, Clients: n, Mode: mode(cfg), Protocol: protocol(cfg)}
	listen := em.addr
	var p *proc
	var cl *clusterRun // kinds "cluster" and "nodes": the nodes (and redis-server)
	for attempt := 1; ; attempt++ {
		if kind != "direct" {
			if listen, err = freePort(); err != nil {
				return res, err
			}
		}
		// Wait for one event (not in idle mode): two intervals and then some.
		probeTO := 10 * time.Second
		if iv := emitInterval(cfg); iv > 0 {
			probeTO += 2 * iv
		}
		if kind == "cluster" || kind == "nodes" {
			if cl, err = launchCluster(cfg, kind, dir, em.addr, cfg.startTO, probeTO, !cfg.idle); err == nil {
				listen = cl.addrs[0]
			}
		} else {
			p, err = launchProxy(kind, cfg.caddyBin, cfg.nginxBin, dir, proxySpec{kind: kind, listen: listen, upstream: em.addr, sseOpts: cfg.sseOpts, h2: cfg.h2}, cfg.startTO, probeTO, !cfg.idle)
		}
		if err == nil {
			break
		}
		// Another process may take the free port before the proxy binds it.
		if attempt == 3 || !strings.Contains(err.Error(), "address already in use") {
			return res, err
		}
		logf("  port %s was taken, retrying", listen)
	}
	defer func() {
		if p != nil {
			p.stop(3 * time.Second)
		}
		if cl != nil {
			cl.stop(3 * time.Second)
		}
		em.closeConns()
		if !em.waitIdle(5 * time.Second) {
			logf("  emitter connections still open after stopping %s", kind)
		}
	}()

	sample := func() procSample {
		if cl != nil {
			s, err := cl.sampleNodes()
			if err != nil {
				logf("  sampling %s: %v", kind, err)
			}
			return s
		}
		if p == nil {
			return procSample{at: time.Now(), sched: -1}
		}
		s, err := sampleTree(p.pid())
		if err != nil {
			logf("  sampling %s: %v", kind, err)
		}
		return s
	}
	exited := func() error {
		if cl != nil {
			return cl.exited()
		}
		if p == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited during the run (%v); its output ends with:\n%s", kind, p.err, p.out.indented())
		default:
			return nil
		}
	}

	// Idle baseline, after the probe request has been served and closed.
	if err := sleepCtx(ctx, 500*time.Millisecond); err != nil {
		return res, err
	}
	base := sample()

	stats := newLoadStats()
	if cfg.burst > 0 {
		stats.burst = &burstStats{k: uint64(cfg.burst)}
	}
	enc := cfg.compress
	if enc == "auto" {
		enc = "none"
		if kind == "encode_gzip" {
			enc = "gzip"
		}
	}
	if enc == "none" {
		enc = ""
	}
	cc := clientConfig{addr: listen, path: "/events", encoding: enc, dialTO: 10 * time.Second, h2: cfg.h2}
	if cl != nil {
		cc.more = cl.addrs[1:]
	}
	for i := 0; i < cfg.srcAddrs; i++ {
		cc.srcAddrs = append(cc.srcAddrs, net.IPv4(127, 0, 0, byte(2+i)))
	}
	gen := newLoadGen(cc, stats)
	defer gen.closeAll(10 * time.Second)

	rampBudget := time.Duration(float64(n)/cfg.rampRate*float64(time.Second)) + 30*time.Second
	rctx, rcancel := context.WithTimeout(ctx, rampBudget)
	rampStart := time.Now()
	err = gen.ramp(rctx, n, cfg.rampRate)
	rcancel()
	if err != nil {
		if ctx.Err() != nil {
			return res, context.Cause(ctx)
		}
		return res, fmt.Errorf("clients did not finish connecting within %s (%d connected, %d failed): %v", rampBudget, stats.connected.Load(), stats.connErrs.Load(), err)
	}
	if cfg.verbose {
		logf("  ramp: %d connected, %d failed in %s", stats.connected.Load(), stats.connErrs.Load(), fmtDur(time.Since(rampStart)))
	}
	if err := exited(); err != nil {
		return res, err
	}
	if err := sleepCtx(ctx, cfg.settle); err != nil {
		return res, err
	}

	// The window: the events published during it, however late they
	// arrive (up to -drain); the proxy's CPU time while they were sent.
	var seq0, seq1 uint64
	live0 := stats.connected.Load() - stats.disconnect.Load()
	self0 := selfCPU()
	s0 := sample()
	r0 := cl.sampleRedis()
	wire0 := stats.wire.Load()
	em.atomically(func(last uint64) { seq0 = last; stats.openWindow(last) })
	if err := sleepCtx(ctx, cfg.duration); err != nil {
		return res, err
	}
	em.atomically(func(last uint64) { seq1 = last; stats.closeWindow(last) })
	s1 := sample()
	r1 := cl.sampleRedis()
	wire1 := stats.wire.Load()
	self1 := selfCPU()
	res.Upstreams = em.open.Load()
	if kind == "direct" {
		res.Upstreams = 0
	}
	drainStart := time.Now()
	want := int64(seq1-seq0) * live0
	for last, lastChange := stats.delivered.Load(), time.Now(); ; {
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return res, err
		}
		d := stats.delivered.Load()
		if d != last {
			last, lastChange = d, time.Now()
		}
		if d >= want || time.Since(lastChange) > 500*time.Millisecond || time.Since(drainStart) > cfg.drain {
			break
		}
	}
	stats.phase.Store(phaseDone)
	if err := exited(); err != nil {
		return res, err
	}

	window := s1.at.Sub(s0.at).Seconds()
	res.WindowSec = window
	res.Connected = stats.connected.Load()
	res.ConnErrs = stats.connErrs.Load()
	res.Disconnects = stats.disconnect.Load()
	res.Emitted = seq1 - seq0
	res.Expected = float64(res.Emitted) * float64(live0)
	res.Delivered = stats.delivered.Load()
	res.Lost = stats.lost.Load()
	res.Dups = stats.dups.Load()
	res.PerSec = float64(res.Delivered) / window
	if res.Expected > 0 {
		res.Share = float64(res.Delivered) / res.Expected
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	res.P50us = us(stats.lat.percentile(0.50))
	res.P99us = us(stats.lat.percentile(0.99))
	res.MaxUs = us(stats.lat.maxValue())
	res.MeanUs = us(stats.lat.mean())
	cpu := cpuBetween(s0, s1)
	res.CPUSec = cpu.Seconds()
	res.CPUPercent = 100 * cpu.Seconds() / window
	if res.Delivered > 0 {
		res.CPUPerEvUs = us(cpu) / float64(res.Delivered)
	}
	res.BaseRSS, res.RSS = base.rss, s1.rss
	if cl != nil {
		clusterSummary(&res, cl, r0, r1)
	}
	if live0 > 0 && (p != nil || cl != nil) {
		res.KiBPerConn = float64(s1.rss-base.rss) / 1024 / float64(live0)
	}
	res.GenCPUPct = 100 * (self1 - self0).Seconds() / window
	if stats.burst != nil {
		burstSummary(&res, stats.burst, seq0, seq1, live0)
	}
	res.Comments = float64(stats.comments.Load()) / float64(max(live0, 1))
	res.WireBytes = wire1 - wire0
	if res.Expected > 0 {
		res.WirePerEv = float64(res.WireBytes) / res.Expected
	}
	res.Encoding = stats.encodingSummary()
	stats.errMu.Lock()
	res.FirstErr = stats.firstErr
	stats.errMu.Unlock()
	return res, nil
}

// burstSummary computes, over the bursts of the window, the median time
// from a burst's send to its last delivery, and clients*K over that time.
func burstSummary(res *result, b *burstStats, seq0, seq1 uint64, live int64) {
	first := seq0 / b.k // bursts first.. have seqs first*K+1..
	last := seq1 / b.k  // exclusive
	var done []float64
	for i := first; i < last && i-first < burstSlots; i++ {
		slot := i % burstSlots
		if b.count[slot].Load() == 0 {
			continue
		}
		done = append(done, float64(b.lastRecv[slot].Load()))
	}
	if len(done) == 0 {
		return
	}
	sort.Float64s(done)
	med := done[len(done)/2]
	res.Bursts = len(done)
	res.BurstComplete = med / 1e6
	if med > 0 {
		res.BurstPerSec = float64(live) * float64(b.k) / (med / 1e9)
	}
}

func summary(r result) string {
	s := fmt.Sprintf("%d/%d connected, %d errors, %d disconnects, %d upstreams; %.0f events/s (%.1f%%, %d lost, %d dups), p50 %s p99 %s max %s; proxy CPU %.1f%% (%.2f µs/event), RSS +%.1f MiB (%.1f KiB/client); bench CPU %.0f%%",
		r.Connected, r.Clients, r.ConnErrs, r.Disconnects, r.Upstreams, r.PerSec, 100*r.Share, r.Lost, r.Dups, ms(r.P50us)+"ms", ms(r.P99us)+"ms", ms(r.MaxUs)+"ms",
		r.CPUPercent, r.CPUPerEvUs, float64(r.RSS-r.BaseRSS)/(1<<20), r.KiBPerConn, r.GenCPUPct)
	if r.Mode == "idle" {
		s += fmt.Sprintf("; %.2f comment lines (heartbeats) per client", r.Comments)
	}
	if r.Encoding != "" && r.Encoding != "identity" {
		s += "; Content-Encoding " + r.Encoding
	}
	if r.WirePerEv > 0 {
		if r.Protocol == protoH2C {
			s += fmt.Sprintf("; %.1f wire bytes per event and client (h2: response body bytes, no HTTP/2 framing)", r.WirePerEv)
		} else {
			s += fmt.Sprintf("; %.1f wire bytes per event and client", r.WirePerEv)
		}
	}
	if r.Bursts > 0 {
		s += fmt.Sprintf("; bursts: %d, median completion %.1f ms, %.0f deliveries/s", r.Bursts, r.BurstComplete, r.BurstPerSec)
	}
	if r.Nodes > 0 {
		s += fmt.Sprintf("; %d nodes", r.Nodes)
	}
	if r.Proxy == "cluster" {
		s += fmt.Sprintf("; redis-server CPU %.1f%% (%.2f µs/event), %.1f Redis calls and %.2f scripts per event (%s)", r.RedisCPUPercent, r.RedisCPUPerEvUs, r.RedisCallsPerEv, r.RedisScriptsPerEv, r.RedisTop)
	}
	if r.FirstErr != "" {
		s += "; first error: " + r.FirstErr
	}
	return s
}

// report is what -out writes as JSON, and all that -replot needs to write
// the markdown and the chart again.
type report struct {
	Written  string `json:"written"` // RFC 3339, UTC
	Command  string `json:"command"`
	Env      string `json:"environment"`
	Subtitle string `json:"chart_subtitle"`
	// Protocol is the clients' protocol, protoH1 or protoH2C; empty in
	// reports written before -h2 existed, which were all HTTP/1.1.
	Protocol string   `json:"client_protocol,omitempty"`
	Results  []result `json:"results"`
}

func newReport(cfg config, env string, rs []result) report {
	clients := ""
	if cfg.h2 {
		clients = ", h2c clients"
	}
	return report{
		Written:  time.Now().UTC().Format(time.RFC3339),
		Command:  "ssebench " + strings.Join(os.Args[1:], " "),
		Env:      env,
		Subtitle: fmt.Sprintf("%s mode%s, %s window, %s", mode(cfg), clients, cfg.duration, strings.SplitN(env, "\n", 2)[0]),
		Protocol: protocol(cfg),
		Results:  rs,
	}
}

// writeOutputs writes base.md, base.svg and base.json.
func writeOutputs(base string, rep report, withJSON bool) error {
	if err := os.MkdirAll(filepath.Dir(base), 0o755); err != nil {
		return err
	}
	var md strings.Builder
	fmt.Fprintf(&md, "<!-- written by ssebench; %s -->\n\n", rep.Written)
	fmt.Fprintf(&md, "Command: `%s`\n\n", rep.Command)
	fmt.Fprintf(&md, "%s\n\n", rep.Env)
	if rep.Protocol != "" { // older reports: HTTP/1.1, said nowhere
		fmt.Fprintf(&md, "%s\n\n", protocolDesc(rep.Protocol))
	}
	writeTable(&md, rep.Results)
	writeClusterTable(&md, rep.Results)
	md.WriteString("\nProxies:\n\n")
	seen := map[string]bool{}
	for _, r := range rep.Results {
		if !seen[r.Proxy] {
			seen[r.Proxy] = true
			fmt.Fprintf(&md, "- `%s`: %s\n", r.Proxy, proxyDesc[r.Proxy])
		}
	}
	if err := os.WriteFile(base+".md", []byte(md.String()), 0o644); err != nil {
		return err
	}
	f, err := os.Create(base + ".svg")
	if err != nil {
		return err
	}
	if err := writeSVG(f, "caddy-sse: proxy cost against clients", rep.Subtitle, panelsFor(rep.Results)); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if withJSON {
		js, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(base+".json", append(js, '\n'), 0o644); err != nil {
			return err
		}
	}
	if withJSON {
		logf("wrote %s.md, %s.svg, %s.json", base, base, base)
	} else {
		logf("wrote %s.md, %s.svg", base, base)
	}
	return nil
}

// replot writes the markdown and chart of a JSON report again (after a
// change to the table or chart code, without measuring again).
func replot(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var rep report
	if err := json.Unmarshal(b, &rep); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if len(rep.Results) == 0 {
		return fmt.Errorf("%s: no results", path)
	}
	writeTable(os.Stdout, rep.Results)
	writeClusterTable(os.Stdout, rep.Results)
	return writeOutputs(strings.TrimSuffix(path, ".json"), rep, false)
}

// describeMachine is a short description of where the numbers come from.
func describeMachine(cfg config) string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			mem = fmt.Sprintf(", %.0f GiB", float64(kb)/(1<<20))
		}
	}
	kernel := "?"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	caddyVer := "?"
	if out, err := exec.Command(cfg.caddyBin, "version").Output(); err == nil {
		caddyVer, _, _ = strings.Cut(firstLine(strings.TrimSpace(string(out))), " ")
	}
	s := fmt.Sprintf("%d CPUs (%s)%s, Linux %s, %s; Caddy %s",
		runtime.NumCPU(), cpu, mem, kernel, runtime.Version(), caddyVer)
	if cfg.nginxBin != "" {
		if out, err := exec.Command(cfg.nginxBin, "-v").CombinedOutput(); err == nil {
			s += "; " + strings.TrimSpace(strings.TrimPrefix(firstLine(string(out)), "nginx version: "))
		}
	}
	rateDesc := fmt.Sprintf("%g events/s of ~%d B", cfg.rate, cfg.size)
	switch {
	case cfg.idle:
		rateDesc = "no events"
		if cfg.heartbeat != "" {
			rateDesc += ", plugin heartbeat " + cfg.heartbeat
		}
	case cfg.burst > 0:
		rateDesc = fmt.Sprintf("%g bursts/s of %d events of ~%d B", cfg.rate, cfg.burst, cfg.size)
	}
	return s + "\n\nLoad: " + rateDesc + fmt.Sprintf(", window %s after %s settle, clients ramped at %g/s", cfg.duration, cfg.settle, cfg.rampRate)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// goSafe runs f in a goroutine; a panic there still ends the proxies
// before it crashes the bench.
func goSafe(f func()) {
	go func() {
		defer func() {
			if r := recover(); r != nil {
				killAll()
				panic(r)
			}
		}()
		f()
	}()
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "ssebench: "+format+"\n", args...)
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
