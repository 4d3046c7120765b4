package sse

import (
	"strings"
	"testing"
)

// TestFramerHoldsAndStripsTheBOM feeds a stream that begins with a BOM in
// pieces that split events, and checks that Take hands out whole events,
// the first without its BOM.
func TestFramerHoldsAndStripsTheBOM(t *testing.T) {
	var f Framer
	var got []string
	for _, piece := range []string{"\xEF\xBB\xBFdata: a", "\n\ndata: b\n", "\ndata: c\n\n"} {
		p := []byte(piece)
		start := 0
		for off := 0; off < len(p); {
			n, complete := f.Next(p[off:])
			off += n
			if complete {
				got = append(got, string(f.Take(p[start:off])))
				f.Release()
				start = off
			}
		}
		f.Hold(p[start:])
	}
	if want := "data: a\n\n|data: b\n\n|data: c\n\n"; strings.Join(got, "|") != want {
		t.Fatalf("events %q, want %q", strings.Join(got, "|"), want)
	}
	if f.Held() != 0 {
		t.Fatalf("%d bytes held at a boundary", f.Held())
	}
}

// TestFramerDropCountsForTheBOM: a first event that is dropped takes the
// BOM with it; the next one is handed out whole.
func TestFramerDropCountsForTheBOM(t *testing.T) {
	var f Framer
	p := []byte("\xEF\xBB\xBFdata: big\n\ndata: x\n\n")
	n, _ := f.Next(p)
	f.Drop()
	m, complete := f.Next(p[n:])
	if !complete {
		t.Fatal("second event not complete")
	}
	if got := string(f.Take(p[n : n+m])); got != "data: x\n\n" {
		t.Fatalf("second event %q", got)
	}
}
