package sse

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// ---------------------------------------------------------------------
// Reference parser: the spec's "event stream interpretation", literally,
// over the whole input at once. It shares nothing with the scanner.

// refEvent is one event the reference found: input[start:end], with end
// just after the terminator of its blank line.
type refEvent struct {
	start, end int
	crlf       bool // the blank line ended in CRLF (so a read split between CR and LF moves the LF to the next event)
	info       Event
}

type refResult struct {
	bom    bool
	events []refEvent
	tail   int // start of the unfinished event after the last boundary (== len(input) if none)
}

func refParse(in []byte) refResult {
	var r refResult
	pos := 0
	if bytes.HasPrefix(in, []byte("\xEF\xBB\xBF")) {
		r.bom, pos = true, 3
	}
	evStart := 0
	cur := Event{retry: -1}
	for {
		// "CRLF, a single LF not preceded by a CR, and a single CR not
		// followed by an LF are the ways in which a line can end."
		e := pos
		for e < len(in) && in[e] != '\r' && in[e] != '\n' {
			e++
		}
		if e == len(in) {
			break // no terminator yet: not a line
		}
		line, after, crlf := in[pos:e], e+1, false
		if in[e] == '\r' && e+1 < len(in) && in[e+1] == '\n' {
			after, crlf = e+2, true
		}
		pos = after
		if len(line) == 0 { // dispatch
			r.events = append(r.events, refEvent{start: evStart, end: after, crlf: crlf, info: cur})
			cur, evStart = Event{retry: -1}, after
			continue
		}
		if line[0] == ':' {
			continue // comment
		}
		name, value := line, []byte{}
		if c := bytes.IndexByte(line, ':'); c >= 0 {
			name, value = line[:c], bytes.TrimPrefix(line[c+1:], []byte(" "))
		}
		cur.hasFields = true
		switch string(name) {
		case "data":
			cur.hasData = true
		case "id":
			if !bytes.Contains(value, []byte{0}) {
				cur.hasID, cur.idTooLong, cur.id = true, false, bytes.Clone(value)
				if len(value) > MaxIDLen {
					cur.idTooLong, cur.id = true, bytes.Clone(value[:MaxIDLen])
				}
			}
		case "retry":
			digits := len(value) > 0
			for _, b := range value {
				digits = digits && '0' <= b && b <= '9'
			}
			if digits {
				v, err := strconv.ParseInt(string(value), 10, 64)
				if err != nil {
					v = math.MaxInt64
				}
				cur.retry = v
			}
		}
	}
	r.tail = evStart
	return r
}

// expectFor turns the reference's events into what the scanner must
// report when the input arrives in chunks ending at the offsets in cuts:
// a boundary whose CRLF is split by a cut is reported after the CR, and
// the LF becomes the leadingLF first byte of the next event.
func expectFor(r refResult, n int, cuts []int) (evs []scanEvent, tailSize int) {
	cutAt := make([]bool, n+1)
	for _, c := range cuts {
		cutAt[c] = true
	}
	shift := false
	for _, e := range r.events {
		info, start, end := e.info, e.start, e.end
		if shift {
			start, info.leadingLF = start-1, true
		}
		shift = e.crlf && cutAt[end-1]
		if shift {
			end--
		}
		info.size = end - start
		evs = append(evs, scanEvent{end: end, info: info})
	}
	tail := r.tail
	if shift {
		tail--
	}
	return evs, n - tail
}

// ---------------------------------------------------------------------
// Driving the scanner.

type scanEvent struct {
	end  int // absolute offset just after the event
	info Event
}

func (e scanEvent) String() string {
	i := e.info
	return fmt.Sprintf("{end:%d size:%d id:%q hasID:%v idTooLong:%v hasData:%v hasFields:%v retry:%d leadingLF:%v}",
		e.end, i.size, i.id, i.hasID, i.idTooLong, i.hasData, i.hasFields, i.retry, i.leadingLF)
}

func sameEvent(a, b scanEvent) bool {
	x, y := a.info, b.info
	return a.end == b.end && bytes.Equal(x.id, y.id) && x.hasID == y.hasID && x.idTooLong == y.idTooLong &&
		x.hasData == y.hasData && x.hasFields == y.hasFields && x.retry == y.retry &&
		x.leadingLF == y.leadingLF && x.size == y.size
}

type scanResult struct {
	events  []scanEvent
	inEvent bool // after the last chunk
	sawBOM  bool
}

// feed runs a fresh scanner over in, in chunks ending at cuts (sorted,
// each in (0, len(in))), checking the contract of next on every call.
func feed(t testing.TB, in []byte, cuts []int) (res scanResult, ok bool) {
	t.Helper()
	var s Scanner
	off, last := 0, 0
	prev := 0
	bounds := append(slices.Clone(cuts), len(in))
	for _, c := range bounds {
		p := in[prev:c]
		prev = c
		for len(p) > 0 {
			n, complete := s.Next(p)
			switch {
			case n < 0 || n > len(p):
				t.Errorf("next(%q) consumed %d bytes", p, n)
				return res, false
			case complete && n == 0:
				t.Errorf("next(%q) completed an event consuming nothing", p)
				return res, false
			case !complete && n != len(p):
				t.Errorf("next(%q) = %d, false: must consume all of p", p, n)
				return res, false
			}
			off += n
			p = p[n:]
			if complete {
				ev := s.Event()
				if ev.size != off-last {
					t.Errorf("event ending at %d: size %d, but %d bytes since the previous boundary", off, ev.size, off-last)
					return res, false
				}
				ev.id = bytes.Clone(ev.id)
				res.events = append(res.events, scanEvent{end: off, info: ev})
				last = off
			}
			if s.inEvent() != (off > last) {
				t.Errorf("at %d (last boundary %d): inEvent() = %v", off, last, s.inEvent())
				return res, false
			}
		}
	}
	if n, complete := s.Next(nil); n != 0 || complete {
		t.Errorf("next(nil) = %d, %v", n, complete)
	}
	res.inEvent, res.sawBOM = s.inEvent(), s.SawBOM()
	return res, true
}

// checkAgainstRef feeds in split at cuts and compares with the reference.
func checkAgainstRef(t testing.TB, in []byte, ref refResult, cuts []int) bool {
	t.Helper()
	got, ok := feed(t, in, cuts)
	if !ok {
		t.Logf("input %q, cuts %v", in, cuts)
		return false
	}
	want, tail := expectFor(ref, len(in), cuts)
	bad := len(got.events) != len(want)
	for i := 0; !bad && i < len(want); i++ {
		bad = !sameEvent(got.events[i], want[i])
	}
	if bad {
		t.Errorf("input %q, cuts %v:\n got  %v\n want %v", in, cuts, got.events, want)
		return false
	}
	if got.inEvent != (tail > 0) {
		t.Errorf("input %q, cuts %v: inEvent() = %v at the end, want %v", in, cuts, got.inEvent, tail > 0)
		return false
	}
	if got.sawBOM != ref.bom {
		t.Errorf("input %q, cuts %v: sawBOM() = %v, want %v", in, cuts, got.sawBOM, ref.bom)
		return false
	}
	return true
}

func everyByte(n int) []int {
	cuts := make([]int, 0, n)
	for i := 1; i < n; i++ {
		cuts = append(cuts, i)
	}
	return cuts
}

// randomCuts splits n bytes into chunks of random, mostly small, sizes.
func randomCuts(rng *rand.Rand, n int) []int {
	var cuts []int
	maxChunk := 1 + rng.IntN(1+rng.IntN(max(n, 1)))
	for at := 1 + rng.IntN(maxChunk); at < n; at += 1 + rng.IntN(maxChunk) {
		cuts = append(cuts, at)
	}
	return cuts
}

// ---------------------------------------------------------------------
// Hand-written cases: what the spec says, spelled out. The reference
// parser must agree with them too, or it could not be trusted.

// want is an expected event; end is its absolute end offset (its size is
// end minus the previous end); retry "" means none.
type want struct {
	end                                  int
	id                                   string
	hasID, idTooLong, hasData, hasFields bool
	retry                                string
	leadingLF                            bool
}

func (w want) event(prevEnd int) scanEvent {
	info := Event{hasID: w.hasID, idTooLong: w.idTooLong, hasData: w.hasData, hasFields: w.hasFields,
		retry: -1, leadingLF: w.leadingLF, size: w.end - prevEnd}
	if w.hasID {
		info.id = []byte(w.id)
	}
	if w.retry != "" {
		v, err := strconv.ParseInt(w.retry, 10, 64)
		if err != nil {
			panic(err)
		}
		info.retry = v
	}
	return scanEvent{end: w.end, info: info}
}

var (
	long300 = strings.Repeat("x", 300)
	long256 = strings.Repeat("y", MaxIDLen)
)

var scannerCases = []struct {
	name    string
	in      string
	cuts    []int // nil: whole input
	want    []want
	inEvent bool
	bom     bool
}{
	{name: "empty", in: ""},
	{name: "LF", in: "data: a\n\n", want: []want{{end: 9, hasData: true, hasFields: true}}},
	{name: "CRLF", in: "data: a\r\n\r\n", want: []want{{end: 11, hasData: true, hasFields: true}}},
	{name: "CR", in: "data: a\r\r", want: []want{{end: 9, hasData: true, hasFields: true}}},
	{name: "mixed", in: "id: 1\rdata: a\r\nevent: e\n\r\ndata\r\n\n:c\r\r",
		want: []want{{end: 26, id: "1", hasID: true, hasData: true, hasFields: true}, {end: 33, hasData: true, hasFields: true}, {end: 37}}},
	{name: "LF CR is two line ends", in: "data: a\n\r", want: []want{{end: 9, hasData: true, hasFields: true}}},
	{name: "CR LF LF", in: "data: a\r\n\n", want: []want{{end: 10, hasData: true, hasFields: true}}},
	{name: "unfinished event", in: "data: a\n\ndata: b\n", want: []want{{end: 9, hasData: true, hasFields: true}}, inEvent: true},
	{name: "unterminated line", in: "data: a", inEvent: true},
	{name: "CRLF split after the CR of a field line", in: "data: a\r\n\r\n", cuts: []int{8},
		want: []want{{end: 11, hasData: true, hasFields: true}}},
	{name: "CRLF split inside the blank line: LF leads the next event", in: "data: a\r\n\r\ndata: b\n\n", cuts: []int{10},
		want: []want{{end: 10, hasData: true, hasFields: true}, {end: 20, hasData: true, hasFields: true, leadingLF: true}}},
	{name: "split CRLF blank line at the end", in: "data: a\r\n\r\n", cuts: []int{10},
		want: []want{{end: 10, hasData: true, hasFields: true}}, inEvent: true},
	{name: "split CRLF then blank line", in: "\r\n\n", cuts: []int{1},
		want: []want{{end: 1}, {end: 3, leadingLF: true}}},
	{name: "unsplit CRLF then blank line", in: "\r\n\n",
		want: []want{{end: 2}, {end: 3}}},
	{name: "CR boundary then CR in next call is a new blank line", in: "\r\r", cuts: []int{1},
		want: []want{{end: 1}, {end: 2}}},
	{name: "CR boundary then data", in: "\rdata\n\n", cuts: []int{1},
		want: []want{{end: 1}, {end: 7, hasData: true, hasFields: true}}},
	{name: "BOM", in: "\xEF\xBB\xBFdata: a\n\n", bom: true, want: []want{{end: 12, hasData: true, hasFields: true}}},
	{name: "BOM split", in: "\xEF\xBB\xBFid: a\n\n", cuts: []int{1, 2}, bom: true,
		want: []want{{end: 10, id: "a", hasID: true, hasFields: true}}},
	{name: "BOM then blank line", in: "\xEF\xBB\xBF\n", bom: true, want: []want{{end: 4}}},
	{name: "BOM only", in: "\xEF\xBB\xBF", bom: true, inEvent: true},
	{name: "half a BOM", in: "\xEF\xBBdata\n\n", cuts: []int{1, 2},
		want: []want{{end: 8, hasFields: true}}},
	{name: "half a BOM then LF", in: "\xEF\xBB\n\n", cuts: []int{2},
		want: []want{{end: 4, hasFields: true}}},
	{name: "BOM not at start is data", in: "\n\xEF\xBB\xBFdata: a\n\n",
		want: []want{{end: 1}, {end: 13, hasFields: true}}},
	{name: "two BOMs", in: "\xEF\xBB\xBF\xEF\xBB\xBFdata\n\n", bom: true,
		want: []want{{end: 12, hasFields: true}}},
	{name: "comments", in: ":hi\n: there\ndata\n:x\n\n",
		want: []want{{end: 21, hasData: true, hasFields: true}}},
	{name: "comment only", in: ": keepalive\n\n", want: []want{{end: 13}}},
	{name: "comment with colon data", in: ":data: x\n\n", want: []want{{end: 10}}},
	{name: "consecutive blank lines", in: "\n\n\r\n\r",
		want: []want{{end: 1}, {end: 2}, {end: 4}, {end: 5}}},
	{name: "field without colon", in: "data\nid\nfoo\n\n",
		want: []want{{end: 13, hasID: true, hasData: true, hasFields: true}}},
	{name: "data without value", in: "data:\n\n", want: []want{{end: 7, hasData: true, hasFields: true}}},
	{name: "data with value", in: "data: x\n\n", want: []want{{end: 9, hasData: true, hasFields: true}}},
	{name: "data name case matters", in: "Data: x\n\n", want: []want{{end: 9, hasFields: true}}},
	{name: "data name with space", in: "data : x\n\n", want: []want{{end: 10, hasFields: true}}},
	{name: "name longer than data", in: "datax: x\n\n", want: []want{{end: 10, hasFields: true}}},
	{name: "id", in: "id: 42\n\n", want: []want{{end: 8, id: "42", hasID: true, hasFields: true}}},
	{name: "id no space", in: "id:42\n\n", want: []want{{end: 7, id: "42", hasID: true, hasFields: true}}},
	{name: "id one space dropped", in: "id:  42 \n\n", want: []want{{end: 10, id: " 42 ", hasID: true, hasFields: true}}},
	{name: "id colon in value", in: "id: a:b\n\n", want: []want{{end: 9, id: "a:b", hasID: true, hasFields: true}}},
	{name: "empty id", in: "id:\n\n", want: []want{{end: 5, id: "", hasID: true, hasFields: true}}},
	{name: "empty id with space", in: "id: \n\n", want: []want{{end: 6, id: "", hasID: true, hasFields: true}}},
	{name: "id with NUL ignored", in: "id: a\x00b\n\n", want: []want{{end: 9, hasFields: true}}},
	{name: "id with NUL keeps earlier id", in: "id: 1\nid: 2\x00\n\n",
		want: []want{{end: 14, id: "1", hasID: true, hasFields: true}}},
	{name: "last id wins", in: "id: 1\nid: 22\ndata\n\n",
		want: []want{{end: 19, id: "22", hasID: true, hasData: true, hasFields: true}}},
	{name: "last id wins, shorter", in: "id: 123\nid: 4\n\n",
		want: []want{{end: 15, id: "4", hasID: true, hasFields: true}}},
	{name: "id resets per event", in: "id: 1\n\ndata\n\n",
		want: []want{{end: 7, id: "1", hasID: true, hasFields: true}, {end: 13, hasData: true, hasFields: true}}},
	{name: "id of MaxIDLen", in: "id: " + long256 + "\n\n",
		want: []want{{end: 4 + MaxIDLen + 2, id: long256, hasID: true, hasFields: true}}},
	{name: "id over MaxIDLen", in: "id: " + long300 + "\n\n",
		want: []want{{end: 306, id: long300[:MaxIDLen], hasID: true, idTooLong: true, hasFields: true}}},
	{name: "long id then short id", in: "id: " + long300 + "\nid: 7\n\n",
		want: []want{{end: 312, id: "7", hasID: true, hasFields: true}}},
	{name: "id over MaxIDLen with NUL past the limit", in: "id: " + long300 + "\x00\n\n",
		want: []want{{end: 307, hasFields: true}}},
	{name: "id split", in: "id: abc\n\n", cuts: []int{3, 4, 5},
		want: []want{{end: 9, id: "abc", hasID: true, hasFields: true}}},
	{name: "retry", in: "retry: 1000\n\n", want: []want{{end: 13, hasFields: true, retry: "1000"}}},
	{name: "retry zero", in: "retry:0\n\n", want: []want{{end: 9, hasFields: true, retry: "0"}}},
	{name: "retry leading zeros", in: "retry: 007\n\n", want: []want{{end: 12, hasFields: true, retry: "7"}}},
	{name: "retry last valid wins", in: "retry: 5\nretry: x\nretry: 6\nretry: -1\n\n",
		want: []want{{end: 38, hasFields: true, retry: "6"}}},
	{name: "retry empty", in: "retry:\n\n", want: []want{{end: 8, hasFields: true}}},
	{name: "retry without colon", in: "retry\n\n", want: []want{{end: 7, hasFields: true}}},
	{name: "retry two spaces", in: "retry:  5\n\n", want: []want{{end: 11, hasFields: true}}},
	{name: "retry trailing space", in: "retry: 5 \n\n", want: []want{{end: 11, hasFields: true}}},
	{name: "retry sign", in: "retry: +5\n\n", want: []want{{end: 11, hasFields: true}}},
	{name: "retry decimal", in: "retry: 1.5\n\n", want: []want{{end: 12, hasFields: true}}},
	{name: "retry max int64", in: "retry: 9223372036854775807\n\n",
		want: []want{{end: 28, hasFields: true, retry: "9223372036854775807"}}},
	{name: "retry overflow capped", in: "retry: 9223372036854775808\n\n",
		want: []want{{end: 28, hasFields: true, retry: "9223372036854775807"}}},
	{name: "retry huge capped", in: "retry: " + strings.Repeat("9", 100) + "\n\n",
		want: []want{{end: 109, hasFields: true, retry: "9223372036854775807"}}},
	{name: "retry huge then letter", in: "retry: " + strings.Repeat("9", 100) + "x\n\n",
		want: []want{{end: 110, hasFields: true}}},
	{name: "retry split", in: "retry: 1234\n\n", cuts: []int{6, 7, 9},
		want: []want{{end: 13, hasFields: true, retry: "1234"}}},
	{name: "retry resets per event", in: "retry: 1\n\n\n",
		want: []want{{end: 10, hasFields: true, retry: "1"}, {end: 11}}},
	{name: "unknown fields", in: "event: x\nfoo: bar\n\n", want: []want{{end: 19, hasFields: true}}},
	{name: "colon-only name is empty field", in: ": x\n\n", want: []want{{end: 5}}},
	{name: "space then colon is a field", in: " : x\n\n", want: []want{{end: 6, hasFields: true}}},
	{name: "NUL outside id is ordinary", in: "data: \x00\n\n", want: []want{{end: 9, hasData: true, hasFields: true}}},
	{name: "full event", in: "id: 7\nevent: tick\nretry: 3000\ndata: {\"a\":1}\ndata: more\n\n",
		want: []want{{end: 56, id: "7", hasID: true, hasData: true, hasFields: true, retry: "3000"}}},
}

func TestScannerCases(t *testing.T) {
	for _, tc := range scannerCases {
		t.Run(tc.name, func(t *testing.T) {
			in := []byte(tc.in)
			var wantEvs []scanEvent
			prev := 0
			for _, w := range tc.want {
				wantEvs = append(wantEvs, w.event(prev))
				prev = w.end
			}
			got, ok := feed(t, in, tc.cuts)
			if !ok {
				return
			}
			if !slices.EqualFunc(got.events, wantEvs, sameEvent) {
				t.Errorf("events:\n got  %v\n want %v", got.events, wantEvs)
			}
			if got.inEvent != tc.inEvent {
				t.Errorf("inEvent() = %v at the end, want %v", got.inEvent, tc.inEvent)
			}
			if got.sawBOM != tc.bom {
				t.Errorf("sawBOM() = %v, want %v", got.sawBOM, tc.bom)
			}
			// The reference must say the same, or it proves nothing.
			ref := refParse(in)
			refEvs, tail := expectFor(ref, len(in), tc.cuts)
			if !slices.EqualFunc(refEvs, wantEvs, sameEvent) || (tail > 0) != tc.inEvent || ref.bom != tc.bom {
				t.Errorf("reference parser disagrees:\n ref  %v (tail %d, bom %v)\n want %v", refEvs, tail, ref.bom, wantEvs)
			}
		})
	}
}

// TestScannerLeadingLF follows a lone-CR boundary call by call: reported
// at once, and the LF arriving later is that CR's partner, not a line.
func TestScannerLeadingLF(t *testing.T) {
	var s Scanner
	steps := []struct {
		p        string
		n        int
		complete bool
		inEvent  bool
	}{
		{"data: a\r\r", 9, true, false},    // boundary at the CR, not waiting for the next byte
		{"\n", 1, false, true},             // the CR's partner: no blank line, no event
		{"data: b\r\n\r", 10, true, false}, // CRLF inside, lone CR at the end again
		{"\ndata: c\n\n", 1 + 8 + 1, true, false},
		{"\n", 1, true, false}, // a real blank line: an LF after LF is not a partner
	}
	wantInfo := []Event{
		{hasData: true, hasFields: true, retry: -1, size: 9},
		{},
		{hasData: true, hasFields: true, retry: -1, size: 11, leadingLF: true},
		{hasData: true, hasFields: true, retry: -1, size: 10, leadingLF: true},
		{retry: -1, size: 1},
	}
	for i, st := range steps {
		n, complete := s.Next([]byte(st.p))
		if n != st.n || complete != st.complete || s.inEvent() != st.inEvent {
			t.Fatalf("step %d: next(%q) = %d, %v (inEvent %v); want %d, %v (inEvent %v)",
				i, st.p, n, complete, s.inEvent(), st.n, st.complete, st.inEvent)
		}
		if complete {
			got := s.Event()
			if w := wantInfo[i]; !sameEvent(scanEvent{info: got}, scanEvent{info: w}) {
				t.Errorf("step %d: event %v, want %v", i, scanEvent{info: got}, scanEvent{info: w})
			}
		}
	}
}

// TestScannerEveryTwoWaySplit cuts each input once at every offset: every
// CRLF (and BOM, and field name) split across two calls at every position.
func TestScannerEveryTwoWaySplit(t *testing.T) {
	for _, in := range chunkingInputs() {
		ref := refParse(in)
		for c := 1; c < len(in); c++ {
			if !checkAgainstRef(t, in, ref, []int{c}) {
				break
			}
		}
	}
}

// TestScannerChunking: the same events, at the same absolute offsets, for
// the whole input, 1-byte chunks, and many random splits.
func TestScannerChunking(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, in := range chunkingInputs() {
		ref := refParse(in)
		if !checkAgainstRef(t, in, ref, nil) || !checkAgainstRef(t, in, ref, everyByte(len(in))) {
			continue
		}
		for range 30 {
			if !checkAgainstRef(t, in, ref, randomCuts(rng, len(in))) {
				break
			}
		}
	}
}

// chunkingInputs: the hand-written cases, the fuzz seeds, and random
// streams built from the tokens the rules turn on.
func chunkingInputs() [][]byte {
	var ins [][]byte
	for _, tc := range scannerCases {
		ins = append(ins, []byte(tc.in))
	}
	for _, s := range fuzzSeeds {
		ins = append(ins, []byte(s))
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 400 {
		ins = append(ins, randomStream(rng, 1+rng.IntN(60)))
	}
	return ins
}

var streamTokens = []string{
	"data", "data:", "data: x", "id", "id:", "id: ", "id: 1", "id:\x00", "retry", "retry:", "retry: 15",
	"retry:99999999999999999999", "event: e", "foo", ":", ": c", " ", "x", ":", "\x00", "1",
	"\n", "\n", "\n", "\r", "\r", "\r\n", "\r\n", "\n\n", "\r\r", "\r\n\r\n",
	"\xEF\xBB\xBF", "\xEF", "\xBB\xBF", long300,
}

func randomStream(rng *rand.Rand, tokens int) []byte {
	var b []byte
	if rng.IntN(8) == 0 {
		b = append(b, "\xEF\xBB\xBF"...)
	}
	for range tokens {
		b = append(b, streamTokens[rng.IntN(len(streamTokens))]...)
	}
	return b
}

// fuzzSeeds are also committed as corpus files under testdata/fuzz.
var fuzzSeeds = []string{
	"",
	"data: hello\n\n",
	"id: 1\nevent: e\ndata: {}\n\n",
	"data: a\r\n\r\ndata: b\r\n\r\n",
	"data: a\r\rdata: b\r\r",
	"\r\n\r\n\r\n",
	"\r\r\n\n\r",
	"\xEF\xBB\xBFdata: bom\n\n",
	"\xEF\xBB\xBF\r\n",
	"\xEF\xBB\n\n",
	"\xEF\xBB\xBF\xEF\xBB\xBF\n",
	": comment\n\n:\n\n",
	"id\nid:\nid: \nid:  x\n\n",
	"id: a\x00b\n\n",
	"retry: 10\nretry: 1x\nretry: 99999999999999999999999\n\n",
	"retry\nretry:\nretry: \n\n",
	"data\ndata:\ndata: \n\n",
	"event: x\nfoo\n:bar\n\n",
	"id: " + long300 + "\n\n",
}

func FuzzScanner(f *testing.F) {
	for i, s := range fuzzSeeds {
		f.Add([]byte(s), uint64(i))
	}
	f.Fuzz(func(t *testing.T, in []byte, seed uint64) {
		ref := refParse(in)
		if !checkAgainstRef(t, in, ref, nil) || !checkAgainstRef(t, in, ref, everyByte(len(in))) {
			return
		}
		rng := rand.New(rand.NewPCG(seed, seed>>32|1))
		for range 4 {
			if !checkAgainstRef(t, in, ref, randomCuts(rng, len(in))) {
				return
			}
		}
	})
}

// TestScannerUnboundedLines: lines and events far larger than any buffer,
// in any chunking, cost no memory and keep their meaning.
func TestScannerUnboundedLines(t *testing.T) {
	big := strings.Repeat("z", 1<<20)
	in := []byte("data: " + big + "\r: " + big + "\nid: " + big + "\r\nretry: " + strings.Repeat("1", 1<<16) + "\n\r\n")
	ref := refParse(in)
	if len(ref.events) != 1 {
		t.Fatalf("reference found %d events", len(ref.events))
	}
	rng := rand.New(rand.NewPCG(5, 6))
	checkAgainstRef(t, in, ref, nil)
	for range 5 {
		checkAgainstRef(t, in, ref, randomCuts(rng, len(in)))
	}
	var s Scanner
	if n := testing.AllocsPerRun(5, func() {
		s = Scanner{}
		for p := in; len(p) > 0; {
			n, _ := s.Next(p)
			p = p[n:]
		}
	}); n != 0 {
		t.Errorf("%v allocations per pass, want 0", n)
	}
}

func TestScannerAllocs(t *testing.T) {
	stream, _ := benchStream(200)
	var s Scanner
	allocs := testing.AllocsPerRun(20, func() {
		for p := stream; len(p) > 0; {
			n, complete := s.Next(p)
			if complete {
				_ = s.Event()
			}
			p = p[n:]
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per stream, want 0", allocs)
	}
}

// ---------------------------------------------------------------------
// Benchmarks

// benchStream returns n realistic events of about 200 bytes each (id,
// event and a JSON data line) and the end offset of each.
func benchStream(n int) ([]byte, []int) {
	var b []byte
	ends := make([]int, 0, n)
	for i := range n {
		b = fmt.Appendf(b, "id: %d\nevent: price.update\ndata: {\"seq\":%d,\"symbol\":\"SYM%03d\",\"bid\":%d.%02d,\"ask\":%d.%02d,\"ts\":\"2025-01-02T03:04:%02d.%03dZ\",\"venue\":\"XNAS\",\"flags\":[\"a\",\"b\"],\"note\":\"lorem ipsum dolor sit amet\"}\n\n",
			1000000+i, i, i%1000, 100+i%50, i%100, 101+i%50, (i+7)%100, i%60, i%1000)
		ends = append(ends, len(b))
	}
	return b, ends
}

func benchmarkChunks(b *testing.B, chunks [][]byte, events int) {
	total := 0
	for _, c := range chunks {
		total += len(c)
	}
	b.SetBytes(int64(total))
	b.ReportAllocs()
	var s Scanner
	got := 0
	for b.Loop() {
		for _, c := range chunks {
			for len(c) > 0 {
				n, complete := s.Next(c)
				c = c[n:]
				if complete {
					got++
				}
			}
		}
	}
	if got != events*b.N {
		b.Fatalf("%d events, want %d", got, events*b.N)
	}
	b.ReportMetric(float64(got)/b.Elapsed().Seconds(), "events/s")
}

func splitEvery(p []byte, size int) [][]byte {
	var out [][]byte
	for len(p) > size {
		out = append(out, p[:size])
		p = p[size:]
	}
	return append(out, p)
}

func BenchmarkScanner4KiBChunks(b *testing.B) {
	stream, ends := benchStream(5000)
	benchmarkChunks(b, splitEvery(stream, 4096), len(ends))
}

func BenchmarkScannerEventChunks(b *testing.B) {
	stream, ends := benchStream(5000)
	chunks := make([][]byte, len(ends))
	prev := 0
	for i, e := range ends {
		chunks[i], prev = stream[prev:e], e
	}
	benchmarkChunks(b, chunks, len(ends))
}

// BenchmarkScannerCRLines: the same stream with lone-CR line ends, which
// must not make the search for LF rescan the chunk for every line.
func BenchmarkScannerCRLines(b *testing.B) {
	stream, ends := benchStream(5000)
	stream = bytes.ReplaceAll(stream, []byte("\n"), []byte("\r"))
	benchmarkChunks(b, splitEvery(stream, 4096), len(ends))
}

// BenchmarkScannerLongData: 64 KiB data lines in 32 KiB chunks.
func BenchmarkScannerLongData(b *testing.B) {
	ev := []byte("id: 1\ndata: " + strings.Repeat("q", 64<<10) + "\n\n")
	stream := bytes.Repeat(ev, 64)
	benchmarkChunks(b, splitEvery(stream, 32<<10), 64)
}

// BenchmarkScannerTinyCREvents: 4-byte comment-only events with lone-CR
// line ends in 32 KiB chunks, one call per event: the worst case for the
// windowed LF search, which finds no LF for any of them.
func BenchmarkScannerTinyCREvents(b *testing.B) {
	stream := bytes.Repeat([]byte(":x\r\r"), 1<<16)
	benchmarkChunks(b, splitEvery(stream, 32<<10), 1<<16)
}
