package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"
)

// procStat holds the fields of /proc/PID/stat the bench uses.
type procStat struct {
	ppid         int
	utime, stime uint64 // clock ticks, all threads of the process
}

// parseProcStat parses the contents of /proc/PID/stat. The command name
// (field 2) is in parentheses and may itself contain spaces and
// parentheses, so fields are counted from the last ')'.
func parseProcStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, errors.New("proc stat: no ')' after the command name")
	}
	f := bytes.Fields(b[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("proc stat: %d fields after the command name, want at least 13", len(f))
	}
	ppid, err := strconv.Atoi(string(f[1]))
	if err != nil {
		return procStat{}, fmt.Errorf("proc stat: ppid: %v", err)
	}
	ut, err := strconv.ParseUint(string(f[11]), 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("proc stat: utime: %v", err)
	}
	st, err := strconv.ParseUint(string(f[12]), 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("proc stat: stime: %v", err)
	}
	return procStat{ppid: ppid, utime: ut, stime: st}, nil
}

// parseVmRSS returns the VmRSS of a /proc/PID/status file in bytes.
func parseVmRSS(b []byte) (int64, error) {
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		rest, ok := bytes.CutPrefix(line, []byte("VmRSS:"))
		if !ok {
			continue
		}
		f := bytes.Fields(rest)
		if len(f) != 2 || string(f[1]) != "kB" {
			return 0, fmt.Errorf("proc status: malformed VmRSS line %q", line)
		}
		kb, err := strconv.ParseInt(string(f[0]), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("proc status: VmRSS: %v", err)
		}
		return kb * 1024, nil
	}
	// Zombies and kernel threads have no VmRSS line.
	return 0, errors.New("proc status: no VmRSS line")
}

// parseClockTicks finds AT_CLKTCK (17) in the contents of /proc/self/auxv
// (pairs of native-endian words; 64-bit little-endian assumed, as on amd64
// and arm64). It returns 0 when absent.
func parseClockTicks(auxv []byte) uint64 {
	const atClkTck = 17
	for len(auxv) >= 16 {
		k := binary.LittleEndian.Uint64(auxv)
		v := binary.LittleEndian.Uint64(auxv[8:])
		if k == 0 {
			break
		}
		if k == atClkTck {
			return v
		}
		auxv = auxv[16:]
	}
	return 0
}

var clockTicks = func() uint64 {
	if b, err := os.ReadFile("/proc/self/auxv"); err == nil {
		if t := parseClockTicks(b); t > 0 {
			return t
		}
	}
	return 100 // USER_HZ on every common Linux configuration
}()

// procSample is the CPU time and memory of a process tree at one instant.
type procSample struct {
	at    time.Time
	cpu   time.Duration // user+system from /proc/PID/stat (clock-tick resolution), summed over the tree
	sched time.Duration // run time from /proc/PID/task/*/schedstat (ns resolution), summed; -1 if unavailable
	rss   int64         // bytes, summed over the tree
	procs int
}

// cpuBetween returns the CPU time the tree used between two samples: the
// nanosecond schedstat sums when both samples have them and they agree with
// the tick counters (threads that exit take their schedstat with them, the
// process's stat keeps it), else the tick counters.
func cpuBetween(a, b procSample) time.Duration {
	ticks := b.cpu - a.cpu
	if a.sched < 0 || b.sched < 0 {
		return ticks
	}
	sched := b.sched - a.sched
	tick := time.Second / time.Duration(clockTicks)
	slack := ticks/10 + time.Duration(2*(a.procs+b.procs+2))*tick
	if sched < ticks-slack || sched > ticks+slack {
		return ticks
	}
	return sched
}

// parseSchedstat returns the first field of a schedstat file: time spent
// on the CPU, in nanoseconds.
func parseSchedstat(b []byte) (time.Duration, error) {
	f := bytes.Fields(b)
	if len(f) < 1 {
		return 0, errors.New("schedstat: empty")
	}
	n, err := strconv.ParseUint(string(f[0]), 10, 63)
	if err != nil {
		return 0, fmt.Errorf("schedstat: %v", err)
	}
	return time.Duration(n), nil
}

// schedTime sums the on-CPU time of every thread of pid.
func schedTime(pid int) (time.Duration, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var sum time.Duration
	for _, e := range ents {
		b, err := os.ReadFile(dir + "/" + e.Name() + "/schedstat")
		if err != nil {
			if os.IsNotExist(err) {
				continue // the thread just exited
			}
			return 0, err
		}
		d, err := parseSchedstat(b)
		if err != nil {
			return 0, err
		}
		sum += d
	}
	return sum, nil
}

// sampleTree measures pid and all of its descendants (nginx runs a master
// and workers; Caddy is a single process).
func sampleTree(pid int) (procSample, error) {
	pids := []int{pid}
	if kids, err := descendants(pid); err == nil {
		pids = append(pids, kids...)
	}
	s := procSample{at: time.Now()}
	for i, p := range pids {
		if s.sched >= 0 {
			if d, err := schedTime(p); err == nil {
				s.sched += d
			} else {
				s.sched = -1
			}
		}
		st, err := readProcStat(p)
		if err != nil {
			if i == 0 {
				return s, err
			}
			continue // a child that just exited
		}
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/status")
		if err != nil {
			if i == 0 {
				return s, err
			}
			continue
		}
		rss, err := parseVmRSS(b)
		if err != nil && i == 0 {
			return s, err
		}
		s.cpu += ticksToDuration(st.utime + st.stime)
		s.rss += rss
		s.procs++
	}
	return s, nil
}

func ticksToDuration(t uint64) time.Duration {
	return time.Duration(t * uint64(time.Second) / clockTicks)
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	return parseProcStat(b)
}

// selfCPU returns the CPU time this (bench) process used so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// descendants lists every process whose parent chain leads to root.
func descendants(root int) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	parent := map[int]int{}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readProcStat(p)
		if err != nil {
			continue
		}
		parent[p] = st.ppid
	}
	return treeOf(root, parent), nil
}

// treeOf returns the descendants of root in a pid->ppid map.
func treeOf(root int, parent map[int]int) []int {
	var out []int
	for p := range parent {
		for q, hops := parent[p], 0; q > 1 && hops < 64; q, hops = parent[q], hops+1 {
			if q == root {
				out = append(out, p)
				break
			}
		}
	}
	return out
}

// raiseNoFile raises RLIMIT_NOFILE as far as allowed: to the kernel's
// nr_open when running as root, else the soft limit to the hard one.
// Calling Setrlimit also makes os/exec pass the raised limit on to the
// proxies (Go otherwise restores the original soft limit in children).
func raiseNoFile() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	want := lim
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(string(bytes.TrimSpace(b)), 10, 64); err == nil && n > want.Max {
			want.Max = n
		}
	}
	want.Cur = want.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		// Not privileged: settle for the hard limit we have.
		want = lim
		want.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			return lim.Cur, err
		}
	}
	return want.Cur, nil
}
