//! The routing core: pure, deterministic given its inputs (time in ns, a seeded RNG).

pub mod config;
pub mod discovery;
pub mod endpoints;
pub mod ewma;
pub mod fleet;
pub mod grpc_framing;
pub mod grpc_status;
pub mod orca;
pub mod penalty;
pub mod pick;
pub mod rate_memory;
pub mod rebalance;
pub mod reporter;
pub mod rng;
pub mod router;
pub mod routes;
pub mod shared_view;
pub mod slow_start;
pub mod streams;
pub mod zone;

/// Time in nanoseconds, as Envoy reports it (`get_current_time`). Only differences matter.
pub type Nanos = u64;

/// Nanoseconds per second.
pub const NANOS_PER_SEC: f64 = 1e9;
