package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// resetEvent is the event type the plugin sends when it cannot resume a
// client from its Last-Event-ID (fanout's reset_event default).
const resetEvent = "sse-reset"

// event is one event a client dispatched, as EventSource would.
type event struct {
	ID   string // the last event id after this event (EventSource's lastEventId)
	Type string // "message" when none was given
	Data string
	Seq  int64  // from data "seq=N"; -1 when the data is not that
	Node string // X-SSE-Node of the response that carried it
	Conn int    // which of the client's connections carried it (1, 2, ...)
}

func (e event) String() string {
	if e.Type != "message" {
		return fmt.Sprintf("[%s id=%q data=%q on %s#%d]", e.Type, e.ID, e.Data, e.Node, e.Conn)
	}
	return fmt.Sprintf("[seq=%d id=%q on %s#%d]", e.Seq, e.ID, e.Node, e.Conn)
}

// sseClient records every event it receives over any number of
// connections, one at a time, and sends the last id it saw as
// Last-Event-ID when it connects again, like EventSource.
type sseClient struct {
	name string
	path string
	http *http.Client

	mu     sync.Mutex
	events []event
	lastID string
	conns  int
	cur    *clientConn
	ends   []string // how each connection ended, when the server ended it
}

// clientConn is one connection of a client.
type clientConn struct {
	n      int
	node   string
	cancel context.CancelFunc
	done   chan struct{} // closed when the reader is finished
	err    error         // why the stream ended; valid after done
}

func newClient(name, path string) *sseClient {
	return &sseClient{name: name, path: path, http: &http.Client{Transport: &http.Transport{
		DisableKeepAlives:  true,
		DisableCompression: true, // no Accept-Encoding: the plugin then sends plain text
	}}}
}

// connect opens a stream at base (http://host:port), sending the last id
// seen, and returns once its response header is in (within 5 s). The
// previous connection must be closed.
func (c *sseClient) connect(base string) error {
	c.mu.Lock()
	if c.cur != nil {
		c.mu.Unlock()
		return errors.New("connect while connected")
	}
	c.conns++
	n, lastID := c.conns, c.lastID
	c.mu.Unlock()

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", base+c.path, nil)
	req.Header.Set("Accept", "text/event-stream")
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	headTimer := time.AfterFunc(5*time.Second, cancel)
	resp, err := c.http.Do(req)
	headTimer.Stop()
	if err != nil {
		cancel()
		return fmt.Errorf("%s: GET %s%s: %w", c.name, base, c.path, err)
	}
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 500))
		resp.Body.Close()
		cancel()
		return fmt.Errorf("%s: GET %s%s: %s, Content-Type %q: %s", c.name, base, c.path, resp.Status, resp.Header.Get("Content-Type"), body)
	}
	cc := &clientConn{n: n, node: resp.Header.Get("X-SSE-Node"), cancel: cancel, done: make(chan struct{})}
	c.mu.Lock()
	c.cur = cc
	c.mu.Unlock()
	go func() {
		defer close(cc.done)
		defer resp.Body.Close()
		cc.err = c.read(resp.Body, cc)
		if ctx.Err() == nil { // the server (or the network) ended it
			c.mu.Lock()
			c.ends = append(c.ends, fmt.Sprintf("conn %d on %s: %v", cc.n, cc.node, cc.err))
			c.mu.Unlock()
		}
	}()
	return nil
}

// read parses the stream by the WHATWG rules (line ends CRLF, LF or CR;
// comments; "field: value" with one optional space; dispatch on a blank
// line when data is non-empty; id without NUL updates the last id even if
// nothing is dispatched) and records every dispatched event.
func (c *sseClient) read(body io.Reader, cc *clientConn) error {
	br := bufio.NewReaderSize(body, 64<<10)
	var data strings.Builder
	typ, hasData := "", false
	for {
		line, err := readLine(br)
		if err != nil {
			return err
		}
		if line == "" {
			if hasData {
				d := strings.TrimSuffix(data.String(), "\n")
				e := event{Type: typ, Data: d, Seq: -1, Node: cc.node, Conn: cc.n}
				if e.Type == "" {
					e.Type = "message"
				}
				if s, ok := strings.CutPrefix(d, "seq="); ok {
					if n, err := strconv.ParseInt(s, 10, 64); err == nil {
						e.Seq = n
					}
				}
				c.mu.Lock()
				e.ID = c.lastID
				c.events = append(c.events, e)
				c.mu.Unlock()
			}
			data.Reset()
			typ, hasData = "", false
			continue
		}
		if line[0] == ':' {
			continue
		}
		field, value, found := strings.Cut(line, ":")
		if found {
			value = strings.TrimPrefix(value, " ")
		}
		switch field {
		case "data":
			data.WriteString(value)
			data.WriteByte('\n')
			hasData = true
		case "event":
			typ = value
		case "id":
			if !strings.ContainsRune(value, 0) {
				c.mu.Lock()
				c.lastID = value
				c.mu.Unlock()
			}
		}
	}
}

// readLine returns the next line without its end (CRLF, LF or CR).
func readLine(br *bufio.Reader) (string, error) {
	var sb strings.Builder
	for {
		b, err := br.ReadByte()
		if err != nil {
			return "", err
		}
		switch b {
		case '\n':
			return sb.String(), nil
		case '\r':
			if next, err := br.Peek(1); err == nil && next[0] == '\n' {
				br.ReadByte()
			}
			return sb.String(), nil
		}
		sb.WriteByte(b)
	}
}

// disconnect closes the current connection, if any, and waits for its
// reader.
func (c *sseClient) disconnect() {
	c.mu.Lock()
	cc := c.cur
	c.cur = nil
	c.mu.Unlock()
	if cc != nil {
		cc.cancel()
		<-cc.done
	}
}

// connected reports whether the current connection is still open.
func (c *sseClient) connected() bool {
	c.mu.Lock()
	cc := c.cur
	c.mu.Unlock()
	if cc == nil {
		return false
	}
	select {
	case <-cc.done:
		return false
	default:
		return true
	}
}

// Events returns a copy of what the client recorded.
func (c *sseClient) Events() []event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]event(nil), c.events...)
}

// LastSeq is the highest seq received, or 0.
func (c *sseClient) LastSeq() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := len(c.events) - 1; i >= 0; i-- {
		if c.events[i].Seq >= 0 {
			return c.events[i].Seq
		}
	}
	return 0
}

// LastID is the client's last event id.
func (c *sseClient) LastID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastID
}

// Conns is how many connections the client made.
func (c *sseClient) Conns() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conns
}

// Ends lists the connections the server side ended, and how.
func (c *sseClient) Ends() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.ends...)
}

// stay keeps the client connected to targets until stop is closed: when
// the server ends the stream (a killed node, a reload) it reconnects at
// once, with its last id, to targets picked at random; a failed connect is
// retried after 50 ms. Returns when stopped, disconnected.
func (c *sseClient) stay(targets func() []string, stop <-chan struct{}) {
	c.hop(targets, stop, 0, 0)
}

// hop is stay, but also moves to another target at random every lo..hi.
func (c *sseClient) hop(targets func() []string, stop <-chan struct{}, lo, hi time.Duration) {
	defer c.disconnect()
	for {
		ts := targets()
		if len(ts) == 0 {
			return
		}
		if err := c.connect(ts[rand.IntN(len(ts))]); err != nil {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				continue
			}
		}
		c.mu.Lock()
		done := c.cur.done
		c.mu.Unlock()
		var move <-chan time.Time
		if hi > 0 {
			move = time.After(lo + rand.N(hi-lo+1))
		}
		select {
		case <-stop:
			return
		case <-done:
		case <-move:
		}
		c.disconnect()
	}
}

// clientGroup runs clients until stopped.
type clientGroup struct {
	clients []*sseClient
	stopCh  chan struct{}
	wg      sync.WaitGroup
	once    sync.Once
}

func newGroup(t testing.TB) *clientGroup {
	g := &clientGroup{stopCh: make(chan struct{})}
	t.Cleanup(g.stop)
	return g
}

// add starts f(client) in a goroutine that the group waits for.
func (g *clientGroup) add(c *sseClient, f func(c *sseClient, stop <-chan struct{})) *sseClient {
	g.clients = append(g.clients, c)
	g.wg.Add(1)
	go func() { defer g.wg.Done(); f(c, g.stopCh) }()
	return c
}

// stop disconnects every client and waits for them.
func (g *clientGroup) stop() {
	g.once.Do(func() { close(g.stopCh) })
	g.wg.Wait()
}

// waitPast waits until every client has received an event with seq >= seq.
func (g *clientGroup) waitPast(t testing.TB, seq int64, within time.Duration) {
	t.Helper()
	waitFor(t, within, fmt.Sprintf("every client past seq %d", seq), func() string {
		var behind []string
		for _, c := range g.clients {
			if s := c.LastSeq(); s < seq {
				behind = append(behind, fmt.Sprintf("%s at %d", c.name, s))
			}
		}
		return strings.Join(behind, ", ")
	})
}

// checkOpts say what a client's record may contain.
type checkOpts struct {
	// resetGaps allows a gap in seq when a reset event came between the
	// two events: the plugin told the client it lost something. A gap
	// without a reset is never allowed.
	resetGaps bool
	// noResets fails on any reset event.
	noResets bool
	// from, when > 0, requires every seq from here to the client's last
	// one, with no gap even after a reset ("every later event").
	from int64
}

// checkRecord returns what is wrong with one client's record: a seq seen
// twice or going backwards is always wrong; a gap needs a reset event
// before it (resetGaps) and must end before o.from, or is wrong.
func checkRecord(evs []event, o checkOpts) []string {
	var errs []string
	var prev int64 = -1
	var prevEv event
	reset, sawFrom := false, false
	for _, e := range evs {
		if len(errs) > 10 {
			return append(errs, "...")
		}
		if e.Type == resetEvent {
			if o.noResets {
				errs = append(errs, fmt.Sprintf("reset event %v after %v", e, prevEv))
			}
			reset = true
			continue
		}
		if e.Seq < 0 {
			errs = append(errs, fmt.Sprintf("unexpected event %v", e))
			continue
		}
		sawFrom = sawFrom || e.Seq == o.from
		switch {
		case prev < 0 || e.Seq == prev+1:
		case e.Seq <= prev:
			errs = append(errs, fmt.Sprintf("seq %d after %d: duplicate or out of order: %v after %v", e.Seq, prev, e, prevEv))
		case reset && o.resetGaps && (o.from <= 0 || e.Seq <= o.from):
			// a signalled gap, before the part that must be complete
		default:
			errs = append(errs, fmt.Sprintf("gap: seq %d..%d missing between %v and %v (reset before it: %v)", prev+1, e.Seq-1, prevEv, e, reset))
		}
		prev, prevEv, reset = max(prev, e.Seq), e, false
	}
	if o.from > 0 && prev >= o.from && !sawFrom {
		errs = append(errs, fmt.Sprintf("seq %d (from which every event must arrive) missing", o.from))
	}
	return errs
}

// checkClients checks every client's record with o, and that ids name
// events consistently across clients and nodes: one id is one seq, and a
// seq has one id (the plugin's ids are cluster-wide).
func checkClients(t testing.TB, clients []*sseClient, o checkOpts) {
	t.Helper()
	// Per path: every path is a stream of its own, with its own seqs.
	type pathID struct{ path, id string }
	type pathSeq struct {
		path string
		seq  int64
	}
	idSeq := map[pathID]int64{}
	seqID := map[pathSeq]string{}
	for _, c := range clients {
		evs := c.Events()
		if len(evs) == 0 {
			t.Errorf("%s received nothing", c.name)
			continue
		}
		for _, e := range checkRecord(evs, o) {
			t.Errorf("%s: %s", c.name, e)
		}
		for _, e := range evs {
			if e.Seq < 0 || e.ID == "" {
				continue
			}
			pi, ps := pathID{c.path, e.ID}, pathSeq{c.path, e.Seq}
			if s, ok := idSeq[pi]; ok && s != e.Seq {
				t.Errorf("%s: id %q is seq %d here and seq %d elsewhere", c.name, e.ID, e.Seq, s)
			}
			if id, ok := seqID[ps]; ok && id != e.ID {
				t.Errorf("%s: seq %d has id %q here and %q elsewhere (ids are not cluster-wide)", c.name, e.Seq, e.ID, id)
			}
			idSeq[pi], seqID[ps] = e.Seq, e.ID
		}
	}
	if t.Failed() {
		for _, c := range clients {
			t.Logf("%s: %d connections; ended by the server: %v", c.name, c.Conns(), c.Ends())
		}
	}
}

// count returns how many events of type typ the client got.
func count(evs []event, typ string) int {
	n := 0
	for _, e := range evs {
		if e.Type == typ {
			n++
		}
	}
	return n
}

// waitFor polls cond every 20 ms until it returns "" (done) or within
// passes, then fails with what it last returned.
func waitFor(t testing.TB, within time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		msg := cond()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v, still not %s: %s", within, what, msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func stringsReader(s string) io.Reader { return strings.NewReader(s) }
