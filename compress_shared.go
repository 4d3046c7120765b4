package caddysse

import (
	"bytes"
	"hash/crc32"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
	"go.uber.org/zap"
)

// Shared compression for fan-out.
//
// A fan-out hub compresses each event once per encoding its clients use,
// not once per client: per hub and encoding there is one shared
// compressor, run under the hub's lock when the event is published, and
// its output is stored beside the event (event.z) for every client to
// write as it is. So the compression CPU of a stream no longer grows with
// its clients, and a client holds no compressor at all.
//
// A client can only use the shared bytes of an event if its decoder holds
// the same history as the shared compressor. So the compressor's history
// restarts now and then (an epoch: deflate with an empty dictionary; zstd
// a new frame), and a client is "in sync" from the first epoch start it
// writes on: from then on it writes the shared bytes of every event, in
// order. Everything else a client writes (the prelude, a reset event, a
// heartbeat, the retry hint at the end, and the events before its first
// epoch start, when it joined mid-epoch or replays from the cache) is its
// own: stored deflate blocks for gzip, raw blocks for zstd, which need no
// compressor. Writing anything of its own takes a client out of sync until
// the next epoch start. A client that falls behind keeps writing the stored
// shared bytes of each event in order, so it stays in sync.
//
// Wire formats (RFC 1951/1952 and RFC 8878), only framing written here:
//
//   - gzip: a 10-byte header per client, then deflate blocks. A shared
//     event is klauspost's StatelessDeflate of the event with the epoch's
//     last gzipDict bytes as dictionary, ending with a sync marker, so it
//     is byte-aligned and can follow anything byte-aligned; an epoch start
//     has no dictionary, so it and what follows never reference bytes from
//     before it, whatever the client's decoder window holds. A client's own
//     bytes are stored blocks (5 bytes of header each). The end is an empty
//     final stored block and the trailer: CRC-32 and length are per client,
//     kept by crc32.Update over the plain bytes it wrote.
//   - zstd: a sequence of frames. A shared epoch is one frame of
//     klauspost's streaming encoder (frame header at the epoch start, one
//     flushed block per event, no content checksum, since a client may
//     append raw blocks of its own to it). A client ends the frame it has
//     open (an empty last raw block, 3 bytes) before an epoch start's
//     frame header, and writes its own bytes as raw blocks, in a frame of
//     its own (6-byte header) if none is open. Several frames in one
//     response are valid by RFC 8878 (section 3.1) and decoders, browsers
//     included, concatenate them.
//
// When does an epoch restart? At the first event after an encoding got its
// first client, at the first event after a heartbeat (the hub was idle;
// caught-up clients wrote the heartbeat on their own, so all of them are
// out of sync, and an idle hub gives back its zstd encoder), and when
// clients wait for one: a restart costs every in-sync client some ratio
// for the next events (history starts empty), while a waiting client
// writes events uncompressed. So, while some client waits and the epoch is
// at least minEpoch events long, the epoch restarts once the waiting
// clients have written about as many events uncompressed as there are
// in-sync clients (the ratio loss of a restart is about one event's worth
// per in-sync client), and in any case at maxEpoch events. With nobody
// waiting, an epoch never ends, and the ratio is the per-client one. (On
// ~190 B JSON events, gzip wire/plain is 0.304 with unbounded history,
// 0.317 with a restart every 64 events, 0.330 every 32, 0.409 every 8;
// zstd 0.316, 0.326, 0.340, 0.417.)

// sharedCodings are the codings a hub compresses once for all clients.
//
// Not br: a brotli decoder keeps state across meta-blocks that an encoder
// started afresh (an epoch start) does not share with a client that has
// received other bytes before: the ring buffer of the last four distances
// (andybalholm's Writer codes distances against it), and the position
// that decides whether a distance is a backward reference or a static
// dictionary word. So shared bytes would decode differently for clients
// with different pasts, and a brotli stream cannot hold a second stream
// header either (unlike zstd frames). andybalholm's matchfinder Encoder
// avoids both (it never codes a distance against an earlier meta-block's
// and has no dictionary) but cannot sync-flush. A br client of a hub
// therefore compresses its own stream (fanoutClient.ownEncoder).
var sharedCodings = [numCodings]bool{codingGzip: true, codingZstd: true}

// Restart points of a shared compressor; see above.
const (
	minEpoch = 8  // events in an epoch before it restarts for a waiting client
	maxEpoch = 64 // events in an epoch after which a waiting client gets a restart
)

// eventZ is an event as the hub's shared compressors encoded it.
type eventZ struct {
	b     [numCodings][]byte // nil: the encoding had no client when the event came
	start [numCodings]bool   // these bytes begin an epoch
}

// sharedCompressions counts events compressed by shared compressors (for
// tests: once per event and encoding, whatever the number of clients).
var sharedCompressions atomic.Int64

// liveSharedEncoders counts zstd encoders held by shared compressors.
var liveSharedEncoders atomic.Int64

// zstdSharedOptions: the per-stream settings, without a content checksum.
var zstdSharedOptions = append(zstdOptions[:len(zstdOptions):len(zstdOptions)], zstd.WithEncoderCRC(false))

var zstdSharedPool = sync.Pool{New: func() any {
	z, err := zstd.NewWriter(nil, zstdSharedOptions...)
	if err != nil {
		panic(err) // the options are constant
	}
	return z
}}

// sharedCompressor is one hub's compressor for one encoding. All of it is
// guarded by the hub's lock.
type sharedCompressor struct {
	enc     coding
	clients int // clients of the hub that use this encoding
	waiting int // of those, the ones out of sync (writing their own bytes)
	waitAcc int // waiting, summed over the events of this epoch
	epoch   int // events in this epoch; 0: the next event starts one
	dict    []byte
	z       *zstd.Encoder
	out     bytes.Buffer
}

// restartDue reports whether the next event starts an epoch.
func (s *sharedCompressor) restartDue() bool {
	switch {
	case s.epoch == 0:
		return true
	case s.waiting == 0 || s.epoch < minEpoch:
		return false
	case s.epoch >= maxEpoch:
		return true
	}
	return s.waitAcc >= s.clients-s.waiting
}

// compress encodes one event and reports whether it starts an epoch. The
// bytes are the caller's.
func (s *sharedCompressor) compress(p []byte) ([]byte, bool, error) {
	start := s.restartDue()
	s.out.Reset()
	switch s.enc {
	case codingGzip:
		if start {
			s.dict = s.dict[:0]
		}
		if err := flate.StatelessDeflate(&s.out, p, false, s.dict); err != nil {
			return nil, false, err
		}
		if len(p) >= gzipDict {
			s.dict = append(s.dict[:0], p[len(p)-gzipDict:]...)
		} else {
			if drop := len(s.dict) + len(p) - gzipDict; drop > 0 {
				s.dict = s.dict[:copy(s.dict, s.dict[drop:])]
			}
			s.dict = append(s.dict, p...)
		}
	case codingZstd:
		if s.z == nil {
			s.z = zstdSharedPool.Get().(*zstd.Encoder)
			liveSharedEncoders.Add(1)
			start = true
		}
		if start {
			s.z.Reset(&s.out) // a new frame; the last one's blocks are all out
		}
		if _, err := s.z.Write(p); err != nil {
			return nil, false, err
		}
		if err := s.z.Flush(); err != nil {
			return nil, false, err
		}
	}
	if start {
		s.epoch, s.waitAcc = 0, 0
	}
	s.epoch++
	s.waitAcc += s.waiting
	sharedCompressions.Add(1)
	return bytes.Clone(s.out.Bytes()), start, nil
}

// idle ends the epoch and gives back what the compressor holds; the next
// event starts a new epoch.
func (s *sharedCompressor) idle() {
	if s.z != nil {
		s.z.Reset(nil)
		zstdSharedPool.Put(s.z)
		s.z = nil
		liveSharedEncoders.Add(-1)
	}
	s.dict = nil
	s.out = bytes.Buffer{}
	s.epoch, s.waitAcc = 0, 0
}

// compressShared encodes a new event for every encoding that has clients;
// nil when none has. The hub's lock is held.
func (hb *hub) compressShared(data []byte) *eventZ {
	var z *eventZ
	for i := range hb.zc {
		s := &hb.zc[i]
		if s.clients == 0 {
			continue
		}
		b, start, err := s.compress(data)
		if err != nil {
			// Not expected (the output is memory): clients write this event
			// as their own, and the next one starts an epoch.
			hb.logger.Error("shared compressor failed", zap.Stringer("encoding", coding(i)), zap.Error(err))
			s.idle()
			continue
		}
		if z == nil {
			z = new(eventZ)
		}
		z.b[i], z.start[i] = b, start
	}
	return z
}

// idleShared ends every shared epoch: the hub was idle (a heartbeat) or is
// gone. The hub's lock is held.
func (hb *hub) idleShared() {
	for i := range hb.zc {
		hb.zc[i].idle()
	}
}

// sharedWriter writes one fan-out client's compressed stream: the shared
// bytes of events while in sync, its own stored or raw blocks otherwise.
type sharedWriter struct {
	enc     coding
	synced  bool   // the last bytes written were an event's shared bytes
	waiting bool   // counted in the hub's waiting (under the hub's lock)
	frame   bool   // zstd: a frame is open
	started bool   // gzip: the header is written
	marker  bool   // gzip: own stored blocks written since the last sync marker
	crc     uint32 // gzip: CRC-32 of the plain bytes written
	size    uint32 // gzip: their length mod 2^32
	hdr     [8]byte
}

// attachShared registers a client of coding c with the hub, and returns
// its writer (nil for identity, which needs none, and for br, which has an
// encoder of its own: see sharedCodings).
func (hb *hub) attachShared(c coding) *sharedWriter {
	if !sharedCodings[c] {
		return nil
	}
	hb.mu.Lock()
	hb.zc[c].clients++
	hb.mu.Unlock()
	return &sharedWriter{enc: c}
}

// detachShared unregisters a client's writer.
func (hb *hub) detachShared(w *sharedWriter) {
	if w == nil {
		return
	}
	hb.mu.Lock()
	defer hb.mu.Unlock()
	s := &hb.zc[w.enc]
	if w.waiting {
		s.waiting--
		w.waiting = false
	}
	if s.clients--; s.clients == 0 {
		s.idle()
	}
}

// noteWaitingLocked tells the hub whether the client waits for an epoch
// start: it is out of sync, and the events it is about to write (batch)
// hold none (a client replaying from the cache usually finds one there).
// The hub's lock is held.
func (hb *hub) noteWaitingLocked(w *sharedWriter, batch []*event) {
	wait := !w.synced
	for _, ev := range batch {
		if !wait {
			break
		}
		if ev.z != nil && ev.z.b[w.enc] != nil && ev.z.start[w.enc] {
			wait = false
		}
	}
	if wait != w.waiting {
		w.waiting = wait
		if wait {
			hb.zc[w.enc].waiting++
		} else {
			hb.zc[w.enc].waiting--
		}
	}
}

// Framing constants.
var (
	zstdFrameEnd    = []byte{1, 0, 0}                         // an empty last raw block
	zstdOwnFrame    = []byte{0x28, 0xb5, 0x2f, 0xfd, 0, 0x20} // magic, no checksum or size, 16 KiB window
	gzipEnd         = []byte{1, 0, 0, 0xff, 0xff}             // an empty final stored block
	gzipSyncMarker  = []byte{0, 0, 0, 0xff, 0xff}             // an empty stored block
	zstdRawBlockMax = 16 << 10                                // the window of both kinds of frames
	gzipStoredMax   = 65535
)

// event writes one event: its shared bytes if the client is or gets in
// sync with them, otherwise as its own bytes.
func (w *sharedWriter) event(out *clientConn, now time.Time, ev *event) error {
	if z := ev.z; z != nil && z.b[w.enc] != nil && (w.synced || z.start[w.enc]) {
		if w.enc == codingZstd && z.start[w.enc] && w.frame {
			if err := out.write(now, zstdFrameEnd); err != nil {
				return err
			}
		}
		if err := w.header(out, now); err != nil {
			return err
		}
		if err := out.write(now, z.b[w.enc]); err != nil {
			return err
		}
		w.synced, w.frame, w.marker = true, true, false
		w.sum(ev.data)
		return nil
	}
	return w.own(out, now, ev.data)
}

// own writes p as the client's own bytes: stored or raw blocks.
func (w *sharedWriter) own(out *clientConn, now time.Time, p []byte) error {
	if err := w.header(out, now); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	w.synced = false
	w.sum(p)
	if w.enc == codingZstd && !w.frame {
		if err := out.write(now, zstdOwnFrame); err != nil {
			return err
		}
		w.frame = true
	}
	for len(p) > 0 {
		var h []byte
		var n int
		if w.enc == codingGzip {
			n = min(len(p), gzipStoredMax)
			w.hdr = [8]byte{0, byte(n), byte(n >> 8), ^byte(n), ^byte(n >> 8)}
			h = w.hdr[:5]
		} else {
			n = min(len(p), zstdRawBlockMax)
			v := n << 3 // not last, raw
			w.hdr = [8]byte{byte(v), byte(v >> 8), byte(v >> 16)}
			h = w.hdr[:3]
		}
		if err := out.write(now, h); err != nil {
			return err
		}
		if err := out.write(now, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	w.marker = w.enc == codingGzip
	return nil
}

// flush flushes what was written. After stored blocks of its own, a gzip
// stream first gets a sync marker (an empty stored block): some inflaters
// (Go's) only hand out a stored block's bytes when the next block begins.
// The shared bytes end with one already.
func (w *sharedWriter) flush(out *clientConn, now time.Time) error {
	if w.marker {
		w.marker = false
		if err := out.write(now, gzipSyncMarker); err != nil {
			return err
		}
	}
	return out.flush()
}

// header writes the gzip header once.
func (w *sharedWriter) header(out *clientConn, now time.Time) error {
	if w.enc != codingGzip || w.started {
		return nil
	}
	w.started = true
	return out.write(now, gzipHeader)
}

func (w *sharedWriter) sum(p []byte) {
	if w.enc == codingGzip {
		w.crc = crc32.Update(w.crc, crc32.IEEETable, p)
		w.size += uint32(len(p))
	}
}

// end finishes the compressed stream (gzip trailer, last zstd block) and
// flushes it; the client must be still there (a clean end).
func (w *sharedWriter) end(out *clientConn) error {
	now := time.Now()
	switch w.enc {
	case codingGzip:
		if err := w.header(out, now); err != nil {
			return err
		}
		if err := out.write(now, gzipEnd); err != nil {
			return err
		}
		for i := range 4 {
			w.hdr[i] = byte(w.crc >> (8 * i))
			w.hdr[4+i] = byte(w.size >> (8 * i))
		}
		if err := out.write(now, w.hdr[:8]); err != nil {
			return err
		}
	case codingZstd:
		if !w.frame { // nothing sent: still one valid, empty frame
			if err := out.write(now, zstdOwnFrame); err != nil {
				return err
			}
		}
		if err := out.write(now, zstdFrameEnd); err != nil {
			return err
		}
	}
	w.frame, w.marker = false, false
	return out.flush()
}
