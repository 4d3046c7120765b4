package main

import (
	"encoding/binary"
	"os"
	"sort"
	"testing"
	"time"
)

func TestParseProcStat(t *testing.T) {
	// A command name with spaces and parentheses, as a process may choose.
	line := "4242 (cad dy) (x)) S 17 4242 4242 0 -1 4194560 5305 0 0 0 1234 567 0 0 20 0 12 0 2894 1390497792 14466 18446744073709551615 1 1 0 0 0 0 0 0 2143420159 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
	st, err := parseProcStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if st.ppid != 17 || st.utime != 1234 || st.stime != 567 {
		t.Errorf("got %+v, want ppid 17 utime 1234 stime 567", st)
	}
	for _, bad := range []string{"", "4242 cad dy S 17", "4242 (x) S 17 1 2", "4242 (x) S nope 4242 4242 0 -1 0 0 0 0 0 1 2"} {
		if _, err := parseProcStat([]byte(bad)); err == nil {
			t.Errorf("parseProcStat(%q) accepted a malformed line", bad)
		}
	}
}

func TestParseOwnProcFiles(t *testing.T) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Skip("no /proc:", err)
	}
	st, err := parseProcStat(b)
	if err != nil {
		t.Fatal(err)
	}
	if st.ppid != os.Getppid() {
		t.Errorf("ppid %d, want %d", st.ppid, os.Getppid())
	}
	s, err := sampleTree(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.rss <= 0 || s.procs != 1 {
		t.Errorf("own sample %+v: want a positive RSS and one process", s)
	}
	if s.sched <= 0 {
		t.Logf("schedstat not available (%v): ticks only", s.sched)
	}
}

func TestParseVmRSS(t *testing.T) {
	status := "Name:\tcaddy\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t 1358928 kB\nVmRSS:\t   57864 kB\nRssAnon:\t   30000 kB\nThreads:\t12\n"
	got, err := parseVmRSS([]byte(status))
	if err != nil || got != 57864*1024 {
		t.Errorf("parseVmRSS = %d, %v; want %d", got, err, 57864*1024)
	}
	if _, err := parseVmRSS([]byte("Name:\tkthreadd\nState:\tS\n")); err == nil {
		t.Error("no VmRSS line: want an error")
	}
	if _, err := parseVmRSS([]byte("VmRSS:\t  12 MB\n")); err == nil {
		t.Error("unexpected unit: want an error")
	}
	if got, err := parseVmRSS([]byte("VmRSS:\t1 kB")); err != nil || got != 1024 {
		t.Errorf("last line without LF: %d, %v", got, err)
	}
}

func TestParseClockTicks(t *testing.T) {
	var auxv []byte
	put := func(k, v uint64) {
		auxv = binary.LittleEndian.AppendUint64(auxv, k)
		auxv = binary.LittleEndian.AppendUint64(auxv, v)
	}
	put(6, 4096) // AT_PAGESZ
	put(17, 250) // AT_CLKTCK
	put(0, 0)
	if got := parseClockTicks(auxv); got != 250 {
		t.Errorf("got %d, want 250", got)
	}
	if got := parseClockTicks(auxv[32:]); got != 0 {
		t.Errorf("after AT_NULL: got %d, want 0", got)
	}
	if clockTicks == 0 {
		t.Error("clockTicks is 0")
	}
}

func TestParseSchedstat(t *testing.T) {
	d, err := parseSchedstat([]byte("171260 3452799 2\n"))
	if err != nil || d != 171260 {
		t.Errorf("got %v, %v", d, err)
	}
	if _, err := parseSchedstat([]byte("")); err == nil {
		t.Error("empty: want an error")
	}
}

func TestTreeOf(t *testing.T) {
	parent := map[int]int{1: 0, 100: 1, 101: 100, 102: 100, 103: 101, 200: 1, 201: 200}
	got := treeOf(100, parent)
	sort.Ints(got)
	want := []int{101, 102, 103}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	// A cycle must not hang.
	treeOf(5, map[int]int{6: 7, 7: 6})
}

func TestCPUBetween(t *testing.T) {
	tick := time.Second / time.Duration(clockTicks)
	a := procSample{cpu: 10 * tick, sched: 95 * tick, procs: 1}
	b := procSample{cpu: 110 * tick, sched: 195*tick + 3, procs: 1}
	if got := cpuBetween(a, b); got != 100*tick+3 {
		t.Errorf("consistent schedstat: got %v, want %v", got, 100*tick+3)
	}
	b.sched = a.sched + 10*tick // a thread exited and took its time along
	if got := cpuBetween(a, b); got != 100*tick {
		t.Errorf("inconsistent schedstat: got %v, want the ticks %v", got, 100*tick)
	}
	a.sched = -1
	if got := cpuBetween(a, b); got != 100*tick {
		t.Errorf("no schedstat: got %v", got)
	}
}
