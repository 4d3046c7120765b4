package caddysse

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// userBackend is an SSE backend that answers per user: it derives a user
// name from whatever credential the request carries, answers with an
// X-User header and sends events that name the user, so a client that
// gets someone else's stream sees it.
type userBackend struct {
	addr   string
	mu     sync.Mutex
	conns  map[chan int]string // open streams and their users
	perUsr map[string]int      // upstream requests per user
	total  int
}

func newUserBackend(t testing.TB) *userBackend {
	b := &userBackend{conns: make(map[chan int]string), perUsr: make(map[string]int)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.addr = ln.Addr().String()
	srv := &http.Server{Handler: b}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return b
}

// userOf is how the backend tells users apart: every credential kind a
// real backend may use.
func userOf(r *http.Request) string {
	switch {
	case r.Header.Get("X-Client-Subject") != "": // set by Caddy from the client certificate
		return "cert:" + r.Header.Get("X-Client-Subject")
	case r.Header.Get("Authorization") != "":
		return "auth:" + r.Header.Get("Authorization")
	case r.Header.Get("X-Api-Key") != "":
		return "key:" + r.Header.Get("X-Api-Key")
	}
	if c, err := r.Cookie("sid"); err == nil { // any Cookie line
		return "cookie:" + c.Value
	}
	if r.Header.Get("X-Forwarded-Proto") == "https" {
		return "anonymous over TLS"
	}
	return "anonymous"
}

func (b *userBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	user := userOf(r)
	ch := make(chan int, 16)
	b.mu.Lock()
	b.conns[ch] = user
	b.perUsr[user]++
	b.total++
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.conns, ch)
		b.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-User", user)
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush()
	for {
		select {
		case <-r.Context().Done():
			return
		case n := <-ch:
			fmt.Fprintf(w, "data: user=%s n=%d\n\n", user, n)
			rc.Flush()
		}
	}
}

// emit makes every open stream send its user event number n.
func (b *userBackend) emit(n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ch := range b.conns {
		ch <- n
	}
}

func (b *userBackend) counts() (map[string]int, int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := make(map[string]int, len(b.perUsr))
	for k, v := range b.perUsr {
		m[k] = v
	}
	return m, b.total
}

// testPKI is a CA, a server certificate for sse.test and client
// certificates it signed.
type testPKI struct {
	ca      *x509.Certificate
	caKey   *ecdsa.PrivateKey
	certPEM string // server
	keyPEM  string
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	p := new(testPKI)
	p.caKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "caddy-sse test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.caKey.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	p.ca, _ = x509.ParseCertificate(der)
	cert := p.issue(t, "sse.test", x509.ExtKeyUsageServerAuth)
	p.certPEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}))
	keyDER, _ := x509.MarshalECPrivateKey(cert.PrivateKey.(*ecdsa.PrivateKey))
	p.keyPEM = string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	return p
}

var serial int64 = 100

func (p *testPKI) issue(t testing.TB, cn string, usage x509.ExtKeyUsage) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn},
		DNSNames:     []string{cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// isolationConfig is a plain server on addr and a TLS server on tlsAddr
// that asks for (and verifies, when given) client certificates, both
// fanning /events out to the per-user backend. Caddy tells the backend the
// certificate's subject, as a real mTLS setup would.
func isolationConfig(addr, tlsAddr, backend string, p *testPKI, fanout map[string]any) []byte {
	fo := map[string]any{"linger": 0}
	for k, v := range fanout {
		fo[k] = v
	}
	handlers := []any{
		map[string]any{"handler": "sse", "padding": 0, "fanout": fo},
		map[string]any{"handler": "reverse_proxy", "upstreams": []any{map[string]any{"dial": backend}},
			"headers": map[string]any{"request": map[string]any{"set": map[string]any{
				"X-Client-Subject": []string{"{http.request.tls.client.subject}"}}}}},
	}
	routes := []any{map[string]any{"match": []any{map[string]any{"path": []string{"/events"}}}, "handle": handlers}}
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{
			"tls": map[string]any{"certificates": map[string]any{"load_pem": []any{
				map[string]any{"certificate": p.certPEM, "key": p.keyPEM}}}},
			"http": map[string]any{"servers": map[string]any{
				"plain": map[string]any{"listen": []string{addr}, "protocols": []string{"h1", "h2c"},
					"automatic_https": map[string]any{"disable": true}, "routes": routes},
				"mtls": map[string]any{"listen": []string{tlsAddr}, "protocols": []string{"h1", "h2"},
					"automatic_https": map[string]any{"disable": true}, "routes": routes,
					"tls_connection_policies": []any{map[string]any{"client_authentication": map[string]any{
						"mode": "verify_if_given",
						"ca": map[string]any{"provider": "inline",
							"trusted_ca_certs": []string{base64.StdEncoding.EncodeToString(p.ca.Raw)}},
					}}}},
			}},
		},
	}
	b, _ := json.Marshal(cfg)
	return b
}

// isoClient is one client of the isolation test and what it must see.
type isoClient struct {
	name    string
	url     string
	header  http.Header
	cert    *tls.Certificate // presented on the TLS server
	want    string           // the user the backend must have served it as
	tlsConn bool
}

// openIso opens the client's stream over HTTP/1.1 with exactly its
// header lines (repeated ones included).
func openIso(t testing.TB, ic isoClient, roots *x509.CertPool) *client {
	t.Helper()
	tr := &http.Transport{DisableCompression: true}
	if ic.tlsConn {
		tr.TLSClientConfig = &tls.Config{RootCAs: roots, ServerName: "sse.test"}
		if ic.cert != nil {
			tr.TLSClientConfig.Certificates = []tls.Certificate{*ic.cert}
		}
	}
	t.Cleanup(tr.CloseIdleConnections)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ic.url, nil)
	req.Header = ic.header.Clone()
	if ic.tlsConn {
		req.Host = "sse.test" // Caddy answers 421 when Host and SNI differ under client auth
	}
	if req.Header.Get("Accept") == "" {
		req.Header.Set("Accept", "text/event-stream")
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		cancel()
		t.Fatalf("%s: GET %s: %v", ic.name, ic.url, err)
	}
	c := &client{Resp: resp, cancel: cancel, more: make(chan struct{}, 1), eof: make(chan struct{})}
	t.Cleanup(c.close)
	go c.read()
	return c
}

// No client ever gets another user's events or response header, whatever
// credential tells users apart; requests that differ only in headers
// that carry no identity still share one upstream.
func TestFanoutIsolatesEveryCredentialKind(t *testing.T) {
	checkNoLeak(t)
	b := newUserBackend(t)
	p := newTestPKI(t)
	alice := p.issue(t, "alice", x509.ExtKeyUsageClientAuth)
	bob := p.issue(t, "bob", x509.ExtKeyUsageClientAuth)
	tlsAddr := freeAddr(t)
	base := startCaddyWith(t, func(addr string) []byte { return isolationConfig(addr, tlsAddr, b.addr, p, nil) })
	tlsBase := "https://" + tlsAddr
	roots := x509.NewCertPool()
	roots.AddCert(p.ca)
	h := func(kv ...string) http.Header {
		hdr := http.Header{}
		for i := 0; i+1 < len(kv); i += 2 {
			hdr.Add(kv[i], kv[i+1])
		}
		return hdr
	}
	clients := []isoClient{
		{name: "Authorization alice", url: base + "/events", header: h("Authorization", "Bearer alice"), want: "auth:Bearer alice"},
		{name: "Authorization bob", url: base + "/events", header: h("Authorization", "Bearer bob"), want: "auth:Bearer bob"},
		{name: "Cookie alice", url: base + "/events", header: h("Cookie", "theme=dark; sid=alice"), want: "cookie:alice"},
		{name: "Cookie bob", url: base + "/events", header: h("Cookie", "theme=dark; sid=bob"), want: "cookie:bob"},
		// Two Cookie lines, only the second differs.
		{name: "split Cookie carol", url: base + "/events", header: h("Cookie", "theme=dark", "Cookie", "sid=carol"), want: "cookie:carol"},
		{name: "split Cookie dave", url: base + "/events", header: h("Cookie", "theme=dark", "Cookie", "sid=dave"), want: "cookie:dave"},
		{name: "X-API-Key alice", url: base + "/events", header: h("X-API-Key", "alice"), want: "key:alice"},
		{name: "X-API-Key bob", url: base + "/events", header: h("X-API-Key", "bob"), want: "key:bob"},
		{name: "anonymous", url: base + "/events", header: h(), want: "anonymous"},
		{name: "client cert alice", url: tlsBase + "/events", header: h(), cert: &alice, tlsConn: true, want: "cert:CN=alice"},
		{name: "client cert bob", url: tlsBase + "/events", header: h(), cert: &bob, tlsConn: true, want: "cert:CN=bob"},
		{name: "TLS anonymous", url: tlsBase + "/events", header: h(), tlsConn: true, want: "anonymous over TLS"},
		// The same user twice, differing only in headers without identity:
		// these two must share one upstream.
		{name: "erin, Firefox", url: base + "/events", want: "key:erin",
			header: h("X-API-Key", "erin", "User-Agent", "Firefox", "Accept-Language", "de", "Referer", "https://a.test/", "Sec-Fetch-Mode", "cors")},
		{name: "erin, curl", url: base + "/events", want: "key:erin",
			header: h("X-API-Key", "erin", "User-Agent", "curl/8", "Accept-Language", "fr", "Cache-Control", "no-cache", "Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")},
	}
	got := make([]*client, len(clients))
	for i, ic := range clients {
		// Each stream is open (its upstream answered, or it joined a hub
		// that had) once its response header is here.
		got[i] = openIso(t, ic, roots)
		if u := got[i].Resp.Header.Get("X-User"); u != ic.want {
			t.Errorf("%s got the response header of %q, want %q (status %d)", ic.name, u, ic.want, got[i].Resp.StatusCode)
		}
	}
	b.emit(1)
	for i, ic := range clients {
		evs := waitEvents(t, got[i], 1)
		if want := "user=" + ic.want + " n=1"; evs[0].Data != want || len(evs) != 1 {
			t.Errorf("%s got %q, want only %q", ic.name, datas(evs), want)
		}
	}
	perUser, total := b.counts()
	for user, n := range perUser {
		if n != 1 {
			t.Errorf("backend got %d upstream requests for %s, want 1", n, user)
		}
	}
	if want := len(clients) - 1; total != want {
		t.Errorf("backend got %d upstream requests for %d identities (%v)", total, want, perUser)
	}
}

// The default key: deny by default, bounded, and no splicing.
func TestStreamKey(t *testing.T) {
	req := func(target string, kv ...string) *http.Request {
		r, _ := http.NewRequest(http.MethodGet, target, nil)
		r.Header = http.Header{}
		for i := 0; i+1 < len(kv); i += 2 {
			r.Header.Add(kv[i], kv[i+1])
		}
		return r
	}
	trusted := func(r *http.Request, yes bool) *http.Request {
		ctx := context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{caddyhttp.TrustedProxyVarKey: yes})
		return r.WithContext(ctx)
	}
	same := func(what string, a, b *http.Request) {
		t.Helper()
		if streamKey(a) != streamKey(b) {
			t.Errorf("%s: keys differ", what)
		}
	}
	differ := func(what string, a, b *http.Request) {
		t.Helper()
		if streamKey(a) == streamKey(b) {
			t.Errorf("%s: same key", what)
		}
	}
	u := "http://h.test/events?x=1"
	differ("X-Auth-Token", req(u, "X-Auth-Token", "a"), req(u, "X-Auth-Token", "b"))
	differ("an unknown header against none", req(u, "X-Tenant", "a"), req(u))
	differ("second Cookie line", req(u, "Cookie", "a=1", "Cookie", "sid=x"), req(u, "Cookie", "a=1", "Cookie", "sid=y"))
	differ("order of repeated lines", req(u, "X-A", "1", "X-A", "2"), req(u, "X-A", "2", "X-A", "1"))
	differ("splice across values", req(u, "X-A", "ab", "X-A", "c"), req(u, "X-A", "a", "X-A", "bc"))
	differ("splice across names", req(u, "X-A", "b"), req(u, "X-Ab", ""))
	differ("query", req(u), req("http://h.test/events?x=2"))
	differ("host", req(u), req("http://g.test/events?x=1"))
	post := req(u)
	post.Method = http.MethodPost
	differ("method", req(u), post)
	same("allowlisted headers", req(u, "User-Agent", "a", "Accept-Language", "de", "Sec-Ch-Ua", "x", "Dnt", "1", "Last-Event-Id", "5"),
		req(u, "User-Agent", "b", "Accept", "*/*", "Sec-Fetch-Site", "none", "Priority", "u=1", "Origin", "https://o.test"))
	differ("X-Forwarded-For from an untrusted client",
		trusted(req(u, "X-Forwarded-For", "1.1.1.1"), false), trusted(req(u, "X-Forwarded-For", "2.2.2.2"), false))
	differ("X-Real-IP from an untrusted client", req(u, "X-Real-Ip", "1.1.1.1"), req(u, "X-Real-Ip", "2.2.2.2"))
	same("X-Forwarded-* and Forwarded from a trusted proxy",
		trusted(req(u, "X-Forwarded-For", "1.1.1.1", "Forwarded", "for=1.1.1.1", "X-Real-Ip", "1.1.1.1"), true),
		trusted(req(u, "X-Forwarded-For", "2.2.2.2", "X-Forwarded-Proto", "https"), true))
	withCert := func(raw string) *http.Request {
		r := req(u)
		r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{{Raw: []byte(raw)}}}
		return r
	}
	differ("client certificate", withCert("alice"), withCert("bob"))
	differ("client certificate against none", withCert("alice"), req(u))
	big := req("http://h.test/"+strings.Repeat("p", 100000), "X-Big", strings.Repeat("v", 100000))
	if n := len(streamKey(big)); n > maxKeyPrefix+1+64 {
		t.Errorf("key of a huge request is %d bytes", n)
	}
}

// {sse.default_key} in a key template narrows the default key.
func TestTemplateKeyDefaultPlaceholder(t *testing.T) {
	r, _ := http.NewRequest(http.MethodGet, "http://h.test/events", nil)
	r.Header.Set("X-API-Key", "alice")
	repl := caddy.NewReplacer()
	repl.Set("test.ip", "192.0.2.1")
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl))
	if got, want := templateKey(r, "{sse.default_key} {test.ip}"), streamKey(r)+" 192.0.2.1"; got != want {
		t.Fatalf("templateKey = %q, want %q", got, want)
	}
	if got := templateKey(r, "{test.ip}"); got != "192.0.2.1" {
		t.Fatalf("templateKey without the default = %q", got)
	}
}
