package caddysse

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// observedCaddy is a running Caddy with its admin endpoint on loopback
// (for /metrics and /sse/streams) and the plugin's logs, at debug level,
// in a file.
type observedCaddy struct {
	Base    string // http://addr of the server
	Admin   string // http://addr of the admin endpoint
	LogFile string // the plugin's logs, JSON lines
}

// startObservedCaddy runs a config with the given routes, an admin
// endpoint on a free port and the plugin's logs in a file. Caddy and its
// admin endpoint are stopped when the test ends.
func startObservedCaddy(t testing.TB, routes ...string) observedCaddy {
	t.Helper()
	caddyMu.Lock()
	oc := observedCaddy{LogFile: filepath.Join(t.TempDir(), "sse.log")}
	addr, admin := freeAddr(t), freeAddr(t)
	oc.Base, oc.Admin = "http://"+addr, "http://"+admin
	cfg := fmt.Sprintf(`{
		"admin": {"listen": %q, "config": {"persist": false}},
		"logging": {"logs": {
			"default": {"level": "ERROR", "exclude": ["http.handlers.sse"]},
			"sse": {
				"level": "DEBUG",
				"include": ["http.handlers.sse"],
				"encoder": {"format": "json"},
				"writer": {"output": "file", "filename": %q, "roll": false}
			}
		}},
		"apps": {"http": {"servers": {"test": {
			"listen": [%q],
			"protocols": ["h1", "h2c"],
			"automatic_https": {"disable": true},
			"routes": [%s]
		}}}}
	}`, admin, oc.LogFile, addr, strings.Join(routes, ","))
	if err := caddy.Load([]byte(cfg), true); err != nil {
		caddyMu.Unlock()
		t.Fatalf("loading Caddy config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
		// caddy.Stop leaves the admin endpoint running; a config without
		// one stops it.
		if err := caddy.Load([]byte(`{"admin": {"disabled": true, "config": {"persist": false}},
			"logging": {"logs": {"default": {"level": "ERROR"}}}}`), true); err != nil {
			t.Errorf("stopping the admin endpoint: %v", err)
		}
		_ = caddy.Stop()
		caddyMu.Unlock()
	})
	return oc
}

// get fetches an admin endpoint path and returns its body.
func (oc observedCaddy) get(t testing.TB, path string) []byte {
	t.Helper()
	resp, err := http.Get(oc.Admin + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s: %s", path, resp.Status, body)
	}
	return body
}

// metric is the value of the series of name whose labels include the given
// ones (key=value pairs), from Caddy's /metrics; found is false when no
// series matches.
func (oc observedCaddy) metric(t testing.TB, name string, labels ...string) (value float64, found bool) {
	t.Helper()
	return metricValue(t, oc.get(t, "/metrics"), name, labels...)
}

// metricValue reads a series from the Prometheus text format; with several
// matching series it returns their sum.
func metricValue(t testing.TB, text []byte, name string, labels ...string) (float64, bool) {
	t.Helper()
	want := make(map[string]string)
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	sum, found := 0.0, false
	sc := bufio.NewScanner(bytes.NewReader(text))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		series, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		metric, lbls, _ := strings.Cut(series, "{")
		if metric != name {
			continue
		}
		got := make(map[string]string)
		for pair := range strings.SplitSeq(strings.TrimSuffix(lbls, "}"), ",") {
			if k, v, ok := strings.Cut(pair, "="); ok {
				got[k], _ = strconv.Unquote(v)
			}
		}
		match := true
		for k, v := range want {
			if got[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum, found = sum+f, true
	}
	return sum, found
}

// waitMetric polls /metrics until the series satisfies cond.
func (oc observedCaddy) waitMetric(t testing.TB, within time.Duration, cond func(float64) bool, what, name string, labels ...string) float64 {
	t.Helper()
	var v float64
	var found bool
	if !eventually(within, func() bool {
		v, found = oc.metric(t, name, labels...)
		return found && cond(v)
	}) {
		t.Fatalf("%s%v: want %s within %s; last value %v (found: %v)", name, labels, what, within, v, found)
	}
	return v
}

func eq(want float64) (func(float64) bool, string) {
	return func(v float64) bool { return v == want }, fmt.Sprint(want)
}

func (oc observedCaddy) waitMetricEq(t testing.TB, want float64, name string, labels ...string) {
	t.Helper()
	cond, what := eq(want)
	oc.waitMetric(t, 5*time.Second, cond, what, name, labels...)
}

// waitLog polls the plugin's log file until it contains s, and returns it.
func (oc observedCaddy) waitLog(t testing.TB, within time.Duration, s string) []byte {
	t.Helper()
	var b []byte
	if !eventually(within, func() bool {
		b, _ = os.ReadFile(oc.LogFile)
		return bytes.Contains(b, []byte(s))
	}) {
		t.Fatalf("no %q in the plugin's logs within %s; logs:\n%s", s, within, b)
	}
	return b
}

// The pass-through metrics move as a stream starts, carries events and
// heartbeats, and ends: exact counts, from Caddy's own /metrics.
func TestMetricsPassthroughStream(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	oc := startObservedCaddy(t, route("/events",
		sseHandler(map[string]any{"padding": 100, "heartbeat": "1s", "compress": []string{"off"}}), proxyTo(b.Addr)))
	pt := []string{"mode", "passthrough"}

	// A fresh config starts from zero (its own registry).
	for _, name := range []string{"caddy_sse_streams_active", "caddy_sse_clients_active", "caddy_sse_events_total", "caddy_sse_heartbeats_total"} {
		if v, found := oc.metric(t, name, pt...); !found || v != 0 {
			t.Fatalf("%s before any stream = %v (found %v), want 0", name, v, found)
		}
	}

	c := openStream(t, oc.Base+"/events", false)
	oc.waitMetricEq(t, 1, "caddy_sse_streams_active", pt...)
	oc.waitMetricEq(t, 1, "caddy_sse_clients_active", pt...)
	if v, _ := oc.metric(t, "caddy_sse_streams_active", "mode", "fanout"); v != 0 {
		t.Errorf("fanout streams_active = %v, want 0", v)
	}

	// Three events, one of them in two writes.
	b.send(t, "data: one\n\n", "id: 2\ndata: t", "wo\n\n", "data: three\n\n")
	c.waitSuffix(t, "data: three\n\n")
	oc.waitMetricEq(t, 3, "caddy_sse_events_total", pt...)

	// An idle second: a heartbeat.
	c.waitSuffix(t, ": heartbeat\n")
	oc.waitMetric(t, 5*time.Second, func(v float64) bool { return v >= 1 }, ">= 1", "caddy_sse_heartbeats_total", pt...)

	// Every byte the client got was counted, once, as identity.
	b.end(t)
	got := c.waitEOF(t, 5*time.Second)
	oc.waitMetricEq(t, 0, "caddy_sse_streams_active", pt...)
	oc.waitMetricEq(t, 0, "caddy_sse_clients_active", pt...)
	beats := float64(bytes.Count(got, []byte(": heartbeat\n")))
	oc.waitMetricEq(t, beats, "caddy_sse_heartbeats_total", pt...)
	id := []string{"mode", "passthrough", "encoding", "identity"}
	oc.waitMetricEq(t, float64(len(got)), "caddy_sse_bytes_written_total", id...)
	oc.waitMetricEq(t, float64(len(got)), "caddy_sse_bytes_uncompressed_total", id...)
	if v, _ := oc.metric(t, "caddy_sse_slow_clients_total", pt...); v != 0 {
		t.Errorf("slow_clients_total = %v after a clean end, want 0", v)
	}
}

// A compressed stream counts the compressed bytes that reach the client
// and the bytes before compression, under its encoding.
func TestMetricsCompressedBytes(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	oc := startObservedCaddy(t, route("/events",
		sseHandler(map[string]any{"heartbeat": 0, "compress": []string{"gzip"}}), proxyTo(b.Addr)))
	c := openStream(t, oc.Base+"/events", false, "Accept-Encoding", "gzip")
	if ce := c.Resp.Header.Get("Content-Encoding"); ce != "gzip" {
		t.Fatalf("Content-Encoding = %q, want gzip", ce)
	}
	for i := range 20 {
		b.send(t, fmt.Sprintf("id: %d\ndata: the same words again and again, %d\n\n", i, i))
	}
	b.end(t)
	wire := c.waitEOF(t, 5*time.Second)
	zr, err := gzip.NewReader(bytes.NewReader(wire))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("gunzip: %v", err)
	}
	if !bytes.Contains(plain, []byte("again, 19\n\n")) {
		t.Fatalf("decompressed stream lacks the last event: %q", plain)
	}
	gz := []string{"mode", "passthrough", "encoding", "gzip"}
	oc.waitMetricEq(t, float64(len(wire)), "caddy_sse_bytes_written_total", gz...)
	oc.waitMetricEq(t, float64(len(plain)), "caddy_sse_bytes_uncompressed_total", gz...)
	if len(wire) >= len(plain) {
		t.Errorf("%d wire bytes for %d plain bytes: not compressed?", len(wire), len(plain))
	}
	if v, _ := oc.metric(t, "caddy_sse_bytes_written_total", "encoding", "identity"); v != 0 {
		t.Errorf("identity bytes_written_total = %v, want 0", v)
	}
}

// A client that stops reading is cut off after write_timeout: counted as a
// slow client and logged as a warning.
func TestMetricsSlowClientCutOff(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	oc := startObservedCaddy(t, route("/events",
		sseHandler(map[string]any{"heartbeat": 0, "padding": 0, "write_timeout": "300ms", "compress": []string{"off"}}), proxyTo(b.Addr)))

	// A client that sends its request and never reads.
	conn, err := net.Dial("tcp", strings.TrimPrefix(oc.Base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.(*net.TCPConn).SetReadBuffer(4 << 10)
	fmt.Fprintf(conn, "GET /events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n")
	b.request(t)
	oc.waitMetricEq(t, 1, "caddy_sse_streams_active", "mode", "passthrough")

	// The backend writes big events until the plugin gives up on the client.
	stop := make(chan struct{})
	fed := make(chan struct{})
	go func() {
		defer close(fed)
		ev := []byte("data: " + strings.Repeat("x", 64<<10) + "\n\n")
		for {
			select {
			case b.writes <- backendWrite{data: ev}:
			case <-stop:
				return
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-fed })

	oc.waitMetric(t, 20*time.Second, func(v float64) bool { return v == 1 }, "1", "caddy_sse_slow_clients_total", "mode", "passthrough")
	oc.waitMetricEq(t, 0, "caddy_sse_streams_active", "mode", "passthrough")
	logs := oc.waitLog(t, 5*time.Second, "within write_timeout; cut off")
	if !bytes.Contains(logs, []byte(`"level":"warn"`)) {
		t.Errorf("the slow client is not logged as a warning:\n%s", logs)
	}
	b.handlerReturned(t, 5*time.Second)
}

// newMetrics shares the collectors of one registry between the handlers of
// a config, and a new registry (a reloaded config) gets its own.
func TestMetricsRegistryPerConfig(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	reg := ctx.GetMetricsRegistry()
	m1, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m2, err := newMetrics(reg)
	if err != nil {
		t.Fatalf("second handler of the same config: %v", err)
	}
	m1.eventsForwarded(modePassthrough, 2)
	m2.eventsForwarded(modePassthrough, 3)
	m2.eventsForwarded(modeFanout, 7)
	m1.replayServed(4)
	m2.replayMissed()
	m1.upstreamConnected(false)
	m1.upstreamConnected(true)
	m1.upstreamFailed()
	m2.clientRefused("max_clients")
	m1.bytesWritten(modeFanout, codingZstd, 10, 30)

	text := gatherText(t, reg)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"caddy_sse_events_total", []string{"mode", "passthrough"}, 5},
		{"caddy_sse_events_total", []string{"mode", "fanout"}, 7},
		{"caddy_sse_replay_requests_total", []string{"result", "served"}, 1},
		{"caddy_sse_replay_requests_total", []string{"result", "missed"}, 1},
		{"caddy_sse_events_replayed_total", nil, 4},
		{"caddy_sse_upstream_connects_total", []string{"attempt", "first"}, 1},
		{"caddy_sse_upstream_connects_total", []string{"attempt", "reconnect"}, 1},
		{"caddy_sse_upstream_failures_total", nil, 1},
		{"caddy_sse_clients_refused_total", []string{"limit", "max_clients"}, 1},
		{"caddy_sse_bytes_written_total", []string{"mode", "fanout", "encoding", "zstd"}, 10},
		{"caddy_sse_bytes_uncompressed_total", []string{"mode", "fanout", "encoding", "zstd"}, 30},
	}
	for _, c := range checks {
		if v, found := metricValue(t, text, c.name, c.labels...); !found || v != c.want {
			t.Errorf("%s%v = %v (found %v), want %v", c.name, c.labels, v, found, c.want)
		}
	}

	// A reloaded config: a new registry, counting from zero.
	ctx2, cancel2 := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel2()
	m3, err := newMetrics(ctx2.GetMetricsRegistry())
	if err != nil {
		t.Fatal(err)
	}
	m3.eventsForwarded(modePassthrough, 1)
	if v, _ := metricValue(t, gatherText(t, ctx2.GetMetricsRegistry()), "caddy_sse_events_total", "mode", "passthrough"); v != 1 {
		t.Errorf("new registry: events_total = %v, want 1", v)
	}

	// No registry, no metrics, no panic.
	var none *sseMetrics
	none.eventsForwarded(modePassthrough, 1)
	none.passthroughStarted()
	none.replayServed(1)
}

// gatherText is the registry's metrics in the Prometheus text format.
func gatherText(t testing.TB, reg *prometheus.Registry) []byte {
	t.Helper()
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.PanicOnError}).
		ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	return rec.Body.Bytes()
}

// Fan-out hubs and their clients are counted when /metrics is scraped
// (hubs outlive the config that made them): one hub, two clients, then
// nothing once the clients left (linger 0).
func TestMetricsFanoutActive(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	oc := startObservedCaddy(t, route("/events",
		sseHandler(map[string]any{"padding": 0, "heartbeat": 0, "compress": []string{"off"},
			"fanout": map[string]any{"linger": 0}}), proxyTo(b.Addr)))
	fo := []string{"mode", "fanout"}
	oc.waitMetricEq(t, 0, "caddy_sse_streams_active", fo...)

	c1 := openStream(t, oc.Base+"/events", false)
	b.request(t)
	c2 := openStream(t, oc.Base+"/events", false)
	oc.waitMetricEq(t, 1, "caddy_sse_streams_active", fo...)
	oc.waitMetricEq(t, 2, "caddy_sse_clients_active", fo...)
	oc.waitMetricEq(t, 0, "caddy_sse_streams_active", "mode", "passthrough")
	b.send(t, "data: shared\n\n")
	for _, c := range []*client{c1, c2} {
		c.waitFor(t, 5*time.Second, "the shared event", func(b []byte) bool { return bytes.Contains(b, []byte("data: shared\n")) })
	}

	c1.close()
	oc.waitMetricEq(t, 1, "caddy_sse_clients_active", fo...)
	c2.close()
	oc.waitMetricEq(t, 0, "caddy_sse_clients_active", fo...)
	oc.waitMetricEq(t, 0, "caddy_sse_streams_active", fo...)
	b.handlerReturned(t, 5*time.Second)
}
