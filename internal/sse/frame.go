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
func WithID(raw []byte, id string) []byte {
	cut := len(raw) - 1 // the blank line is "\n" or "\r"...
	if len(raw) >= 2 && raw[len(raw)-2] == '\r' && raw[len(raw)-1] == '\n' {
		cut = len(raw) - 2 // ... or "\r\n"
	}
	out := make([]byte, 0, len(raw)+len(id)+5)
	out = append(out, raw[:cut]...)
	out = append(out, "id: "...)
	out = append(out, id...)
	out = append(out, '\n')
	return append(out, raw[cut:]...)
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
