package main

import (
	"context"
	"net"
	"testing"
	"time"
)

// TestEmitterToClients runs the emitter and the load generator against each
// other, without a proxy: every client must get every event published while
// it was connected, and closing must end every goroutine.
func TestEmitterToClients(t *testing.T) {
	em, err := startEmitter()
	if err != nil {
		t.Fatal(err)
	}
	defer em.close()
	stats := newLoadStats()
	gen := newLoadGen(clientConfig{addr: em.addr, path: "/events", dialTO: 5 * time.Second,
		srcAddrs: []net.IP{net.IPv4(127, 0, 0, 2), net.IPv4(127, 0, 0, 3)}}, stats)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	const n = 20
	if err := gen.ramp(ctx, n, 0); err != nil {
		t.Fatal(err)
	}
	if stats.connected.Load() != n {
		t.Fatalf("%d connected, want %d (first error: %s)", stats.connected.Load(), n, stats.firstErr)
	}
	// Wait until the emitter streams to all of them, then publish.
	for deadline := time.Now().Add(3 * time.Second); em.open.Load() != n; {
		if time.Now().After(deadline) {
			t.Fatalf("emitter has %d open streams, want %d", em.open.Load(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	stats.openWindow(0)
	const events = 30
	for i := uint64(1); i <= events; i++ {
		em.publish(eventFrame(i, 1, 200), i)
	}
	em.publish(eventFrame(events+1, 3, 200), events+3) // a burst frame of 3 events
	for deadline := time.Now().Add(3 * time.Second); stats.delivered.Load() != n*(events+3); {
		if time.Now().After(deadline) {
			t.Fatalf("delivered %d, want %d", stats.delivered.Load(), n*(events+3))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if stats.lost.Load() != 0 || stats.dups.Load() != 0 {
		t.Errorf("lost %d, dups %d", stats.lost.Load(), stats.dups.Load())
	}
	if stats.lat.count() != n*(events+3) || stats.lat.maxValue() <= 0 {
		t.Errorf("latency: %d samples, max %v", stats.lat.count(), stats.lat.maxValue())
	}
	gen.closeAll(3 * time.Second)
	if stats.disconnect.Load() != 0 {
		t.Errorf("closing counted %d disconnects", stats.disconnect.Load())
	}
	if !em.waitIdle(3 * time.Second) {
		t.Error("emitter connections stayed open after the clients left")
	}
	if em.accepted.Load() != n {
		t.Errorf("accepted %d", em.accepted.Load())
	}
}

// TestEmitterDropsLaggards: a connection that falls a whole ring behind is
// dropped, not buffered without bound.
func TestEmitterDropsLaggards(t *testing.T) {
	em, err := startEmitter()
	if err != nil {
		t.Fatal(err)
	}
	defer em.close()
	c, err := net.Dial("tcp", em.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// (No small SetReadBuffer here: on loopback, a receive window below
	// the MSS stalls the sender on persist timers.)
	c.Write([]byte("GET /events HTTP/1.1\r\nHost: x\r\n\r\n"))
	for deadline := time.Now().Add(3 * time.Second); em.open.Load() != 1; {
		if time.Now().After(deadline) {
			t.Fatal("stream did not open")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Never read: 800 MB of frames overflow the socket buffers (tens of
	// MB at most), the writer blocks, the ring wraps.
	big := eventFrame(1, 100, 1000)
	for i := 0; i < 2*emitterRing; i++ {
		em.publish(big, uint64(i))
	}
	// Unblock the writer by reading once; it must then notice the lag.
	buf := make([]byte, 1<<20)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	for em.lagged.Load() == 0 {
		if _, err := c.Read(buf); err != nil {
			break
		}
	}
	if em.lagged.Load() != 1 {
		t.Errorf("lagged = %d, want 1", em.lagged.Load())
	}
}

func TestChunk(t *testing.T) {
	if got := string(chunk([]byte("hello, world\n\n"))); got != "e\r\nhello, world\n\n\r\n" {
		t.Errorf("got %q", got)
	}
}
