package e2e

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Fan-out in the browser: one upstream for every tab, and Last-Event-ID
// reconnects answered from the replay cache for a backend that knows
// nothing of ids.

// TestFanoutOneUpstreamForAllTabs opens one stream in three tabs: the
// backend gets one request, and every tab dispatches every event, in
// order, with the same ids (the backend's where it sent one, the plugin's
// otherwise).
func TestFanoutOneUpstreamForAllTabs(t *testing.T) {
	requireBrowser(t)
	h := startCaddy(t, `{"handler":"sse","heartbeat":"1s","fanout":{"linger":"0s"}}`)
	name := uniqueName("fanout/tabs")
	path := "/sse/" + name
	f := h.backend.handleFeed(name)

	pages := make([]*page, 3)
	for i := range pages {
		pages[i] = newPage(t, h)
		pages[i].open(t, "s", path, "update")
	}
	for _, p := range pages {
		p.waitJS(t, "s", "streams.s.opens.length > 0", "EventSource open", 10*time.Second)
	}
	h.waitHub(t, path, "three clients on one hub", 5*time.Second, func(s hubStatus) bool { return s.Clients == 3 })

	f.emit(t,
		"data: one\n\n",
		"event: update\ndata: two\ndata: lines\n\n",
		"id: b-3\ndata: three\n\n",
		"data: four\n\n",
	)
	want := []event{msg("one", ""), typed("update", "two\nlines", ""), msg("three", "b-3"), msg("four", "")}
	var first []event
	for i, p := range pages {
		st := p.waitEvents(t, "s", len(want), 10*time.Second)
		if len(st.Errors) != 0 || len(st.Opens) != 1 {
			t.Errorf("tab %d: the stream broke or reconnected: %s", i, st.summary())
		}
		if !sameEvents(withoutIDs(st.Events), withoutIDs(want)) {
			t.Errorf("tab %d dispatched other events than the backend sent (types and data):%s", i, diffEvents(st.Events, want))
			continue
		}
		if got := st.Events[2].LastEventID; got != "b-3" {
			t.Errorf("tab %d: the event the backend sent with id b-3 has lastEventId %q", i, got)
		}
		for j, e := range st.Events {
			if e.LastEventID == "" {
				t.Errorf("tab %d: event #%d %v has no id: the plugin should have given it one", i, j, e)
			}
		}
		if first == nil {
			first = st.Events
		} else if !sameEvents(st.Events, first) {
			t.Errorf("tab %d saw other ids than tab 0 for the same events:%s", i, diffEvents(st.Events, first))
		}
	}
	if reqs := h.backend.requestsFor(name); len(reqs) != 1 {
		t.Errorf("the backend got %d requests for the stream, want 1 for all three tabs", len(reqs))
	}
	hub := h.waitHub(t, path, "the hub", time.Second, func(hubStatus) bool { return true })
	t.Logf("hub: %v", hub)
	if hub.Clients != 3 || hub.Events != int64(len(want)) {
		t.Errorf("hub = %v, want 3 clients and %d events", hub, len(want))
	}
}

// TestFanoutFirstClientGetsEventsSentOnConnect: many backends send
// something the moment a client connects (the current state, a welcome
// event). With fan-out, the first client's request is the one that opens
// the upstream, so those events are an answer to it: the page must
// dispatch them as it does without the plugin. A hub that positions the
// client at the live end only after the upstream started streaming loses
// whatever the backend wrote in between.
func TestFanoutFirstClientGetsEventsSentOnConnect(t *testing.T) {
	requireBrowser(t)
	h := startCaddy(t, `{"handler":"sse","fanout":{"linger":"0s"}}`)
	p := newPage(t, h)
	want := []event{typed("snapshot", "state 1", ""), msg("hello", "")}
	// A few rounds, each on a stream of its own: whether the plugin loses
	// the events depends on how goroutines are scheduled.
	for round := range 5 {
		name := fmt.Sprintf("on-connect/%d", round)
		h.backend.handle(name, func(s *stream) {
			s.send("event: snapshot\ndata: state 1\n\n", "data: hello\n\n")
		})
		direct, sse := fmt.Sprintf("direct%d", round), fmt.Sprintf("sse%d", round)
		p.open(t, direct, "/direct/"+name, "snapshot")
		p.open(t, sse, "/sse/"+name, "snapshot")
		st := p.waitEvents(t, direct, len(want), 10*time.Second)
		if !sameEvents(st.Events, want) {
			t.Fatalf("without the plugin: %s", diffEvents(st.Events, want))
		}
		// The direct stream has both events: through the plugin they are
		// due at about the same time.
		deadline := time.Now().Add(3 * time.Second)
		for {
			st = p.state(t, sse)
			if len(st.Events) >= len(want) || time.Now().After(deadline) {
				break
			}
			time.Sleep(pollInterval)
		}
		if !sameEvents(withoutIDs(st.Events), withoutIDs(want)) {
			t.Fatalf("round %d: the first client of a fan-out stream did not get the events the backend sent as it connected "+
				"(got = through the plugin, want = without it):%s\n%s", round, diffEvents(st.Events, want), st.summary())
		}
		p.close(t, direct)
		p.close(t, sse)
	}
}

// uniqueName returns a stream name no other test of the process uses.
// Hubs outlive their test by their linger, and GET /sse/streams reports
// them by path only, so a repeated test (-count) must not reuse a path.
func uniqueName(prefix string) string {
	return fmt.Sprintf("%s-%d", prefix, streamNames.Add(1))
}

var streamNames atomic.Int64

// replayHandler is the configuration of the reconnect tests: fan-out whose
// hub outlives a client's reconnect (linger), and a short retry so the
// browser reconnects within half a second.
const replayHandler = `{"handler":"sse","heartbeat":"1s","retry":"500ms","fanout":{"linger":"10s"%s}}`

// lostConnection is a page whose stream goes through a cutter, for the
// tests that make the browser lose its connection.
type lostConnection struct {
	h    *harness
	c    *cutter
	p    *page
	net  *netLog
	f    *feed
	name string // the backend's stream
	path string // the page's URL path
}

func newLostConnection(t *testing.T, fanoutExtra, name string, types ...string) *lostConnection {
	h := startCaddy(t, fmt.Sprintf(replayHandler, fanoutExtra))
	lc := &lostConnection{h: h, name: name, path: "/sse/" + name}
	lc.f = h.backend.handleFeed(name)
	lc.c = startCutter(t, strings.TrimPrefix(h.base, "http://"))
	lc.p = newPageAt(t, h, lc.c.base())
	lc.net = lc.p.recordNetwork(t)
	lc.p.open(t, "s", lc.path, types...)
	lc.p.waitJS(t, "s", "streams.s.opens.length > 0", "EventSource open", 10*time.Second)
	return lc
}

// lose cuts the page's connection and waits until both sides noticed:
// the EventSource reports the error and will reconnect, and the hub has
// no client left. Its reconnect waits in the cutter until restore.
func (lc *lostConnection) lose(t *testing.T) {
	t.Helper()
	if n := lc.c.cut(); n == 0 {
		t.Fatal("cutter: no browser connection to cut")
	}
	st := lc.p.waitErrors(t, "s", 1, 5*time.Second)
	if rs := st.Errors[0].ReadyState; rs != 0 {
		t.Fatalf("after the cut, EventSource readyState = %d, want 0 (reconnecting)", rs)
	}
	lc.h.waitHub(t, lc.path, "the plugin saw the client go", 5*time.Second, func(s hubStatus) bool { return s.Clients == 0 })
}

// checkBackendRequests checks that the backend got one request, the
// hub's, without Last-Event-ID: all replay came from the cache.
func (lc *lostConnection) checkBackendRequests(t *testing.T) {
	t.Helper()
	reqs := lc.h.backend.requestsFor(lc.name)
	if len(reqs) != 1 {
		t.Errorf("the backend got %d requests for the stream, want 1 (the hub's)", len(reqs))
	}
	for i, r := range reqs {
		if id := r.Get("Last-Event-ID"); id != "" {
			t.Errorf("backend request #%d carried Last-Event-ID %q: a backend without ids must never see one", i, id)
		}
	}
}

// checkReconnectAsked checks that the browser made two requests for the
// stream, the second with Last-Event-ID lastID.
func (lc *lostConnection) checkReconnectAsked(t *testing.T, lastID string) {
	t.Helper()
	list := lc.net.waitExchanges(t, lc.path, 2, 5*time.Second)
	for _, ex := range list {
		t.Logf("browser: %v", ex)
	}
	if len(list) != 2 {
		t.Errorf("the browser made %d requests for %s, want 2 (connect, reconnect)", len(list), lc.path)
		return
	}
	if got := list[1].RequestHeaders.Get("Last-Event-ID"); got != lastID {
		t.Errorf("the browser reconnected with Last-Event-ID %q, want %q (the id of the last event it got)", got, lastID)
	}
}

// TestReplayAfterLostConnection: a backend that sends no ids and ignores
// Last-Event-ID, behind fan-out. The page gets events 1-3, loses its
// connection (the TCP connection is cut under it), the backend sends 4-6
// while the page is away, and EventSource reconnects by itself with the
// id the plugin gave event 3. The page must end up with 1..7 (7 sent live
// after the reconnect), each once, in order, while the backend got one
// request: 4-6 came from the replay cache.
func TestReplayAfterLostConnection(t *testing.T) {
	requireBrowser(t)
	lc := newLostConnection(t, "", uniqueName("replay/legacy"))
	data := func(n int) string { return fmt.Sprintf("data: %d\n\n", n) }

	lc.f.emit(t, data(1), data(2), data(3))
	st := lc.p.waitEvents(t, "s", 3, 5*time.Second)
	lastID := st.Events[2].LastEventID
	if lastID == "" {
		t.Fatalf("event 3 has no id: the plugin should have given it one; %s", st.summary())
	}

	lc.lose(t)
	lc.f.emit(t, data(4), data(5), data(6))
	lc.h.waitHub(t, lc.path, "events 4-6 in the hub", 5*time.Second, func(s hubStatus) bool { return s.Events == 6 })
	if st := lc.p.state(t, "s"); len(st.Events) != 3 || len(st.Opens) != 1 {
		t.Fatalf("the page got events or reconnected while its connection was held: %s", st.summary())
	}
	t.Logf("reconnects held by the cutter: %d", lc.c.heldConns())
	lc.c.resume()

	lc.p.waitEvents(t, "s", 6, 10*time.Second)
	lc.f.emit(t, data(7))
	st = lc.p.waitEvents(t, "s", 7, 5*time.Second)
	t.Logf("%s", st.summary())

	var got []string
	ids := map[string]bool{}
	for _, e := range st.Events {
		got = append(got, e.Data)
		if e.LastEventID == "" || ids[e.LastEventID] {
			t.Errorf("event %v: want a non-empty id of its own", e)
		}
		ids[e.LastEventID] = true
	}
	if strings.Join(got, " ") != "1 2 3 4 5 6 7" {
		t.Errorf("the page dispatched %q, want 1 to 7, each once, in order", got)
	}
	if len(st.Opens) != 2 || len(st.Errors) != 1 {
		t.Errorf("want one lost connection and one reconnect: %d opens, %d errors", len(st.Opens), len(st.Errors))
	}
	lc.checkBackendRequests(t)
	lc.checkReconnectAsked(t, lastID)
	if n := lc.h.metric(t, `caddy_sse_replay_requests_total{result="served"}`); n != 1 {
		t.Errorf("replay requests served from the cache = %v, want 1", n)
	}
	if n := lc.h.metric(t, `caddy_sse_events_replayed_total`); n != 3 {
		t.Errorf("events replayed from the cache = %v, want 3 (4, 5, 6)", n)
	}
}

// TestUnknownLastEventIDGetsReset: the cache holds two events; the page
// gets event 1, loses its connection, and the backend sends 2-5 while it
// is away, so event 1 is evicted. EventSource reconnects with event 1's
// id, which the cache no longer has: the page gets an sse-reset event
// whose data is that id (never a resend of whatever the cache holds),
// then the live stream.
func TestUnknownLastEventIDGetsReset(t *testing.T) {
	requireBrowser(t)
	lc := newLostConnection(t, `,"buffer_events":2`, uniqueName("replay/evicted"), "sse-reset")
	data := func(n int) string { return fmt.Sprintf("data: %d\n\n", n) }

	lc.f.emit(t, data(1))
	st := lc.p.waitEvents(t, "s", 1, 5*time.Second)
	lastID := st.Events[0].LastEventID
	if lastID == "" {
		t.Fatalf("event 1 has no id: the plugin should have given it one; %s", st.summary())
	}

	lc.lose(t)
	lc.f.emit(t, data(2), data(3), data(4), data(5))
	lc.h.waitHub(t, lc.path, "events 2-5 in the hub", 5*time.Second, func(s hubStatus) bool { return s.Events == 5 })
	lc.c.resume()

	lc.p.waitType(t, "s", "sse-reset", 10*time.Second)
	lc.f.emit(t, data(6))
	st = lc.p.waitJS(t, "s", `streams.s.events.some(e => e.data === "6")`, "event 6 on s", 5*time.Second)
	t.Logf("%s", st.summary())

	want := []event{msg("1", ""), typed("sse-reset", lastID, ""), msg("6", "")}
	if !sameEvents(withoutIDs(st.Events), withoutIDs(want)) {
		t.Errorf("the page dispatched other events than expected (types and data):%s", diffEvents(st.Events, want))
	}
	if e := st.Events[len(st.Events)-1]; e.LastEventID == "" || e.LastEventID == lastID {
		t.Errorf("event 6 has lastEventId %q: want an id of its own", e.LastEventID)
	}
	lc.checkBackendRequests(t)
	lc.checkReconnectAsked(t, lastID)
	if n := lc.h.metric(t, `caddy_sse_replay_requests_total{result="missed"}`); n != 1 {
		t.Errorf("replay requests missed = %v, want 1", n)
	}
}
