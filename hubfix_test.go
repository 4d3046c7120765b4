package caddysse

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// naiveEvents splits a stream the way some clients do (r3labs/sse):
// at the first of "\r\n\r\n", "\n\n" or "\r\r", not by the spec's line
// rules; it returns the blocks that hold a data line.
func naiveEvents(stream []byte) []string {
	var blocks []string
	for len(stream) > 0 {
		end, sep := len(stream), 0
		for _, d := range []string{"\r\n\r\n", "\n\n", "\r\r"} {
			if i := bytes.Index(stream, []byte(d)); i >= 0 && i < end {
				end, sep = i, len(d)
			}
		}
		if sep == 0 {
			break // unfinished
		}
		if b := string(stream[:end]); strings.Contains(b, "data:") {
			blocks = append(blocks, b)
		}
		stream = stream[end+sep:]
	}
	return blocks
}

// The ids the plugin adds end like the event's own lines, and events stay
// apart for clients that split on blank lines naively, whether the
// backend ends its lines with LF, CRLF or a lone CR (issue #11, item 10).
func TestFanoutIDsFitLineEndings(t *testing.T) {
	for name, eol := range map[string]string{"LF": "\n", "CRLF": "\r\n", "CR": "\r"} {
		t.Run(name, func(t *testing.T) {
			e := newEmitter(t)
			base := startCaddy(t, fanoutRoute(e, nil))
			c := openStream(t, base+"/events", false)
			e.waitJoined(t, 1)
			for i := range 3 {
				e.emit(fmt.Sprintf("event: e%[2]sdata: %[1]d%[2]s%[2]s", i, eol))
			}
			e.emit(fmt.Sprintf("id: own%[1]sevent: e%[1]sdata: 3%[1]s%[1]s", eol)) // passed as is
			evs := waitEvents(t, c, 4)
			if d := datas(evs); d != "0,1,2,3" {
				t.Fatalf("events %q", d)
			}
			for _, ev := range evs {
				if ev.ID == "" || ev.Type != "e" {
					t.Fatalf("event without an id: %+v", evs)
				}
			}
			got := c.bytes()
			for _, ev := range naiveEvents(got) {
				// The plugin's heartbeat lines (LF) may join a block.
				ev = strings.ReplaceAll(ev, ": heartbeat\n", "")
				if strings.ContainsAny(strings.ReplaceAll(ev, eol, ""), "\r\n") {
					t.Fatalf("an event's lines mix line endings: %q", ev)
				}
			}
			if n := naiveEvents(got); len(n) != 4 {
				t.Fatalf("a naive client splits %q into %d events: %q", got, len(n), n)
			}
		})
	}
}

// An empty id from the backend (r3labs/sse writes "id: " on every event)
// does not make it a backend with ids: under ids auto, clients get ids of
// the plugin's, so that they can resume (issue #11, item 10).
func TestFanoutEmptyBackendIDIsNoID(t *testing.T) {
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, nil))
	c := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	for i := range 3 {
		e.emit(fmt.Sprintf("id: \ndata: %d\n\n", i))
	}
	evs := waitEvents(t, c, 3)
	if evs[0].ID == "" || evs[1].ID == evs[0].ID {
		t.Fatalf("no ids of the plugin's for a backend sending empty ids: %+v", evs)
	}
	back := openStream(t, base+"/events", false, "Last-Event-ID", evs[0].ID)
	if d := datas(waitEvents(t, back, 2)); d != "1,2" {
		t.Fatalf("resume after %q gave %q", evs[0].ID, d)
	}
}

// The backend's last retry reaches clients that join after it was sent,
// right after the prelude (issue #11, item 9).
func TestFanoutJoinerGetsBackendRetry(t *testing.T) {
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, map[string]any{"padding": 16}))
	a := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	e.emit("retry: 3000\ndata: x\n\n")
	waitEvents(t, a, 1)
	b := openStream(t, base+"/events", false)
	waitHubClients(t, base, 2)
	e.emit("data: y\n\n")
	waitEvents(t, b, 1)
	got := string(b.bytes())
	if pad := 16; len(got) < pad || !strings.HasPrefix(got[pad:], "retry: 3000\n") {
		t.Fatalf("a client joining after the backend's retry got %q", got)
	}
}

// When the upstream of a backend without ids is re-opened, what it sent
// meanwhile is lost: connected clients get the reset event, with the last
// id before the gap (with an id of its own, so clients resume after it). A backend
// with ids is resumed with Last-Event-ID: no reset (issue #11, item 5).
func TestFanoutGapIsNeverSilent(t *testing.T) {
	for _, withIDs := range []bool{false, true} {
		t.Run(fmt.Sprintf("ids=%v", withIDs), func(t *testing.T) {
			checkNoLeak(t)
			e := newEmitter(t)
			base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"reset_event": "gap"}}))
			a := openStream(t, base+"/events", false)
			b := openStream(t, base+"/events", true)
			e.waitJoined(t, 1)
			ev := func(i int) string {
				if withIDs {
					return fmt.Sprintf("id: b%d\ndata: %d\n\n", i, i)
				}
				return fmt.Sprintf("data: %d\n\n", i)
			}
			for i := range 2 {
				e.emit(ev(i))
			}
			before := waitEvents(t, a, 2)
			waitEvents(t, b, 2)
			e.kill()
			e.restart()
			e.waitJoined(t, 1)
			e.emit(ev(2))
			for _, c := range []*client{a, b} {
				if !withIDs {
					evs := waitEvents(t, c, 4)
					if gap := evs[2]; gap.Type != "gap" || gap.Data != before[1].ID || datas(evs) != "0,1,"+before[1].ID+",2" {
						t.Fatalf("client saw %+v, want a gap event after %q", evs, before[1].ID)
					}
					if evs[2].ID == "" || evs[3].ID == evs[2].ID {
						t.Fatalf("the reset event and the events after it need ids of their own: %+v", evs)
					}
					continue
				}
				if evs := waitEvents(t, c, 3); datas(evs) != "0,1,2" {
					t.Fatalf("client of a backend with ids saw %+v", evs)
				}
			}
			if got := e.reqs[1].Header.Get("Last-Event-ID"); withIDs && got != "b1" {
				t.Fatalf("the upstream was re-opened with Last-Event-ID %q", got)
			}
		})
	}
}

// scriptedFanout is /events through sse with fan-out (linger 0) to a
// scripted backend, with extra fanout options.
func scriptedFanout(b *scriptedBackend, fanout map[string]any) string {
	fo := map[string]any{"linger": 0}
	for k, v := range fanout {
		fo[k] = v
	}
	return route("/events", sseHandler(map[string]any{"padding": 0, "heartbeat": "1s", "fanout": fo}), proxyTo(b.Addr))
}

// A backend response that ends cleanly by design ends its clients' streams
// (with the backend's retry) instead of being re-opened and republished;
// the next client opens it again (issue #11, item 8).
func TestFanoutHonoursBackendEnd(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddy(t, scriptedFanout(b, nil))
	c1 := openStream(t, base+"/events", false)
	b.request(t)
	c2 := openStream(t, base+"/events", false)
	waitHubClients(t, base, 2)
	b.send(t, "retry: 2500\ndata: 1\n\n", "data: 2\n\n")
	b.end(t)
	for _, c := range []*client{c1, c2} {
		got := c.waitEOF(t, 5*time.Second)
		if c.err != io.EOF {
			t.Fatalf("stream ended with %v, want a clean end", c.err)
		}
		if evs, _, _ := parseEvents(got); datas(evs) != "1,2" || !bytes.HasSuffix(got, []byte("retry: 2500\n")) {
			t.Fatalf("client got %q", got)
		}
	}
	// The next client opens the backend again.
	c3 := openStream(t, base+"/events", false)
	b.request(t)
	b.send(t, "data: again\n\n")
	if evs := waitEvents(t, c3, 1); evs[0].Data != "again" {
		t.Fatalf("got %+v", evs)
	}
}

// A backend with ids that ends cleanly is resumed with Last-Event-ID
// (on_end auto), as is an id-less one under on_end reconnect; an end in
// the middle of an event is a failure, always reconnected. Clients stay.
// Only the failure of an id-less backend is a gap: its clients get the
// reset event (data: the last id before the gap) before the events of the
// new connection. A clean end, or a backend with ids that resumes, is no
// gap: no reset event. Every case waits for exactly the events due, so a
// missing or extra reset event fails it whatever the timing.
func TestFanoutReconnectsResumableEnd(t *testing.T) {
	for name, tc := range map[string]struct {
		onEnd, last, lastID string
		gap                 bool // the reset event is due before "more"
	}{
		"ids":        {"", "id: 7\ndata: x\n\n", "7", false},
		"reconnect":  {"reconnect", "data: x\n\n", "", false},
		"partial":    {"", "data: x\n\ndata: cut", "", true},
		"partialIDs": {"", "id: 7\ndata: x\n\nid: 8\ndata: cut", "7", false},
	} {
		t.Run(name, func(t *testing.T) {
			b := newScriptedBackend(t)
			base := startCaddy(t, scriptedFanout(b, map[string]any{"on_end": tc.onEnd}))
			c := openStream(t, base+"/events", false)
			b.request(t)
			b.send(t, tc.last)
			waitEvents(t, c, 1)
			b.end(t)
			if got := b.request(t).Header.Get("Last-Event-ID"); got != tc.lastID {
				t.Fatalf("re-opened with Last-Event-ID %q, want %q", got, tc.lastID)
			}
			b.send(t, "data: more\n\n")
			// The reset event is published when the new connection's
			// header arrives, before any of its events: once "more" is
			// in, every event due is.
			c.waitFor(t, 5*time.Second, `"more"`, func(got []byte) bool {
				evs, _, _ := parseEvents(got)
				return len(evs) > 0 && evs[len(evs)-1].Data == "more"
			})
			evs := eventsOf(c)
			want := "x,more"
			if tc.gap {
				want = "x," + evs[0].ID + ",more"
			}
			if datas(evs) != want || (tc.gap && evs[1].Type != "sse-reset") {
				t.Fatalf("client got %+v, want the data %q", evs, want)
			}
		})
	}
}

// The upstream's reconnect delay doubles from the base while the backend
// keeps failing, up to 5s, and starts over once it sends an event, not
// after 10s of life; it is drawn from 0 up to that bound (full jitter).
// The test sees each bound and releases each attempt (issue #11, item 6).
func TestFanoutReconnectBackoff(t *testing.T) {
	checkNoLeak(t)
	bounds, release, done := make(chan time.Duration), make(chan struct{}), make(chan struct{})
	orig := reconnectJitter
	reconnectJitter = func(limit time.Duration) time.Duration {
		select {
		case bounds <- limit:
		case <-done:
			return 0
		}
		select {
		case <-release:
		case <-done:
		}
		return 0
	}
	t.Cleanup(func() { reconnectJitter = orig })
	e := newEmitter(t)
	base := startCaddy(t, fanoutRoute(e, nil))
	t.Cleanup(func() { close(done) })
	next := func() time.Duration {
		t.Helper()
		select {
		case d := <-bounds:
			return d
		case <-time.After(5 * time.Second):
			t.Fatal("the hub did not try to reconnect")
			return 0
		}
	}
	c := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	e.emit("data: 0\n\n")
	waitEvents(t, c, 1)
	e.kill()
	var got []time.Duration
	for range 6 {
		got = append(got, next())
		if len(got) < 6 {
			release <- struct{}{} // the backend is down: this attempt fails
		}
	}
	want := []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("reconnect bounds %v, want %v", got, want)
	}
	e.restart()
	release <- struct{}{}
	e.waitJoined(t, 1)
	e.emit("data: 1\n\n")
	waitEvents(t, c, 3) // 0, the reset event of the gap, 1
	e.kill()
	if d := next(); d != 500*time.Millisecond {
		t.Fatalf("after a stream that sent an event, the first bound is %v, want 500ms", d)
	}
	e.restart()
	release <- struct{}{}
	e.waitJoined(t, 1)
}

// A reload that changes heartbeat, buffer, ids and max_event_size keeps
// the hub and its cache: the old config's client resumes on the new one
// with nothing lost, the new settings apply to the hub, and no second
// hub opens another upstream (issue #11, item 7).
func TestFanoutReloadWithNewSettingsKeepsCache(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	caddyMu.Lock()
	defer caddyMu.Unlock()
	addr := freeAddr(t)
	load := func(fields map[string]any) {
		t.Helper()
		if err := caddy.Load(caddyConfig(addr, fanoutRoute(e, fields)), true); err != nil {
			t.Fatal(err)
		}
	}
	load(map[string]any{"heartbeat": "1s", "fanout": map[string]any{"linger": "2s"}})
	defer waitHubsGone(t, addr)
	defer caddy.Stop()
	base := "http://" + addr
	c := openStream(t, base+"/events", false)
	e.waitJoined(t, 1)
	e.emit("data: 0\n\n")
	evs := waitEvents(t, c, 1)
	load(map[string]any{"heartbeat": "7s", "max_event_size": 4096,
		"fanout": map[string]any{"linger": "2s", "buffer_events": 50, "ids": "synthesize"}})
	c.waitEOF(t, 5*time.Second)
	e.emit("data: 1\n\n")
	e.emit("data: 2\n\n")
	c2 := openStream(t, base+"/events", false, "Last-Event-ID", evs[0].ID)
	e.waitJoined(t, 1) // the new config's route takes the upstream over
	e.emit("data: 3\n\n")
	if d := datas(waitEvents(t, c2, 3)); d != "1,2,3" {
		t.Fatalf("after the reload the client got %q", d)
	}
	n := 0
	hubs.Range(func(k, v any) bool {
		if strings.Contains(k.(string), addr+"/") {
			n++
			hb := v.(*hub)
			hb.mu.Lock()
			cfg := hb.cfg
			hb.mu.Unlock()
			if cfg.heartbeat != 7*time.Second || cfg.limits.events != 50 || cfg.ids != "synthesize" || cfg.maxEventSize != 4096 {
				t.Errorf("the hub kept its old settings: %+v", cfg)
			}
		}
		return true
	})
	if n != 1 {
		t.Fatalf("%d hubs for one stream after the reload", n)
	}
	if !eventually(5*time.Second, func() bool { return e.connected() == 1 }) {
		t.Fatalf("%d upstream connections after the reload, want 1", e.connected())
	}
}
