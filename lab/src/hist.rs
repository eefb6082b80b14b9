//! Lock-free log-linear latency histogram in microseconds (relative error < 0.2%).
//!
//! Values below 1024 µs get their own bucket; above, a value v with e = floor(log2 v) - 9
//! lands in bucket 1024 + 512 * (e - 1) + ((v >> e) - 512), i.e. 512 buckets per octave.

use std::sync::atomic::{AtomicU64, Ordering};

const LINEAR: u64 = 1024;
const PER_OCTAVE: u64 = 512;
/// Octaves above 1024 µs: covers up to 2^64 µs.
const OCTAVES: u64 = 54;
const BUCKETS: usize = (LINEAR + PER_OCTAVE * OCTAVES) as usize;

pub struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros < LINEAR {
        return micros as usize;
    }
    let e = u64::from(63 - micros.leading_zeros()) - 9;
    (LINEAR + PER_OCTAVE * (e - 1) + ((micros >> e) - PER_OCTAVE)) as usize
}

/// Lowest value that maps to `bucket`.
fn bucket_floor(bucket: usize) -> u64 {
    let b = bucket as u64;
    if b < LINEAR {
        return b;
    }
    let e = (b - LINEAR) / PER_OCTAVE + 1;
    let mantissa = (b - LINEAR) % PER_OCTAVE + PER_OCTAVE;
    mantissa << e
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn record(&self, micros: u64) {
        if let Some(bucket) = self.buckets.get(bucket_of(micros)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.max.fetch_max(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Smallest bucket floor with at least q of the samples at or below it; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                return bucket_floor(index).min(self.max());
            }
        }
        self.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_a_fifth_of_a_percent() {
        for v in [
            0,
            1,
            1023,
            1024,
            1025,
            2047,
            2048,
            123_456,
            9_999_999,
            u64::MAX / 3,
        ] {
            let floor = bucket_floor(bucket_of(v));
            assert!(floor <= v, "{v}: floor {floor}");
            assert!((v - floor) as f64 <= v as f64 * 0.002, "{v}: floor {floor}");
            assert!(bucket_of(v) < BUCKETS);
        }
    }

    #[test]
    fn quantiles_of_a_uniform_sample() {
        let h = Histogram::new();
        for v in 1..=10_000 {
            h.record(v);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.max(), 10_000);
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((4_980..=5_000).contains(&p50), "p50 {p50}");
        assert!((9_870..=9_900).contains(&p99), "p99 {p99}");
        assert_eq!(Histogram::new().quantile(0.5), 0);
    }
}
