//! The cross-worker load view: Envoy runs one VM per worker, each seeing only its own streams.
//! Every VM publishes its per-endpoint load into one shared-data record, under compare-and-swap,
//! and reads the sum of the others'.
//!
//! The record holds one *slot* per VM (its id, when it last wrote, its loads). A VM replaces its
//! own slot only, so concurrent writers never double count, and slots not refreshed within
//! `expire_after` are dropped, so a VM that died (or was reloaded) stops counting.
//!
//! Encoding, version 1 (all integers little-endian):
//!
//! ```text
//! "SLV" 0x01 | u32 slots | per slot: u64 vm, u64 updated_at, u32 entries
//!            | per entry: str cluster, str address, f32 load, u32 active      (str = u16 len + bytes)
//! ```

use std::fmt;

use super::Nanos;

const MAGIC: &[u8; 4] = b"SLV\x01";

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub cluster: String,
    pub address: String,
    pub load: f32,
    pub active: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub vm: u64,
    pub updated_at: Nanos,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ViewError(pub &'static str);

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shared load view: {}", self.0)
    }
}

pub fn encode(slots: &[Slot]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        8 + slots
            .iter()
            .map(|s| 20 + s.entries.len() * 40)
            .sum::<usize>(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    for s in slots {
        out.extend_from_slice(&s.vm.to_le_bytes());
        out.extend_from_slice(&s.updated_at.to_le_bytes());
        out.extend_from_slice(&(s.entries.len() as u32).to_le_bytes());
        for e in &s.entries {
            put_str(&mut out, &e.cluster);
            put_str(&mut out, &e.address);
            out.extend_from_slice(&e.load.to_le_bytes());
            out.extend_from_slice(&e.active.to_le_bytes());
        }
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let b = b.get(..b.len().min(u16::MAX as usize)).unwrap_or_default();
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ViewError> {
        if self.0.len() < n {
            return Err(ViewError("truncated record"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ViewError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ViewError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ViewError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ViewError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, ViewError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| ViewError("string is not UTF-8"))
    }
}

pub fn decode(bytes: &[u8]) -> Result<Vec<Slot>, ViewError> {
    let mut r = Reader(bytes);
    if r.take(4)? != MAGIC {
        return Err(ViewError("unknown magic or version"));
    }
    let n = r.u32()? as usize;
    // Every slot takes at least 20 bytes: never trust a count the input cannot hold.
    let mut slots = Vec::with_capacity(n.min(r.0.len() / 20));
    for _ in 0..n {
        let vm = r.u64()?;
        let updated_at = r.u64()?;
        let m = r.u32()? as usize;
        let mut entries = Vec::with_capacity(m.min(r.0.len() / 12));
        for _ in 0..m {
            entries.push(Entry {
                cluster: r.string()?,
                address: r.string()?,
                load: f32::from_le_bytes(r.array()?),
                active: r.u32()?,
            });
        }
        slots.push(Slot {
            vm,
            updated_at,
            entries,
        });
    }
    if !r.0.is_empty() {
        return Err(ViewError("trailing bytes"));
    }
    Ok(slots)
}

/// The record after `mine` replaces this VM's slot in `current`; expired slots are dropped.
/// A corrupt `current` is replaced (the error is returned beside, for the caller to count).
pub fn merge(
    current: Option<&[u8]>,
    mine: Slot,
    now: Nanos,
    expire_after: Nanos,
) -> (Vec<u8>, Option<ViewError>) {
    let (mut slots, error) = match current.map(decode) {
        None => (Vec::new(), None),
        Some(Ok(s)) => (s, None),
        Some(Err(e)) => (Vec::new(), Some(e)),
    };
    slots.retain(|s| s.vm != mine.vm && now.saturating_sub(s.updated_at) <= expire_after);
    slots.push(mine);
    (encode(&slots), error)
}

/// The other VMs' live entries.
pub fn others(
    slots: &[Slot],
    vm: u64,
    now: Nanos,
    expire_after: Nanos,
) -> impl Iterator<Item = &Entry> {
    slots
        .iter()
        .filter(move |s| s.vm != vm && now.saturating_sub(s.updated_at) <= expire_after)
        .flat_map(|s| s.entries.iter())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn slot(vm: u64, at: Nanos, loads: &[(&str, f32, u32)]) -> Slot {
        Slot {
            vm,
            updated_at: at,
            entries: loads
                .iter()
                .map(|(a, l, n)| Entry {
                    cluster: "pods".into(),
                    address: (*a).into(),
                    load: *l,
                    active: *n,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let slots = vec![slot(1, 10, &[("10.0.0.1:80", 2.5, 3)]), slot(2, 11, &[])];
        assert_eq!(decode(&encode(&slots)).unwrap(), slots);
        assert_eq!(decode(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn concurrent_workers_each_own_one_slot_and_dead_ones_expire() {
        let (rec, err) = merge(None, slot(1, 100, &[("a", 1.0, 1)]), 100, 50);
        assert!(err.is_none());
        let (rec, _) = merge(Some(&rec), slot(2, 110, &[("a", 2.0, 2)]), 110, 50);
        let (rec, _) = merge(Some(&rec), slot(1, 120, &[("a", 4.0, 4)]), 120, 50);
        let slots = decode(&rec).unwrap();
        assert_eq!(slots.len(), 2);
        let seen_by_2: f32 = others(&slots, 2, 120, 50).map(|e| e.load).sum();
        assert_eq!(seen_by_2, 4.0); // vm 1's latest, not its sum over writes
                                    // vm 2 stops writing: after expire_after it no longer counts, and is dropped on merge.
        assert_eq!(others(&slots, 1, 200, 50).count(), 0);
        let (rec, _) = merge(Some(&rec), slot(1, 200, &[]), 200, 50);
        assert_eq!(decode(&rec).unwrap().len(), 1);
    }

    #[test]
    fn corrupt_records_are_errors_and_get_replaced() {
        let good = encode(&[slot(1, 1, &[("x", 1.0, 1)])]);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut {cut}");
        }
        let mut rng = Rng::new(11);
        for _ in 0..2000 {
            let mut b = good.clone();
            let i = rng.below(b.len());
            b[i] = rng.next_u64() as u8;
            let _ = decode(&b); // must not panic
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
        let (rec, err) = merge(Some(b"garbage"), slot(3, 5, &[]), 5, 10);
        assert!(err.is_some());
        assert_eq!(decode(&rec).unwrap().len(), 1);
    }
}
