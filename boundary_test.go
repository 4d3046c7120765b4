package caddysse

import (
	"bufio"
	"bytes"
	"testing"
	"time"
)

// blankLines counts the blank lines of an event stream: the dispatch
// boundaries a client sees (fetch-event-source dispatches a message at
// every one, comment-only blocks included).
func blankLines(stream []byte) int {
	sc := bufio.NewScanner(bytes.NewReader(stream))
	sc.Buffer(make([]byte, 1<<16), 1<<24)
	sc.Split(splitSSELines)
	n := 0
	for sc.Scan() {
		if len(sc.Bytes()) == 0 {
			n++
		}
	}
	return n
}

// TestPluginAddsNoDispatchBoundary: what the plugin writes of its own
// (padding, the retry hint at the start and at the end, heartbeats) are
// lines without a blank line: a client sees exactly as many dispatch
// boundaries as the backend sent, in pass-through and in fan-out (a
// handed-over HTTP/1.1 client and an HTTP/2 one served on its request).
func TestPluginAddsNoDispatchBoundary(t *testing.T) {
	own := map[string]any{"padding": 512, "retry": "1s", "heartbeat": "1s", "heartbeat_comment": "hb", "max_age": "3s"}
	check := func(t *testing.T, name string, got []byte) {
		t.Helper()
		if !bytes.Contains(got, []byte(": hb\n")) || !bytes.Contains(got, []byte("retry: 1000\n")) {
			t.Fatalf("%s: no heartbeat or retry hint in %q", name, got)
		}
		if n := blankLines(got); n != 1 {
			t.Fatalf("%s: %d blank lines, want the backend's 1: %q", name, n, got)
		}
	}
	t.Run("pass-through", func(t *testing.T) {
		checkNoLeak(t)
		b := newScriptedBackend(t)
		base := startCaddy(t, route("/events", sseHandler(own), proxyTo(b.Addr)))
		c := openStream(t, base+"/events", false)
		b.send(t, "data: a\n\n")
		check(t, "pass-through", c.waitEOF(t, 5*time.Second))
		b.handlerReturned(t, 5*time.Second)
	})
	t.Run("fan-out", func(t *testing.T) {
		checkNoLeak(t)
		e := newEmitter(t)
		base := startCaddy(t, fanoutRoute(e, own))
		h1 := openStream(t, base+"/events", false)
		h2 := openStream(t, base+"/events", true)
		e.waitJoined(t, 1)
		h1.waitFor(t, 5*time.Second, "the prelude", func(b []byte) bool { return bytes.Contains(b, []byte("retry: 1000\n")) })
		h2.waitFor(t, 5*time.Second, "the prelude", func(b []byte) bool { return bytes.Contains(b, []byte("retry: 1000\n")) })
		e.emit("data: a\n\n")
		check(t, "HTTP/1.1", h1.waitEOF(t, 5*time.Second))
		check(t, "HTTP/2", h2.waitEOF(t, 5*time.Second))
	})
}
