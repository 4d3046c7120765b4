package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"net/http/httputil"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

func TestAppendEventRoundTrip(t *testing.T) {
	for _, size := range []int{0, 200, 1000} {
		ev := appendEvent(nil, 4242, 1732160000123456789, size)
		if !bytes.HasSuffix(ev, []byte("\n\n")) {
			t.Fatalf("event does not end with a blank line: %q", ev)
		}
		lines := strings.Split(strings.TrimSuffix(string(ev), "\n\n"), "\n")
		if len(lines) != 3 || lines[0] != "id: 4242" || lines[1] != "event: quote" {
			t.Fatalf("unexpected event lines %q", lines)
		}
		data := lines[2]
		if size >= 200 && len(data)+1 != size {
			t.Errorf("size %d: data line is %d bytes with its LF", size, len(data)+1)
		}
		var v map[string]any
		if err := json.Unmarshal([]byte(strings.TrimPrefix(data, "data: ")), &v); err != nil {
			t.Fatalf("data is not JSON: %v: %s", err, data)
		}
		seq, sent, ok := parseDataLine([]byte(data + "\n"))
		if !ok || seq != 4242 || sent != 1732160000123456789 {
			t.Errorf("parseDataLine = %d, %d, %v", seq, sent, ok)
		}
	}
}

func TestParseDataLine(t *testing.T) {
	for _, tc := range []struct {
		line string
		seq  uint64
		t    int64
		ok   bool
	}{
		{`data: {"seq":5,"t":7}` + "\n", 5, 7, true},
		{`data: {"seq":5,"t":7}` + "\r\n", 5, 7, true},
		{`data:{"seq":18446744073709551615,"t":9223372036854775807}`, 1<<64 - 1, 1<<63 - 1, true},
		{`data: {"type":"x","seq":12,"other":1,"t":34,"pad":"x"}`, 12, 34, true},
		{`data: {"seq":5}`, 0, 0, false},                          // no time
		{`data: {"t":7,"seq":5}`, 0, 0, false},                    // time must follow seq
		{`data: {"seq":"5","t":7}`, 0, 0, false},                  // not a number
		{`data: {"seq":18446744073709551616,"t":7}`, 0, 0, false}, // overflows
		{`data: {"seq":1,"t":9223372036854775808}`, 0, 0, false},  // beyond int64
		{`id: 5`, 0, 0, false},
		{`: heartbeat {"seq":5,"t":7}`, 0, 0, false},
		{`event: quote`, 0, 0, false},
		{``, 0, 0, false},
		{`dat`, 0, 0, false},
	} {
		seq, sent, ok := parseDataLine([]byte(tc.line))
		if seq != tc.seq || sent != tc.t || ok != tc.ok {
			t.Errorf("parseDataLine(%q) = %d, %d, %v; want %d, %d, %v", tc.line, seq, sent, ok, tc.seq, tc.t, tc.ok)
		}
	}
}

func TestParseDataLineDoesNotAllocate(t *testing.T) {
	line := appendEvent(nil, 99, 123456789, 200)
	line = line[bytes.Index(line, []byte("data:")):]
	if n := testing.AllocsPerRun(100, func() { parseDataLine(line) }); n != 0 {
		t.Errorf("parseDataLine allocates %v times per call", n)
	}
}

// stream builds an event stream of events first..last with comments, a
// padding line longer than the reader's buffer and CRLF line ends mixed in.
func stream(first, last uint64, skip map[uint64]bool) []byte {
	var b []byte
	b = append(b, ": ssebench emitter\n\n"...)
	b = append(b, ":"+strings.Repeat(" ", 5000)+"\n\n"...) // padding, longer than the buffer
	for s := first; s <= last; s++ {
		if skip[s] {
			continue
		}
		ev := appendEvent(nil, s, 1000, 200)
		if s%2 == 0 {
			ev = bytes.ReplaceAll(ev, []byte("\n"), []byte("\r\n"))
		}
		b = append(b, ev...)
		b = append(b, ": heartbeat\n"...)
	}
	return b
}

func TestScanLinesCounts(t *testing.T) {
	s := newLoadStats()
	s.openWindow(0)
	var ls lineStats
	body := stream(1, 10, map[uint64]bool{4: true, 5: true})
	body = append(body, appendEvent(nil, 3, 1000, 200)...) // a duplicate
	err := scanLines(bufio.NewReaderSize(bytes.NewReader(body), 4096), s, &ls)
	if err != io.EOF {
		t.Fatalf("scanLines: %v", err)
	}
	if got := s.delivered.Load(); got != 8 {
		t.Errorf("delivered = %d, want 8", got)
	}
	if got := s.lost.Load(); got != 2 {
		t.Errorf("lost = %d, want 2", got)
	}
	if got := s.dups.Load(); got != 1 {
		t.Errorf("dups = %d, want 1", got)
	}
	if got := s.comments.Load(); got != 9 {
		t.Errorf("comment lines = %d, want 9 (hello and 8 heartbeats; the over-long padding line is skipped)", got)
	}
	if s.lat.count() != 8 {
		t.Errorf("latency samples = %d", s.lat.count())
	}
}

func TestScanLinesOutsideWindow(t *testing.T) {
	s := newLoadStats() // no window yet
	var ls lineStats
	scanLines(bufio.NewReader(bytes.NewReader(stream(1, 5, nil))), s, &ls)
	if s.delivered.Load() != 0 || s.lat.count() != 0 {
		t.Errorf("events outside the window were counted")
	}
	if ls.lastSeq != 5 {
		t.Errorf("lastSeq = %d, want 5 (tracked in every phase)", ls.lastSeq)
	}
}

// TestReadStreamEncodings sends the same stream chunked and compressed with
// a flush after every event, as a proxy would, and expects every event.
func TestReadStreamEncodings(t *testing.T) {
	raw := stream(1, 50, nil)
	for _, enc := range []string{"", "gzip", "zstd"} {
		t.Run("enc="+enc, func(t *testing.T) {
			var wire bytes.Buffer
			cw := httputil.NewChunkedWriter(&wire)
			var w io.Writer = cw
			var flush, closeEnc func() error
			switch enc {
			case "gzip":
				zw := gzip.NewWriter(cw)
				w, flush, closeEnc = zw, zw.Flush, zw.Close
			case "zstd":
				zw, err := zstd.NewWriter(cw)
				if err != nil {
					t.Fatal(err)
				}
				w, flush, closeEnc = zw, zw.Flush, zw.Close
			}
			for _, ev := range bytes.SplitAfter(raw, []byte("\n\n")) {
				w.Write(ev)
				if flush != nil {
					flush()
				}
			}
			if closeEnc != nil {
				closeEnc()
			}
			cw.Close()
			wire.WriteString("\r\n")

			s := newLoadStats()
			s.openWindow(0)
			err := readStream(bufio.NewReader(&wire), responseHead{status: 200, chunked: true, encoding: enc}, s)
			if err != nil {
				t.Fatalf("readStream: %v", err)
			}
			if got := s.delivered.Load(); got != 50 {
				t.Errorf("delivered %d, want 50", got)
			}
			if s.lost.Load() != 0 {
				t.Errorf("lost %d", s.lost.Load())
			}
		})
	}
}

func TestReadResponseHead(t *testing.T) {
	h, err := readResponseHead(bufio.NewReader(strings.NewReader(
		"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\ntransfer-encoding: Chunked\r\nContent-Encoding: GZIP\r\n\r\nbody")))
	if err != nil || h.status != 200 || !h.chunked || h.encoding != "gzip" {
		t.Errorf("got %+v, %v", h, err)
	}
	h, err = readResponseHead(bufio.NewReader(strings.NewReader("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")))
	if err != nil || h.status != 502 || h.chunked {
		t.Errorf("got %+v, %v", h, err)
	}
	if _, err := readResponseHead(bufio.NewReader(strings.NewReader("SSH-2.0-OpenSSH\r\n"))); err == nil {
		t.Error("accepted a non-HTTP status line")
	}
	if _, err := readResponseHead(bufio.NewReader(strings.NewReader("HTTP/1.1 200 OK\r\nX: y\r\n"))); err == nil {
		t.Error("accepted a truncated head")
	}
}

func TestWindowBySeq(t *testing.T) {
	s := newLoadStats()
	var a, b lineStats
	s.recordEvent(&a, 10, 1) // before the window
	s.openWindow(10)
	s.recordEvent(&a, 13, 1) // 11 and 12 missed
	s.recordEvent(&b, 11, 1) // b's first event, the first of the window
	s.closeWindow(14)
	s.recordEvent(&a, 14, 1) // late, but sent in the window: counts
	s.recordEvent(&a, 15, 1) // after the window
	s.recordEvent(&b, 12, 1)
	s.recordEvent(&b, 12, 1) // duplicate
	if s.delivered.Load() != 4 || s.lost.Load() != 2 || s.dups.Load() != 1 {
		t.Errorf("delivered %d lost %d dups %d; want 4, 2, 1", s.delivered.Load(), s.lost.Load(), s.dups.Load())
	}
}

func TestBurstRecord(t *testing.T) {
	b := &burstStats{k: 10}
	b.record(1, 5)
	b.record(10, 9)
	b.record(11, 3)
	if b.count[0].Load() != 2 || b.lastRecv[0].Load() != 9 {
		t.Errorf("burst 0: count %d last %d", b.count[0].Load(), b.lastRecv[0].Load())
	}
	if b.count[1].Load() != 1 || b.lastRecv[1].Load() != 3 {
		t.Errorf("burst 1: count %d last %d", b.count[1].Load(), b.lastRecv[1].Load())
	}
}

// TestReadStreamIsIncremental checks that each event is counted as soon as
// the proxy flushed it, before anything more arrives: decoders must not
// wait for more input than one flush.
func TestReadStreamIsIncremental(t *testing.T) {
	for _, enc := range []string{"", "gzip", "zstd"} {
		t.Run("enc="+enc, func(t *testing.T) {
			pr, pw := io.Pipe()
			s := newLoadStats()
			s.openWindow(0)
			done := make(chan error, 1)
			go func() {
				done <- readStream(bufio.NewReader(pr), responseHead{status: 200, chunked: true, encoding: enc}, s)
			}()
			cw := httputil.NewChunkedWriter(pw)
			var w io.Writer = cw
			flush := func() error { return nil }
			switch enc {
			case "gzip":
				zw := gzip.NewWriter(cw)
				w, flush = zw, zw.Flush
			case "zstd":
				zw, err := zstd.NewWriter(cw, zstd.WithEncoderConcurrency(1))
				if err != nil {
					t.Fatal(err)
				}
				w, flush = zw, zw.Flush
			}
			for i := uint64(1); i <= 5; i++ {
				w.Write(appendEvent(nil, i, 1, 200))
				flush()
				deadline := time.Now().Add(2 * time.Second)
				for s.delivered.Load() != int64(i) {
					if time.Now().After(deadline) {
						t.Fatalf("event %d not counted 2s after its flush (delivered %d)", i, s.delivered.Load())
					}
					time.Sleep(time.Millisecond)
				}
			}
			pw.Close()
			<-done
		})
	}
}

// BenchmarkReadStream measures the client's cost per event on a chunked,
// uncompressed stream (go test -bench ReadStream -benchmem): it should not
// allocate per event.
func BenchmarkReadStream(b *testing.B) {
	var wire bytes.Buffer
	cw := httputil.NewChunkedWriter(&wire)
	for i := 0; i < b.N; i++ {
		cw.Write(appendEvent(nil, uint64(i+1), 1, 200))
	}
	cw.Close()
	wire.WriteString("\r\n")
	s := newLoadStats()
	s.openWindow(0)
	b.ReportAllocs()
	b.SetBytes(int64(wire.Len() / max(b.N, 1)))
	b.ResetTimer()
	if err := readStream(bufio.NewReader(&wire), responseHead{status: 200, chunked: true}, s); err != nil {
		b.Fatal(err)
	}
	if s.delivered.Load() != int64(b.N) {
		b.Fatalf("delivered %d of %d", s.delivered.Load(), b.N)
	}
}

func TestEncodingSummary(t *testing.T) {
	s := newLoadStats()
	if got := s.encodingSummary(); got != "" {
		t.Errorf("no responses: %q", got)
	}
	s.encodings[encodingIndex("gzip")].Add(3)
	if got := s.encodingSummary(); got != "gzip" {
		t.Errorf("all gzip: %q", got)
	}
	s.encodings[encodingIndex("")].Add(1)
	s.encodings[encodingIndex("br")].Add(2)
	if got := s.encodingSummary(); got != "identity 1, gzip 3, other 2" {
		t.Errorf("mixed: %q", got)
	}
}
