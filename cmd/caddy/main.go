// Command caddy is Caddy with the standard modules plus caddy-sse, for local
// use and for the demo; it is what `xcaddy build --with
// github.com/seed-b7710c89/caddy-sse` produces.
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
