//go:build !unix

package caddysse

import "net"

// nonBlockingWriter: elsewhere every write of a detached client goes
// through a drain (wire.go).
func nonBlockingWriter(net.Conn) func([]byte) (int, error) { return nil }
