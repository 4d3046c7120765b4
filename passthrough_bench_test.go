package caddysse

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// sampleEvent is a realistic ~200-byte JSON event.
func sampleEvent(i int) []byte {
	return fmt.Appendf(nil, "id: %d\nevent: order\ndata: {\"id\":%d,\"symbol\":\"ACME\",\"side\":\"buy\",\"qty\":%d,\"price\":101.25,\"venue\":\"XNYS\",\"ts\":%d,\"trace\":\"4bf92f3577b34da6a3ce929d0e0e4736\"}\n\n",
		i, i, i%500, time.Now().UnixNano())
}

func newBenchStream(b *testing.B) *stream {
	h := &Handler{}
	if err := h.Provision(benchContext()); err != nil {
		b.Fatal(err)
	}
	h.logger = zap.NewNop()
	return &stream{h: h, cancel: func(error) {}, logger: h.logger,
		out: newClientConn(&fakeWriter{}, time.Duration(h.WriteTimeout))}
}

// BenchmarkStreamWrite is the plugin's cost per event on the pass-through
// path: scanning, holding, forwarding and flushing, for events arriving
// whole, and split in two writes (the held-half path).
func BenchmarkStreamWrite(b *testing.B) {
	ev := sampleEvent(1)
	for _, split := range []bool{false, true} {
		b.Run(map[bool]string{false: "whole", true: "split"}[split], func(b *testing.B) {
			s := newBenchStream(b)
			b.SetBytes(int64(len(ev)))
			b.ReportAllocs()
			for b.Loop() {
				if split {
					s.Write(ev[:100])
					s.Write(ev[100:])
				} else {
					s.Write(ev)
				}
			}
		})
	}
}

// BenchmarkEndToEnd is one event from a backend through a real Caddy to a
// client on loopback, with the sse handler and with the same route
// without it; ns/op is per event.
func BenchmarkEndToEnd(b *testing.B) {
	for _, withSSE := range []bool{false, true} {
		b.Run(map[bool]string{false: "reverse_proxy", true: "sse+reverse_proxy"}[withSSE], func(b *testing.B) {
			backend := eventBackend(b)
			handlers := []string{proxyTo(backend)}
			if withSSE {
				handlers = append([]string{sseHandler(map[string]any{"padding": 0, "compress": []string{"off"}})}, handlers...)
			}
			base := startCaddy(b, route("/events", handlers...))
			b.ReportAllocs()
			n := b.N
			req, _ := http.NewRequest("GET", base+"/events?n="+strconv.Itoa(n), nil)
			req.Header.Set("Accept", "text/event-stream")
			b.ResetTimer()
			resp, err := http.DefaultTransport.RoundTrip(req)
			if err != nil {
				b.Fatal(err)
			}
			defer resp.Body.Close()
			br := bufio.NewReaderSize(resp.Body, 64<<10)
			for got := 0; got < n; {
				line, err := br.ReadSlice('\n')
				if err != nil {
					b.Fatalf("after %d events: %v", got, err)
				}
				if len(line) == 1 {
					got++
				}
			}
		})
	}
}

// eventBackend streams ?n= events as fast as the connection takes them,
// flushing after each.
func eventBackend(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		var buf bytes.Buffer
		for i := range n {
			buf.Reset()
			buf.Write(sampleEvent(i))
			if _, err := w.Write(buf.Bytes()); err != nil {
				return
			}
			rc.Flush()
		}
		io.Copy(io.Discard, r.Body)
	})}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func benchContext() caddy.Context {
	ctx, _ := caddy.NewContext(caddy.Context{Context: context.Background()})
	return ctx
}
