package caddysse

import (
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

func TestMemoryBrokerContract(t *testing.T) {
	testBrokerContract(t, func(*testing.T) Broker { return new(MemoryBroker) })
}

// The memory broker keeps the bytes it is given: the hub's window and the
// broker hold one copy of an event between them.
func TestMemoryBrokerSharesEventBytes(t *testing.T) {
	s := newMemoryStream(HistoryLimits{})
	data := []byte("data: x\n\n")
	if _, err := s.Append(t.Context(), Lease{Token: memoryLease}, StoredEvent{Data: data}); err != nil {
		t.Fatal(err)
	}
	evs, _, err := s.Read(t.Context(), Position{}, 1, nil)
	if err != nil || len(evs) != 1 || &evs[0].Data[0] != &data[0] {
		t.Fatalf("Read gave a copy of the appended bytes (or nothing): %v %v", evs, err)
	}
}

// A handler with fanout and no broker gets the memory broker; one that
// names it gets it too, and one that names an unknown broker is refused.
func TestBrokerModuleSelection(t *testing.T) {
	for _, tc := range []struct {
		raw     string
		wantErr bool
	}{
		{"", false},
		{`{"name":"memory"}`, false},
		{`{"name":"nosuch"}`, true},
	} {
		h := &Handler{Fanout: &Fanout{}}
		if tc.raw != "" {
			h.Fanout.BrokerRaw = json.RawMessage(tc.raw)
		}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		err := h.Provision(ctx)
		cancel()
		if (err != nil) != tc.wantErr {
			t.Fatalf("broker %q: Provision error %v, want error: %v", tc.raw, err, tc.wantErr)
		}
		if err == nil {
			if _, ok := h.fan.broker.(*MemoryBroker); !ok {
				t.Fatalf("broker %q: got %T", tc.raw, h.fan.broker)
			}
		}
	}
}
