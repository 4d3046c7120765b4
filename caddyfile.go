package caddysse

import (
	"fmt"
	"math"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("sse", parseCaddyfile)
	// After encode, so that encode (if any) wraps our output, and before
	// the handlers that respond, whose responses we wrap: users never need
	// an `order` line.
	httpcaddyfile.RegisterDirectiveOrder("sse", httpcaddyfile.After, "encode")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	sse [<matcher>] {
//		heartbeat      <interval>|off [<comment text>]
//		padding        <size>|off
//		retry          <duration>|off
//		max_age        <duration>|off
//		write_timeout  <duration>
//		max_event_size <size>
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		var err error
		opt := d.Val()
		switch opt {
		case "heartbeat":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.ArgErr()
			}
			var dur caddy.Duration
			if dur, err = parseDurationOrOff(args[0]); err == nil {
				h.Heartbeat = &dur
			}
			if len(args) == 2 {
				h.HeartbeatComment = args[1]
			}
		case "padding":
			var size int
			if size, err = parseSizeOrOff(d, maxPadding); err == nil {
				h.Padding = &size
			}
		case "retry":
			h.Retry, err = singleDurationOrOff(d)
		case "max_age":
			h.MaxAge, err = singleDurationOrOff(d)
		case "write_timeout":
			h.WriteTimeout, err = singleDurationOrOff(d)
		case "max_event_size":
			h.MaxEventSize, err = parseSizeOrOff(d, math.MaxInt32)
		default:
			return d.Errf("unrecognized sse option '%s'", opt)
		}
		if err != nil {
			return d.Errf("%s: %v", opt, err)
		}
	}
	return nil
}

func singleDurationOrOff(d *caddyfile.Dispenser) (caddy.Duration, error) {
	if !d.NextArg() {
		return 0, d.ArgErr()
	}
	val := d.Val()
	if d.NextArg() {
		return 0, d.ArgErr()
	}
	return parseDurationOrOff(val)
}

func parseDurationOrOff(s string) (caddy.Duration, error) {
	if s == "off" {
		return 0, nil
	}
	dur, err := caddy.ParseDuration(s)
	if err != nil {
		return 0, err
	}
	if dur < 0 {
		return 0, fmt.Errorf("negative duration %s", time.Duration(dur))
	}
	return caddy.Duration(dur), nil
}

// parseSizeOrOff reads one size argument such as 2KiB, 2048 or off (0).
func parseSizeOrOff(d *caddyfile.Dispenser, max uint64) (int, error) {
	if !d.NextArg() {
		return 0, d.ArgErr()
	}
	val := d.Val()
	if d.NextArg() {
		return 0, d.ArgErr()
	}
	if val == "off" {
		return 0, nil
	}
	size, err := humanize.ParseBytes(val)
	if err != nil {
		return 0, err
	}
	if size > max {
		return 0, fmt.Errorf("%s is over the maximum of %s", val, humanize.IBytes(max))
	}
	return int(size), nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
