#!/usr/bin/env bash
# caddy-sse cluster demo: a redis-server, three Caddy nodes in cluster mode
# and a fourth Caddy as load balancer (which also serves the page and runs
# the demo backend), all on loopback. Ctrl-C stops everything.
#
#	demo/cluster/run.sh            # builds ./cmd/caddy first
#	CADDY=/path/to/caddy demo/cluster/run.sh
#
# Then open http://localhost:8090/ in a few tabs. Ports: 8089 (backend),
# 8090 (page and load balancer), 8091-8093 (nodes), 2021-2023 (the nodes'
# admin endpoints), 6390 (redis-server).
set -euo pipefail

cd "$(dirname "$0")/../.." # the repository root: the Caddyfiles' paths are relative to it

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sse-cluster-demo.XXXXXX")
pids=()
stop() {
	trap - INT TERM EXIT
	echo
	echo "stopping..."
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$tmp"
}
trap stop INT TERM EXIT

command -v redis-server >/dev/null || { echo "redis-server not found (Debian: apt-get install redis-server)" >&2; exit 1; }
for port in 6390 8089 8090 8091 8092 8093 2021 2022 2023; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		echo "port $port is in use; the demo needs 6390, 8089-8093 and 2021-2023" >&2
		exit 1
	fi
done

caddy=${CADDY:-}
if [ -z "$caddy" ]; then
	echo "building ./cmd/caddy ..."
	caddy="$tmp/caddy"
	go build -o "$caddy" ./cmd/caddy
fi
"$caddy" list-modules >"$tmp/modules"
if ! grep -qx 'http.handlers.sse.brokers.redis' "$tmp/modules"; then
	echo "this Caddy build has no cluster mode (module http.handlers.sse.brokers.redis)" >&2
	exit 1
fi

# Each Caddy keeps its autosave and data under $tmp, not in your home.
export XDG_CONFIG_HOME="$tmp/config" XDG_DATA_HOME="$tmp/data"

# No persistence: stop the demo and the stream's history is gone with it.
redis-server --port 6390 --bind 127.0.0.1 --dir "$tmp" --save "" --appendonly no \
	--protected-mode no --daemonize no >"$tmp/redis.log" 2>&1 &
pids+=($!)
echo "redis-server  pid $!  127.0.0.1:6390"

"$caddy" run --config demo/cluster/lb.Caddyfile --adapter caddyfile >"$tmp/lb.log" 2>&1 &
pids+=($!)
echo "lb + backend  pid $!  http://localhost:8090/ (backend on 127.0.0.1:8089)"

for n in 1 2 3; do
	"$caddy" run --config "demo/cluster/node$n.Caddyfile" --adapter caddyfile >"$tmp/node$n.log" 2>&1 &
	pids+=($!)
	echo "node$n         pid $!  127.0.0.1:809$n, admin localhost:202$n"
done

# Wait for every port, or show the log of what did not come up.
for spec in redis:6390 lb:8090 node1:8091 node2:8092 node3:8093; do
	name=${spec%%:*} port=${spec##*:}
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue 2
		sleep 0.1
	done
	echo "$name did not listen on $port within 10 s; its log:" >&2
	tail -n 20 "$tmp/$name.log" >&2
	exit 1
done

echo
echo "Open http://localhost:8090/ in a few tabs. Try: 'Move to another node' on the page;"
echo "kill -9 a node's pid above (the page shows which one leads); Ctrl-C here to stop."
echo "Logs: $tmp/*.log"
# Until Ctrl-C (or until every process has exited): a node you kill does
# not end the demo.
wait
