package caddysse

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

// streamsNow fetches GET /sse/streams and decodes it; raw is the body.
func (oc observedCaddy) streamsNow(t testing.TB) (list []streamStatus, raw []byte) {
	t.Helper()
	raw = oc.get(t, "/sse/streams")
	var resp struct {
		Streams []streamStatus `json:"streams"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&resp); err != nil {
		t.Fatalf("decoding /sse/streams: %v\n%s", err, raw)
	}
	if resp.Streams == nil {
		t.Fatalf("/sse/streams: streams is null, want a list: %s", raw)
	}
	return resp.Streams, raw
}

// waitStreams polls GET /sse/streams until cond holds for the list.
func (oc observedCaddy) waitStreams(t testing.TB, what string, cond func([]streamStatus) bool) ([]streamStatus, []byte) {
	t.Helper()
	var list []streamStatus
	var raw []byte
	if !eventually(5*time.Second, func() bool {
		list, raw = oc.streamsNow(t)
		return cond(list)
	}) {
		t.Fatalf("/sse/streams: no %s within 5s; last: %s", what, raw)
	}
	return list, raw
}

func byPath(list []streamStatus, path string) []streamStatus {
	var out []streamStatus
	for _, s := range list {
		if s.Path == path {
			out = append(out, s)
		}
	}
	return out
}

var hashedKey = regexp.MustCompile(`^[0-9a-f]{16}$`)

// GET /sse/streams lists the live pass-through streams with their figures;
// equal request identities share a key, different ones do not; an ended
// stream leaves the list.
func TestAdminStreamsPassthrough(t *testing.T) {
	checkNoLeak(t)
	ba, bb := newScriptedBackend(t), newScriptedBackend(t)
	oc := startObservedCaddy(t,
		route("/a", sseHandler(map[string]any{"padding": 0, "heartbeat": 0, "compress": []string{"off"}}), proxyTo(ba.Addr)),
		route("/b", sseHandler(map[string]any{"padding": 0, "heartbeat": 0, "compress": []string{"gzip"}}), proxyTo(bb.Addr)))

	if list, _ := oc.streamsNow(t); len(list) != 0 {
		t.Fatalf("streams before any client: %+v", list)
	}

	ca := openStream(t, oc.Base+"/a?user=1", false, "Authorization", "Bearer one")
	ba.request(t)
	ba.send(t, "id: 41\ndata: x\n\n", "id: 42\ndata: y\n\n", ": a comment, no id\n\n")
	gotA := ca.waitSuffix(t, ": a comment, no id\n\n")

	// Two clients with the same identity on /b, each its own stream.
	cb1 := openStream(t, oc.Base+"/b?user=2", false, "Authorization", "Bearer two", "Accept-Encoding", "gzip")
	bb.request(t)
	cb2 := openStream(t, oc.Base+"/b?user=2", false, "Authorization", "Bearer two", "Accept-Encoding", "gzip")
	bb.request(t)

	list, raw := oc.waitStreams(t, "3 streams with /a's figures", func(l []streamStatus) bool {
		a := byPath(l, "/a")
		return len(l) == 3 && len(a) == 1 && a[0].Events == 3 && a[0].Bytes == int64(len(gotA))
	})
	a := byPath(list, "/a")[0]
	want := streamStatus{Mode: "passthrough", Key: a.Key, Path: "/a", Clients: 1, Upstream: "streaming",
		UptimeSeconds: a.UptimeSeconds, LastEventID: "42", Events: 3, Bytes: int64(len(gotA)), WireBytes: int64(len(gotA)), Encoding: "identity"}
	if !reflect.DeepEqual(a, want) {
		t.Errorf("/a stream:\n got %+v\nwant %+v", a, want)
	}
	if a.UptimeSeconds <= 0 || a.UptimeSeconds > 60 {
		t.Errorf("/a uptime_seconds = %v", a.UptimeSeconds)
	}
	b := byPath(list, "/b")
	if len(b) != 2 {
		t.Fatalf("want 2 streams on /b: %s", raw)
	}
	for _, s := range list {
		if !hashedKey.MatchString(s.Key) {
			t.Errorf("key %q is not a 16-digit hash", s.Key)
		}
	}
	if b[0].Key != b[1].Key {
		t.Errorf("same request identity, different keys: %q, %q", b[0].Key, b[1].Key)
	}
	if b[0].Key == a.Key {
		t.Errorf("different identities, same key %q", a.Key)
	}
	if b[0].Encoding != "gzip" || b[0].LastEventID != "" || b[0].Events != 0 {
		t.Errorf("/b stream: %+v", b[0])
	}
	// Longest running first.
	if list[0].Path != "/a" {
		t.Errorf("streams not sorted by uptime: %s", raw)
	}
	for _, field := range []string{`"mode"`, `"key"`, `"clients"`, `"upstream"`, `"uptime_seconds"`, `"cache_events"`, `"cache_bytes"`, `"reconnects"`, `"events"`, `"bytes"`} {
		if !bytes.Contains(raw, []byte(field)) {
			t.Errorf("no %s field in %s", field, raw)
		}
	}

	// Streams that end leave the list.
	ba.end(t)
	ca.waitEOF(t, 5*time.Second)
	cb1.close()
	cb2.close()
	oc.waitStreams(t, "empty list", func(l []streamStatus) bool { return len(l) == 0 })
}

// Only GET is served.
func TestAdminStreamsMethod(t *testing.T) {
	oc := startObservedCaddy(t, route("/events", sseHandler(nil), `{"handler": "static_response", "body": "x"}`))
	resp, err := http.Post(oc.Admin+"/sse/streams", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("POST /sse/streams: %s, want 405: %s %v", resp.Status, b, resp.Header)
	}
	if resp, raw := oc.streamsNow(t); len(resp) != 0 || !bytes.Contains(raw, []byte(`"streams":[]`)) {
		t.Fatalf("GET /sse/streams with no stream: %s", raw)
	}
}

// Credentials in the Authorization header or the query, and event data,
// never appear in the plugin's logs (all levels) or in the admin output,
// through a stream's whole life: start, events, a truncated event, end.
func TestNoSecretsInLogsOrAdmin(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	oc := startObservedCaddy(t, route("/events",
		sseHandler(map[string]any{"heartbeat": 0, "compress": []string{"off"}}), proxyTo(b.Addr)))

	c := openStream(t, oc.Base+"/events?token=secret&x=1", false, "Authorization", "Bearer secret-token",
		"Cookie", "session=secret-cookie")
	b.request(t)
	b.send(t, "id: 7\ndata: secret-payload\n\n")
	c.waitSuffix(t, "data: secret-payload\n\n")
	list, admin := oc.waitStreams(t, "the stream with its event", func(l []streamStatus) bool {
		return len(l) == 1 && l[0].Events == 1
	})
	if list[0].Path != "/events" || list[0].LastEventID != "7" {
		t.Errorf("stream: %+v", list[0])
	}

	// The backend ends the stream in the middle of an event (a warning).
	b.send(t, "data: secret-partial")
	b.end(t)
	c.waitEOF(t, 5*time.Second)
	logs := oc.waitLog(t, 5*time.Second, `"msg":"stream ended"`)

	// The logs were captured at all levels: these lines must be there.
	for _, line := range []string{`"msg":"stream started"`, `"level":"debug"`, `"level":"warn"`, `"path":"/events"`, `"events":1`} {
		if !bytes.Contains(logs, []byte(line)) {
			t.Errorf("no %s in the plugin's logs:\n%s", line, logs)
		}
	}
	for _, secret := range []string{"secret", "token=", "Bearer", "session="} {
		if bytes.Contains(logs, []byte(secret)) {
			t.Errorf("%q in the plugin's logs:\n%s", secret, logs)
		}
		if bytes.Contains(admin, []byte(secret)) {
			t.Errorf("%q in the admin output: %s", secret, admin)
		}
	}
}

// A fan-out hub is listed once, with all its clients, how many of them
// were handed over to its delivery loops (plain HTTP/1.1, not HTTP/2),
// and its cache.
func TestAdminStreamsFanout(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	oc := startObservedCaddy(t, fanoutRoute(e, map[string]any{"heartbeat": 0, "compress": []string{"zstd", "gzip"}}))
	clients := []*client{
		openStream(t, oc.Base+"/events?q=secret", false),
		openStream(t, oc.Base+"/events?q=secret", false),
		openStream(t, oc.Base+"/events?q=secret", true),
	}
	// Compressed clients: they read the bytes as sent.
	gz := openStream(t, oc.Base+"/events?q=secret", false, "Accept-Encoding", "gzip")
	zs := openStream(t, oc.Base+"/events?q=secret", true, "Accept-Encoding", "zstd")
	e.waitJoined(t, 1)
	e.emit("data: one\n\n")
	e.emit("data: two\n\n")
	for _, c := range clients {
		waitEvents(t, c, 2)
	}
	// Every client was sent the same plain bytes (no padding, no
	// heartbeat): the two events.
	plain := int64(len(clients[0].bytes()))
	list, raw := oc.waitStreams(t, "one hub with 5 clients and every byte counted", func(l []streamStatus) bool {
		return len(l) == 1 && l[0].Clients == 5 && l[0].Bytes == 5*plain
	})
	gzWire := int64(len(gz.waitFor(t, 5*time.Second, "gzip bytes", func(b []byte) bool { return int64(len(b)) == list[0].Encodings[1].WireBytes })))
	zsWire := int64(len(zs.waitFor(t, 5*time.Second, "zstd bytes", func(b []byte) bool { return int64(len(b)) == list[0].Encodings[2].WireBytes })))
	h := list[0]
	want := streamStatus{Mode: "fanout", Key: h.Key, Path: "/events", Clients: 5, HandedOver: 3, Upstream: "streaming",
		UptimeSeconds: h.UptimeSeconds, LastEventID: h.LastEventID, CacheEvents: 2, CacheBytes: h.CacheBytes, Events: 2,
		Bytes: 5 * plain, WireBytes: 3*plain + gzWire + zsWire, Encoding: "identity,gzip,zstd",
		Encodings: []encodingStatus{
			{Encoding: "identity", Clients: 3, Bytes: 3 * plain, WireBytes: 3 * plain},
			{Encoding: "gzip", Clients: 1, Bytes: plain, WireBytes: gzWire},
			{Encoding: "zstd", Clients: 1, Bytes: plain, WireBytes: zsWire},
		}}
	if !reflect.DeepEqual(h, want) {
		t.Errorf("hub:\n got %+v\nwant %+v", h, want)
	}
	if !hashedKey.MatchString(h.Key) || h.LastEventID == "" || h.CacheBytes <= 0 || bytes.Contains(raw, []byte("secret")) {
		t.Errorf("hub report: %s", raw)
	}
}
