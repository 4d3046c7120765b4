package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// fesMessage is one line of testdata/js/fetch-event-source-once.cjs's
// output: a message fetch-event-source dispatched, or how its stream ended.
type fesMessage struct {
	ID    string `json:"id"`
	Event string `json:"event"`
	Data  string `json:"data"`
	Retry *int   `json:"retry"`
	Open  int    `json:"open"`
	Done  string `json:"done"`
	Error string `json:"error"`
}

// jsDir is the npm client folder the whole module shares (the root
// package's testdata/js): .ci/run installs it in place with `npm ci`.
var jsDir = filepath.Join("..", "testdata", "js")

// runFetchEventSource runs @microsoft/fetch-event-source (testdata/js,
// installed by `npm ci` there) against url until it dispatched a message
// whose data is "end", or for at most d, and returns the messages it
// dispatched. It skips when Node or the package is missing, unless
// SSE_E2E_REQUIRE_BROWSER=1.
func runFetchEventSource(t *testing.T, url string, d time.Duration) []fesMessage {
	t.Helper()
	node, err := exec.LookPath("node")
	if err == nil {
		_, err = os.Stat(filepath.Join(jsDir, "node_modules", "@microsoft", "fetch-event-source"))
	}
	if err != nil {
		if os.Getenv(requireBrowserEnv) == "1" {
			t.Fatalf("node or testdata/js/node_modules missing (run npm ci in testdata/js): %v; %s=1 requires them", err, requireBrowserEnv)
		}
		t.Skipf("skipping: node or testdata/js/node_modules missing (run npm ci in testdata/js): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), d+10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "fetch-event-source-once.cjs", url, strconv.FormatInt(d.Milliseconds(), 10))
	cmd.Dir = jsDir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node fetch-event-source-once.cjs: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.String())
	}
	var msgs []fesMessage
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var m fesMessage
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("node output %q: %v", sc.Text(), err)
		}
		switch {
		case m.Open != 0:
			if m.Open != 200 {
				t.Fatalf("fetch-event-source opened with status %d", m.Open)
			}
		case m.Done != "":
			if m.Done == "error" {
				t.Fatalf("fetch-event-source failed: %s", m.Error)
			}
		default:
			msgs = append(msgs, m)
		}
	}
	return msgs
}

// TestFetchEventSourceSeesOnlyBackendEvents: fetch-event-source dispatches
// a message for every blank line, comment-only blocks included. The plugin
// adds heartbeats, padding and retry hints, none of which may become a
// message: through the plugin, in both modes, the client sees exactly what
// it sees without it, however many heartbeats the silence takes.
func TestFetchEventSourceSeesOnlyBackendEvents(t *testing.T) {
	const silence = 3500 * time.Millisecond // three heartbeats at 1s
	backendStream := func(s *stream) {
		s.send("id: 1\ndata: hello\n\n", silence, "event: late\ndata: late\n\n", "data: end\n\n")
	}
	// fetch-event-source reports a message's own id field, not the last
	// event id so far.
	want := []fesMessage{{ID: "1", Data: "hello"}, {Event: "late", Data: "late"}, {Data: "end"}}
	for _, mode := range []struct{ name, label, handler string }{
		{"pass-through", "passthrough", `{"handler":"sse","heartbeat":"1s","retry":"2s","padding":2048}`},
		// ids upstream: the hub would otherwise number the events that came
		// without an id, which is not what this test is about.
		{"fan-out", "fanout", `{"handler":"sse","heartbeat":"1s","retry":"2s","padding":2048,"fanout":{"ids":"upstream"}}`},
	} {
		t.Run(mode.name, func(t *testing.T) {
			h := startCaddy(t, mode.handler)
			h.backend.handle("quiet", backendStream)
			direct := runFetchEventSource(t, h.base+"/direct/quiet", 15*time.Second)
			series := `caddy_sse_heartbeats_total{mode="` + mode.label + `"}`
			before := h.metric(t, series)
			got := runFetchEventSource(t, h.base+"/sse/quiet", 15*time.Second)
			beats := h.metric(t, series) - before
			t.Logf("direct: %+v", direct)
			t.Logf("through the plugin (%v heartbeats written): %+v", beats, got)
			if beats < 2 {
				t.Fatalf("%v heartbeats written during %v of silence, want at least 2: the test proves nothing", beats, silence)
			}
			if !sameFES(direct, want) {
				t.Fatalf("direct, without the plugin: %+v, want %+v", direct, want)
			}
			// The retry hint the plugin wrote is applied (fetch-event-source
			// reports it on the message whose block it was in), but adds
			// no message of its own.
			for i := range got {
				got[i].Retry = nil
			}
			if !sameFES(got, want) {
				t.Fatalf("through the plugin: %+v, want exactly the backend's %+v", got, want)
			}
		})
	}
}

func sameFES(a, b []fesMessage) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].ID != b[i].ID || a[i].Event != b[i].Event || a[i].Data != b[i].Data || (a[i].Retry == nil) != (b[i].Retry == nil) {
			return false
		}
	}
	return true
}
