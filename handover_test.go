package caddysse

import (
	"bytes"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// connBackend is an SSE backend without ids whose connections the test
// writes to one by one (1 is the first connection made), to play the
// moment of a reload when an event is still on its way through the old
// upstream connection while the new one starts after it.
type connBackend struct {
	t        testing.TB
	addr     string
	mu       sync.Mutex
	conns    []chan string // closed to end that connection
	tags     []string      // each connection's X-Test-Conn header (the client's, which the upstream request is cloned from)
	holdFrom int           // connections from this one on wait for release before their header (0: none)
	release  chan struct{}
}

func newConnBackend(t testing.TB) *connBackend {
	b := &connBackend{t: t}
	srv := &http.Server{Handler: b}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.addr = ln.Addr().String()
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return b
}

func (b *connBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ch := make(chan string, 100)
	b.mu.Lock()
	b.conns = append(b.conns, ch)
	b.tags = append(b.tags, r.Header.Get("X-Test-Conn"))
	hold := b.holdFrom > 0 && len(b.conns) >= b.holdFrom
	release := b.release
	b.mu.Unlock()
	if hold {
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(200)
	rc := http.NewResponseController(w)
	rc.Flush()
	for {
		select {
		case <-r.Context().Done():
			return
		case s, ok := <-ch:
			if !ok {
				return
			}
			if _, err := w.Write([]byte(s)); err != nil {
				return
			}
			rc.Flush()
		}
	}
}

// waitConns waits until n connections were made.
func (b *connBackend) waitConns(n int) {
	b.t.Helper()
	if !eventually(5*time.Second, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.conns) >= n
	}) {
		b.t.Fatalf("backend did not get connection %d", n)
	}
}

// tagged waits for a connection made for a client that sent X-Test-Conn:
// tag, and returns it.
func (b *connBackend) tagged(tag string) chan string {
	b.t.Helper()
	var ch chan string
	if !eventually(5*time.Second, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		for i, t := range b.tags {
			if t == tag {
				ch = b.conns[i]
			}
		}
		return ch != nil
	}) {
		b.t.Fatalf("backend got no connection tagged %q", tag)
	}
	return ch
}

func (b *connBackend) conn(n int) chan string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conns[n-1]
}

// A config reload hands the upstream of a backend without ids from the old
// config's connection to the new one's. The backend starts the new one at
// its live edge: an event it sent the old one just before (event 2) can
// still be on its way when the new one's header is in. That event is
// published, once, and so is what follows, once: the old connection
// publishes until the two streams meet, then the new one takes over.
// Before, the switch happened at the new connection's header and event 2,
// which the new connection never sends, was lost (the cluster e2e reload
// test saw it now and then: "gap: seq 26..26 missing").
func TestFanoutReloadHandoverKeepsInFlightEvent(t *testing.T) {
	defer func(d time.Duration) { handoverWait = d }(handoverWait)
	for _, tc := range []struct {
		name string
		play func(b *connBackend) // after the new connection's header is in
		want string
	}{
		{"old delivers, then both", func(b *connBackend) {
			b.conn(1) <- "data: 2\n\n"
			b.conn(2) <- "data: 3\n\n" // the new one may get ahead of the old
			b.conn(1) <- "data: 3\n\n"
			b.conn(2) <- "data: 4\n\n"
		}, "2,3,4"},
		{"old ends first", func(b *connBackend) {
			b.conn(1) <- "data: 2\n\n"
			b.conn(2) <- "data: 3\n\n"
			close(b.conn(1))
			b.conn(2) <- "data: 4\n\n"
		}, "2,3,4"},
		{"never meet", func(b *connBackend) {
			// Each connection gets its own events: after handoverWait the
			// new one takes over with what it held.
			b.conn(1) <- "data: 2\n\n"
			b.conn(2) <- "data: new\n\n"
		}, "2,new"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkNoLeak(t)
			handoverWait = 300 * time.Millisecond
			b := newConnBackend(t)
			caddyMu.Lock()
			defer caddyMu.Unlock()
			addr := freeAddr(t)
			load := func() {
				cfg := caddyConfig(addr, route("/events", sseHandler(map[string]any{"padding": 0, "heartbeat": "1s",
					"fanout": map[string]any{"linger": "2s"}}), proxyTo(b.addr)))
				if err := caddy.Load(cfg, true); err != nil {
					t.Fatal(err)
				}
			}
			load()
			defer waitHubsGone(t, addr)
			defer caddy.Stop()
			base := "http://" + addr
			c := openStream(t, base+"/events", false)
			b.waitConns(1)
			b.conn(1) <- "data: 1\n\n"
			evs := waitEvents(t, c, 1)
			hb := eventsHub(base)
			hb.mu.Lock()
			streamedAt := hb.streamedAt
			hb.mu.Unlock()

			load()
			c.waitEOF(t, 5*time.Second)
			c2 := openStream(t, base+"/events", false, "Last-Event-ID", evs[0].ID)
			b.waitConns(2)
			if !eventually(5*time.Second, func() bool {
				hb.mu.Lock()
				defer hb.mu.Unlock()
				return hb.streamedAt != streamedAt
			}) {
				t.Fatal("the hub did not see the new connection's header")
			}
			tc.play(b)
			// A last event on the new connection: a duplicate or a loss
			// would show before it.
			b.conn(2) <- "data: end\n\n"
			c2.waitFor(t, 5*time.Second, "the last event", func(got []byte) bool {
				return bytes.Contains(got, []byte("data: end\n"))
			})
			if got := datas(eventsOf(c2)); got != tc.want+",end" {
				t.Fatalf("after the reload the client got %q, want %q", got, tc.want+",end")
			}
			hb.mu.Lock()
			old, ho := hb.old, hb.handover
			hb.mu.Unlock()
			if old != nil || ho != nil {
				t.Fatal("the hand-over did not end")
			}
		})
	}
}

// A reload of a config where several handlers feed one hub (here two
// routes with one key; in the cluster e2e test, three sites) drops their
// sources one by one, and each drop of the upstream's owner starts it
// anew. The connection that publishes stays until a successor streams:
// before, the second start closed it while its successor was still
// connecting, and what the backend sent meanwhile (event 2) was lost.
func TestFanoutReloadSeveralSourcesKeepsLiveUpstream(t *testing.T) {
	checkNoLeak(t)
	b := newConnBackend(t)
	caddyMu.Lock()
	defer caddyMu.Unlock()
	addr := freeAddr(t)
	load := func() {
		var routes []string
		for _, p := range []string{"/a", "/b"} {
			routes = append(routes, route(p, sseHandler(map[string]any{"padding": 0, "heartbeat": "1s",
				"fanout": map[string]any{"linger": "2s", "key": addr + "/several-sources"}}), proxyTo(b.addr)))
		}
		if err := caddy.Load(caddyConfig(addr, routes...), true); err != nil {
			t.Fatal(err)
		}
	}
	load()
	defer waitHubsGone(t, addr)
	defer caddy.Stop()
	base := "http://" + addr
	ca := openStream(t, base+"/a", false)
	b.waitConns(1)
	cb := openStream(t, base+"/b", false)
	b.conn(1) <- "data: 1\n\n"
	evs := waitEvents(t, ca, 1)
	waitEvents(t, cb, 1)
	var hb *hub
	hubs.Range(func(k, v any) bool {
		if strings.Contains(k.(string), "several-sources") {
			hb = v.(*hub)
		}
		return hb == nil
	})
	if hb == nil {
		t.Fatal("no hub")
	}

	// The connections after the first answer only when told: the
	// upstream's successors stay connecting.
	b.mu.Lock()
	b.holdFrom, b.release = 2, make(chan struct{})
	release := b.release
	b.mu.Unlock()
	load()
	ca.waitEOF(t, 5*time.Second)
	cb.waitEOF(t, 5*time.Second)
	if !eventually(5*time.Second, func() bool {
		hb.mu.Lock()
		defer hb.mu.Unlock()
		return len(hb.sources) == 0
	}) {
		t.Fatal("the old config's handlers were not dropped")
	}
	// Dropping the old handlers started the upstream through the second
	// one's route (whether that still reaches the backend depends on when
	// its reverse_proxy is cleaned up); the new config's client starts it
	// again.
	ca2 := openStream(t, base+"/a", false, "Last-Event-ID", evs[0].ID, "X-Test-Conn", "new")
	newConn := b.tagged("new")
	b.conn(1) <- "data: 2\n\n"
	close(release)
	b.conn(1) <- "data: 3\n\n"
	newConn <- "data: 3\n\n"
	newConn <- "data: end\n\n"
	ca2.waitFor(t, 5*time.Second, "the last event", func(got []byte) bool {
		return bytes.Contains(got, []byte("data: end\n"))
	})
	if got := datas(eventsOf(ca2)); got != "2,3,end" {
		t.Fatalf("after the reload the client got %q, want %q", got, "2,3,end")
	}
}
