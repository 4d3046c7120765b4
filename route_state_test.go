package caddysse

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startPHPFPM runs Debian's php-fpm on a loopback port with a pool of its
// own, and returns its address. Without php-fpm the test is skipped,
// unless SSE_REQUIRE_PHP=1 (CI) makes that a failure.
func startPHPFPM(t *testing.T) string {
	t.Helper()
	bins, _ := filepath.Glob("/usr/sbin/php-fpm*")
	if len(bins) == 0 {
		if os.Getenv("SSE_REQUIRE_PHP") == "1" {
			t.Fatal("php-fpm not found (/usr/sbin/php-fpm*) and SSE_REQUIRE_PHP=1")
		}
		t.Skip("php-fpm not installed")
	}
	dir := t.TempDir()
	addr := freeAddr(t)
	conf := filepath.Join(dir, "fpm.conf")
	if err := os.WriteFile(conf, fmt.Appendf(nil, `[global]
pid = %[1]s/fpm.pid
error_log = %[1]s/fpm.log
daemonize = no
[sse]
listen = %[2]s
pm = static
pm.max_children = 4
clear_env = no
catch_workers_output = yes
php_admin_value[output_buffering] = 0
php_admin_value[zlib.output_compression] = 0
php_admin_value[max_execution_time] = 0
`, dir, addr), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"-n", "-F", "-y", conf}
	if os.Geteuid() == 0 {
		args = append(args, "-R")
	}
	cmd := exec.Command(bins[len(bins)-1], args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if !eventually(10*time.Second, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		t.Fatalf("php-fpm not listening on %s", addr)
	}
	return addr
}

// phpStream is a PHP SSE script: it logs each request it serves to
// requests.log next to it, sends DOCUMENT_ROOT as its first event, then a
// tick every 50ms until the client is gone.
const phpStream = `<?php
file_put_contents(__DIR__ . '/requests.log', "req\n", FILE_APPEND);
header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');
while (ob_get_level() > 0) { ob_end_flush(); }
echo "event: root\ndata: " . $_SERVER['DOCUMENT_ROOT'] . "\n\n";
flush();
for ($i = 0; !connection_aborted(); $i++) {
	echo "data: tick $i\n\n";
	flush();
	usleep(50000);
}
`

// The route's root reaches php_fastcgi through a shared fan-out upstream:
// DOCUMENT_ROOT is the configured root, and two clients share one
// php-fpm request (issue #11, item 3).
func TestFanoutCarriesRootToPHPFPM(t *testing.T) {
	checkNoLeak(t)
	fpm := startPHPFPM(t)
	www := t.TempDir()
	if err := os.WriteFile(filepath.Join(www, "stream.php"), []byte(phpStream), 0o644); err != nil {
		t.Fatal(err)
	}
	base := startCaddyfile(t, fmt.Sprintf(`	root * %s
	sse {
		padding 0
		heartbeat off
		fanout {
			linger off
		}
	}
	php_fastcgi %s`, www, fpm))
	t.Cleanup(func() { waitHubsGone(t, strings.TrimPrefix(base, "http://")) })
	a := openStream(t, base+"/stream.php", false)
	if a.Resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, body %q", a.Resp.StatusCode, a.bytes())
	}
	evs := waitEvents(t, a, 2)
	if evs[0].Type != "root" || evs[0].Data != www {
		t.Fatalf("php-fpm got DOCUMENT_ROOT %q (event %+v), want %q", evs[0].Data, evs[0], www)
	}
	b := openStream(t, base+"/stream.php", false)
	last := waitEvents(t, a, 1)
	n := len(last)
	// b joined the live stream: it gets the ticks a gets from now on.
	bEvs := waitEvents(t, b, 3)
	if !strings.HasPrefix(bEvs[0].Data, "tick ") {
		t.Fatalf("second client got %+v", bEvs)
	}
	waitEvents(t, a, n+3)
	logged, _ := os.ReadFile(filepath.Join(www, "requests.log"))
	if got := strings.Count(string(logged), "req\n"); got != 1 {
		t.Fatalf("php-fpm served %d requests for two clients of one stream", got)
	}
}

// A var set before sse (`vars`) and a matcher's capture (evaluated on the
// client's request, before sse) reach placeholders of a handler after it,
// in the shared upstream request.
func TestFanoutCarriesVarsToProxy(t *testing.T) {
	checkNoLeak(t)
	b := newScriptedBackend(t)
	base := startCaddyfile(t, fmt.Sprintf(`	vars x y
	@ev path_regexp ev ^/(ev)ents$
	handle @ev {
		sse {
			padding 0
			heartbeat off
			fanout {
				linger off
			}
		}
		reverse_proxy %s {
			header_up X-Var {vars.x}
			header_up X-Cap {re.ev.1}
		}
	}`, b.Addr))
	t.Cleanup(func() { waitHubsGone(t, strings.TrimPrefix(base, "http://")) })
	openStream(t, base+"/events", false)
	r := b.request(t)
	if got := r.Header.Get("X-Var"); got != "y" {
		t.Fatalf("X-Var %q reached the backend, want y", got)
	}
	if got := r.Header.Get("X-Cap"); got != "ev" {
		t.Fatalf("X-Cap %q reached the backend, want ev (the path_regexp capture)", got)
	}
}
