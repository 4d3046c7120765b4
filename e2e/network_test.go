package e2e

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

// exchange is one request of a tab as the browser's network stack saw it
// (Chrome DevTools Protocol, Network domain): the headers that went over
// the wire both ways, and how many body bytes arrived before and after
// decoding.
type exchange struct {
	URL             string
	Type            network.ResourceType
	RequestHeaders  http.Header // as sent, Accept-Encoding and Last-Event-ID included
	ResponseHeaders http.Header
	Status          int64
	Decoded         int64 // body bytes after content decoding (sum of dataReceived)
	Encoded         int64 // bytes received for them, as the browser reports it
}

func (e exchange) String() string {
	return fmt.Sprintf("%s %s: status %d, Content-Encoding %q, Last-Event-ID %q, %d bytes decoded from %d",
		e.Type, e.URL, e.Status, e.ResponseHeaders.Get("Content-Encoding"), e.RequestHeaders.Get("Last-Event-ID"),
		e.Decoded, e.Encoded)
}

// netLog records the exchanges of one tab.
type netLog struct {
	mu    sync.Mutex
	byID  map[network.RequestID]*exchange
	order []network.RequestID
}

// recordNetwork starts recording the tab's requests; call it before the
// requests of interest start.
func (p *page) recordNetwork(t testing.TB) *netLog {
	t.Helper()
	l := &netLog{byID: make(map[network.RequestID]*exchange)}
	if err := chromedp.Listen(p.ctx, l.onEvent); err != nil {
		t.Fatalf("listen to the tab's events: %v", err)
	}
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	if _, err := chromedp.Call(ctx, network.Enable, network.EnableParams{}); err != nil {
		t.Fatalf("enable network events: %v", err)
	}
	return l
}

// get returns the exchange of id, creating it (events of one request come
// in no guaranteed order). l.mu is held.
func (l *netLog) get(id network.RequestID) *exchange {
	e := l.byID[id]
	if e == nil {
		e = &exchange{RequestHeaders: http.Header{}, ResponseHeaders: http.Header{}}
		l.byID[id] = e
		l.order = append(l.order, id)
	}
	return e
}

func (l *netLog) onEvent(ev any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch ev := ev.(type) {
	case *network.EventRequestWillBeSent:
		e := l.get(ev.RequestID)
		e.URL, e.Type = ev.Request.URL, ev.Type
		mergeHeaders(e.RequestHeaders, ev.Request.Headers, false)
	case *network.EventRequestWillBeSentExtraInfo: // what really went out
		mergeHeaders(l.get(ev.RequestID).RequestHeaders, ev.Headers, true)
	case *network.EventResponseReceived:
		e := l.get(ev.RequestID)
		e.Type, e.Status = ev.Type, ev.Response.Status
		mergeHeaders(e.ResponseHeaders, ev.Response.Headers, true)
	case *network.EventResponseReceivedExtraInfo:
		mergeHeaders(l.get(ev.RequestID).ResponseHeaders, ev.Headers, true)
	case *network.EventDataReceived:
		e := l.get(ev.RequestID)
		e.Decoded += ev.DataLength
		e.Encoded += ev.EncodedDataLength
	}
}

// mergeHeaders copies CDP headers (values of repeated fields joined by
// newlines) into dst; replace says whether they win over what is there.
func mergeHeaders(dst http.Header, src network.Headers, replace bool) {
	for k, v := range src {
		s, ok := v.(string)
		if !ok {
			continue
		}
		if !replace && dst.Get(k) != "" {
			continue
		}
		dst.Del(k)
		for part := range strings.SplitSeq(s, "\n") {
			dst.Add(k, part)
		}
	}
}

// exchanges returns the recorded requests for path (on any origin), in
// the order they began.
func (l *netLog) exchanges(path string) []exchange {
	l.mu.Lock()
	defer l.mu.Unlock()
	var list []exchange
	for _, id := range l.order {
		e := l.byID[id]
		if u, err := url.Parse(e.URL); err == nil && u.Path == path {
			c := *e
			c.RequestHeaders, c.ResponseHeaders = e.RequestHeaders.Clone(), e.ResponseHeaders.Clone()
			list = append(list, c)
		}
	}
	return list
}

// waitExchanges polls until n requests for path got their response
// headers, and returns them.
func (l *netLog) waitExchanges(t testing.TB, path string, n int, timeout time.Duration) []exchange {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		list := l.exchanges(path)
		responded := 0
		for _, e := range list {
			if e.Status != 0 {
				responded++
			}
		}
		if responded >= n {
			return list
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d responses for %s: not within %v; recorded: %v", n, path, timeout, list)
		}
		time.Sleep(pollInterval)
	}
}
