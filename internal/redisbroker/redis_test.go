package redisbroker

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b7710c89/caddy-sse/internal/redistest"
)

// redisOpts choose how a test's redis-server runs (persistence, cluster
// mode).
type redisOpts = redistest.Options

// redisProc is a redis-server owned by one test (internal/redistest's,
// shared with the plugin's and e2e/cluster's tests), with this package's
// client helper on top.
type redisProc struct{ *redistest.Server }

// startRedis starts a redis-server for t and stops it when t ends. Without
// redis-server the test is skipped, unless SSE_REQUIRE_REDIS=1 (CI), when
// it fails.
func startRedis(t testing.TB, opts redisOpts) *redisProc {
	t.Helper()
	return &redisProc{redistest.Start(t, opts)}
}

// client returns a go-redis client for r made by NewClient (1 s timeouts,
// no retries), closed when the test ends.
func (r *redisProc) client(t testing.TB) *redis.Client {
	t.Helper()
	c, err := NewClient("redis://" + r.Addr + "/0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
