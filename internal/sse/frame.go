package sse

import (
	"strconv"
	"strings"
	"time"
)

// IsEventStreamType reports whether a media type, with optional
// parameters, is text/event-stream, case-insensitively.
func IsEventStreamType(mediaType string) bool {
	if i := strings.IndexByte(mediaType, ';'); i >= 0 {
		mediaType = mediaType[:i]
	}
	return strings.EqualFold(strings.TrimSpace(mediaType), "text/event-stream")
}

// WithID copies an event with an id line added just before the blank line
// that ends it, where it is the event's last id and so the one that counts.
// The id line ends the way the event's own last line does (LF, CRLF or a
// lone CR): clients that split events on "\n\n", "\r\r" or "\r\n\r\n"
// rather than by the spec's line rules would otherwise merge two events.
// The event is completed as Terminated does.
func WithID(raw []byte, id string) []byte {
	cut, eol, blank := ends(raw)
	out := make([]byte, 0, len(raw)+len(id)+8)
	out = append(out, raw[:cut]...)
	out = append(out, "id: "...)
	out = append(out, id...)
	out = append(out, eol...)
	return append(out, blank...)
}

// Terminated copies an event, completing a blank line that ends in a lone
// CR after a line that ended in CRLF: the Scanner reports the event at
// that CR, so its LF comes as the next event's leading LF (which is
// dropped); without it a CRLF stream would reach clients with lone-CR
// blank lines, which naive clients do not split on.
func Terminated(raw []byte) []byte {
	cut, _, blank := ends(raw)
	out := make([]byte, 0, cut+len(blank))
	out = append(out, raw[:cut]...)
	return append(out, blank...)
}

// ends splits a complete event at its blank line: raw[:cut] is its lines,
// eol the terminator of the last of them, blank the terminator the blank
// line gets (its own, or CRLF in place of a CR after a CRLF line).
func ends(raw []byte) (cut int, eol, blank string) {
	n := len(raw)
	cut, blank = n-1, string(raw[n-1:]) // the blank line is "\n" or "\r"...
	if n >= 2 && raw[n-2] == '\r' && raw[n-1] == '\n' {
		cut, blank = n-2, "\r\n" // ... or "\r\n"
	}
	switch {
	case cut >= 2 && raw[cut-2] == '\r' && raw[cut-1] == '\n':
		eol = "\r\n"
	case cut >= 1 && raw[cut-1] == '\r':
		eol = "\r"
	default:
		eol = "\n"
	}
	if blank == "\r" && eol == "\r\n" {
		blank = "\r\n"
	}
	return cut, eol, blank
}

// ResetEvent is an event of type typ whose data is lastID: it tells a page
// that the events after lastID are lost (EventSource cannot read response
// headers, so this is the only way to say so).
func ResetEvent(typ, lastID string) []byte {
	return []byte("event: " + typ + "\ndata: " + lastID + "\n\n")
}

// RetryField is a retry field line, in milliseconds, without a blank line
// after it: a parser applies a retry field as it reads the line (WHATWG
// HTML, "process the field"), so no dispatch is needed, and a blank line
// would make clients such as fetch-event-source dispatch an empty message.
// Written at an event boundary, it joins the next event's block, whose
// dispatch it does not change.
func RetryField(d time.Duration) []byte {
	return []byte("retry: " + strconv.FormatInt(d.Milliseconds(), 10) + "\n")
}

// PaddingBlock is one comment line of exactly n bytes (n is 0 or >= 2).
func PaddingBlock(n int) []byte {
	if n <= 0 {
		return nil
	}
	b := make([]byte, n)
	b[0] = ':'
	for i := 1; i < n-1; i++ {
		b[i] = ' '
	}
	b[n-1] = '\n'
	return b
}
