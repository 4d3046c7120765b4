package caddysse

import (
	"fmt"
	"strings"
	"time"
)

// The ranges of the configuration, one function per option. Validate (on
// the JSON) and the Caddyfile parser (with the file and line) both call
// them, so `caddy adapt` and `caddy run` cannot disagree about a value.
// Each returns what is wrong with the value, without the option's name:
// the caller puts the name it knows the option by in front.

// Range limits not already named with the defaults.
const (
	minHeartbeat    = time.Second
	minPadding      = 2
	minMaxAge       = time.Second
	maxMaxEventSize = 1 << 30
	maxBufferBytes  = 1 << 30
)

// checkHeartbeat: 0 disables heartbeats; otherwise at least 1s, so that a
// typo such as 100ms does not write ten comments a second to every client.
func checkHeartbeat(d time.Duration) error {
	switch {
	case d < 0:
		return fmt.Errorf("%s is negative", d)
	case d > 0 && d < minHeartbeat:
		return fmt.Errorf("%s is below %s (0 or off disables heartbeats)", d, minHeartbeat)
	}
	return nil
}

// checkCommentLine: the heartbeat comment and the reset event's type are
// written into the stream as one line; a line break would end it early.
func checkCommentLine(s string) error {
	if strings.ContainsAny(s, "\r\n") {
		return fmt.Errorf("%q is not a single line", s)
	}
	return nil
}

// checkPadding: 0 disables padding; one byte cannot hold a comment line
// (':' and its line feed); past 64 KiB it only costs bandwidth.
func checkPadding(n int) error {
	switch {
	case n < 0:
		return fmt.Errorf("%d is negative", n)
	case n > 0 && n < minPadding:
		return fmt.Errorf("%s is below the minimum of %s (0 or off disables padding)", sizeString(n), sizeString(minPadding))
	case n > maxPadding:
		return fmt.Errorf("%s is over the maximum of %s", sizeString(n), sizeString(maxPadding))
	}
	return nil
}

// checkRetry: 0 sends no retry field.
func checkRetry(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("%s is negative", d)
	}
	return nil
}

// checkMaxAge: 0 is no limit; below a second every client would reconnect
// all the time.
func checkMaxAge(d time.Duration) error {
	switch {
	case d < 0:
		return fmt.Errorf("%s is negative", d)
	case d > 0 && d < minMaxAge:
		return fmt.Errorf("%s is below %s (0 or off disables it)", d, minMaxAge)
	}
	return nil
}

// checkMaxEventSize: 0 is the default (1 MiB) in JSON; a limit below 1 KiB
// would cut ordinary events into unbuffered pieces.
func checkMaxEventSize(n int) error {
	switch {
	case n < 0:
		return fmt.Errorf("%d is negative", n)
	case n > 0 && n < minMaxEventSize:
		return fmt.Errorf("%s is below the minimum of %s", sizeString(n), sizeString(minMaxEventSize))
	case n > maxMaxEventSize:
		return fmt.Errorf("%s is over the maximum of %s", sizeString(n), sizeString(maxMaxEventSize))
	}
	return nil
}

// checkCount is the range of the fan-out's counts (buffer_events,
// replay_on_connect, client_queue, max_clients, max_clients_total,
// max_streams), where 0 means the default or no limit.
func checkCount(n int) error {
	if n < 0 {
		return fmt.Errorf("%d is negative", n)
	}
	return nil
}

// checkBufferBytes: 0 is the default (8 MiB).
func checkBufferBytes(n int) error {
	switch {
	case n < 0:
		return fmt.Errorf("%d is negative", n)
	case n > maxBufferBytes:
		return fmt.Errorf("%s is over the maximum of %s", sizeString(n), sizeString(maxBufferBytes))
	}
	return nil
}

// checkNonNegative is the range of buffer_age and linger (0: no age bound,
// close at once).
func checkNonNegative(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("%s is negative", d)
	}
	return nil
}

// checkOneOf checks a keyword option; "" is the default.
func checkOneOf(s string, allowed ...string) error {
	if s == "" {
		return nil
	}
	for _, a := range allowed {
		if s == a {
			return nil
		}
	}
	return fmt.Errorf("%q is not one of %s", s, strings.Join(allowed, ", "))
}

// The keywords of the fan-out's ids and on_unknown_id.
var (
	idsModes     = []string{"auto", "upstream", "synthesize"}
	unknownModes = []string{"reset", "backend"}
	onEndModes   = []string{"auto", "end", "reconnect"}
)

// validate checks every fan-out option, naming it by its JSON name.
func (f *Fanout) validate() error {
	linger := time.Duration(0)
	if f.Linger != nil {
		linger = time.Duration(*f.Linger)
	}
	return firstError(
		named("fanout: buffer_events", checkCount(f.BufferEvents)),
		named("fanout: buffer_bytes", checkBufferBytes(f.BufferBytes)),
		named("fanout: buffer_age", checkNonNegative(time.Duration(f.BufferAge))),
		named("fanout: linger", checkNonNegative(linger)),
		named("fanout: ids", checkOneOf(f.IDs, idsModes...)),
		named("fanout: replay_on_connect", checkCount(f.ReplayOnConnect)),
		named("fanout: on_unknown_id", checkOneOf(f.OnUnknownID, unknownModes...)),
		named("fanout: on_end", checkOneOf(f.OnEnd, onEndModes...)),
		named("fanout: reset_event", checkCommentLine(f.ResetEvent)),
		named("fanout: client_queue", checkCount(f.ClientQueue)),
		named("fanout: max_clients", checkCount(f.MaxClients)),
		named("fanout: max_clients_total", checkCount(f.MaxClientsTotal)),
		named("fanout: max_streams", checkCount(f.MaxStreams)),
	)
}

// firstError returns the first error that is not nil, so that a config
// with several mistakes gets one message at a time, as the Caddyfile does.
func firstError(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// named puts an option's name in front of what is wrong with it.
func named(name string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", name, err)
}

// sizeString writes a byte size exactly, in the unit it is a whole
// multiple of, so that a limit and a value just past it never look equal.
func sizeString(n int) string {
	switch {
	case n != 0 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n != 0 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n != 0 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	case n == 1:
		return "1 byte"
	}
	return fmt.Sprintf("%d bytes", n)
}
