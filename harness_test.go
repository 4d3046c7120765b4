package caddysse

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// caddyMu serializes tests that run a Caddy config: Caddy has one running
// config per process.
var caddyMu sync.Mutex

// freeAddr returns a loopback address nobody listens on.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// caddyConfig is a one-server Caddy config listening on addr (h1 and h2c)
// with the given routes, as JSON.
func caddyConfig(addr string, routes ...string) []byte {
	return fmt.Appendf(nil, `{
		"admin": {"disabled": true},
		"logging": {"logs": {"default": {"level": "ERROR"}}},
		"apps": {"http": {"servers": {"test": {
			"listen": [%q],
			"protocols": ["h1", "h2c"],
			"automatic_https": {"disable": true},
			"routes": [%s]
		}}}}
	}`, addr, strings.Join(routes, ","))
}

// route is a JSON route matching path with the given handlers.
func route(path string, handlers ...string) string {
	return fmt.Sprintf(`{"match": [{"path": [%q]}], "handle": [%s]}`, path, strings.Join(handlers, ","))
}

func proxyTo(backend string) string {
	return fmt.Sprintf(`{"handler": "reverse_proxy", "upstreams": [{"dial": %q}]}`, backend)
}

// startCaddy runs a config with the given routes and returns its base URL.
// Caddy is stopped when the test ends.
func startCaddy(t testing.TB, routes ...string) string {
	t.Helper()
	return startCaddyWith(t, func(addr string) []byte { return caddyConfig(addr, routes...) })
}

// startCaddyWith runs the config config(addr) gives for a free address.
func startCaddyWith(t testing.TB, config func(addr string) []byte) string {
	t.Helper()
	caddyMu.Lock()
	addr := freeAddr(t)
	if err := caddy.Load(config(addr), true); err != nil {
		caddyMu.Unlock()
		t.Fatalf("loading Caddy config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
		waitHubsGone(t, addr)
		caddyMu.Unlock()
	})
	return "http://" + addr
}

// scriptedBackend is a real SSE backend on loopback whose every write is
// driven by the test, so tests wait on facts instead of sleeping.
type scriptedBackend struct {
	URL     string
	Addr    string
	writes  chan backendWrite
	reqs    chan *http.Request
	done    chan struct{} // closed when a handler returns
	header  http.Header
	status  int
	srv     *http.Server
	conns   int
	connsMu sync.Mutex
}

// backendWrite is one write of the backend: bytes, then a flush. With end
// set, the handler returns instead (the backend ends the stream).
type backendWrite struct {
	data []byte
	end  bool
}

func newScriptedBackend(t testing.TB) *scriptedBackend {
	t.Helper()
	b := &scriptedBackend{
		writes: make(chan backendWrite),
		reqs:   make(chan *http.Request, 16),
		done:   make(chan struct{}, 16),
		header: http.Header{"Content-Type": {"text/event-stream"}},
		status: http.StatusOK,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.Addr = ln.Addr().String()
	b.URL = "http://" + b.Addr
	b.srv = &http.Server{Handler: b, ConnState: func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			b.connsMu.Lock()
			b.conns++
			b.connsMu.Unlock()
		}
	}}
	go b.srv.Serve(ln)
	t.Cleanup(func() { b.srv.Close() })
	return b
}

func (b *scriptedBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() { b.done <- struct{}{} }()
	b.reqs <- r
	for k, v := range b.header {
		w.Header()[k] = v
	}
	w.WriteHeader(b.status)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	for {
		select {
		case <-r.Context().Done():
			return
		case wr := <-b.writes:
			if wr.end {
				return
			}
			if _, err := w.Write(wr.data); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}
}

// send makes the backend write and flush each chunk in turn.
func (b *scriptedBackend) send(t testing.TB, chunks ...string) {
	t.Helper()
	for _, c := range chunks {
		select {
		case b.writes <- backendWrite{data: []byte(c)}:
		case <-time.After(5 * time.Second):
			t.Fatalf("backend handler did not take write %q", c)
		}
	}
}

// end makes the backend handler return.
func (b *scriptedBackend) end(t testing.TB) {
	t.Helper()
	select {
	case b.writes <- backendWrite{end: true}:
	case <-time.After(5 * time.Second):
		t.Fatal("backend handler did not end")
	}
}

// request waits for the next request to reach the backend.
func (b *scriptedBackend) request(t testing.TB) *http.Request {
	t.Helper()
	select {
	case r := <-b.reqs:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no request reached the backend")
		return nil
	}
}

// handlerReturned waits until a backend handler returned (its request
// context ended or the stream was ended).
func (b *scriptedBackend) handlerReturned(t testing.TB, within time.Duration) {
	t.Helper()
	select {
	case <-b.done:
	case <-time.After(within):
		t.Fatalf("backend handler still running after %s: upstream request not cancelled", within)
	}
}

// client is an SSE client reading a response body in the background, so
// tests can wait for exact bytes with a deadline.
type client struct {
	Resp   *http.Response
	cancel context.CancelFunc
	mu     sync.Mutex
	got    bytes.Buffer
	more   chan struct{}
	eof    chan struct{}
	err    error
}

// streamRequest sends a GET with Accept: text/event-stream (plus extra
// headers, as key/value pairs; an empty value is not sent) over HTTP/1.1
// or, with h2, HTTP/2 (h2c), with no transparent decompression.
func streamRequest(t testing.TB, url string, h2 bool, headers ...string) (*http.Response, context.CancelFunc) {
	t.Helper()
	tr := &http.Transport{DisableCompression: true}
	if h2 {
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
	}
	t.Cleanup(tr.CloseIdleConnections)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(headers); i += 2 {
		if headers[i+1] != "" {
			req.Header.Set(headers[i], headers[i+1])
		}
	}
	resp, err := tr.RoundTrip(req)
	for try := 1; err != nil && try < 3 && afterReload(err); try++ {
		// A connection the old server accepted while a reload shut it down
		// is closed unanswered; EventSource reconnects, and so do we.
		resp, err = tr.RoundTrip(req)
	}
	if err != nil {
		cancel()
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp, cancel
}

// afterReload reports whether a request failed the way one does that
// reached the server Caddy was shutting down for a reload: the connection
// closed before any answer.
func afterReload(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
}

// dialStalled opens /events on base as a raw HTTP/1.1 client with a tiny
// receive buffer that never reads, to fill the server's socket buffers.
func dialStalled(t testing.TB, base string, extraHeaders string) net.Conn {
	t.Helper()
	return dialRaw(t, base, extraHeaders, 4096)
}

// dialRaw sends GET /events to base on a raw connection, with the same
// Host as the other clients (the same fan-out key), and leaves the
// response unread. A positive rcvbuf sets the socket's receive buffer.
func dialRaw(t testing.TB, base string, extraHeaders string, rcvbuf int) net.Conn {
	t.Helper()
	host := strings.TrimPrefix(base, "http://")
	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if rcvbuf > 0 {
		conn.(*net.TCPConn).SetReadBuffer(rcvbuf)
	}
	fmt.Fprintf(conn, "GET /events HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n%s\r\n", host, extraHeaders)
	return conn
}

// openStream starts reading a stream (see streamRequest) in the background.
func openStream(t testing.TB, url string, h2 bool, headers ...string) *client {
	t.Helper()
	resp, cancel := streamRequest(t, url, h2, headers...)
	c := &client{Resp: resp, cancel: cancel, more: make(chan struct{}, 1), eof: make(chan struct{})}
	t.Cleanup(c.close)
	go c.read()
	return c
}

func (c *client) read() {
	defer close(c.eof)
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Resp.Body.Read(buf)
		c.mu.Lock()
		c.got.Write(buf[:n])
		if err != nil {
			c.err = err
		}
		c.mu.Unlock()
		select {
		case c.more <- struct{}{}:
		default:
		}
		if err != nil {
			return
		}
	}
}

func (c *client) close() {
	c.cancel()
	c.Resp.Body.Close()
	<-c.eof
}

// bytes returns everything received so far.
func (c *client) bytes() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.got.Bytes())
}

// waitFor waits until the received bytes satisfy cond.
func (c *client) waitFor(t testing.TB, within time.Duration, what string, cond func([]byte) bool) []byte {
	t.Helper()
	deadline := time.After(within)
	for {
		got := c.bytes()
		if cond(got) {
			return got
		}
		select {
		case <-c.more:
		case <-c.eof:
			if got := c.bytes(); cond(got) {
				return got
			}
			t.Fatalf("stream ended (%v) before %s; got %q", c.err, what, c.bytes())
		case <-deadline:
			t.Fatalf("no %s within %s; got %q", what, within, c.bytes())
		}
	}
}

// waitSuffix waits until the received bytes end with want.
func (c *client) waitSuffix(t testing.TB, want string) []byte {
	t.Helper()
	return c.waitFor(t, 5*time.Second, fmt.Sprintf("%q at the end", want), func(b []byte) bool {
		return bytes.HasSuffix(b, []byte(want))
	})
}

// waitEOF waits until the stream ends and returns everything received.
func (c *client) waitEOF(t testing.TB, within time.Duration) []byte {
	t.Helper()
	select {
	case <-c.eof:
		return c.bytes()
	case <-time.After(within):
		t.Fatalf("stream still open after %s; got %q", within, c.bytes())
		return nil
	}
}

// sseGoroutines counts goroutines running this package's code.
func sseGoroutines() (int, string) {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	var stacks []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "caddy-sse.") && !strings.Contains(g, "caddy-sse.Test") && !strings.Contains(g, "_test.go") {
			n++
			stacks = append(stacks, g)
		}
	}
	return n, strings.Join(stacks, "\n\n")
}

// checkNoLeak fails the test unless, once it ends, no goroutine is left
// running this package's code (handlers, timers, hubs).
func checkNoLeak(t testing.TB) {
	t.Cleanup(func() {
		var n int
		var stacks string
		if !eventually(5*time.Second, func() bool {
			n, stacks = sseGoroutines()
			return n == 0
		}) {
			t.Errorf("%d goroutines of the plugin still running:\n%s", n, stacks)
		}
	})
}

// sseHandler is the JSON of an sse handler with the given extra fields.
func sseHandler(fields map[string]any) string {
	m := map[string]any{"handler": "sse"}
	for k, v := range fields {
		m[k] = v
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// parsedEvent is one event as EventSource dispatches it.
type parsedEvent struct {
	Type, Data, ID string
}

// parseEvents is a literal reading of the WHATWG event stream
// interpretation over a whole stream: the events EventSource would
// dispatch, plus the comments it saw and where (true: at an event
// boundary, with no field seen since the last blank line).
func parseEvents(stream []byte) (events []parsedEvent, comments []string, commentsAtBoundary bool) {
	s := strings.TrimPrefix(string(stream), "\ufeff")
	commentsAtBoundary = true
	var data strings.Builder
	var typ, lastID string
	fieldsSeen := false
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	sc.Split(splitSSELines)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if data.Len() > 0 {
				events = append(events, parsedEvent{Type: cmpOr(typ, "message"), Data: strings.TrimSuffix(data.String(), "\n"), ID: lastID})
			}
			data.Reset()
			typ = ""
			fieldsSeen = false
		case line[0] == ':':
			comments = append(comments, line)
			if fieldsSeen {
				commentsAtBoundary = false
			}
		default:
			fieldsSeen = true
			name, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			switch name {
			case "data":
				data.WriteString(value + "\n")
			case "event":
				typ = value
			case "id":
				if !strings.Contains(value, "\x00") {
					lastID = value
				}
			}
		}
	}
	return events, comments, commentsAtBoundary
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// splitSSELines splits on LF, CRLF and lone CR; a trailing unterminated
// line is dropped, as EventSource never processes it.
func splitSSELines(data []byte, atEOF bool) (int, []byte, error) {
	for i, c := range data {
		switch c {
		case '\n':
			return i + 1, data[:i], nil
		case '\r':
			if i+1 < len(data) {
				if data[i+1] == '\n' {
					return i + 2, data[:i], nil
				}
				return i + 1, data[:i], nil
			}
			if atEOF {
				return i + 1, data[:i], nil
			}
			return 0, nil, nil // need the next byte: it may be LF
		}
	}
	if atEOF {
		return len(data), nil, nil // skip the unterminated rest
	}
	return 0, nil, nil
}

var _ io.Writer = (*stream)(nil)

// realisticEvents are n order-update events of ~190 bytes: JSON with a
// stable shape, random ids and amounts, rising timestamps.
func realisticEvents(n int) [][]byte {
	r := rand.New(rand.NewPCG(1, 2))
	statuses := []string{"pending", "paid", "shipped", "delivered", "cancelled"}
	const alnum = "abcdefghijklmnopqrstuvwxyz0123456789"
	word := func(k int) string {
		b := make([]byte, k)
		for i := range b {
			b[i] = alnum[r.IntN(len(alnum))]
		}
		return string(b)
	}
	ts := time.Date(2025, 5, 1, 12, 0, 0, 0, time.UTC)
	events := make([][]byte, n)
	for i := range events {
		ts = ts.Add(time.Duration(r.IntN(2000)) * time.Millisecond)
		events[i] = fmt.Appendf(nil, "id: %d\nevent: order.updated\ndata: {\"id\":\"ord_%s\",\"customer\":\"cus_%s\",\"status\":%q,\"amount\":%d,\"currency\":\"EUR\",\"items\":%d,\"ts\":%q,\"seq\":%d}\n\n",
			1000+i, word(10), word(8), statuses[r.IntN(len(statuses))], 100+r.IntN(99900), 1+r.IntN(9), ts.Format(time.RFC3339Nano), 1000+i)
	}
	return events
}

// mustCoding is the coding of a name the plugin writes.
func mustCoding(name string) coding {
	c, ok := parseCoding(name)
	if !ok {
		panic("no coding " + name)
	}
	return c
}

// unboundedPolicy is the client policy of h for benchmark clients that
// are fed from the test itself (being behind no longer cuts a client).
func unboundedPolicy(h *Handler) *clientPolicy {
	return h.newClientPolicy(nil)
}

// eventually polls cond until it holds or within has passed, and reports
// whether it held; the caller fails with what it waited for. The one poll
// loop of the tests: a condition with a deadline, never a bare sleep.
func eventually(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond) // polling a condition with a deadline
	}
	return true
}

// fakeWriter is the tests' one stand-in for a client's ResponseWriter: it
// counts what it is given (n bytes, flushes), keeps the bytes in buf when
// set, and fails the write that would pass limit bytes when limit is set.
type fakeWriter struct {
	header  http.Header
	buf     *bytes.Buffer
	n       int
	limit   int
	flushes int
}

var errWriteFailed = errors.New("write failed")

func (w *fakeWriter) Header() http.Header {
	if w.header == nil {
		w.header = http.Header{}
	}
	return w.header
}

func (w *fakeWriter) WriteHeader(int) {}

func (w *fakeWriter) Write(p []byte) (int, error) {
	if w.limit > 0 && w.n+len(p) > w.limit {
		return 0, errWriteFailed
	}
	w.n += len(p)
	if w.buf != nil {
		w.buf.Write(p)
	}
	return len(p), nil
}

func (w *fakeWriter) Flush() { w.flushes++ }
