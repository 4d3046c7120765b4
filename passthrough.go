package caddysse

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/seed-b7710c89/caddy-sse/internal/sse"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// errStreamEnded is the cause given to a stream's context when the plugin
// ended the stream itself (max_age, shutdown); writes after it fail with it.
var errStreamEnded = errors.New("sse: stream ended by the plugin")

// responseWriter wraps the response of the next handlers and decides, when
// the header is written, whether it is an event stream.
type responseWriter struct {
	*caddyhttp.ResponseWriterWrapper
	h           *Handler
	req         *http.Request
	cancel      context.CancelCauseFunc
	rc          *http.ResponseController // for non-stream flushes; made once
	wroteHeader bool
	stream      *stream // set when the response is an event stream
	// acceptEncoding is the client's Accept-Encoding, which the backend
	// does not see; a stream is compressed by the plugin (compress.go).
	acceptEncoding string
}

// WriteHeader starts a stream when the response is one, and otherwise
// passes the status through.
func (rw *responseWriter) WriteHeader(status int) {
	if rw.wroteHeader {
		return
	}
	if status >= 100 && status < 200 && status != http.StatusSwitchingProtocols {
		rw.ResponseWriter.WriteHeader(status) // informational: more headers follow
		return
	}
	rw.wroteHeader = true
	if !rw.isEventStream(status) {
		rw.ResponseWriter.WriteHeader(status)
		return
	}
	prepareStreamHeader(rw.Header(), rw.req.ProtoMajor)
	encoding := rw.h.negotiateStream(rw.Header(), rw.acceptEncoding)
	if rw.req.Method == http.MethodHead {
		rw.ResponseWriter.WriteHeader(status)
		return
	}
	rw.stream = rw.h.startStream(rw.ResponseWriter, rw.req, status, rw.cancel, encoding)
}

// isEventStream reports whether the response is an event stream the
// plugin can read, and warns about one the backend compressed itself.
func (rw *responseWriter) isEventStream(status int) bool {
	ok, ce := isEventStream(status, rw.Header())
	if ce != "" {
		rw.h.logger.Warn("backend sent a compressed event stream; passing it through without per-event flushing or heartbeats",
			zap.String("content_encoding", ce), zap.String("path", rw.req.URL.Path))
	}
	return ok
}

func (rw *responseWriter) Write(p []byte) (int, error) {
	if !rw.wroteHeader {
		rw.WriteHeader(http.StatusOK)
	}
	if rw.stream != nil {
		return rw.stream.Write(p)
	}
	return rw.ResponseWriter.Write(p)
}

// ReadFrom keeps io.Copy (file_server, for example) on our Write for
// streams, and on the fast path of the underlying writer for the rest.
func (rw *responseWriter) ReadFrom(r io.Reader) (int64, error) {
	if !rw.wroteHeader {
		rw.WriteHeader(http.StatusOK)
	}
	if rw.stream != nil {
		return io.Copy(writerOnly{rw.stream}, r)
	}
	return rw.ResponseWriterWrapper.ReadFrom(r)
}

// FlushError is what http.ResponseController calls. A stream is flushed at
// every event boundary by the plugin, so a flush from the handler behind
// it (reverse_proxy flushes after every read) must not push out half an
// event.
func (rw *responseWriter) FlushError() error {
	if !rw.wroteHeader {
		rw.WriteHeader(http.StatusOK)
	}
	if rw.stream != nil {
		return nil
	}
	if rw.rc == nil {
		rw.rc = http.NewResponseController(rw.ResponseWriter)
	}
	return rw.rc.Flush()
}

// Flush serves handlers that still type-assert http.Flusher.
func (rw *responseWriter) Flush() { _ = rw.FlushError() }

type writerOnly struct{ io.Writer }

// Why a stream ended, for logs and for the bytes written at the end.
type endReason string

const (
	endBackend    endReason = "backend ended the stream"
	endClientGone endReason = "client went away"
	endClient     endReason = "client write failed"
	endMaxAge     endReason = "max_age reached"
	endShutdown   endReason = "config reload or server shutdown"
	endNotStarted endReason = "server shutting down before the stream started"
)

// stream is one client's event stream in pass-through mode. The handler
// behind the plugin writes into it; it forwards complete events at once,
// holds an unfinished one, and is the only writer to the client (the
// heartbeat and the end of the stream take the same lock).
type stream struct {
	h       *Handler
	client  context.Context // the client's request: done when it goes away
	cancel  context.CancelCauseFunc
	logger  *zap.Logger
	started time.Time

	mu            sync.Mutex
	out           clientConn
	frame         sse.Framer // events, and the unfinished one held until its end
	midEvent      bool       // part of an unfinished event is on the wire
	warnedSize    bool
	lastWrite     time.Time
	closed        bool
	endAtBoundary endReason // end requested while midEvent
	reason        endReason
	heartbeat     *time.Timer
	maxAge        *time.Timer
	events, bytes int64
	heartbeats    int64
	obs           streamObs // for metrics and the admin API (metrics.go)
}

// startStream writes the stream's header and prelude and starts its timers.
func (h *Handler) startStream(w http.ResponseWriter, r *http.Request, status int, cancel context.CancelCauseFunc, encoding coding) *stream {
	srv, _ := r.Context().Value(http.ServerContextKey).(*http.Server)
	s := &stream{
		h:       h,
		client:  r.Context(),
		cancel:  cancel,
		logger:  h.logger.With(zap.String("path", r.URL.Path), zap.String("remote_ip", remoteIP(r))),
		started: time.Now(),
		obs:     streamObs{key: h.requestKey(r), path: r.URL.Path},
	}
	liftServerTimeouts(r.Context())
	s.out = newClientConn(s.countWire(w), time.Duration(h.WriteTimeout))
	s.mu.Lock()
	defer s.mu.Unlock()
	if encoding != codingIdentity {
		if err := s.out.compress(encoding); err != nil {
			s.logger.Error("cannot compress the stream; sending it uncompressed", zap.Stringer("encoding", encoding), zap.Error(err))
			w.Header().Del("Content-Encoding")
			encoding = codingIdentity
		}
	}
	s.obs.encoding = encoding
	w.WriteHeader(status)
	// Headers and padding go out at once, before the first event.
	if err := s.writeLocked(h.preludeFor(encoding)); err != nil {
		s.closeLocked(endClient, err)
		return s
	}
	if !h.streams.add(s, srv) {
		s.closeLocked(endNotStarted, errStreamEnded)
		return s
	}
	s.observeStart()
	if h.heartbeatEvery > 0 {
		s.heartbeat = time.AfterFunc(h.heartbeatEvery, s.onHeartbeat)
	}
	if h.MaxAge > 0 {
		s.maxAge = time.AfterFunc(jitter(time.Duration(h.MaxAge)), func() { s.end(endMaxAge) })
	}
	if c := s.logger.Check(zap.DebugLevel, "stream started"); c != nil {
		c.Write()
	}
	return s
}

// Write takes bytes from the handler behind the plugin: complete events go
// to the client at once, with one flush for all events of this write; the
// unfinished rest is held until its end or until it outgrows max_event_size.
func (s *stream) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, errStreamEnded
	}
	end, count := 0, 0
	for off := 0; off < len(p); {
		n, complete := s.frame.Next(p[off:])
		off += n
		if complete {
			end, count = off, count+1
			s.observeEvent()
			if s.endAtBoundary != "" {
				break // the stream ends at this boundary
			}
		}
	}
	if count > 0 {
		if err := s.forwardLocked(p[:end]); err != nil {
			return 0, err
		}
		s.events += int64(count)
		s.h.metrics.eventsForwarded(modePassthrough, count)
		s.midEvent = false
		if s.endAtBoundary != "" {
			s.endLocked(s.endAtBoundary)
			return end, errStreamEnded
		}
	}
	rest := p[end:]
	switch {
	case len(rest) == 0:
	case s.midEvent:
		if err := s.forwardLocked(rest); err != nil {
			return end, err
		}
	case s.frame.Held()+len(rest) > s.h.MaxEventSize:
		if !s.warnedSize {
			s.warnedSize = true
			s.logger.Warn("event larger than max_event_size; streaming the rest of it unbuffered",
				zap.Int("max_event_size", s.h.MaxEventSize))
		}
		if err := s.forwardLocked(rest); err != nil {
			return end, err
		}
		s.midEvent = true
	default:
		s.frame.Hold(rest)
	}
	return len(p), nil
}

// forwardLocked sends what is held plus chunk to the client, and flushes.
func (s *stream) forwardLocked(chunk []byte) error {
	err := s.writeLocked(s.frame.Take(chunk))
	s.frame.Release()
	return err
}

// writeLocked writes and flushes p (with p empty, it only flushes); a
// failed write ends the stream.
func (s *stream) writeLocked(p []byte) error {
	now := time.Now()
	if err := s.out.writeFlush(now, p); err != nil {
		s.observeWriteError(err)
		s.closeLocked(endClient, err)
		return err
	}
	s.lastWrite = now
	s.bytes += int64(len(p))
	s.observeWrite(len(p))
	return nil
}

// end ends the stream at the next event boundary, after the retry hint.
func (s *stream) end(reason endReason) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	if s.midEvent {
		s.endAtBoundary = reason // Write ends it when the event is complete
		return
	}
	s.endLocked(reason)
}

func (s *stream) endLocked(reason endReason) {
	if s.frame.Held() > 0 {
		if c := s.logger.Check(zap.WarnLevel, "dropping an unfinished event at the end of the stream"); c != nil {
			c.Write(zap.Int("bytes", s.frame.Held()), zap.String("reason", string(reason)))
		}
		s.frame.Release()
	}
	if len(s.h.retryHint) > 0 && s.writeLocked(s.h.retryHint) != nil {
		return // closed by the failed write
	}
	s.closeLocked(reason, errStreamEnded)
}

// closeLocked marks the stream closed and stops the handler behind it.
func (s *stream) closeLocked(reason endReason, cause error) {
	if s.closed {
		return
	}
	s.closed = true
	s.reason = reason
	s.stopTimers()
	s.out.endEncoding(reason != endClient && reason != endClientGone) // a trailer, unless the client is gone
	s.cancel(cause)
}

func (s *stream) stopTimers() {
	if s.heartbeat != nil {
		s.heartbeat.Stop()
	}
	if s.maxAge != nil {
		s.maxAge.Stop()
	}
}

// finish runs when the handler behind the plugin returned. It forwards
// what is left of an unfinished event and reports whether the plugin ended
// the stream itself.
func (s *stream) finish() (endedByPlugin bool) {
	s.h.streams.remove(s)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed && s.client.Err() != nil {
		// The client left: the handler behind returned because its
		// context ended, not because the backend ended the stream.
		s.closeLocked(endClientGone, nil)
	}
	if !s.closed {
		if s.frame.Held() > 0 {
			s.logger.Warn("backend ended the stream in the middle of an event; EventSource discards it",
				zap.Int("bytes", s.frame.Held()))
			_ = s.forwardLocked(nil)
		}
		s.closeLocked(endBackend, nil)
	}
	s.observeEnd()
	if c := s.logger.Check(zap.InfoLevel, "stream ended"); c != nil {
		c.Write(zap.String("reason", string(s.reason)),
			zap.Duration("duration", time.Since(s.started)),
			zap.Int64("events", s.events), zap.Int64("bytes", s.bytes))
	}
	return s.reason == endMaxAge || s.reason == endShutdown || s.reason == endNotStarted
}

func remoteIP(r *http.Request) string {
	vars, _ := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	if ip, ok := vars[caddyhttp.ClientIPVarKey].(string); ok {
		return ip
	}
	return r.RemoteAddr
}

// onHeartbeat runs on the stream's heartbeat timer. Writes do not reset the
// timer (that would cost a timer update per event); they record the time,
// and the timer, when it fires early, re-arms itself for the rest of the
// idle interval. So there is one timer per stream and no polling.
func (s *stream) onHeartbeat() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	every := s.h.heartbeatEvery
	idle := time.Since(s.lastWrite)
	if idle < every {
		s.heartbeat.Reset(every - idle)
		return
	}
	if s.midEvent {
		// Part of an event is on the wire: a comment now would land inside
		// it. The next write completes or continues the event anyway.
		s.heartbeat.Reset(every)
		return
	}
	if err := s.writeLocked(s.h.heartbeatBytes); err != nil {
		if c := s.logger.Check(zap.DebugLevel, "heartbeat write failed; client gone"); c != nil {
			c.Write(zap.Error(err))
		}
		return
	}
	s.heartbeats++
	s.h.metrics.heartbeatsSent(modePassthrough, 1)
	s.heartbeat.Reset(every)
}
