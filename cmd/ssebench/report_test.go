package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
)

func sampleResults() []result {
	var rs []result
	for _, n := range []int{100, 1000, 5000} {
		for i, p := range []string{"fanout", "passthrough", "reverse_proxy", "direct"} {
			rs = append(rs, result{Proxy: p, Clients: n, Mode: "stream", Delivered: int64(n * 100),
				CPUPerEvUs: float64(i+1) * 2.5, KiBPerConn: float64(10 * (i + 1)), CPUPercent: 5, Share: 1})
		}
	}
	return rs
}

// wellFormed decodes the whole document and counts elements by name.
func wellFormed(t *testing.T, doc []byte) map[string]int {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(doc))
	counts := map[string]int{}
	depth, roots := 0, 0
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v\n%s", err, doc)
		}
		switch el := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				roots++
				if el.Name.Local != "svg" || el.Name.Space != "http://www.w3.org/2000/svg" {
					t.Fatalf("root element %v, want svg in the SVG namespace", el.Name)
				}
			}
			depth++
			counts[el.Name.Local]++
		case xml.EndElement:
			depth--
		}
	}
	if roots != 1 || depth != 0 {
		t.Fatalf("%d root elements, final depth %d", roots, depth)
	}
	return counts
}

func TestWriteSVG(t *testing.T) {
	var buf bytes.Buffer
	if err := writeSVG(&buf, "caddy-sse <bench> & co", "2 CPUs \"quoted\"", panelsFor(sampleResults())); err != nil {
		t.Fatal(err)
	}
	c := wellFormed(t, buf.Bytes())
	// Two panels, three proxies each (direct is left out of the charts).
	if c["polyline"] != 6 {
		t.Errorf("%d polylines, want 6", c["polyline"])
	}
	if c["circle"] != 18 {
		t.Errorf("%d points, want 18", c["circle"])
	}
	if strings.Contains(buf.String(), "direct") {
		t.Error("the direct (no proxy) series should not be charted")
	}
	if strings.Contains(buf.String(), "NaN") || strings.Contains(buf.String(), "Inf") {
		t.Error("non-finite coordinates in the SVG")
	}
}

func TestWriteSVGDegenerate(t *testing.T) {
	for name, panels := range map[string][]panel{
		"empty":      nil,
		"no series":  {{title: "a"}, {title: "b"}},
		"one point":  {{title: "cpu", series: []series{{name: "x&y", pts: []point{{100, 0}}}}}},
		"all zeros":  {{title: "cpu", series: []series{{name: "z", pts: []point{{100, 0}, {1000, 0}}}}}},
		"non-finite": {{title: "cpu", series: []series{{name: "n", pts: []point{{100, math.NaN()}, {1000, math.Inf(1)}, {0, 1}}}}}},
	} {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := writeSVG(&buf, "t", "", panels); err != nil {
				t.Fatal(err)
			}
			wellFormed(t, buf.Bytes())
			if s := buf.String(); strings.Contains(s, "NaN") || strings.Contains(s, "Inf") {
				t.Errorf("non-finite coordinates:\n%s", s)
			}
		})
	}
}

func TestWriteSVGOneClientCountDrawsBars(t *testing.T) {
	rs := []result{
		{Proxy: "fanout", Clients: 9000, Mode: "idle", CPUPercent: 2.5, KiBPerConn: 38.8},
		{Proxy: "reverse_proxy", Clients: 9000, Mode: "idle", CPUPercent: 0, KiBPerConn: 86.7},
	}
	var buf bytes.Buffer
	if err := writeSVG(&buf, "idle", "", panelsFor(rs)); err != nil {
		t.Fatal(err)
	}
	c := wellFormed(t, buf.Bytes())
	// 2 panels x 2 series bars, plus the background and 2 frames.
	if c["rect"] != 4+3 || c["polyline"] != 0 {
		t.Errorf("%d rects, %d polylines; want 7 and 0", c["rect"], c["polyline"])
	}
	if !strings.Contains(buf.String(), ">38.8<") {
		t.Error("bars should be labelled with their values")
	}
}

func TestIdlePanels(t *testing.T) {
	rs := []result{
		{Proxy: "passthrough", Clients: 10000, Mode: "idle", CPUPercent: 3, KiBPerConn: 20},
		{Proxy: "reverse_proxy", Clients: 10000, Mode: "idle", CPUPercent: 1, KiBPerConn: 40},
	}
	p := panelsFor(rs)
	if len(p) != 2 || len(p[0].series) != 2 || len(p[0].series[0].pts) != 1 || p[0].series[0].pts[0].y != 3 {
		t.Errorf("idle CPU panel: %+v", p[0])
	}
	var buf bytes.Buffer
	writeTable(&buf, rs)
	if !strings.Contains(buf.String(), "| passthrough | 10000 |") || !strings.Contains(buf.String(), "0.50×") {
		t.Errorf("idle table:\n%s", buf.String())
	}
}

func TestNiceMax(t *testing.T) {
	for _, tc := range []struct{ v, max, step float64 }{
		{0, 1, 0.25}, {0.7, 0.8, 0.2}, {1, 1, 0.2}, {1.3, 1.5, 0.5}, {2.2, 2.5, 0.5}, {37, 40, 10}, {53.4, 60, 10}, {81, 100, 20}, {250, 250, 50},
	} {
		m, s := niceMax(tc.v)
		if math.Abs(m-tc.max) > 1e-9 || math.Abs(s-tc.step) > 1e-9 {
			t.Errorf("niceMax(%g) = %g, %g; want %g, %g", tc.v, m, s, tc.max, tc.step)
		}
		if m < tc.v {
			t.Errorf("niceMax(%g) = %g is below the value", tc.v, m)
		}
	}
}

func TestTableRatios(t *testing.T) {
	var buf bytes.Buffer
	writeTable(&buf, sampleResults())
	out := buf.String()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2+12 {
		t.Fatalf("%d lines, want a header, a separator and 12 rows:\n%s", len(lines), out)
	}
	// fanout: 2.5 µs and 10 KiB against reverse_proxy's 7.5 µs and 30 KiB.
	if !strings.Contains(lines[2], "| fanout | 100 |") || strings.Count(lines[2], "0.33×") != 2 {
		t.Errorf("fanout row: %s", lines[2])
	}
	if !strings.Contains(lines[4], "1.00×") {
		t.Errorf("reverse_proxy row should be 1.00×: %s", lines[4])
	}
	if strings.Contains(lines[5], "×") {
		t.Errorf("direct row should have no ratios: %s", lines[5])
	}
}

func TestMedianRun(t *testing.T) {
	rs := []result{{CPUPerEvUs: 30, Delivered: 1, P50us: 3}, {CPUPerEvUs: 10, Delivered: 1, P50us: 1}, {CPUPerEvUs: 20, Delivered: 1, P50us: 2}}
	m := medianRun(rs, false)
	if m.CPUPerEvUs != 20 || m.P50us != 2 || m.Runs != 3 {
		t.Errorf("median of 3: %+v", m)
	}
	if m := medianRun(rs[:2], false); m.CPUPerEvUs != 10 {
		t.Errorf("median of 2 should be the lower run: %+v", m)
	}
	idle := []result{{CPUPercent: 5}, {CPUPercent: 1}, {CPUPercent: 3}}
	if m := medianRun(idle, true); m.CPUPercent != 3 {
		t.Errorf("idle median: %+v", m)
	}
}
