//! Envoy glue: the proxy-wasm callbacks' logic, written against the [`host::Host`] trait so it
//! runs natively under [`mock::MockHost`] in tests. `crate::wasm` adapts it to proxy-wasm.
//!
//! - [`vm`]: per-VM state (root context): config, router, discovery poll, shared view, stats flush.
//! - [`stream`]: per-HTTP-stream logic (HTTP context): placement, counting, outcome.
//! - [`fleet`]: probing pods for load reports, sharing them, answering probes (reporter role).
//! - [`shared`]: everything kept in proxy-wasm shared data, and the one compare-and-swap update.
//! - [`stats`]: what is counted between ticks and flushed as Envoy stats;
//!   [`metrics`]: stat names with tags encoded for Envoy's tag extraction.

pub mod fleet;
pub mod host;
pub mod metrics;
pub mod shared;
pub mod stats;
pub mod stream;
pub mod vm;

#[cfg(any(test, feature = "mock-host"))]
pub mod mock;

#[cfg(test)]
mod tests;
