package cluster

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// backend is an SSE server in the test process. Every path is one feed: a
// ticker appends event seq=1, 2, 3, ... to the feed's history every
// interval, whether or not anyone listens (like a live backend), and every
// connection gets the events from the live edge on. Paths starting with
// /ids/ carry "id: N" on event N and resume after Last-Event-ID; other paths
// are legacy: no ids, no resume.
type backend struct {
	t        testing.TB
	srv      *http.Server
	addr     string
	interval time.Duration
	quit     chan struct{}
	stopOnce sync.Once

	mu    sync.Mutex
	feeds map[string]*feed
}

// feed is one path's event sequence and its connections.
type feed struct {
	path    string
	withIDs bool

	mu       sync.Mutex
	seq      int64         // last event emitted
	wake     chan struct{} // closed and replaced on every event
	cur      int           // connections open now
	maxConc  int           // most connections open at once
	connects int           // connections ever made
	lastIDs  []string      // the Last-Event-ID header of every connection ("" when none)
}

func startBackend(t testing.TB, interval time.Duration) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{t: t, addr: ln.Addr().String(), interval: interval,
		quit: make(chan struct{}), feeds: map[string]*feed{}}
	b.srv = &http.Server{Handler: b}
	go b.srv.Serve(ln)
	t.Cleanup(b.stop)
	return b
}

// stop ends the tickers and every stream, and the server.
func (b *backend) stop() {
	b.stopOnce.Do(func() {
		close(b.quit)
		b.srv.Close()
	})
}

// feed returns the feed of path, creating it (and starting its ticker).
func (b *backend) feed(path string) *feed {
	b.mu.Lock()
	defer b.mu.Unlock()
	f := b.feeds[path]
	if f == nil {
		f = &feed{path: path, withIDs: strings.HasPrefix(path, "/ids/"), wake: make(chan struct{})}
		b.feeds[path] = f
		go b.tick(f)
	}
	return f
}

func (b *backend) tick(f *feed) {
	tk := time.NewTicker(b.interval)
	defer tk.Stop()
	for {
		select {
		case <-b.quit:
			return
		case <-tk.C:
			f.mu.Lock()
			f.seq++
			close(f.wake)
			f.wake = make(chan struct{})
			f.mu.Unlock()
		}
	}
}

// Seq is the last event the feed emitted.
func (f *feed) Seq() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seq
}

// Conns returns the connections open now, the most ever open at once, and
// how many were made.
func (f *feed) Conns() (cur, maxConc, connects int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cur, f.maxConc, f.connects
}

// LastIDs returns the Last-Event-ID of every connection made, in order.
func (f *feed) LastIDs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.lastIDs...)
}

// ResetMax makes the current number of connections the maximum seen, so a
// test can watch a phase of its own.
func (f *feed) ResetMax() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.maxConc = f.cur
}

func frame(seq int64, withID bool) string {
	if withID {
		return fmt.Sprintf("id: %d\ndata: seq=%d\n\n", seq, seq)
	}
	return fmt.Sprintf("data: seq=%d\n\n", seq)
}

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f := b.feed(r.URL.Path)
	lastID := r.Header.Get("Last-Event-ID")
	f.mu.Lock()
	f.cur++
	f.connects++
	f.maxConc = max(f.maxConc, f.cur)
	f.lastIDs = append(f.lastIDs, lastID)
	next := f.seq + 1
	if f.withIDs && lastID != "" {
		// Resume: ids are sequence numbers. An id from the future (it
		// cannot be ours) gets the live edge.
		if n, err := strconv.ParseInt(lastID, 10, 64); err == nil && n >= 0 && n <= f.seq {
			next = n + 1
		}
	}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.cur--
		f.mu.Unlock()
	}()

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fl := w.(http.Flusher)
	fl.Flush()
	var buf strings.Builder
	for {
		f.mu.Lock()
		last, wake := f.seq, f.wake
		f.mu.Unlock()
		if next <= last {
			buf.Reset()
			for ; next <= last; next++ {
				buf.WriteString(frame(next, f.withIDs))
			}
			if _, err := w.Write([]byte(buf.String())); err != nil {
				return
			}
			fl.Flush()
		}
		select {
		case <-wake:
		case <-r.Context().Done():
			return
		case <-b.quit:
			return
		}
	}
}
