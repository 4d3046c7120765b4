//go:build !linux

package redistest

import (
	"os/exec"
	"syscall"
)

// sysProcAttr: without Linux's Pdeathsig the server is ended by the test's
// cleanup only.
func sysProcAttr() *syscall.SysProcAttr { return nil }

// signal sends sig to redis-server itself.
func signal(cmd *exec.Cmd, sig syscall.Signal) {
	_ = cmd.Process.Signal(sig)
}
