package e2e

import (
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
		t.Run(c.name, func(t *testing.T) { runTransparencyCase(t, h, p, c) })
	}
}

func runTransparencyCase(t *testing.T, h *harness, p *page, c transparencyCase) {
	name := "transparency/" + c.name
	h.backend.handle(name, func(s *stream) {
		if s.send(c.steps...) {
			s.send(endOfCase)
		}
	})
	types := append(slices.Clone(c.types), endOfCaseType)
	// Both at once: two connections, well under Chromium's six per origin.
	p.open(t, "direct", "/direct/"+name, types...)
	p.open(t, "sse", "/sse/"+name, types...)

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
	if !sameEvents(gotSSE, gotDirect) {
		t.Errorf("through the plugin, EventSource dispatched other events than straight from the backend (got = /sse, want = /direct):%s",
			diffEvents(gotSSE, gotDirect))
	}
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
