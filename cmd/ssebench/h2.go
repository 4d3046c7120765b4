package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// h2Dialer opens HTTP/2 connections over cleartext with prior knowledge
// (h2c), one per request: -h2's clients, and the probe in that mode.
//
// It uses net/http's Transport.NewClientConn (Go 1.26), which always dials
// a new connection and keeps it out of the Transport's pool, so that one
// client is one TCP connection by construction, not by how a pool happens
// to behave; the dial is the caller's (source address, tracking for
// closeAll). The Transport allows unencrypted HTTP/2 only, so a server
// that does not speak h2c fails the request instead of being measured on
// HTTP/1.1. DisableCompression leaves Accept-Encoding and the decoding of
// Content-Encoding to the bench, as on HTTP/1.1.
type h2Dialer struct {
	t *http.Transport
}

func newH2Dialer(dial func(ctx context.Context) (net.Conn, error)) *h2Dialer {
	t := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dial(ctx)
		},
		DisableCompression: true,
		Protocols:          new(http.Protocols),
	}
	t.Protocols.SetUnencryptedHTTP2(true)
	return &h2Dialer{t: t}
}

// get dials a new connection to addr and sends GET path with the header
// fields hdr on it. It returns once the response head arrived (within
// headTO), with a function that ends the stream and closes the connection
// (safe to call more than once, from any goroutine).
func (d *h2Dialer) get(addr, path string, hdr http.Header, headTO time.Duration) (*http.Response, func(), error) {
	cc, err := d.t.NewClientConn(context.Background(), "http", addr)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		cancel()
		cc.Close()
		return nil, nil, err
	}
	req.Header = hdr.Clone()
	timer := time.AfterFunc(headTO, cancel)
	resp, err := cc.RoundTrip(req)
	if !timer.Stop() {
		if err == nil {
			resp.Body.Close()
			err = context.Canceled
		}
		err = fmt.Errorf("no response head within %s: %w", headTO, err)
	}
	if err == nil && resp.ProtoMajor != 2 {
		resp.Body.Close()
		err = fmt.Errorf("response in %s, want HTTP/2", resp.Proto)
	}
	if err != nil {
		cancel()
		cc.Close()
		return nil, nil, err
	}
	var once sync.Once
	return resp, func() {
		once.Do(func() {
			resp.Body.Close()
			cc.Close()
			cancel()
		})
	}, nil
}
