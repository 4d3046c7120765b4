package caddysse

import (
	"fmt"
	"math"
	"strconv"
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
//		compress       <encoding>...|off   (zstd, gzip; default: zstd gzip)
//		fanout {
//			key               <template>
//			buffer            <events> <size> <age>   (any of them, any order)
//			linger            <duration>|off
//			ids               auto|upstream|synthesize
//			replay_on_connect <events>
//			on_unknown_id     reset|backend
//			reset_event       <event type>
//			client_queue      <events>
//			max_clients       <clients>
//			max_clients_total <clients>
//			any_accept
//		}
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
		case "compress":
			if h.Compress = d.RemainingArgs(); len(h.Compress) == 0 {
				return d.ArgErr()
			}
			if _, cerr := compressionPrefs(h.Compress); cerr != nil {
				return d.Err(cerr.Error()) // names the option already
			}
		case "fanout":
			h.Fanout = new(Fanout)
			if d.NextArg() {
				return d.ArgErr()
			}
			err = h.Fanout.unmarshalCaddyfile(d)
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

func (f *Fanout) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		args := d.RemainingArgs()
		one := func() (string, error) {
			if len(args) != 1 {
				return "", d.ArgErr()
			}
			return args[0], nil
		}
		var err error
		var val string
		switch opt {
		case "key":
			f.Key, err = one()
		case "buffer":
			if len(args) == 0 || len(args) > 3 {
				return d.ArgErr()
			}
			for _, a := range args {
				if err = f.parseBufferBound(a); err != nil {
					break
				}
			}
		case "linger":
			if val, err = one(); err == nil {
				var dur caddy.Duration
				if dur, err = parseDurationOrOff(val); err == nil {
					f.Linger = &dur
				}
			}
		case "ids":
			f.IDs, err = one()
		case "on_unknown_id":
			f.OnUnknownID, err = one()
		case "reset_event":
			f.ResetEvent, err = one()
		case "replay_on_connect":
			f.ReplayOnConnect, err = oneInt(one)
		case "client_queue":
			f.ClientQueue, err = oneInt(one)
		case "max_clients":
			f.MaxClients, err = oneInt(one)
		case "max_clients_total":
			f.MaxClientsTotal, err = oneInt(one)
		case "any_accept": // a flag
			if len(args) != 0 {
				return d.ArgErr()
			}
			f.AnyAccept = true
		default:
			return d.Errf("unrecognized fanout option '%s'", opt)
		}
		if err != nil {
			return d.Errf("fanout: %s: %v", opt, err)
		}
	}
	return f.validate()
}

// parseBufferBound reads one bound of the replay cache: a plain number is
// a count of events, a duration (10m) an age, a size with a unit (8MiB) a
// byte size.
func (f *Fanout) parseBufferBound(a string) error {
	if n, err := strconv.Atoi(a); err == nil {
		if n < 0 {
			return fmt.Errorf("negative event count %d", n)
		}
		f.BufferEvents = n
		return nil
	}
	if dur, err := caddy.ParseDuration(a); err == nil {
		if dur < 0 {
			return fmt.Errorf("negative age %s", a)
		}
		f.BufferAge = caddy.Duration(dur)
		return nil
	}
	size, err := humanize.ParseBytes(a)
	if err != nil || size > math.MaxInt32 {
		return fmt.Errorf("%q is neither an event count (1000), a size (8MiB) nor an age (10m)", a)
	}
	f.BufferBytes = int(size)
	return nil
}

func oneInt(one func() (string, error)) (int, error) {
	val, err := one()
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(val)
	if err == nil && n < 0 {
		err = fmt.Errorf("negative number %d", n)
	}
	return n, err
}
