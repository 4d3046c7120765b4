package redisbroker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Lease is one acquisition of a stream's upstream lease.
type Lease struct {
	// Token is the fencing counter of this acquisition: it grows with every
	// acquisition of the key (until the key's fence counter expires).
	Token uint64
	// Expires is when the lease runs out by this node's clock, measured from
	// before the request that took or renewed it (so it errs early).
	Expires time.Time
	value   string // "<token>:<nonce>", what Redis holds
}

// acquireScript: KEYS lease fence; ARGV nonce ttlMs fenceTtlMs.
var acquireScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur, redis.call('PTTL', KEYS[1])} end
local n = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local v = string.format('%d', n) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
return {1, v}
`)

// renewScript: KEYS lease resp; ARGV value ttlMs keyTtlMs. It also keeps
// the leader's response head alive while the leader is: a quiet stream must
// not lose it, or joining followers could not answer their clients.
var renewScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
`)

// releaseScript: KEYS lease; ARGV value channel. The notification lets the
// nodes waiting for the lease ask at once (their Watch wakes, and they find
// no new entry).
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released')
  return 1
end
return 0
`)

// Acquire takes the lease if nobody holds it. ok is false when another node
// holds it; the returned Lease then describes the holder's token and when
// its lease runs out unless renewed (by this node's clock), the time to ask
// again; it cannot be used to append.
func (s *Stream) Acquire(ctx context.Context) (l Lease, ok bool, err error) {
	ttl := s.b.opts.LeaseTTL
	start := time.Now()
	fenceTTL := max(s.b.opts.KeyTTL, ttl)
	res, err := acquireScript.Run(ctx, s.b.client, []string{s.lease, s.fence},
		randomToken(), ms(ttl), ms(fenceTTL)).Slice()
	if err != nil {
		return Lease{}, false, fmt.Errorf("redisbroker: acquire %q: %w", s.key, err)
	}
	if len(res) < 2 {
		return Lease{}, false, fmt.Errorf("redisbroker: acquire %q: bad reply %v", s.key, res)
	}
	v, _ := res[1].(string)
	tok, _, _ := strings.Cut(v, ":")
	n, _ := strconv.ParseUint(tok, 10, 64)
	if got, _ := res[0].(int64); got != 1 {
		l := Lease{Token: n}
		if len(res) == 3 {
			if pttl, _ := res[2].(int64); pttl > 0 {
				l.Expires = start.Add(time.Duration(pttl) * time.Millisecond)
			}
		}
		return l, false, nil
	}
	return Lease{Token: n, Expires: start.Add(ttl), value: v}, true, nil
}

// Renew extends the lease by the lease TTL if l is still the holder's and
// returns it with its new Expires; otherwise ErrNotLeader.
func (s *Stream) Renew(ctx context.Context, l Lease) (Lease, error) {
	start := time.Now()
	ttl := s.b.opts.LeaseTTL
	n, err := renewScript.Run(ctx, s.b.client, []string{s.lease, s.resp}, l.value, ms(ttl), ms(s.b.opts.KeyTTL)).Int64()
	if err != nil {
		return l, fmt.Errorf("redisbroker: renew %q: %w", s.key, err)
	}
	if n != 1 {
		return l, ErrNotLeader
	}
	l.Expires = start.Add(ttl)
	return l, nil
}

// Release gives the lease up if l is still the holder's, so another node can
// acquire it at once: watchers of the stream are woken. Releasing a lost lease is not an error.
func (s *Stream) Release(ctx context.Context, l Lease) error {
	if err := releaseScript.Run(ctx, s.b.client, []string{s.lease}, l.value, s.channel).Err(); err != nil {
		return fmt.Errorf("redisbroker: release %q: %w", s.key, err)
	}
	return nil
}

// Keeper renews a lease every TTL/3 until its context ends (then it releases
// the lease) or the lease is lost.
type Keeper struct {
	lost   chan struct{}
	done   chan struct{}
	cancel context.CancelFunc
}

// Keep starts renewing l in a goroutine owned by the returned Keeper; it
// exits when ctx ends or Stop is called (releasing the lease), or when the
// lease is lost: Renew says another holder has it, or renewals kept failing
// until l's local expiry passed. Loss closes Lost.
func (s *Stream) Keep(ctx context.Context, l Lease) *Keeper {
	ctx, cancel := context.WithCancel(ctx)
	k := &Keeper{lost: make(chan struct{}), done: make(chan struct{}), cancel: cancel}
	go k.run(ctx, s, l)
	return k
}

// Lost is closed when the lease was lost (not when it was released).
func (k *Keeper) Lost() <-chan struct{} { return k.lost }

// Done is closed when the renewal goroutine has exited.
func (k *Keeper) Done() <-chan struct{} { return k.done }

// Stop ends the renewals, releases the lease if still held and waits.
func (k *Keeper) Stop() {
	k.cancel()
	<-k.done
}

func (k *Keeper) run(ctx context.Context, s *Stream, l Lease) {
	defer close(k.done)
	every := s.b.opts.LeaseTTL / 3
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			// Release on a fresh context: ours is already over. Bounded, so a
			// dead Redis cannot hold up shutdown; the lease then just expires.
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			_ = s.Release(rctx, l)
			cancel()
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, every)
		nl, err := s.Renew(rctx, l)
		cancel()
		switch {
		case err == nil:
			l = nl
		case errors.Is(err, ErrNotLeader) || !time.Now().Before(l.Expires):
			if ctx.Err() != nil {
				continue // stopping: the case above releases
			}
			close(k.lost)
			return
		}
	}
}
