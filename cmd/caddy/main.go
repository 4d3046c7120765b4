// Command caddy is Caddy with the standard modules plus caddy-sse, for local
// use and for the demo: what `xcaddy build v2.11.9 --with
// github.com/seed-b7710c89/caddy-sse@v0.0.0=.` produces from a clone, plus the
// demo's backend handler (legacy_sse_demo), which does nothing unless a
// config names it.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/seed-b7710c89/caddy-sse"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	// The demo's deliberately bad SSE backend (demo/Caddyfile); not part of
	// the plugin, only of this local build.
	_ "github.com/seed-b7710c89/caddy-sse/demo/legacybackend"
)

func main() {
	caddycmd.Main()
}
