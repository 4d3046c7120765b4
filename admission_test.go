package caddysse

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"
)

// A backend that writes far more than client_queue events at once (a
// history replay, a batch) must not cut clients that read at full speed:
// every one of them, handed over (HTTP/1.1) or on its request (HTTP/2),
// gets every event, in order. Only a client whose bytes stop leaving is
// cut (TestFanoutSlowClientCutOff, TestFanoutStalledHTTP2ClientCutByWriteTimeout).
func TestFanoutBurstKeepsFastClients(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	const n = 5000
	base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"buffer_events": 2 * n}}))
	clients := []*client{
		openStream(t, base+"/events", false),
		openStream(t, base+"/events", false),
		openStream(t, base+"/events", true),
		openStream(t, base+"/events", true),
	}
	e.waitJoined(t, 1)
	waitHubClients(t, base, len(clients))
	var burst strings.Builder
	for i := range n {
		fmt.Fprintf(&burst, "data: %d %s\n\n", i, strings.Repeat("x", 100))
	}
	e.emit(burst.String())
	for i, c := range clients {
		waitCount(t, c, n, 10*time.Second)
		for j, ev := range eventsOf(c) {
			if want := fmt.Sprintf("%d %s", j, strings.Repeat("x", 100)); ev.Data != want {
				t.Fatalf("client %d: event %d is %.20q, want %.20q", i, j, ev.Data, want)
			}
		}
	}
	waitHubClients(t, base, len(clients))
}

// waitCount waits until c parsed n events, and fails with a short account
// (not the whole stream) if it does not within d.
func waitCount(t testing.TB, c *client, n int, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		got, _, _ := parseEvents(c.bytes())
		if len(got) >= n {
			return
		}
		select {
		case <-c.more:
		case <-c.eof:
			if got, _, _ := parseEvents(c.bytes()); len(got) >= n {
				return
			}
			t.Fatalf("stream ended (%v) after %d of %d events", c.err, len(got), n)
		case <-deadline:
			t.Fatalf("%d of %d events within %s", len(got), n, d)
		}
	}
}

// A client refused by a limit must come back later. An EventSource gets
// 200 text/event-stream with a jittered retry and an immediate end (a
// non-200 answer would stop it for good); a client that did not ask for
// an event stream gets 503 with Retry-After.
func TestFanoutRefusalEventSourceComesBack(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"retry": "2s", "fanout": map[string]any{"max_clients": 1, "any_accept": true}}))
	openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	waitHubClients(t, base, 1)
	retries := map[string]bool{}
	for _, h2 := range []bool{false, true, false, true} {
		c := openStream(t, base+"/events", h2)
		got := string(c.waitEOF(t, 5*time.Second))
		if c.Resp.StatusCode != http.StatusOK || c.Resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("refused EventSource (h2 %v) got %d %q", h2, c.Resp.StatusCode, c.Resp.Header.Get("Content-Type"))
		}
		var ms int
		if _, err := fmt.Sscanf(got, "retry: %d", &ms); err != nil || got != string(sse.RetryField(time.Duration(ms)*time.Millisecond)) || ms < 2000 || ms >= 4000 {
			t.Fatalf("refused EventSource (h2 %v) got body %q, want one retry field in [2000, 4000)", h2, got)
		}
		retries[got] = true
	}
	if len(retries) < 2 {
		t.Errorf("four refusals all got %v: the retry is not jittered", retries)
	}
	// Not an EventSource: 503, as before.
	req, _ := http.NewRequest("GET", base+"/events", nil)
	req.Header.Set("Accept", "*/*")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "2" {
		t.Fatalf("refused non-EventSource client got %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	waitHubClients(t, base, 1)
}

// holdingBackend answers nothing until its client leaves, and counts the
// requests it holds: an upstream that never gets to stream.
type holdingBackend struct {
	addr string
	held atomic.Int64 // requests now held
	got  atomic.Int64 // requests so far
}

func newHoldingBackend(t *testing.T) *holdingBackend {
	b := &holdingBackend{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.held.Add(1)
		b.got.Add(1)
		defer b.held.Add(-1)
		<-r.Context().Done()
	}))
	t.Cleanup(srv.Close)
	b.addr = srv.Listener.Addr().String()
	return b
}

// Many clients with distinct keys (here distinct queries) that leave
// before their upstream answered must not hold as many upstream
// connections for linger: a hub that never streamed to anyone goes at
// once, and gives back its place under max_streams.
func TestFanoutClientsThatLeaveEarlyHoldNoUpstream(t *testing.T) {
	checkNoLeak(t)
	b := newHoldingBackend(t)
	const n = 20
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"padding": 0, "fanout": map[string]any{
		"linger": "5s", "max_streams": n,
	}}), proxyTo(b.addr)))
	for i := range n {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/events?user=%d", base, i), nil)
		req.Header.Set("Accept", "text/event-stream")
		done := make(chan struct{})
		go func() {
			defer close(done)
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		}()
		for deadline := time.Now().Add(5 * time.Second); b.got.Load() < int64(i+1); {
			if time.Now().After(deadline) {
				t.Fatalf("client %d: the backend got no request", i)
			}
			time.Sleep(5 * time.Millisecond) // polling a condition with a deadline
		}
		cancel() // the client leaves before the upstream answered
		<-done
	}
	for deadline := time.Now().Add(2 * time.Second); b.held.Load() > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d upstream requests still held after their clients left (linger 5s)", b.held.Load())
		}
		time.Sleep(10 * time.Millisecond) // polling a condition with a deadline
	}
}

// max_streams caps the hubs of a handler: the stream past it is refused
// (as at max_clients), the others go on, and a freed place is taken again.
func TestFanoutMaxStreamsRefusesTheNextStream(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"max_streams": 2, "any_accept": true}}))
	a := openStream(t, base+"/events?k=a", false)
	b := openStream(t, base+"/events?k=b", true)
	e.waitJoined(t, 2)
	refused := openStream(t, base+"/events?k=c", false)
	if got := string(refused.waitEOF(t, 5*time.Second)); refused.Resp.StatusCode != http.StatusOK || !strings.HasPrefix(got, "retry: ") {
		t.Fatalf("third stream got %d %q, want a refusal an EventSource comes back from", refused.Resp.StatusCode, got)
	}
	req, _ := http.NewRequest("GET", base+"/events?k=d", nil)
	req.Header.Set("Accept", "*/*")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("a stream past max_streams for a non-EventSource client got %d, want 503", resp.StatusCode)
	}
	// A client of an existing stream is not refused.
	a2 := openStream(t, base+"/events?k=a", false)
	e.emit("data: one\n\n")
	for _, c := range []*client{a, b, a2} {
		waitEvents(t, c, 1)
	}
	// A freed place (linger 0) is taken again.
	b.close()
	for deadline := time.Now().Add(5 * time.Second); e.connected() != 1; {
		if time.Now().After(deadline) {
			t.Fatalf("%d upstreams after one of two streams lost its last client", e.connected())
		}
		time.Sleep(10 * time.Millisecond) // polling a condition with a deadline
	}
	c := openStream(t, base+"/events?k=c", false)
	e.waitJoined(t, 1)
	e.emit("data: two\n\n")
	waitEvents(t, c, 1)
}

// readAllRaw reads conn until the server closes it (or within d).
func readAllRaw(t *testing.T, conn net.Conn, d time.Duration) []byte {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(d))
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading the raw stream: %v (got %d bytes)", err, len(got))
	}
	return got
}

// splitChunked checks that raw is a chunked HTTP/1.1 response, and
// returns its body as the chunks carry it and whether the body ended with
// the last chunk.
func splitChunked(t *testing.T, raw []byte) (body []byte, ended bool) {
	t.Helper()
	head, rest, ok := bytes.Cut(raw, []byte("\r\n\r\n"))
	if !ok {
		t.Fatalf("no response header in %.200q", raw)
	}
	h := strings.ToLower(string(head))
	if !strings.Contains(h, "\r\ntransfer-encoding: chunked") {
		t.Fatalf("handed-over response not chunked: %q", head)
	}
	body, err := io.ReadAll(httputil.NewChunkedReader(bytes.NewReader(rest)))
	switch {
	case err == nil:
		if !bytes.HasSuffix(rest, []byte("\r\n0\r\n\r\n")) {
			t.Fatalf("chunked body ends with %q", rest[max(len(rest)-20, 0):])
		}
		return body, true
	case errors.Is(err, io.ErrUnexpectedEOF):
		return body, false
	default:
		t.Fatalf("bad chunked body: %v", err)
		return nil, false
	}
}

// A handed-over HTTP/1.1 stream stays chunked, so that a cut looks like a
// cut: a clean end (here max_age) writes the last chunk, a client cut off
// (here for not reading) gets none.
func TestFanoutHandedOverStreamIsChunked(t *testing.T) {
	checkNoLeak(t)
	t.Run("clean end", func(t *testing.T) {
		e := newEmitter(t)
		base := startCaddy(t, fanoutRoute(e, map[string]any{"max_age": "1s", "retry": "250ms"}))
		conn := dialRaw(t, base, "", 0)
		e.waitJoined(t, 1)
		for deadline := time.Now().Add(5 * time.Second); detachedClients(base) != 1; {
			if time.Now().After(deadline) {
				t.Fatalf("%d handed-over clients, want 1", detachedClients(base))
			}
			time.Sleep(10 * time.Millisecond) // polling a condition with a deadline
		}
		e.emit("data: one\n\n")
		e.emit("data: two\n\n")
		body, ended := splitChunked(t, readAllRaw(t, conn, 5*time.Second))
		evs, _, _ := parseEvents(body)
		if !ended || datas(evs) != "one,two" || !bytes.HasSuffix(body, sse.RetryField(250*time.Millisecond)) {
			t.Fatalf("clean end: last chunk %v, body %q", ended, body)
		}
	})
	t.Run("cut", func(t *testing.T) {
		e := newEmitter(t)
		base := startCaddy(t, fanoutRoute(e, map[string]any{"write_timeout": "1s"}))
		fast := openStream(t, base+"/events", false)
		e.waitJoined(t, 1)
		// Default buffers, so that once cut, what it was sent arrives at
		// once (a tiny window makes the kernel's window probes crawl).
		stalled := dialRaw(t, base, "", 0)
		waitHubClients(t, base, 2)
		payload := strings.Repeat("x", 512<<10)
		const n = 40 // 20 MB: more than the socket buffers hold
		for i := range n {
			e.emit(fmt.Sprintf("data: %d %s\n\n", i, payload))
		}
		waitCount(t, fast, n, 10*time.Second)
		waitHubClients(t, base, 1) // the stalled one was cut
		body, ended := splitChunked(t, readAllRaw(t, stalled, 10*time.Second))
		if ended {
			t.Fatalf("a client cut off got the last chunk, as if its stream had ended (%d bytes of body)", len(body))
		}
	})
}

// A fan-out client on its request (HTTP/2 here) that is cut off because
// its next event left the cache must see a cut (the stream reset), not a
// clean end, for the same reason as a handed-over one
// (TestFanoutHandedOverStreamIsChunked).
func TestFanoutCutHTTP2ClientSeesACut(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"write_timeout": "30s", "fanout": map[string]any{"buffer_events": 4}}))
	fast := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	resp, cancel := streamRequest(t, base+"/events", true) // not read for now
	defer cancel()
	defer resp.Body.Close()
	waitHubClients(t, base, 2)
	payload := strings.Repeat("x", 256<<10)
	const n = 40 // 10 MB: more than an HTTP/2 stream's window
	for i := range n {
		e.emit(fmt.Sprintf("data: %d %s\n\n", i, payload))
		waitCount(t, fast, i+1, 10*time.Second) // at the pace of the fast one, which stays in the cache
	}
	// It reads again: it gets what was sent, then its stream is cut, as
	// its next event left the cache (4 events) meanwhile.
	got, err := io.ReadAll(resp.Body)
	if err == nil {
		t.Fatalf("the stream of a client that fell out of the cache ended cleanly after %d bytes", len(got))
	}
	waitHubClients(t, base, 1)
}
