package main

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// histogram is a fixed-size, HDR-like log-linear histogram of non-negative
// durations in nanoseconds. Every power of two is split into histSub linear
// buckets, so a recorded value is known to within 1/histSub (1.6%) of
// itself; values below histSub ns are exact. It never allocates after
// creation and is safe for concurrent use (atomic counters), so all client
// goroutines record into one histogram instead of keeping samples.
type histogram struct {
	counts [histBuckets]atomic.Uint64
	total  atomic.Uint64
	max    atomic.Int64
	sum    atomic.Int64 // for the mean; overflows only after ~292 years of summed latency
}

const (
	histSubBits = 6
	histSub     = 1 << histSubBits
	// Values up to 2^63-1 ns: bit lengths histSubBits+1..63 each add a
	// group of histSub buckets after the first, exact group.
	histBuckets = (64 - histSubBits) * histSub
)

// bucketOf returns the bucket index of v (v >= 0).
func bucketOf(v int64) int {
	if v < histSub {
		if v < 0 {
			return 0
		}
		return int(v)
	}
	u := uint64(v)
	shift := bits.Len64(u) - histSubBits - 1 // >= 0
	sub := int(u>>uint(shift)) & (histSub - 1)
	return (shift+1)<<histSubBits | sub
}

// bucketBounds returns the smallest and largest value that land in bucket i.
func bucketBounds(i int) (lo, hi int64) {
	if i < histSub {
		return int64(i), int64(i)
	}
	shift := uint(i>>histSubBits - 1)
	sub := int64(i & (histSub - 1))
	lo = (histSub + sub) << shift
	return lo, lo + (1 << shift) - 1
}

// record adds one value. Negative values (clock steps) count as 0.
func (h *histogram) record(v int64) {
	if v < 0 {
		v = 0
	}
	h.counts[bucketOf(v)].Add(1)
	h.total.Add(1)
	h.sum.Add(v)
	for {
		m := h.max.Load()
		if v <= m || h.max.CompareAndSwap(m, v) {
			return
		}
	}
}

// count returns how many values were recorded.
func (h *histogram) count() uint64 { return h.total.Load() }

// maxValue returns the largest recorded value, exactly.
func (h *histogram) maxValue() time.Duration { return time.Duration(h.max.Load()) }

// mean returns the exact mean of the recorded values.
func (h *histogram) mean() time.Duration {
	n := h.total.Load()
	if n == 0 {
		return 0
	}
	return time.Duration(h.sum.Load() / int64(n))
}

// percentile returns the value at or below which a fraction p (0..1] of
// the recorded values lie: the upper bound of the bucket holding the
// ceil(p*n)-th smallest value (so it never under-reports by more than the
// bucket width), capped at the exact maximum. It returns 0 when empty.
func (h *histogram) percentile(p float64) time.Duration {
	n := h.total.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(p*float64(n) + 0.999999999)
	if rank < 1 {
		rank = 1
	}
	if rank > n {
		rank = n
	}
	max := h.max.Load()
	var cum uint64
	for i := range h.counts {
		cum += h.counts[i].Load()
		if cum >= rank {
			_, hi := bucketBounds(i)
			if hi > max {
				hi = max
			}
			return time.Duration(hi)
		}
	}
	return time.Duration(max)
}
