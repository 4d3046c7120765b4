package caddysse

import (
	"bufio"
	"bytes"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// detachedClients counts the clients in the delivery loops of base's
// /events hub.
func detachedClients(base string) int {
	if hb := eventsHub(base); hb != nil {
		return hb.handedOver()
	}
	return 0
}

// drainingClients counts the detached clients of base's /events hub whose
// last write is still being drained.
func drainingClients(base string) int {
	hb := eventsHub(base)
	if hb == nil {
		return 0
	}
	n := 0
	for _, d := range hb.deliverers() {
		d.mu.Lock()
		for _, c := range d.clients {
			if c.wc.draining() {
				n++
			}
		}
		d.mu.Unlock()
	}
	return n
}

// goroutinesIn counts the goroutines whose stack holds fn.
func goroutinesIn(fn string) int {
	_, stacks := sseGoroutines()
	n := 0
	for _, g := range strings.Split(stacks, "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// Plain HTTP/1.1 clients are handed over to the hub's delivery loops:
// their request goroutines return, their responses are delimited by the
// end of the connection. HTTP/2 clients stay on their requests.
func TestFanoutHandsOverHTTP1Connections(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"heartbeat": 0}))
	var h1, h2 []*client
	for range 6 {
		h1 = append(h1, openStream(t, base+"/events", false))
	}
	for range 2 {
		h2 = append(h2, openStream(t, base+"/events", true))
	}
	e.waitJoined(t, 1)
	waitHubClients(t, base, 8)
	e.emit("data: one\n\n")
	for _, c := range append(h1, h2...) {
		waitEvents(t, c, 1)
	}
	if n := detachedClients(base); n != 6 {
		t.Fatalf("%d clients in the delivery loops, want the 6 HTTP/1.1 ones", n)
	}
	if n := goroutinesIn("(*fanoutClient).run"); n != 2 {
		t.Fatalf("%d clients served on their request goroutine, want the 2 HTTP/2 ones", n)
	}
	r := h1[0].Resp
	if len(r.TransferEncoding) != 1 || r.TransferEncoding[0] != "chunked" || r.ContentLength != -1 || r.Close {
		t.Fatalf("HTTP/1.1 stream: Transfer-Encoding %v, Content-Length %d, Close %v; want chunked, without Connection: close (TestFanoutFetchEventSourceReconnectsAfterACut)",
			r.TransferEncoding, r.ContentLength, r.Close)
	}

	// A client that closes its connection leaves at once, with nothing
	// written to it (no heartbeats here) to find out.
	h1[0].close()
	waitHubClients(t, base, 7)
	if n := detachedClients(base); n != 5 {
		t.Fatalf("%d clients in the delivery loops after one left, want 5", n)
	}
	e.emit("data: two\n\n")
	for _, c := range append(h1[1:], h2...) {
		if got := datas(waitEvents(t, c, 2)); got != "one,two" {
			t.Fatalf("client got %q", got)
		}
	}
}

// A detached client whose socket is full gets the rest of its write
// through a drain, and its next events only after it: once it reads again
// it gets every event, whole and in order, while the others were served.
func TestFanoutDetachedSlowReaderGetsEverythingInOrder(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"write_timeout": "20s", "fanout": map[string]any{"client_queue": 1000}}))
	fast := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	// A client that does not read, with the kernel's default buffers.
	slow := dialRaw(t, base, "", 0)
	waitHubClients(t, base, 2)
	payload := strings.Repeat("x", 64<<10)
	const n = 160 // 10 MB: more than the socket buffers of a reader that does not read
	for i := range n {
		e.emit(fmt.Sprintf("data: %d %s\n\n", i, payload))
	}
	waitEvents(t, fast, n)
	if !eventually(5*time.Second, func() bool { return drainingClients(base) == 1 }) {
		t.Fatalf("%d clients waiting on a drain, want the one that does not read", drainingClients(base))
	}
	resp, err := http.ReadResponse(bufio.NewReader(slow), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	defer slow.Close() // first: closing a chunked body reads it to its end
	done := make(chan []byte)
	go func() {
		var got []byte
		buf := make([]byte, 64<<10)
		blocks := 0 // blank lines seen: at least one per event
		for {
			k, err := resp.Body.Read(buf)
			from := max(len(got)-1, 0)
			got = append(got, buf[:k]...)
			blocks += bytes.Count(got[from:], []byte("\n\n"))
			if blocks >= n {
				if ev, _, _ := parseEvents(got); len(ev) >= n {
					done <- got
					return
				}
			}
			if err != nil {
				done <- got
				return
			}
		}
	}()
	var got []byte
	select {
	case got = <-done:
	case <-time.After(15 * time.Second):
		t.Fatalf("the slow client did not get its events once it read again ")
	}
	evs, _, _ := parseEvents(got)
	if len(evs) != n {
		t.Fatalf("slow client got %d events, want %d", len(evs), n)
	}
	for i, ev := range evs {
		if want := fmt.Sprintf("%d %s", i, payload); ev.Data != want {
			t.Fatalf("event %d: got %.20q..., want %.20q...", i, ev.Data, want)
		}
	}
}

// max_age ends handed-over clients like the others: at an event boundary,
// with the retry hint, and a compressed stream with its trailer, so that
// every decoder sees a clean end.
func TestFanoutMaxAgeEndsEveryKindOfClient(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{
		"max_age": "1s", "retry": "250ms", "compress": []string{"gzip", "zstd", "br"}}))
	clients := map[string]*decodingClient{
		"HTTP/1.1":      openDecoding(t, base+"/events", false, ""),
		"HTTP/1.1 gzip": openDecoding(t, base+"/events", false, "gzip"),
		"HTTP/1.1 zstd": openDecoding(t, base+"/events", false, "zstd"),
		"HTTP/2 gzip":   openDecoding(t, base+"/events", true, "gzip"),
		"HTTP/1.1 br":   openDecoding(t, base+"/events", false, "br"),
		"HTTP/2 br":     openDecoding(t, base+"/events", true, "br"),
	}
	e.waitJoined(t, 1)
	waitHubClients(t, base, len(clients))
	e.emit("data: before\n\n")
	for name, c := range clients {
		c.waitUntil(t, name+" event", func(s string) bool { return strings.Contains(s, "data: before") })
	}
	// Each has an event: the HTTP/1.1 ones got it from a delivery loop.
	if n := detachedClients(base); n != 4 {
		t.Fatalf("%d handed-over clients, want the 4 on HTTP/1.1", n)
	}
	for name, c := range clients {
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: still open 5s after a 1s max_age", name)
		}
		got, _ := c.state()
		if c.err != nil {
			t.Fatalf("%s: stream ended with %v, want a clean end", name, c.err)
		}
		if !strings.HasSuffix(got, "retry: 250\n") {
			t.Fatalf("%s: did not end with the retry hint: %q", name, tail(got))
		}
	}
	// Every client released: with linger 0 the hub is gone, and the br
	// clients' own encoders are back in their pool.
	waitHubsGone(t, strings.TrimPrefix(base, "http://"))
	waitNoLiveEncoders(t)
}

// A fan-out client on HTTP/2 that stops reading is cut off by
// write_timeout (its writes bypass Caddy's idle-timeout writer), while
// the others keep receiving. The queue bound is too high to do it.
func TestFanoutStalledHTTP2ClientCutByWriteTimeout(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"write_timeout": "1s", "fanout": map[string]any{"client_queue": 1000}}))
	fast := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	resp, cancel := streamRequest(t, base+"/events", true) // never read
	defer cancel()
	defer resp.Body.Close()
	waitHubClients(t, base, 2)
	payload := strings.Repeat("x", 256<<10)
	const n = 40 // 10 MB: more than an HTTP/2 stream's 4 MiB window
	for i := range n {
		e.emit(fmt.Sprintf("data: %d %s\n\n", i, payload))
	}
	waitEvents(t, fast, n)
	waitHubClients(t, base, 1)
}

// With Caddy's encode in front, fan-out streams are compressed by sse
// alone, or not at all: encode sees the header (no-transform) and leaves
// the body, which no longer passes through it, alone. Every client
// decodes exactly the events, whatever it accepts, on either protocol.
func TestFanoutBehindEncode(t *testing.T) {
	for _, compress := range [][]string{nil, {"off"}} {
		t.Run(map[bool]string{true: "sse-compresses", false: "sse-compression-off"}[compress == nil], func(t *testing.T) {
			checkNoLeak(t)
			e := newEmitter(t)
			fields := map[string]any{"padding": 0, "heartbeat": "1s", "fanout": map[string]any{"linger": 0}}
			if compress != nil {
				fields["compress"] = compress
			}
			base := startCaddy(t, route("/events", encodeHandler("gzip", "zstd"), sseHandler(fields), proxyTo(e.addr)))
			type tc struct {
				accept string
				h2     bool
			}
			cases := []tc{{"", false}, {"gzip", false}, {"zstd", false}, {"gzip", true}}
			clients := make([]*decodingClient, len(cases))
			for i, c := range cases {
				clients[i] = openDecoding(t, base+"/events", c.h2, c.accept)
			}
			e.waitJoined(t, 1)
			waitHubClients(t, base, len(cases))
			e.emit("data: one\n\n")
			e.emit("event: two\ndata: 2\n\n")
			for i, c := range clients {
				got := c.waitUntil(t, "two events", func(s string) bool { return strings.Contains(s, "data: 2\n") })
				evs, _, _ := parseEvents([]byte(got))
				if datas(evs) != "one,2" || evs[1].Type != "two" {
					t.Fatalf("%+v: decoded %q", cases[i], got)
				}
				want := cases[i].accept
				if compress != nil {
					want = "" // compression off: identity, whatever encode could do
				}
				if ce := c.Resp.Header.Get("Content-Encoding"); ce != want {
					t.Fatalf("%+v: Content-Encoding %q, want %q", cases[i], ce, want)
				}
			}
		})
	}
}
