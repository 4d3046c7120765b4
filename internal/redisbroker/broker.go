package redisbroker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

var (
	// ErrHistoryLost means the position's epoch is gone or the entries after
	// it were trimmed, expired or lost: the reader cannot get a gapless stream.
	ErrHistoryLost = errors.New("redisbroker: history lost")
	// ErrNotLeader means the lease token is not (or no longer) the holder's:
	// nothing was written.
	ErrNotLeader = errors.New("redisbroker: not the lease holder")
)

// Position is a place in a stream: offsets are gapless within an epoch.
type Position struct {
	Epoch  string
	Offset uint64
}

// Event is what a leader appends.
type Event struct {
	ID   string // the id clients see; "" for none
	Data []byte // the serialized event
}

// Entry is an event read back from the log.
type Entry struct {
	Pos  Position
	ID   string
	Data []byte
	Time time.Time // when it was appended (the appender's clock, ms)
}

// Options configure a Broker; zero fields take the defaults below.
type Options struct {
	Prefix    string        // key prefix; default "sse:"
	MaxEvents int           // log bound in events; 0: none
	MaxBytes  int           // log bound in data bytes; 0: none
	MaxAge    time.Duration // entries older than this are not replayed; 0: none
	KeyTTL    time.Duration // expiry of an idle stream's keys; default 10 min
	LeaseTTL  time.Duration // lease lifetime; default 6 s, renewed every TTL/3
	// PingEvery is how long a Subscriber's connection may be silent before
	// it is pinged; silent for 3 x PingEvery it is replaced. Default 1 s.
	PingEvery time.Duration

	// Now is the clock stamped on entries and used for the age bound; tests
	// replace it. Default time.Now.
	Now func() time.Time
}

// Broker reaches the streams of one Redis deployment.
type Broker struct {
	client redis.UniversalClient
	opts   Options
}

// New returns a Broker on client (a *redis.Client, sentinel failover client
// or *redis.ClusterClient). The caller owns client.
func New(client redis.UniversalClient, opts Options) *Broker {
	if opts.Prefix == "" {
		opts.Prefix = "sse:"
	}
	if opts.KeyTTL <= 0 {
		opts.KeyTTL = 10 * time.Minute
	}
	if opts.LeaseTTL <= 0 {
		opts.LeaseTTL = 6 * time.Second
	}
	if opts.PingEvery <= 0 {
		opts.PingEvery = time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Broker{client: client, opts: opts}
}

// NewClient parses a redis:// or rediss:// URL and returns a client whose
// calls fail within about two seconds when Redis is unreachable, instead of
// hanging, and which never retries a command on its own (see the package doc:
// a retried append could be applied twice). Timeouts given in the URL
// (dial_timeout, read_timeout, ...) win.
func NewClient(url string) (*redis.Client, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, err
	}
	q := ""
	if i := strings.IndexByte(url, '?'); i >= 0 {
		q = url[i:]
	}
	set := func(name string, d *time.Duration) {
		if !strings.Contains(q, name+"=") {
			*d = time.Second
		}
	}
	set("dial_timeout", &opt.DialTimeout)
	set("read_timeout", &opt.ReadTimeout)
	set("write_timeout", &opt.WriteTimeout)
	set("pool_timeout", &opt.PoolTimeout)
	if !strings.Contains(q, "max_retries=") {
		opt.MaxRetries = -1
	}
	// go-redis dials 5 times by default: 5 x DialTimeout against a
	// blackholed address.
	opt.DialerRetries = 2
	// Without it go-redis ignores the caller's context deadline on reads.
	opt.ContextTimeoutEnabled = true
	return redis.NewClient(opt), nil
}

// NewUniversalClient returns a client for sentinel (MasterName set), cluster
// (several Addrs) or one server, with the same defaults as NewClient for the
// fields left zero: 1 s dial/read/write/pool timeouts, no command retries,
// two dial attempts, and context deadlines honoured.
func NewUniversalClient(o *redis.UniversalOptions) redis.UniversalClient {
	c := *o
	for _, d := range []*time.Duration{&c.DialTimeout, &c.ReadTimeout, &c.WriteTimeout, &c.PoolTimeout} {
		if *d == 0 {
			*d = time.Second
		}
	}
	if c.MaxRetries == 0 {
		c.MaxRetries = -1
	}
	if c.DialerRetries == 0 {
		c.DialerRetries = 2
	}
	c.ContextTimeoutEnabled = true
	return redis.NewUniversalClient(&c)
}

// Stream is one key's shared state. It is cheap: make one per hub.
type Stream struct {
	b                                     *Broker
	key                                   string
	meta, log, ids, lease, fence, channel string
	resp                                  string
}

// Stream returns the handle of key.
func (b *Broker) Stream(key string) *Stream {
	tag := key
	if tag == "" {
		// "{}" is no hash tag: Redis Cluster would hash each full key name
		// and scatter this stream's keys over slots, failing every script.
		tag = "\x00"
	}
	base := b.opts.Prefix + "{" + tag + "}:"
	return &Stream{
		b: b, key: key,
		meta: base + "meta", log: base + "log", ids: base + "ids",
		lease: base + "lease", fence: base + "fence", channel: base + "notify",
		resp: base + "resp",
	}
}

// Key returns the stream key this handle was made for.
func (s *Stream) Key() string { return s.key }

// Channel returns the Pub/Sub channel the append script publishes on.
func (s *Stream) Channel() string { return s.channel }

func randomToken() string {
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b[:])
}

func ms(d time.Duration) int64 { return d.Milliseconds() }

// appendScript is the fenced append; see the package doc for the rules.
// KEYS: meta log ids lease. ARGV: token candidateEpoch ttlMs maxEvents
// maxBytes nowMs channel, then id,data pairs.
var appendScript = redis.NewScript(`
local meta, log, ids = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return {'notleader'} end
local function field(e, name)
  local f = e[2]
  for j = 1, #f, 2 do if f[j] == name then return f[j+1] end end
  return nil
end
local ep = redis.call('HGET', meta, 'epoch')
local head, bytes = 0, 0
local fresh = not ep
if ep then
  head = tonumber(redis.call('HGET', meta, 'head')) or 0
  bytes = tonumber(redis.call('HGET', meta, 'bytes')) or 0
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if #last == 0 then
    -- the log is empty or lost: offsets go on from head in this epoch, and
    -- an id index without a log points nowhere
    bytes = 0
    redis.call('DEL', ids)
  elseif field(last[1], 'e') ~= ep then
    -- a log left over from an epoch whose meta was lost: it is dead
    bytes = 0
    redis.call('DEL', log, ids)
  elseif tonumber(string.match(last[1][1], '^(%d+)-')) > head then
    -- the log is ahead of meta: numbering cannot be trusted, start over
    fresh = true
  end
end
if fresh then
  ep = ARGV[2]
  head, bytes = 0, 0
  redis.call('DEL', log, ids)
  redis.call('HSET', meta, 'epoch', ep)
end
local now = ARGV[6]
for i = 8, #ARGV, 2 do
  head = head + 1
  local off = string.format('%d', head)
  local id, data = ARGV[i], ARGV[i+1]
  redis.call('XADD', log, off .. '-0', 'e', ep, 'i', id, 'd', data, 't', now)
  bytes = bytes + #data
  if id ~= '' then redis.call('HSET', ids, id, off) end
end
local maxE, maxB = tonumber(ARGV[4]), tonumber(ARGV[5])
local count = redis.call('XLEN', log)
local function over()
  return count > 1 and ((maxE > 0 and count > maxE) or (maxB > 0 and bytes > maxB))
end
while over() do
  local chunk = 16
  if maxE > 0 and count - maxE > chunk then chunk = math.min(count - maxE, 1024) end
  local old = redis.call('XRANGE', log, '-', '+', 'COUNT', chunk)
  local cut = nil
  for _, e in ipairs(old) do
    if not over() then break end
    local off = string.match(e[1], '^(%d+)-')
    local id = field(e, 'i')
    if id and id ~= '' and redis.call('HGET', ids, id) == off then redis.call('HDEL', ids, id) end
    bytes = bytes - #(field(e, 'd') or '')
    count = count - 1
    cut = off
  end
  if not cut then break end
  redis.call('XTRIM', log, 'MINID', string.format('%d', tonumber(cut) + 1) .. '-0')
end
local h = string.format('%d', head)
redis.call('HSET', meta, 'head', h, 'bytes', string.format('%d', bytes))
redis.call('PEXPIRE', meta, ARGV[3])
redis.call('PEXPIRE', log, ARGV[3])
redis.call('PEXPIRE', ids, ARGV[3])
redis.call('PUBLISH', ARGV[7], ep .. ':' .. h)
return {'ok', ep, h}
`)

// Append writes events after the current head if lease is still the holder's,
// in one round trip, and returns the position of each event. A stale lease
// gets ErrNotLeader and nothing is written.
func (s *Stream) Append(ctx context.Context, lease Lease, events ...Event) ([]Position, error) {
	if len(events) == 0 {
		return nil, nil
	}
	o := &s.b.opts
	args := make([]any, 0, 7+2*len(events))
	args = append(args, lease.value, randomToken(), ms(o.KeyTTL), o.MaxEvents, o.MaxBytes,
		o.Now().UnixMilli(), s.channel)
	for _, ev := range events {
		args = append(args, ev.ID, ev.Data)
	}
	res, err := appendScript.Run(ctx, s.b.client, []string{s.meta, s.log, s.ids, s.lease}, args...).Slice()
	if err != nil {
		return nil, fmt.Errorf("redisbroker: append %q: %w", s.key, err)
	}
	if len(res) == 0 {
		return nil, fmt.Errorf("redisbroker: append %q: empty reply", s.key)
	}
	if res[0] == "notleader" {
		return nil, ErrNotLeader
	}
	if len(res) != 3 {
		return nil, fmt.Errorf("redisbroker: append %q: bad reply %v", s.key, res)
	}
	ep, _ := res[1].(string)
	head, err := parseUint(res[2])
	if err != nil {
		return nil, fmt.Errorf("redisbroker: append %q: %w", s.key, err)
	}
	pos := make([]Position, len(events))
	first := head - uint64(len(events)) + 1
	for i := range pos {
		pos[i] = Position{Epoch: ep, Offset: first + uint64(i)}
	}
	return pos, nil
}

// headScript returns the epoch and head, creating the epoch if absent.
// KEYS: meta. ARGV: candidateEpoch ttlMs.
var headScript = redis.NewScript(`
local ep = redis.call('HGET', KEYS[1], 'epoch')
if not ep then
  ep = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', ep, 'head', '0', 'bytes', '0')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {ep, redis.call('HGET', KEYS[1], 'head') or '0'}
`)

// Head returns the position of the newest event (offset 0 if none yet),
// creating the stream's epoch if it has none.
func (s *Stream) Head(ctx context.Context) (Position, error) {
	res, err := headScript.Run(ctx, s.b.client, []string{s.meta}, randomToken(), ms(s.b.opts.KeyTTL)).Slice()
	if err != nil {
		return Position{}, fmt.Errorf("redisbroker: head %q: %w", s.key, err)
	}
	if len(res) != 2 {
		return Position{}, fmt.Errorf("redisbroker: head %q: bad reply %v", s.key, res)
	}
	ep, _ := res[0].(string)
	head, err := parseUint(res[1])
	if err != nil {
		return Position{}, fmt.Errorf("redisbroker: head %q: %w", s.key, err)
	}
	return Position{Epoch: ep, Offset: head}, nil
}

// Range returns up to max entries after position after, oldest first, in one
// round trip. It returns ErrHistoryLost when after's epoch is not the
// stream's or the entry following after is gone (trimmed, older than MaxAge,
// expired, lost). An empty result means after is the head.
//
// A zero Position (empty epoch) reads from the oldest entry held in the
// current epoch, skipping entries older than MaxAge: what a joining node
// loads as backlog. It never returns ErrHistoryLost.
func (s *Stream) Range(ctx context.Context, after Position, max int) ([]Entry, error) {
	if max <= 0 {
		max = 100
	}
	fromOldest := after.Epoch == ""
	start := "-"
	if !fromOldest {
		start = strconv.FormatUint(after.Offset+1, 10) + "-0"
	}
	// MULTI/EXEC rather than a script: the same single round trip and
	// atomic view of meta and log, at half the cost of a Lua script that
	// returns 100 entries (BenchmarkRange100), and a replica can serve it.
	pipe := s.b.client.TxPipeline()
	meta := pipe.HMGet(ctx, s.meta, "epoch", "head")
	xr := pipe.Do(ctx, "XRANGE", s.log, start, "+", "COUNT", max)
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, fmt.Errorf("redisbroker: range %q: %w", s.key, err)
	}
	mv := meta.Val()
	ep, _ := mv[0].(string) // nil when the stream has no epoch
	var head uint64
	if mv[1] != nil {
		var err error
		if head, err = parseUint(mv[1]); err != nil {
			return nil, fmt.Errorf("redisbroker: range %q: %w", s.key, err)
		}
	}
	raw, _ := xr.Val().([]any)
	if fromOldest {
		if ep == "" {
			return nil, nil
		}
	} else {
		if ep != after.Epoch || after.Offset > head {
			return nil, ErrHistoryLost
		}
		if after.Offset == head {
			return nil, nil
		}
	}
	out := make([]Entry, 0, len(raw))
	var oldest time.Time
	if s.b.opts.MaxAge > 0 {
		oldest = s.b.opts.Now().Add(-s.b.opts.MaxAge)
	}
	for _, r := range raw {
		e, err := parseEntry(r)
		if err != nil {
			return nil, fmt.Errorf("redisbroker: range %q: %w", s.key, err)
		}
		if e.Pos.Epoch != ep {
			// a log left from a lost epoch: none of it belongs to ep
			break
		}
		// The newest entry always stays, as in the in-memory buffer.
		tooOld := !oldest.IsZero() && e.Time.Before(oldest) && e.Pos.Offset != head
		if fromOldest {
			if tooOld {
				continue
			}
		} else if len(out) == 0 && (e.Pos.Offset != after.Offset+1 || tooOld) {
			return nil, ErrHistoryLost
		}
		out = append(out, e)
	}
	if !fromOldest && len(out) == 0 {
		// after < head, yet nothing follows it
		return nil, ErrHistoryLost
	}
	return out, nil
}

// findScript returns the epoch and the offset of id (false if unknown).
var findScript = redis.NewScript(`
return {redis.call('HGET', KEYS[1], 'epoch'), redis.call('HGET', KEYS[2], ARGV[1])}
`)

// Find returns the position of the newest held event with this id; ok is
// false if the id is not in the index (never seen, or trimmed with the log).
// The position may still be older than MaxAge: Range then says so.
func (s *Stream) Find(ctx context.Context, id string) (pos Position, ok bool, err error) {
	res, err := findScript.Run(ctx, s.b.client, []string{s.meta, s.ids}, id).Slice()
	if err != nil {
		return Position{}, false, fmt.Errorf("redisbroker: find %q: %w", s.key, err)
	}
	if len(res) != 2 || res[0] == nil || res[1] == nil {
		return Position{}, false, nil
	}
	ep, _ := res[0].(string)
	off, err := parseUint(res[1])
	if err != nil {
		return Position{}, false, fmt.Errorf("redisbroker: find %q: %w", s.key, err)
	}
	return Position{Epoch: ep, Offset: off}, true, nil
}

func parseUint(v any) (uint64, error) {
	switch x := v.(type) {
	case string:
		return strconv.ParseUint(x, 10, 64)
	case int64:
		return uint64(x), nil
	}
	return 0, fmt.Errorf("unexpected %T %v", v, v)
}

// parseEntry reads one XRANGE item: [id, [field, value, ...]].
func parseEntry(r any) (Entry, error) {
	item, ok := r.([]any)
	if !ok || len(item) != 2 {
		return Entry{}, fmt.Errorf("bad entry %v", r)
	}
	sid, _ := item[0].(string)
	off, err := strconv.ParseUint(strings.TrimSuffix(sid, "-0"), 10, 64)
	if err != nil {
		return Entry{}, fmt.Errorf("bad entry id %q", sid)
	}
	fields, _ := item[1].([]any)
	e := Entry{Pos: Position{Offset: off}}
	for i := 0; i+1 < len(fields); i += 2 {
		name, _ := fields[i].(string)
		val, _ := fields[i+1].(string)
		switch name {
		case "e":
			e.Pos.Epoch = val
		case "i":
			e.ID = val
		case "d":
			e.Data = []byte(val)
		case "t":
			if t, err := strconv.ParseInt(val, 10, 64); err == nil {
				e.Time = time.UnixMilli(t)
			}
		}
	}
	return e, nil
}

// setResponseScript stores the leader's upstream response (status and
// header, opaque bytes to this package), fenced like an append so that a
// stale leader cannot overwrite what the current one published.
// KEYS: lease resp. ARGV: token data ttlMs.
var setResponseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
`)

// SetResponse stores data (the upstream's response head, as the caller
// encodes it) under the stream's P{K}:resp key, expiring with the stream's
// other keys, if lease is still the holder's; otherwise ErrNotLeader.
func (s *Stream) SetResponse(ctx context.Context, lease Lease, data []byte) error {
	n, err := setResponseScript.Run(ctx, s.b.client, []string{s.lease, s.resp}, lease.value, data, ms(s.b.opts.KeyTTL)).Int64()
	if err != nil {
		return fmt.Errorf("redisbroker: set response %q: %w", s.key, err)
	}
	if n != 1 {
		return ErrNotLeader
	}
	return nil
}

// Response returns what the leader stored with SetResponse; ok is false if
// nothing is stored (no leader streamed yet, or the key expired).
func (s *Stream) Response(ctx context.Context) (data []byte, ok bool, err error) {
	data, err = s.b.client.Get(ctx, s.resp).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("redisbroker: response %q: %w", s.key, err)
	}
	return data, true, nil
}
