package main

import (
	"sync"
	"testing"
	"time"
)

func TestBucketBoundsContainValue(t *testing.T) {
	vals := []int64{0, 1, 63, 64, 65, 127, 128, 129, 1000, 1 << 20, 123456789, 1<<62 + 12345, 1<<63 - 1}
	for v := int64(1); v < 1<<40; v = v*3 + 1 {
		vals = append(vals, v, v+1, v-1)
	}
	for _, v := range vals {
		i := bucketOf(v)
		if i < 0 || i >= histBuckets {
			t.Fatalf("bucketOf(%d) = %d, out of range", v, i)
		}
		lo, hi := bucketBounds(i)
		if v < lo || v > hi {
			t.Fatalf("value %d in bucket %d with bounds [%d, %d]", v, i, lo, hi)
		}
		if v >= histSub && float64(hi-lo+1)/float64(lo) > 1.0/histSub+1e-12 {
			t.Fatalf("bucket %d [%d, %d] is wider than 1/%d of its values", i, lo, hi, histSub)
		}
	}
	// Buckets tile the line: each one starts right after the previous.
	for i := 1; i < histBuckets; i++ {
		_, hiPrev := bucketBounds(i - 1)
		lo, _ := bucketBounds(i)
		if lo != hiPrev+1 {
			t.Fatalf("bucket %d starts at %d, previous ends at %d", i, lo, hiPrev)
		}
	}
}

func TestPercentiles(t *testing.T) {
	var h histogram
	if h.percentile(0.5) != 0 || h.maxValue() != 0 || h.mean() != 0 {
		t.Fatal("empty histogram should report zeros")
	}
	// 1..1000 µs, each once.
	for i := 1; i <= 1000; i++ {
		h.record(int64(i) * int64(time.Microsecond))
	}
	check := func(p float64, want time.Duration) {
		t.Helper()
		got := h.percentile(p)
		if got < want || float64(got-want) > float64(want)/histSub {
			t.Errorf("p%g = %v, want %v (at most 1/%d above)", p*100, got, want, histSub)
		}
	}
	check(0.5, 500*time.Microsecond)
	check(0.99, 990*time.Microsecond)
	check(0.001, time.Microsecond)
	if got := h.percentile(1); got != time.Millisecond {
		t.Errorf("p100 = %v, want exactly the max 1ms", got)
	}
	if h.maxValue() != time.Millisecond {
		t.Errorf("max = %v", h.maxValue())
	}
	if h.mean() != 500500*time.Nanosecond {
		t.Errorf("mean = %v, want 500.5µs", h.mean())
	}
	if h.count() != 1000 {
		t.Errorf("count = %d", h.count())
	}
}

func TestPercentileSkewed(t *testing.T) {
	var h histogram
	for i := 0; i < 990; i++ {
		h.record(int64(2 * time.Millisecond))
	}
	for i := 0; i < 10; i++ {
		h.record(int64(3 * time.Second))
	}
	if p := h.percentile(0.5); p < 2*time.Millisecond || p > 2*time.Millisecond+2*time.Millisecond/histSub {
		t.Errorf("p50 = %v, want ~2ms", p)
	}
	if p := h.percentile(0.99); p > 3*time.Millisecond {
		t.Errorf("p99 = %v, want ~2ms (990 of 1000 values)", p)
	}
	if p := h.percentile(0.995); p != 3*time.Second {
		t.Errorf("p99.5 = %v, want 3s (capped at max)", p)
	}
}

func TestRecordNegativeAndConcurrent(t *testing.T) {
	var h histogram
	h.record(-5)
	if h.percentile(1) != 0 {
		t.Errorf("negative value should count as 0, got %v", h.percentile(1))
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				h.record(int64(g*1000 + i))
			}
		}(g)
	}
	wg.Wait()
	if h.count() != 8001 {
		t.Errorf("count = %d, want 8001", h.count())
	}
	if h.maxValue() != 7999 {
		t.Errorf("max = %d, want 7999", h.maxValue())
	}
}
