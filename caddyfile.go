package caddysse

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
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
//		write_timeout  <duration>|off    (off: no bound; -1 in JSON)
//		max_event_size <size>           (1KiB to 1GiB)
//		compress       <encoding>...|off   (zstd, gzip; default: zstd gzip)
//		fanout {
//			key               <template>
//			buffer            <events> <size> <age>   (any of them, any order)
//			linger            <duration>|off
//			ids               auto|upstream|synthesize
//			replay_on_connect <events>
//			on_unknown_id     reset|backend
//			on_end            auto|end|reconnect
//			reset_event       <event type>
//			client_queue      <events>
//			max_clients       <clients>
//			max_clients_total <clients>
//			max_streams       <streams>
//			any_accept
//		}
//	}
//
// Every value is checked here, with the file and line, by the same range
// functions Validate uses (limits.go); an option may be given once.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("sse: unexpected argument '%s' (options go in a block)", d.Val())
	}
	seen := make(map[string]int)
	for d.NextBlock(0) {
		opt := d.Val()
		if err := once(d, seen, ""); err != nil {
			return err
		}
		if opt == "fanout" {
			if d.NextArg() {
				return d.Errf("fanout: unexpected argument '%s' (options go in a block)", d.Val())
			}
			h.Fanout = new(Fanout)
			if err := h.Fanout.unmarshalCaddyfile(d); err != nil {
				return err // located at the fan-out option at fault
			}
			continue
		}
		if err := h.unmarshalOption(opt, d.RemainingArgs()); err != nil {
			return d.Errf("%s: %v", opt, err)
		}
	}
	return nil
}

// handlerUsage is each option's syntax, for the message about a wrong
// number of arguments.
var handlerUsage = map[string]string{
	"heartbeat":      "<interval>|off [<comment text>]",
	"padding":        "<size>|off",
	"retry":          "<duration>|off",
	"max_age":        "<duration>|off",
	"write_timeout":  "<duration>|off",
	"max_event_size": "<size>",
	"compress":       "<encodings...>|off",
}

// unmarshalOption sets one option of the sse block from its arguments.
// Its errors name neither the option nor the line: the caller adds both.
func (h *Handler) unmarshalOption(opt string, args []string) error {
	usage, known := handlerUsage[opt]
	if !known {
		return errors.New("unrecognized sse option")
	}
	maxArgs := map[string]int{"heartbeat": 2, "compress": math.MaxInt}[opt]
	if len(args) == 0 || len(args) > max(maxArgs, 1) {
		return fmt.Errorf("wrong argument count: want %s %s", opt, usage)
	}
	switch opt {
	case "heartbeat":
		dur, err := parseDurationOrOff(args[0])
		if err == nil {
			err = checkHeartbeat(dur)
		}
		if err != nil {
			return err
		}
		h.Heartbeat = (*caddy.Duration)(&dur)
		if len(args) == 2 {
			if err := checkCommentLine(args[1]); err != nil {
				return fmt.Errorf("comment %w", err)
			}
			h.HeartbeatComment = args[1]
		}
	case "padding":
		size := 0
		if args[0] != "off" {
			var err error
			if size, err = parseSize(args[0]); err != nil {
				return err
			}
		}
		if err := checkPadding(size); err != nil {
			return err
		}
		h.Padding = &size
	case "retry", "max_age", "write_timeout":
		dur, err := parseDurationOrOff(args[0])
		if err != nil {
			return err
		}
		switch opt {
		case "retry":
			err = checkRetry(dur)
			h.Retry = caddy.Duration(dur)
		case "max_age":
			err = checkMaxAge(dur)
			h.MaxAge = caddy.Duration(dur)
		case "write_timeout":
			if dur < 0 {
				return fmt.Errorf("%s is negative (off means no bound)", dur)
			}
			// 0 would be the default in JSON: off is written as -1 there.
			h.WriteTimeout = caddy.Duration(cmp.Or(dur, -1))
		}
		return err
	case "max_event_size":
		if args[0] == "off" {
			return fmt.Errorf("cannot be off: give a size of at least %s", sizeString(minMaxEventSize))
		}
		size, err := parseSize(args[0])
		if err == nil && size == 0 { // 0 would be the default in JSON
			err = fmt.Errorf("%s is below the minimum of %s", args[0], sizeString(minMaxEventSize))
		}
		if err == nil {
			err = checkMaxEventSize(size)
		}
		h.MaxEventSize = size
		return err
	case "compress":
		if _, err := compressionPrefs(args); err != nil {
			// compressionPrefs names the option itself, for Validate.
			return errors.New(strings.TrimPrefix(err.Error(), "compress: "))
		}
		h.Compress = args
	}
	return nil
}

// once rejects an option given a second time in the same block, rather
// than letting the last one win unnoticed.
func once(d *caddyfile.Dispenser, seen map[string]int, prefix string) error {
	opt := d.Val()
	if line, ok := seen[opt]; ok {
		return d.Errf("%s%s: given twice (first on line %d); give each option once", prefix, opt, line)
	}
	seen[opt] = d.Line()
	return nil
}

// parseDurationOrOff reads a duration such as 500ms, 30s, 1h or 2d; off
// (and 0) is 0. Negative values are returned for the range check to name.
func parseDurationOrOff(s string) (time.Duration, error) {
	if s == "off" {
		return 0, nil
	}
	dur, err := caddy.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration (such as 500ms, 30s or 1h)", s)
	}
	return dur, nil
}

// parseSize reads a size such as 2048, 2KiB or 1MiB. A negative one is an
// error of its own: humanize cannot parse it, and its message would be
// about strconv.ParseFloat.
func parseSize(s string) (int, error) {
	if rest, neg := strings.CutPrefix(s, "-"); neg {
		if _, err := humanize.ParseBytes(rest); err == nil {
			return 0, fmt.Errorf("%s is negative", s)
		}
	}
	size, err := humanize.ParseBytes(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a size (such as 2048, 2KiB or 1MiB)", s)
	}
	return int(min(size, math.MaxInt)), nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)

// fanoutUsage is each fan-out option's syntax.
var fanoutUsage = map[string]string{
	"key":               "<template>",
	"buffer":            "<events> <size> <age> (any of them, in any order)",
	"linger":            "<duration>|off",
	"ids":               strings.Join(idsModes, "|"),
	"replay_on_connect": "<events>",
	"on_unknown_id":     strings.Join(unknownModes, "|"),
	"on_end":            strings.Join(onEndModes, "|"),
	"reset_event":       "<event type>",
	"client_queue":      "<events>",
	"max_clients":       "<clients>",
	"max_clients_total": "<clients>",
	"max_streams":       "<streams>",
	"any_accept":        "(a flag, no arguments)",
	"cluster":           "redis { address <url>; prefix <prefix>; lease_ttl <duration> } (a block)",
}

// clusterUsage is each option's syntax in a cluster redis block.
var clusterUsage = map[string]string{
	"address":     "<redis://host:port/db URL>",
	"addresses":   "<host:port>... (Sentinels with master_name, else Redis Cluster nodes)",
	"master_name": "<name>",
	"username":    "<user>",
	"password":    "<password>",
	"prefix":      "<key prefix>",
	"lease_ttl":   "<duration>",
}

// unmarshalCaddyfile reads the fanout block; its errors carry the line
// of the option at fault.
func (f *Fanout) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	seen := make(map[string]int)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if err := once(d, seen, "fanout: "); err != nil {
			return err
		}
		if opt == "cluster" {
			if err := f.unmarshalCluster(d); err != nil {
				return err
			}
			continue
		}
		if err := f.unmarshalOption(opt, d.RemainingArgs()); err != nil {
			return d.Errf("fanout: %s: %v", opt, err)
		}
	}
	return nil
}

// unmarshalOption sets one fan-out option from its arguments.
func (f *Fanout) unmarshalOption(opt string, args []string) error {
	usage, known := fanoutUsage[opt]
	if !known {
		return errors.New("unrecognized fanout option")
	}
	if opt == "any_accept" {
		if len(args) != 0 {
			return fmt.Errorf("wrong argument count: want any_accept %s", usage)
		}
		f.AnyAccept = true
		return nil
	}
	maxArgs := map[string]int{"buffer": 3}[opt]
	if len(args) == 0 || len(args) > max(maxArgs, 1) {
		return fmt.Errorf("wrong argument count: want %s %s", opt, usage)
	}
	val := args[0]
	var err error
	switch opt {
	case "key":
		f.Key = val
	case "buffer":
		return f.parseBuffer(args)
	case "linger":
		var dur time.Duration
		if dur, err = parseDurationOrOff(val); err == nil {
			err = checkNonNegative(dur)
		}
		f.Linger = (*caddy.Duration)(&dur)
	case "ids":
		f.IDs, err = val, checkOneOf(val, idsModes...)
	case "on_unknown_id":
		f.OnUnknownID, err = val, checkOneOf(val, unknownModes...)
	case "on_end":
		f.OnEnd, err = val, checkOneOf(val, onEndModes...)
	case "reset_event":
		f.ResetEvent, err = val, checkCommentLine(val)
	case "replay_on_connect":
		f.ReplayOnConnect, err = parseCount(val, 0)
	case "client_queue":
		f.ClientQueue, err = parseCount(val, 1) // 0 would be the default in JSON
	case "max_clients":
		f.MaxClients, err = parseCount(val, 0)
	case "max_clients_total":
		f.MaxClientsTotal, err = parseCount(val, 0)
	case "max_streams":
		f.MaxStreams, err = parseCount(val, 1) // 0 would be the default in JSON
	}
	return err
}

// parseBuffer reads the bounds of the replay cache: a plain number is a
// count of events, a duration (10m) an age, a size with a unit (8MiB) a
// byte size; each kind at most once.
func (f *Fanout) parseBuffer(args []string) error {
	var kinds [3]string // the argument that set events, bytes, age
	for _, a := range args {
		kind, err := f.parseBufferBound(a)
		if err != nil {
			return err
		}
		if kinds[kind] != "" {
			return fmt.Errorf("%s and %s are both %s", kinds[kind], a, bufferKinds[kind])
		}
		kinds[kind] = a
	}
	return nil
}

var bufferKinds = [3]string{"event counts", "sizes", "ages"}

// parseBufferBound reads one bound and says which kind it is.
func (f *Fanout) parseBufferBound(a string) (kind int, err error) {
	if rest, neg := strings.CutPrefix(a, "-"); neg {
		if kind, err := new(Fanout).parseBufferBound(rest); err == nil {
			return kind, fmt.Errorf("%s is negative", a)
		}
	}
	if n, err := strconv.Atoi(a); err == nil {
		if n == 0 { // 0 would be the default in JSON
			return 0, errors.New("0 events: the cache holds at least 1")
		}
		f.BufferEvents = n
		return 0, checkCount(n)
	}
	if dur, err := caddy.ParseDuration(a); err == nil {
		f.BufferAge = caddy.Duration(dur)
		return 2, checkNonNegative(dur)
	}
	size, err := parseSize(a)
	switch {
	case err != nil:
		return 1, fmt.Errorf("%q is neither an event count (1000), a size (8MiB) nor an age (10m)", a)
	case size == 0: // 0 would be the default in JSON
		return 1, fmt.Errorf("%s: the cache holds at least 1 byte", a)
	}
	f.BufferBytes = size
	return 1, checkBufferBytes(size)
}

// parseCount reads a whole number of at least lowest.
func parseCount(s string, lowest int) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a whole number", s)
	}
	if n >= 0 && n < lowest {
		return n, fmt.Errorf("%d is below the minimum of %d", n, lowest)
	}
	return n, checkCount(n)
}

// unmarshalCluster reads `cluster redis { ... }` into the broker: the Redis
// broker module (broker_redis.go), with the same range checks as its
// Provision.
func (f *Fanout) unmarshalCluster(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) != 1 || args[0] != "redis" {
		return d.Errf("fanout: cluster: want cluster %s", fanoutUsage["cluster"])
	}
	b := new(RedisBroker)
	file, line := d.File(), d.Line()
	// What is wrong with the block as a whole is the cluster line's fault.
	blockErr := func(msg string) error { return fmt.Errorf("fanout: cluster: %s, at %s:%d", msg, file, line) }
	seen := make(map[string]int)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if err := once(d, seen, "fanout: cluster: "); err != nil {
			return err
		}
		if err := b.unmarshalOption(opt, d.RemainingArgs()); err != nil {
			return d.Errf("fanout: cluster: %s: %v", opt, err)
		}
	}
	if b.Address == "" && len(b.Addresses) == 0 {
		return blockErr("address (or addresses) is required")
	}
	if b.Address != "" && len(b.Addresses) > 0 {
		return blockErr("address and addresses are exclusive")
	}
	if b.MasterName != "" && len(b.Addresses) == 0 {
		return blockErr("master_name needs addresses (the Sentinels)")
	}
	f.BrokerRaw = caddyconfig.JSONModuleObject(b, "name", "redis", nil)
	return nil
}

// unmarshalOption sets one option of a cluster redis block.
func (b *RedisBroker) unmarshalOption(opt string, args []string) error {
	usage, known := clusterUsage[opt]
	if !known {
		return errors.New("unrecognized cluster redis option")
	}
	if len(args) == 0 || (len(args) > 1 && opt != "addresses") {
		return fmt.Errorf("wrong argument count: want %s %s", opt, usage)
	}
	val := args[0]
	switch opt {
	case "address":
		b.Address = val
		if !strings.HasPrefix(val, "redis://") && !strings.HasPrefix(val, "rediss://") && !strings.HasPrefix(val, "unix://") {
			return fmt.Errorf("%q: want a redis:// or rediss:// URL", val)
		}
	case "addresses":
		b.Addresses = args
	case "master_name":
		b.MasterName = val
	case "username":
		b.Username = val
	case "password":
		b.Password = val
	case "prefix":
		b.Prefix = val
	case "lease_ttl":
		dur, err := caddy.ParseDuration(val)
		if err != nil {
			return fmt.Errorf("%q is not a duration (such as 6s)", val)
		}
		b.LeaseTTL = caddy.Duration(dur)
		return checkLeaseTTL(dur)
	}
	return nil
}
