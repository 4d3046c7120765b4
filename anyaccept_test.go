package caddysse

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// With any_accept, curl-like clients (Accept: */*) share one upstream;
// without it each gets its own, and a client that asks for something
// else never fans out.
func TestFanoutAnyAccept(t *testing.T) {
	for _, anyAccept := range []bool{false, true} {
		t.Run(fmt.Sprint("any_accept=", anyAccept), func(t *testing.T) {
			checkNoLeak(t)
			e := newEmitter(t)
			base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"any_accept": anyAccept}}))
			curl1 := openIso(t, isoClient{name: "curl 1", url: base + "/events", header: http.Header{"Accept": {"*/*"}}}, nil)
			curl2 := openIso(t, isoClient{name: "curl 2", url: base + "/events", header: http.Header{"Accept": {"*/*"}}}, nil)
			want := 2 // one each
			if anyAccept {
				want = 1 // one shared
			}
			e.waitJoined(t, want)
			e.emit("data: 1\n\n")
			for _, c := range []*client{curl1, curl2} {
				if d := datas(waitEvents(t, c, 1)); d != "1" {
					t.Fatalf("curl client got %q", d)
				}
			}
			if n := e.requests(); n != want {
				t.Fatalf("backend got %d requests, want %d", n, want)
			}
			other := openIso(t, isoClient{name: "json", url: base + "/events", header: http.Header{"Accept": {"application/json"}}}, nil)
			e.waitJoined(t, 1) // its own upstream, even with any_accept
			other.close()
		})
	}
}

func TestAdmitsEventStream(t *testing.T) {
	for accept, want := range map[string]bool{
		"":                            true,
		"*/*":                         true,
		"text/*":                      true,
		"Text/Event-Stream":           true,
		"application/json, */*;q=0.1": true,
		"application/json":            false,
		"text/event-stream;q=0":       false,
		"*/*; q=0.0":                  false,
		"text/html":                   false,
	} {
		hdr := http.Header{}
		if accept != "" {
			hdr.Set("Accept", accept)
		}
		if got := admitsEventStream(hdr); got != want {
			t.Errorf("Accept %q: admits %v, want %v", accept, got, want)
		}
	}
}

func TestCaddyfileAnyAccept(t *testing.T) {
	var h Handler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`sse {
		fanout {
			any_accept
		}
	}`)); err != nil {
		t.Fatal(err)
	}
	if h.Fanout == nil || !h.Fanout.AnyAccept {
		t.Fatalf("any_accept not set: %+v", h.Fanout)
	}
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`sse {
		fanout {
			any_accept yes
		}
	}`))
	if err == nil || !strings.Contains(err.Error(), "wrong argument count") {
		t.Fatalf("any_accept with an argument: %v", err)
	}
}

// With any_accept, a curl-like client still gets a backend answer that is
// not a stream, as it is.
func TestFanoutAnyAcceptPassesNonStreamThrough(t *testing.T) {
	checkNoLeak(t)
	e := newEmitter(t)
	e.status = http.StatusNotFound
	e.header = http.Header{"Content-Type": {"text/plain"}}
	base := startCaddy(t, fanoutRoute(e, map[string]any{"fanout": map[string]any{"any_accept": true}}))
	c := openIso(t, isoClient{name: "curl", url: base + "/events", header: http.Header{"Accept": {"*/*"}}}, nil)
	if c.Resp.StatusCode != http.StatusNotFound {
		t.Fatalf("status %d, want the backend's 404", c.Resp.StatusCode)
	}
	if got := string(c.waitEOF(t, 5*time.Second)); got != "backend says no" {
		t.Fatalf("body %q, want the backend's", got)
	}
}
