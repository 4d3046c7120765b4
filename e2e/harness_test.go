package e2e

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/seed-b7710c89/caddy-sse"
)

//go:embed testdata/page.html
var pageHTML string

// guardReadTimeout is the idle timeout of the /guarded/ route: its outer
// reverse_proxy drops a response from which it could read nothing for this
// long, as load balancers and proxies in front of SSE servers do.
const guardReadTimeout = 2 * time.Second

// harness is one running Caddy config with its backend.
type harness struct {
	base    string // http://127.0.0.1:port of the front server
	admin   string // http://127.0.0.1:port of Caddy's admin endpoint
	backend *backend
}

// startCaddy starts a backend and loads a Caddy config whose front server
// (the origin of the test page) routes
//
//	/page        the test page (testdata/page.html)
//	/sse/...     handlerJSON, then reverse_proxy to the backend
//	/direct/...  reverse_proxy to the backend, without the plugin
//	/guarded/... reverse_proxy with read_timeout guardReadTimeout to an
//	             inner server, which routes it through handlerJSON and
//	             reverse_proxy to the backend
//
// The backend serves the stream registered under the rest of the path
// (see backend.handle): /sse/x and /direct/x are the same stream x.
// Everything stops when t ends. Only one config runs per process, so tests
// that use startCaddy must not run in parallel.
func startCaddy(t testing.TB, handlerJSON string) *harness {
	t.Helper()
	var probe map[string]any
	if err := json.Unmarshal([]byte(handlerJSON), &probe); err != nil {
		t.Fatalf("handler JSON %s: %v", handlerJSON, err)
	}
	b := startBackend(t)
	front, inner, admin := freeAddr(t), freeAddr(t), freeAddr(t)
	dir := t.TempDir()
	logPath := filepath.Join(dir, "caddy.log")

	proxyTo := func(addr string, transport map[string]any) map[string]any {
		rp := map[string]any{
			"handler":   "reverse_proxy",
			"upstreams": []any{map[string]any{"dial": addr}},
		}
		if transport != nil {
			rp["transport"] = transport
		}
		return rp
	}
	route := func(path string, handlers ...any) map[string]any {
		return map[string]any{
			"match":  []any{map[string]any{"path": []string{path}}},
			"handle": handlers,
		}
	}
	sse := json.RawMessage(handlerJSON)
	backendAddr := b.srv.Listener.Addr().String()
	server := func(addr string, routes ...any) map[string]any {
		return map[string]any{
			"listen":          []string{addr},
			"routes":          routes,
			"automatic_https": map[string]any{"disable": true},
		}
	}
	cfg := map[string]any{
		// The admin endpoint serves the plugin's GET /sse/streams and the
		// config's metrics, which tests read to see the server's side.
		"admin": map[string]any{"listen": admin, "config": map[string]any{"persist": false}},
		// No TLS is involved, but the tls app starts anyway and would keep
		// its state in the home directory.
		"storage": map[string]any{"module": "file_system", "root": filepath.Join(dir, "storage")},
		// Caddy's log goes to a file, shown only when the test fails: every
		// EventSource the tests close is an "aborting with incomplete
		// response" warning of reverse_proxy, which would bury the output.
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level":  "INFO",
			"writer": map[string]any{"output": "file", "filename": logPath, "roll": false},
		}}},
		"apps": map[string]any{"http": map[string]any{
			// Bounds caddy.Stop if a stream outlives the test's cleanups.
			"grace_period": "2s",
			"servers": map[string]any{
				"front": server(front,
					route("/page", map[string]any{
						"handler": "static_response",
						"headers": map[string][]string{"Content-Type": {"text/html; charset=utf-8"}},
						"body":    pageHTML,
					}),
					route("/sse/*", sse, proxyTo(backendAddr, nil)),
					route("/direct/*", proxyTo(backendAddr, nil)),
					route("/guarded/*", proxyTo(inner, map[string]any{
						"protocol":     "http",
						"read_timeout": guardReadTimeout.String(),
					})),
				),
				"inner": server(inner,
					route("/guarded/*", sse, proxyTo(backendAddr, nil)),
				),
			},
		}},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // runs last, after caddy.Stop
		if t.Failed() {
			t.Logf("Caddy's log (the end of it):\n%s", tail(logPath, 100))
		}
	})
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("load Caddy config with handler %s: %v", handlerJSON, err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stop Caddy: %v", err)
		}
	})
	// Registered after caddy.Stop, so it runs before it: ending the
	// backend's streams first lets Caddy shut down without waiting for them.
	t.Cleanup(b.stopStreams)
	return &harness{base: "http://" + front, admin: "http://" + admin, backend: b}
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

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// streamFunc writes one stream's bytes. The backend keeps the response open
// after it returns, until the client goes away or the test ends: a stream
// that ended would make EventSource reconnect and dispatch its events twice.
type streamFunc func(s *stream)

// backend is an SSE server whose streams the tests script by name.
type backend struct {
	srv  *httptest.Server
	quit chan struct{}
	once sync.Once

	mu       sync.Mutex
	streams  map[string]streamFunc
	requests map[string][]http.Header // request headers, per stream name
}

func startBackend(t testing.TB) *backend {
	t.Helper()
	b := &backend{
		quit:     make(chan struct{}),
		streams:  make(map[string]streamFunc),
		requests: make(map[string][]http.Header),
	}
	b.srv = httptest.NewServer(b)
	t.Cleanup(func() {
		b.stopStreams()
		b.srv.CloseClientConnections()
		b.srv.Close()
	})
	return b
}

// handle registers the stream served at /<route>/<name>.
func (b *backend) handle(name string, f streamFunc) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.streams[name] = f
}

// requests returns the headers of every request for the stream name so far,
// one per connection EventSource made.
func (b *backend) requestsFor(name string) []http.Header {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]http.Header(nil), b.requests[name]...)
}

// stopStreams ends every open stream.
func (b *backend) stopStreams() { b.once.Do(func() { close(b.quit) }) }

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// "/sse/a/b" and "/direct/a/b" are both the stream "a/b".
	_, name, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	b.mu.Lock()
	f := b.streams[name]
	b.requests[name] = append(b.requests[name], r.Header.Clone())
	b.mu.Unlock()
	if f == nil {
		http.Error(w, fmt.Sprintf("no stream %q", name), http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	s := &stream{w: w, rc: http.NewResponseController(w), r: r, quit: b.quit}
	s.flush()
	f(s)
	select {
	case <-r.Context().Done():
	case <-b.quit:
	}
}

// stream is the response a streamFunc writes to.
type stream struct {
	w    http.ResponseWriter
	rc   *http.ResponseController
	r    *http.Request
	quit <-chan struct{}
	gone bool // the client went away or the test ended; further steps do nothing
}

func (s *stream) flush() {
	if err := s.rc.Flush(); err != nil {
		s.gone = true
	}
}

// eachByte is a send step whose bytes are written one per write and flush,
// with a millisecond between them, so that every byte is a chunk of its own.
type eachByte string

// send runs steps in order: a string is written and flushed on its own (one
// write, one chunk on the wire), an eachByte is written byte by byte, a
// time.Duration pauses. It returns false once the client is gone.
func (s *stream) send(steps ...any) bool {
	for _, step := range steps {
		if s.gone {
			return false
		}
		switch v := step.(type) {
		case string:
			if _, err := s.w.Write([]byte(v)); err != nil {
				s.gone = true
				return false
			}
			s.flush()
		case eachByte:
			for i := range len(v) {
				s.send(string(v[i:i+1]), time.Millisecond)
			}
		case time.Duration:
			s.pause(v)
		default:
			panic(fmt.Sprintf("stream.send: step of type %T", step))
		}
	}
	return !s.gone
}

// pause waits for d, or less if the client goes away or the test ends.
func (s *stream) pause(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-s.r.Context().Done():
		s.gone = true
	case <-s.quit:
		s.gone = true
	}
	return !s.gone
}
