package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// requireBrowserEnv makes a missing browser a failure instead of a skip.
// CI sets it so that the suite cannot pass by skipping everything.
const requireBrowserEnv = "SSE_E2E_REQUIRE_BROWSER"

// chromiumFlags are the only switches the browser gets besides the ones the
// driver itself needs (--remote-debugging-pipe, --user-data-dir, about:blank).
// --disable-quic and --disable-background-networking keep the browser from
// opening any connection the tests did not ask for.
var chromiumFlags = []string{
	"headless",
	"no-sandbox",
	"disable-gpu",
	"disable-quic",
	"no-first-run",
	"disable-background-networking",
	"disable-component-update",
	"disable-sync",
}

// The one browser of the test binary, started by TestMain. Each test opens
// its own tab with newPage.
var (
	browserCtx     context.Context
	browserMissing string // why there is no browser to run; tests skip or fail with it
	browserErr     error  // a browser was found but did not start
	browserOutput  lockedBuffer
)

func TestMain(m *testing.M) {
	os.Exit(runWithBrowser(m))
}

func runWithBrowser(m *testing.M) int {
	path := findChromium()
	if path == "" {
		browserMissing = "no Chromium found (set SSE_E2E_CHROMIUM, or apt-get install chromium)"
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "caddy-sse-e2e-profile-")
	if err != nil {
		browserErr = err
		return m.Run()
	}
	defer os.RemoveAll(dir)

	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(path),
		chromedp.UserDataDir(dir),
		chromedp.CombinedOutput(&browserOutput),
	}
	for _, f := range chromiumFlags {
		opts = append(opts, chromedp.Flag(f, true))
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(allocCtx)
	defer cancel()
	// The first Do starts the browser and binds it to ctx, which has no
	// deadline on purpose: a deadline here would stop the browser with it.
	if err := chromedp.Do(ctx); err != nil {
		browserErr = fmt.Errorf("start %s: %w", path, err)
		return m.Run()
	}
	browserCtx = ctx
	return m.Run()
}

// findChromium returns the browser to run, or "" when there is none.
func findChromium() string {
	if p := os.Getenv("SSE_E2E_CHROMIUM"); p != "" {
		return p
	}
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// requireBrowser skips t when there is no browser, or fails it when the
// environment demands one or when the browser that was found did not start.
func requireBrowser(t testing.TB) {
	t.Helper()
	if browserErr != nil {
		t.Fatalf("Chromium did not start: %v\nbrowser output:\n%s", browserErr, browserOutput.String())
	}
	if browserMissing != "" {
		if os.Getenv(requireBrowserEnv) == "1" {
			t.Fatalf("%s, and %s=1 requires one", browserMissing, requireBrowserEnv)
		}
		t.Skipf("skipping browser test: %s (set %s=1 to make this a failure)", browserMissing, requireBrowserEnv)
	}
}

// event is one event as the page's EventSource dispatched it.
type event struct {
	Type        string  `json:"type"`
	Data        string  `json:"data"`
	LastEventID string  `json:"lastEventId"`
	At          float64 `json:"t"` // performance.now() in the handler, ms; not compared
}

func (e event) String() string {
	return fmt.Sprintf("{type %q, data %q, lastEventId %q}", e.Type, truncate(e.Data, 80), e.LastEventID)
}

// streamError is one "error" event of an EventSource: the connection failed
// or ended. ReadyState 0 (CONNECTING) means it will reconnect, 2 (CLOSED)
// that it gave up.
type streamError struct {
	At         float64 `json:"t"`
	ReadyState int     `json:"readyState"`
}

// streamState is everything the page recorded for one EventSource.
type streamState struct {
	URL    string        `json:"url"`
	Events []event       `json:"events"`
	Errors []streamError `json:"errors"`
	Opens  []float64     `json:"opens"`
}

// page is one browser tab showing testdata/page.html from the front server
// of a harness.
type page struct {
	ctx context.Context
	h   *harness
}

// newPage opens a tab on the harness's test page. The tab closes when t
// ends, which also closes every EventSource it opened.
func newPage(t testing.TB, h *harness) *page {
	t.Helper()
	return newPageAt(t, h, h.base)
}

// newPageAt opens a tab on the test page at base, the origin the page's
// EventSources connect to: h.base, or a cutter in front of it.
func newPageAt(t testing.TB, h *harness, base string) *page {
	t.Helper()
	requireBrowser(t)
	ctx, cancel := chromedp.NewContext(browserCtx)
	t.Cleanup(cancel)
	if err := chromedp.Do(ctx); err != nil { // opens the tab, without deadline
		t.Fatalf("open tab: %v", err)
	}
	nctx, ncancel := context.WithTimeout(ctx, 15*time.Second)
	defer ncancel()
	if err := chromedp.Do(nctx, chromedp.Navigate(base+"/page")); err != nil {
		t.Fatalf("load test page: %v", err)
	}
	p := &page{ctx: ctx, h: h}
	if !evalJS[bool](t, p, `window.pageReady === true`) {
		t.Fatal("test page loaded but its script did not run")
	}
	return p
}

// evalJS evaluates expr in the page and decodes its value.
func evalJS[T any](t testing.TB, p *page, expr string) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", truncate(expr, 200), err)
	}
	return v
}

// jsArgs formats Go values as a JavaScript argument list.
func jsArgs(t testing.TB, args ...any) string {
	t.Helper()
	parts := make([]string, len(args))
	for i, a := range args {
		b, err := json.Marshal(a)
		if err != nil {
			t.Fatal(err)
		}
		parts[i] = string(b)
	}
	return strings.Join(parts, ", ")
}

// open starts new EventSource(path) in the page, recorded under key. It
// listens for "message" and for each of types. The EventSource is closed
// when t ends (so that it frees its connection: Chromium allows 6 per
// origin over HTTP/1.1).
func (p *page) open(t testing.TB, key, path string, types ...string) {
	t.Helper()
	if types == nil {
		types = []string{}
	}
	evalJS[bool](t, p, "openStream("+jsArgs(t, key, path, types)+")")
	t.Cleanup(func() { p.close(t, key) })
}

// close closes the EventSource recorded under key; what it recorded stays.
func (p *page) close(t testing.TB, key string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	defer cancel()
	// Not evalJS: this runs in cleanups, where the tab may already be gone.
	_, err := chromedp.Run(ctx, chromedp.Evaluate[bool]("closeStream("+jsArgs(t, key)+")"))
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("close EventSource %q: %v", key, err)
	}
}

// state returns what the page recorded for key so far.
func (p *page) state(t testing.TB, key string) streamState {
	t.Helper()
	return evalJS[streamState](t, p, "window.streams["+jsArgs(t, key)+"]")
}

// pollInterval is how often waitJS re-evaluates its condition.
const pollInterval = 20 * time.Millisecond

// waitJS polls the JavaScript boolean expression cond until it is true and
// fails t with what the page recorded for key when timeout passes first.
func (p *page) waitJS(t testing.TB, key, cond, what string, timeout time.Duration) streamState {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if evalJS[bool](t, p, cond) {
			return p.state(t, key)
		}
		if time.Now().After(deadline) {
			st := p.state(t, key)
			t.Fatalf("%s: not within %v; %s", what, timeout, st.summary())
		}
		time.Sleep(pollInterval)
	}
}

// waitEvents waits until the EventSource under key dispatched at least n
// events and returns what it recorded.
func (p *page) waitEvents(t testing.TB, key string, n int, timeout time.Duration) streamState {
	t.Helper()
	cond := fmt.Sprintf("window.streams[%s].events.length >= %d", jsArgs(t, key), n)
	return p.waitJS(t, key, cond, fmt.Sprintf("%d events on %q", n, key), timeout)
}

// waitType waits until the EventSource under key dispatched an event of the
// given type.
func (p *page) waitType(t testing.TB, key, typ string, timeout time.Duration) streamState {
	t.Helper()
	cond := fmt.Sprintf("window.streams[%s].events.some(e => e.type === %s)", jsArgs(t, key), jsArgs(t, typ))
	return p.waitJS(t, key, cond, fmt.Sprintf("event of type %q on %q", typ, key), timeout)
}

// waitErrors waits until the EventSource under key reported n errors.
func (p *page) waitErrors(t testing.TB, key string, n int, timeout time.Duration) streamState {
	t.Helper()
	cond := fmt.Sprintf("window.streams[%s].errors.length >= %d", jsArgs(t, key), n)
	return p.waitJS(t, key, cond, fmt.Sprintf("%d errors on %q", n, key), timeout)
}

func (s streamState) summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d opens, %d errors %v, %d events:", s.URL, len(s.Opens), len(s.Errors), s.Errors, len(s.Events))
	for _, e := range s.Events {
		fmt.Fprintf(&b, "\n\t%8.1fms %v", e.At, e)
	}
	return b.String()
}

// sameEvents reports whether a and b dispatched the same events in the same
// order, comparing type, data and lastEventId (not arrival times).
func sameEvents(a, b []event) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Type != b[i].Type || a[i].Data != b[i].Data || a[i].LastEventID != b[i].LastEventID {
			return false
		}
	}
	return true
}

// diffEvents describes where got differs from want, for failure messages.
func diffEvents(got, want []event) string {
	var b strings.Builder
	n := max(len(got), len(want))
	for i := range n {
		var g, w string
		if i < len(got) {
			g = got[i].String()
		}
		if i < len(want) {
			w = want[i].String()
		}
		mark := "  "
		if i >= len(got) || i >= len(want) || !sameEvents(got[i:i+1], want[i:i+1]) {
			mark = "!!"
		}
		fmt.Fprintf(&b, "\n%s #%d got  %s\n   #%d want %s", mark, i, g, i, w)
	}
	return b.String()
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return fmt.Sprintf("%s...(%d bytes)", s[:n], len(s))
}

// lockedBuffer collects the browser's output, written from the driver's
// goroutines and read by the tests.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
