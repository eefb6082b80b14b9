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

/// A configured cluster: its position in `Config::clusters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClusterIdx(pub usize);

/// A route name interned by the router ([`routes::RouteNames`]); 0 is the fold-over `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RouteIdx(pub usize);

/// Time in nanoseconds, as Envoy reports it (`get_current_time`). Only differences matter.
pub type Nanos = u64;

/// Nanoseconds per second.
pub const NANOS_PER_SEC: f64 = 1e9;
