package caddysse

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// endedReasons reads the plugin's "stream ended" log lines, by path.
func (oc observedCaddy) endedReasons(t testing.TB) map[string][]string {
	t.Helper()
	b, _ := os.ReadFile(oc.LogFile)
	got := make(map[string][]string)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var line struct{ Msg, Path, Reason string }
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if line.Msg == "stream ended" {
			got[line.Path] = append(got[line.Path], line.Reason)
		}
	}
	return got
}

// The "stream ended" line of a pass-through stream says why it ended: the
// client went away, the backend ended it, or max_age did (a client that
// left used to be logged as "backend ended the stream").
func TestPassthroughLogsWhyAStreamEnded(t *testing.T) {
	checkNoLeak(t)
	gone, ended, aged := newScriptedBackend(t), newScriptedBackend(t), newScriptedBackend(t)
	quiet := map[string]any{"padding": 0, "heartbeat": 0}
	oc := startObservedCaddy(t,
		route("/gone", sseHandler(quiet), proxyTo(gone.Addr)),
		route("/ended", sseHandler(quiet), proxyTo(ended.Addr)),
		route("/aged", sseHandler(map[string]any{"padding": 0, "heartbeat": 0, "max_age": "1s"}), proxyTo(aged.Addr)))

	for _, h2 := range []bool{false, true} {
		c := openStream(t, oc.Base+"/gone", h2)
		gone.request(t)
		gone.send(t, "data: a\n\n")
		c.waitSuffix(t, "data: a\n\n")
		c.close()
		gone.handlerReturned(t, 5*time.Second)
	}
	c := openStream(t, oc.Base+"/ended", false)
	ended.request(t)
	ended.send(t, "data: a\n\n")
	c.waitSuffix(t, "data: a\n\n")
	ended.end(t)
	c.waitEOF(t, 5*time.Second)

	c = openStream(t, oc.Base+"/aged", false)
	aged.request(t)
	c.waitEOF(t, 5*time.Second)

	// A config reload or stop ends the streams of the old config.
	c = openStream(t, oc.Base+"/ended", false)
	ended.request(t)
	ended.send(t, "data: a\n\n")
	c.waitSuffix(t, "data: a\n\n")
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	c.waitEOF(t, 5*time.Second)

	want := map[string][]string{
		"/gone":  {"client went away", "client went away"}, // HTTP/1.1, HTTP/2
		"/ended": {"backend ended the stream", "config reload or server shutdown"},
		"/aged":  {"max_age reached"},
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := oc.endedReasons(t)
		if len(got) == len(want) && len(got["/gone"]) == 2 && len(got["/ended"]) == 2 {
			for path, reasons := range want {
				if len(got[path]) != len(reasons) || got[path][0] != reasons[0] || got[path][len(reasons)-1] != reasons[len(reasons)-1] {
					t.Errorf("%s: stream ended with reasons %q, want %q", path, got[path], reasons)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream ended lines: %q, want %q", got, want)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition with a deadline
	}
}

// caddy_sse_clients_refused_total is documented with its limit label
// values: its series exist, at 0, before any client was refused.
func TestMetricsRefusedPresentAtZero(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	oc := startObservedCaddy(t, fanoutRoute(e, nil))
	for _, limit := range []string{"max_clients", "max_clients_total", "max_streams"} {
		v, found := oc.metric(t, "caddy_sse_clients_refused_total", "limit", limit)
		if !found || v != 0 {
			t.Errorf("caddy_sse_clients_refused_total{limit=%q}: %v (found: %v), want 0", limit, v, found)
		}
	}
}
