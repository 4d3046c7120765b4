package caddysse

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Shared compression at fan-out (compress_shared.go): each event is compressed
// once per encoding, and clients that joined at any point decode exactly
// what an uncompressed client of the same join point gets.

// theHub is the only fan-out hub of the running test.
func theHub(t testing.TB) *hub {
	t.Helper()
	var found []*hub
	hubs.Range(func(_, v any) bool {
		found = append(found, v.(*hub))
		return true
	})
	if len(found) != 1 {
		t.Fatalf("%d fan-out hubs, want 1", len(found))
	}
	return found[0]
}

// cached is every event the hub's cache holds, oldest first.
func (hb *hub) cached() []*event {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	evs, _ := hb.win.after(nil, 0, 0)
	return evs
}

// waitUntil waits until the decoded text satisfies cond.
func (c *decodingClient) waitUntil(t testing.TB, what string, cond func(string) bool) string {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		got, _ := c.state()
		if cond(got) {
			return got
		}
		select {
		case <-c.more:
		case <-c.done:
			if got, _ := c.state(); cond(got) {
				return got
			}
			t.Fatalf("stream ended (%v) before %s; decoded %q", c.err, what, tail(got))
		case <-deadline:
			t.Fatalf("no %s after 5s; decoded %q", what, tail(got))
		}
	}
}

func (c *decodingClient) wireBytes() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.wire.Bytes())
}

// joinGroup is clients that joined at the same point: one uncompressed,
// one gzip and one zstd.
type joinGroup struct {
	name   string
	plain  *decodingClient
	z      [numCodings]*decodingClient
	after  uint64 // the last event published before they joined
	replay uint64 // events the cache replays to them
}

func (g *joinGroup) all() []*decodingClient {
	return []*decodingClient{g.plain, g.z[codingGzip], g.z[codingZstd]}
}

func TestFanoutSharedCompressionJoinPoints(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"heartbeat": 0, "retry": "2s"}))
	events := realisticEvents(48)
	published := 0
	var groups []*joinGroup
	join := func(name string, h2 bool, headers ...string) *joinGroup {
		g := &joinGroup{name: name, after: uint64(published)}
		g.plain = openDecoding(t, base+"/events", h2, "", headers...)
		g.z[codingGzip] = openDecoding(t, base+"/events", h2, "gzip", headers...)
		g.z[codingZstd] = openDecoding(t, base+"/events", !h2, "zstd", headers...)
		for i, c := range g.z {
			if c == nil {
				continue // identity: g.plain
			}
			if ce := c.Resp.Header.Get("Content-Encoding"); ce != coding(i).String() {
				t.Fatalf("%s: Content-Encoding %q, want %s", name, ce, coding(i))
			}
		}
		groups = append(groups, g)
		return g
	}
	// same waits until every client of every group decoded its uncompressed
	// twin's text ending in suffix: exactly the same bytes.
	same := func(suffix string) {
		t.Helper()
		for _, g := range groups {
			want := g.plain.waitUntil(t, fmt.Sprintf("%s: %q", g.name, tail(suffix)), func(s string) bool {
				return strings.HasSuffix(s, suffix)
			})
			for i, c := range g.z {
				if c == nil {
					continue // identity: g.plain
				}
				if got, _ := c.state(); !strings.HasPrefix(want, got) {
					t.Fatalf("%s/%s decoded %q, its uncompressed twin %q", g.name, coding(i), tail(got), tail(want))
				}
				c.waitPlain(t, want)
			}
		}
	}
	emit := func(n int) {
		t.Helper()
		for range n {
			ev := string(events[published])
			e.emit(ev)
			published++
			same(ev)
		}
	}
	before := sharedCompressions.Load()

	join("before the first event", false)
	e.waitJoined(t, 1)
	emit(5)
	join("mid-epoch", false)
	emit(15)
	// A restart happened for the mid-epoch joiners.
	join("after a restart", true)
	join("Last-Event-ID replay", false, "Last-Event-ID", "1002") // events 4-20 from the cache
	join("unknown Last-Event-ID", false, "Last-Event-ID", "gone")
	emit(10)
	hb := theHub(t)
	hb.mu.Lock()
	hb.beatLocked()
	hb.mu.Unlock()
	same(": heartbeat\n")
	join("after a heartbeat", false)
	emit(len(events) - published)

	if got := sharedCompressions.Load() - before; got != int64(2*published) {
		t.Fatalf("%d shared compressions for %d events in 2 encodings and %d clients", got, published, 3*len(groups))
	}
	groups[3].replay = 17

	// The wire: from the first epoch start a client writes (at or after the
	// first event it gets), it writes the shared bytes of every event, up
	// to the heartbeat, and again from the first event after it.
	cache := hb.cached()
	if len(cache) != published {
		t.Fatalf("%d cached events, want %d", len(cache), published)
	}
	beat := 30 // the events before the heartbeat
	if !cache[beat].z.start[codingGzip] || !cache[beat].z.start[codingZstd] {
		t.Fatal("the first event after a heartbeat does not start an epoch")
	}
	for _, g := range groups {
		first := int(g.after - g.replay) // index in cache of the first event sent
		for i, c := range g.z {
			if c == nil {
				continue // identity: g.plain
			}
			wire := c.wireBytes()
			sync := first
			for !cache[sync].z.start[i] {
				sync++
			}
			if sync-first > maxEpoch {
				t.Errorf("%s/%s: in sync only %d events after joining", g.name, coding(i), sync-first)
			}
			t.Logf("%s/%s: joined before event %d, in sync from event %d", g.name, coding(i), first+1, sync+1)
			for _, run := range [][2]int{{sync, beat}, {max(sync, beat), published}} {
				if run[0] >= run[1] {
					continue
				}
				var shared []byte
				for k := run[0]; k < run[1]; k++ {
					if coding(i) == codingZstd && k > run[0] && cache[k].z.start[i] {
						shared = append(shared, zstdFrameEnd...)
					}
					shared = append(shared, cache[k].z.b[i]...)
				}
				if !bytes.Contains(wire, shared) {
					t.Errorf("%s/%s: the wire does not hold the shared bytes of events %d-%d", g.name, coding(i), run[0]+1, run[1])
				}
			}
		}
	}

	// A clean end (the server shuts down): each client gets its own retry
	// hint and a valid end of its compressed stream (the gzip trailer checks
	// CRC-32 and length of everything decoded).
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, g := range groups {
		for _, c := range g.all() {
			if err := c.waitEnd(t); err != nil {
				t.Fatalf("%s/%q: decoding the end of the stream: %v", g.name, c.Resp.Header.Get("Content-Encoding"), err)
			}
		}
		want, _ := g.plain.state()
		cut := strings.LastIndex(want, "retry: ")
		if cut < 0 || !strings.HasSuffix(want, "\n") {
			t.Fatalf("%s: no retry hint at the end: %q", g.name, tail(want))
		}
		for i, c := range g.z {
			if c == nil {
				continue // identity: g.plain
			}
			got, _ := c.state()
			if gcut := strings.LastIndex(got, "retry: "); gcut != cut || got[:cut] != want[:cut] || !strings.HasSuffix(got, "\n") {
				t.Fatalf("%s/%s decoded %q at the end, its uncompressed twin %q", g.name, coding(i), tail(got), tail(want))
			}
		}
	}
	waitHubsGone(t, strings.TrimPrefix(base, "http://"))
	if n := liveSharedEncoders.Load(); n != 0 {
		t.Fatalf("%d shared zstd encoders not given back", n)
	}
}

// The ratio kept by sharing, on 1000 realistic events: a client of the
// shared compressor puts at most 10% more bytes on the wire than one with
// a compressor of its own, alone (one epoch) and with a client joining
// every 100 events (restarts; the joiners write events of their own,
// uncompressed, until the next epoch start). Heavier churn:
// BenchmarkSharedCompressionChurn.
func TestSharedCompressionRatio(t *testing.T) {
	events := realisticEvents(1000)
	for _, enc := range []string{"gzip", "zstd"} {
		for _, joinEvery := range []int{0, 100} {
			all, allOwn, first, firstOwn, epochs, clients := churnRatio(t, enc, events, joinEvery)
			t.Logf("%s, %d clients, %d epochs: wire/plain of all clients %.3f shared, %.3f with their own compressors (%+.1f%%); of the first client %.3f, %.3f (%+.1f%%)",
				enc, clients, epochs, all, allOwn, 100*(all/allOwn-1), first, firstOwn, 100*(first/firstOwn-1))
			if all > 1.1*allOwn || first > 1.1*firstOwn {
				t.Errorf("%s, a client joining every %d events: shared ratio more than 10%% above the per-client one", enc, joinEvery)
			}
			if joinEvery == 0 && epochs != 1 {
				t.Errorf("%s: %d epochs for a client alone, want 1", enc, epochs)
			}
		}
	}
	if n := liveSharedEncoders.Load(); n != 0 {
		t.Fatalf("%d shared zstd encoders not given back", n)
	}
}

// The framing of a shared-compression client, without Caddy: own bytes
// larger than one stored deflate block (65535 B) or one raw zstd block
// (16 KiB), events larger than that, own bytes inside a shared zstd frame
// (a heartbeat) and epoch restarts; after every flush what was written
// decodes at once, and the end of the stream is valid (gzip trailer).
func TestSharedWriterFraming(t *testing.T) {
	for _, enc := range []string{"gzip", "zstd"} {
		t.Run(enc, func(t *testing.T) {
			bh := newBenchHub(t, 0, enc, false)
			defer bh.close()
			h := &Handler{Padding: new(int)}
			*h.Padding = maxPadding
			if err := h.Provision(benchContext()); err != nil {
				t.Fatal(err)
			}
			var wire bytes.Buffer
			c := &fanoutClient{hub: bh.hb, pol: unboundedPolicy(h), encoding: mustCoding(enc)}
			c.out = newClientConn(&fakeWriter{buf: &wire}, 0)
			c.z = bh.hb.attachShared(mustCoding(enc))
			bh.clients = append(bh.clients, c)
			prelude := h.preludeFor(mustCoding(enc))
			if len(prelude) <= gzipStoredMax {
				t.Fatalf("prelude of %d bytes fits one stored block", len(prelude))
			}
			want := string(prelude)
			check := func(what string) {
				t.Helper()
				if got := decodePrefix(t, enc, wire.Bytes(), len(want)); got != want {
					t.Fatalf("after %s: decoded %q, want %q", what, tail(got), tail(want))
				}
			}
			if err := c.writeOwn(time.Now(), prelude); err != nil {
				t.Fatal(err)
			}
			check("the prelude")
			big := []byte("id: big\ndata: " + strings.Repeat("0123456789abcdef", 3<<10) + "\n\n") // 48 KiB
			events := append(realisticEvents(10), big)
			events = append(events, realisticEvents(3)...)
			for i, ev := range events {
				bh.publish(t, ev)
				bh.deliver(t, c)
				want += string(ev)
				check(fmt.Sprintf("event %d", i+1))
			}
			// The first event started an epoch; the client is in sync.
			cache := bh.hb.cached()
			if !c.z.synced || !cache[0].z.start[mustCoding(enc)] {
				t.Fatalf("synced %v, first event starts an epoch: %v", c.z.synced, cache[0].z.start)
			}
			if enc == "zstd" {
				// Own raw blocks go into open shared frames: their window
				// must hold a raw block of the largest size written.
				fh := cache[0].z.b[codingZstd]
				if !bytes.HasPrefix(fh, zstdOwnFrame[:4]) || fh[4]&0x20 != 0 {
					t.Fatalf("shared frame header %x", fh[:6])
				}
				if window := 1 << (10 + fh[5]>>3); window < zstdRawBlockMax {
					t.Fatalf("shared frames have a %d B window, below raw blocks of %d", window, zstdRawBlockMax)
				}
			}
			// A heartbeat: written on its own, the next event restarts.
			bh.hb.mu.Lock()
			bh.hb.beatLocked()
			bh.hb.mu.Unlock()
			if err := c.writeOwn(time.Now(), h.heartbeatBytes); err != nil {
				t.Fatal(err)
			}
			want += string(h.heartbeatBytes)
			check("a heartbeat")
			for i, ev := range realisticEvents(3) {
				bh.publish(t, ev)
				bh.deliver(t, c)
				want += string(ev)
				check(fmt.Sprintf("event %d after the heartbeat", i+1))
			}
			if cache := bh.hb.cached(); !cache[len(cache)-3].z.start[mustCoding(enc)] || !c.z.synced {
				t.Fatal("no epoch start after the heartbeat")
			}
			if err := c.z.end(&c.out); err != nil {
				t.Fatal(err)
			}
			if got := decodeAll(t, enc, wire.Bytes()); got != want {
				t.Fatalf("decoded %q at the end", tail(got))
			}
		})
	}
}

// churnRatio sends events to a hub of one client of encoding enc, shared
// and with a compressor of its own, while another client joins every
// joinEvery events (0: none) and stays. It returns the wire/plain ratio of
// all clients together and of the first one, shared and own, and the
// number of epochs.
func churnRatio(tb testing.TB, enc string, events [][]byte, joinEvery int) (all, allOwn, first, firstOwn float64, epochs, clients int) {
	shared := newBenchHub(tb, 1, enc, false)
	own := newBenchHub(tb, 1, enc, true)
	defer shared.close()
	defer own.close()
	raw, plain := 0, 0
	for i, ev := range events {
		if joinEvery > 0 && i%joinEvery == 0 && i > 0 {
			for _, bh := range []*benchHub{shared, own} {
				c := &fanoutClient{hub: bh.hb, pol: bh.clients[0].pol, cursor: bh.hb.seq, encoding: mustCoding(enc)}
				c.out = newClientConn(wireCounter{ResponseWriter: &fakeWriter{}, n: &c.wire}, 0)
				if bh == own {
					if err := c.out.compress(mustCoding(enc)); err != nil {
						tb.Fatal(err)
					}
				} else {
					c.z = bh.hb.attachShared(mustCoding(enc))
				}
				if err := c.writeOwn(time.Now(), nil); err != nil {
					tb.Fatal(err)
				}
				bh.clients = append(bh.clients, c)
			}
		}
		for _, bh := range []*benchHub{shared, own} {
			bh.publish(tb, ev)
			for _, c := range bh.clients {
				bh.deliver(tb, c)
			}
		}
		raw += len(ev) * len(shared.clients)
		plain += len(ev)
		if cache := shared.hb.cached(); cache[len(cache)-1].z.start[mustCoding(enc)] {
			epochs++
		}
	}
	return float64(shared.wire()) / float64(raw), float64(own.wire()) / float64(raw),
		float64(shared.clients[0].wire) / float64(plain), float64(own.clients[0].wire) / float64(plain),
		epochs, len(shared.clients)
}
