package caddysse

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// emitter is a legacy SSE backend on loopback: every connection gets the
// events emitted while it is connected, without ids and without any
// support for Last-Event-ID. It counts the requests it got and can be
// killed and restarted on the same address.
type emitter struct {
	t      testing.TB
	addr   string
	mu     sync.Mutex
	srv    *http.Server
	conns  map[chan []byte]struct{}
	reqs   []*http.Request
	joined chan struct{} // one value per request that starts streaming
	header http.Header
	status int
}

func newEmitter(t testing.TB) *emitter {
	e := &emitter{t: t, conns: make(map[chan []byte]struct{}), joined: make(chan struct{}, 100), status: 200,
		header: http.Header{"Content-Type": {"text/event-stream"}}}
	e.addr = e.start("127.0.0.1:0")
	t.Cleanup(e.kill)
	return e
}

func (e *emitter) start(addr string) string {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		e.t.Fatal(err)
	}
	srv := &http.Server{Handler: e}
	e.mu.Lock()
	e.srv = srv
	e.mu.Unlock()
	go srv.Serve(ln)
	return ln.Addr().String()
}

// kill closes the backend and every connection it has.
func (e *emitter) kill() {
	e.mu.Lock()
	srv := e.srv
	e.mu.Unlock()
	srv.Close()
}

func (e *emitter) restart() { e.start(e.addr) }

func (e *emitter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ch := make(chan []byte, 1000)
	e.mu.Lock()
	e.reqs = append(e.reqs, r.Clone(r.Context()))
	for k, v := range e.header {
		w.Header()[k] = v
	}
	status := e.status
	if status == 200 {
		e.conns[ch] = struct{}{}
	}
	e.mu.Unlock()
	w.WriteHeader(status)
	if status != 200 {
		io.WriteString(w, "backend says no")
		return
	}
	defer func() {
		e.mu.Lock()
		delete(e.conns, ch)
		e.mu.Unlock()
	}()
	rc := http.NewResponseController(w)
	rc.Flush()
	e.joined <- struct{}{}
	for {
		select {
		case <-r.Context().Done():
			return
		case b := <-ch:
			if _, err := w.Write(b); err != nil {
				return
			}
			rc.Flush()
		}
	}
}

// emit sends raw bytes to every connected stream.
func (e *emitter) emit(s string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for ch := range e.conns {
		ch <- []byte(s)
	}
}

func (e *emitter) requests() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.reqs)
}

func (e *emitter) connected() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns)
}

// waitJoined waits until n more upstream requests started streaming.
func (e *emitter) waitJoined(t testing.TB, n int) {
	t.Helper()
	for range n {
		select {
		case <-e.joined:
		case <-time.After(5 * time.Second):
			t.Fatalf("the backend got no new stream request (%d so far)", e.requests())
		}
	}
}

// fanoutRoute is /events through sse with fan-out (linger 0 unless the
// test sets it, so hubs do not outlive their test) to the emitter.
func fanoutRoute(e *emitter, fields map[string]any) string {
	fo := map[string]any{"linger": 0}
	f := map[string]any{"padding": 0, "heartbeat": "1s", "fanout": fo}
	for k, v := range fields {
		if k == "fanout" {
			for fk, fv := range v.(map[string]any) {
				fo[fk] = fv
			}
			continue
		}
		f[k] = v
	}
	return route("/events", sseHandler(f), proxyTo(e.addr))
}

// eventsOf parses what a client received.
func eventsOf(c *client) []parsedEvent {
	ev, _, _ := parseEvents(c.bytes())
	return ev
}

// waitEvents waits until the client parsed n events.
func waitEvents(t testing.TB, c *client, n int) []parsedEvent {
	t.Helper()
	c.waitFor(t, 5*time.Second, fmt.Sprintf("%d events", n), func(b []byte) bool {
		ev, _, _ := parseEvents(b)
		return len(ev) >= n
	})
	return eventsOf(c)
}

func datas(evs []parsedEvent) string {
	var s []string
	for _, e := range evs {
		s = append(s, e.Data)
	}
	return strings.Join(s, ",")
}

func TestFanoutSharesOneUpstream(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, nil))
	var clients []*client
	for i := range 20 {
		clients = append(clients, openStream(t, base+"/events", i%2 == 1))
	}
	e.waitJoined(t, 1)
	for i := range 5 {
		e.emit(fmt.Sprintf("event: tick\r\ndata: %d\r\n\r\n", i))
	}
	for _, c := range clients {
		evs := waitEvents(t, c, 5)
		if got := datas(evs); got != "0,1,2,3,4" || evs[0].Type != "tick" {
			t.Fatalf("client got %q (%+v)", got, evs)
		}
		if evs[4].ID == "" || evs[4].ID == evs[3].ID {
			t.Fatalf("no synthesized ids for a backend without ids: %+v", evs)
		}
	}
	if n := e.requests(); n != 1 {
		t.Fatalf("backend got %d requests for 20 clients of one stream", n)
	}
	for _, c := range clients[:2] { // HTTP/1.1 (handed over) and HTTP/2
		if got := c.Resp.Header.Get("Content-Type"); got != "text/event-stream" {
			t.Fatalf("%s: Content-Type %q", c.Resp.Proto, got)
		}
		// Intermediaries that know the Incremental header do not buffer.
		if got := c.Resp.Header.Get("Incremental"); got != "?1" {
			t.Fatalf("%s: Incremental %q, want ?1", c.Resp.Proto, got)
		}
	}
}

func TestFanoutNeverSharesAcrossCredentials(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, nil))
	openStream(t, base+"/events", false, "Authorization", "Bearer alice")
	e.waitJoined(t, 1)
	openStream(t, base+"/events", false, "Authorization", "Bearer bob")
	e.waitJoined(t, 1)
	openStream(t, base+"/events", false, "Cookie", "session=carol")
	e.waitJoined(t, 1)
	openStream(t, base+"/events", false, "Authorization", "Bearer alice")
	openStream(t, base+"/events?other", false, "Authorization", "Bearer alice")
	e.waitJoined(t, 1)
	if n := e.requests(); n != 4 {
		t.Fatalf("backend got %d requests; want 4 (alice, bob, carol, alice on another URL)", n)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for i, want := range []string{"Bearer alice", "Bearer bob", "", "Bearer alice"} {
		if got := e.reqs[i].Header.Get("Authorization"); got != want {
			t.Errorf("upstream request %d had Authorization %q, want %q", i, got, want)
		}
	}
}

// A client that reconnects with Last-Event-ID gets exactly the events it
// missed, from the cache, in front of a backend that knows nothing of ids.
func TestFanoutReplayAfterReconnect(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, nil))
	stay := openStream(t, base+"/events", false)
	leave := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	for i := range 3 {
		e.emit(fmt.Sprintf("data: %d\n\n", i))
	}
	evs := waitEvents(t, leave, 3)
	lastID := evs[2].ID
	leave.close()
	for i := 3; i < 8; i++ {
		e.emit(fmt.Sprintf("data: %d\n\n", i))
	}
	waitEvents(t, stay, 8)
	back := openStream(t, base+"/events", false, "Last-Event-ID", lastID)
	e.emit("data: 8\n\n")
	got := waitEvents(t, back, 6)
	if d := datas(got); d != "3,4,5,6,7,8" {
		t.Fatalf("replay after %q gave %q", lastID, d)
	}
	if r := e.reqs[0]; r.Header.Get("Last-Event-ID") != "" {
		t.Fatalf("Last-Event-ID reached a backend without ids")
	}
	if n := e.requests(); n != 1 {
		t.Fatalf("backend got %d requests", n)
	}
	// Ids as the live client saw them are the same as replayed ones.
	if live := eventsOf(stay); live[5].ID != got[2].ID {
		t.Fatalf("replayed id %q differs from live id %q", got[2].ID, live[5].ID)
	}
}

func TestFanoutUnknownIDGetsResetEvent(t *testing.T) {
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"reset_event": "gone"}}))
	c := openStream(t, base+"/events", false, "Last-Event-ID", "no-such-id")
	e.waitJoined(t, 1)
	e.emit("data: live\n\n")
	evs := waitEvents(t, c, 2)
	if evs[0].Type != "gone" || evs[0].Data != "no-such-id" || evs[1].Data != "live" {
		t.Fatalf("got %+v", evs)
	}
}

// The backend dies and comes back: connected clients stay connected and
// see one continuous stream, told of the gap by a reset event (the
// backend has no ids: what it sent while down is lost).
func TestFanoutSurvivesBackendRestart(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, nil))
	a := openStream(t, base+"/events", false)
	b := openStream(t, base+"/events", true)
	e.waitJoined(t, 1)
	for i := range 3 {
		e.emit(fmt.Sprintf("data: %d\n\n", i))
	}
	waitEvents(t, a, 3)
	waitEvents(t, b, 3)
	e.kill()
	e.restart()
	e.waitJoined(t, 1) // the hub reconnected by itself
	for i := 3; i < 6; i++ {
		e.emit(fmt.Sprintf("data: %d\n\n", i))
	}
	for _, c := range []*client{a, b} {
		evs := waitEvents(t, c, 7)
		if d := datas(evs); d != "0,1,2,"+evs[2].ID+",3,4,5" || evs[3].Type != defaultResetEvent {
			t.Fatalf("client saw %q", d)
		}
		select {
		case <-c.eof:
			t.Fatal("client was disconnected")
		default:
		}
	}
}

// A backend that answers with an error is not a stream: the client gets
// the backend's answer.
func TestFanoutBackendErrorReachesClient(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	e.status = http.StatusForbidden
	e.header.Set("Content-Type", "text/plain")
	base := startCaddy(t, fanoutRoute(e, nil))
	req, _ := http.NewRequest("GET", base+"/events", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || string(body) != "backend says no" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
}

func TestFanoutMaxClients(t *testing.T) {
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"max_clients": 2, "any_accept": true}}))
	openStream(t, base+"/events", false)
	openStream(t, base+"/events", false)
	req, _ := http.NewRequest("GET", base+"/events", nil)
	req.Header.Set("Accept", "*/*") // an EventSource is refused otherwise (TestFanoutRefusalEventSourceComesBack)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("third client got %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
}

// A client that stops reading is cut off; the others keep receiving every
// event before the next one is sent.
func TestFanoutSlowClientCutOff(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"write_timeout": "1s", "fanout": map[string]any{"client_queue": 16}}))
	fast := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	dialStalled(t, base, "")
	payload := strings.Repeat("x", 256<<10)
	const n = 40 // 10 MB: more than the socket buffers hold
	for i := range n {
		e.emit(fmt.Sprintf("data: %d %s\n\n", i, payload))
		waitEvents(t, fast, i+1)
	}
	// The stalled client must have been cut off: only the fast one is
	// left on the hub.
	waitHubClients(t, base, 1)
}

// eventsHub is the hub of base's /events (default key), or nil.
func eventsHub(base string) *hub {
	var found *hub
	hubs.Range(func(k, v any) bool {
		if strings.Contains(k.(string), strings.TrimPrefix(base, "http://")+"/events\x00") {
			found = v.(*hub)
			return false
		}
		return true
	})
	return found
}

// waitHubClients waits until the hub of base's /events has n clients.
func waitHubClients(t testing.TB, base string, n int) {
	t.Helper()
	clients := -1
	if !eventually(10*time.Second, func() bool {
		clients = -1
		if hb := eventsHub(base); hb != nil {
			hb.mu.Lock()
			clients = hb.clients
			hb.mu.Unlock()
		}
		return clients == n
	}) {
		t.Fatalf("hub has %d clients, want %d", clients, n)
	}
}

func TestFanoutLingerKeepsThenClosesUpstream(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"linger": "1s"}}))
	c := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	c.close()
	c2 := openStream(t, base+"/events", false) // within linger: same upstream
	e.emit("data: x\n\n")
	waitEvents(t, c2, 1)
	if n := e.requests(); n != 1 {
		t.Fatalf("reconnect within linger opened a new upstream (%d requests)", n)
	}
	c2.close()
	if !eventually(5*time.Second, func() bool { return e.connected() == 0 }) {
		t.Fatal("upstream still open 5s after the last client left (linger 1s)")
	}
}

// A config reload under load loses nothing: the old config's clients are
// told to reconnect, do so with their Last-Event-ID, and get what they
// missed from the cache that outlived the old config.
func TestFanoutReloadLosesNothing(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	caddyMu.Lock()
	defer caddyMu.Unlock()
	addr := freeAddr(t)
	load := func(heartbeat string) {
		cfg := caddyConfig(addr, fanoutRoute(e, map[string]any{"heartbeat": heartbeat, "fanout": map[string]any{"linger": "2s"}}))
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatal(err)
		}
	}
	load("1s")
	defer waitHubsGone(t, addr)
	defer caddy.Stop()
	c := openStream(t, "http://"+addr+"/events", false)
	e.waitJoined(t, 1)
	e.emit("data: 0\n\n")
	evs := waitEvents(t, c, 1)
	load("1s") // the same hub settings: the cache carries over
	got := c.waitEOF(t, 5*time.Second)
	if !strings.Contains(string(got), "retry: ") {
		t.Fatalf("old stream ended without a retry hint: %q", got)
	}
	if c.err != io.EOF {
		t.Fatalf("old stream ended with %v, want a clean end", c.err)
	}
	// Events emitted while the client is away.
	e.emit("data: 1\n\n")
	e.emit("data: 2\n\n")
	c2 := openStream(t, "http://"+addr+"/events", false, "Last-Event-ID", evs[0].ID)
	e.waitJoined(t, 1) // the new config's route takes the upstream over
	e.emit("data: 3\n\n")
	if d := datas(waitEvents(t, c2, 3)); d != "1,2,3" {
		t.Fatalf("after the reload the client got %q", d)
	}
}

// waitHubsGone waits until no hub of the server at addr is left in the
// pool, so that tests after this one start from an empty pool.
func waitHubsGone(t testing.TB, addr string) {
	t.Helper()
	left := 0
	if !eventually(10*time.Second, func() bool {
		left = 0
		hubs.Range(func(k, _ any) bool {
			if strings.Contains(k.(string), addr+"/") {
				left++
			}
			return true
		})
		return left == 0
	}) {
		t.Errorf("%d hubs of %s still in the pool", left, addr)
	}
}
