package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httputil"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proxy kinds, in the order the bench runs them when asked for all.
var proxyKinds = []string{"fanout", "cluster", "nodes", "passthrough", "reverse_proxy", "encode_gzip", "nginx", "direct"}

var proxyDesc = map[string]string{
	"fanout":        "`sse { fanout }` + `reverse_proxy`: one upstream per stream, shared",
	"cluster":       "`sse { fanout { cluster redis {...} } }` + `reverse_proxy` on -cluster-nodes Caddy processes sharing one redis-server, clients spread evenly over the nodes: one upstream for the cluster; CPU and memory are the nodes' sum, Redis is reported apart",
	"nodes":         "`sse { fanout }` + `reverse_proxy` on -cluster-nodes independent Caddy processes (no cluster block, no Redis), clients spread evenly: one upstream and cache per node; CPU and memory are the nodes' sum",
	"passthrough":   "`sse` + `reverse_proxy`: one upstream per client",
	"reverse_proxy": "plain `reverse_proxy` (no plugin): one upstream per client",
	"encode_gzip":   "`encode gzip` + plain `reverse_proxy`",
	"nginx":         "nginx `proxy_pass` with `proxy_buffering off`",
	"direct":        "no proxy: clients connect to the emitter (checks the load generator)",
}

// proxySpec is everything needed to write one proxy's configuration.
type proxySpec struct {
	kind     string
	listen   string // 127.0.0.1:port the proxy listens on
	upstream string // the emitter's host:port
	sseOpts  []string
	h2       bool   // clients speak h2c (prior knowledge): the proxy must accept it
	redis    string // cluster: the redis-server's host:port
}

func isCaddyKind(kind string) bool {
	switch kind {
	case "fanout", "cluster", "nodes", "passthrough", "reverse_proxy", "encode_gzip":
		return true
	}
	return false
}

// caddyfile returns the Caddyfile for a Caddy-based proxy kind. Everything
// sits in a route block so that the handler order is the order written,
// whatever directive order the plugin registers.
func caddyfile(p proxySpec) (string, error) {
	var site strings.Builder
	sseBlock := func(extra ...string) {
		lines := append(append([]string{}, extra...), p.sseOpts...)
		if len(lines) == 0 {
			site.WriteString("\t\tsse\n")
			return
		}
		site.WriteString("\t\tsse {\n")
		for _, l := range lines {
			site.WriteString("\t\t\t" + l + "\n")
		}
		site.WriteString("\t\t}\n")
	}
	switch p.kind {
	case "fanout":
		sseBlock("fanout")
	case "nodes":
		// The key is the path: the default one holds the Host, which is
		// each node's own address in the bench's probe request, so the
		// probe would leave a hub with an upstream of its own behind.
		sseBlock("fanout {", "\tkey {http.request.uri.path}", "}")
	case "cluster":
		// The configuration agreed for cluster mode (issue #13), keyed by
		// path as "nodes" is.
		sseBlock("fanout {", "\tkey {http.request.uri.path}", "\tcluster redis {", "\t\taddress redis://"+p.redis+"/0", "\t\tprefix sse:", "\t}", "}")
	case "passthrough":
		sseBlock()
	case "reverse_proxy":
	case "encode_gzip":
		site.WriteString("\t\tencode gzip\n")
	default:
		return "", fmt.Errorf("%s is not a Caddy proxy", p.kind)
	}
	fmt.Fprintf(&site, "\t\treverse_proxy %s\n", p.upstream)
	// h2c only for -h2 runs: the HTTP/1.1 runs keep the configuration
	// their published figures were measured with. Caddy's documented
	// default protocols (h1 h2 h3) exclude h2c; v2.11.9 accepts it on a
	// plain-HTTP site all the same (enabling h2 turns on net/http's
	// unencrypted HTTP/2), but -h2 should not rest on that.
	servers := ""
	if p.h2 {
		servers = "\tservers {\n\t\tprotocols h1 h2c\n\t}\n"
	}
	return fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	default_bind 127.0.0.1
	grace_period 1s
%s	log {
		level WARN
	}
}

http://%s {
	route {
%s	}
}
`, servers, p.listen, site.String()), nil
}

// nginxConf returns an nginx configuration equivalent to reverse_proxy for
// SSE: no response buffering, HTTP/1.1 upstreams, long read timeout. With
// h2, the port speaks h2c: "listen ... http2" without ssl takes HTTP/2 with
// prior knowledge only (nginx before 1.25.1; later ones warn that the
// parameter is deprecated, and still honour it).
func nginxConf(p proxySpec, dir string) string {
	listen := p.listen
	if p.h2 {
		listen += " http2"
	}
	return fmt.Sprintf(`daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 1048576;
pid %[1]s/nginx.pid;
error_log stderr warn;
events {
	worker_connections 65536;
}
http {
	access_log off;
	client_body_temp_path %[1]s/client_body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen %[2]s;
		location / {
			proxy_pass http://%[3]s;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_buffering off;
			proxy_cache off;
			proxy_read_timeout 1h;
		}
	}
}
`, dir, listen, p.upstream)
}

// proc is a proxy process started in its own process group.
type proc struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // from Wait, valid after exited is closed
	out    *tailBuffer
}

// procs lists every process group the bench started and has not yet
// reaped, so that signals, panics and the watchdog can end them.
var procs struct {
	sync.Mutex
	m map[*proc]struct{}
}

func startProc(name string, argv []string, dir string, env []string) (*proc, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = dir
	cmd.Env = env
	p := &proc{name: name, cmd: cmd, exited: make(chan struct{}), out: &tailBuffer{max: 16 << 10}}
	cmd.Stdout = p.out
	cmd.Stderr = p.out
	// Own process group, so that stopping it also stops its children
	// (nginx workers); and killed with us if the bench dies without
	// cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	procs.Lock()
	if procs.m == nil {
		procs.m = map[*proc]struct{}{}
	}
	if err := cmd.Start(); err != nil {
		procs.Unlock()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	procs.m[p] = struct{}{}
	procs.Unlock()
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// stop ends the process group: SIGTERM, then SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	pgid := p.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(grace):
	}
	// The leader may be gone while children (nginx workers) live on.
	syscall.Kill(-pgid, syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
	}
	procs.Lock()
	delete(procs.m, p)
	procs.Unlock()
}

// killAll SIGKILLs every process group still registered; used on panics,
// signals and timeouts, where there is no time to be polite.
func killAll() {
	procs.Lock()
	defer procs.Unlock()
	for p := range procs.m {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		delete(procs.m, p)
	}
}

// waitReady polls addr until it accepts connections, the process exits, or
// the deadline passes; errors carry the tail of the process's output.
func (p *proc) waitReady(addr string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before listening on %s (%v); its output ends with:\n%s", p.name, addr, p.err, p.out.indented())
		default:
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not listen on %s within %s (last error: %v); its output ends with:\n%s", p.name, addr, within, err, p.out.indented())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// probeSSE makes one SSE request to addr and checks for a 200 with
// Content-Type text/event-stream and, when wantEvent, for one event of the
// emitter's; then closes it. This proves the chain works end to end before
// loading it (and warms up lazily built state). With h2 the request goes
// over h2c, as the clients' will.
func probeSSE(addr, path string, within time.Duration, wantEvent, h2 bool) error {
	if h2 {
		return probeSSEH2(addr, path, within, wantEvent)
	}
	c, err := net.DialTimeout("tcp", addr, within)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(within))
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", path, addr)
	br := bufio.NewReader(c)
	h, err := readResponseHead(br)
	if err != nil {
		return fmt.Errorf("no response head within %s: %w", within, err)
	}
	if h.status != 200 {
		return fmt.Errorf("status %d", h.status)
	}
	if !strings.HasPrefix(h.contentType, "text/event-stream") {
		return fmt.Errorf("Content-Type %q, want text/event-stream", h.contentType)
	}
	if !wantEvent {
		return nil
	}
	var body io.Reader = br
	if h.chunked {
		body = httputil.NewChunkedReader(br)
	}
	return firstEvent(body, within)
}

func probeSSEH2(addr, path string, within time.Duration, wantEvent bool) error {
	deadline := time.Now().Add(within)
	d := newH2Dialer(func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{Timeout: within}).DialContext(ctx, "tcp", addr)
	})
	resp, closeConn, err := d.get(addr, path, sseHeader(""), within)
	if err != nil {
		return fmt.Errorf("h2c request: %w", err)
	}
	defer closeConn()
	stop := time.AfterFunc(time.Until(deadline), closeConn)
	defer stop.Stop()
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		return fmt.Errorf("Content-Type %q, want text/event-stream", ct)
	}
	if !wantEvent {
		return nil
	}
	return firstEvent(resp.Body, within)
}

// firstEvent reads an uncompressed event stream until its first data event
// of the emitter's.
func firstEvent(body io.Reader, within time.Duration) error {
	lines := bufio.NewReader(body)
	for {
		line, err := lines.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			return fmt.Errorf("no event within %s: stream ended: %w", within, err)
		}
		if _, _, ok := parseDataLine(line); ok {
			return nil
		}
	}
}

// freePort returns a loopback address with a port that was free a moment ago.
func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// launchProxy writes the configuration of kind into dir and starts it,
// returning once it serves SSE. For "direct" it returns no process and the
// emitter's address.
func launchProxy(kind, caddyBin, nginxBin, dir string, spec proxySpec, startTO, probeTO time.Duration, wantEvent bool) (*proc, error) {
	if kind == "direct" {
		return nil, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	env := append(os.Environ(), "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
	var argv []string
	switch {
	case isCaddyKind(kind):
		cf, err := caddyfile(spec)
		if err != nil {
			return nil, err
		}
		path := filepath.Join(dir, "Caddyfile")
		if err := os.WriteFile(path, []byte(cf), 0o644); err != nil {
			return nil, err
		}
		argv = []string{caddyBin, "run", "--config", path, "--adapter", "caddyfile"}
	case kind == "nginx":
		if nginxBin == "" {
			return nil, errors.New("nginx: no nginx binary (put one on PATH or pass -nginx)")
		}
		path := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(path, []byte(nginxConf(spec, dir)), 0o644); err != nil {
			return nil, err
		}
		argv = []string{nginxBin, "-p", dir, "-c", path, "-e", "stderr"}
	default:
		return nil, fmt.Errorf("unknown proxy %q (known: %s)", kind, strings.Join(proxyKinds, ", "))
	}
	p, err := startProc(kind, argv, dir, env)
	if err != nil {
		return nil, err
	}
	if err := p.waitReady(spec.listen, startTO); err != nil {
		p.stop(time.Second)
		return nil, err
	}
	if err := probeSSE(spec.listen, "/events", probeTO, wantEvent, spec.h2); err != nil {
		p.stop(time.Second)
		return nil, fmt.Errorf("%s listens on %s but does not serve the emitter's SSE: %v; its output ends with:\n%s", kind, spec.listen, err, p.out.indented())
	}
	return p, nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// indented returns the last lines of the output, indented for error
// messages: at most 20 lines, or, when the process panicked, the panic
// message and the first lines of its stack (a Go crash prints the cause
// first and then every goroutine).
func (t *tailBuffer) indented() string {
	s := strings.TrimRight(t.String(), "\n")
	if s == "" {
		return "    (no output)"
	}
	lines := strings.Split(s, "\n")
	start, n := len(lines)-20, 20
	for i, l := range lines {
		if strings.HasPrefix(l, "panic: ") || strings.HasPrefix(l, "fatal error: ") {
			start, n = i, 30
			break
		}
	}
	start = max(start, 0)
	lines = lines[start:min(len(lines), start+n)]
	return "    " + strings.Join(lines, "\n    ")
}
