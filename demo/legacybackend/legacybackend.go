// Package legacybackend is a deliberately badly behaved Server-Sent Events
// endpoint, used by the caddy-sse demo (demo/Caddyfile) as the "legacy"
// upstream that the sse directive is put in front of.
//
// It imitates an application written without any SSE best practice, the
// kind the plugin exists for:
//
//   - no id: fields, so a reconnecting client cannot resume;
//   - no heartbeats: a burst of a few events, then 20-40 s of silence that
//     idle timeouts of proxies and load balancers like to cut;
//   - its output is written in odd pieces: split in the middle of a line,
//     a CRLF split across two writes, several events in a single write, one
//     slow event written byte by byte;
//   - it flushes at random points in the middle of events and never at an
//     event boundary, like an application that writes into a buffered
//     response and flushes "now and then": whatever follows the last flush
//     of an event waits in its buffer until the next flush.
//
// The only concession to the demo: the last event before a silence ends in
// CRLF and the flush falls between that CR and its LF (still not at a byte
// boundary between events, and a valid end of event for EventSource), so
// the event is not held back for the whole silence.
//
// The feed (payloads, timing and the way each event is cut up) is a
// deterministic function of the seed and of the time the module was
// provisioned, so every connection sees the same events at the same times
// in the same pieces: the demo page can compare a stream that goes through
// the plugin with one that does not, event by event. A connection starts
// with a "hello" event (the app's state on connect) and, with lifetime
// set, is dropped by the app after that long, to show reconnects.
//
// This package is a demo aid: it is compiled into the local build
// (cmd/caddy) only and is no part of the plugin.
package legacybackend

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Handler{})
	httpcaddyfile.RegisterHandlerDirective("legacy_sse_demo", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("legacy_sse_demo", httpcaddyfile.Before, "respond")
}

// Handler serves the legacy event stream on every request it handles.
//
// Caddyfile:
//
//	legacy_sse_demo [<matcher>] {
//		feed       ticker|orders   # payloads: stock quotes (default) or shop orders
//		burst      <min> <max>     # events per burst (3 6)
//		gap        <min> <max>     # pause between events of a burst (150ms 1200ms)
//		silence    <min> <max>     # pause between bursts (20s 40s)
//		byte_delay <duration>      # pause between the bytes of a slow event (30ms)
//		lifetime   <duration>      # drop each connection after this long (never)
//		bom                        # start the stream with a UTF-8 BOM
//		seed       <n>             # feed seed (default: from the start time)
//	}
type Handler struct {
	// Feed selects the payloads: "ticker" (default), unnamed message
	// events with stock quotes, or "orders", "order" events of a shop.
	Feed string `json:"feed,omitempty"`

	// BurstMin and BurstMax bound the number of events per burst.
	BurstMin int `json:"burst_min,omitempty"`
	BurstMax int `json:"burst_max,omitempty"`

	// GapMin and GapMax bound the pause between events of a burst.
	GapMin caddy.Duration `json:"gap_min,omitempty"`
	GapMax caddy.Duration `json:"gap_max,omitempty"`

	// SilenceMin and SilenceMax bound the pause between bursts.
	SilenceMin caddy.Duration `json:"silence_min,omitempty"`
	SilenceMax caddy.Duration `json:"silence_max,omitempty"`

	// ByteDelay is the pause between the bytes of a slow event.
	ByteDelay caddy.Duration `json:"byte_delay,omitempty"`

	// Lifetime, when positive, makes the app end each response after
	// that long (between events), as a worker recycle would.
	Lifetime caddy.Duration `json:"lifetime,omitempty"`

	// BOM starts each stream with a UTF-8 byte order mark, which
	// EventSource ignores and naive proxies trip over.
	BOM bool `json:"bom,omitempty"`

	// Seed makes the feed reproducible; zero picks one from the start
	// time.
	Seed uint64 `json:"seed,omitempty"`

	start time.Time // time of the feed's origin; the first burst starts a second later
	seed  uint64
	quit  chan struct{} // closed by Cleanup: ends this config's streams on reload and stop
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.legacy_sse_demo",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision fills in defaults and fixes the feed's origin.
func (h *Handler) Provision(caddy.Context) error {
	h.setup(time.Now())
	return nil
}

// Cleanup ends the streams this handler is serving, so that a config
// reload or a stop does not wait for them.
func (h *Handler) Cleanup() error {
	close(h.quit)
	return nil
}

func (h *Handler) setup(now time.Time) {
	if h.Feed == "" {
		h.Feed = "ticker"
	}
	if h.BurstMin == 0 {
		h.BurstMin = 3
	}
	if h.BurstMax == 0 {
		h.BurstMax = max(h.BurstMin, 6)
	}
	defDur := func(d *caddy.Duration, def time.Duration) {
		if *d == 0 {
			*d = caddy.Duration(def)
		}
	}
	defDur(&h.GapMin, 150*time.Millisecond)
	defDur(&h.GapMax, max(time.Duration(h.GapMin), 1200*time.Millisecond))
	defDur(&h.SilenceMin, 20*time.Second)
	defDur(&h.SilenceMax, max(time.Duration(h.SilenceMin), 40*time.Second))
	defDur(&h.ByteDelay, 30*time.Millisecond)
	h.start = now
	h.quit = make(chan struct{})
	h.seed = h.Seed
	if h.seed == 0 {
		h.seed = uint64(now.UnixNano())
	}
}

// Validate checks the ranges.
func (h *Handler) Validate() error {
	switch h.Feed {
	case "ticker", "orders":
	default:
		return fmt.Errorf("legacy_sse_demo: unknown feed %q (want ticker or orders)", h.Feed)
	}
	if h.BurstMin < 1 || h.BurstMax < h.BurstMin {
		return fmt.Errorf("legacy_sse_demo: burst must be 1 <= min <= max, got %d %d", h.BurstMin, h.BurstMax)
	}
	for _, r := range []struct {
		name     string
		min, max caddy.Duration
	}{{"gap", h.GapMin, h.GapMax}, {"silence", h.SilenceMin, h.SilenceMax}} {
		if r.min <= 0 || r.max < r.min {
			return fmt.Errorf("legacy_sse_demo: %s must be 0 < min <= max, got %v %v",
				r.name, time.Duration(r.min), time.Duration(r.max))
		}
	}
	if h.ByteDelay < 0 || h.Lifetime < 0 {
		return errors.New("legacy_sse_demo: byte_delay and lifetime must not be negative")
	}
	return nil
}

// ServeHTTP streams the feed until the client goes away (the request's
// context ends) or, with Lifetime set, until the app drops the connection.
// It never calls next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	ctx := r.Context()
	rc := http.NewResponseController(w)

	// The one thing the app gets right: the content type. It sends the
	// headers at once, then sits on its buffer.
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return err
	}

	now := time.Now()
	f := h.newFeed()
	for f.due.Before(now) { // join the shared feed where it is now
		f.nextBatch()
	}
	hello := f.hello(now, h.BOM)
	b := f.nextBatch()

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var lifetime <-chan time.Time
	if h.Lifetime > 0 {
		lt := time.NewTimer(time.Duration(h.Lifetime))
		defer lt.Stop()
		lifetime = lt.C
	}

	if !h.write(ctx, w, rc, timer, hello) {
		return nil
	}
	for {
		if !h.sleep(ctx, lifetime, timer, time.Until(b.at)) {
			return nil // client gone, or the app recycles the connection
		}
		if !h.write(ctx, w, rc, timer, b) {
			return nil
		}
		b = f.nextBatch()
	}
}

// write carries out a batch's writes and flushes. It reports false when
// the client is gone.
func (h *Handler) write(ctx context.Context, w http.ResponseWriter, rc *http.ResponseController, timer *time.Timer, b batch) bool {
	for i, op := range b.writes {
		if b.slow && i > 0 && !h.sleep(ctx, nil, timer, time.Duration(h.ByteDelay)) {
			return false
		}
		if _, err := w.Write(op.p); err != nil {
			return false
		}
		if op.flush {
			if err := rc.Flush(); err != nil {
				return false
			}
		}
	}
	return ctx.Err() == nil
}

// sleep waits d on timer. It reports false if ctx ends, the handler is
// cleaned up, or stop fires, whichever comes first.
func (h *Handler) sleep(ctx context.Context, stop <-chan time.Time, timer *time.Timer, d time.Duration) bool {
	if d > 0 {
		timer.Reset(d) // Go >= 1.23: Reset on a fired or stopped timer needs no draining
		select {
		case <-timer.C:
		case <-ctx.Done():
			return false
		case <-h.quit:
			return false
		case <-stop:
			return false
		}
	}
	select { // also when running late (d <= 0): never miss the end
	case <-ctx.Done():
		return false
	case <-h.quit:
		return false
	case <-stop:
		return false
	default:
		return true
	}
}

// batch is what the app writes at one time: one event, or several events
// at once, with the way they are cut into writes and where it flushes.
type batch struct {
	at     time.Time
	wire   []byte    // every byte of the batch
	writes []writeOp // wire, cut into writes
	slow   bool      // pause ByteDelay between writes
	shape  string    // how the batch is cut up (for tests and debugging)
}

type writeOp struct {
	p     []byte
	flush bool // flush after this write
}

// cut splits wire at the given offsets (each in (0, len(wire)), any order,
// duplicates allowed) and flushes after the writes that end at an offset
// in flushAt.
func cut(wire []byte, cuts []int, flushAt map[int]bool) []writeOp {
	at := make([]bool, len(wire)+1)
	for _, c := range cuts {
		at[c] = true
	}
	for c := range flushAt {
		at[c] = true
	}
	var ops []writeOp
	last := 0
	for i := 1; i < len(wire); i++ {
		if at[i] {
			ops = append(ops, writeOp{p: wire[last:i], flush: flushAt[i]})
			last = i
		}
	}
	return append(ops, writeOp{p: wire[last:]})
}

var symbols = []string{"ACME", "GLOBX", "INITECH", "UMBRL", "HOOLI"}

// feed generates the shared, deterministic schedule.
type feed struct {
	h      *Handler
	rng    *rand.Rand
	due    time.Time // time of the next batch
	left   int       // events left in the current burst
	seq    int64     // last event number generated
	prices []float64
	orders int
}

func (h *Handler) newFeed() *feed {
	f := &feed{
		h:      h,
		rng:    rand.New(rand.NewPCG(h.seed, 0x5e5)),
		due:    h.start.Add(time.Second),
		prices: make([]float64, len(symbols)),
	}
	for i := range f.prices {
		f.prices[i] = 20 + float64(f.rng.IntN(18000))/100
	}
	return f
}

func (f *feed) between(lo, hi caddy.Duration) time.Duration {
	if hi <= lo {
		return time.Duration(lo)
	}
	return time.Duration(lo) + time.Duration(f.rng.Int64N(int64(hi-lo)+1))
}

// payload returns the next event's name and JSON data.
func (f *feed) payload(at time.Time) (name string, data []byte) {
	f.seq++
	ts := at.UnixMilli()
	if f.h.Feed == "orders" {
		f.orders++
		status := []string{"placed", "paid", "packed", "shipped"}[f.rng.IntN(4)]
		return "order", fmt.Appendf(nil,
			`{"seq":%d,"order":"SO-%05d","sku":"SKU-%04d","qty":%d,"status":%q,"ts":%d}`,
			f.seq, 10000+f.orders, f.rng.IntN(10000), 1+f.rng.IntN(5), status, ts)
	}
	i := f.rng.IntN(len(symbols))
	old := f.prices[i]
	f.prices[i] = math.Max(1, math.Round(old*(1+f.rng.NormFloat64()*0.004)*100)/100)
	return "", fmt.Appendf(nil, `{"seq":%d,"sym":%q,"px":%.2f,"chg":%.2f,"ts":%d}`,
		f.seq, symbols[i], f.prices[i], f.prices[i]-old, ts)
}

// encode frames one event. With crlf its lines end in CRLF; with split its
// JSON data is spread over two data lines (at a comma, so the joined data
// is still the same JSON, with a newline in it).
func encode(name string, data []byte, crlf, split bool) []byte {
	eol := "\n"
	if crlf {
		eol = "\r\n"
	}
	var b []byte
	if name != "" {
		b = append(b, "event: "+name+eol...)
	}
	lines := [][]byte{data}
	if split {
		for i := len(data) / 2; i < len(data)-1; i++ {
			if data[i] == ',' {
				lines = [][]byte{data[:i+1], data[i+1:]}
				break
			}
		}
	}
	for _, l := range lines {
		b = append(b, "data: "...)
		b = append(b, l...)
		b = append(b, eol...)
	}
	return append(b, eol...)
}

// nextBatch generates the next batch of the schedule: when it is due, its
// bytes, and how the app writes them.
func (f *feed) nextBatch() batch {
	if f.left == 0 {
		f.left = f.h.BurstMin + f.rng.IntN(f.h.BurstMax-f.h.BurstMin+1)
	}
	b := batch{at: f.due}
	r := f.rng.Float64()
	switch {
	case r < 0.15 && f.left >= 2:
		b.shape = "coalesced"
	case r < 0.35:
		b.shape = "crlf"
	case r < 0.47:
		b.shape = "slow"
	default:
		b.shape = "split"
	}
	n := 1
	if b.shape == "coalesced" {
		n = 2 + f.rng.IntN(min(f.left, 3)-1)
	}
	f.left -= n
	pause := f.left == 0 // a silence follows this batch

	var starts []int // where each event of the batch starts in wire
	for i := range n {
		name, data := f.payload(b.at)
		last := i == n-1
		crlf := b.shape == "crlf" || (last && pause) || f.rng.IntN(6) == 0
		starts = append(starts, len(b.wire))
		b.wire = append(b.wire, encode(name, data, crlf, f.rng.IntN(5) == 0)...)
	}
	w := b.wire
	cuts := []int{}
	flush := map[int]bool{}
	lastStart := starts[len(starts)-1]
	inLast := func() int { return lastStart + 1 + f.rng.IntN(len(w)-lastStart-2) } // in (lastStart, len(w)-1)
	switch b.shape {
	case "split":
		// Two to four writes cut anywhere (mostly mid-line); one flush
		// after one of them, never after the last.
		k := 1 + f.rng.IntN(3)
		for range k {
			cuts = append(cuts, inLast())
		}
		flush[cuts[f.rng.IntN(len(cuts))]] = true
	case "crlf":
		// The CRLF of a line that does not end the event is split
		// across two writes, and the app flushes right between them.
		var crs []int
		for i := 0; i+3 < len(w); i++ {
			if w[i] == '\r' && w[i+1] == '\n' {
				crs = append(crs, i+1)
			}
		}
		c := crs[f.rng.IntN(len(crs))]
		cuts = append(cuts, c)
		flush[c] = true
	case "coalesced":
		// All events but the tail of the last one in a single write,
		// then a flush, then the tail.
		c := inLast()
		cuts = append(cuts, c)
		flush[c] = true
	case "slow":
		// One byte per write, ByteDelay apart; a flush every few bytes.
		b.slow = true
		next := 1 + f.rng.IntN(6)
		for i := 1; i < len(w); i++ {
			cuts = append(cuts, i)
			if i == next {
				flush[i] = true
				next += 2 + f.rng.IntN(6)
			}
		}
	}
	if pause {
		// Flush between the CR and the LF of the blank line: the event is
		// complete for EventSource, the LF waits in the buffer through the
		// silence.
		cuts = append(cuts, len(w)-1)
		flush[len(w)-1] = true
		f.due = f.due.Add(f.between(f.h.SilenceMin, f.h.SilenceMax))
	} else {
		f.due = f.due.Add(f.between(f.h.GapMin, f.h.GapMax))
	}
	b.writes = cut(w, cuts, flush)
	return b
}

// hello is the event the app sends on connect: where the feed is. It is
// written in two pieces with the flush between the final CR and LF.
func (f *feed) hello(now time.Time, bom bool) batch {
	var data []byte
	if f.h.Feed == "orders" {
		data = fmt.Appendf(nil, `{"type":"hello","feed":"orders","seq":%d,"orders":%d,"ts":%d}`,
			f.seq, f.orders, now.UnixMilli())
	} else {
		data = fmt.Appendf(nil, `{"type":"hello","feed":"ticker","seq":%d,"quotes":{`, f.seq)
		for i, s := range symbols {
			if i > 0 {
				data = append(data, ',')
			}
			data = fmt.Appendf(data, "%q:%.2f", s, f.prices[i])
		}
		data = fmt.Appendf(data, `},"ts":%d}`, now.UnixMilli())
	}
	var w []byte
	if bom {
		w = append(w, "\uFEFF"...)
	}
	w = append(w, encode("", data, true, false)...)
	return batch{at: now, wire: w, shape: "hello", writes: cut(w, nil, map[int]bool{len(w) - 1: true})}
}

// parseCaddyfile sets up the handler from Caddyfile tokens.
func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile implements caddyfile.Unmarshaler; see Handler for the
// syntax.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	durations := func(dst ...*caddy.Duration) error {
		for _, p := range dst {
			if !d.NextArg() {
				return d.ArgErr()
			}
			v, err := caddy.ParseDuration(d.Val())
			if err != nil {
				return d.Errf("%s: %v", d.Val(), err)
			}
			*p = caddy.Duration(v)
		}
		if d.NextArg() {
			return d.ArgErr()
		}
		return nil
	}
	for d.NextBlock(0) {
		var err error
		switch d.Val() {
		case "feed":
			if !d.AllArgs(&h.Feed) {
				return d.ArgErr()
			}
		case "burst":
			var lo, hi string
			if !d.AllArgs(&lo, &hi) {
				return d.ArgErr()
			}
			if h.BurstMin, err = strconv.Atoi(lo); err == nil {
				h.BurstMax, err = strconv.Atoi(hi)
			}
			if err != nil {
				return d.Errf("burst: %v", err)
			}
		case "gap":
			err = durations(&h.GapMin, &h.GapMax)
		case "silence":
			err = durations(&h.SilenceMin, &h.SilenceMax)
		case "byte_delay":
			err = durations(&h.ByteDelay)
		case "lifetime":
			err = durations(&h.Lifetime)
		case "bom":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.BOM = true
		case "seed":
			var s string
			if !d.AllArgs(&s) {
				return d.ArgErr()
			}
			if h.Seed, err = strconv.ParseUint(s, 10, 64); err != nil {
				return d.Errf("seed: %v", err)
			}
		default:
			return d.Errf("unknown subdirective %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
)
