package caddysse

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden JSON files under testdata/adapt")

func TestUnmarshalCaddyfile(t *testing.T) {
	dur := func(s string) *caddy.Duration {
		d, _ := caddy.ParseDuration(s)
		cd := caddy.Duration(d)
		return &cd
	}
	size := func(n int) *int { return &n }
	for _, tc := range []struct {
		in   string
		want Handler
		err  string
	}{
		{in: `sse`, want: Handler{}},
		{in: `sse {
			heartbeat 20s keep alive
		}`, err: "wrong argument count"},
		{in: `sse {
			heartbeat 20s "keep alive"
			padding 1KiB
			retry 1.5s
			max_age 2m
			write_timeout 5s
			max_event_size 64KiB
		}`, want: Handler{Heartbeat: dur("20s"), HeartbeatComment: "keep alive", Padding: size(1024),
			Retry: caddy.Duration(1500e6), MaxAge: caddy.Duration(120e9), WriteTimeout: caddy.Duration(5e9), MaxEventSize: 64 << 10}},
		{in: `sse {
			heartbeat off
			padding 0
		}`, want: Handler{Heartbeat: dur("0s"), Padding: size(0)}},
		{in: `sse extra`, err: "wrong argument count"},
		{in: `sse {
			hearbeat 5s
		}`, err: "unrecognized sse option 'hearbeat'"},
		{in: `sse {
			padding 65KiB
		}`, err: "padding: 65KiB is over the maximum of 64 KiB"},
		{in: `sse {
			padding lots
		}`, err: "padding:"},
		{in: `sse {
			retry
		}`, err: "wrong argument count"},
		{in: `sse {
			retry -1s
		}`, err: "retry: negative duration"},
		{in: `sse {
			max_age 1h 2h
		}`, err: "wrong argument count"},
		{in: `sse {
			fanout {
				buffer 100 1MiB 30s
				ids upstream
			}
		}`, want: Handler{Fanout: &Fanout{BufferEvents: 100, BufferBytes: 1 << 20, BufferAge: caddy.Duration(30e9), IDs: "upstream"}}},
		{in: `sse {
			fanout {
				buffer lots
			}
		}`, err: "neither an event count"},
		{in: `sse {
			fanout {
				ids mine
			}
		}`, err: "not one of auto, upstream, synthesize"},
		{in: `sse {
			fanout {
				keys x
			}
		}`, err: "unrecognized fanout option 'keys'"},
		{in: `sse {
			fanout extra
		}`, err: "wrong argument count"},
		{in: `sse {
			compress zstd gzip
		}`, want: Handler{Compress: []string{"zstd", "gzip"}}},
		{in: `sse {
			compress gzip
		}`, want: Handler{Compress: []string{"gzip"}}},
		{in: `sse {
			compress off
		}`, want: Handler{Compress: []string{"off"}}},
		{in: `sse {
			compress
		}`, err: "wrong argument count"},
		{in: `sse {
			compress zstd lz4
		}`, err: "compress: unknown encoding 'lz4'"},
		{in: `sse {
			compress br
		}`, err: "compress: encoding 'br' is not supported"},
		{in: `sse {
			compress off gzip
		}`, err: "compress: off cannot be combined"},
		{in: `sse {
			compress gzip gzip
		}`, err: "compress: encoding 'gzip' listed twice"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: error %v, want one containing %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		got, _ := json.Marshal(h)
		want, _ := json.Marshal(tc.want)
		if !bytes.Equal(got, want) {
			t.Errorf("%s:\n got %s\nwant %s", tc.in, got, want)
		}
	}
}

func TestValidateNamesTheField(t *testing.T) {
	dur := func(d caddy.Duration) *caddy.Duration { return &d }
	size := func(n int) *int { return &n }
	for _, tc := range []struct {
		h   Handler
		err string
	}{
		{Handler{Heartbeat: dur(caddy.Duration(500e6))}, "heartbeat: 500ms is below 1s"},
		{Handler{Heartbeat: dur(-1)}, "heartbeat"},
		{Handler{HeartbeatComment: "a\nb"}, "heartbeat_comment"},
		{Handler{Padding: size(-1)}, "padding"},
		{Handler{Padding: size(1)}, "padding"},
		{Handler{Padding: size(70000)}, "padding"},
		{Handler{Retry: -1}, "retry"},
		{Handler{MaxAge: -1}, "max_age"},
		{Handler{MaxAge: caddy.Duration(1e6)}, "max_age"},
		{Handler{WriteTimeout: -1}, "write_timeout"},
		{Handler{MaxEventSize: 100}, "max_event_size"},
	} {
		err := tc.h.Validate()
		if err == nil || !strings.HasPrefix(err.Error(), tc.err) {
			t.Errorf("%+v: error %v, want one starting with %q", tc.h, err, tc.err)
		}
	}
	if err := (&Handler{Heartbeat: dur(0), Padding: size(0)}).Validate(); err != nil {
		t.Errorf("off values rejected: %v", err)
	}
}

// TestAdaptGolden adapts each testdata/adapt/*.caddyfile and compares the
// JSON with the .json beside it (go test -run Golden -update rewrites them).
func TestAdaptGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/adapt/*.caddyfile")
	if len(files) == 0 {
		t.Fatal("no golden inputs")
	}
	for _, file := range files {
		in, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(in, map[string]any{"filename": file})
		if err != nil || len(warnings) > 0 {
			t.Fatalf("%s: %v %v", file, err, warnings)
		}
		var pretty bytes.Buffer
		json.Indent(&pretty, out, "", "\t")
		pretty.WriteByte('\n')
		golden := strings.TrimSuffix(file, ".caddyfile") + ".json"
		if *updateGolden {
			os.WriteFile(golden, pretty.Bytes(), 0o644)
		}
		want, err := os.ReadFile(golden)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(pretty.Bytes(), want) {
			t.Errorf("%s adapts to:\n%s\nwant:\n%s", file, pretty.Bytes(), want)
		}
	}
}
