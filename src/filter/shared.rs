//! Everything streamlb keeps in proxy-wasm shared data (one store per Envoy, seen by all its
//! VMs at once): the keys, a bounds-checked reader of fixed-width fields, and the one
//! compare-and-swap update every writer uses.
//!
//! | key | holds | written |
//! |---|---|---|
//! | `streamlb.vm_seq` | u64: the last VM id | CAS, once per VM |
//! | `streamlb.discovery.lease` | u64 holder, u64 expiry (ns) | CAS, by the lease holder |
//! | `streamlb.discovery.snapshot` | the endpoints of the configured clusters (`discovery`) | by the lease holder |
//! | `streamlb.load` | one slot per VM: its per-endpoint load (`shared_view`), and its reporter figures | CAS, every tick |
//! | `streamlb.rebalance.budget` | the proxy's recent moves (`rebalance::Budget`) | CAS, when moves are planned |
//! | `streamlb.config.generation` | u64 generation, u64 hash of the configuration text | CAS, on a configuration's first tick |
//! | `streamlb.rate_memory.secret` | the key of the rate memory's hash | once per Envoy |
//! | `streamlb.rate.<bucket>` | one bucket of the rate memory (`rate_memory`) | CAS, when rates are remembered |
//! | `streamlb.fleet.v2.<cluster>` | the pods' fresh load reports (`fleet`) | by the prober, on each tick and between ticks when a report arrived |
//! | `streamlb.placing` | u64: when a worker last placed a stream on a route that is not unary (ns) | by a VM that placed one, at most once per timer event |

use super::host::{Host, HostError};

pub const VM_SEQ_KEY: &str = "streamlb.vm_seq";
pub const LEASE_KEY: &str = "streamlb.discovery.lease";
pub const SNAPSHOT_KEY: &str = "streamlb.discovery.snapshot";
pub const LOAD_KEY: &str = "streamlb.load";
/// The proxy's churn budget: every worker's planned moves, claimed with compare-and-swap.
pub const BUDGET_KEY: &str = "streamlb.rebalance.budget";
/// The newest configuration: generation (u64 LE) and hash of its text (u64 LE).
pub const GENERATION_KEY: &str = "streamlb.config.generation";
/// When a worker last placed a stream on a route that is not unary (u64 LE, ns): the prober
/// probes at `probe.placing_interval_ms` meanwhile.
pub const PLACING_KEY: &str = "streamlb.placing";
/// The rate memory's hash key (one per Envoy).
pub const SECRET_KEY: &str = "streamlb.rate_memory.secret";

/// A cluster's published load reports (v2: with the pods' stream counts; a VM of an older
/// build reads none of them rather than misreading them).
pub fn reports_key(cluster: &str) -> String {
    format!("streamlb.fleet.v2.{cluster}")
}

/// Attempts of one compare-and-swap update before it is given up (and counted lost).
pub const CAS_ATTEMPTS: usize = 8;

/// The little-endian u64 at `offset`, if the value reaches that far.
pub fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    let field = bytes.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

/// What an update does with the value it read.
pub enum Step<T> {
    /// Write these bytes (compare-and-swap against what was read), then return `T`.
    Write(Vec<u8>, T),
    /// Leave the value as it is and return `T`.
    Keep(T),
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpdateError {
    /// A host call failed.
    Host(HostError),
    /// Every attempt lost its compare-and-swap to another VM: nothing was written.
    Lost,
}

/// Read-modify-write `key`: `next` gets the current value (`None`: absent) and decides. A write
/// that loses its compare-and-swap reads again and retries, up to [`CAS_ATTEMPTS`] times; each
/// conflict adds 1 to `conflicts`.
pub fn update<T>(
    host: &dyn Host,
    key: &str,
    conflicts: &mut u64,
    mut next: impl FnMut(Option<&[u8]>) -> Step<T>,
) -> Result<T, UpdateError> {
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = host.shared_get(key).map_err(UpdateError::Host)?;
        match next(current.as_deref()) {
            Step::Keep(out) => return Ok(out),
            Step::Write(bytes, out) => match host.shared_set(key, &bytes, cas) {
                Ok(()) => return Ok(out),
                Err(HostError::CasMismatch) => *conflicts += 1,
                Err(e) => return Err(UpdateError::Host(e)),
            },
        }
    }
    Err(UpdateError::Lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::mock::{MockHost, SharedStore};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn fields_are_read_within_bounds_only() {
        let bytes = [1u8, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(u64_at(&bytes, 0), Some(1));
        assert_eq!(u64_at(&bytes, 1), Some(2 << 56));
        assert_eq!(u64_at(&bytes, 2), None);
        assert_eq!(u64_at(&bytes, usize::MAX), None);
    }

    #[test]
    fn an_update_retries_on_conflict_and_is_lost_after_the_last_attempt() {
        let h = MockHost::with_store(SharedStore::default());
        let mut conflicts = 0;
        let n = update(&h, "k", &mut conflicts, |v| {
            let n = v.and_then(|b| u64_at(b, 0)).unwrap_or(0) + 1;
            Step::Write(n.to_le_bytes().to_vec(), n)
        });
        assert_eq!((n, conflicts), (Ok(1), 0));
        // Another VM writes between every read and write: every attempt loses.
        let other = MockHost::with_store(h.shared.clone());
        let lost = update(&h, "k", &mut conflicts, |v| {
            assert!(other.shared_set("k", b"other", None).is_ok());
            Step::Write(v.unwrap_or_default().to_vec(), ())
        });
        assert_eq!(lost, Err(UpdateError::Lost));
        assert_eq!(conflicts, CAS_ATTEMPTS as u64);
        // Keep writes nothing.
        let kept = update(&h, "k", &mut conflicts, |v| {
            Step::Keep(v.map(<[u8]>::to_vec))
        });
        assert_eq!(kept, Ok(Some(b"other".to_vec())));
    }
}
