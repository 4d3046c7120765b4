package legacybackend

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// fastHandler is the demo backend with its timing shrunk to milliseconds.
func fastHandler(t *testing.T) *Handler {
	t.Helper()
	h := &Handler{
		Seed:       7,
		BurstMin:   2,
		BurstMax:   5,
		GapMin:     caddy.Duration(time.Millisecond),
		GapMax:     caddy.Duration(2 * time.Millisecond),
		SilenceMin: caddy.Duration(3 * time.Millisecond),
		SilenceMax: caddy.Duration(6 * time.Millisecond),
		ByteDelay:  caddy.Duration(50 * time.Microsecond),
	}
	h.setup(time.Now().Add(-time.Second)) // the first burst is due now
	if err := h.Validate(); err != nil {
		t.Fatal(err)
	}
	return h
}

// recorder is a ResponseWriter and Flusher that keeps every Write and
// Flush, in order, and signals each one.
type recorder struct {
	mu      sync.Mutex
	header  http.Header
	ops     []op
	changed chan struct{}
}

type op struct {
	p     []byte
	flush bool
}

func newRecorder() *recorder {
	return &recorder{header: http.Header{}, changed: make(chan struct{}, 1)}
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) WriteHeader(int)     {}

func (r *recorder) Write(p []byte) (int, error) {
	r.add(op{p: bytes.Clone(p)})
	return len(p), nil
}

func (r *recorder) Flush() { r.add(op{flush: true}) }

func (r *recorder) add(o op) {
	r.mu.Lock()
	r.ops = append(r.ops, o)
	r.mu.Unlock()
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

func (r *recorder) snapshot() (ops []op, stream []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ops = append(ops, r.ops...)
	for _, o := range ops {
		stream = append(stream, o.p...)
	}
	return ops, stream
}

// sseEvent is a dispatched event as EventSource sees it, plus where it
// ends in the stream.
type sseEvent struct {
	name, data string
	fields     []string
	end        int // offset just after the terminator of its blank line
}

// parsed is the stream read by the WHATWG event stream rules.
type parsed struct {
	events     []sseEvent
	boundaries map[int]bool // offsets just after each blank line's full terminator
	comments   int
	last       int // last boundary
}

// parseStream parses a (possibly incomplete) stream. A CR that is the last
// byte of b ends a line, but the boundary it may close is not counted
// until the byte after it is known.
func parseStream(b []byte) parsed {
	p := parsed{boundaries: map[int]bool{}}
	i := 0
	if bytes.HasPrefix(b, []byte("\uFEFF")) {
		i = 3
	}
	var cur sseEvent
	var data []string
	hasData := false
	for i < len(b) {
		j := bytes.IndexAny(b[i:], "\r\n")
		if j < 0 {
			break // unfinished line
		}
		line := string(b[i : i+j])
		end := i + j + 1
		if b[i+j] == '\r' {
			if end == len(b) {
				break // don't know yet whether an LF follows
			}
			if b[end] == '\n' {
				end++
			}
		}
		i = end
		switch {
		case line == "":
			p.boundaries[end] = true
			p.last = end
			if hasData {
				cur.data = strings.Join(data, "\n")
				cur.end = end
				p.events = append(p.events, cur)
			}
			cur, data, hasData = sseEvent{}, nil, false
		case line[0] == ':':
			p.comments++
		default:
			name, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			cur.fields = append(cur.fields, name)
			switch name {
			case "data":
				data = append(data, value)
				hasData = true
			case "event":
				cur.name = value
			}
		}
	}
	return p
}

type payload struct {
	Type string `json:"type"`
	Seq  int64  `json:"seq"`
	Sym  string `json:"sym"`
	TS   int64  `json:"ts"`
}

// checkEvents checks that events are a hello followed by numbered ticks,
// with JSON data, a server timestamp, and no id field.
func checkEvents(t *testing.T, events []sseEvent) {
	t.Helper()
	var prev int64 = -1
	for i, ev := range events {
		var p payload
		if err := json.Unmarshal([]byte(ev.data), &p); err != nil {
			t.Fatalf("event %d: data is not JSON: %v: %q", i, err, ev.data)
		}
		for _, f := range ev.fields {
			if f != "data" && f != "event" {
				t.Errorf("event %d: unexpected field %q (the legacy app sends no ids, no retry)", i, f)
			}
		}
		if p.TS == 0 {
			t.Errorf("event %d: no server timestamp: %q", i, ev.data)
		}
		if i == 0 {
			if p.Type != "hello" {
				t.Fatalf("first event is not the hello: %q", ev.data)
			}
			prev = p.Seq
			continue
		}
		if p.Sym == "" || p.Seq != prev+1 {
			t.Fatalf("event %d: want tick seq %d, got %q", i, prev+1, ev.data)
		}
		prev = p.Seq
	}
}

// TestOddChunks runs the handler against a recording writer and checks
// that the stream is well formed while its writes and flushes are as
// awkward as promised, and that the handler returns once the request's
// context is cancelled.
func TestOddChunks(t *testing.T) {
	h := fastHandler(t)
	rec := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req := httptest.NewRequest(http.MethodGet, "/", nil).WithContext(ctx)
	done := make(chan error, 1)
	go func() { done <- h.ServeHTTP(rec, req, nil) }()

	const want = 80
	deadline := time.After(20 * time.Second)
	for {
		_, stream := rec.snapshot()
		if len(parseStream(stream).events) >= want {
			break
		}
		select {
		case <-rec.changed:
		case err := <-done:
			t.Fatalf("handler returned before the client went away: %v", err)
		case <-deadline:
			t.Fatalf("fewer than %d events in time", want)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeHTTP: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler still running 5s after the request context was cancelled")
	}

	if ct := rec.header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type = %q", ct)
	}
	ops, stream := rec.snapshot()
	p := parseStream(stream)
	if p.comments != 0 {
		t.Errorf("%d comment lines: the legacy app sends no heartbeats", p.comments)
	}
	checkEvents(t, p.events)

	var (
		off                                     int
		flushes, midLine, crlfSplit, multiEvent int
		slowRun, run                            int
		prevEndsCR                              bool
	)
	for i, o := range ops {
		if o.flush {
			if i == 0 {
				continue // the headers
			}
			flushes++
			if off == 0 || p.boundaries[off] {
				t.Fatalf("flush at offset %d, an event boundary: the app must only flush mid-event", off)
			}
			continue
		}
		start, end := off, off+len(o.p)
		off = end
		if len(o.p) == 0 {
			continue
		}
		if last := o.p[len(o.p)-1]; last != '\n' && last != '\r' {
			midLine++
		}
		if prevEndsCR && o.p[0] == '\n' {
			crlfSplit++
		}
		prevEndsCR = o.p[len(o.p)-1] == '\r'
		for b := start + 1; b < end; b++ {
			if p.boundaries[b] {
				multiEvent++
				break
			}
		}
		if len(o.p) == 1 {
			run++
			slowRun = max(slowRun, run)
		} else {
			run = 0
		}
	}
	if flushes < want/2 {
		t.Errorf("%d flushes for %d events", flushes, len(p.events))
	}
	if midLine == 0 {
		t.Error("no write ends in the middle of a line")
	}
	if crlfSplit == 0 {
		t.Error("no CRLF split across two writes")
	}
	if multiEvent == 0 {
		t.Error("no write carries more than one event")
	}
	if slowRun < 10 {
		t.Errorf("longest run of one-byte writes is %d, want a slow event written byte by byte", slowRun)
	}
}

// TestStopsOnCancelOverHTTP streams through a real HTTP server and checks
// that the client can parse events and that the handler returns when the
// client goes away.
func TestStopsOnCancelOverHTTP(t *testing.T) {
	h := fastHandler(t)
	returned := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		returned <- h.ServeHTTP(w, r, nil)
	}))
	defer srv.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type = %q", ct)
	}

	var stream []byte
	buf := make([]byte, 4096)
	for len(parseStream(stream).events) < 10 {
		n, err := resp.Body.Read(buf)
		stream = append(stream, buf[:n]...)
		if err != nil {
			t.Fatalf("read after %d bytes: %v", len(stream), err)
		}
	}
	checkEvents(t, parseStream(stream).events)

	cancel()
	select {
	case err := <-returned:
		if err != nil {
			t.Fatalf("ServeHTTP: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler still running 5s after the client went away")
	}
}

// TestLifetimeEndsBetweenEvents checks that the app's connection recycle
// ends the response on its own, after a whole event.
func TestLifetimeEndsBetweenEvents(t *testing.T) {
	h := fastHandler(t)
	h.Lifetime = caddy.Duration(30 * time.Millisecond)
	rec := newRecorder()
	done := make(chan error, 1)
	go func() { done <- h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil), nil) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("lifetime did not end the response")
	}
	_, stream := rec.snapshot()
	p := parseStream(stream)
	if len(p.events) < 2 || p.last != len(stream) {
		t.Fatalf("want whole events ending at the stream's end; %d events, last boundary %d of %d bytes",
			len(p.events), p.last, len(stream))
	}
	checkEvents(t, p.events)
}

// TestCleanupEndsStreams checks that a config reload or stop (Cleanup)
// ends the streams of the old handler.
func TestCleanupEndsStreams(t *testing.T) {
	h := fastHandler(t)
	h.SilenceMin, h.SilenceMax = caddy.Duration(time.Hour), caddy.Duration(time.Hour)
	rec := newRecorder()
	done := make(chan error, 1)
	go func() { done <- h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil), nil) }()
	<-rec.changed // streaming
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler still running 5s after Cleanup")
	}
}

// TestSharedFeed checks that two connections get the same schedule, so
// the demo page's two panels show the same events.
func TestSharedFeed(t *testing.T) {
	h := fastHandler(t)
	a, b := h.newFeed(), h.newFeed()
	for i := range 200 {
		x, y := a.nextBatch(), b.nextBatch()
		if !x.at.Equal(y.at) || !bytes.Equal(x.wire, y.wire) || len(x.writes) != len(y.writes) {
			t.Fatalf("batch %d differs between connections", i)
		}
	}
}

func TestCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`legacy_sse_demo {
		feed orders
		burst 2 4
		gap 100ms 1s
		silence 20s 40s
		byte_delay 25ms
		lifetime 90s
		bom
		seed 42
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	h.setup(time.Now())
	if err := h.Validate(); err != nil {
		t.Fatal(err)
	}
	want := Handler{Feed: "orders", BurstMin: 2, BurstMax: 4,
		GapMin: caddy.Duration(100 * time.Millisecond), GapMax: caddy.Duration(time.Second),
		SilenceMin: caddy.Duration(20 * time.Second), SilenceMax: caddy.Duration(40 * time.Second),
		ByteDelay: caddy.Duration(25 * time.Millisecond), Lifetime: caddy.Duration(90 * time.Second),
		BOM: true, Seed: 42}
	want.start, want.seed, want.quit = h.start, 42, h.quit
	if h != want {
		t.Fatalf("got %+v\nwant %+v", h, want)
	}

	for _, bad := range []string{
		"legacy_sse_demo { burst 5 2 }",
		"legacy_sse_demo { feed nope }",
		"legacy_sse_demo { silence 2s 1s }",
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(bad))
		if err == nil {
			h.setup(time.Now())
			err = h.Validate()
		}
		if err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
	for _, bad := range []string{"legacy_sse_demo arg", "legacy_sse_demo { gap 1s }", "legacy_sse_demo { what }"} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(bad)); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}

// The orders feed and the BOM go through the same writer.
func TestOrdersFeedWithBOM(t *testing.T) {
	h := fastHandler(t)
	h.Feed, h.BOM = "orders", true
	rec := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil).WithContext(ctx), nil)
	}()
	deadline := time.After(10 * time.Second)
	for {
		_, stream := rec.snapshot()
		if len(parseStream(stream).events) >= 5 {
			break
		}
		select {
		case <-rec.changed:
		case <-deadline:
			t.Fatal("too few events")
		}
	}
	cancel()
	if err := <-done; err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	_, stream := rec.snapshot()
	if !bytes.HasPrefix(stream, []byte("\uFEFF")) {
		t.Error("no BOM")
	}
	for i, ev := range parseStream(stream).events[1:] {
		if ev.name != "order" || !strings.Contains(ev.data, `"order":"SO-`) {
			t.Fatalf("event %d: %q %q", i+1, ev.name, ev.data)
		}
	}
}
