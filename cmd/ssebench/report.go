package main

import (
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"time"
)

// result is one proxy at one client count.
type result struct {
	Proxy   string `json:"proxy"`
	Clients int    `json:"clients"`
	Mode    string `json:"mode"` // stream, idle or burst
	Runs    int    `json:"runs"` // repetitions this is the median of
	// Protocol is the clients' protocol: HTTP/1.1 or h2c; empty in results
	// written before -h2 existed (HTTP/1.1).
	Protocol string `json:"protocol,omitempty"`

	Connected   int64  `json:"connected"`
	ConnErrs    int64  `json:"connect_errors"`
	Disconnects int64  `json:"disconnects"`
	Upstreams   int64  `json:"upstreams"`                  // upstream connections open at the end of the window
	Encoding    string `json:"content_encoding,omitempty"` // of the responses; a mix is listed with counts

	WindowSec float64 `json:"window_s"`
	Emitted   uint64  `json:"emitted"`   // events the emitter sent during the window
	Expected  float64 `json:"expected"`  // Emitted x clients connected at the window's start
	Delivered int64   `json:"delivered"` // events received by all clients in the window
	Lost      int64   `json:"lost"`      // seq gaps seen by clients in the window
	Dups      int64   `json:"dups"`
	PerSec    float64 `json:"delivered_per_s"`
	Share     float64 `json:"share"` // Delivered / Expected

	P50us  float64 `json:"p50_us"`
	P99us  float64 `json:"p99_us"`
	MaxUs  float64 `json:"max_us"`
	MeanUs float64 `json:"mean_us"`

	CPUSec     float64 `json:"proxy_cpu_s"`
	CPUPercent float64 `json:"proxy_cpu_pct"` // of one core
	CPUPerEvUs float64 `json:"proxy_cpu_us_per_event"`
	BaseRSS    int64   `json:"proxy_idle_rss"`
	RSS        int64   `json:"proxy_rss"`
	KiBPerConn float64 `json:"proxy_kib_per_client"`
	GenCPUPct  float64 `json:"bench_cpu_pct"`                  // the bench process itself (emitter + clients)
	Comments   float64 `json:"comment_lines_per_client"`       // heartbeats and other comment lines received in the window
	WireBytes  int64   `json:"wire_bytes,omitempty"`           // bytes the clients read from their sockets during the window (h2c: response body bytes)
	WirePerEv  float64 `json:"wire_bytes_per_event,omitempty"` // WireBytes / (Emitted x clients connected)

	BurstPerSec   float64 `json:"burst_deliveries_per_s,omitempty"`
	BurstComplete float64 `json:"burst_completion_ms,omitempty"` // median over bursts
	Bursts        int     `json:"bursts,omitempty"`

	// Cluster proxy only: nodes, and redis-server's share. CPUPerEvUs and
	// KiBPerConn are then the sum over the nodes, Redis not included.
	Nodes             int     `json:"nodes,omitempty"`
	RedisCPUPercent   float64 `json:"redis_cpu_pct,omitempty"`
	RedisCPUPerEvUs   float64 `json:"redis_cpu_us_per_event,omitempty"`  // per delivered event
	RedisCallsPerEv   float64 `json:"redis_calls_per_event,omitempty"`   // per emitted event: every command, those run inside scripts included (INFO commandstats)
	RedisScriptsPerEv float64 `json:"redis_scripts_per_event,omitempty"` // EVALSHA/EVAL/FCALL per emitted event
	RedisTop          string  `json:"redis_top_commands,omitempty"`      // the commands called most in the window

	FirstErr string `json:"first_error,omitempty"`
}

// baselineOf finds the plain reverse_proxy result at the same client count.
func baselineOf(rs []result, r result) (result, bool) {
	for _, b := range rs {
		if b.Proxy == "reverse_proxy" && b.Clients == r.Clients && b.Mode == r.Mode && b.Protocol == r.Protocol {
			return b, true
		}
	}
	return result{}, false
}

func ratio(a, b float64) string {
	if b <= 0 || a < 0 || math.IsNaN(a) || math.IsNaN(b) {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func ms(us float64) string { return fmt.Sprintf("%.1f", us/1000) }

// writeTable prints the results as a markdown table. In idle mode, only
// the connection and memory columns mean something; in burst mode the
// burst throughput replaces the steady rate.
func writeTable(w io.Writer, rs []result) {
	if len(rs) == 0 {
		return
	}
	switch rs[0].Mode {
	case "idle":
		fmt.Fprintln(w, "| proxy | clients | connected | conn errs | disconnects | upstreams | comments/client | proxy CPU % | RSS Δ MiB | KiB/client | ×rp |")
		fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
		for _, r := range rs {
			b, ok := baselineOf(rs, r)
			mem := "–"
			if ok && r.Proxy != "direct" {
				mem = ratio(r.KiBPerConn, b.KiBPerConn)
			}
			fmt.Fprintf(w, "| %s | %d | %d | %d | %d | %d | %.1f | %.2f | %.1f | %.1f | %s |\n",
				r.Proxy, r.Clients, r.Connected, r.ConnErrs, r.Disconnects, r.Upstreams, r.Comments,
				r.CPUPercent, float64(r.RSS-r.BaseRSS)/(1<<20), r.KiBPerConn, mem)
		}
		return
	}
	burst := rs[0].Mode == "burst"
	rate := "events/s"
	if burst {
		rate = "burst deliveries/s"
	}
	fmt.Fprintf(w, "| proxy | clients | conn errs / disc | upstreams | %s | delivered | p50 ms | p99 ms | max ms | proxy CPU %% | CPU µs/event | ×rp | KiB/client | ×rp |\n", rate)
	fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
	for _, r := range rs {
		b, ok := baselineOf(rs, r)
		cpuR, memR := "–", "–"
		if ok && r.Proxy != "direct" {
			cpuR = ratio(r.CPUPerEvUs, b.CPUPerEvUs)
			memR = ratio(r.KiBPerConn, b.KiBPerConn)
		}
		perSec := r.PerSec
		if burst {
			perSec = r.BurstPerSec
		}
		cpuEv := "–"
		if r.Delivered > 0 && r.Proxy != "direct" {
			cpuEv = fmt.Sprintf("%.2f", r.CPUPerEvUs)
		}
		fmt.Fprintf(w, "| %s | %d | %d / %d | %d | %.0f | %.1f%% | %s | %s | %s | %.1f | %s | %s | %.1f | %s |\n",
			r.Proxy, r.Clients, r.ConnErrs, r.Disconnects, r.Upstreams, perSec, 100*r.Share,
			ms(r.P50us), ms(r.P99us), ms(r.MaxUs), r.CPUPercent, cpuEv, cpuR, r.KiBPerConn, memR)
	}
}

// writeClusterTable prints, when there are cluster results, how each
// compares with single-node fan-out at the same client count in the same
// run (CPU per delivered event: the nodes' sum, then with Redis added; p99
// latency) and what it costs Redis.
func writeClusterTable(w io.Writer, rs []result) {
	var cls []result
	for _, r := range rs {
		if r.Proxy == "cluster" || r.Proxy == "nodes" {
			cls = append(cls, r)
		}
	}
	if len(cls) == 0 {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| cluster | clients | nodes | CPU µs/event (nodes) | ×fanout | + Redis µs/event | ×fanout with Redis | p99 ms | p99 − fanout's, ms | Redis CPU % | Redis calls/event | scripts/event | top Redis commands in the window |")
	fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
	for _, r := range cls {
		var f result
		found := false
		for _, b := range rs {
			if b.Proxy == "fanout" && b.Clients == r.Clients && b.Mode == r.Mode && b.Protocol == r.Protocol {
				f, found = b, true
			}
		}
		x, xr, dp99 := "–", "–", "–"
		if found {
			x = ratio(r.CPUPerEvUs, f.CPUPerEvUs)
			xr = ratio(r.CPUPerEvUs+r.RedisCPUPerEvUs, f.CPUPerEvUs)
			dp99 = fmt.Sprintf("%+.1f", (r.P99us-f.P99us)/1000)
		}
		redisEv, redisPct, calls, scripts, top := fmt.Sprintf("%.2f", r.RedisCPUPerEvUs), fmt.Sprintf("%.1f", r.RedisCPUPercent),
			fmt.Sprintf("%.1f", r.RedisCallsPerEv), fmt.Sprintf("%.2f", r.RedisScriptsPerEv), r.RedisTop
		if r.Proxy == "nodes" { // no Redis at all
			redisEv, redisPct, calls, scripts, top, xr = "–", "–", "–", "–", "", "–"
		}
		fmt.Fprintf(w, "| %s | %d | %d | %.2f | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			r.Proxy, r.Clients, r.Nodes, r.CPUPerEvUs, x, redisEv, xr, ms(r.P99us), dp99,
			redisPct, calls, scripts, top)
	}
}

// Chart data: a panel has a title and one series per proxy.
type point struct{ x, y float64 }

type series struct {
	name string
	pts  []point
}

type panel struct {
	title  string
	ylabel string
	series []series
}

// panelsFor turns results into the two chart panels: CPU (µs per delivered
// event, or % of a core in idle mode) and memory (KiB per client) against
// the number of clients.
func panelsFor(rs []result) []panel {
	idle := len(rs) > 0 && rs[0].Mode == "idle"
	cpu := panel{title: "Proxy CPU per delivered event", ylabel: "µs / event"}
	if idle {
		cpu = panel{title: "Proxy CPU, idle streams", ylabel: "% of one core"}
	}
	mem := panel{title: "Proxy memory per client", ylabel: "KiB / client"}
	var order []string
	by := map[string][]result{}
	for _, r := range rs {
		if r.Proxy == "direct" {
			continue
		}
		if _, ok := by[r.Proxy]; !ok {
			order = append(order, r.Proxy)
		}
		by[r.Proxy] = append(by[r.Proxy], r)
	}
	for _, name := range order {
		list := by[name]
		sort.Slice(list, func(i, j int) bool { return list[i].Clients < list[j].Clients })
		var c, m series
		c.name, m.name = name, name
		for _, r := range list {
			y := r.CPUPerEvUs
			if idle {
				y = r.CPUPercent
			}
			if r.Delivered > 0 || idle {
				c.pts = append(c.pts, point{float64(r.Clients), y})
			}
			m.pts = append(m.pts, point{float64(r.Clients), r.KiBPerConn})
		}
		cpu.series = append(cpu.series, c)
		mem.series = append(mem.series, m)
	}
	return []panel{cpu, mem}
}

var seriesColors = map[string]string{
	"fanout":        "#1b9e77",
	"cluster":       "#e6ab02",
	"nodes":         "#a6761d",
	"passthrough":   "#d95f02",
	"reverse_proxy": "#7570b3",
	"encode_gzip":   "#e7298a",
	"nginx":         "#66a61e",
}

func colorOf(name string, i int) string {
	if c, ok := seriesColors[name]; ok {
		return c
	}
	extra := []string{"#e6ab02", "#a6761d", "#666666"}
	return extra[i%len(extra)]
}

// niceMax rounds v up to a round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 or
// 10 times a power of ten) and returns it with a tick step dividing it
// into 3 to 6 parts.
func niceMax(v float64) (max, step float64) {
	if !(v > 0) || math.IsInf(v, 0) {
		return 1, 0.25
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, c := range []struct{ m, step float64 }{
		{1, 0.2}, {1.5, 0.5}, {2, 0.5}, {2.5, 0.5}, {3, 0.5}, {4, 1}, {5, 1}, {6, 1}, {8, 2}, {10, 2},
	} {
		if v <= c.m*p*(1+1e-9) {
			return c.m * p, c.step * p
		}
	}
	return 10 * p, 2 * p
}

func fmtTick(v float64) string {
	switch {
	case v == 0:
		return "0"
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 1:
		return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.1f", v), "0"), ".")
	default:
		return strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.3f", v), "0"), ".")
	}
}

func esc(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	return b.String()
}

// writeSVG draws the panels side by side: x is the number of clients on a
// log scale, y starts at 0; one line per series with a shared legend.
func writeSVG(w io.Writer, title, subtitle string, panels []panel) error {
	const (
		pw      = 460      // panel width
		ml, mr  = 70, 20   // plot margins left and right in a panel
		top     = 50       // title and subtitle
		plotTop = top + 22 // below the panel title
		plotH   = 230
		legendY = plotTop + plotH + 62
	)
	width := len(panels) * pw
	height := legendY + 20
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#ffffff"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="20" text-anchor="middle" font-size="15" font-weight="bold">%s</text>`+"\n", width/2, esc(title))
	if subtitle != "" {
		fmt.Fprintf(&b, `<text x="%d" y="38" text-anchor="middle" fill="#555555">%s</text>`+"\n", width/2, esc(subtitle))
	}

	// Shared x range over all panels.
	xmin, xmax := math.Inf(1), math.Inf(-1)
	var xs []float64
	seen := map[float64]bool{}
	for _, p := range panels {
		for _, s := range p.series {
			for _, pt := range s.pts {
				if pt.x > 0 {
					xmin, xmax = math.Min(xmin, pt.x), math.Max(xmax, pt.x)
					if !seen[pt.x] {
						seen[pt.x] = true
						xs = append(xs, pt.x)
					}
				}
			}
		}
	}
	sort.Float64s(xs)
	if len(xs) == 0 {
		xmin, xmax = 1, 10
	}
	lxmin, lxmax := math.Log10(xmin), math.Log10(xmax)
	if lxmax-lxmin < 1e-9 {
		lxmin, lxmax = lxmin-0.5, lxmax+0.5
	} else {
		pad := (lxmax - lxmin) * 0.06
		lxmin, lxmax = lxmin-pad, lxmax+pad
	}

	for i, p := range panels {
		x0 := float64(i*pw + ml)
		y0 := float64(plotTop)
		iw := float64(pw - ml - mr)
		ih := float64(plotH)
		ymaxData := 0.0
		for _, s := range p.series {
			for _, pt := range s.pts {
				if pt.y > ymaxData && !math.IsInf(pt.y, 0) {
					ymaxData = pt.y
				}
			}
		}
		ymax, step := niceMax(ymaxData)
		xp := func(x float64) float64 { return x0 + (math.Log10(x)-lxmin)/(lxmax-lxmin)*iw }
		yp := func(y float64) float64 { return y0 + ih - y/ymax*ih }

		fmt.Fprintf(&b, `<g>`+"\n")
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" font-weight="bold">%s</text>`+"\n", x0+iw/2, top+12, esc(p.title))
		// Grid and y ticks.
		for y := 0.0; y <= ymax*(1+1e-9); y += step {
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>`+"\n", x0, yp(y), x0+iw, yp(y))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", x0-6, yp(y), fmtTick(y))
		}
		fmt.Fprintf(&b, `<text transform="translate(%.1f %.1f) rotate(-90)" text-anchor="middle">%s</text>`+"\n", x0-50, y0+ih/2, esc(p.ylabel))
		if len(xs) == 1 {
			// One client count: a line chart would stack dots on one
			// vertical; draw a bar per series, labelled with its value.
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#333333"/>`+"\n", x0, y0, iw, ih)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s clients</text>`+"\n", x0+iw/2, y0+ih+16, fmtTick(xs[0]))
			slot := iw / float64(max(len(p.series), 1))
			for j, s := range p.series {
				col := colorOf(s.name, j)
				for _, pt := range s.pts {
					if pt.x <= 0 || math.IsNaN(pt.y) || math.IsInf(pt.y, 0) || pt.y < 0 {
						continue
					}
					bx := x0 + slot*float64(j) + slot*0.2
					fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s: %s %s</title></rect>`+"\n",
						bx, yp(pt.y), slot*0.6, y0+ih-yp(pt.y), col, esc(s.name), fmtTick(pt.y), esc(p.ylabel))
					fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", bx+slot*0.3, yp(pt.y)-5, fmtTick(pt.y))
				}
			}
			fmt.Fprintf(&b, "</g>\n")
			continue
		}
		// X ticks at each measured client count.
		for _, x := range xs {
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>`+"\n", xp(x), y0, xp(x), y0+ih)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", xp(x), y0+ih+16, fmtTick(x))
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#333333"/>`+"\n", x0, y0, iw, ih)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">clients (log scale)</text>`+"\n", x0+iw/2, y0+ih+34)
		for j, s := range p.series {
			col := colorOf(s.name, j)
			var pts []string
			for _, pt := range s.pts {
				if pt.x <= 0 || math.IsNaN(pt.y) || math.IsInf(pt.y, 0) {
					continue
				}
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", xp(pt.x), yp(pt.y)))
			}
			if len(pts) == 0 {
				continue
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"><title>%s</title></polyline>`+"\n", col, strings.Join(pts, " "), esc(s.name))
			for _, pt := range s.pts {
				if pt.x <= 0 || math.IsNaN(pt.y) || math.IsInf(pt.y, 0) {
					continue
				}
				fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s: %s clients, %s %s</title></circle>`+"\n",
					xp(pt.x), yp(pt.y), col, esc(s.name), fmtTick(pt.x), fmtTick(pt.y), esc(p.ylabel))
			}
		}
		fmt.Fprintf(&b, "</g>\n")
	}

	// Legend, from the first panel's series.
	if len(panels) > 0 {
		lx := 20.0
		ly := float64(legendY)
		for j, s := range panels[0].series {
			col := colorOf(s.name, j)
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="3"/>`+"\n", lx, ly, lx+24, ly, col)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" dominant-baseline="middle">%s</text>`+"\n", lx+30, ly, esc(s.name))
			lx += 40 + 8*float64(len(s.name))
		}
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func fmtDur(d time.Duration) string {
	return d.Round(time.Millisecond).String()
}
