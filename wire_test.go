package caddysse

import (
	"io"
	"net"
	"testing"
	"time"
)

// What is flushed while a drain runs goes out after it, in order, and a
// close waits for both. net.Pipe has no socket of its own, so every flush
// is a drain, and a pipe nobody reads keeps it running.
func TestWireConnQueuesBehindDrainAndClosesAfter(t *testing.T) {
	server, client := net.Pipe()
	defer client.Close()
	drained := make(chan struct{}, 10)
	w := newWireConn(server, 5*time.Second, func() { drained <- struct{}{} })
	if w.try != nil {
		t.Fatal("a pipe has no socket: every write should be a drain")
	}
	for _, p := range []string{"first ", "second ", "third"} {
		if _, err := w.Write([]byte(p)); err != nil {
			t.Fatal(err)
		}
		if err := w.FlushError(); err != nil {
			t.Fatal(err)
		}
	}
	if !w.draining() {
		t.Fatal("nothing read yet, and no drain running")
	}
	w.close() // must wait for the drain and what is queued behind it
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "first second third" {
		t.Fatalf("got %q", got)
	}
	if w.draining() || w.failed() != nil {
		t.Fatalf("after the drain: draining %v, failed %v", w.draining(), w.failed())
	}
}

// A drain that cannot write within the timeout fails the connection.
func TestWireConnDrainTimesOut(t *testing.T) {
	server, client := net.Pipe()
	defer client.Close()
	drained := make(chan struct{}, 1)
	w := newWireConn(server, 50*time.Millisecond, func() { drained <- struct{}{} })
	w.Write([]byte("never read"))
	if err := w.FlushError(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-drained:
	case <-time.After(5 * time.Second):
		t.Fatal("the drain did not end at its write timeout")
	}
	if err := w.failed(); err == nil {
		t.Fatal("a drain past its write timeout did not fail")
	}
	w.abort()
}
