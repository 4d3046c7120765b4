package main

import (
	"bytes"
	"strconv"
)

// The events the emitter sends look like a market-data feed:
//
//	id: 42
//	event: quote
//	data: {"seq":42,"t":1732160000123456789,"type":"quote","symbol":"ACME",...,"pad":"xxxx"}
//
// seq (equal to the id) and t (the send time, Unix nanoseconds) come first
// so that the client's parser finds them without scanning the whole line.

var quoteSymbols = [...]string{"ACME", "GLOBX", "INITECH", "UMBRL", "HOOLI", "STARK", "WAYNE", "TYREL"}

// appendEvent appends one complete event (id, event and data lines and the
// blank line) to dst. size is the approximate length of the data line;
// a "pad" field fills the JSON up to it.
func appendEvent(dst []byte, seq uint64, sentNs int64, size int) []byte {
	dst = append(dst, "id: "...)
	dst = strconv.AppendUint(dst, seq, 10)
	dst = append(dst, "\nevent: quote\n"...)
	start := len(dst)
	dst = append(dst, `data: {"seq":`...)
	dst = strconv.AppendUint(dst, seq, 10)
	dst = append(dst, `,"t":`...)
	dst = strconv.AppendInt(dst, sentNs, 10)
	dst = append(dst, `,"type":"quote","symbol":"`...)
	dst = append(dst, quoteSymbols[seq%uint64(len(quoteSymbols))]...)
	cents := 10000 + int64(seq*7919%5000)
	dst = append(dst, `","bid":`...)
	dst = appendCents(dst, cents)
	dst = append(dst, `,"ask":`...)
	dst = appendCents(dst, cents+2)
	dst = append(dst, `,"size":`...)
	dst = strconv.AppendUint(dst, 100*(1+seq%37), 10)
	dst = append(dst, `,"venue":"XNAS","trace":"`...)
	dst = appendHex16(dst, seq*0x9e3779b97f4a7c15)
	dst = appendHex16(dst, seq*0xc2b2ae3d27d4eb4f+uint64(sentNs))
	dst = append(dst, `","pad":"`...)
	// 3 more bytes close the JSON and the line: `"}` and LF.
	for n := size - (len(dst) - start) - 3; n > 0; n-- {
		dst = append(dst, 'x')
	}
	dst = append(dst, "\"}\n\n"...)
	return dst
}

func appendCents(dst []byte, cents int64) []byte {
	dst = strconv.AppendInt(dst, cents/100, 10)
	c := cents % 100
	return append(dst, '.', byte('0'+c/10), byte('0'+c%10))
}

func appendHex16(dst []byte, v uint64) []byte {
	const hex = "0123456789abcdef"
	for s := 60; s >= 0; s -= 4 {
		dst = append(dst, hex[(v>>uint(s))&15])
	}
	return dst
}

var (
	dataPrefix = []byte("data:")
	seqKey     = []byte(`"seq":`)
	timeKey    = []byte(`"t":`)
)

// parseDataLine extracts seq and the send time from one line of the stream
// (with or without its line terminator). ok is false for lines that are
// not data lines or whose data lacks either number (e.g. a data line of
// some other event, padding or a heartbeat comment). It does not allocate.
func parseDataLine(line []byte) (seq uint64, sentNs int64, ok bool) {
	if !bytes.HasPrefix(line, dataPrefix) {
		return 0, 0, false
	}
	rest := line[len(dataPrefix):]
	i := bytes.Index(rest, seqKey)
	if i < 0 {
		return 0, 0, false
	}
	rest = rest[i+len(seqKey):]
	seq, n := parseUint(rest)
	if n == 0 {
		return 0, 0, false
	}
	rest = rest[n:]
	j := bytes.Index(rest, timeKey)
	if j < 0 {
		return 0, 0, false
	}
	t, m := parseUint(rest[j+len(timeKey):])
	if m == 0 || t > 1<<63-1 {
		return 0, 0, false
	}
	return seq, int64(t), true
}

// parseUint parses the leading decimal digits of b, returning the value and
// how many bytes it used (0 when b does not start with a digit or the
// number overflows uint64).
func parseUint(b []byte) (v uint64, n int) {
	for n < len(b) && b[n] >= '0' && b[n] <= '9' {
		d := uint64(b[n] - '0')
		if v > (1<<64-1-d)/10 {
			return 0, 0
		}
		v = v*10 + d
		n++
	}
	return v, n
}
