package redistest

import (
	"strings"
	"testing"
)

// TestServer: with Persist a restart keeps the data, without it loses it;
// a killed server answers nothing until started again; Do speaks RESP.
// (Moved here from e2e/cluster's TestHarnessRedis with the helper.)
func TestServer(t *testing.T) {
	for _, persist := range []bool{true, false} {
		r := Start(t, Options{Persist: persist})
		if _, err := r.Do("SET", "k", "v"); err != nil {
			t.Fatal(err)
		}
		r.Restart()
		got, err := r.Do("GET", "k")
		if err != nil {
			t.Fatal(err)
		}
		if want := map[bool]string{true: "v", false: ""}[persist]; got != want {
			t.Errorf("persist=%v: after a restart GET k = %q, want %q", persist, got, want)
		}
		// Killed and started again (what e2e/cluster's killed-3s case does).
		r.Kill()
		if _, err := r.Do("PING"); err == nil {
			t.Error("a killed redis-server answered")
		}
		r.Start()
		if _, err := r.Do("PING"); err != nil {
			t.Errorf("after Kill and Start: %v", err)
		}
	}
}

// TestCluster: in cluster mode the node owns every slot, also after a
// restart.
func TestCluster(t *testing.T) {
	r := Start(t, Options{Cluster: true})
	for i := 0; i < 2; i++ {
		if i > 0 {
			r.Restart()
		}
		info, err := r.Do("CLUSTER", "INFO")
		if err != nil || !strings.Contains(info, "cluster_state:ok") || !strings.Contains(info, "cluster_slots_assigned:16384") {
			t.Fatalf("after %d restarts, CLUSTER INFO: %v %q", i, err, info)
		}
	}
}
