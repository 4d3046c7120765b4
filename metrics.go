package caddysse

import (
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// The plugin's metrics live in Caddy's metrics registry, so they appear on
// Caddy's own /metrics (admin endpoint, or the metrics handler). Every
// label has a small fixed set of values: never a path, a host, a user or a
// query.
//
//	caddy_sse_streams_active{mode}                  gauge    pass-through streams, fan-out hubs
//	caddy_sse_clients_active{mode}                  gauge    clients connected
//	caddy_sse_events_total{mode}                    counter  events written to clients
//	caddy_sse_heartbeats_total{mode}                counter  heartbeat comments written to clients
//	caddy_sse_bytes_written_total{mode,encoding}    counter  bytes written to clients, after compression
//	caddy_sse_bytes_uncompressed_total{mode,encoding} counter  the same bytes before compression
//	caddy_sse_replay_requests_total{result}         counter  Last-Event-ID replays: served or missed
//	caddy_sse_events_replayed_total                 counter  events sent from the replay cache
//	caddy_sse_upstream_connects_total{attempt}      counter  fan-out upstream connections made: first or reconnect
//	caddy_sse_upstream_failures_total               counter  fan-out upstream connections that failed or broke
//	caddy_sse_slow_clients_total{mode}              counter  clients cut off for not reading in time
//	caddy_sse_clients_refused_total{limit}          counter  clients refused by a configured limit
//
// Label values: mode is passthrough or fanout; encoding is identity, gzip
// or zstd; result is served or missed; attempt is first or reconnect;
// limit is the name of the configuration field whose limit was reached.

// streamMode is how a handler serves a stream: each client its own
// upstream request (pass-through), or clients sharing one (fan-out).
type streamMode uint8

const (
	modePassthrough streamMode = iota
	modeFanout
	numModes
)

func (m streamMode) String() string {
	if m == modeFanout {
		return "fanout"
	}
	return "passthrough"
}

// sseMetrics are the collectors of one metrics registry (one Caddy
// config), shared by every sse handler of that config. The label values
// known in advance are resolved once, so that counting costs one atomic
// add. A nil *sseMetrics (no registry) counts nothing.
type sseMetrics struct {
	active      *activeCollector
	events      [numModes]prometheus.Counter
	heartbeats  [numModes]prometheus.Counter
	slowClients [numModes]prometheus.Counter
	bytesWire   [numModes][numCodings]prometheus.Counter
	bytesRaw    [numModes][numCodings]prometheus.Counter

	replaysServed  prometheus.Counter
	replaysMissed  prometheus.Counter
	eventsReplayed prometheus.Counter
	connectsFirst  prometheus.Counter
	reconnects     prometheus.Counter
	upstreamFails  prometheus.Counter
	refused        *prometheus.CounterVec
}

// newMetrics registers the plugin's collectors with reg, or, when another
// sse handler of the same config registered them already, uses those.
// Caddy makes a new registry for every config it loads, so registering
// per registry (rather than once per process) is what makes the metrics
// of a reloaded config appear, and never registers a collector twice.
func newMetrics(reg prometheus.Registerer) (*sseMetrics, error) {
	if reg == nil {
		return nil, nil
	}
	const ns, sub = "caddy", "sse"
	var errs []error
	counterVec := func(name, help string, labels ...string) *prometheus.CounterVec {
		return register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, labels), &errs)
	}
	counter := func(name, help string) prometheus.Counter {
		return register(reg, prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}), &errs)
	}

	active := register(reg, newActiveCollector(ns, sub), &errs)
	events := counterVec("events_total", "Events written to clients (an event sent to n clients counts n).", "mode")
	heartbeats := counterVec("heartbeats_total", "Heartbeat comments written to clients.", "mode")
	slow := counterVec("slow_clients_total", "Clients cut off because they did not read their stream within write_timeout.", "mode")
	m := &sseMetrics{active: active}
	bytesWire := counterVec("bytes_written_total", "Bytes of event streams written to clients, after compression.", "mode", "encoding")
	bytesRaw := counterVec("bytes_uncompressed_total", "Bytes of event streams written to clients, before compression.", "mode", "encoding")
	replays := counterVec("replay_requests_total", "Reconnects with a Last-Event-ID: served from the replay cache, or missed (id not in the cache).", "result")
	m.eventsReplayed = counter("events_replayed_total", "Events sent to reconnecting clients from the replay cache.")
	connects := counterVec("upstream_connects_total", "Upstream connections made by fan-out hubs: the first one of a hub, or a reconnect.", "attempt")
	m.upstreamFails = counter("upstream_failures_total", "Upstream connection attempts of fan-out hubs that failed, and upstream streams that broke.")
	m.refused = counterVec("clients_refused_total", "Clients refused because a configured limit was reached.", "limit")
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	for mode := range numModes {
		l := mode.String()
		m.events[mode] = events.WithLabelValues(l)
		m.heartbeats[mode] = heartbeats.WithLabelValues(l)
		m.slowClients[mode] = slow.WithLabelValues(l)
		// Every coding's series exists from the start.
		for c := range numCodings {
			m.bytesWire[mode][c] = bytesWire.WithLabelValues(l, c.String())
			m.bytesRaw[mode][c] = bytesRaw.WithLabelValues(l, c.String())
		}
	}
	m.replaysServed = replays.WithLabelValues("served")
	m.replaysMissed = replays.WithLabelValues("missed")
	m.connectsFirst = connects.WithLabelValues("first")
	m.reconnects = connects.WithLabelValues("reconnect")
	// The refusal series exist at 0 from the start, as documented, so that
	// a dashboard or an alert on them works before the first refusal.
	for _, limit := range refusalLimits {
		m.refused.WithLabelValues(limit)
	}
	return m, nil
}

// register registers c, or returns the equal collector registered before.
func register[C prometheus.Collector](reg prometheus.Registerer, c C, errs *[]error) C {
	err := reg.Register(c)
	if err == nil {
		return c
	}
	if are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); ok {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing
		}
	}
	*errs = append(*errs, err)
	return c
}

// --- Active streams and clients ---

// activeCollector reports caddy_sse_streams_active and
// caddy_sse_clients_active when scraped: pass-through streams (one client
// each) from a count kept as they start and end, fan-out hubs and their
// clients by counting the hubs at that moment. Hubs outlive the config
// (and registry) that made them, so a count kept per registry would lose
// them at a reload.
type activeCollector struct {
	streams, clients *prometheus.Desc
	passthrough      atomic.Int64
}

func newActiveCollector(ns, sub string) *activeCollector {
	return &activeCollector{
		streams: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "streams_active"),
			"Event streams open: one per client in pass-through mode, one per shared upstream (hub) in fan-out mode.", []string{"mode"}, nil),
		clients: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "clients_active"),
			"Clients receiving an event stream.", []string{"mode"}, nil),
	}
}

func (c *activeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.streams
	ch <- c.clients
}

func (c *activeCollector) Collect(ch chan<- prometheus.Metric) {
	pt := float64(c.passthrough.Load())
	hubCount, hubClients := fanoutActive()
	ch <- prometheus.MustNewConstMetric(c.streams, prometheus.GaugeValue, pt, modePassthrough.String())
	ch <- prometheus.MustNewConstMetric(c.clients, prometheus.GaugeValue, pt, modePassthrough.String())
	ch <- prometheus.MustNewConstMetric(c.streams, prometheus.GaugeValue, float64(hubCount), modeFanout.String())
	ch <- prometheus.MustNewConstMetric(c.clients, prometheus.GaugeValue, float64(hubClients), modeFanout.String())
}

// fanoutActive counts the live fan-out hubs (lingering ones included: they
// hold an upstream) and their clients. The pool's lock is released before
// each hub's is taken.
func fanoutActive() (hubCount, clients int) {
	var list []*hub
	hubs.Range(func(_, v any) bool {
		if hb, ok := v.(*hub); ok {
			list = append(list, hb)
		}
		return true
	})
	for _, hb := range list {
		if n, live := hb.liveClients(); live {
			hubCount++
			clients += n
		}
	}
	return hubCount, clients
}

// passthroughStarted counts a pass-through stream (and its client) as
// open; passthroughEnded undoes it. Fan-out hubs and clients need no
// calls: they are counted when scraped.
func (m *sseMetrics) passthroughStarted() {
	if m != nil {
		m.active.passthrough.Add(1)
	}
}

func (m *sseMetrics) passthroughEnded() {
	if m != nil {
		m.active.passthrough.Add(-1)
	}
}

// eventsForwarded counts n events written to clients: in fan-out mode, an
// event written to k clients is k (count them in one call where possible).
func (m *sseMetrics) eventsForwarded(mode streamMode, n int) {
	if m != nil && n > 0 {
		m.events[mode].Add(float64(n))
	}
}

// heartbeatsSent counts n heartbeat comments written to clients.
func (m *sseMetrics) heartbeatsSent(mode streamMode, n int) {
	if m != nil && n > 0 {
		m.heartbeats[mode].Add(float64(n))
	}
}

// bytesWritten counts one write to a client: wire bytes after the content
// coding enc (identity, gzip, zstd, br), raw bytes before it.
func (m *sseMetrics) bytesWritten(mode streamMode, c coding, wire, raw int) {
	if m == nil {
		return
	}
	if wire > 0 {
		m.bytesWire[mode][c].Add(float64(wire))
	}
	if raw > 0 {
		m.bytesRaw[mode][c].Add(float64(raw))
	}
}

// slowClientCut counts a client cut off for not reading in time.
func (m *sseMetrics) slowClientCut(mode streamMode) {
	if m != nil {
		m.slowClients[mode].Inc()
	}
}

// refusalLimits are the values of clients_refused_total's limit label:
// the fan-out options whose limit refuses clients (Handler.refuse).
var refusalLimits = []string{"max_clients", "max_clients_total", "max_streams"}

// clientRefused counts a client refused by a limit; limit is the name of
// the configuration field (a constant, never a value from a request), one
// of refusalLimits.
func (m *sseMetrics) clientRefused(limit string) {
	if m != nil {
		m.refused.WithLabelValues(limit).Inc()
	}
}

// --- Fan-out hubs: replay cache and upstream ---

// replayServed counts a reconnect whose Last-Event-ID was found in the
// replay cache, and the events sent to it from there.
func (m *sseMetrics) replayServed(events int) {
	if m != nil {
		m.replaysServed.Inc()
		if events > 0 {
			m.eventsReplayed.Add(float64(events))
		}
	}
}

// replayMissed counts a reconnect whose Last-Event-ID was not in the cache
// (too old, or unknown).
func (m *sseMetrics) replayMissed() {
	if m != nil {
		m.replaysMissed.Inc()
	}
}

// upstreamConnected counts an upstream connection a hub made: its first,
// or (reconnect) one after the previous broke.
func (m *sseMetrics) upstreamConnected(reconnect bool) {
	if m == nil {
		return
	}
	if reconnect {
		m.reconnects.Inc()
	} else {
		m.connectsFirst.Inc()
	}
}

// upstreamFailed counts an upstream connection attempt that failed, or an
// upstream stream that broke.
func (m *sseMetrics) upstreamFailed() {
	if m != nil {
		m.upstreamFails.Inc()
	}
}

// --- Pass-through streams ---

// streamObs is what a pass-through stream keeps for metrics, logs and the
// admin API. It is guarded by the stream's mutex.
type streamObs struct {
	key     string // hashed identity of the request (see Handler.hashKey)
	path    string // the request path, never its query
	lastID  []byte // last event id seen, reused
	counted bool   // counted in streams_active/clients_active

	encoding coding // content coding to the client
	wire     int64  // bytes that reached the client's writer (after compression)
	wireSeen int64  // wire bytes already counted in the metrics
}

// observeStart counts a stream that was accepted (added to the streamSet).
func (s *stream) observeStart() {
	s.obs.counted = true
	s.h.metrics.passthroughStarted()
}

// observeEnd undoes observeStart, once, and counts the last wire bytes
// (a compressed stream's trailer).
func (s *stream) observeEnd() {
	s.observeWrite(0)
	if !s.obs.counted {
		return
	}
	s.obs.counted = false
	s.h.metrics.passthroughEnded()
}

// observeEvent records the event the scanner just completed.
func (s *stream) observeEvent() {
	if ev := s.frame.Event(); ev.HasID() {
		s.obs.lastID = append(s.obs.lastID[:0], ev.ID()...)
	}
}

// encoding is the content coding of what the stream writes to its client.
func (s *stream) encoding() coding { return s.obs.encoding }

// observeWrite counts a write of n bytes (before compression) to the
// client, and the bytes that reached the client's writer since the last
// call (writes are flushed, so nothing stays in the encoder).
func (s *stream) observeWrite(n int) {
	wire := s.obs.wire - s.obs.wireSeen
	s.obs.wireSeen = s.obs.wire
	s.h.metrics.bytesWritten(modePassthrough, s.encoding(), int(wire), n)
}

// countWire wraps the client's writer to count the bytes written to it, by
// the stream or by its encoder.
func (s *stream) countWire(w http.ResponseWriter) http.ResponseWriter {
	return wireCounter{ResponseWriter: w, n: &s.obs.wire}
}

// wireCounter counts the bytes written through it. It unwraps for
// http.ResponseController (flushes, write deadlines).
type wireCounter struct {
	http.ResponseWriter
	n *int64
}

func (w wireCounter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	*w.n += int64(n)
	return n, err
}

func (w wireCounter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// formatID is an event id for the admin API, as valid UTF-8.
func formatID(id []byte) string { return strings.ToValidUTF8(string(id), "\uFFFD") }

// observeWriteError counts and logs a client cut off because a write did
// not complete within write_timeout (clientConn.isWriteTimeout). Other
// failures are clients gone: the "stream ended" line reports them.
func (s *stream) observeWriteError(err error) {
	if s.closed {
		return
	}
	if !s.out.isWriteTimeout(err) {
		return
	}
	s.h.metrics.slowClientCut(modePassthrough)
	s.logger.Warn("client did not read its stream within write_timeout; cut off",
		zap.Duration("write_timeout", time.Duration(s.h.WriteTimeout)))
}
