package caddysse

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"github.com/andybalholm/brotli"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/klauspost/compress/zstd"
)

func TestNegotiateEncoding(t *testing.T) {
	both := []string{"zstd", "gzip"}
	for _, tc := range []struct {
		ae    string
		prefs []string
		want  string
	}{
		{"", both, ""},
		{"   ", both, ""},
		{"gzip", both, "gzip"},
		{"zstd", both, "zstd"},
		{"gzip, zstd", both, "zstd"},                     // equal q: server order
		{"gzip, zstd", []string{"gzip", "zstd"}, "gzip"}, // equal q: server order
		{"gzip;q=1, zstd;q=0.5", both, "gzip"},           // client weight first
		{"zstd;q=0.1, gzip;q=0.2", both, "gzip"},
		{"gzip;q=0", both, ""}, // q=0 excludes
		{"gzip;q=0.000", both, ""},
		{"zstd;q=0, gzip", both, "gzip"},
		{"*", both, "zstd"},
		{"*;q=0", both, ""},
		{"gzip;q=0, *", both, "zstd"},
		{"zstd;q=0, *;q=0.5", both, "gzip"},
		{"*, zstd;q=0", []string{"zstd"}, ""},
		{"identity", both, ""},
		{"identity;q=0", both, ""}, // nothing acceptable: identity anyway
		{"identity;q=0, gzip", both, "gzip"},
		{"identity, gzip;q=0.5", both, ""},            // identity weighed higher
		{"identity;q=0.5, gzip;q=0.5", both, "gzip"},  // a tie goes to the coding
		{"*;q=0.8, gzip;q=0.2", []string{"gzip"}, ""}, // identity through "*" is 0.8
		{"*;q=0.8, gzip;q=0.2", both, "zstd"},
		{"GZIP", both, "gzip"}, // case-insensitive
		{"ZStd;Q=0.7,gzip;q=0.6", both, "zstd"},
		{" \tgzip ; q = 0.5 ,\tzstd ;q=0.4 ", both, "gzip"}, // whitespace
		{"x-gzip", both, "gzip"},
		{"br, deflate, compress", both, ""}, // unknown codings
		{"br;q=1, gzip;q=0.1", both, "gzip"},
		{"deflate, gzip, br, zstd", both, "zstd"}, // curl --compressed
		{"gzip, deflate, br, zstd", []string{"gzip"}, "gzip"},
		{"gzip;q=high, zstd;q=0.1", both, "zstd"}, // malformed weight: item ignored
		{"gzip;q=1.5", both, ""},
		{"gzip;q=-1", both, ""},
		{"gzip;level=9", both, "gzip"}, // other parameters ignored
		{",, ,gzip,,", both, "gzip"},
		{"gzip", nil, ""},                // compression off
		{"gzip, gzip;q=0", both, "gzip"}, // first occurrence counts
	} {
		if got := negotiateEncoding(tc.ae, tc.prefs); got != tc.want {
			t.Errorf("negotiateEncoding(%q, %q) = %q, want %q", tc.ae, tc.prefs, got, tc.want)
		}
	}
}

// The compress option's Caddyfile cases are in TestUnmarshalCaddyfile.
func TestCompressOption(t *testing.T) {
	// JSON goes through Validate.
	for _, tc := range []struct {
		list []string
		err  string
	}{
		{nil, ""}, {[]string{"off"}, ""}, {[]string{"gzip", "zstd"}, ""},
		{[]string{"deflate"}, "compress: unknown encoding 'deflate'"},
		{[]string{"GZIP"}, "compress: unknown encoding 'GZIP'"},
		{[]string{"br", "zstd", "gzip"}, ""},
	} {
		err := (&Handler{Compress: tc.list}).Validate()
		if (tc.err == "") != (err == nil) || (err != nil && !strings.HasPrefix(err.Error(), tc.err)) {
			t.Errorf("Validate(compress %q) = %v, want %q", tc.list, err, tc.err)
		}
	}
}

// decodingClient reads a stream's raw bytes and decodes them as they come
// with a real streaming decoder for the response's Content-Encoding.
type decodingClient struct {
	Resp   *http.Response
	cancel context.CancelFunc
	mu     sync.Mutex
	raw    int          // bytes received on the wire (the body, not decoded)
	wire   bytes.Buffer // those bytes
	plain  bytes.Buffer
	more   chan struct{}
	done   chan struct{}
	err    error // how decoding ended; nil for a clean end of stream
}

func openDecoding(t testing.TB, url string, h2 bool, acceptEncoding string, headers ...string) *decodingClient {
	t.Helper()
	resp, cancel := streamRequest(t, url, h2, append([]string{"Accept-Encoding", acceptEncoding}, headers...)...)
	c := &decodingClient{Resp: resp, cancel: cancel, more: make(chan struct{}, 1), done: make(chan struct{})}
	t.Cleanup(c.close)
	go c.decode()
	return c
}

func (c *decodingClient) Read(p []byte) (int, error) {
	n, err := c.Resp.Body.Read(p)
	c.mu.Lock()
	c.raw += n
	c.wire.Write(p[:n])
	c.mu.Unlock()
	return n, err
}

func (c *decodingClient) decode() {
	defer close(c.done)
	defer c.signal()
	var dec io.Reader
	switch ce := c.Resp.Header.Get("Content-Encoding"); ce {
	case "":
		dec = c
	case "gzip":
		zr, err := gzip.NewReader(c)
		if err != nil {
			c.setErr(err)
			return
		}
		zr.Multistream(false)
		dec = zr
	case "zstd":
		zr, err := zstd.NewReader(c, zstd.WithDecoderConcurrency(1))
		if err != nil {
			c.setErr(err)
			return
		}
		defer zr.Close()
		dec = zr
	case "br":
		dec = brotli.NewReader(c)
	default:
		c.setErr(fmt.Errorf("unexpected Content-Encoding %q", ce))
		return
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := dec.Read(buf)
		c.mu.Lock()
		c.plain.Write(buf[:n])
		c.mu.Unlock()
		c.signal()
		if err != nil {
			if err != io.EOF {
				c.setErr(err)
			}
			return
		}
	}
}

func (c *decodingClient) signal() {
	select {
	case c.more <- struct{}{}:
	default:
	}
}

func (c *decodingClient) setErr(err error) {
	c.mu.Lock()
	c.err = err
	c.mu.Unlock()
}

func (c *decodingClient) close() {
	c.cancel()
	c.Resp.Body.Close()
	<-c.done
}

// state returns the decoded bytes so far and the raw byte count.
func (c *decodingClient) state() (string, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.plain.String(), c.raw
}

// waitPlain waits until everything decoded so far is exactly want.
func (c *decodingClient) waitPlain(t testing.TB, want string) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		got, _ := c.state()
		if got == want {
			return
		}
		if !strings.HasPrefix(want, got) {
			t.Fatalf("decoded %q, which is not a prefix of %q", tail(got), tail(want))
		}
		select {
		case <-c.more:
		case <-c.done:
			if got, _ := c.state(); got == want {
				return
			}
			t.Fatalf("stream ended (%v) with %q decoded, want %q", c.err, tail(got), tail(want))
		case <-deadline:
			t.Fatalf("decoded %q after 5s, want %q", tail(got), tail(want))
		}
	}
}

// waitEnd waits for the end of the stream and returns how decoding ended.
func (c *decodingClient) waitEnd(t testing.TB) error {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		t.Fatal("stream still open after 5s")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func tail(s string) string {
	if len(s) > 120 {
		return "..." + s[len(s)-120:]
	}
	return s
}

// wantPrelude is what a stream compressed with enc decodes to first.
func wantPrelude(t testing.TB, enc string, padding int, retry time.Duration) string {
	t.Helper()
	var hint []byte
	if retry > 0 {
		hint = sse.RetryField(retry)
	}
	if enc == "" {
		return string(append(sse.PaddingBlock(padding), hint...))
	}
	p, err := compressedPrelude(mustCoding(enc), padding, hint)
	if err != nil {
		t.Fatal(err)
	}
	return string(p)
}

// waitNoLiveEncoders fails the test unless every encoder is released soon.
func waitNoLiveEncoders(t testing.TB) {
	t.Helper()
	if !eventually(5*time.Second, func() bool { return liveEncoders.Load() == 0 }) {
		t.Fatalf("%d encoders not released", liveEncoders.Load())
	}
}

// Every event must be decodable by the client as soon as it is forwarded,
// before the backend writes the next one; a partial event is not sent.
func TestCompressedEventsDecodeOneByOne(t *testing.T) {
	for _, enc := range []string{"gzip", "zstd", "br"} {
		for _, h2 := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/h2=%v", enc, h2), func(t *testing.T) {
				checkNoLeak(t)
				b := newScriptedBackend(t)
				fields := map[string]any{"padding": 512, "retry": "3s", "heartbeat": 0}
				// br is offered only when configured; the others are the
				// defaults, and a br the client prefers is not used.
				ae := "br;q=1, " + enc + ";q=0.9, identity;q=0.1"
				if enc == "br" {
					fields["compress"] = []string{"zstd", "br", "gzip"}
					ae = "br;q=1, gzip;q=0.9, identity;q=0.1"
				}
				base := startCaddy(t, route("/events", sseHandler(fields), proxyTo(b.Addr)))
				c := openDecoding(t, base+"/events", h2, ae)
				if ce := c.Resp.Header.Get("Content-Encoding"); ce != enc {
					t.Fatalf("Content-Encoding %q, want %q", ce, enc)
				}
				if v := c.Resp.Header.Values("Vary"); len(v) != 1 || v[0] != "Accept-Encoding" {
					t.Errorf("Vary %q", v)
				}
				if c.Resp.Header.Get("Content-Length") != "" {
					t.Errorf("Content-Length %q", c.Resp.Header.Get("Content-Length"))
				}
				want := wantPrelude(t, enc, 512, 3*time.Second)
				c.waitPlain(t, want)
				r := rand.New(rand.NewPCG(1, 1))
				for i := range 30 {
					ev := fmt.Sprintf("id: %d\nevent: tick\ndata: {\"n\":%d,\"r\":%d}\n\n", i, i, r.IntN(1e6))
					// One event in odd chunks, each flushed by the backend:
					// nothing of it may be decodable before its end.
					b.send(t, ev[:4], ev[4:len(ev)-1])
					if got, _ := c.state(); got != want {
						t.Fatalf("partial event %d decoded: %q", i, tail(got))
					}
					b.send(t, ev[len(ev)-1:])
					want += ev
					c.waitPlain(t, want)
				}
				// Two events in one write: one flush, both decodable.
				b.send(t, "data: a\n\ndata: b\n\n")
				want += "data: a\n\ndata: b\n\n"
				c.waitPlain(t, want)
				// The backend ends: the compressed stream ends with a valid trailer.
				b.end(t)
				if err := c.waitEnd(t); err != nil {
					t.Fatalf("decoding the end of the stream: %v", err)
				}
				c.waitPlain(t, want)
				waitNoLiveEncoders(t)
			})
		}
	}
}

func TestCompressedHeartbeatAndMaxAge(t *testing.T) {
	for _, enc := range []string{"gzip", "zstd", "br"} {
		t.Run(enc, func(t *testing.T) {
			checkNoLeak(t)
			b := newScriptedBackend(t)
			base := startCaddy(t, route("/events", sseHandler(map[string]any{
				"padding": 0, "heartbeat": "1s", "heartbeat_comment": "hb", "retry": "250ms", "max_age": "2s",
				"compress": []string{enc},
			}), proxyTo(b.Addr)))
			c := openDecoding(t, base+"/events", false, enc)
			want := "retry: 250\n"
			c.waitPlain(t, want)
			b.send(t, "data: x\n\n")
			want += "data: x\n\n"
			c.waitPlain(t, want)
			// The heartbeat is a sync flush of its own.
			want += ": hb\n"
			c.waitPlain(t, want)
			// max_age ends the stream with the retry hint and a trailer.
			if err := c.waitEnd(t); err != nil {
				t.Fatalf("decoding the end of the stream: %v", err)
			}
			got, _ := c.state()
			if !strings.HasPrefix(got, want) || !strings.HasSuffix(got, "\nretry: 250\n") {
				t.Fatalf("got %q", got)
			}
			b.handlerReturned(t, 5*time.Second)
			waitNoLiveEncoders(t)
		})
	}
}

// Padding must keep its size on the wire when compressed: a comment of
// spaces would shrink to a few bytes and not release a buffering middlebox.
func TestCompressedPaddingKeepsItsSizeOnTheWire(t *testing.T) {
	for _, padding := range []int{64, 2048, 8192} {
		for _, enc := range []string{"gzip", "zstd", "br"} {
			t.Run(fmt.Sprintf("%s/%d", enc, padding), func(t *testing.T) {
				b := newScriptedBackend(t)
				base := startCaddy(t, route("/events", sseHandler(map[string]any{"padding": padding, "heartbeat": 0, "compress": []string{enc}}), proxyTo(b.Addr)))
				c := openDecoding(t, base+"/events", false, enc)
				want := wantPrelude(t, enc, padding, 0)
				c.waitPlain(t, want)
				_, raw := c.state()
				if raw < padding || raw > padding+padding/10+64 {
					t.Fatalf("compressed prelude is %d bytes on the wire, want about %d (at least)", raw, padding)
				}
				// It is still one comment line, at an event boundary.
				if !strings.HasPrefix(want, ":") || strings.Count(want, "\n") != 1 || !strings.HasSuffix(want, "\n") {
					t.Fatalf("padding is not one comment line: %q", tail(want))
				}
				if spaces, _ := compressedSize(mustCoding(enc), sse.PaddingBlock(padding)); spaces >= padding/4 {
					t.Logf("note: %d spaces compress to %d bytes", padding, spaces)
				}
			})
		}
	}
}

func TestCompressionOffAndIdentity(t *testing.T) {
	for _, tc := range []struct {
		name, ae string
		fields   map[string]any
		vary     bool
	}{
		{"off", "gzip, zstd", map[string]any{"compress": []string{"off"}, "padding": 16}, false},
		{"no Accept-Encoding", "", map[string]any{"padding": 16}, true},
		{"nothing acceptable", "br, deflate", map[string]any{"padding": 16}, true},
		{"only zstd configured", "gzip", map[string]any{"compress": []string{"zstd"}, "padding": 16}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newScriptedBackend(t)
			base := startCaddy(t, route("/events", sseHandler(tc.fields), proxyTo(b.Addr)))
			c := openDecoding(t, base+"/events", false, tc.ae)
			if ce := c.Resp.Header.Get("Content-Encoding"); ce != "" {
				t.Fatalf("Content-Encoding %q", ce)
			}
			if got := c.Resp.Header.Get("Vary") == "Accept-Encoding"; got != tc.vary {
				t.Errorf("Vary %q", c.Resp.Header.Values("Vary"))
			}
			want := string(sse.PaddingBlock(16)) + "data: plain\n\n"
			b.send(t, "data: plain\n\n")
			c.waitPlain(t, want)
			if _, raw := c.state(); raw != len(want) {
				t.Fatalf("%d bytes on the wire for %d plain bytes", raw, len(want))
			}
		})
	}
}

// A stream the backend already compressed is passed through, not
// compressed again.
func TestPrecompressedStreamNotCompressedAgain(t *testing.T) {
	b := newScriptedBackend(t)
	b.header.Set("Content-Encoding", "br")
	base := startCaddy(t, route("/events", sseHandler(nil), proxyTo(b.Addr)))
	c := openStream(t, base+"/events", false, "Accept-Encoding", "gzip, zstd")
	if ce := c.Resp.Header.Values("Content-Encoding"); len(ce) != 1 || ce[0] != "br" {
		t.Fatalf("Content-Encoding %q with the client accepting gzip and zstd", ce)
	}
	b.send(t, "brotli bytes")
	if got := c.waitSuffix(t, "brotli bytes"); string(got) != "brotli bytes" {
		t.Fatalf("got %q", got)
	}
}

// startCaddyfile runs a Caddyfile site block (the directives only) on a
// loopback address and returns its base URL.
func startCaddyfile(t testing.TB, directives string) string {
	t.Helper()
	caddyMu.Lock()
	addr := freeAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	cf := fmt.Sprintf("{\n\tadmin off\n\tauto_https off\n\tlog {\n\t\tlevel ERROR\n\t}\n\tservers {\n\t\tprotocols h1 h2c\n\t}\n}\n\nhttp://127.0.0.1:%s {\n\tbind 127.0.0.1\n%s\n}\n", port, directives)
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	if err == nil && len(warnings) > 0 {
		err = fmt.Errorf("warnings: %v", warnings)
	}
	if err == nil {
		err = caddy.Load(cfg, true)
	}
	if err != nil {
		caddyMu.Unlock()
		t.Fatalf("Caddyfile:\n%s\n%v", cf, err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
		caddyMu.Unlock()
	})
	return "http://" + addr
}

// With Caddy's encode in the same site (ordered before sse, so it wraps
// sse's output), a stream is compressed once, with sse's choice; other
// responses are still encode's.
func TestCompressWithEncodeInTheRoute(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	big := `{"items": [` + strings.Repeat(`{"name": "item", "value": 12345},`, 64) + `{}]}`
	base := startCaddyfile(t, fmt.Sprintf(`	encode zstd gzip
	sse {
		compress gzip
		padding 0
		heartbeat off
	}
	handle /json {
		header Content-Type application/json
		respond %q 200
	}
	reverse_proxy %s`, big, b.Addr))

	// encode alone would pick zstd (its order, equal weights); sse picks gzip.
	c := openDecoding(t, base+"/events", false, "zstd, gzip")
	if ce := c.Resp.Header.Values("Content-Encoding"); len(ce) != 1 || ce[0] != "gzip" {
		t.Fatalf("Content-Encoding %q, want one gzip", ce)
	}
	if v := c.Resp.Header.Values("Vary"); len(v) != 1 || v[0] != "Accept-Encoding" {
		t.Errorf("Vary %q", v)
	}
	want := ""
	for i := range 10 {
		ev := fmt.Sprintf("id: %d\ndata: {\"n\": %d}\n\n", i, i)
		b.send(t, ev)
		want += ev
		c.waitPlain(t, want) // decoded once: plain events, no second layer
	}
	b.end(t)
	if err := c.waitEnd(t); err != nil {
		t.Fatalf("decoding the end of the stream: %v", err)
	}

	// A client that accepts only zstd: sse is limited to gzip, so the stream
	// goes out plain; encode must not compress it either.
	c2 := openDecoding(t, base+"/events", false, "zstd")
	if ce := c2.Resp.Header.Get("Content-Encoding"); ce != "" {
		t.Fatalf("Content-Encoding %q", ce)
	}
	b.send(t, "data: plain\n\n")
	c2.waitPlain(t, "data: plain\n\n")
	c2.close()

	// A response that is not a stream is encode's business, as before.
	req, _ := http.NewRequest(http.MethodGet, base+"/json", nil)
	req.Header.Set("Accept-Encoding", "zstd, gzip")
	resp, err := (&http.Transport{DisableCompression: true}).RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ce := resp.Header.Get("Content-Encoding"); ce != "zstd" {
		t.Fatalf("non-stream response: Content-Encoding %q, want encode's zstd", ce)
	}
	zr, _ := zstd.NewReader(resp.Body)
	defer zr.Close()
	if body, err := io.ReadAll(zr); err != nil || string(body) != big {
		t.Fatalf("non-stream body %q, %v", tail(string(body)), err)
	}
	waitNoLiveEncoders(t)
}

// curl --compressed decodes the stream event by event (CI installs curl).
func TestCompressedStreamWithCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not on PATH; skipping the curl --compressed integration test")
	}
	// curl decodes br when built with brotli (Debian's is).
	for _, enc := range []string{"zstd", "gzip", "br"} {
		t.Run(enc, func(t *testing.T) {
			checkNoLeak(t)
			b := newScriptedBackend(t)
			base := startCaddy(t, route("/events", sseHandler(map[string]any{"compress": []string{enc}, "padding": 2048, "heartbeat": 0}), proxyTo(b.Addr)))
			headers := filepath.Join(t.TempDir(), "headers")
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, curl, "--compressed", "-N", "-s", "-S", "-D", headers,
				"-H", "Accept: text/event-stream", base+"/events")
			stdout, _ := cmd.StdoutPipe()
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			lines := make(chan string, 100)
			go func() {
				defer close(lines)
				sc := bufio.NewScanner(stdout)
				sc.Buffer(make([]byte, 64<<10), 64<<10)
				for sc.Scan() {
					lines <- sc.Text()
				}
			}()
			next := func() string {
				select {
				case l, ok := <-lines:
					if !ok {
						t.Fatalf("curl ended: %s", stderr.String())
					}
					return l
				case <-time.After(5 * time.Second):
					t.Fatal("curl printed nothing for 5s")
				}
				return ""
			}
			b.request(t)
			if l := next(); !strings.HasPrefix(l, ":") || len(l)+1 < 2048 {
				t.Fatalf("first line (%d bytes) %.40q... is not the padding", len(l), l)
			}
			for i := range 5 {
				b.send(t, fmt.Sprintf("data: event %d\n\n", i))
				if l := next(); l != fmt.Sprintf("data: event %d", i) {
					t.Fatalf("curl printed %q", l)
				}
				if l := next(); l != "" {
					t.Fatalf("curl printed %q", l)
				}
			}
			hdr, _ := os.ReadFile(headers)
			if !bytes.Contains(bytes.ToLower(hdr), []byte("content-encoding: "+enc)) {
				t.Fatalf("curl saw the headers:\n%s", hdr)
			}
			b.end(t)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("curl: %v: %s", err, stderr.String())
			}
		})
	}
}

// A client that leaves mid-stream ends the stream and releases its encoder.
func TestCompressedClientLeaves(t *testing.T) {
	for _, enc := range []string{"gzip", "zstd", "br"} {
		t.Run(enc, func(t *testing.T) {
			checkNoLeak(t)
			b := newScriptedBackend(t)
			base := startCaddy(t, route("/events", sseHandler(map[string]any{"heartbeat": "1s", "compress": []string{enc}}), proxyTo(b.Addr)))
			c := openDecoding(t, base+"/events", true, enc)
			b.request(t)
			b.send(t, "data: one\n\n")
			c.close()
			// The backend keeps writing into a stream nobody reads.
			ev := []byte("data: " + strings.Repeat("y", 1000) + "\n\n")
			deadline := time.After(10 * time.Second)
			for {
				select {
				case b.writes <- backendWrite{data: ev}:
					continue
				case <-b.done:
				case <-deadline:
					t.Fatal("stream still running after the client left")
				}
				break
			}
			waitNoLiveEncoders(t)
		})
	}
}

// A client that stops reading is dropped after write_timeout even when the
// write that blocks is a compressor flush.
func TestCompressedClientThatStopsReadingIsDropped(t *testing.T) {
	for _, enc := range []string{"gzip", "zstd"} {
		t.Run(enc, func(t *testing.T) {
			checkNoLeak(t)
			b := newScriptedBackend(t)
			base := startCaddy(t, route("/events", sseHandler(map[string]any{"write_timeout": "1s", "heartbeat": 0}), proxyTo(b.Addr)))
			dialStalled(t, base, "Accept-Encoding: "+enc+"\r\n")
			b.request(t)
			// Incompressible events, so the socket buffers fill.
			r := rand.New(rand.NewPCG(2, 2))
			noise := make([]byte, 48<<10)
			for i := range noise {
				noise[i] = byte('A' + r.IntN(26))
			}
			ev := "data: " + string(noise) + "\n\n"
			deadline := time.Now().Add(20 * time.Second)
			for {
				select {
				case b.writes <- backendWrite{data: []byte(ev)}:
				case <-b.done:
					waitNoLiveEncoders(t)
					return // the stream ended: the stuck client was dropped
				}
				if time.Now().After(deadline) {
					t.Fatal("a client that never reads was not dropped")
				}
			}
		})
	}
}

// An encoder whose output cannot be written reports it on every later
// call, and is released without writing a trailer.
func TestEncoderErrorEndsTheConnection(t *testing.T) {
	for _, enc := range []string{"gzip", "zstd"} {
		t.Run(enc, func(t *testing.T) {
			before := liveEncoders.Load()
			w := &fakeWriter{limit: 100}
			c := newClientConn(w, time.Second)
			if err := c.compress(mustCoding(enc)); err != nil {
				t.Fatal(err)
			}
			now := time.Now()
			if err := c.writeFlush(now, []byte("data: small\n\n")); err != nil {
				t.Fatalf("first event: %v", err)
			}
			noise := wantPrelude(t, enc, 2048, 0) // incompressible: more than the limit
			err := c.writeFlush(now, []byte(noise))
			if !errors.Is(err, errWriteFailed) {
				t.Fatalf("flush error %v, want the write error", err)
			}
			if err := c.writeFlush(now, []byte("data: after\n\n")); err == nil {
				t.Fatal("a broken encoder accepted more")
			}
			n := w.n
			c.endEncoding(false)
			if w.n != n {
				t.Fatal("a trailer was written for a failed stream")
			}
			if c.enc != nil || liveEncoders.Load() != before {
				t.Fatalf("encoder not released (%d live)", liveEncoders.Load()-before)
			}
			c.endEncoding(true) // idempotent
		})
	}
}

// Several writes and one flush (a fan-out client draining a backlog) give
// one sync flush, and the result decodes to all of it.
func TestClientConnBacklogOneSyncFlush(t *testing.T) {
	for _, enc := range []string{"gzip", "zstd"} {
		t.Run(enc, func(t *testing.T) {
			var wire bytes.Buffer
			w := &fakeWriter{buf: &wire}
			c := newClientConn(w, 0)
			if err := c.compress(mustCoding(enc)); err != nil {
				t.Fatal(err)
			}
			var want bytes.Buffer
			now := time.Now()
			for i := range 50 {
				ev := fmt.Sprintf("id: %d\ndata: {\"backlog\": %d}\n\n", i, i)
				want.WriteString(ev)
				if err := c.write(now, []byte(ev)); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.flush(); err != nil {
				t.Fatal(err)
			}
			if w.flushes != 1 {
				t.Fatalf("%d flushes", w.flushes)
			}
			if got := decodePrefix(t, enc, wire.Bytes(), want.Len()); got != want.String() {
				t.Fatalf("decoded %q", tail(got))
			}
			c.endEncoding(true)
			if got := decodeAll(t, enc, wire.Bytes()); got != want.String() {
				t.Fatalf("decoded %q after the end", tail(got))
			}
		})
	}
}

// decodePrefix decodes a stream that is not finished, up to the last
// flush, and returns it once it has len(want) bytes (or the decoder fails):
// the decoder must not need any byte after the flush.
func decodePrefix(t testing.TB, enc string, wire []byte, want int) string {
	t.Helper()
	pr, pw := io.Pipe()
	go pw.Write(wire) // the pipe stays open: nothing follows the flush yet
	defer pw.Close()
	result := make(chan string, 1)
	go func() {
		var dec io.Reader = pr
		switch enc {
		case "gzip":
			zr, err := gzip.NewReader(pr)
			if err != nil {
				result <- "error: " + err.Error()
				return
			}
			dec = zr
		case "zstd":
			zr, err := zstd.NewReader(pr, zstd.WithDecoderConcurrency(1))
			if err != nil {
				result <- "error: " + err.Error()
				return
			}
			defer zr.Close()
			dec = zr
		}
		var out bytes.Buffer
		buf := make([]byte, 1<<16)
		for out.Len() < want {
			n, err := dec.Read(buf)
			out.Write(buf[:n])
			if err != nil {
				break
			}
		}
		result <- out.String()
	}()
	select {
	case got := <-result:
		return got
	case <-time.After(5 * time.Second):
		pw.CloseWithError(io.ErrUnexpectedEOF)
		return "(decoder stuck) " + <-result
	}
}

func decodeAll(t testing.TB, enc string, wire []byte) string {
	t.Helper()
	var dec io.Reader
	switch enc {
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(wire))
		if err != nil {
			t.Fatal(err)
		}
		dec = zr
	case "zstd":
		zr, err := zstd.NewReader(bytes.NewReader(wire))
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		dec = zr
	}
	out, err := io.ReadAll(dec)
	if err != nil {
		t.Fatalf("decoding %s: %v", enc, err)
	}
	return string(out)
}

// Guard: the JSON field name as documented.
func TestCompressJSON(t *testing.T) {
	var h Handler
	if err := json.Unmarshal([]byte(`{"compress": ["gzip"]}`), &h); err != nil || fmt.Sprint(h.Compress) != "[gzip]" {
		t.Fatalf("%v %q", err, h.Compress)
	}
}

// Benchmarks. Figures and commands: docs/compression.md.

// waitDecoded waits until n bytes are decoded.
func (c *decodingClient) waitDecoded(t testing.TB, n int) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		c.mu.Lock()
		got := c.plain.Len()
		c.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-c.more:
		case <-c.done:
			t.Fatalf("stream ended (%v) after %d of %d bytes", c.err, got, n)
		case <-deadline:
			t.Fatalf("%d of %d bytes decoded after 5s", got, n)
		}
	}
}
