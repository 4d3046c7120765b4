package caddysse

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
		// write_timeout off (or 0) is -1 in JSON, where 0 is the default.
		{in: `sse {
			write_timeout off
		}`, want: Handler{WriteTimeout: -1}},
		{in: `sse {
			write_timeout 0
		}`, want: Handler{WriteTimeout: -1}},
		{in: `sse {
			fanout {
				key {http.request.uri.path}
				buffer 10m 500
				linger off
				on_unknown_id backend
				reset_event gone
				replay_on_connect 5
				client_queue 64
				max_clients 10
				max_clients_total 100
			}
		}`, want: Handler{Fanout: &Fanout{Key: "{http.request.uri.path}", BufferEvents: 500, BufferAge: caddy.Duration(600e9), Linger: dur("0s"),
			OnUnknownID: "backend", ResetEvent: "gone", ReplayOnConnect: 5, ClientQueue: 64, MaxClients: 10, MaxClientsTotal: 100}}},
		{in: `sse {
			padding lots
		}`, err: "padding:"},
		{in: `sse {
			retry
		}`, err: "wrong argument count"},
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
			compress zstd br gzip
		}`, want: Handler{Compress: []string{"zstd", "br", "gzip"}}},
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
		{Handler{Heartbeat: dur(caddy.Duration(500e6))}, "heartbeat: 500ms is below 1s (0 or off disables heartbeats)"},
		{Handler{Heartbeat: dur(-1)}, "heartbeat: -1ns is negative"},
		{Handler{HeartbeatComment: "a\nb"}, `heartbeat_comment: "a\nb" is not a single line`},
		{Handler{Padding: size(-1)}, "padding: -1 is negative"},
		{Handler{Padding: size(1)}, "padding: 1 byte is below the minimum of 2 bytes (0 or off disables padding)"},
		{Handler{Padding: size(70000)}, "padding: 70000 bytes is over the maximum of 64 KiB"},
		{Handler{Retry: -1}, "retry: -1ns is negative"},
		{Handler{MaxAge: -1}, "max_age: -1ns is negative"},
		{Handler{MaxAge: caddy.Duration(1e6)}, "max_age: 1ms is below 1s (0 or off disables it)"},
		{Handler{MaxEventSize: 100}, "max_event_size: 100 bytes is below the minimum of 1 KiB"},
		{Handler{MaxEventSize: 2 << 30}, "max_event_size: 2 GiB is over the maximum of 1 GiB"},
		{Handler{Fanout: &Fanout{BufferEvents: -1}}, "fanout: buffer_events: -1 is negative"},
		{Handler{Fanout: &Fanout{BufferBytes: 2 << 30}}, "fanout: buffer_bytes: 2 GiB is over the maximum of 1 GiB"},
		{Handler{Fanout: &Fanout{BufferAge: -1}}, "fanout: buffer_age: -1ns is negative"},
		{Handler{Fanout: &Fanout{Linger: dur(-1)}}, "fanout: linger: -1ns is negative"},
		{Handler{Fanout: &Fanout{IDs: "mine"}}, `fanout: ids: "mine" is not one of auto, upstream, synthesize`},
		{Handler{Fanout: &Fanout{OnUnknownID: "x"}}, `fanout: on_unknown_id: "x" is not one of reset, backend`},
		{Handler{Fanout: &Fanout{ResetEvent: "a\rb"}}, `fanout: reset_event: "a\rb" is not a single line`},
		{Handler{Fanout: &Fanout{MaxClientsTotal: -1}}, "fanout: max_clients_total: -1 is negative"},
	} {
		err := tc.h.Validate()
		if err == nil || err.Error() != tc.err {
			t.Errorf("%+v: error %v, want %q", tc.h, err, tc.err)
		}
	}
	// Off values, and write_timeout's off, which JSON writes as negative.
	if err := (&Handler{Heartbeat: dur(0), Padding: size(0), WriteTimeout: -1}).Validate(); err != nil {
		t.Errorf("off values rejected: %v", err)
	}
}

// deadlineRecorder records the write deadline a stream sets on it.
type deadlineRecorder struct {
	fakeWriter
	deadline time.Time
}

func (d *deadlineRecorder) SetWriteDeadline(t time.Time) error { d.deadline = t; return nil }

// write_timeout off goes from the Caddyfile through JSON to a stream that
// bounds no write; before, off silently meant the default 30s.
func TestWriteTimeoutOff(t *testing.T) {
	for _, tc := range []struct {
		option string
		bound  time.Duration // 0: no deadline
	}{
		{"", defaultWriteTimeout},
		{"write_timeout 5s", 5 * time.Second},
		{"write_timeout off", 0},
		{"write_timeout 0", 0},
	} {
		var parsed Handler
		if err := parsed.UnmarshalCaddyfile(caddyfile.NewTestDispenser("sse {\n" + tc.option + "\n}")); err != nil {
			t.Fatal(err)
		}
		js, _ := json.Marshal(parsed)
		var h Handler
		if err := json.Unmarshal(js, &h); err != nil {
			t.Fatal(err)
		}
		if err := h.Validate(); err != nil {
			t.Fatalf("%q: %v", tc.option, err)
		}
		if err := h.Provision(benchContext()); err != nil {
			t.Fatal(err)
		}
		rec := &deadlineRecorder{}
		c := newClientConn(rec, time.Duration(h.WriteTimeout))
		now := time.Now()
		if err := c.write(now, []byte("data: x\n\n")); err != nil {
			t.Fatal(err)
		}
		var got time.Duration
		if !rec.deadline.IsZero() {
			got = rec.deadline.Sub(now)
		}
		if got != tc.bound {
			t.Errorf("%q (JSON %s): write deadline %s after the write, want %s (0: none)", tc.option, js, got, tc.bound)
		}
		h.Cleanup()
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

// TestAdaptRejects adapts bad Caddyfiles the way `caddy adapt` does and
// checks the exact message: the option, what is wrong and the one line it
// is on. The ranges are the ones Validate applies to the JSON.
func TestAdaptRejects(t *testing.T) {
	for _, tc := range []struct {
		block string // the lines inside `sse { }`, from line 3 of the file
		want  string // after "parsing caddyfile tokens for 'sse': "
	}{
		{"heartbeat 100ms", "heartbeat: 100ms is below 1s (0 or off disables heartbeats), at Caddyfile:3"},
		{"heartbeat -5s", "heartbeat: -5s is negative, at Caddyfile:3"},
		{"heartbeat soon", `heartbeat: "soon" is not a duration (such as 500ms, 30s or 1h), at Caddyfile:3`},
		{"heartbeat 5s a b", "heartbeat: wrong argument count: want heartbeat <interval>|off [<comment text>], at Caddyfile:3"},
		{"heartbeat 5s \"a\nb\"", `heartbeat: comment "a\nb" is not a single line, at Caddyfile:3`},
		{"heartbeat 5s\n\t\theartbeat 10s", "heartbeat: given twice (first on line 3); give each option once, at Caddyfile:4"},
		{"padding 1", "padding: 1 byte is below the minimum of 2 bytes (0 or off disables padding), at Caddyfile:3"},
		{"padding 65KiB", "padding: 65 KiB is over the maximum of 64 KiB, at Caddyfile:3"},
		{"padding 65537", "padding: 65537 bytes is over the maximum of 64 KiB, at Caddyfile:3"},
		{"padding -1", "padding: -1 is negative, at Caddyfile:3"},
		{"padding lots", `padding: "lots" is not a size (such as 2048, 2KiB or 1MiB), at Caddyfile:3`},
		{"retry -1s", "retry: -1s is negative, at Caddyfile:3"},
		{"retry", "retry: wrong argument count: want retry <duration>|off, at Caddyfile:3"},
		{"max_age 1ms", "max_age: 1ms is below 1s (0 or off disables it), at Caddyfile:3"},
		{"max_age 1h 2h", "max_age: wrong argument count: want max_age <duration>|off, at Caddyfile:3"},
		{"write_timeout -1s", "write_timeout: -1s is negative (off means no bound), at Caddyfile:3"},
		{"write_timeout 5s\n\t\twrite_timeout off", "write_timeout: given twice (first on line 3); give each option once, at Caddyfile:4"},
		{"max_event_size 100", "max_event_size: 100 bytes is below the minimum of 1 KiB, at Caddyfile:3"},
		{"max_event_size -1MiB", "max_event_size: -1MiB is negative, at Caddyfile:3"},
		{"max_event_size 0", "max_event_size: 0 is below the minimum of 1 KiB, at Caddyfile:3"},
		{"max_event_size off", "max_event_size: cannot be off: give a size of at least 1 KiB, at Caddyfile:3"},
		{"max_event_size 2GiB", "max_event_size: 2 GiB is over the maximum of 1 GiB, at Caddyfile:3"},
		{"compress lz4", "compress: unknown encoding 'lz4' (supported: zstd, gzip, br, or off), at Caddyfile:3"},
		{"compress", "compress: wrong argument count: want compress <encodings...>|off, at Caddyfile:3"},
		{"hearbeat 5s", "hearbeat: unrecognized sse option, at Caddyfile:3"},
		{"fanout extra", "fanout: unexpected argument 'extra' (options go in a block), at Caddyfile:3"},
		{"fanout\n\t\tfanout", "fanout: given twice (first on line 3); give each option once, at Caddyfile:4"},
		{"fanout {\n\t\t\tids mine\n\t\t}", `fanout: ids: "mine" is not one of auto, upstream, synthesize, at Caddyfile:4`},
		{"fanout {\n\t\t\tids\n\t\t}", "fanout: ids: wrong argument count: want ids auto|upstream|synthesize, at Caddyfile:4"},
		{"fanout {\n\t\t\ton_unknown_id resend\n\t\t}", `fanout: on_unknown_id: "resend" is not one of reset, backend, at Caddyfile:4`},
		{"fanout {\n\t\t\ton_end sometimes\n\t\t}", `fanout: on_end: "sometimes" is not one of auto, end, reconnect, at Caddyfile:4`},
		{"fanout {\n\t\t\tbuffer lots\n\t\t}", `fanout: buffer: "lots" is neither an event count (1000), a size (8MiB) nor an age (10m), at Caddyfile:4`},
		{"fanout {\n\t\t\tbuffer -5\n\t\t}", "fanout: buffer: -5 is negative, at Caddyfile:4"},
		{"fanout {\n\t\t\tbuffer -1MiB\n\t\t}", "fanout: buffer: -1MiB is negative, at Caddyfile:4"},
		{"fanout {\n\t\t\tbuffer -10m\n\t\t}", "fanout: buffer: -10m is negative, at Caddyfile:4"},
		{"fanout {\n\t\t\tbuffer 0\n\t\t}", "fanout: buffer: 0 events: the cache holds at least 1, at Caddyfile:4"},
		{"fanout {\n\t\t\tbuffer 100 200\n\t\t}", "fanout: buffer: 100 and 200 are both event counts, at Caddyfile:4"},
		{"fanout {\n\t\t\tbuffer 1 2MiB 3m 4\n\t\t}", "fanout: buffer: wrong argument count: want buffer <events> <size> <age> (any of them, in any order), at Caddyfile:4"},
		{"fanout {\n\t\t\tlinger -1s\n\t\t}", "fanout: linger: -1s is negative, at Caddyfile:4"},
		{"fanout {\n\t\t\tclient_queue 0\n\t\t}", "fanout: client_queue: 0 is below the minimum of 1, at Caddyfile:4"},
		{"fanout {\n\t\t\tmax_clients -3\n\t\t}", "fanout: max_clients: -3 is negative, at Caddyfile:4"},
		{"fanout {\n\t\t\tmax_clients_total many\n\t\t}", `fanout: max_clients_total: "many" is not a whole number, at Caddyfile:4`},
		{"fanout {\n\t\t\treset_event \"a\nb\"\n\t\t}", `fanout: reset_event: "a\nb" is not a single line, at Caddyfile:4`},
		{"fanout {\n\t\t\tlinger 5s\n\t\t\tlinger 10s\n\t\t}", "fanout: linger: given twice (first on line 4); give each option once, at Caddyfile:5"},
		{"fanout {\n\t\t\tkeys x\n\t\t}", "fanout: keys: unrecognized fanout option, at Caddyfile:4"},
	} {
		in := ":8080 {\n\tsse {\n\t\t" + tc.block + "\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n"
		_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(in), map[string]any{"filename": "Caddyfile"})
		want := "parsing caddyfile tokens for 'sse': " + tc.want
		if err == nil || err.Error() != want {
			t.Errorf("%q:\n got %v\nwant %s", tc.block, err, want)
		}
	}
}
