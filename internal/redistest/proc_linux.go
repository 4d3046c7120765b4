package redistest

import (
	"os/exec"
	"syscall"
)

// sysProcAttr puts redis-server in a process group of its own (so a signal
// reaches the children it forks for AOF rewrites too) and has the kernel
// kill it if the test binary dies first, so no server outlives its test.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// signal sends sig to redis-server's process group.
func signal(cmd *exec.Cmd, sig syscall.Signal) {
	_ = syscall.Kill(-cmd.Process.Pid, sig)
}
