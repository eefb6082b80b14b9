//! Rate memory: each stream source's last measured rate, so that a reconnecting device is placed
//! by its own rate instead of the mean (known-size placement approaches LPT).
//!
//! Fixed memory whatever the fleet size: `capacity` entries in `capacity / WAYS` buckets of at
//! most [`WAYS`] entries (16 bytes each: key hash, rate, last seen). A full bucket evicts its
//! least recently seen entry. Keys are stored as 64-bit hashes, never as strings, and never
//! reach a metric label. Buckets live in Envoy shared data (one key per bucket), so all workers
//! of a proxy share the memory; a bucket is read once per new stream with a key and written
//! with compare-and-swap on the tick.

use super::Nanos;

/// Entries per bucket.
pub const WAYS: usize = 32;
const ENTRY: usize = 16;

/// 64-bit FNV-1a with a final avalanche (splitmix64), stable across builds and platforms.
pub fn key_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

pub fn bucket_count(capacity: usize) -> usize {
    capacity.div_ceil(WAYS).max(1)
}

pub fn bucket_of(hash: u64, buckets: usize) -> usize {
    (hash % buckets.max(1) as u64) as usize
}

/// Shared-data key of a bucket.
pub fn shared_key(bucket: usize) -> String {
    format!("streamlb.rates.{bucket}")
}

pub fn seconds(now: Nanos) -> u32 {
    (now / 1_000_000_000).min(u64::from(u32::MAX)) as u32
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    hash: u64,
    rate: f32,
    seen: u32,
}

/// One bucket of the memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bucket {
    entries: Vec<Entry>,
}

impl Bucket {
    /// Decode a bucket; anything malformed decodes as far as it is whole, at most [`WAYS`]
    /// entries, non-finite or negative rates dropped.
    pub fn decode(bytes: &[u8]) -> Bucket {
        let entries = bytes
            .chunks_exact(ENTRY)
            .take(WAYS)
            .filter_map(|c| {
                let hash = u64::from_le_bytes(c.get(0..8)?.try_into().ok()?);
                let rate = f32::from_le_bytes(c.get(8..12)?.try_into().ok()?);
                let seen = u32::from_le_bytes(c.get(12..16)?.try_into().ok()?);
                (rate.is_finite() && rate >= 0.0).then_some(Entry { hash, rate, seen })
            })
            .collect();
        Bucket { entries }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * ENTRY);
        for e in &self.entries {
            out.extend_from_slice(&e.hash.to_le_bytes());
            out.extend_from_slice(&e.rate.to_le_bytes());
            out.extend_from_slice(&e.seen.to_le_bytes());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The remembered rate, if seen within `max_age_secs`.
    pub fn get(&self, hash: u64, now_secs: u32, max_age_secs: u32) -> Option<f64> {
        self.entries
            .iter()
            .find(|e| e.hash == hash && now_secs.saturating_sub(e.seen) <= max_age_secs)
            .map(|e| f64::from(e.rate))
    }

    /// Remember `rate` for `hash`, evicting the least recently seen entry when full.
    pub fn put(&mut self, hash: u64, rate: f64, now_secs: u32) {
        let entry = Entry {
            hash,
            rate: rate.max(0.0) as f32,
            seen: now_secs,
        };
        if let Some(e) = self.entries.iter_mut().find(|e| e.hash == hash) {
            *e = entry;
        } else if self.entries.len() < WAYS {
            self.entries.push(entry);
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|e| e.seen) {
            *oldest = entry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn remembers_updates_and_expires() {
        let mut b = Bucket::default();
        b.put(1, 25.0, 100);
        b.put(2, 5.0, 100);
        b.put(1, 30.0, 110);
        assert_eq!(b.get(1, 120, 60), Some(30.0));
        assert_eq!(b.get(2, 200, 60), None); // too old
        assert_eq!(b.get(3, 120, 60), None);
        assert_eq!(Bucket::decode(&b.encode()), b);
    }

    #[test]
    fn full_bucket_evicts_least_recently_seen() {
        let mut b = Bucket::default();
        for i in 0..WAYS as u64 {
            b.put(i, i as f64, 1000 + i as u32);
        }
        b.put(999, 1.0, 5000);
        assert_eq!(b.len(), WAYS);
        assert_eq!(b.get(0, 5000, u32::MAX), None);
        assert_eq!(b.get(999, 5000, u32::MAX), Some(1.0));
        assert_eq!(b.get(1, 5000, u32::MAX), Some(1.0));
    }

    #[test]
    fn garbage_decodes_bounded() {
        let mut rng = Rng::new(4);
        for len in [0, 1, 15, 16, 17, 1000, 100_000] {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            assert!(Bucket::decode(&bytes).len() <= WAYS);
        }
    }

    /// A million distinct devices: memory never exceeds `capacity × 16` bytes, and the most
    /// recent devices are all still remembered.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn a_million_keys_stay_within_the_bound() {
        let capacity = 65_536;
        let n_buckets = bucket_count(capacity);
        let mut buckets = vec![Bucket::default(); n_buckets];
        let n = 1_000_000u32;
        for i in 0..n {
            let h = key_hash(format!("device-{i}").as_bytes());
            buckets[bucket_of(h, n_buckets)].put(h, f64::from(i % 100), i / 100);
        }
        let bytes: usize = buckets.iter().map(|b| b.encode().len()).sum();
        assert!(bytes <= capacity * 16, "{bytes} bytes");
        assert!(buckets.iter().all(|b| b.len() <= WAYS));
        let recent = (n - 20_000..n)
            .filter(|i| {
                let h = key_hash(format!("device-{i}").as_bytes());
                buckets[bucket_of(h, n_buckets)].get(h, n / 100, u32::MAX)
                    == Some(f64::from(i % 100))
            })
            .count();
        assert!(recent >= 19_800, "{recent} of the last 20,000 remembered");
    }
}
