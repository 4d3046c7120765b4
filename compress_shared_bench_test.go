package caddysse

import (
	"cmp"
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"go.uber.org/zap"
)

// benchHub is a hub with n clients of encoding enc ("" for identity),
// without sockets or Caddy: the hub's publish path and each client's
// delivery path, as in fanoutClient.run. With perClient, each client has
// its own compressor (the pass-through path, and fan-out before shared
// compression) instead of the hub's shared ones.
type benchHub struct {
	hb      *hub
	w       *hubWriter
	clients []*fanoutClient
	batch   []*event
}

func newBenchHub(tb testing.TB, n int, enc string, perClient bool) *benchHub {
	tb.Helper()
	h := &Handler{Padding: new(int)}
	if err := h.Provision(benchContext()); err != nil {
		tb.Fatal(err)
	}
	h.logger = zap.NewNop()
	hb := newHub("bench", "bench", hubConfig{limits: replayLimits{events: 1000}, ids: "auto", maxEventSize: 1 << 20}, h.logger, newMemoryStream(HistoryLimits{Events: 1000}))
	bh := &benchHub{hb: hb, w: &hubWriter{hub: hb, ctx: context.Background(), lease: Lease{Token: memoryLease}, maxSize: 1 << 20, header: http.Header{"Content-Type": {"text/event-stream"}}}}
	for range n {
		c := &fanoutClient{hub: hb, pol: unboundedPolicy(h), encoding: mustCoding(cmp.Or(enc, "identity"))}
		c.out = newClientConn(wireCounter{ResponseWriter: &fakeWriter{}, n: &c.wire}, 0)
		switch {
		case enc == "":
		case perClient:
			if err := c.out.compress(mustCoding(enc)); err != nil {
				tb.Fatal(err)
			}
		default:
			c.z = hb.attachShared(mustCoding(enc))
		}
		if err := c.writeOwn(time.Now(), h.preludeFor(mustCoding(cmp.Or(enc, "identity")))); err != nil {
			tb.Fatal(err)
		}
		bh.clients = append(bh.clients, c)
	}
	return bh
}

// publish has the hub take one event from its upstream.
func (bh *benchHub) publish(tb testing.TB, ev []byte) {
	if _, err := bh.w.Write(ev); err != nil {
		tb.Fatal(err)
	}
}

// deliver has client c write what it has not written yet, as its loop does.
func (bh *benchHub) deliver(tb testing.TB, c *fanoutClient) {
	hb := bh.hb
	hb.mu.Lock()
	bh.batch, _ = hb.win.after(bh.batch[:0], c.cursor, maxBatch)
	if c.z != nil {
		hb.noteWaitingLocked(c.z, bh.batch)
	}
	hb.mu.Unlock()
	if len(bh.batch) > 0 {
		if err := c.deliver(time.Now(), bh.batch); err != nil {
			tb.Fatal(err)
		}
	}
}

// wire is the bytes the clients got, all together.
func (bh *benchHub) wire() (n int64) {
	for _, c := range bh.clients {
		n += c.wire
	}
	return n
}

func (bh *benchHub) close() {
	for _, c := range bh.clients {
		if c.z != nil {
			bh.hb.detachShared(c.z)
		}
		c.out.endEncoding(false)
	}
	bh.hb.Destruct()
}

// BenchmarkFanoutDelivery is the CPU of delivering one ~190 B event to
// 1000 fan-out clients (publish once, then each client writes it), per
// delivered event, without sockets: uncompressed, with the hub's shared
// compressors, and with one compressor per client. It also reports how
// often the event was compressed and the bytes on the wire per plain byte.
func BenchmarkFanoutDelivery(b *testing.B) {
	const n = 1000
	events := realisticEvents(1000)
	for _, v := range []struct {
		name, enc string
		perClient bool
	}{
		{"identity", "", false},
		{"shared-gzip", "gzip", false},
		{"shared-zstd", "zstd", false},
		{"perclient-gzip", "gzip", true},
		{"perclient-zstd", "zstd", true},
		{"perclient-br", "br", true}, // br is never shared (sharedCodings)
	} {
		b.Run(v.name, func(b *testing.B) {
			bh := newBenchHub(b, n, v.enc, v.perClient)
			defer bh.close()
			wire0 := bh.wire()
			before := sharedCompressions.Load()
			i, plain := 0, 0
			b.ReportAllocs()
			for b.Loop() {
				ev := events[i%len(events)]
				bh.publish(b, ev)
				for _, c := range bh.clients {
					bh.deliver(b, c)
				}
				i++
				plain += len(ev)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(i*n), "ns/delivery")
			b.ReportMetric(float64(sharedCompressions.Load()-before)/float64(i), "compressions/event")
			b.ReportMetric(float64(bh.wire()-wire0)/float64(plain*n), "wire/plain")
			b.ReportMetric(0, "ns/op") // per 1000 deliveries: see ns/delivery
		})
	}
}

// BenchmarkSharedCompressionChurn reports the wire/plain ratio of shared
// compression against compressors of their own while clients keep
// joining: one more every 100, 20, 5 or 1 of 1000 events.
func BenchmarkSharedCompressionChurn(b *testing.B) {
	events := realisticEvents(1000)
	for _, enc := range []string{"gzip", "zstd"} {
		for _, joinEvery := range []int{100, 20, 5, 1} {
			b.Run(fmt.Sprintf("%s/join-every-%d", enc, joinEvery), func(b *testing.B) {
				all, allOwn, first, firstOwn, epochs, _ := churnRatio(b, enc, events, joinEvery)
				b.ReportMetric(all, "wire/plain")
				b.ReportMetric(allOwn, "own-wire/plain")
				b.ReportMetric(100*(all/allOwn-1), "%over-own")
				b.ReportMetric(100*(first/firstOwn-1), "first-%over-own")
				b.ReportMetric(float64(epochs), "epochs")
				for range b.N {
				}
			})
		}
	}
}

// BenchmarkFanoutIdleMemory holds N fan-out clients of one stream open
// through a real Caddy, uncompressed and compressed, and reports the
// memory of the whole process (heap after GC plus stacks) per client:
// Caddy, backend and clients alike, so only differences between the
// variants mean something. Each client got 20 events before going idle.
func BenchmarkFanoutIdleMemory(b *testing.B) {
	const n = 200
	warm := realisticEvents(20)
	results := map[string]float64{}
	for _, ae := range []string{"", "gzip", "zstd", "br"} {
		name := cmp.Or(ae, "identity")
		b.Run(name, func(b *testing.B) {
			e := newEmitter(b)
			base := startCaddy(b, fanoutRoute(e, map[string]any{"padding": 2048, "heartbeat": "15s", "compress": []string{"zstd", "gzip", "br"}}))
			tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: -1}
			defer tr.CloseIdleConnections()
			emitReady := func() {
				for _, ev := range warm {
					e.emit(string(ev))
				}
				e.emit("event: ready\ndata: x\n\n")
			}
			// One client first, so that the hub and its compressor are not
			// counted.
			connected, ready := make(chan error, n+1), make(chan error, n+1)
			stops := []func(){idleClient(tr, base+"/events", ae, connected, ready)}
			if err := <-connected; err != nil {
				b.Fatal(err)
			}
			emitReady()
			if err := <-ready; err != nil {
				b.Fatal(err)
			}
			heap0, stack0 := liveMemory()
			for range n {
				stops = append(stops, idleClient(tr, base+"/events", ae, connected, ready))
			}
			for range n {
				if err := <-connected; err != nil {
					b.Fatal(err)
				}
			}
			emitReady()
			for range n {
				if err := <-ready; err != nil {
					b.Fatal(err)
				}
			}
			results[name] = reportMemoryPer(b, "client", n, heap0, stack0)
			for range b.N {
			}
			for _, stop := range stops {
				stop()
			}
		})
	}
	if len(results) == 4 {
		for _, enc := range []string{"gzip", "zstd", "br"} {
			b.Logf("fanout/%s: %.1f KiB/client, %+.1f KiB over fanout/identity", enc, results[enc]/1024, (results[enc]-results["identity"])/1024)
		}
	}
}
