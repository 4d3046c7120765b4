// Package sse holds what the plugin knows of the text/event-stream format
// itself, without HTTP servers or Caddy: an incremental scanner that finds
// event boundaries and the fields the plugin acts on, and the framing
// helpers that build the bytes the plugin writes (ids, reset events,
// retry fields, padding). It imports nothing of Caddy, so the compiler
// keeps that boundary.
package sse

import (
	"bytes"
	"math"
)

// Scanner reads an event stream incrementally and finds where each
// event ends, by the WHATWG HTML "event stream interpretation" rules: lines
// end in LF, CRLF or a lone CR (a CRLF may be split across two reads), a
// leading U+FEFF BOM is dropped, lines starting with ':' are comments, a
// line without ':' is a field with an empty value, and a blank line ends
// (dispatches) an event.
//
// It never copies the stream: it reports byte offsets and the few fields
// the plugin acts on (id, retry, whether data was present). Its memory is
// fixed: a field name prefix, an id of at most MaxIDLen bytes, a retry
// number; line and event lengths are unbounded without costing memory.
//
// The zero value is ready to use, at the start of a stream.
type Scanner struct {
	// Stream start: a BOM may arrive split across calls, so up to two of
	// its bytes are held (as a count) until the third one decides.
	bomDone bool  // the start of the stream has been decided
	bomSeen uint8 // BOM bytes matched so far, while !bomDone
	bom     bool  // the stream began with a BOM (consumed)

	// afterCR: the last byte consumed was a CR ending a line, at the end
	// of a p; an LF at the start of the next p is its partner.
	afterCR bool

	// The line being read.
	mode     uint8   // modeLineStart, modeName, modeSkip, modeID, modeRetry
	valStart bool    // modeID/modeRetry: no value byte seen yet (one leading space is dropped)
	nameLen  uint8   // field name bytes in name (at most len(name))
	name     [5]byte // field name prefix: enough to tell data, id, retry from longer names

	// The id field being read: it goes to ids[idCur^1] and is committed
	// (idCur flipped) at its line end unless it held a NUL.
	idNextLen  int
	idNextLong bool
	idNextNUL  bool

	// The retry field being read.
	retryVal    int64
	retryDigits bool // at least one digit
	retryBad    bool // a byte other than an ASCII digit

	// The event being read.
	size      int // bytes consumed since the previous boundary
	hasData   bool
	hasFields bool
	hasID     bool
	idTooLong bool
	hasRetry  bool
	leadingLF bool
	retry     int64
	idLen     int
	idCur     int // ids[idCur] holds the committed id
	ids       [2][MaxIDLen]byte

	last Event // the event the last call to next completed
}

// MaxIDLen bounds the bytes of an event id the scanner keeps. A longer id
// is reported with idTooLong set and its bytes truncated.
const MaxIDLen = 256

// maxRetry is what a retry value too large for an int64 is capped to.
const maxRetry = math.MaxInt64

// Event describes one complete event, as EventSource would see it.
type Event struct {
	id        []byte // value of the last valid id field; aliases scanner memory until the next call to next
	hasID     bool   // a valid id field was present (possibly empty, which resets the last event ID)
	idTooLong bool   // the id was longer than MaxIDLen; id holds its first MaxIDLen bytes
	hasData   bool   // a data field was present: EventSource dispatches this event
	hasFields bool   // any field line at all (data, event, id, retry, or unknown): false for comment-only blocks
	retry     int64  // the last valid retry field, in milliseconds, or -1 when none
	leadingLF bool   // the event's first byte is an LF that completes the previous event's CR terminator (a CRLF split across events): part of no line of this event
	size      int    // bytes of the whole event, from the previous boundary up to and including its blank line's terminator
}

// Accessors of an Event. Its fields stay unexported so that the scanner,
// which fills them, is the only writer.

// ID is the value of the last valid id field; it aliases the scanner's
// memory until its next call to Next.
func (e Event) ID() []byte { return e.id }

// HasID reports a valid id field (possibly empty, which resets the last
// event ID).
func (e Event) HasID() bool { return e.hasID }

// IDTooLong reports an id longer than MaxIDLen; ID holds its first
// MaxIDLen bytes.
func (e Event) IDTooLong() bool { return e.idTooLong }

// HasData reports a data field: EventSource dispatches this event.
func (e Event) HasData() bool { return e.hasData }

// HasFields reports any field line at all: false for comment-only blocks
// (a backend's own heartbeats).
func (e Event) HasFields() bool { return e.hasFields }

// Retry is the last valid retry field in milliseconds, or -1 for none.
func (e Event) Retry() int64 { return e.retry }

// LeadingLF reports that the event's first byte is the LF partner of the
// previous event's CR terminator: part of no line of this event.
func (e Event) LeadingLF() bool { return e.leadingLF }

// Line states of Scanner.mode.
const (
	modeLineStart uint8 = iota // nothing of the current line seen yet
	modeName                   // reading a field name
	modeSkip                   // the rest of the line does not matter (comment, data, other fields)
	modeID                     // reading an id value
	modeRetry                  // reading a retry value
)

var utf8BOM = [3]byte{0xEF, 0xBB, 0xBF}

// Next consumes p up to and including the first event boundary in it and
// returns how many bytes it consumed and whether they complete an event.
// When complete is false, all of p was consumed and the event goes on in
// the next call. An event is every byte from the previous boundary up to
// and including the terminator of the blank line that ends it; a block of
// only comments is an event too (hasFields false). A boundary whose blank
// line ends in a lone CR is reported at once; an LF that follows it in a
// later call is consumed as that CR's partner (leadingLF), never as a
// blank line.
func (s *Scanner) Next(p []byte) (n int, complete bool) {
	if len(p) == 0 {
		return 0, false
	}
	if !s.bomDone {
		seen := int(s.bomSeen)
		k := 0
		for k < len(p) && seen+k < len(utf8BOM) && p[k] == utf8BOM[seen+k] {
			k++
		}
		switch {
		case seen+k == len(utf8BOM):
			s.bomDone, s.bom = true, true
			n = k
		case k == len(p):
			// Still a BOM prefix: hold on to it.
			s.bomSeen += uint8(k)
			s.size += k
			return k, false
		default:
			// Not a BOM: the bytes held back (consumed by earlier calls)
			// are ordinary bytes of the first line. They hold no CR, LF
			// or ':', so they cannot end anything.
			s.bomDone = true
			s.scan(utf8BOM[:seen])
		}
	}
	m, complete := s.scan(p[n:])
	n += m
	s.size += n
	if complete {
		s.finish()
	}
	return n, complete
}

// Event describes the event that the last call to Next completed.
func (s *Scanner) Event() Event { return s.last }

// SawBOM reports whether the stream began with a UTF-8 BOM that the
// scanner consumed (the first 3 bytes of the stream). Writers drop it,
// because anything the plugin writes before it (padding) would turn it
// into part of the first field name.
func (s *Scanner) SawBOM() bool { return s.bom }

// finish records the event just completed and resets the per-event state.
func (s *Scanner) finish() {
	s.last = Event{
		hasID:     s.hasID,
		idTooLong: s.idTooLong,
		hasData:   s.hasData,
		hasFields: s.hasFields,
		retry:     -1,
		leadingLF: s.leadingLF,
		size:      s.size,
	}
	if s.hasID {
		s.last.id = s.ids[s.idCur][:s.idLen:s.idLen]
	}
	if s.hasRetry {
		s.last.retry = s.retry
	}
	s.size = 0
	s.hasData, s.hasFields, s.hasID, s.idTooLong = false, false, false, false
	s.hasRetry, s.leadingLF = false, false
	s.idLen = 0
}

// scan runs the line state machine over p, the stream after any BOM, up
// to and including the first blank line's terminator. It does not count
// s.size; next does.
func (s *Scanner) scan(p []byte) (int, bool) {
	i := 0
	if s.afterCR && len(p) > 0 {
		s.afterCR = false
		if p[0] == '\n' {
			i = 1
			if s.size == 0 {
				// The CR ended a blank line: the boundary is behind us,
				// and this LF is the first byte of the next event.
				s.leadingLF = true
			}
		}
	}
	ends := lineEnds{p: p}
	for i < len(p) {
		switch s.mode {
		case modeLineStart:
			switch p[i] {
			case '\n':
				return i + 1, true
			case '\r':
				return s.endLine(p, i), true
			}
			if e := ends.find(i); e < len(p) {
				// Fast path: the whole line is in p.
				s.line(p[i:e])
				i = s.endLine(p, e)
				continue
			}
			// The line goes on in the next call: read it as a stream.
			if p[i] == ':' {
				s.mode = modeSkip
				return len(p), false
			}
			s.hasFields = true
			s.mode = modeName
			s.nameLen = 0

		case modeName:
			// A byte loop, but over at most len(s.name)+1 bytes.
			for s.mode == modeName {
				if i == len(p) {
					return i, false
				}
				switch b := p[i]; b {
				case ':':
					s.startValue()
					i++
				case '\n', '\r':
					s.startValue()
					s.endValue()
					i = s.endLine(p, i)
				default:
					if int(s.nameLen) == len(s.name) {
						// Longer than any field name the scanner acts on.
						s.mode = modeSkip
						break
					}
					s.name[s.nameLen] = b
					s.nameLen++
					i++
				}
			}

		case modeSkip:
			e := ends.find(i)
			if e == len(p) {
				return e, false
			}
			i = s.endLine(p, e)

		case modeID:
			e := ends.find(i)
			if s.valStart && i < e {
				s.valStart = false
				if p[i] == ' ' {
					i++
				}
			}
			if v := p[i:e]; !s.idNextNUL && len(v) > 0 {
				if bytes.IndexByte(v, 0) >= 0 {
					s.idNextNUL = true
				} else {
					c := copy(s.ids[s.idCur^1][s.idNextLen:], v)
					s.idNextLen += c
					if c < len(v) {
						s.idNextLong = true
					}
				}
			}
			if e == len(p) {
				return e, false
			}
			s.endValue()
			i = s.endLine(p, e)

		case modeRetry:
			e := ends.find(i)
			if s.valStart && i < e {
				s.valStart = false
				if p[i] == ' ' {
					i++
				}
			}
			if v := p[i:e]; !s.retryBad && len(v) > 0 {
				var ok bool
				s.retryVal, ok = appendRetry(s.retryVal, v)
				s.retryBad = !ok
				s.retryDigits = true
			}
			if e == len(p) {
				return e, false
			}
			s.endValue()
			i = s.endLine(p, e)
		}
	}
	return i, false
}

// line acts on one whole line (not blank, without its terminator): the
// same as the streaming modes below, in one step.
func (s *Scanner) line(l []byte) {
	if l[0] == ':' {
		return // comment
	}
	s.hasFields = true
	// The name ends at the first ':'; only names of at most len(s.name)
	// bytes matter, so look no further than one byte past that.
	name, value := l, l[len(l):]
	for j := 0; j < len(l) && j <= len(s.name); j++ {
		if l[j] == ':' {
			name, value = l[:j], l[j+1:]
			break
		}
	}
	if len(name) > len(s.name) {
		return
	}
	switch string(name) {
	case "data":
		s.hasData = true
	case "id":
		if len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
		if bytes.IndexByte(value, 0) < 0 {
			s.idCur ^= 1
			s.idLen = copy(s.ids[s.idCur][:], value)
			s.idTooLong = s.idLen < len(value)
			s.hasID = true
		}
	case "retry":
		if len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
		if v, ok := appendRetry(0, value); ok && len(value) > 0 {
			s.retry = v
			s.hasRetry = true
		}
	}
}

// appendRetry continues the base 10 number val with the digits in v,
// capped at maxRetry. ok is false if v holds anything but ASCII digits.
func appendRetry(val int64, v []byte) (_ int64, ok bool) {
	for _, b := range v {
		if b < '0' || b > '9' {
			return val, false
		}
		d := int64(b - '0')
		if val > (maxRetry-d)/10 {
			val = maxRetry
		} else {
			val = val*10 + d
		}
	}
	return val, true
}

// startValue classifies the field whose name was just read and sets up
// the reading of its value.
func (s *Scanner) startValue() {
	switch string(s.name[:s.nameLen]) {
	case "data":
		s.hasData = true
		s.mode = modeSkip
	case "id":
		s.mode = modeID
		s.valStart = true
		s.idNextLen, s.idNextLong, s.idNextNUL = 0, false, false
	case "retry":
		s.mode = modeRetry
		s.valStart = true
		s.retryVal, s.retryDigits, s.retryBad = 0, false, false
	default:
		s.mode = modeSkip
	}
}

// endValue acts on the field value that just ended with its line.
func (s *Scanner) endValue() {
	switch s.mode {
	case modeID:
		if !s.idNextNUL {
			s.idCur ^= 1
			s.idLen = s.idNextLen
			s.idTooLong = s.idNextLong
			s.hasID = true
		}
	case modeRetry:
		if s.retryDigits && !s.retryBad {
			s.retry = s.retryVal
			s.hasRetry = true
		}
	}
}

// endLine consumes the line terminator at p[e] (CR or LF) and returns the
// index after it. A CR at the very end of p leaves afterCR set, so that
// an LF at the start of the next p is taken as its partner.
func (s *Scanner) endLine(p []byte, e int) int {
	s.mode = modeLineStart
	if p[e] == '\r' {
		if e+1 == len(p) {
			s.afterCR = true
			return e + 1
		}
		if p[e+1] == '\n' {
			return e + 2
		}
	}
	return e + 1
}

// lineEnds finds the line terminators of one buffer with SIMD
// bytes.IndexByte, once for LF and once for CR, without looking at any
// byte twice: what it learned (no LF before lf, no CR before cr) carries
// over from one line to the next. Searches for a terminator that is not
// near go in windows that double, so neither a stream of lone-CR lines
// (no LF anywhere) nor a stream of LF lines (no CR anywhere) rescans the
// rest of the buffer for every line.
type lineEnds struct {
	p []byte
	// No LF in p[i:lf] and no CR in p[i:cr] for the index i of the last
	// find; p[lf] (p[cr]) may be the LF (CR) found, or just where the
	// search stopped.
	lf, cr int
}

// firstWindow is the span of the first search for a terminator that is
// not already known.
const firstWindow = 512

// find returns the index of the first CR or LF in p at or after i, or
// len(p) when there is none. Calls must not go backwards.
func (l *lineEnds) find(i int) int {
	n := len(l.p)
	l.lf = max(l.lf, i)
	l.cr = max(l.cr, i)
	w := firstWindow
	for {
		lfFound := l.lf < n && l.p[l.lf] == '\n'
		crFound := l.cr < n && l.p[l.cr] == '\r'
		switch {
		case lfFound && l.cr >= l.lf:
			return l.lf
		case crFound && l.lf >= l.cr:
			return l.cr
		case lfFound:
			// Look for CR a window past the LF too: in an LF stream one
			// search then covers the next lines as well.
			l.cr = indexFrom(l.p, l.cr, min(n, max(l.lf, l.cr+firstWindow)), '\r')
		case crFound:
			l.lf = indexFrom(l.p, l.lf, l.cr, '\n')
		case l.lf >= n && l.cr >= n:
			return n
		case l.lf <= l.cr:
			l.lf = indexFrom(l.p, l.lf, min(n, l.lf+w), '\n')
			w *= 2
		default:
			l.cr = indexFrom(l.p, l.cr, min(n, l.cr+w), '\r')
			w *= 2
		}
	}
}

// indexFrom returns the index of the first c in p[from:to], or to.
func indexFrom(p []byte, from, to int, c byte) int {
	if k := bytes.IndexByte(p[from:to], c); k >= 0 {
		return from + k
	}
	return to
}
