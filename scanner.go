package caddysse

// eventScanner reads an event stream incrementally and finds where each
// event ends, by the WHATWG HTML "event stream interpretation" rules: lines
// end in LF, CRLF or a lone CR (a CRLF may be split across two reads), a
// leading U+FEFF BOM is dropped, lines starting with ':' are comments, a
// line without ':' is a field with an empty value, and a blank line ends
// (dispatches) an event.
//
// It never copies the stream: it reports byte offsets and the few fields
// the plugin acts on (id, retry, whether data was present). Its memory is
// fixed: a field name prefix, an id of at most maxIDLen bytes, a retry
// number; line and event lengths are unbounded without costing memory.
type eventScanner struct {
	// implementation: see scanner.go (filled in by the scanner work)
}

// maxIDLen bounds the bytes of an event id the scanner keeps. A longer id
// is reported with idTooLong set and its bytes truncated.
const maxIDLen = 256

// eventInfo describes one complete event, as EventSource would see it.
type eventInfo struct {
	id        []byte // value of the last valid id field; aliases scanner memory until the next call to next
	hasID     bool   // a valid id field was present (possibly empty, which resets the last event ID)
	idTooLong bool   // the id was longer than maxIDLen; id holds its first maxIDLen bytes
	hasData   bool   // a data field was present: EventSource dispatches this event
	hasFields bool   // any field line at all (data, event, id, retry, or unknown): false for comment-only blocks
	retry     int64  // the last valid retry field, in milliseconds, or -1 when none
	leadingLF bool   // the event's first byte is an LF that completes the previous event's CR terminator (a CRLF split across events): part of no line of this event
	size      int    // bytes of the whole event, from the previous boundary up to and including its blank line's terminator
}

// next consumes p up to and including the first event boundary in it and
// returns how many bytes it consumed and whether they complete an event.
// When complete is false, all of p was consumed and the event goes on in
// the next call. An event is every byte from the previous boundary up to
// and including the terminator of the blank line that ends it; a block of
// only comments is an event too (hasFields false). A boundary whose blank
// line ends in a lone CR is reported at once; an LF that follows it in a
// later call is consumed as that CR's partner (leadingLF), never as a
// blank line.
func (s *eventScanner) next(p []byte) (n int, complete bool) { panic("not implemented") }

// event describes the event that the last call to next completed.
func (s *eventScanner) event() eventInfo { panic("not implemented") }

// inEvent reports whether bytes of an unfinished event have been consumed
// (the stream is not at an event boundary).
func (s *eventScanner) inEvent() bool { panic("not implemented") }

// sawBOM reports whether the stream began with a UTF-8 BOM that the
// scanner consumed (the first 3 bytes of the stream). Writers drop it,
// because anything the plugin writes before it (padding) would turn it
// into part of the first field name.
func (s *eventScanner) sawBOM() bool { panic("not implemented") }
