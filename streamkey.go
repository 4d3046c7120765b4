package caddysse

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"net/http"
	"net/textproto"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// The default fan-out key is deny-by-default: two requests share one
// upstream only if the backend could not tell them apart. It covers the
// method, scheme, host, path and query, the fingerprint of the TLS client
// certificate, and every request header (all lines of each, in order)
// except the few below, which carry no identity. Any other header, known
// or not (X-API-Key, X-Auth-Token, a second Cookie line), keeps requests
// apart: a header we do not know about may be a credential, and sharing
// wrongly leaks one user's private events to another, while not sharing
// only costs an upstream connection.
//
// The client IP is not part of the key: keying on it would stop almost
// all sharing. A backend that decides by client IP (X-Forwarded-For,
// REMOTE_ADDR) needs `key {sse.default_key} {client_ip}` (see
// Fanout.Key and the README).

// keyFreeHeaders are the request headers, in canonical form, that carry
// no identity and so do not keep requests from sharing a stream.
var keyFreeHeaders = map[string]bool{
	"Accept":                    true,
	"Accept-Encoding":           true,
	"Accept-Language":           true,
	"Cache-Control":             true,
	"Pragma":                    true,
	"Connection":                true,
	"Keep-Alive":                true,
	"Last-Event-Id":             true, // the replay cache answers it
	"User-Agent":                true,
	"Referer":                   true,
	"Origin":                    true,
	"Dnt":                       true,
	"Priority":                  true,
	"Via":                       true,
	"Upgrade-Insecure-Requests": true,
	"Traceparent":               true,
	"Tracestate":                true,
}

// keyFreePrefixes are header name prefixes (canonical form) that carry no
// identity: the browser's fetch metadata and client hints.
var keyFreePrefixes = []string{"Sec-Fetch-", "Sec-Ch-"}

// keyFreeFromTrustedProxy are headers that carry no identity when a
// trusted proxy set them (the client's address, as the client IP itself
// is not keyed), but may be anything when a client sent them itself.
var keyFreeFromTrustedProxy = map[string]bool{
	"Forwarded": true,
	"X-Real-Ip": true,
}

// keyFreeHeader reports whether the header (canonical name) is left out
// of the default key.
func keyFreeHeader(name string, trustedProxy bool) bool {
	if keyFreeHeaders[name] {
		return true
	}
	for _, p := range keyFreePrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return trustedProxy && (keyFreeFromTrustedProxy[name] || strings.HasPrefix(name, "X-Forwarded-"))
}

// maxKeyPrefix bounds the readable part of a key (host and path). The
// hash covers them in full; the prefix only helps people and tests.
const maxKeyPrefix = 256

// streamKey is the default fan-out key of a request: the host and path,
// readable, then a SHA-256 of everything the backend could tell requests
// apart by (see above). Its size is bounded whatever the request holds.
func streamKey(r *http.Request) string {
	d := sha256.New()
	field := func(s string) { // length-prefixed: nothing can be spliced
		writeLen(d, len(s))
		d.Write([]byte(s))
	}
	field(r.Method)
	if r.TLS != nil {
		field("https")
		if len(r.TLS.PeerCertificates) > 0 {
			fp := sha256.Sum256(r.TLS.PeerCertificates[0].Raw)
			field(string(fp[:]))
		} else {
			field("")
		}
	} else {
		field("http")
	}
	field(r.Host)
	field(r.URL.RequestURI())

	trusted, _ := caddyhttp.GetVar(r.Context(), caddyhttp.TrustedProxyVarKey).(bool)
	names := make([]string, 0, len(r.Header))
	for name := range r.Header {
		names = append(names, name)
	}
	slices.Sort(names) // map order is random; the key must not be
	for _, name := range names {
		canon := textproto.CanonicalMIMEHeaderKey(name)
		if keyFreeHeader(canon, trusted) {
			continue
		}
		values := r.Header[name]
		field(canon)
		writeLen(d, len(values))
		for _, v := range values {
			field(v)
		}
	}

	prefix := r.Host + r.URL.Path
	if len(prefix) > maxKeyPrefix {
		prefix = prefix[:maxKeyPrefix]
	}
	return prefix + "\x00" + hex.EncodeToString(d.Sum(nil))
}

func writeLen(d hash.Hash, n int) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	d.Write(b[:])
}

// defaultKeyPlaceholder, in a key template, stands for streamKey.
const defaultKeyPlaceholder = "sse.default_key"

// templateKey expands a key template set by the user.
func templateKey(r *http.Request, tmpl string) string {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl == nil {
		return tmpl
	}
	if strings.Contains(tmpl, "{"+defaultKeyPlaceholder+"}") {
		repl.Set(defaultKeyPlaceholder, streamKey(r))
	}
	return repl.ReplaceAll(tmpl, "")
}
