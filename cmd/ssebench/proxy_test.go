package main

import (
	"strings"
	"testing"
)

func TestCaddyfiles(t *testing.T) {
	spec := proxySpec{listen: "127.0.0.1:8080", upstream: "127.0.0.1:9090"}
	for kind, want := range map[string][]string{
		"fanout":        {"sse {\n\t\t\tfanout\n\t\t\theartbeat 5s\n\t\t}", "reverse_proxy 127.0.0.1:9090"},
		"passthrough":   {"sse {\n\t\t\theartbeat 5s\n\t\t}", "reverse_proxy 127.0.0.1:9090"},
		"reverse_proxy": {"reverse_proxy 127.0.0.1:9090"},
		"encode_gzip":   {"encode gzip\n\t\treverse_proxy"},
	} {
		spec.kind = kind
		spec.sseOpts = []string{"heartbeat 5s"}
		cf, err := caddyfile(spec)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		for _, w := range append(want, "admin off", "auto_https off", "level WARN", "http://127.0.0.1:8080 {") {
			if !strings.Contains(cf, w) {
				t.Errorf("%s: Caddyfile lacks %q:\n%s", kind, w, cf)
			}
		}
		if (kind == "reverse_proxy" || kind == "encode_gzip") && strings.Contains(cf, "sse") {
			t.Errorf("%s must not use the plugin:\n%s", kind, cf)
		}
		if strings.Count(cf, "{") != strings.Count(cf, "}") {
			t.Errorf("%s: unbalanced braces:\n%s", kind, cf)
		}
	}
	spec.kind, spec.sseOpts = "passthrough", nil
	if cf, _ := caddyfile(spec); !strings.Contains(cf, "\t\tsse\n") {
		t.Errorf("passthrough without options should be a bare sse line:\n%s", cf)
	}
	if _, err := caddyfile(proxySpec{kind: "nginx"}); err == nil {
		t.Error("nginx is not a Caddy proxy")
	}
	n := nginxConf(proxySpec{kind: "nginx", listen: "127.0.0.1:8080", upstream: "127.0.0.1:9090"}, "/tmp/x")
	for _, w := range []string{"proxy_buffering off;", "listen 127.0.0.1:8080;", "proxy_pass http://127.0.0.1:9090;", "proxy_http_version 1.1;", "pid /tmp/x/nginx.pid;"} {
		if !strings.Contains(n, w) {
			t.Errorf("nginx.conf lacks %q", w)
		}
	}
}

func TestTailBuffer(t *testing.T) {
	tb := &tailBuffer{max: 10}
	tb.Write([]byte("0123456789"))
	tb.Write([]byte("abc"))
	if got := tb.String(); got != "3456789abc" {
		t.Errorf("got %q", got)
	}
	tb = &tailBuffer{max: 1 << 10}
	for i := 0; i < 30; i++ {
		tb.Write([]byte("line\n"))
	}
	if got := strings.Count(tb.indented(), "line"); got != 20 {
		t.Errorf("indented keeps %d lines, want 20", got)
	}
	tb = &tailBuffer{max: 1 << 16}
	tb.Write([]byte("starting\npanic: runtime error: invalid memory address\n\ngoroutine 7 [running]:\n"))
	for i := 0; i < 100; i++ {
		tb.Write([]byte("frame\n"))
	}
	if got := tb.indented(); !strings.HasPrefix(got, "    panic: runtime error") || strings.Count(got, "\n") != 29 {
		t.Errorf("a panic should be shown from its first line, 30 lines:\n%s", got)
	}
	if (&tailBuffer{max: 1}).indented() != "    (no output)" {
		t.Error("empty output")
	}
}

func TestParseInts(t *testing.T) {
	got, err := parseInts("100, 1000,5000,")
	if err != nil || len(got) != 3 || got[2] != 5000 {
		t.Errorf("got %v, %v", got, err)
	}
	for _, bad := range []string{"", "0", "-5", "1e3", "a"} {
		if _, err := parseInts(bad); err == nil {
			t.Errorf("parseInts(%q) accepted", bad)
		}
	}
}
