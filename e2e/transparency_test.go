package e2e

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// endOfCase is written after every case's own bytes; the test waits for it
// instead of counting events, so a case that dispatches too many or too few
// events fails on the comparison rather than on a timeout.
const (
	endOfCaseType = "end-of-case"
	endOfCase     = "event: " + endOfCaseType + "\ndata: end\n\n"
)

// idlePause is longer than the 1s heartbeat of TestTransparency, so the
// plugin's heartbeat timer fires while the backend is silent in the middle
// of an event or between a CR and its LF.
const idlePause = 1500 * time.Millisecond

type transparencyCase struct {
	name  string
	types []string // custom event types the page listens for
	steps []any    // what the backend sends, see stream.send
	want  []event  // what EventSource dispatches straight from the backend
}

// msg is an expected "message" event.
func msg(data, id string) event { return event{Type: "message", Data: data, LastEventID: id} }

// typed is an expected event of a custom type.
func typed(typ, data, id string) event { return event{Type: typ, Data: data, LastEventID: id} }

var transparencyCases = []transparencyCase{
	{
		name:  "lf",
		steps: []any{"data: one\n\ndata: two\n\n"},
		want:  []event{msg("one", ""), msg("two", "")},
	},
	{
		name:  "crlf",
		steps: []any{"data: one\r\n\r\ndata: two\r\nid: 2\r\n\r\n"},
		want:  []event{msg("one", ""), msg("two", "2")},
	},
	{
		name:  "lone-cr",
		steps: []any{"data: one\r\rdata: two\rdata: three\r\r"},
		want:  []event{msg("one", ""), msg("two\nthree", "")},
	},
	{
		// Each CRLF is split between two writes: a reader that takes the
		// CR as a line end must not take the LF as a second (blank) one.
		name:  "crlf-split-across-writes",
		steps: []any{"data: a\r", "\ndata: b\r", "\n\r", "\n", "data: c\r\n\r", "\n"},
		want:  []event{msg("a\nb", ""), msg("c", "")},
	},
	{
		// Silences longer than the heartbeat interval inside an event:
		// after a CR whose LF comes later (a comment line there would make
		// the LF a blank line and dispatch "a" alone), in the middle of a
		// line, and after a CR that ends an event (the LF that follows must
		// not be taken for anything).
		name: "idle-mid-event",
		steps: []any{
			"data: a\r", idlePause, "\ndata: b\r\n\r", idlePause, "\ndata: he", idlePause, "llo\n\n",
		},
		want: []event{msg("a\nb", ""), msg("hello", "")},
	},
	{
		// Only a BOM at the very start of the stream is dropped; a later one
		// is part of a field name, so that field is ignored.
		name:  "bom",
		steps: []any{"\uFEFFdata: after bom\n\n", "\uFEFFdata: not a data field\n\ndata: last\n\n"},
		want:  []event{msg("after bom", ""), msg("last", "")},
	},
	{
		name:  "bom-split",
		steps: []any{"\xEF", "\xBB", "\xBFdata: bom in three writes\n\n"},
		want:  []event{msg("bom in three writes", "")},
	},
	{
		name:  "comments",
		steps: []any{": hello\n:\n:no space\ndata: a\n: between data lines\ndata: b\n\n: alone\n\n:\r\n\r\ndata: c\n\n"},
		want:  []event{msg("a\nb", ""), msg("c", "")},
	},
	{
		name:  "multi-line-data",
		steps: []any{"data: line1\ndata: line2\ndata:\ndata\ndata:  two spaces\ndata:no space\ndata: tail \n\n"},
		want:  []event{msg("line1\nline2\n\n\n two spaces\nno space\ntail ", "")},
	},
	{
		name:  "empty-data",
		steps: []any{"data\n\ndata:\n\ndata: \n\n"},
		want:  []event{msg("", ""), msg("", ""), msg("", "")},
	},
	{
		name:  "unknown-fields",
		steps: []any{"foo: bar\ndata: a\nData: not data\nDATA: nor this\nfield\n\nfoo: only unknown\n\ndata: b\n\n"},
		want:  []event{msg("a", ""), msg("b", "")},
	},
	{
		// The type applies to one event; "event:" with no value and an
		// event without data (not dispatched) reset it to "message".
		name:  "event-types",
		types: []string{"alpha", "beta"},
		steps: []any{"event: alpha\ndata: 1\n\nevent: beta\ndata: 2\n\ndata: 3\n\nevent:\ndata: 4\n\nevent: beta\n\ndata: 5\n\nevent:alpha\ndata: 6\n\n"},
		want: []event{
			typed("alpha", "1", ""), typed("beta", "2", ""), msg("3", ""),
			msg("4", ""), msg("5", ""), typed("alpha", "6", ""),
		},
	},
	{
		// The last event ID carries over, an id-only event sets it without a
		// dispatch, "id" and "id:" reset it, an id with NUL is ignored.
		name: "ids",
		steps: []any{
			"id: 1\ndata: a\n\ndata: b\n\nid: 2\n\ndata: c\n\nid\ndata: d\n\nid: 3\ndata: e\n\n",
			"id:\ndata: f\n\nid: 4\n\nid: x\x00y\ndata: g\n\nid: 5\nid: 6\ndata: h\n\nid:  spaced \ndata: i\n\n",
		},
		want: []event{
			msg("a", "1"), msg("b", "1"), msg("c", "2"), msg("d", ""), msg("e", "3"),
			msg("f", ""), msg("g", "4"), msg("h", "6"), msg("i", " spaced "),
		},
	},
	{
		// retry changes only the reconnection delay, never the events;
		// invalid values are ignored.
		name:  "retry",
		steps: []any{"retry: 5000\ndata: a\n\nretry: abc\ndata: b\n\nretry\n\nretry: 1000\n\ndata: c\nretry: 7\n\n"},
		want:  []event{msg("a", ""), msg("b", ""), msg("c", "")},
	},
	{
		// Non-ASCII text, with a four-byte and a three-byte character split
		// across writes.
		name:  "non-ascii",
		types: []string{"ünïcødé"},
		steps: []any{
			"data: héllo 😀 日本語 한국어 Ω\n\n",
			"event: ünïcødé\nid: 🆔\ndata: 🎉\n\n",
			"data: split ", "😀"[:2], "😀"[2:] + " and 日"[:6], " and 日"[6:] + "本\n\n",
		},
		want: []event{
			msg("héllo 😀 日本語 한국어 Ω", ""),
			typed("ünïcødé", "🎉", "🆔"),
			msg("split 😀 and 日本", "🆔"),
		},
	},
	{
		// Every byte its own write and flush, through a BOM, CRLF, lone CR,
		// a comment and multi-byte characters.
		name:  "byte-by-byte",
		types: []string{"alpha"},
		steps: []any{eachByte("\uFEFFid: b1\r\nevent: alpha\r\ndata: 逐字 🐢\r\ndata: second\r\r: comment\ndata: x\n\nid\rdata: y\r\n\r\n")},
		want:  []event{typed("alpha", "逐字 🐢\nsecond", "b1"), msg("x", "b1"), msg("y", "")},
	},
	{
		name:  "large-event",
		steps: []any{"data: ", strings.Repeat("x", 64<<10), strings.Repeat("y", 64<<10), "\ndata: end\n\n", "data: small\n\n"},
		want:  []event{msg(strings.Repeat("x", 64<<10)+strings.Repeat("y", 64<<10)+"\nend", ""), msg("small", "")},
	},
}

// TestTransparency shows that in pass-through mode the plugin changes
// nothing EventSource can see: for streams that exercise every parsing rule
// of the event-stream format, the events the browser dispatches through
// the plugin (heartbeat 1s, padding on) are the events it dispatches from
// the same backend without it, in the same order with the same type, data
// and lastEventId.
func TestTransparency(t *testing.T) {
	requireBrowser(t)
	h := startCaddy(t, `{"handler":"sse","heartbeat":"1s","padding":2048}`)
	p := newPage(t, h)
	for _, c := range transparencyCases {
		t.Run(c.name, func(t *testing.T) { runTransparencyCase(t, h, p, c, transparencyRun{}) })
	}
}

// TestTransparencyAllFeatures runs the transparency cases with every
// feature of the plugin on at once: heartbeat 1s, padding, compression
// (each encoding forced by the compress list, and checked on the wire)
// and fan-out (linger 0, one hub per case: every case has its own URL).
// EventSource must dispatch the same events, in the same order, with the
// same type and data as straight from the backend. Ids: where an event
// carries the backend's own id field, lastEventId is the backend's; every
// other event gets an id from the plugin (ids auto), so its lastEventId
// must be non-empty and unlike any other the plugin made.
func TestTransparencyAllFeatures(t *testing.T) {
	requireBrowser(t)
	for _, enc := range []string{"zstd", "gzip"} {
		t.Run(enc, func(t *testing.T) {
			h := startCaddy(t, fmt.Sprintf(
				`{"handler":"sse","heartbeat":"1s","padding":2048,"compress":[%q],"fanout":{"linger":"0s"}}`, enc))
			p := newPage(t, h)
			run := transparencyRun{fanout: true, encoding: enc, net: p.recordNetwork(t)}
			for _, c := range transparencyCases {
				t.Run(c.name, func(t *testing.T) { runTransparencyCase(t, h, p, c, run) })
			}
		})
	}
}

// transparencyRun is how the /sse route of a transparency run is set up.
type transparencyRun struct {
	fanout   bool    // fan-out with ids auto: events without an id get one
	encoding string  // with net: the Content-Encoding the /sse stream must come with
	net      *netLog // the page's network log
}

func runTransparencyCase(t *testing.T, h *harness, p *page, c transparencyCase, run transparencyRun) {
	name := "transparency/" + c.name
	// With fan-out, a client gets the events the hub publishes once it is
	// attached, and the backend writes its first events at once: the
	// backend waits until both EventSources are open, so that these cases
	// test what the plugin makes of the events, not when the page attached
	// (TestFanoutFirstClientGetsEventsSentOnConnect is about that).
	start := make(chan struct{})
	if !run.fanout {
		close(start)
	}
	h.backend.handle(name, func(s *stream) {
		select {
		case <-start:
		case <-s.r.Context().Done():
			return
		case <-s.quit:
			return
		}
		if s.send(c.steps...) {
			s.send(endOfCase)
		}
	})
	types := append(slices.Clone(c.types), endOfCaseType)
	// Both at once: two connections, well under Chromium's six per origin.
	p.open(t, "direct", "/direct/"+name, types...)
	p.open(t, "sse", "/sse/"+name, types...)
	if run.fanout {
		p.waitJS(t, "sse", `streams.direct.opens.length > 0 && streams.sse.opens.length > 0`, "both EventSources open", 10*time.Second)
		close(start)
	}

	timeout := 10 * time.Second
	direct := p.waitType(t, "direct", endOfCaseType, timeout)
	sse := p.waitType(t, "sse", endOfCaseType, timeout)

	for _, st := range []streamState{direct, sse} {
		if len(st.Errors) > 0 || len(st.Opens) != 1 {
			t.Errorf("the stream broke or reconnected: %s", st.summary())
		}
	}
	if n := len(h.backend.requestsFor(name)); n != 2 {
		t.Errorf("backend got %d requests for %s, want 2 (one per EventSource, no reconnects)", n, name)
	}
	gotDirect, gotSSE := beforeEndOfCase(direct.Events), beforeEndOfCase(sse.Events)
	if !sameEvents(gotDirect, c.want) {
		// The premise of the test, not the plugin: what this browser makes
		// of the stream is not what the case expects.
		t.Errorf("without the plugin, EventSource dispatched other events than the case expects:%s", diffEvents(gotDirect, c.want))
	}
	if run.net != nil {
		path := "/sse/" + name
		for _, ex := range run.net.waitExchanges(t, path, 1, timeout) {
			if got := ex.ResponseHeaders.Get("Content-Encoding"); got != run.encoding {
				t.Errorf("%s came with Content-Encoding %q, want %q: %v", path, got, run.encoding, ex)
			}
		}
	}
	if !run.fanout {
		if !sameEvents(gotSSE, gotDirect) {
			t.Errorf("through the plugin, EventSource dispatched other events than straight from the backend (got = /sse, want = /direct):%s",
				diffEvents(gotSSE, gotDirect))
		}
		return
	}

	// Fan-out: the same events apart from the ids the plugin adds.
	ref := referenceEvents(c.steps)
	if !sameEvents(eventsOf(ref), c.want) {
		t.Fatalf("test bug: the reference parser disagrees with the case:%s", diffEvents(eventsOf(ref), c.want))
	}
	if !sameEvents(withoutIDs(gotSSE), withoutIDs(gotDirect)) {
		t.Fatalf("through the plugin, EventSource dispatched other events than straight from the backend (types and data; got = /sse, want = /direct):%s",
			diffEvents(gotSSE, gotDirect))
	}
	synthesized := map[string]int{}
	for i, e := range gotSSE {
		if ref[i].ownID {
			if e.LastEventID != gotDirect[i].LastEventID {
				t.Errorf("event #%d %v: the backend sent it with an id field, and without the plugin its lastEventId is %q",
					i, e, gotDirect[i].LastEventID)
			}
			continue
		}
		if e.LastEventID == "" {
			t.Errorf("event #%d %v: the backend sent no id with it, and the plugin gave it none", i, e)
			continue
		}
		if j, dup := synthesized[e.LastEventID]; dup {
			t.Errorf("events #%d and #%d got the same id %q from the plugin", j, i, e.LastEventID)
		}
		synthesized[e.LastEventID] = i
	}
	if t.Failed() {
		t.Logf("got (/sse):%s", diffEvents(gotSSE, gotDirect))
	}
}

// refEvent is an event a conforming parser dispatches, and whether the
// block that dispatched it had a valid, non-empty id field of its own
// (which the plugin must keep). An event without one gets an id from the
// plugin in fan-out (ids auto), as does one whose id field is ignored for
// holding a NUL, and one with an empty id field: r3labs/sse writes "id: "
// on every event, which names nothing a client could resume from.
type refEvent struct {
	event
	ownID bool
}

// referenceEvents parses what a transparency case's backend sends the way
// the HTML standard's event-stream interpretation does.
func referenceEvents(steps []any) []refEvent {
	var b strings.Builder
	for _, s := range steps {
		switch v := s.(type) {
		case string:
			b.WriteString(v)
		case eachByte:
			b.WriteString(string(v))
		}
	}
	stream := strings.TrimPrefix(b.String(), "\uFEFF")
	var (
		out               []refEvent
		data, typ, lastID string
		ownID             bool
	)
	for stream != "" {
		end := strings.IndexAny(stream, "\r\n")
		if end < 0 {
			break // an unfinished line at the end of the stream is dropped
		}
		line := stream[:end]
		next := end + 1
		if stream[end] == '\r' && next < len(stream) && stream[next] == '\n' {
			next++
		}
		stream = stream[next:]
		switch {
		case line == "":
			if data != "" {
				out = append(out, refEvent{event{Type: cmp.Or(typ, "message"), Data: strings.TrimSuffix(data, "\n"), LastEventID: lastID}, ownID})
			}
			data, typ, ownID = "", "", false
			continue
		case line[0] == ':':
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "event":
			typ = value
		case "data":
			data += value + "\n"
		case "id":
			if !strings.Contains(value, "\x00") { // else the field is ignored
				lastID, ownID = value, value != ""
			}
		}
	}
	return out
}

func eventsOf(ref []refEvent) []event {
	evs := make([]event, len(ref))
	for i, r := range ref {
		evs[i] = r.event
	}
	return evs
}

// withoutIDs returns the events with their lastEventId cleared.
func withoutIDs(evs []event) []event {
	out := slices.Clone(evs)
	for i := range out {
		out[i].LastEventID = ""
	}
	return out
}

// beforeEndOfCase returns the events before the end-of-case marker.
func beforeEndOfCase(evs []event) []event {
	for i, e := range evs {
		if e.Type == endOfCaseType {
			return evs[:i]
		}
	}
	return evs
}
