package sse

// HeldKeep is the capacity of the unfinished-event buffer a Framer keeps
// between events; a buffer grown larger by a big event is let go after it.
const HeldKeep = 64 << 10

// Framer cuts a stream into complete events for a writer that hands out
// whole events only: the pass-through stream (which forwards every event
// of a write with one flush) and the fan-out hub (which publishes each
// event on its own). It scans, holds an unfinished event until its end,
// and drops the stream's BOM from the first bytes handed out: whatever the
// plugin writes before them (padding) would make the BOM part of the first
// field name.
//
// The zero value is ready to use, at the start of a stream.
type Framer struct {
	scan    Scanner
	held    []byte
	started bool // bytes were handed out or dropped: the BOM is behind us
}

// Next consumes p up to and including the first event boundary in it (see
// Scanner.Next).
func (f *Framer) Next(p []byte) (n int, complete bool) { return f.scan.Next(p) }

// Event describes the event that the last call to Next completed.
func (f *Framer) Event() Event { return f.scan.Event() }

// Held is how many bytes of an unfinished event are held.
func (f *Framer) Held() int { return len(f.held) }

// Hold keeps p, bytes of an unfinished event, until its end.
func (f *Framer) Hold(p []byte) { f.held = append(f.held, p...) }

// Take returns what is held followed by chunk (chunk itself when nothing
// is held), without the stream's BOM if these are the first bytes handed
// out. The result is valid until Release.
func (f *Framer) Take(chunk []byte) []byte {
	buf := chunk
	if len(f.held) > 0 {
		f.held = append(f.held, chunk...)
		buf = f.held
	}
	if !f.started {
		f.started = true
		if f.scan.SawBOM() {
			buf = buf[3:]
		}
	}
	return buf
}

// Release empties the held buffer after Take (or Drop), letting go of one
// that a large event grew past HeldKeep.
func (f *Framer) Release() {
	if cap(f.held) > HeldKeep {
		f.held = nil
	} else {
		f.held = f.held[:0]
	}
}

// Drop forgets what is held of an event that is not handed out (too
// large, or the stream ends); its bytes count as handed out for the BOM.
func (f *Framer) Drop() {
	f.started = true
	f.Release()
}
