package caddysse

import (
	"cmp"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// listers holds every provisioned sse handler (as a streamLister), keyed
// by the handler itself, so that the admin API, which Caddy provisions
// apart from the HTTP app, can list their streams. Handlers add themselves
// at Provision and delete themselves at Cleanup; during a config reload
// the handlers of both configs are listed, as both serve streams.
var listers = caddy.NewUsagePool()

// streamLister is anything that can report its live streams: a handler's
// pass-through streams and its fan-out hubs.
type streamLister interface{ listStreams() []streamStatus }

// streamStatus is one live stream in GET /sse/streams (see docs/admin.md):
// a pass-through stream (one client, its own upstream request) or a
// fan-out hub (one upstream, shared by its clients).
type streamStatus struct {
	Mode          string  `json:"mode"`           // passthrough or fanout
	Key           string  `json:"key"`            // hashed request identity, see Handler.hashKey
	Path          string  `json:"path,omitempty"` // request path, without the query
	Clients       int     `json:"clients"`
	HandedOver    int     `json:"handed_over,omitempty"` // fan-out clients served by the hub's delivery loops
	Upstream      string  `json:"upstream"`              // state of the upstream stream, see docs/admin.md
	UptimeSeconds float64 `json:"uptime_seconds"`
	LastEventID   string  `json:"last_event_id,omitempty"`
	CacheEvents   int     `json:"cache_events"`
	CacheBytes    int     `json:"cache_bytes"`
	Reconnects    int     `json:"reconnects"`
	Events        int64   `json:"events"`             // events received from upstream
	Bytes         int64   `json:"bytes"`              // bytes written to clients, before compression
	WireBytes     int64   `json:"wire_bytes"`         // the same bytes as sent, after compression
	Encoding      string  `json:"encoding,omitempty"` // content coding to the client(s); a hub's: the codings its clients use, comma-separated
	// Encodings is a hub's figures per content coding (omitted for
	// pass-through streams, whose one coding is Encoding).
	Encodings []encodingStatus `json:"encodings,omitempty"`
}

// encodingStatus is what a fan-out hub wrote to its clients of one
// content coding, since the hub began.
type encodingStatus struct {
	Encoding  string `json:"encoding"`
	Clients   int64  `json:"clients"`    // clients now streaming with it
	Bytes     int64  `json:"bytes"`      // before compression
	WireBytes int64  `json:"wire_bytes"` // after compression
}

// Upstream states of a pass-through stream.
const (
	upstreamStreaming = "streaming" // the handler behind is writing the stream
	upstreamEnding    = "ending"    // the plugin ends the stream at the next event boundary
	upstreamClosed    = "closed"    // ended; the handler behind is returning
)

// provisionObservability sets up the handler's metrics and admin listing;
// Provision calls it once h.streams exists.
func (h *Handler) provisionObservability(ctx caddy.Context) error {
	m, err := newMetrics(ctx.GetMetricsRegistry())
	if err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}
	h.metrics = m
	h.keySecret = make([]byte, 32)
	_, _ = rand.Read(h.keySecret) // never fails (crypto/rand)
	listers.LoadOrStore(h, streamLister(h))
	return nil
}

// unlistHandler removes the handler from the admin listing (Cleanup).
func (h *Handler) unlistHandler() {
	_, _ = listers.Delete(h)
}

// hashKey is how a stream's identity appears in the admin API: an HMAC of
// the parts under a secret random per handler instance, so that equal
// identities (same host, path, query and credentials) show the same key
// without the key revealing any of them, even short or guessable ones.
func (h *Handler) hashKey(parts ...string) string {
	mac := hmac.New(sha256.New, h.keySecret)
	for _, p := range parts {
		fmt.Fprintf(mac, "%d:%s;", len(p), p)
	}
	return hex.EncodeToString(mac.Sum(nil)[:8])
}

// requestKey is the hashed identity of a request: what a client asks an
// upstream for, and as whom: the default fan-out key (streamkey.go), so
// that every credential kind counts and a pass-through stream shows the
// key of the hub it would share with the default key.
func (h *Handler) requestKey(r *http.Request) string {
	return h.hashKey(streamKey(r))
}

// listStreams reports the handler's live streams.
func (h *Handler) listStreams() []streamStatus {
	if h.streams == nil {
		return nil
	}
	return h.streams.listStreams()
}

// listStreams reports the pass-through streams of the set (fan-out
// subscribers are reported by their hubs). Stream locks are taken after
// the set's lock is released (startStream takes them in the other order).
func (ss *streamSet) listStreams() []streamStatus {
	var list []streamStatus
	now := time.Now()
	for _, e := range ss.snapshot(nil, false) {
		if s, ok := any(e).(*stream); ok {
			list = append(list, s.status(now))
		}
	}
	return list
}

// status reports the stream for the admin API.
func (s *stream) status(now time.Time) streamStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := streamStatus{
		Mode:          modePassthrough.String(),
		Key:           s.obs.key,
		Path:          s.obs.path,
		Clients:       1,
		Upstream:      upstreamStreaming,
		UptimeSeconds: now.Sub(s.started).Seconds(),
		LastEventID:   formatID(s.obs.lastID),
		Events:        s.events,
		Bytes:         s.bytes,
		WireBytes:     s.obs.wire,
		Encoding:      s.encoding().String(),
	}
	switch {
	case s.closed:
		st.Upstream, st.Clients = upstreamClosed, 0
	case s.endAtBoundary != "":
		st.Upstream = upstreamEnding
	}
	return st
}

// adminAPI is the admin module that serves GET /sse/streams on Caddy's
// admin endpoint: the live streams of every sse handler, as JSON.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.sse",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes of the plugin.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/sse/streams", Handler: caddy.AdminHandlerFunc(a.serveStreams)}}
}

// streamsResponse is the body of GET /sse/streams.
type streamsResponse struct {
	Streams []streamStatus `json:"streams"`
}

func (a *adminAPI) serveStreams(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
	}
	resp := streamsResponse{Streams: collectStreams()}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(resp)
}

// collectStreams lists the streams of every registered handler, longest
// running first. The pool is only read under its lock; handlers are asked
// after it is released.
func collectStreams() []streamStatus {
	var ls []streamLister
	listers.Range(func(_, v any) bool {
		if l, ok := v.(streamLister); ok {
			ls = append(ls, l)
		}
		return true
	})
	var hubList []*hub
	hubs.Range(func(_, v any) bool {
		hubList = append(hubList, v.(*hub))
		return true
	})
	list := []streamStatus{}
	for _, l := range ls {
		list = append(list, l.listStreams()...)
	}
	// Hubs are listed from their pool, once each, even while two configs
	// share one during a reload.
	now := time.Now()
	for _, hb := range hubList {
		list = append(list, hb.report(now))
	}
	slices.SortStableFunc(list, func(a, b streamStatus) int {
		return cmp.Or(cmp.Compare(b.UptimeSeconds, a.UptimeSeconds), cmp.Compare(a.Key, b.Key))
	})
	return list
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
	_ streamLister      = (*Handler)(nil)
)
