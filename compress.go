package caddysse

// Compression of event streams.
//
// The plugin compresses a stream itself, inside clientConn, and makes every
// flush of the client connection a sync flush of the compressor, so that
// everything written so far, up to the last event boundary or heartbeat,
// decodes on the client at once. Caddy's `encode` cannot do that well for
// streams: it keeps one general-purpose compressor per stream for the
// stream's whole life (~1 MiB for gzip, ~2.7 MiB for zstd), and most of a
// stream's life is spent idle.
//
// Encoder choices (measured on ~190 B JSON events, one flush per event; see
// docs/compression.md):
//
//   - gzip: klauspost's stateless deflate (flate.StatelessDeflate) with the
//     last gzipDict bytes of the stream as its dictionary. Between flushes
//     an encoder holds only that dictionary (4 KiB) and two integers; the
//     hash table and the token buffer exist only during a flush (the table
//     on the stack, which grows the writing goroutine's stack from 32 to
//     64 KiB; the tokens in klauspost's pool). A stateful deflate writer
//     holds ~0.8 MiB (klauspost level 1) to 1.1 MiB (level 5, what encode
//     uses). Small events gain almost nothing from history beyond a few
//     KiB: wire/plain 0.304 with a 2, 4 or 8 KiB dictionary against 0.281
//     for encode's level 5 with 32 KiB. The price is CPU: each flush hashes
//     the dictionary again (~2.4x encode's CPU per event with 4 KiB; 8 KiB
//     costs more still, for no gain). Only the 10-byte gzip header and the
//     8-byte trailer (CRC-32 and length, RFC 1952) are written here.
//   - zstd: klauspost's zstd encoder at SpeedFastest with a 16 KiB window,
//     the lower-memory option, no concurrency (no goroutines: blocks are
//     encoded in the caller), from a pool. ~0.45 MiB per stream, most of it
//     the fixed 256 KiB match table and the history buffer (the window plus
//     klauspost's fixed 128 KiB block margin), against ~2.7 MiB for
//     encode's zstd. A 32 KiB window costs ~30 KiB more per stream and gave
//     no better ratio on small events (0.318 against 0.316): 16 KiB is ~80
//     such events of history. Streams of multi-KiB events lose a little.
//   - br: github.com/andybalholm/brotli's Writer (the maintained pure-Go
//     port of Google's encoder, with a real sync flush: BROTLI_OPERATION_
//     FLUSH, byte-aligned) at quality 3 with a 4 KiB window (lgwin 12), from
//     a pool. Quality 0 and 1 compress each flush on its own (their
//     fragment compressors look back only within the current input), so
//     with one flush per event they barely compress (wire/plain 1.02 and
//     0.93); quality 2 reaches 0.40; quality 3 0.33 with lgwin 12 (0.31
//     with lgwin 10, 0.34 with 16: small windows code distances more
//     cheaply); quality 4 and up cost twice the memory (~530 KiB) for 0.31.
//     ~280 KiB per stream, most of it the quality-3 hasher. Offered for
//     clients that accept br but not zstd (Safari before 26.3), but not in
//     the default list: on small events it compresses no better than gzip,
//     with more CPU and ~7x the memory (docs/compression.md). In fan-out a
//     br client has its own encoder: brotli output cannot be spliced into
//     another client's stream (see compress_shared.go).
//
// Padding: a comment of spaces compresses to a handful of bytes and no
// longer pushes a buffering middlebox (which counts the bytes it holds, on
// the wire). For a compressed stream the padding comment is filled instead
// with printable ASCII drawn from a fixed-seed PRNG (no repeats to match,
// and ~6.6 bits of entropy per byte: both encoders store it as it is),
// generated once per encoding when the handler is provisioned and sized,
// by compressing it with a fresh encoder of that encoding, so that the
// compressed prelude (header, padding, retry field) is at least the
// configured padding size on the wire: 2 KiB of padding is 2068 bytes of
// gzip or 2057 of zstd, where 2 KiB of spaces would be 34 or 20. An
// uncompressed stream keeps its comment of spaces.

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// compressOff is the compress value that disables compression.
const compressOff = "off"

// defaultCompress is the preference order when compress is not configured.
var defaultCompress = []string{"zstd", "gzip"}

// compression is the provisioned compression setup of a handler.
type compression struct {
	prefs    []string           // names of the codings in preference order; empty: off
	preludes [numCodings][]byte // per coding: the prelude, padding sized for the wire
}

// compressionPrefs checks a configured compress list and returns the
// encodings in preference order (nil when compression is off).
func compressionPrefs(list []string) ([]string, error) {
	if len(list) == 0 {
		return defaultCompress, nil
	}
	if len(list) == 1 && list[0] == compressOff {
		return nil, nil
	}
	seen := make(map[string]bool, len(list))
	for _, name := range list {
		switch c, _ := parseCoding(name); {
		case c == codingGzip || c == codingZstd || c == codingBr:
		case name == compressOff:
			return nil, errors.New("compress: off cannot be combined with encodings")
		default:
			return nil, fmt.Errorf("compress: unknown encoding '%s' (supported: zstd, gzip, br, or off)", name)
		}
		if seen[name] {
			return nil, fmt.Errorf("compress: encoding '%s' listed twice", name)
		}
		seen[name] = true
	}
	return list, nil
}

// provisionCompression builds the compression setup; it runs after the
// uncompressed prelude and retry hint are built.
func (h *Handler) provisionCompression() error {
	prefs, err := compressionPrefs(h.Compress)
	if err != nil {
		return err
	}
	h.comp = compression{prefs: prefs}
	if len(prefs) == 0 {
		return nil
	}
	for _, name := range prefs {
		c, _ := parseCoding(name)
		p, err := compressedPrelude(c, h.padding(), h.retryHint)
		if err != nil {
			return fmt.Errorf("compress: %s: %v", name, err)
		}
		h.comp.preludes[c] = p
	}
	return nil
}

// preludeFor is the prelude of a stream sent with this coding.
func (h *Handler) preludeFor(c coding) []byte {
	if p := h.comp.preludes[c]; p != nil {
		return p
	}
	return h.prelude
}

// negotiateStream chooses the encoding of a stream from the client's
// Accept-Encoding and sets the response header for it.
func (h *Handler) negotiateStream(hdr http.Header, acceptEncoding string) coding {
	if len(h.comp.prefs) == 0 {
		return codingIdentity
	}
	// The response depends on Accept-Encoding whatever was chosen.
	if !headerHasToken(hdr.Values("Vary"), "Accept-Encoding") && !headerHasToken(hdr.Values("Vary"), "*") {
		hdr.Add("Vary", "Accept-Encoding")
	}
	name := negotiateEncoding(acceptEncoding, h.comp.prefs)
	if name == "" {
		return codingIdentity
	}
	hdr.Set("Content-Encoding", name)
	hdr.Del("Accept-Ranges")
	// A strong validator must differ between codings (RFC 9110 8.8.3.3);
	// a weak one may stay.
	if etag := hdr.Get("Etag"); etag != "" && !strings.HasPrefix(etag, "W/") {
		hdr.Set("Etag", "W/"+etag)
	}
	c, _ := parseCoding(name)
	return c
}

// acceptEncodingKey is the request context key of the client's
// Accept-Encoding, kept when the header is removed for the backend.
type acceptEncodingKey struct{}

// keepClientAcceptEncoding returns r with the client's Accept-Encoding kept
// in its context, so that it can be removed from the header.
func keepClientAcceptEncoding(r *http.Request) *http.Request {
	values := r.Header.Values("Accept-Encoding")
	if len(values) == 0 {
		return r
	}
	return r.WithContext(context.WithValue(r.Context(), acceptEncodingKey{}, strings.Join(values, ",")))
}

// clientAcceptEncoding is the client's Accept-Encoding (all field lines
// joined), kept by keepClientAcceptEncoding or still in the header.
func clientAcceptEncoding(r *http.Request) string {
	if ae, ok := r.Context().Value(acceptEncodingKey{}).(string); ok {
		return ae
	}
	return strings.Join(r.Header.Values("Accept-Encoding"), ",")
}

// headerHasToken reports whether a comma-separated header field contains
// token, case-insensitively.
func headerHasToken(values []string, token string) bool {
	for _, v := range values {
		for part := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(part), token) {
				return true
			}
		}
	}
	return false
}

// negotiateEncoding picks the content coding for a response from the
// client's Accept-Encoding (all field lines joined with commas) and the
// server's preference order, following RFC 9110 section 12.5.3: codings are
// case-insensitive, "x-gzip" is "gzip", q=0 excludes, "*" matches every
// coding not listed, a higher q wins and the server's order breaks ties.
// It returns "" for identity: when the field is absent or empty, when no
// preferred coding is acceptable, or when the client weighs identity (named
// or through "*") strictly above every acceptable coding. Malformed items
// are ignored.
func negotiateEncoding(acceptEncoding string, prefs []string) string {
	if len(prefs) == 0 || strings.TrimSpace(acceptEncoding) == "" {
		return ""
	}
	var qbuf [4]float64
	q := qbuf[:0]
	if len(prefs) > len(qbuf) {
		q = make([]float64, 0, len(prefs))
	}
	for range prefs {
		q = append(q, -1) // not listed
	}
	starQ, identityQ := -1.0, -1.0
	for item := range strings.SplitSeq(acceptEncoding, ",") {
		coding, params, _ := strings.Cut(item, ";")
		coding = strings.ToLower(strings.TrimSpace(coding))
		if coding == "" {
			continue
		}
		weight, ok := parseQ(params)
		if !ok {
			continue
		}
		if coding == "x-gzip" {
			coding = "gzip"
		}
		switch coding {
		case "*":
			if starQ < 0 {
				starQ = weight
			}
		case "identity":
			if identityQ < 0 {
				identityQ = weight
			}
		default:
			for i, p := range prefs {
				if p == coding && q[i] < 0 {
					q[i] = weight
				}
			}
		}
	}
	best, bestQ := "", 0.0
	for i, p := range prefs {
		w := q[i]
		if w < 0 {
			w = max(starQ, 0) // unlisted: acceptable only through "*"
		}
		if w > bestQ {
			best, bestQ = p, w
		}
	}
	if identityQ < 0 {
		identityQ = starQ
	}
	if best == "" || identityQ > bestQ {
		return ""
	}
	return best
}

// parseQ reads the weight from the parameters of an Accept-Encoding item
// (default 1). ok is false for a malformed weight.
func parseQ(params string) (q float64, ok bool) {
	q = 1
	for param := range strings.SplitSeq(params, ";") {
		name, value, _ := strings.Cut(param, "=")
		if !strings.EqualFold(strings.TrimSpace(name), "q") {
			continue
		}
		value = strings.TrimSpace(value)
		w, err := strconv.ParseFloat(value, 64)
		if err != nil || w < 0 || w > 1 || len(value) > 5 {
			return 0, false
		}
		q = w
	}
	return q, true
}

// encoder compresses what one client receives. Write may keep bytes until
// Flush; Flush is a sync flush: afterwards everything written so far can be
// decoded by the client from the bytes it has. Close ends the compressed
// stream (trailer); release returns the encoder's memory, after which it
// must not be used.
type encoder interface {
	io.Writer
	Flush() error
	Close() error
	release()
}

// liveEncoders counts encoders not yet released (tests check it for leaks).
var liveEncoders atomic.Int64

// newEncoder returns an encoder for a negotiated coding, writing
// compressed bytes to w.
func newEncoder(c coding, w io.Writer) (encoder, error) {
	var e encoder
	switch c {
	case codingGzip:
		e = &gzipEncoder{w: w}
	case codingZstd:
		z := zstdPool.Get().(*zstd.Encoder)
		z.Reset(w)
		e = &zstdEncoder{z: z}
	case codingBr:
		bw := brotliPool.Get().(*brotli.Writer)
		bw.Reset(w)
		e = &brotliEncoder{w: bw}
	default:
		return nil, fmt.Errorf("no encoder for %s", c)
	}
	liveEncoders.Add(1)
	return e, nil
}

// Stream compression in clientConn. write() feeds the encoder, flush()
// flushes it (one sync flush however many writes came before), and the
// stream's end finishes and releases it.

// compress makes the connection compress everything it writes from now on.
func (c *clientConn) compress(name coding) error {
	enc, err := newEncoder(name, c.w)
	if err != nil {
		return err
	}
	c.enc = enc
	return nil
}

// endEncoding finishes the compressed stream when clean (the client is
// still there: a trailer lets its decoder see a proper end) and releases the
// encoder. It does nothing for an uncompressed stream.
func (c *clientConn) endEncoding(clean bool) {
	if c.enc == nil {
		return
	}
	if clean && c.arm(time.Now()) == nil && c.enc.Close() == nil {
		_ = c.rc.Flush()
	}
	c.enc.release()
	c.enc = nil
}

// zstd: one pooled klauspost encoder per stream.

// zstdOptions are the encoder settings for streams of small events.
var zstdOptions = []zstd.EOption{
	zstd.WithEncoderLevel(zstd.SpeedFastest),
	zstd.WithWindowSize(16 << 10), // see the top of this file
	zstd.WithLowerEncoderMem(true),
	zstd.WithEncoderConcurrency(1), // no goroutines; blocks are encoded in Write/Flush
	zstd.WithZeroFrames(true),      // a stream ended before any byte is still a valid frame
}

var zstdPool = sync.Pool{New: func() any {
	z, err := zstd.NewWriter(nil, zstdOptions...)
	if err != nil {
		panic(err) // the options are constant
	}
	return z
}}

type zstdEncoder struct{ z *zstd.Encoder }

func (e *zstdEncoder) Write(p []byte) (int, error) { return e.z.Write(p) }
func (e *zstdEncoder) Flush() error                { return e.z.Flush() }
func (e *zstdEncoder) Close() error                { return e.z.Close() }

func (e *zstdEncoder) release() {
	if e.z == nil {
		return
	}
	e.z.Reset(nil)
	zstdPool.Put(e.z)
	e.z = nil
	liveEncoders.Add(-1)
}

// br: one pooled andybalholm/brotli writer per stream.

// brotliOptions: see the top of this file for why quality 3 and lgwin 12.
var brotliOptions = brotli.WriterOptions{Quality: 3, LGWin: 12}

var brotliPool = sync.Pool{New: func() any { return brotli.NewWriterOptions(nil, brotliOptions) }}

type brotliEncoder struct{ w *brotli.Writer }

func (e *brotliEncoder) Write(p []byte) (int, error) { return e.w.Write(p) }

// Flush is brotli's flush operation: the pending input is compressed into
// meta-blocks and the output padded to a byte boundary, so the client can
// decode all of it.
func (e *brotliEncoder) Flush() error { return e.w.Flush() }
func (e *brotliEncoder) Close() error { return e.w.Close() }

func (e *brotliEncoder) release() {
	if e.w == nil {
		return
	}
	e.w.Reset(nil)
	brotliPool.Put(e.w)
	e.w = nil
	liveEncoders.Add(-1)
}

// gzip: stateless deflate with the stream's recent bytes as dictionary.

const (
	// gzipDict is how much of what was already sent serves as the
	// dictionary of the next flush (klauspost allows up to 8 KiB; the ratio
	// on small events is the same with 4 KiB, and each flush hashes it).
	gzipDict = 4 << 10
	// gzipPendingMax bounds the bytes written but not flushed yet; past it,
	// they are compressed at once (one extra sync marker).
	gzipPendingMax = 64 << 10
)

type gzipEncoder struct {
	w       io.Writer
	buf     []byte // the dictionary, buf[:dict], then the pending bytes
	dict    int
	crc     uint32
	size    uint32 // input length mod 2^32
	started bool   // the gzip header is written
	err     error
}

// gzipHeader is a gzip member header: deflate, no flags, no mtime, OS
// unknown (RFC 1952).
var gzipHeader = []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255}

func (e *gzipEncoder) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	if e.buf == nil {
		e.buf = make([]byte, 0, gzipDict+max(len(p), 512))
	}
	e.buf = append(e.buf, p...)
	if len(e.buf)-e.dict > gzipPendingMax {
		if err := e.deflate(false); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (e *gzipEncoder) Flush() error { return e.deflate(false) }

// deflate compresses the pending bytes, and with eof ends the member.
func (e *gzipEncoder) deflate(eof bool) error {
	if e.err != nil {
		return e.err
	}
	if !e.started {
		e.started = true
		if _, e.err = e.w.Write(gzipHeader); e.err != nil {
			return e.err
		}
	}
	pending := e.buf[e.dict:]
	if len(pending) == 0 && !eof {
		return nil
	}
	e.crc = crc32.Update(e.crc, crc32.IEEETable, pending)
	e.size += uint32(len(pending))
	if e.err = flate.StatelessDeflate(e.w, pending, eof, e.buf[:e.dict]); e.err != nil {
		return e.err
	}
	// Keep the tail as the next dictionary; let a buffer grown by a big
	// write go.
	keep := min(len(e.buf), gzipDict)
	if cap(e.buf) > 2*gzipDict+gzipPendingMax/2 {
		e.buf = append(make([]byte, 0, gzipDict+512), e.buf[len(e.buf)-keep:]...)
	} else {
		n := copy(e.buf, e.buf[len(e.buf)-keep:])
		e.buf = e.buf[:n]
	}
	e.dict = keep
	return nil
}

func (e *gzipEncoder) Close() error {
	if err := e.deflate(true); err != nil {
		return err
	}
	var trailer [8]byte
	for i := range 4 {
		trailer[i] = byte(e.crc >> (8 * i))
		trailer[4+i] = byte(e.size >> (8 * i))
	}
	_, e.err = e.w.Write(trailer[:])
	if e.err == nil {
		e.err = errors.New("gzip: stream closed")
		return nil
	}
	return e.err
}

func (e *gzipEncoder) release() {
	if e.w == nil {
		return
	}
	e.w, e.buf = nil, nil
	liveEncoders.Add(-1)
}

// Padding for compressed streams.

// noisePaddingBlock is one comment line of exactly n bytes (n >= 2) filled
// with printable ASCII from a fixed-seed PRNG: the same bytes every time,
// and as incompressible as printable text gets.
func noisePaddingBlock(n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(0x5345, 0x70616464))
	b[0] = ':'
	for i := 1; i < n-1; i++ {
		b[i] = byte(0x20 + r.IntN(0x7f-0x20))
	}
	b[n-1] = '\n'
	return b
}

// compressedPrelude is the prelude of a stream compressed with this
// encoding: a noise padding block, sized so that the compressed prelude
// (with the encoding's header and the retry field) is at least padding
// bytes on the wire, then the retry field.
func compressedPrelude(name coding, padding int, retry []byte) ([]byte, error) {
	if padding <= 0 {
		return retry, nil
	}
	plain := padding
	for range 10 {
		p := append(noisePaddingBlock(plain), retry...)
		wire, err := compressedSize(name, p)
		if err != nil {
			return nil, err
		}
		if wire >= padding {
			return p, nil
		}
		// Grow by the shortfall scaled by the ratio measured, plus a margin.
		plain += (padding-wire)*plain/max(wire, 1) + 16
	}
	return nil, fmt.Errorf("cannot size %d bytes of padding", padding)
}

// compressedSize is how many bytes a fresh encoder writes for p and a flush.
func compressedSize(name coding, p []byte) (int, error) {
	var cw countingWriter
	enc, err := newEncoder(name, &cw)
	if err != nil {
		return 0, err
	}
	defer enc.release()
	if _, err := enc.Write(p); err != nil {
		return 0, err
	}
	if err := enc.Flush(); err != nil {
		return 0, err
	}
	return cw.n, nil
}

type countingWriter struct{ n int }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	return len(p), nil
}
