//! A duration histogram as a process hands it on: the holder keeps the takeover stalls in one
//! across worker deaths, and status reports them and the cache's fetch durations in one.
//! Whole microseconds, so that it compares exactly and survives JSON unchanged.

use serde::{Deserialize, Serialize};

/// Upper bounds, in microseconds, of the buckets of a takeover's stall: from a standby's
/// few milliseconds to a worker start that waits on a slow disk.
pub const STALL_BOUNDS_US: &[u64] = &[5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DurationHistogram {
    /// Upper bounds of the buckets, ascending.
    pub bounds_us: Vec<u64>,
    /// Observations per bucket, not cumulative; one more than `bounds_us`, the last for those
    /// past every bound.
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl DurationHistogram {
    pub fn empty(bounds_us: &[u64]) -> Self {
        DurationHistogram { bounds_us: bounds_us.to_vec(), counts: vec![0; bounds_us.len() + 1], sum_us: 0 }
    }

    pub fn takeover_stalls() -> Self {
        Self::empty(STALL_BOUNDS_US)
    }

    pub fn observe(&mut self, us: u64) {
        let bucket = self.bounds_us.iter().position(|&bound| us <= bound).unwrap_or(self.bounds_us.len());
        if let Some(count) = self.counts.get_mut(bucket) {
            *count += 1;
        }
        self.sum_us += us;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Each bound with the observations at or below it, as Prometheus' `le` buckets count.
    pub fn cumulative(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.bounds_us.iter().zip(self.counts.iter().scan(0, |total, &n| {
            *total += n;
            Some(*total)
        }))
        .map(|(&bound, total)| (bound, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fill_and_accumulate() {
        let mut histogram = DurationHistogram::empty(&[10, 100]);
        for us in [1, 10, 50, 1000] {
            histogram.observe(us);
        }
        assert_eq!(histogram.counts, vec![2, 1, 1]);
        assert_eq!(histogram.cumulative().collect::<Vec<_>>(), vec![(10, 2), (100, 3)]);
        assert_eq!((histogram.count(), histogram.sum_us), (4, 1061));
    }
}
