package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// What the tests read of the server's side: the plugin's GET /sse/streams
// and the config's metrics on Caddy's admin endpoint, a backend stream the
// test writes event by event, and a TCP forwarder that can cut the
// browser's connections.

// hubStatus is a fan-out hub as GET /sse/streams reports it (docs/admin.md).
type hubStatus struct {
	Mode        string `json:"mode"`
	Path        string `json:"path"`
	Clients     int    `json:"clients"`
	Upstream    string `json:"upstream"`
	Events      int64  `json:"events"` // events received from the upstream
	CacheEvents int    `json:"cache_events"`
	Reconnects  int    `json:"reconnects"`
}

func (s hubStatus) String() string {
	return fmt.Sprintf("{path %s, %d clients, upstream %s, %d events received, %d cached, %d reconnects}",
		s.Path, s.Clients, s.Upstream, s.Events, s.CacheEvents, s.Reconnects)
}

// adminGet returns the body of GET path on Caddy's admin endpoint.
func (h *harness) adminGet(t testing.TB, path string) []byte {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(h.admin + path)
	if err != nil {
		t.Fatalf("admin GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin GET %s: %s %v: %s", path, resp.Status, err, truncate(string(body), 500))
	}
	return body
}

// hubs returns the fan-out hubs serving path (the request path, as the
// admin API reports it), from every config still running one.
func (h *harness) hubs(t testing.TB, path string) []hubStatus {
	t.Helper()
	var resp struct {
		Streams []hubStatus `json:"streams"`
	}
	body := h.adminGet(t, "/sse/streams")
	if err := json.Unmarshal(body, &resp); err != nil {
		t.Fatalf("GET /sse/streams: %v: %s", err, truncate(string(body), 500))
	}
	var list []hubStatus
	for _, s := range resp.Streams {
		if s.Mode == "fanout" && s.Path == path {
			list = append(list, s)
		}
	}
	return list
}

// waitHub polls GET /sse/streams until the one hub serving path satisfies
// cond, and returns it. More than one hub for path fails at once: the
// clients of one stream must share one upstream.
func (h *harness) waitHub(t testing.TB, path, what string, timeout time.Duration, cond func(hubStatus) bool) hubStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		list := h.hubs(t, path)
		if len(list) > 1 {
			t.Fatalf("%s: %d fan-out hubs serve %s, want one: %v", what, len(list), path, list)
		}
		if len(list) == 1 && cond(list[0]) {
			return list[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; hubs serving %s: %v", what, timeout, path, list)
		}
		time.Sleep(pollInterval)
	}
}

// metric returns the value of one series of the config's metrics, named
// as Prometheus' text format writes it (labels sorted by name), e.g.
// caddy_sse_replay_requests_total{result="served"}; 0 when it is absent.
func (h *harness) metric(t testing.TB, series string) float64 {
	t.Helper()
	for line := range strings.SplitSeq(string(h.adminGet(t, "/metrics")), "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 || line[:i] != series {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metric %s: %q: %v", series, line, err)
		}
		return v
	}
	return 0
}

// feed is a backend stream that writes what the test emits, when it
// emits it, and nothing else.
type feed struct {
	name  string
	steps chan feedStep
}

type feedStep struct {
	text string
	done chan bool // whether the stream took it
}

// handleFeed registers a feed as the stream name. Every request for it
// reads from the same feed, so an event goes to one of them only: a test
// that expects one upstream connection sees a second one lose events.
func (b *backend) handleFeed(name string) *feed {
	f := &feed{name: name, steps: make(chan feedStep)}
	b.handle(name, func(s *stream) {
		for {
			select {
			case st := <-f.steps:
				st.done <- s.send(st.text)
			case <-s.r.Context().Done():
				return
			case <-s.quit:
				return
			}
		}
	})
	return f
}

// emit writes each text as one write and flush of the feed's stream, in
// order, and returns once they are written. It fails when no stream of
// the feed takes them within a few seconds.
func (f *feed) emit(t testing.TB, texts ...string) {
	t.Helper()
	for _, text := range texts {
		st := feedStep{text: text, done: make(chan bool, 1)}
		select {
		case f.steps <- st:
		case <-time.After(5 * time.Second):
			t.Fatalf("feed %s: no backend stream open to emit %q", f.name, text)
		}
		if !<-st.done {
			t.Fatalf("feed %s: the stream was gone while writing %q", f.name, text)
		}
	}
}

// cutter is a TCP forwarder in front of Caddy's front server. Pages loaded
// from it (newPageAt(t, h, c.base())) connect through it, so the test can
// cut their connections as a network failure would: cut closes every
// connection at once, on both sides, and holds the connections opened
// after it (accepted, not forwarded, so the browser's request waits) until
// resume.
type cutter struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu       sync.Mutex
	down     bool
	closed   bool
	gen      int               // counts cuts: a forward dialing across one is dropped
	open     map[net.Conn]bool // both sides of every forwarded connection; true for the browser's
	held     []net.Conn
	accepted int
}

func startCutter(t testing.TB, target string) *cutter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{ln: ln, target: target, open: make(map[net.Conn]bool)}
	c.wg.Add(1)
	go c.acceptLoop()
	t.Cleanup(c.close)
	return c
}

// base is the origin of the forwarder, for newPageAt.
func (c *cutter) base() string { return "http://" + c.ln.Addr().String() }

func (c *cutter) acceptLoop() {
	defer c.wg.Done()
	for {
		conn, err := c.ln.Accept()
		if err != nil {
			return
		}
		c.mu.Lock()
		c.accepted++
		switch {
		case c.closed:
			conn.Close()
		case c.down:
			c.held = append(c.held, conn)
		default:
			c.forwardLocked(conn)
		}
		c.mu.Unlock()
	}
}

// forwardLocked connects client to the target and copies both ways until
// either side closes, then closes both.
func (c *cutter) forwardLocked(client net.Conn) {
	c.open[client] = true
	gen := c.gen
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		server, err := net.DialTimeout("tcp", c.target, 5*time.Second)
		c.mu.Lock()
		if err != nil || c.gen != gen || c.closed {
			c.mu.Unlock()
			client.Close()
			if server != nil {
				server.Close()
			}
			return
		}
		c.open[server] = false
		c.mu.Unlock()
		var once sync.Once
		done := make(chan struct{})
		closeBoth := func() {
			once.Do(func() {
				client.Close()
				server.Close()
				c.mu.Lock()
				delete(c.open, client)
				delete(c.open, server)
				c.mu.Unlock()
				close(done)
			})
		}
		go func() { _, _ = io.Copy(server, client); closeBoth() }()
		_, _ = io.Copy(client, server)
		closeBoth()
		<-done
	}()
}

// cut closes every forwarded connection and holds new ones until resume.
// It returns how many connections (client sides) it closed.
func (c *cutter) cut() int {
	c.mu.Lock()
	c.down = true
	c.gen++
	conns := c.open
	c.open = make(map[net.Conn]bool)
	c.mu.Unlock()
	n := 0
	for conn, browser := range conns {
		conn.Close()
		if browser {
			n++
		}
	}
	return n
}

// resume forwards the held connections and the ones that come after.
// It returns how many were held.
func (c *cutter) resume() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = false
	held := c.held
	c.held = nil
	for _, conn := range held {
		c.forwardLocked(conn)
	}
	return len(held)
}

// heldConns is how many connections wait for resume.
func (c *cutter) heldConns() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.held)
}

func (c *cutter) close() {
	c.mu.Lock()
	c.closed = true
	c.ln.Close()
	for conn := range c.open {
		conn.Close()
	}
	for _, conn := range c.held {
		conn.Close()
	}
	c.held = nil
	c.mu.Unlock()
	c.wg.Wait()
}
