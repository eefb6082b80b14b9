//! Rate memory: each stream source's last measured rate, so that a reconnecting device is placed
//! by its own rate instead of the mean (known-size placement approaches LPT).
//!
//! Fixed memory whatever the fleet size: `capacity` entries in `capacity / WAYS` buckets of at
//! most [`WAYS`] entries (24 bytes each: key hash, rate, last seen, and the destination of a
//! planned move with its deadline: a device the rebalancer moves reconnects to where room was
//! found for it, whichever worker its new connection reaches). A full bucket evicts its
//! least recently seen entry. Keys are stored as 64-bit hashes, never as strings, and never
//! reach a metric label. The hash is keyed with a random per-Envoy secret, so ids cannot be
//! chosen to fill one bucket, and the router caps what a remembered rate may claim. Buckets live in Envoy shared data (one key per bucket), so all workers
//! of a proxy share the memory; a bucket is read once per new stream with a key and written
//! with compare-and-swap on the tick.

use super::Nanos;

/// Entries per bucket.
pub const WAYS: usize = 32;
const ENTRY: usize = 24;
/// First bytes of an encoded bucket; a bucket of another layout (an older module in the same
/// Envoy) reads as empty.
const MAGIC: &[u8; 4] = b"SRM2";

/// A 32-bit tag of an endpoint address (FNV-1a), for move destinations.
pub fn address_tag(address: &str) -> u32 {
    address.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// What the memory holds for a source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remembered {
    pub rate: f64,
    /// [`address_tag`] of the endpoint a planned move found room on, until its deadline.
    pub to: Option<u32>,
}

/// The proxy's secret key for [`key_hash`]: random per Envoy, generated once and kept in shared
/// data so that all its workers agree.
pub type Secret = [u64; 2];

/// Keyed 64-bit hash of a source key: SipHash-2-4 keyed with the proxy's secret. Without the
/// secret nobody can craft ids that land in one bucket (and evict each other's entries).
pub fn key_hash(secret: &Secret, bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let [k0, k1] = *secret;
    // std's SipHasher is SipHash-2-4; it is deprecated only in favour of DefaultHasher, whose
    // algorithm is unspecified and whose keys cannot be set.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
    h.write(bytes);
    h.finish()
}

/// A fresh random secret (std's `RandomState` draws its keys from the OS; under WASI from
/// `random_get`, which Envoy implements).
pub fn new_secret() -> Secret {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let draw = |i: u64| {
        let mut h = state.build_hasher();
        h.write_u64(i);
        h.finish()
    };
    [draw(1), draw(2)]
}

pub fn encode_secret(secret: &Secret) -> Vec<u8> {
    secret.iter().flat_map(|k| k.to_le_bytes()).collect()
}

/// The secret stored in shared data, if it is whole.
pub fn decode_secret(bytes: &[u8]) -> Option<Secret> {
    let k0 = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
    let k1 = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    (bytes.len() == 16).then_some([k0, k1])
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
    /// Move destination tag and the second until which it holds (0: none).
    to: u32,
    to_until: u32,
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
        let Some(body) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return Bucket::default();
        };
        let u32_at = |c: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(c.get(at..at + 4)?.try_into().ok()?))
        };
        let entries = body
            .chunks_exact(ENTRY)
            .take(WAYS)
            .filter_map(|c| {
                let hash = u64::from_le_bytes(c.get(0..8)?.try_into().ok()?);
                let rate = f32::from_bits(u32_at(c, 8)?);
                let (seen, to, to_until) = (u32_at(c, 12)?, u32_at(c, 16)?, u32_at(c, 20)?);
                (rate.is_finite() && rate >= 0.0).then_some(Entry {
                    hash,
                    rate,
                    seen,
                    to,
                    to_until,
                })
            })
            .collect();
        Bucket { entries }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + self.entries.len() * ENTRY);
        out.extend_from_slice(MAGIC);
        for e in &self.entries {
            out.extend_from_slice(&e.hash.to_le_bytes());
            out.extend_from_slice(&e.rate.to_le_bytes());
            out.extend_from_slice(&e.seen.to_le_bytes());
            out.extend_from_slice(&e.to.to_le_bytes());
            out.extend_from_slice(&e.to_until.to_le_bytes());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The remembered rate, if seen within `max_age_secs`, with a move destination that has
    /// not passed its deadline.
    pub fn get(&self, hash: u64, now_secs: u32, max_age_secs: u32) -> Option<Remembered> {
        self.entries
            .iter()
            .find(|e| e.hash == hash && now_secs.saturating_sub(e.seen) <= max_age_secs)
            .map(|e| Remembered {
                rate: f64::from(e.rate),
                to: (e.to_until >= now_secs && e.to_until > 0).then_some(e.to),
            })
    }

    /// Remember `rate` for `hash` (a move destination it has holds until its deadline: the
    /// moved stream's own end writes its rate again), evicting the least recently seen entry
    /// when full.
    pub fn put(&mut self, hash: u64, rate: f64, now_secs: u32) {
        let entry = Entry {
            hash,
            rate: rate.max(0.0) as f32,
            seen: now_secs,
            to: 0,
            to_until: 0,
        };
        if let Some(e) = self.entries.iter_mut().find(|e| e.hash == hash) {
            (e.rate, e.seen) = (entry.rate, entry.seen);
        } else if self.entries.len() < WAYS {
            self.entries.push(entry);
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|e| e.seen) {
            *oldest = entry;
        }
    }

    /// A planned move of `hash`'s stream found room on the endpoint tagged `to`: its
    /// reconnection goes there until `until_secs`. Only for a source already remembered.
    pub fn send_to(&mut self, hash: u64, to: u32, until_secs: u32) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.hash == hash) {
            e.to = to;
            e.to_until = until_secs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SECRET: Secret = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];

    #[test]
    fn key_hash_is_keyed_siphash() {
        // The SipHash-2-4 reference vector: key 00..0f, message 00..0e.
        let message: Vec<u8> = (0..15).collect();
        assert_eq!(key_hash(&SECRET, &message), 0xa129_ca61_49be_45e5);
        let s = new_secret();
        assert_ne!(s, new_secret());
        assert_eq!(decode_secret(&encode_secret(&s)), Some(s));
        assert_eq!(decode_secret(&[1, 2, 3]), None);
    }

    /// Ids crafted to share one bucket under one secret spread out under another: without the
    /// proxy's secret an attacker cannot aim at a bucket.
    #[test]
    fn other_secrets_put_ids_in_other_buckets() {
        let buckets = bucket_count(65_536);
        let other: Secret = [0x1234_5678, 0x9abc_def0];
        let crafted: Vec<String> = (0..200_000)
            .map(|i| format!("device-{i}"))
            .filter(|id| bucket_of(key_hash(&SECRET, id.as_bytes()), buckets) == 7)
            .take(2 * WAYS)
            .collect();
        assert_eq!(crafted.len(), 2 * WAYS);
        let mut spread: Vec<usize> = crafted
            .iter()
            .map(|id| bucket_of(key_hash(&other, id.as_bytes()), buckets))
            .collect();
        spread.sort_unstable();
        spread.dedup();
        assert!(spread.len() >= 2 * WAYS - 4, "{} buckets", spread.len());
        let moved = (0..1000)
            .map(|i| format!("meter-{i}"))
            .filter(|id| key_hash(&SECRET, id.as_bytes()) != key_hash(&other, id.as_bytes()))
            .count();
        assert_eq!(moved, 1000);
    }

    #[test]
    fn remembers_updates_and_expires() {
        let mut b = Bucket::default();
        b.put(1, 25.0, 100);
        b.put(2, 5.0, 100);
        b.put(1, 30.0, 110);
        assert_eq!(b.get(1, 120, 60).map(|r| r.rate), Some(30.0));
        assert_eq!(b.get(2, 200, 60).map(|r| r.rate), None); // too old
        assert_eq!(b.get(3, 120, 60).map(|r| r.rate), None);
        assert_eq!(Bucket::decode(&b.encode()), b);
    }

    #[test]
    fn a_move_destination_holds_until_its_deadline() {
        let mut b = Bucket::default();
        b.send_to(1, 7, 200); // not remembered: nothing to attach it to
        assert_eq!(b.get(1, 100, 60), None);
        b.put(1, 25.0, 100);
        b.send_to(1, address_tag("10.0.0.1:80"), 105);
        let to = |b: &Bucket, now| b.get(1, now, 60).and_then(|r| r.to);
        assert_eq!(to(&b, 105), Some(address_tag("10.0.0.1:80")));
        assert_eq!(Bucket::decode(&b.encode()), b);
        assert_eq!(to(&b, 106), None); // past the deadline
        b.put(1, 26.0, 101); // the moved stream ended: its rate is written again
        assert_eq!(to(&b, 101), Some(address_tag("10.0.0.1:80")));
        assert_eq!(b.get(1, 101, 60).map(|r| r.rate), Some(26.0));
        assert_ne!(address_tag("10.0.0.1:80"), address_tag("10.0.0.2:80"));
        // A bucket of the older layout (16-byte entries, no version) reads as empty.
        let old: Vec<u8> = [
            1u64.to_le_bytes().as_slice(),
            &25f32.to_le_bytes(),
            &100u32.to_le_bytes(),
        ]
        .concat();
        assert!(Bucket::decode(&old).is_empty());
    }

    #[test]
    fn full_bucket_evicts_least_recently_seen() {
        let mut b = Bucket::default();
        for i in 0..WAYS as u64 {
            b.put(i, i as f64, 1000 + i as u32);
        }
        b.put(999, 1.0, 5000);
        assert_eq!(b.len(), WAYS);
        assert_eq!(b.get(0, 5000, u32::MAX).map(|r| r.rate), None);
        assert_eq!(b.get(999, 5000, u32::MAX).map(|r| r.rate), Some(1.0));
        assert_eq!(b.get(1, 5000, u32::MAX).map(|r| r.rate), Some(1.0));
    }

    #[test]
    fn garbage_decodes_bounded() {
        let mut rng = Rng::new(4);
        for len in [0, 1, 15, 16, 17, 1000, 100_000] {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            assert!(Bucket::decode(&bytes).len() <= WAYS);
        }
    }

    /// A million distinct devices: memory never exceeds `capacity × 24` bytes (+ 4 magic bytes per bucket), and the most
    /// recent devices are all still remembered.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn a_million_keys_stay_within_the_bound() {
        let capacity = 65_536;
        let n_buckets = bucket_count(capacity);
        let mut buckets = vec![Bucket::default(); n_buckets];
        let n = 1_000_000u32;
        for i in 0..n {
            let h = key_hash(&SECRET, format!("device-{i}").as_bytes());
            buckets[bucket_of(h, n_buckets)].put(h, f64::from(i % 100), i / 100);
        }
        let bytes: usize = buckets.iter().map(|b| b.encode().len()).sum();
        assert!(bytes <= capacity * 24 + 4 * n_buckets, "{bytes} bytes");
        assert!(buckets.iter().all(|b| b.len() <= WAYS));
        let recent = (n - 20_000..n)
            .filter(|i| {
                let h = key_hash(&SECRET, format!("device-{i}").as_bytes());
                let got = buckets[bucket_of(h, n_buckets)].get(h, n / 100, u32::MAX);
                got.map(|r| r.rate) == Some(f64::from(i % 100))
            })
            .count();
        assert!(recent >= 19_800, "{recent} of the last 20,000 remembered");
    }
}
