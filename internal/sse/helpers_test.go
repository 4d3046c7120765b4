package sse

// inEvent reports whether bytes of an unfinished event have been consumed
// (the stream is not at an event boundary). Only the tests ask.
func (s *Scanner) inEvent() bool { return s.size > 0 }
