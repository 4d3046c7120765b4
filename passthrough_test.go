package caddysse

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"github.com/caddyserver/caddy/v2"
)

// prelude is what a handler with these settings writes first.
func prelude(padding int, retry time.Duration) string {
	s := string(sse.PaddingBlock(padding))
	if retry > 0 {
		s += string(sse.RetryField(retry))
	}
	return s
}

func TestStreamHeadersAndPaddingBeforeFirstEvent(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(map[bool]string{false: "HTTP/1.1", true: "HTTP/2"}[h2], func(t *testing.T) {
			checkNoLeak(t)
			b := newScriptedBackend(t)
			b.header.Set("Content-Length", "1000000")
			b.header.Set("Connection", "keep-alive")
			base := startCaddy(t, route("/events", sseHandler(map[string]any{"padding": 512, "retry": "3s"}), proxyTo(b.Addr)))
			c := openStream(t, base+"/events", h2)
			if h2 != (c.Resp.ProtoMajor == 2) {
				t.Fatalf("got %s", c.Resp.Proto)
			}
			want := map[string]string{
				"Content-Type":      "text/event-stream",
				"Cache-Control":     "no-cache, no-transform",
				"X-Accel-Buffering": "no",
				"Incremental":       "?1", // RFC 10036: intermediaries that know it do not buffer
				"Content-Length":    "",
			}
			for k, v := range want {
				if got := c.Resp.Header.Get(k); got != v {
					t.Errorf("header %s = %q, want %q", k, got, v)
				}
			}
			if c.Resp.ContentLength != -1 {
				t.Errorf("ContentLength = %d, want unknown (-1)", c.Resp.ContentLength)
			}
			// The backend has written no event yet: the padding and the
			// retry field must already be here.
			pre := prelude(512, 3*time.Second)
			got := c.waitSuffix(t, pre)
			if string(got) != pre {
				t.Fatalf("stream starts with %q, want only the prelude", got)
			}
			b.send(t, "data: one\n\n")
			c.waitSuffix(t, "data: one\n\n")
		})
	}
}

func TestBackendCacheControlKept(t *testing.T) {
	b := newScriptedBackend(t)
	b.header.Set("Cache-Control", "private, max-age=0")
	base := startCaddy(t, route("/events", sseHandler(nil), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false)
	if got := c.Resp.Header.Get("Cache-Control"); got != "private, max-age=0, no-transform" {
		t.Fatalf("Cache-Control = %q", got)
	}
}

// Each event must reach the client before the backend writes the next one,
// however the backend chunks and flushes it; a partial event is held.
func TestEventReachesClientBeforeNextIsWritten(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(map[bool]string{false: "HTTP/1.1", true: "HTTP/2"}[h2], func(t *testing.T) {
			checkNoLeak(t)
			b := newScriptedBackend(t)
			base := startCaddy(t, route("/events", sseHandler(map[string]any{"padding": 0, "heartbeat": 0}), proxyTo(b.Addr)))
			c := openStream(t, base+"/events", h2)
			var want strings.Builder
			for i := range 20 {
				// (A blank line ending in CR would complete the event at the
				// CR already, so the last byte must be the LF of "\n\n".)
				ev := fmt.Sprintf("id: %d\r\nevent: tick\rdata: {\"n\":%d}\n\n", i, i)
				// Odd chunks, each flushed by the backend.
				b.send(t, ev[:3], ev[3:11], ev[11:len(ev)-1])
				if got := c.bytes(); string(got) != want.String() {
					t.Fatalf("partial event %d reached the client: got %q", i, got)
				}
				b.send(t, ev[len(ev)-1:])
				want.WriteString(ev)
				c.waitFor(t, 5*time.Second, fmt.Sprintf("event %d", i), func(got []byte) bool {
					return string(got) == want.String()
				})
			}
		})
	}
}

func TestSeveralEventsInOneWriteAndBOM(t *testing.T) {
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"padding": 64}), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false)
	b.send(t, "\xef\xbb", "\xbfdata: a\n\ndata: b\n\ndata: c")
	got := c.waitSuffix(t, "data: b\n\n")
	events, _, _ := parseEvents(got)
	if len(events) != 2 || events[0].Data != "a" || events[1].Data != "b" {
		t.Fatalf("events %+v from %q", events, got)
	}
	if bytes.Contains(got, []byte("\xef\xbb\xbf")) {
		t.Fatalf("BOM after the padding would corrupt the first field: %q", got)
	}
}

func TestHeartbeatOnIdleStreamOnlyAtBoundaries(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"heartbeat": "1s", "heartbeat_comment": "hb", "padding": 0}), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false)
	b.send(t, "data: first\n\n")
	c.waitSuffix(t, "data: first\n\n")
	// Half an event is held while the stream idles: heartbeats still go
	// out, because the wire is at an event boundary.
	b.send(t, "data: sec")
	c.waitFor(t, 3*time.Second, "heartbeat", func(got []byte) bool {
		return bytes.HasSuffix(got, []byte("data: first\n\n: hb\n"))
	})
	b.send(t, "ond\n\n")
	got := c.waitSuffix(t, "data: second\n\n")
	events, comments, atBoundary := parseEvents(got)
	if len(events) != 2 || events[1].Data != "second" || len(comments) == 0 || !atBoundary {
		t.Fatalf("events %+v comments %q atBoundary %v in %q", events, comments, atBoundary, got)
	}
}

// An event larger than max_event_size streams through unbuffered; no
// heartbeat may land inside it however long it stalls.
func TestOversizeEventStreamsWithoutHeartbeatInside(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"heartbeat": "1s", "padding": 0, "max_event_size": 1024}), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false)
	big := "data: " + strings.Repeat("x", 3000)
	b.send(t, big[:2000])
	c.waitFor(t, 3*time.Second, "the oversize part", func(got []byte) bool { return len(got) >= 2000 })
	// Stall for longer than the heartbeat interval: the heartbeat timer
	// fires (at least once) while the event is open on the wire.
	time.Sleep(2200 * time.Millisecond)
	if got := c.bytes(); string(got) != big[:2000] {
		t.Fatalf("bytes written inside an unfinished event: %q", got[2000:])
	}
	b.send(t, big[2000:]+"\n\n", "data: small\n\n")
	got := c.waitSuffix(t, "data: small\n\n")
	if !strings.HasPrefix(string(got), big+"\n\n") {
		t.Fatalf("oversize event not forwarded intact: %q...", got[:50])
	}
	// Back at a boundary, heartbeats resume.
	c.waitFor(t, 3*time.Second, "heartbeat after the event", func(got []byte) bool {
		return bytes.HasSuffix(got, []byte("data: small\n\n: heartbeat\n"))
	})
}

// Responses that are not event streams must be byte-identical with and
// without the plugin.
func TestNonStreamResponsesUntouched(t *testing.T) {
	dir := t.TempDir()
	file := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB, through ReadFrom
	if err := os.WriteFile(filepath.Join(dir, "big.bin"), file, 0o644); err != nil {
		t.Fatal(err)
	}
	backend := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/json", "/plain/json":
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Length", "13")
			io.WriteString(w, `{"ok": true}`+"\n")
		case "/204", "/plain/204":
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusNoContent)
		case "/404", "/plain/404":
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, "data: not a stream\n\n")
		}
	})}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go backend.Serve(ln)
	defer backend.Close()
	fileServer := fmt.Sprintf(`{"handler": "file_server", "root": %q}`, dir)
	rewrite := `{"handler": "rewrite", "strip_path_prefix": "/plain"}`
	base := startCaddy(t,
		route("/plain/big.bin", rewrite, fileServer),
		route("/big.bin", sseHandler(nil), fileServer),
		route("/plain/*", proxyTo(ln.Addr().String())),
		route("/*", sseHandler(nil), proxyTo(ln.Addr().String())),
	)
	dump := func(path string) string {
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		req.Header.Set("Accept", "text/event-stream")
		resp, err := http.DefaultTransport.(*http.Transport).RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		resp.Header.Del("Date")
		var hdr bytes.Buffer
		resp.Header.Write(&hdr)
		return fmt.Sprintf("%d %v\n%s\n%x", resp.StatusCode, resp.ContentLength, hdr.String(), body)
	}
	for _, path := range []string{"/json", "/204", "/404", "/big.bin"} {
		if with, without := dump(path), dump("/plain"+path); with != without {
			t.Errorf("%s differs with the plugin:\n%.300s\nwithout:\n%.300s", path, with, without)
		}
	}
}

func TestHeadRequestGetsHeadersOnly(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(nil), proxyTo(b.Addr)))
	req, _ := http.NewRequest(http.MethodHead, base+"/events", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || len(body) != 0 || resp.Header.Get("X-Accel-Buffering") != "no" {
		t.Fatalf("HEAD: %d %v body %q", resp.StatusCode, resp.Header, body)
	}
}

func TestAcceptEncodingRemovedForStreams(t *testing.T) {
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(nil), proxyTo(b.Addr)))
	openStream(t, base+"/events", false, "Accept-Encoding", "gzip, br")
	if r := b.request(t); r.Header.Get("Accept-Encoding") == "gzip, br" {
		t.Fatalf("backend got the client's Accept-Encoding %q", r.Header.Get("Accept-Encoding"))
	}
}

// A backend that compresses the stream anyway is passed through untouched
// (gzip never gets here: reverse_proxy's transport asks for it itself and
// decompresses it).
func TestPrecompressedStreamPassesThrough(t *testing.T) {
	b := newScriptedBackend(t)
	b.header.Set("Content-Encoding", "br")
	base := startCaddy(t, route("/events", sseHandler(nil), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false)
	b.send(t, "\x1f\x8b not really gzip")
	got := c.waitSuffix(t, "not really gzip")
	if string(got) != "\x1f\x8b not really gzip" || c.Resp.Header.Get("Content-Encoding") != "br" {
		t.Fatalf("got %q with %v", got, c.Resp.Header)
	}
}

func TestInvalidUTF8AndOddLineEndingsForwardedUnchanged(t *testing.T) {
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"padding": 0}), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false)
	stream := "data: \xff\xfe\xc3\r\rid\r\n:c\n\ndata\n\ndata: tail\r"
	for i := range stream {
		b.send(t, stream[i:i+1])
	}
	got := c.waitSuffix(t, "data\n\n")
	if string(got) != "data: \xff\xfe\xc3\r\rid\r\n:c\n\ndata\n\n" {
		t.Fatalf("got %q", got)
	}
	b.send(t, "\r")
	if got := c.waitSuffix(t, "data: tail\r\r"); !strings.HasSuffix(string(got), "data\n\ndata: tail\r\r") {
		t.Fatalf("got %q", got)
	}
}

func TestBackendEndsMidEvent(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"padding": 0}), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false)
	b.send(t, "data: whole\n\ndata: half")
	b.end(t)
	got := c.waitEOF(t, 5*time.Second)
	if string(got) != "data: whole\n\ndata: half" {
		t.Fatalf("got %q", got)
	}
}

// A client that leaves must cancel the upstream request of a stalled
// backend at once.
func TestClientLeavesStalledBackend(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(nil), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", true)
	b.send(t, "data: partial event, then the backend stalls")
	b.request(t)
	c.close()
	b.handlerReturned(t, 5*time.Second)
}

// A client that stops reading is dropped after write_timeout, and the
// upstream request ends with it.
func TestClientThatStopsReadingIsDropped(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"write_timeout": "1s", "heartbeat": 0}), proxyTo(b.Addr)))
	dialStalled(t, base, "")
	b.request(t)
	ev := "data: " + strings.Repeat("x", 64<<10) + "\n\n"
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case b.writes <- backendWrite{data: []byte(ev)}:
		case <-b.done:
			return // the stream ended: the stuck client was dropped
		}
		if time.Now().After(deadline) {
			t.Fatal("a client that never reads was not dropped")
		}
	}
}

func TestMaxAgeEndsStreamWithRetryHint(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, route("/events", sseHandler(map[string]any{"max_age": "1s", "retry": "250ms", "padding": 0}), proxyTo(b.Addr)))
	start := time.Now()
	c := openStream(t, base+"/events", false)
	b.send(t, "data: a\n\n")
	got := c.waitEOF(t, 3*time.Second)
	if age := time.Since(start); age < 800*time.Millisecond {
		t.Fatalf("stream ended after %s, before 80%% of max_age", age)
	}
	if string(got) != "retry: 250\ndata: a\n\nretry: 250\n" {
		t.Fatalf("got %q", got)
	}
	b.handlerReturned(t, 5*time.Second)
}

// A config reload must end the old config's streams promptly, at an event
// boundary, instead of holding the old config forever.
func TestReloadEndsOpenStreams(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	caddyMu.Lock()
	defer caddyMu.Unlock()
	addr := freeAddr(t)
	load := func(retry string) {
		cfg := caddyConfig(addr, route("/events", sseHandler(map[string]any{"retry": retry, "padding": 0}), proxyTo(b.Addr)))
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatal(err)
		}
	}
	load("1s")
	defer caddy.Stop()
	c := openStream(t, "http://"+addr+"/events", false)
	b.send(t, "data: a\n\ndata: hal")
	c.waitSuffix(t, "data: a\n\n")
	reloaded := make(chan struct{})
	go func() { load("2s"); close(reloaded) }()
	got := c.waitEOF(t, 5*time.Second)
	if string(got) != "retry: 1000\ndata: a\n\nretry: 1000\n" {
		t.Fatalf("old stream got %q", got)
	}
	select {
	case <-reloaded:
	case <-time.After(5 * time.Second):
		t.Fatal("reload did not finish")
	}
	b.handlerReturned(t, 5*time.Second)
	c2 := openStream(t, "http://"+addr+"/events", false)
	c2.waitSuffix(t, "retry: 2000\n")
}

// A server's own timeouts do not cut streams, in either mode and on
// either protocol: Caddy 2.11 puts write_timeout back as a ceiling on
// every write (and may still set deadlines on a handed-over connection
// through the response it no longer owns); the plugin's write_timeout
// bounds each write instead.
func TestStreamsOutliveServerTimeouts(t *testing.T) {
	const timeout = 300 * time.Millisecond
	for _, mode := range []string{"passthrough", "fanout"} {
		t.Run(mode, func(t *testing.T) {
			checkNoLeak(t)
			e := newEmitter(t)
			rt := route("/events", sseHandler(map[string]any{"heartbeat": 0, "padding": 0}), proxyTo(e.addr))
			upstreams := 2
			if mode == "fanout" {
				rt, upstreams = fanoutRoute(e, map[string]any{"heartbeat": 0}), 1
			}
			base := startCaddyWith(t, func(addr string) []byte {
				timeouts := fmt.Sprintf(`"protocols": ["h1", "h2c"], "read_timeout": %[1]q, "read_header_timeout": %[1]q,
					"read_idle_timeout": %[1]q, "write_timeout": %[1]q, "write_idle_timeout": %[1]q, "idle_timeout": %[1]q,`, timeout.String())
				return bytes.Replace(caddyConfig(addr, rt), []byte(`"protocols": ["h1", "h2c"],`), []byte(timeouts), 1)
			})
			clients := map[string]*client{
				"HTTP/1.1": openStream(t, base+"/events", false),
				"HTTP/2":   openStream(t, base+"/events", true),
			}
			e.waitJoined(t, upstreams)
			e.emit("data: first\n\n")
			for _, c := range clients {
				waitEvents(t, c, 1)
			}
			// Nothing written for several times every timeout of the server.
			time.Sleep(5 * timeout)
			e.emit("data: second\n\n")
			for name, c := range clients {
				if got := datas(waitEvents(t, c, 2)); got != "first,second" {
					t.Fatalf("%s client got %q", name, got)
				}
			}
		})
	}
}
