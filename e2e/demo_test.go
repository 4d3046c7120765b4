package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/chromedp/chromedp"

	// The demo's backend (legacy_sse_demo), which the demo's Caddyfile runs.
	_ "github.com/seed-b7710c89/caddy-sse/demo/legacybackend"
)

// screenshotDirEnv names a directory where TestDemoPage saves its
// screenshot of the demo page; without it, the screenshot goes to the
// test's temporary directory (removed when the test ends).
const screenshotDirEnv = "SSE_E2E_SCREENSHOTS"

// demoDeadline bounds how long TestDemoPage waits for the page to show all
// of its story: the demo's Caddyfile makes the backend drop every
// connection after 20 s, the raw panel's browser reconnects 3 s later, and
// its first event after that comes with the backend's next burst, after a
// silence of up to 20 s: 43 s in the worst case, plus start-up. (The page
// usually shows everything within 25 s.)
const demoDeadline = 60 * time.Second

// startDemo runs demo/Caddyfile as it is, but on free ports, with its
// storage and log in the test's temporary directory, bound to 127.0.0.1
// only, and serving demo/www by absolute path. It returns the page's
// origin. Every substitution must apply: a Caddyfile that drifted from
// what the test expects fails here, not later in a confusing way.
func startDemo(t *testing.T) string {
	t.Helper()
	src, err := os.ReadFile("../demo/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	www, err := filepath.Abs("../demo/www")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	logPath := filepath.Join(dir, "caddy.log")
	port := func() string { _, p, _ := strings.Cut(freeAddr(t), ":"); return p }
	front, backend, admin := port(), port(), port()
	cf := string(src)
	for _, r := range []struct{ old, new string }{
		{"localhost:2019", "localhost:" + admin},
		{":8081", ":" + backend},
		{":8080 {", ":" + front + " {"},
		// Test machines may have no IPv6.
		{"bind 127.0.0.1 [::1]", "bind 127.0.0.1"},
		{"root * demo/www", "root * " + www},
		{"persist_config off", fmt.Sprintf("persist_config off\n\tstorage file_system %s\n\tlog {\n\t\toutput file %s\n\t}",
			filepath.Join(dir, "storage"), logPath)},
	} {
		if !strings.Contains(cf, r.old) {
			t.Fatalf("demo/Caddyfile no longer contains %q; update startDemo", r.old)
		}
		cf = strings.ReplaceAll(cf, r.old, r.new)
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	cfg, warnings, err := adapter.Adapt([]byte(cf), map[string]any{"filename": "demo/Caddyfile"})
	if err != nil {
		t.Fatalf("adapt demo/Caddyfile: %v", err)
	}
	for _, w := range warnings {
		t.Logf("adapt demo/Caddyfile: %s", w)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("Caddy's log (the end of it):\n%s", tail(logPath, 60))
		}
	})
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("load demo/Caddyfile: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stop Caddy: %v", err)
		}
	})
	return "http://127.0.0.1:" + front
}

// demoPanel is what one panel of the demo page shows.
type demoPanel struct {
	Stats    map[string]string `json:"stats"`     // the boxes above the log, by data-stat
	State    string            `json:"state"`     // connection state, top right
	ES       string            `json:"es"`        // the EventSource line
	Seqs     []int             `json:"seqs"`      // sequence numbers of the event and replay rows, newest first
	EventRow int               `json:"eventRows"` // event and replay rows in the log
	Hellos   int               `json:"hellos"`    // greeting rows
	HelloES  int               `json:"helloES"`   // greeting rows marked as received by the EventSource
}

// demoView is what the whole page shows, as read from its DOM.
type demoView struct {
	Plugin   demoPanel       `json:"plugin"`
	Raw      demoPanel       `json:"raw"`
	Story    map[string]bool `json:"story"`   // ticked items of the story strip
	Summary  string          `json:"summary"` // the live figures' summary lines
	TableSum int             `json:"tableClients"`
	Tables   int             `json:"tableRows"`
}

// readDemo reads the page's numbers from its DOM: the text a person sees.
const readDemo = `(() => {
  const panel = (key) => {
    const el = document.querySelector('.panel[data-panel="' + key + '"]');
    const stats = {};
    for (const s of el.querySelectorAll('.stat[data-stat]')) stats[s.dataset.stat] = s.querySelector('.v').textContent;
    const rows = [...el.querySelectorAll('tbody tr')];
    const events = rows.filter((r) => r.dataset.kind === 'event' || r.dataset.kind === 'replay');
    const seqs = [];
    let hellos = 0, helloES = 0;
    for (const r of events) {
      const detail = r.children[3].textContent;
      const m = /^#(\d+) /.exec(detail);
      if (m) seqs.push(Number(m[1]));
      if (detail.startsWith('hello:')) {
        hellos++;
        if (r.lastElementChild.textContent === '\u2713') helloES++;
      }
    }
    return { stats, state: el.querySelector('.state').textContent, es: el.querySelector('.es').textContent,
      seqs, eventRows: events.length, hellos, helloES };
  };
  const story = {};
  for (const li of document.querySelectorAll('#story [data-check]')) story[li.dataset.check] = li.classList.contains('done');
  const cells = [...document.querySelectorAll('#figures-table td[data-col="clients"]')];
  return {
    plugin: panel('plugin'), raw: panel('raw'), story,
    summary: document.getElementById('figures-summary').innerText,
    tableClients: cells.reduce((n, td) => n + Number(td.textContent), 0), tableRows: cells.length,
  };
})()`

var (
	summaryClients = regexp.MustCompile(`(\d+) clients? share (\d+) upstream connections?`)
	summarySaved   = regexp.MustCompile(`on events: (-?\d+)% saved`)
	esReconnects   = regexp.MustCompile(`reconnects (\d+)`)
)

// demoProblems reads the numbers of one look at the page. pending lists
// what it does not show yet of its story (none: it tells it all); broken
// lists numbers that disagree or are wrong, which no amount of waiting
// excuses: the page must never show them, not even early on.
func demoProblems(v demoView) (pending, broken []string) {
	check := func(ok bool, format string, args ...any) {
		if !ok {
			pending = append(pending, fmt.Sprintf(format, args...))
		}
	}
	always := func(ok bool, format string, args ...any) {
		if !ok {
			broken = append(broken, fmt.Sprintf(format, args...))
		}
	}
	num := func(panel demoPanel, k string) int {
		n, err := strconv.Atoi(panel.Stats[k])
		if err != nil {
			return -1
		}
		return n
	}
	for _, k := range []string{"start", "quiet", "pieces", "drop"} {
		check(v.Story[k], "story item %q not ticked", k)
	}
	for name, pn := range map[string]demoPanel{"plugin": v.Plugin, "raw": v.Raw} {
		ev := num(pn, "events")
		check(ev > 0, "%s panel: %d events", name, ev)
		always(ev == pn.EventRow, "%s panel: says %d events, its log has %d", name, ev, pn.EventRow)
		check(pn.State == "open", "%s panel: state %q, want open", name, pn.State)
	}
	// Both panels carry the same feed: every event the raw panel got since
	// the plugin panel's first one reached the plugin panel too, and both
	// are at the same latest event. (The raw panel misses the events of its
	// reconnects; the plugin panel has events from before the raw one
	// connected, from its cache.)
	if len(v.Plugin.Seqs) > 0 && len(v.Raw.Seqs) > 0 {
		first := v.Plugin.Seqs[len(v.Plugin.Seqs)-1]
		got := make(map[int]bool)
		for _, s := range v.Plugin.Seqs {
			got[s] = true
		}
		var missing []int
		for _, s := range v.Raw.Seqs {
			if s >= first && !got[s] {
				missing = append(missing, s)
			}
		}
		check(len(missing) == 0, "plugin panel lacks events %v that the raw panel got", missing)
		check(v.Plugin.Seqs[0] == v.Raw.Seqs[0], "latest event: plugin panel #%d, raw panel #%d", v.Plugin.Seqs[0], v.Raw.Seqs[0])
	} else {
		check(false, "no numbered events: plugin %v, raw %v", v.Plugin.Seqs, v.Raw.Seqs)
	}
	// The greeting is an event like any other: the raw panel's EventSource
	// got it too.
	check(v.Raw.HelloES > 0, "raw panel: %d greeting rows, %d marked as received by the EventSource", v.Raw.Hellos, v.Raw.HelloES)

	// The backend's drop: the raw panel sees it and reconnects; the plugin
	// panel's connection never notices, while the plugin reports its own.
	check(num(v.Raw, "drops") >= 1, "raw panel: %s backend drops", v.Raw.Stats["drops"])
	check(num(v.Raw, "reconnects") >= 1, "raw panel: %s reconnects", v.Raw.Stats["reconnects"])
	check(num(v.Plugin, "drops") >= 1, "plugin panel: %s backend drops", v.Plugin.Stats["drops"])
	always(num(v.Plugin, "reconnects") == 0, "plugin panel: %s reconnects, want 0", v.Plugin.Stats["reconnects"])
	if m := esReconnects.FindStringSubmatch(v.Plugin.ES); m == nil || m[1] != "0" {
		always(false, "plugin panel's EventSource: %q, want reconnects 0", v.Plugin.ES)
	}

	// The summary counts what the table counts: this page's two clients
	// (its log and its EventSource) on one upstream connection.
	if m := summaryClients.FindStringSubmatch(v.Summary); m == nil {
		check(false, "summary has no client count: %q", v.Summary)
	} else {
		clients, _ := strconv.Atoi(m[1])
		ups, _ := strconv.Atoi(m[2])
		always(clients == v.TableSum, "summary says %d clients, the table %d", clients, v.TableSum)
		check(clients == 2 && ups == 1 && v.Tables == 1, "summary: %d clients on %d upstreams (table rows %d), want 2 on 1", clients, ups, v.Tables)
	}
	if m := summarySaved.FindStringSubmatch(v.Summary); m == nil {
		check(false, "summary has no bytes-saved figure: %q", v.Summary)
	} else {
		saved, _ := strconv.Atoi(m[1])
		always(saved >= 0 && saved < 100, "summary: %d%% saved on events", saved)
	}
	return pending, broken
}

// TestDemoPage runs the demo (demo/Caddyfile and demo/www) as a newcomer
// would see it, in Chromium, and checks that within demoDeadline the page
// tells its story with numbers that agree: both panels receive events
// (the plugin's by replay_on_connect before the backend's next burst),
// the raw panel shows events cut into pieces and the backend's drop and
// reconnect, the plugin panel shows heartbeats and no reconnect while the
// plugin reports the upstream reconnect, the summary's client count is
// the table's, and the bytes saved by compression are not negative.
// It saves a screenshot for a person to look at (see screenshotDirEnv).
func TestDemoPage(t *testing.T) {
	requireBrowser(t)
	base := startDemo(t)

	ctx, cancel := chromedp.NewContext(browserCtx)
	t.Cleanup(cancel)
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("open tab: %v", err)
	}
	nctx, ncancel := context.WithTimeout(ctx, 15*time.Second)
	err := chromedp.Do(nctx, chromedp.EmulateViewport(1400, 1000), chromedp.Navigate(base+"/"))
	ncancel()
	if err != nil {
		t.Fatalf("load the demo page: %v", err)
	}
	p := &page{ctx: ctx}

	screenshot := func() {
		sctx, scancel := context.WithTimeout(ctx, 15*time.Second)
		defer scancel()
		png, err := chromedp.Run(sctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Errorf("screenshot: %v", err)
			return
		}
		dir := os.Getenv(screenshotDirEnv)
		if dir == "" {
			dir = t.TempDir()
		}
		path := filepath.Join(dir, "demo-page.png")
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Errorf("save screenshot: %v", err)
			return
		}
		t.Logf("screenshot of the demo page: %s", path)
	}

	start := time.Now()
	var v demoView
	var pending, broken []string
	for {
		raw := evalJS[string](t, p, "JSON.stringify("+readDemo+")")
		v = demoView{}
		if err := json.Unmarshal([]byte(raw), &v); err != nil {
			t.Fatalf("read the page: %v: %s", err, raw)
		}
		pending, broken = demoProblems(v)
		if len(broken) > 0 {
			screenshot()
			t.Fatalf("after %v the demo page shows wrong numbers:\n  %s\npage: %+v",
				time.Since(start).Round(time.Millisecond), strings.Join(broken, "\n  "), v)
		}
		if len(pending) == 0 {
			break
		}
		if time.Since(start) > demoDeadline {
			screenshot()
			t.Fatalf("after %v the demo page does not show:\n  %s\npage: %+v", demoDeadline,
				strings.Join(pending, "\n  "), v)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("the page told its story in %v: plugin %v, raw %v; summary:\n%s",
		time.Since(start).Round(time.Second), v.Plugin.Stats, v.Raw.Stats, v.Summary)
	screenshot()
}
