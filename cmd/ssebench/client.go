package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
)

// Measurement phases, shared by all clients through loadStats.phase.
const (
	phaseRamp int32 = iota
	phaseMeasure
	phaseDone
)

// loadStats is what all clients of one run record into, without locks.
type loadStats struct {
	phase atomic.Int32

	connected  atomic.Int64 // got a 200 response head
	connErrs   atomic.Int64 // dial, request or response-head failures and non-200s
	disconnect atomic.Int64 // streams that ended before the bench closed them

	// The window is a range of event sequence numbers, (winLo, winHi]:
	// events count whenever they arrive, so that slow deliveries are
	// measured rather than cut off at the end of the window. Outside a
	// window winLo is MaxUint64. Set them with openWindow and closeWindow.
	winLo, winHi atomic.Uint64

	// Counted for events in the window.
	delivered atomic.Int64 // data events received
	lost      atomic.Int64 // seq gaps: events a client never got
	dups      atomic.Int64 // seq not above the last one seen
	discWin   atomic.Int64 // disconnects during the window
	comments  atomic.Int64 // comment lines (heartbeats, padding) received during the window
	lat       histogram

	burst *burstStats // nil unless -burst

	// Content-Encoding of the responses: identity, gzip, zstd, other.
	encodings [4]atomic.Int64

	// wire counts the bytes the clients read from their sockets (response
	// bodies as sent: compressed, with chunk framing), sampled at the
	// window's edges like the proxy's CPU time. With -h2 it counts the
	// response body bytes read (DATA payload as sent, still compressed),
	// without HTTP/2's frame headers: there is no chunk framing to count.
	wire atomic.Int64

	errMu    sync.Mutex
	firstErr string
}

func newLoadStats() *loadStats {
	s := &loadStats{}
	s.winLo.Store(math.MaxUint64)
	s.winHi.Store(math.MaxUint64)
	return s
}

// openWindow starts counting events after seq lo. Call it while no event
// above lo can have been published yet (see emitter.atomically).
func (s *loadStats) openWindow(lo uint64) {
	s.winHi.Store(math.MaxUint64)
	s.winLo.Store(lo)
	s.phase.Store(phaseMeasure)
}

// closeWindow stops counting events after seq hi (those up to hi still
// count when they arrive later).
func (s *loadStats) closeWindow(hi uint64) { s.winHi.Store(hi) }

func (s *loadStats) noteErr(err error) {
	s.errMu.Lock()
	if s.firstErr == "" {
		s.firstErr = err.Error()
	}
	s.errMu.Unlock()
}

// burstStats tracks, per burst (events seq b*K+1 .. b*K+K), how many
// deliveries arrived and when the last one did.
type burstStats struct {
	k        uint64
	count    [burstSlots]atomic.Int64
	lastRecv [burstSlots]atomic.Int64 // ns since the burst was stamped
}

const burstSlots = 4096

func (b *burstStats) record(seq uint64, lat int64) {
	i := ((seq - 1) / b.k) % burstSlots
	b.count[i].Add(1)
	for {
		m := b.lastRecv[i].Load()
		if lat <= m || b.lastRecv[i].CompareAndSwap(m, lat) {
			return
		}
	}
}

// clientConfig describes the requests the clients make.
type clientConfig struct {
	addr string // proxy host:port
	// more, when set, are further addresses of the same stream (cluster
	// nodes): connections go to addr and these in turn.
	more     []string
	path     string
	encoding string // "", "gzip" or "zstd": Accept-Encoding to send
	srcAddrs []net.IP
	dialTO   time.Duration
	h2       bool // HTTP/2 over cleartext (h2c, prior knowledge) instead of HTTP/1.1
}

// headTimeout bounds the wait for a response head, in both protocols.
const headTimeout = 10 * time.Second

// loadGen runs N clients against one proxy.
type loadGen struct {
	cfg   clientConfig
	stats *loadStats
	req   []byte      // the HTTP/1.1 request
	h2    *h2Dialer   // with -h2: opens one h2c connection per client
	hdr   http.Header // with -h2: the request's header fields

	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
	next  atomic.Uint64 // round robin over addr and more
}

// srcCounter spreads connections over the loopback source addresses for the
// whole process, so consecutive runs do not reuse ports in TIME_WAIT first.
var srcCounter atomic.Uint64

func newLoadGen(cfg clientConfig, stats *loadStats) *loadGen {
	var req bytes.Buffer
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: ssebench\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n", cfg.path, cfg.addr)
	if cfg.encoding != "" {
		fmt.Fprintf(&req, "Accept-Encoding: %s\r\n", cfg.encoding)
	}
	req.WriteString("\r\n")
	g := &loadGen{cfg: cfg, stats: stats, req: req.Bytes()}
	if cfg.h2 {
		g.h2 = newH2Dialer(func(ctx context.Context) (net.Conn, error) {
			c, err := g.dial(ctx)
			if err != nil {
				return nil, err
			}
			if !g.track(c) {
				c.Close()
				return nil, errClosing
			}
			return c, nil
		})
		g.hdr = sseHeader(cfg.encoding)
	}
	return g
}

// sseHeader is the header of the clients' HTTP/2 requests: the same fields
// as the HTTP/1.1 request's.
func sseHeader(encoding string) http.Header {
	h := http.Header{
		"User-Agent":    {"ssebench"},
		"Accept":        {"text/event-stream"},
		"Cache-Control": {"no-cache"},
	}
	if encoding != "" {
		h.Set("Accept-Encoding", encoding)
	}
	return h
}

// errClosing is a connection attempt made after closeAll: not an error of
// the proxy's.
var errClosing = errors.New("load generator closing")

// dial opens one client's TCP connection, from the next loopback source
// address.
func (g *loadGen) dial(ctx context.Context) (net.Conn, error) {
	d := net.Dialer{Timeout: g.cfg.dialTO}
	if len(g.cfg.srcAddrs) > 0 {
		ip := g.cfg.srcAddrs[srcCounter.Add(1)%uint64(len(g.cfg.srcAddrs))]
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	return d.DialContext(ctx, "tcp", g.target())
}

// target is the address of the next connection: addr, or with more
// addresses each in turn, so n clients spread evenly over the nodes.
func (g *loadGen) target() string {
	if len(g.cfg.more) == 0 {
		return g.cfg.addr
	}
	i := g.next.Add(1) - 1
	if i%uint64(len(g.cfg.more)+1) == 0 {
		return g.cfg.addr
	}
	return g.cfg.more[i%uint64(len(g.cfg.more)+1)-1]
}

// ramp opens n clients at about rate per second, with a bounded number of
// connection attempts in flight, and returns when every client either got
// its response head or failed, or ctx ends.
func (g *loadGen) ramp(ctx context.Context, n int, rate float64) error {
	sem := make(chan struct{}, 256)
	done := make(chan struct{}, n)
	start := time.Now()
	for i := 0; i < n; i++ {
		if rate > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return context.Cause(ctx)
				}
			}
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		g.wg.Add(1)
		goSafe(func() {
			defer g.wg.Done()
			g.client(sem, done)
		})
	}
	for i := 0; i < n; i++ {
		select {
		case <-done:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	return nil
}

// client is one SSE client: one TCP connection, one request, then reading
// the stream until it ends or the bench closes the connection. It signals
// done once the response head arrived (or the attempt failed) and releases
// its slot in sem.
func (g *loadGen) client(sem chan struct{}, done chan<- struct{}) {
	signalled := false
	signal := func() {
		if !signalled {
			signalled = true
			<-sem
			done <- struct{}{}
		}
	}
	defer signal()
	if g.h2 != nil {
		g.clientH2(signal)
	} else {
		g.clientH1(signal)
	}
}

// clientH1 is one HTTP/1.1 client; it calls connected once the response
// head arrived.
func (g *loadGen) clientH1(connected func()) {
	s := g.stats
	c, err := g.dial(context.Background())
	if err != nil {
		s.connErrs.Add(1)
		s.noteErr(err)
		return
	}
	if !g.track(c) {
		c.Close()
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(headTimeout))
	if _, err := c.Write(g.req); err != nil {
		s.connErrs.Add(1)
		s.noteErr(err)
		return
	}
	br := bufio.NewReaderSize(wireCounter{c, &s.wire}, 4096)
	h, err := readResponseHead(br)
	if err != nil {
		if s.phase.Load() != phaseDone {
			s.connErrs.Add(1)
			s.noteErr(err)
		}
		return
	}
	if h.status != 200 {
		s.connErrs.Add(1)
		s.noteErr(fmt.Errorf("status %d", h.status))
		return
	}
	c.SetDeadline(time.Time{})
	s.encodings[encodingIndex(h.encoding)].Add(1)
	s.connected.Add(1)
	connected()
	g.streamEnded(readStream(br, h, s))
}

// clientH2 is one HTTP/2 client: its own h2c connection (prior knowledge)
// carrying one stream. It calls connected once the response head arrived.
func (g *loadGen) clientH2(connected func()) {
	s := g.stats
	resp, closeConn, err := g.h2.get(g.cfg.addr, g.cfg.path, g.hdr, headTimeout)
	if err != nil {
		if !errors.Is(err, errClosing) && s.phase.Load() != phaseDone {
			s.connErrs.Add(1)
			s.noteErr(err)
		}
		return
	}
	defer closeConn()
	if resp.StatusCode != 200 {
		s.connErrs.Add(1)
		s.noteErr(fmt.Errorf("status %d", resp.StatusCode))
		return
	}
	enc := strings.ToLower(resp.Header.Get("Content-Encoding"))
	s.encodings[encodingIndex(enc)].Add(1)
	s.connected.Add(1)
	connected()
	// No chunk framing to count: the body bytes as sent (still compressed).
	g.streamEnded(readBody(wireCounter{resp.Body, &s.wire}, enc, s))
}

// streamEnded accounts a stream that ended with err (nil: a clean end):
// a disconnect, unless the bench itself is closing the clients.
func (g *loadGen) streamEnded(err error) {
	s := g.stats
	if s.phase.Load() != phaseDone {
		s.disconnect.Add(1)
		if s.phase.Load() == phaseMeasure {
			s.discWin.Add(1)
		}
		if err == nil {
			err = io.EOF
		}
		s.noteErr(fmt.Errorf("stream ended: %w", err))
	}
}

func (g *loadGen) track(c net.Conn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stats.phase.Load() == phaseDone {
		return false
	}
	g.conns = append(g.conns, c)
	return true
}

// closeAll ends every client and waits (up to d) for their goroutines.
func (g *loadGen) closeAll(d time.Duration) {
	g.stats.phase.Store(phaseDone)
	g.mu.Lock()
	for _, c := range g.conns {
		c.Close()
	}
	g.conns = nil
	g.mu.Unlock()
	ch := make(chan struct{})
	go func() { g.wg.Wait(); close(ch) }()
	select {
	case <-ch:
	case <-time.After(d):
	}
}

var encodingNames = [...]string{"identity", "gzip", "zstd", "other"}

func encodingIndex(enc string) int {
	switch enc {
	case "", "identity":
		return 0
	case "gzip":
		return 1
	case "zstd":
		return 2
	}
	return 3
}

// encodingSummary names the Content-Encoding the responses had, or lists
// the mix ("gzip 90, identity 10").
func (s *loadStats) encodingSummary() string {
	var parts []string
	for i, name := range encodingNames {
		if n := s.encodings[i].Load(); n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", name, n))
		}
	}
	if len(parts) == 1 {
		name, _, _ := strings.Cut(parts[0], " ")
		return name
	}
	return strings.Join(parts, ", ")
}

type responseHead struct {
	status      int
	chunked     bool
	encoding    string
	contentType string
}

// readResponseHead parses an HTTP/1.1 status line and the header fields
// the client cares about.
func readResponseHead(br *bufio.Reader) (responseHead, error) {
	var h responseHead
	line, err := br.ReadSlice('\n')
	if err != nil {
		return h, fmt.Errorf("reading status line: %w", err)
	}
	f := bytes.Fields(line)
	if len(f) < 2 || !bytes.HasPrefix(f[0], []byte("HTTP/1.")) {
		return h, fmt.Errorf("malformed status line %q", bytes.TrimSpace(line))
	}
	if h.status, err = strconv.Atoi(string(f[1])); err != nil {
		return h, fmt.Errorf("malformed status line %q", bytes.TrimSpace(line))
	}
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return h, fmt.Errorf("reading header: %w", err)
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			return h, nil
		}
		name, val, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		val = bytes.TrimSpace(val)
		switch {
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			h.chunked = bytes.Contains(bytes.ToLower(val), []byte("chunked"))
		case bytes.EqualFold(name, []byte("Content-Encoding")):
			h.encoding = string(bytes.ToLower(val))
		case bytes.EqualFold(name, []byte("Content-Type")):
			h.contentType = string(val)
		}
	}
}

// readStream reads an HTTP/1.1 body as event-stream lines and records every
// data event. It returns when the stream ends (nil on a clean EOF).
func readStream(br *bufio.Reader, h responseHead, s *loadStats) error {
	var body io.Reader = br
	if h.chunked {
		body = httputil.NewChunkedReader(br)
	}
	return readBody(body, h.encoding, s)
}

// readBody decodes a response body (without transfer framing) by its
// Content-Encoding, reads it as event-stream lines and records every data
// event. It returns when the stream ends (nil on a clean EOF).
func readBody(body io.Reader, encoding string, s *loadStats) error {
	var lines *bufio.Reader
	switch encoding {
	case "", "identity":
		// body itself when it is a large enough bufio.Reader already.
		lines = bufio.NewReaderSize(body, 4096)
	case "gzip":
		zr, err := gzip.NewReader(body)
		if err != nil {
			return fmt.Errorf("gzip: %w", err)
		}
		zr.Multistream(false)
		lines = bufio.NewReaderSize(zr, 4096)
	case "zstd":
		zr, err := zstd.NewReader(body, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
		if err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		defer zr.Close()
		lines = bufio.NewReaderSize(zr, 4096)
	default:
		return fmt.Errorf("unsupported Content-Encoding %q", encoding)
	}
	var ls lineStats
	err := scanLines(lines, s, &ls)
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// lineStats is one client's state while reading.
type lineStats struct {
	lastSeq uint64
}

// scanLines reads lines from r until an error and records data events.
// Lines longer than r's buffer (padding, say) are skipped.
func scanLines(r *bufio.Reader, s *loadStats, ls *lineStats) error {
	for {
		line, err := r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			for err == bufio.ErrBufferFull {
				_, err = r.ReadSlice('\n')
			}
			if err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if len(line) == 0 {
			continue
		}
		if line[0] == ':' {
			if s.phase.Load() == phaseMeasure {
				s.comments.Add(1)
			}
			continue
		}
		if len(line) < 6 || line[0] != 'd' {
			continue
		}
		seq, sent, ok := parseDataLine(line)
		if !ok {
			continue
		}
		now := time.Now().UnixNano()
		s.recordEvent(ls, seq, now-sent)
	}
}

// recordEvent accounts one received event for one client.
func (s *loadStats) recordEvent(ls *lineStats, seq uint64, lat int64) {
	last := ls.lastSeq
	if seq > last {
		ls.lastSeq = seq
	}
	lo := s.winLo.Load()
	if seq <= lo || seq > s.winHi.Load() {
		return
	}
	if seq <= last {
		s.dups.Add(1) // neither delivered again nor timed
		return
	}
	if from := max(last, lo); seq > from+1 {
		s.lost.Add(int64(seq - from - 1))
	}
	s.delivered.Add(1)
	s.lat.record(lat)
	if s.burst != nil {
		s.burst.record(seq, lat)
	}
}

// wireCounter counts the bytes read from a connection.
type wireCounter struct {
	r io.Reader
	n *atomic.Int64
}

func (w wireCounter) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	w.n.Add(int64(n))
	return n, err
}
