package caddysse

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	kgzip "github.com/klauspost/compress/gzip"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
)

// encodeHandler is Caddy's encode handler with the given encodings.
func encodeHandler(encodings ...string) string {
	m := map[string]any{}
	for _, e := range encodings {
		m[e] = map[string]any{}
	}
	b, _ := json.Marshal(map[string]any{"handler": "encode", "encodings": m, "prefer": encodings})
	return string(b)
}

// idleBackend answers every request with warm-up events, a "ready" event,
// and then nothing until the client leaves.
func idleBackend(t testing.TB, warm [][]byte) string {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for _, ev := range warm {
			w.Write(ev)
			rc.Flush()
		}
		io.WriteString(w, "event: ready\ndata: x\n\n")
		rc.Flush()
		<-r.Context().Done()
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// idleClient opens a stream, decodes it until the "ready" event, then drops
// its decoder and only keeps reading (so that it holds no decoder memory).
// When connected is not nil, the outcome of the request is sent there
// first; ready gets the outcome of decoding up to "ready".
func idleClient(tr *http.Transport, url, acceptEncoding string, connected, ready chan<- error) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		req.Header.Set("Accept", "text/event-stream")
		if acceptEncoding != "" {
			req.Header.Set("Accept-Encoding", acceptEncoding)
		}
		resp, err := tr.RoundTrip(req)
		if connected != nil {
			connected <- err
		} else if err != nil {
			ready <- err
		}
		if err != nil {
			return
		}
		defer resp.Body.Close()
		err = func() error {
			var dec io.Reader = resp.Body
			switch ce := resp.Header.Get("Content-Encoding"); ce {
			case "":
			case "gzip":
				zr, err := gzip.NewReader(resp.Body)
				if err != nil {
					return err
				}
				dec = zr
			case "zstd":
				zr, err := zstd.NewReader(resp.Body, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
				if err != nil {
					return err
				}
				defer zr.Close()
				dec = zr
			case "br":
				dec = brotli.NewReader(resp.Body)
			default:
				return fmt.Errorf("Content-Encoding %q", ce)
			}
			if want := acceptEncoding; want != "" && resp.Header.Get("Content-Encoding") != want {
				return fmt.Errorf("Content-Encoding %q, want %q", resp.Header.Get("Content-Encoding"), want)
			}
			var got []byte
			buf := make([]byte, 4096)
			for !bytes.Contains(got, []byte("event: ready\n")) {
				n, err := dec.Read(buf)
				got = append(got, buf[:n]...)
				if err != nil {
					return err
				}
			}
			return nil
		}()
		ready <- err
		if err != nil {
			return
		}
		var small [512]byte
		for {
			if _, err := resp.Body.Read(small[:]); err != nil {
				return
			}
		}
	}()
	return func() { cancel(); <-done }
}

// liveMemory is the live heap after GC and the goroutine stacks.
func liveMemory() (heap, stack uint64) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc, m.StackInuse
}

// reportMemoryPer reports the live memory grown since heap0 and stack0
// (taken with liveMemory) per each of n units, in total, heap and stack
// KiB, and returns the total in bytes.
func reportMemoryPer(b *testing.B, unit string, n int, heap0, stack0 uint64) float64 {
	heap1, stack1 := liveMemory()
	heap := float64(int64(heap1-heap0)) / float64(n)
	stack := float64(int64(stack1-stack0)) / float64(n)
	b.ReportMetric((heap+stack)/1024, "KiB/"+unit)
	b.ReportMetric(heap/1024, "heap-KiB/"+unit)
	b.ReportMetric(stack/1024, "stack-KiB/"+unit)
	return heap + stack
}

// BenchmarkIdleStreamMemory holds N idle streams open through a real Caddy
// and reports the memory of the whole process (heap after GC plus stacks)
// per stream: Caddy, backend and client alike, so only differences between
// the variants mean something. Each stream got 20 events before going idle.
func BenchmarkIdleStreamMemory(b *testing.B) {
	const n = 200
	warm := realisticEvents(20)
	variants := []struct {
		name, handler, ae string
	}{
		{"sse/identity", sseHandler(nil), ""},
		{"sse/gzip", sseHandler(nil), "gzip"},
		{"sse/zstd", sseHandler(nil), "zstd"},
		{"sse/br", sseHandler(map[string]any{"compress": []string{"br"}}), "br"},
		{"encode/identity", encodeHandler("zstd", "gzip"), ""},
		{"encode/gzip", encodeHandler("zstd", "gzip"), "gzip"},
		{"encode/zstd", encodeHandler("zstd", "gzip"), "zstd"},
	}
	results := map[string]float64{}
	for _, v := range variants {
		b.Run(v.name, func(b *testing.B) {
			backend := idleBackend(b, warm)
			base := startCaddy(b, route("/events", v.handler, proxyTo(backend)))
			tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: -1}
			defer tr.CloseIdleConnections()
			// One stream first, so lazily built things are not counted.
			ready := make(chan error, n+1)
			stopFirst := idleClient(tr, base+"/events", v.ae, nil, ready)
			if err := <-ready; err != nil {
				b.Fatal(err)
			}
			heap0, stack0 := liveMemory()
			stops := make([]func(), n)
			for i := range stops {
				stops[i] = idleClient(tr, base+"/events", v.ae, nil, ready)
			}
			for range n {
				if err := <-ready; err != nil {
					b.Fatal(err)
				}
			}
			results[v.name] = reportMemoryPer(b, "stream", n, heap0, stack0)
			for range b.N {
			}
			for _, stop := range append(stops, stopFirst) {
				stop()
			}
		})
	}
	if len(results) == len(variants) {
		for _, v := range variants[1:] {
			if v.ae == "" {
				continue
			}
			mode, _, _ := strings.Cut(v.name, "/")
			b.Logf("%-12s %7.0f KiB/stream, %+7.0f KiB over %s/identity", v.name, results[v.name]/1024, (results[v.name]-results[mode+"/identity"])/1024, mode)
		}
	}
}

// BenchmarkCompressionRatio sends 1000 realistic events one by one through
// a real Caddy, each flushed and decoded by the client before the next, and
// reports the bytes on the wire per plain byte.
func BenchmarkCompressionRatio(b *testing.B) {
	events := realisticEvents(1000)
	plain := 0
	for _, ev := range events {
		plain += len(ev)
	}
	quiet := map[string]any{"padding": 0, "heartbeat": 0}
	for _, v := range []struct {
		name, handler, ae string
	}{
		{"sse/identity", sseHandler(quiet), ""},
		{"sse/gzip", sseHandler(quiet), "gzip"},
		{"sse/zstd", sseHandler(quiet), "zstd"},
		{"sse/br", sseHandler(map[string]any{"padding": 0, "heartbeat": 0, "compress": []string{"br"}}), "br"},
		{"encode/gzip", encodeHandler("gzip"), "gzip"},
		{"encode/zstd", encodeHandler("zstd"), "zstd"},
	} {
		b.Run(v.name, func(b *testing.B) {
			backend := newScriptedBackend(b)
			base := startCaddy(b, route("/events", v.handler, proxyTo(backend.Addr)))
			c := openDecoding(b, base+"/events", false, v.ae)
			if ce := c.Resp.Header.Get("Content-Encoding"); ce != v.ae {
				b.Fatalf("Content-Encoding %q", ce)
			}
			sent := 0
			for _, ev := range events {
				backend.send(b, string(ev))
				sent += len(ev)
				c.waitDecoded(b, sent)
			}
			got, raw := c.state()
			if got != string(bytes.Join(events, nil)) {
				b.Fatal("decoded stream differs")
			}
			b.ReportMetric(float64(raw)/float64(plain), "wire/plain")
			b.ReportMetric(float64(raw)/float64(len(events)), "wireB/event")
			for range b.N {
			}
		})
	}
}

// BenchmarkEventCPU is the CPU the plugin spends per event on the client
// side of a stream (write and flush of one ~190 B event, no socket), with
// compression off and on, and what Caddy's encode encoders spend for the
// same (its defaults: gzip level 5, zstd default level with a 128 KiB
// window), plus the bytes each puts on the wire per event.
func BenchmarkEventCPU(b *testing.B) {
	events := realisticEvents(1000)
	for _, name := range []string{"identity", "gzip", "zstd", "br", "encode-gzip", "encode-zstd"} {
		b.Run(name, func(b *testing.B) {
			w := &fakeWriter{}
			c := newClientConn(w, 0)
			switch name {
			case "gzip", "zstd", "br":
				if err := c.compress(mustCoding(name)); err != nil {
					b.Fatal(err)
				}
				defer c.endEncoding(false)
			case "encode-gzip":
				zw, _ := kgzip.NewWriterLevel(w, 5)
				c.enc = caddyEncoder{zw}
			case "encode-zstd":
				zw, _ := zstd.NewWriter(w, zstd.WithWindowSize(128<<10), zstd.WithEncoderConcurrency(1),
					zstd.WithZeroFrames(true), zstd.WithEncoderLevel(zstd.SpeedDefault))
				c.enc = caddyEncoder{zw}
			}
			now := time.Now()
			plain := 0
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				ev := events[i%len(events)]
				if err := c.writeFlush(now, ev); err != nil {
					b.Fatal(err)
				}
				plain += len(ev)
				i++
			}
			b.ReportMetric(float64(w.n)/float64(i), "wireB/event")
			b.ReportMetric(float64(w.n)/float64(plain), "wire/plain")
		})
	}
}

// caddyEncoder adapts a Caddy encode.Encoder (what encode keeps per stream)
// to encoder, for BenchmarkEventCPU.
type caddyEncoder struct{ flushWriteCloser }

type flushWriteCloser interface {
	io.WriteCloser
	Flush() error
}

func (caddyEncoder) release() {}
