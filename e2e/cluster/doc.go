// Package cluster holds the multi-node tests of fan-out cluster mode (issue
// #13): several Caddy processes with the plugin share one stream through a
// redis-server, behind a fourth Caddy as load balancer, in front of a backend
// that runs inside the test process.
//
// Run them with
//
//	go test -count=1 -v ./e2e/cluster/
//
// TestMain builds ./cmd/caddy once into a temp dir (or uses the binary named
// by $SSE_CLUSTER_CADDY) and asks it (`caddy list-modules`) whether it has
// the Redis broker module http.handlers.sse.brokers.redis. Without it, or
// without redis-server, the cluster tests skip with the reason, unless
// SSE_REQUIRE_CLUSTER=1 is set, in which case they fail. The harness's own
// tests (harness_self_test.go) run against the in-memory broker and need
// neither; among them, TestClusterLogicOnSharedHub runs the one-upstream,
// hopping and reload scenarios against one Caddy serving three ports (hubs
// shared in-process: a perfect cluster, as clients see it), so the cluster
// tests' checks are known to pass where they should.
//
// Everything listens on loopback ports picked at start; every process is
// started in its own process group with Pdeathsig, and stopped when its test
// ends. Caddy's and redis-server's logs stay in the test's temp dir and are
// printed (their ends) when a test fails.
//
// Layout of the files:
//
//   - harness_test.go: TestMain, the Caddy nodes and the load balancer,
//     their configs, the admin API reads, signals. redis-server is
//     internal/redistest's, shared with the other packages' tests.
//   - backend_test.go: the SSE backend (a sequence number in every event,
//     with or without ids, connections counted per path).
//   - client_test.go: an SSE client that records every event and
//     reconnects with Last-Event-ID, and the checks on what it recorded.
//   - cluster_test.go: the tests of issue #13's list, and the scenarios
//     they share with the self-tests.
//   - harness_self_test.go: the harness's own tests, the checks' tests, and
//     the demo's configs (demo/cluster).
package cluster
