//! A latency histogram kept where the latency is measured: fixed bucket bounds, one relaxed
//! atomic add per observation, no lock. Readers get per-bucket counts to expose as they like.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in microseconds, of the buckets of a store fetch's duration: from a local
/// store's millisecond to a remote store retried for half a minute.
pub const FETCH_BOUNDS_US: &[u64] =
    &[1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000];

#[derive(Debug)]
pub struct LatencyHistogram {
    bounds_us: &'static [u64],
    /// One more than `bounds`: the last counts what exceeded every bound.
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn new(bounds_us: &'static [u64]) -> Self {
        LatencyHistogram { bounds_us, counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0) }
    }

    pub fn observe(&self, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = self.bounds_us.iter().position(|&bound| us <= bound).unwrap_or(self.bounds_us.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn bounds_us(&self) -> &'static [u64] {
        self.bounds_us
    }

    /// Observations per bucket (not cumulative), the last one past every bound.
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new(FETCH_BOUNDS_US)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = LatencyHistogram::new(&[10_000, 1_000_000]);
        for ms in [1, 10, 11, 1000, 5000] {
            histogram.observe(Duration::from_millis(ms));
        }
        assert_eq!(histogram.counts(), vec![2, 2, 1]);
        assert_eq!(histogram.sum_us(), 6_022_000);
    }
}
