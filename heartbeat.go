package caddysse

import (
	"time"

	"go.uber.org/zap"
)

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
