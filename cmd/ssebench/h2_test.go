package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// sseServer is a small in-process SSE server speaking HTTP/1.1 and, when
// h2c, HTTP/2 over cleartext with prior knowledge. Its handler serves
// body (split into events at blank lines, one flush each) compressed as
// the request asks, then, if endless, events every few milliseconds until
// the client leaves; otherwise it ends the stream.
type sseServer struct {
	*httptest.Server
	conns  atomic.Int64 // TCP connections accepted
	h1, h2 atomic.Int64 // requests by protocol
}

func newSSEServer(t *testing.T, h2c bool, body []byte, endless bool) *sseServer {
	t.Helper()
	s := &sseServer{}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 {
			s.h2.Add(1)
		} else {
			s.h1.Add(1)
		}
		w.Header().Set("Content-Type", "text/event-stream")
		enc := r.Header.Get("Accept-Encoding")
		var out io.Writer = w
		flush := func() { w.(http.Flusher).Flush() }
		switch enc {
		case "gzip":
			zw := gzip.NewWriter(w)
			defer zw.Close()
			out, flush = zw, func() { zw.Flush(); w.(http.Flusher).Flush() }
		case "zstd":
			zw, err := zstd.NewWriter(w, zstd.WithEncoderConcurrency(1))
			if err != nil {
				panic(err)
			}
			defer zw.Close()
			out, flush = zw, func() { zw.Flush(); w.(http.Flusher).Flush() }
		default:
			enc = ""
		}
		if enc != "" {
			w.Header().Set("Content-Encoding", enc)
		}
		w.WriteHeader(200)
		for _, ev := range bytes.SplitAfter(body, []byte("\n\n")) {
			out.Write(ev)
			flush()
		}
		if !endless {
			return
		}
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for seq := uint64(1); ; seq++ {
			select {
			case <-r.Context().Done():
				return
			case <-tick.C:
			}
			out.Write(appendEvent(nil, seq, time.Now().UnixNano(), 200))
			flush()
		}
	}))
	if h2c {
		s.Config.Protocols = new(http.Protocols)
		s.Config.Protocols.SetHTTP1(true)
		s.Config.Protocols.SetUnencryptedHTTP2(true)
	}
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.conns.Add(1)
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	return s
}

func (s *sseServer) addr() string { return strings.TrimPrefix(s.URL, "http://") }

var testSrcAddrs = []net.IP{net.IPv4(127, 0, 0, 2), net.IPv4(127, 0, 0, 3)}

// runClients runs n clients of one protocol until their streams end (or
// the test's patience does) and returns what they recorded.
func runClients(t *testing.T, addr, enc string, h2 bool, n int) *loadStats {
	t.Helper()
	s := newLoadStats()
	s.openWindow(0)
	g := newLoadGen(clientConfig{addr: addr, path: "/events", encoding: enc, dialTO: 5 * time.Second, srcAddrs: testSrcAddrs, h2: h2}, s)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := g.ramp(ctx, n, 0); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		g.closeAll(time.Second)
		t.Fatalf("h2=%v: streams did not end", h2)
	}
	return s
}

// TestH2ClientMatchesH1 reads the same stream (events with gaps and a
// duplicate, comments, an over-long padding line, CRLF line ends) over
// HTTP/1.1 and over h2c, plain and compressed: both clients must count
// exactly the same, and as the stream says.
func TestH2ClientMatchesH1(t *testing.T) {
	body := stream(1, 40, map[uint64]bool{4: true, 5: true})
	body = append(body, appendEvent(nil, 3, 1000, 200)...) // a duplicate
	srv := newSSEServer(t, true, body, false)
	for _, enc := range []string{"", "gzip", "zstd"} {
		t.Run("enc="+enc, func(t *testing.T) {
			h1, h2 := srv.h1.Load(), srv.h2.Load()
			s1 := runClients(t, srv.addr(), enc, false, 1)
			s2 := runClients(t, srv.addr(), enc, true, 1)
			if srv.h1.Load() != h1+1 || srv.h2.Load() != h2+1 {
				t.Fatalf("server saw %d HTTP/1.1 and %d HTTP/2 requests, want 1 each", srv.h1.Load()-h1, srv.h2.Load()-h2)
			}
			wantEnc := enc
			if wantEnc == "" {
				wantEnc = "identity"
			}
			for name, s := range map[string]*loadStats{"HTTP/1.1": s1, "h2c": s2} {
				got := []int64{s.connected.Load(), s.connErrs.Load(), s.delivered.Load(), s.lost.Load(), s.dups.Load(), s.comments.Load(), int64(s.lat.count()), s.disconnect.Load(), s.discWin.Load()}
				want := []int64{1, 0, 38, 2, 1, 39, 38, 1, 1} // the server ending the stream is a disconnect
				if !equalInts(got, want) {
					t.Errorf("%s: connected, errors, delivered, lost, dups, comments, latencies, disconnects, in window = %v; want %v (first error %q)", name, got, want, s.firstErr)
				}
				if got := s.encodingSummary(); got != wantEnc {
					t.Errorf("%s: Content-Encoding %q, want %q", name, got, wantEnc)
				}
			}
			// h2c counts body bytes as sent; HTTP/1.1 also the head and the
			// chunk framing.
			w1, w2 := s1.wire.Load(), s2.wire.Load()
			if enc == "" && w2 != int64(len(body)) {
				t.Errorf("h2c wire bytes %d, want the body's %d", w2, len(body))
			}
			if enc != "" && (w2 <= 0 || w2 >= int64(len(body))) {
				t.Errorf("h2c wire bytes %d: want the compressed size, below %d", w2, len(body))
			}
			if w1 <= w2 {
				t.Errorf("HTTP/1.1 wire bytes %d should exceed h2c's %d (head, chunk framing)", w1, w2)
			}
		})
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestH2OneConnectionPerClient checks that h2c clients each open their own
// TCP connection, from the source addresses given, and that closeAll ends
// them without counting disconnects.
func TestH2OneConnectionPerClient(t *testing.T) {
	srv := newSSEServer(t, true, []byte(": hello\n\n"), true)
	s := newLoadStats()
	g := newLoadGen(clientConfig{addr: srv.addr(), path: "/events", dialTO: 5 * time.Second, srcAddrs: testSrcAddrs, h2: true}, s)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	const n = 6
	if err := g.ramp(ctx, n, 0); err != nil {
		t.Fatal(err)
	}
	if s.connected.Load() != n {
		t.Fatalf("%d connected, want %d (first error %q)", s.connected.Load(), n, s.firstErr)
	}
	s.openWindow(0)
	for deadline := time.Now().Add(3 * time.Second); s.delivered.Load() < 3*n; {
		if time.Now().After(deadline) {
			t.Fatalf("delivered %d, want at least %d", s.delivered.Load(), 3*n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if c, r := srv.conns.Load(), srv.h2.Load(); c != n || r != n || srv.h1.Load() != 0 {
		t.Errorf("%d connections, %d HTTP/2 and %d HTTP/1.1 requests; want %d, %d, 0", c, r, srv.h1.Load(), n, n)
	}
	g.mu.Lock()
	srcs := map[string]bool{}
	for _, c := range g.conns {
		srcs[c.LocalAddr().(*net.TCPAddr).IP.String()] = true
	}
	tracked := len(g.conns)
	g.mu.Unlock()
	if tracked != n || !srcs["127.0.0.2"] || !srcs["127.0.0.3"] || len(srcs) != 2 {
		t.Errorf("%d tracked connections from %v; want %d from 127.0.0.2 and 127.0.0.3", tracked, srcs, n)
	}
	g.closeAll(3 * time.Second)
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("clients still running after closeAll")
	}
	if s.disconnect.Load() != 0 || s.connErrs.Load() != 0 {
		t.Errorf("closing counted %d disconnects and %d errors (first %q)", s.disconnect.Load(), s.connErrs.Load(), s.firstErr)
	}
	if s.lost.Load() != 0 || s.dups.Load() != 0 {
		t.Errorf("lost %d, dups %d", s.lost.Load(), s.dups.Load())
	}
}

// TestH2NeedsH2C checks that -h2 against a server without h2c fails the
// clients and the probe instead of falling back to HTTP/1.1.
func TestH2NeedsH2C(t *testing.T) {
	h1only := newSSEServer(t, false, []byte(": hello\n\n"+string(appendEvent(nil, 1, 1, 200))), true)
	s := newLoadStats()
	g := newLoadGen(clientConfig{addr: h1only.addr(), path: "/events", dialTO: 5 * time.Second, h2: true}, s)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := g.ramp(ctx, 2, 0); err != nil {
		t.Fatal(err)
	}
	g.closeAll(3 * time.Second)
	if s.connected.Load() != 0 || s.connErrs.Load() != 2 || h1only.h1.Load() != 0 {
		t.Errorf("against HTTP/1.1 only: %d connected, %d errors, %d HTTP/1.1 requests; want 0, 2, 0", s.connected.Load(), s.connErrs.Load(), h1only.h1.Load())
	}
	if err := probeSSE(h1only.addr(), "/events", 2*time.Second, true, true); err == nil {
		t.Error("the h2c probe accepted a server without h2c")
	}
	if err := probeSSE(h1only.addr(), "/events", 2*time.Second, true, false); err != nil {
		t.Errorf("HTTP/1.1 probe: %v", err)
	}

	h2c := newSSEServer(t, true, []byte(": hello\n\n"), true)
	for _, h2 := range []bool{true, false} {
		if err := probeSSE(h2c.addr(), "/events", 2*time.Second, true, h2); err != nil {
			t.Errorf("probe (h2 %v) against h1+h2c: %v", h2, err)
		}
	}
	if h2c.h2.Load() != 1 || h2c.h1.Load() != 1 {
		t.Errorf("probes made %d HTTP/2 and %d HTTP/1.1 requests, want 1 each", h2c.h2.Load(), h2c.h1.Load())
	}
}

func TestH2ProxyConfigs(t *testing.T) {
	spec := proxySpec{kind: "fanout", listen: "127.0.0.1:8080", upstream: "127.0.0.1:9090"}
	cf, _ := caddyfile(spec)
	if strings.Contains(cf, "servers") || strings.Contains(cf, "h2c") {
		t.Errorf("HTTP/1.1 runs keep Caddy's default protocols:\n%s", cf)
	}
	spec.h2 = true
	for _, kind := range []string{"fanout", "passthrough", "reverse_proxy", "encode_gzip"} {
		spec.kind = kind
		cf, err := caddyfile(spec)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(cf, "\tservers {\n\t\tprotocols h1 h2c\n\t}\n") || strings.Count(cf, "{") != strings.Count(cf, "}") {
			t.Errorf("%s with -h2 should accept h2c:\n%s", kind, cf)
		}
	}
	if n := nginxConf(spec, "/tmp/x"); !strings.Contains(n, "listen 127.0.0.1:8080 http2;") {
		t.Errorf("nginx with -h2 should listen with http2:\n%s", n)
	}
	spec.h2 = false
	if n := nginxConf(spec, "/tmp/x"); strings.Contains(n, "http2") {
		t.Errorf("nginx without -h2 should not speak http2:\n%s", n)
	}

	_, err := resolveProxies(context.Background(), "direct", config{h2: true}, t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "HTTP/1.1 only") {
		t.Errorf("-h2 with direct: %v", err)
	}
}

// TestReportProtocol checks that a report records the clients' protocol in
// its JSON and markdown header, and that reports from before -h2 still
// replot, unchanged.
func TestReportProtocol(t *testing.T) {
	dir := t.TempDir()
	rs := sampleResults()
	for i := range rs {
		rs[i].Protocol = protoH2C
	}
	rep := report{Written: "2026-01-01T00:00:00Z", Command: "ssebench -h2", Env: "env", Subtitle: "sub", Protocol: protoH2C, Results: rs}
	base := filepath.Join(dir, "stream-h2")
	if err := writeOutputs(base, rep, true); err != nil {
		t.Fatal(err)
	}
	md, _ := os.ReadFile(base + ".md")
	if !strings.Contains(string(md), "env\n\nClients: HTTP/2 over cleartext (h2c") {
		t.Errorf("markdown header does not say h2c:\n%s", md)
	}
	js, _ := os.ReadFile(base + ".json")
	var back report
	if err := json.Unmarshal(js, &back); err != nil || back.Protocol != protoH2C || back.Results[0].Protocol != protoH2C {
		t.Errorf("JSON: protocol %q, results' %q, %v", back.Protocol, back.Results[0].Protocol, err)
	}

	// A report written before -h2: no protocol fields at all.
	old := strings.ReplaceAll(strings.ReplaceAll(string(js), `"client_protocol": "h2c",`, ""), `"protocol": "h2c",`, "")
	if strings.Contains(old, "h2c") {
		t.Fatalf("could not strip the protocol fields:\n%s", old)
	}
	oldBase := filepath.Join(dir, "old")
	if err := os.WriteFile(oldBase+".json", []byte(old), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout := os.Stdout
	os.Stdout, _ = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	err := replot(oldBase + ".json")
	os.Stdout.Close()
	os.Stdout = stdout
	if err != nil {
		t.Fatal(err)
	}
	md, _ = os.ReadFile(oldBase + ".md")
	if strings.Contains(string(md), "Clients:") || !strings.Contains(string(md), "env\n\n| proxy |") {
		t.Errorf("an old report should replot as before, without a protocol line:\n%s", md)
	}
}
