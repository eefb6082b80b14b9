//! The stream table: every open stream this VM placed or saw, with its measured rate.
//!
//! A stream's load estimate blends what was expected at placement with what has been measured:
//!
//! ```text
//! estimate_s = ewma_s + prior_s · e^(−age_s/τ)
//! ```
//!
//! The EWMA starts at 0 and, for a stream at constant rate r, equals r · (1 − e^(−age/τ)); the
//! second term supplies exactly the part not yet learned, so the estimate is r at any age when the
//! prior is right, and converges to the measurement when it is not.

use std::hash::{BuildHasherDefault, Hasher};

use hashbrown::HashMap;

use super::ewma::RateEwma;
use super::rng::splitmix64;
use super::Nanos;
use super::{ClusterIdx, RouteIdx};

/// Direction of a DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Upstream,
    /// Upstream to client.
    Downstream,
}

impl Direction {
    /// Index into per-direction `[upstream, downstream]` arrays.
    pub fn index(self) -> usize {
        match self {
            Direction::Upstream => 0,
            Direction::Downstream => 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Stream {
    pub cluster: ClusterIdx,
    pub route: RouteIdx,
    /// Endpoint carrying the stream (named by us, then corrected by the real upstream).
    pub endpoint: Option<usize>,
    pub started: Nanos,
    /// Expected rate at placement (signal units per second).
    pub prior: f64,
    /// The prior is the stream's own remembered rate, not the route's mean.
    pub known_prior: bool,
    pub rate: RateEwma,
    /// `prior · e^(−age/τ)` as of the last tick (what `local_pending` holds for this stream).
    pub pending: f64,
    /// Signal units counted since the last tick.
    pub unticked: f64,
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
    /// Hash of the stream's source key (rate memory), if any.
    pub key: Option<u64>,
    /// When its rate was last written to the rate memory.
    pub remembered_at: Nanos,
    /// Chosen by the rebalancer to move (at `planned_at`).
    pub move_planned: bool,
    pub planned_at: Nanos,
    /// Its response has started and resets are not allowed: it cannot be moved.
    pub unmovable: bool,
    /// Its prior's weight `e^((started − t0)/τ)` against the router's young epoch t0 (see
    /// [`crate::router::Router::tick`]); what it adds to its endpoint's `young`.
    pub young: f64,
}

impl Stream {
    pub fn new(
        cluster: ClusterIdx,
        route: RouteIdx,
        endpoint: Option<usize>,
        now: Nanos,
        prior: f64,
    ) -> Self {
        Stream {
            cluster,
            route,
            endpoint,
            started: now,
            prior,
            known_prior: false,
            rate: RateEwma::default(),
            pending: prior,
            unticked: 0.0,
            messages: [0; 2],
            bytes: [0; 2],
            key: None,
            remembered_at: now,
            move_planned: false,
            planned_at: 0,
            unmovable: false,
            young: 1.0,
        }
    }

    /// More than one message either way, or running for `after`: not a short unary exchange.
    pub fn is_streaming(&self, now: Nanos, after: Nanos) -> bool {
        self.messages.iter().any(|&m| m > 1) || now.saturating_sub(self.started) >= after
    }

    /// Measured rate, bias-corrected for the EWMA's start at 0: `ewma / (1 − e^(−age/τ))`.
    pub fn measured_rate(&self, now: Nanos, tau_secs: f64) -> f64 {
        let learned = 1.0 - super::ewma::prior_weight(now.saturating_sub(self.started), tau_secs);
        if learned > 1e-6 {
            self.rate.value() / learned
        } else {
            self.prior
        }
    }

    pub fn estimate(&self) -> f64 {
        self.rate.value() + self.pending
    }

    /// What it adds to its endpoint's sums: nothing while it is planned to move (its load is
    /// set aside).
    pub fn counted(&self) -> Counted {
        if self.move_planned {
            Counted::default()
        } else {
            self.load()
        }
    }

    /// Its rate EWMA, pending prior and young weight, planned to move or not.
    pub fn load(&self) -> Counted {
        Counted {
            rate: self.rate.value(),
            pending: self.pending,
            young: self.young,
        }
    }
}

/// What a stream adds to its endpoint's sums (`local_rate`, `local_pending`, `young`; see
/// [`crate::endpoints::Cluster::add_stream_load`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counted {
    pub rate: f64,
    pub pending: f64,
    pub young: f64,
}

impl Counted {
    /// A stream known only by its prior (placement, tests).
    pub fn prior(pending: f64) -> Self {
        Counted {
            pending,
            ..Counted::default()
        }
    }
}

/// Hashes a stream id with SplitMix64: fast, and the same in every run, so the table iterates
/// in one order for one history (hashbrown's default hasher is seeded per process, which made
/// the simulator's results differ run to run). Stream ids are Envoy's context ids, not chosen
/// by clients.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = splitmix64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = splitmix64(self.0 ^ id);
    }
}

#[derive(Debug, Default)]
pub struct StreamTable {
    map: HashMap<u64, Stream, BuildHasherDefault<IdHasher>>,
}

impl StreamTable {
    pub fn insert(&mut self, id: u64, s: Stream) -> Option<Stream> {
        self.map.insert(id, s)
    }
    pub fn get(&self, id: u64) -> Option<&Stream> {
        self.map.get(&id)
    }
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Stream> {
        self.map.get_mut(&id)
    }
    pub fn remove(&mut self, id: u64) -> Option<Stream> {
        self.map.remove(&id)
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Stream)> {
        self.map.iter()
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Stream)> {
        self.map.iter_mut()
    }

    /// Streams matching `which`, at least `min_age` old, not planned to move nor unmovable, as
    /// (id, estimate), largest estimate first (ties by id).
    pub fn movable(
        &self,
        which: impl Fn(&Stream) -> bool,
        now: Nanos,
        min_age: Nanos,
    ) -> Vec<(u64, f64)> {
        let mut eligible: Vec<(u64, f64)> = self
            .map
            .iter()
            .filter(|(_, s)| {
                !s.move_planned
                    && !s.unmovable
                    && now.saturating_sub(s.started) >= min_age
                    && which(s)
            })
            .map(|(&id, s)| (id, s.estimate()))
            .collect();
        eligible.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        eligible
    }
}

/// From `candidates` (largest first), the ones that fit in `room` taken greedily: largest
/// estimate that still fits the room left first, at most `max` of them.
pub fn fitting(candidates: &[(u64, f64)], room: f64, max: usize) -> Vec<(u64, f64)> {
    let mut left = room;
    let mut chosen = Vec::new();
    for &(id, est) in candidates {
        if chosen.len() >= max || left <= 0.0 {
            break;
        }
        if est > 0.0 && est <= left {
            chosen.push((id, est));
            left -= est;
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn estimate_is_prior_then_measurement() {
        let mut s = Stream::new(ClusterIdx(0), RouteIdx(0), Some(0), 0, 10.0);
        assert_eq!(s.estimate(), 10.0);
        // Measured at 30/s for 3 τ: pending decays, EWMA approaches 30.
        let tau = 1.0;
        s.rate.update(90.0, 3.0, tau);
        s.pending = 10.0 * (-3.0f64).exp();
        let truth = 30.0 * (1.0 - (-3.0f64).exp()) + 10.0 * (-3.0f64).exp();
        assert!((s.estimate() - truth).abs() < 1e-9);
    }

    #[test]
    fn moves_fit_the_excess_with_few_streams() {
        let mut t = StreamTable::default();
        for (id, rate, started) in [
            (1, 50.0, 0),
            (2, 30.0, 0),
            (3, 20.0, 0),
            (4, 5.0, 0),
            (5, 25.0, 900),
        ] {
            let mut s = Stream::new(ClusterIdx(0), RouteIdx(0), Some(7), started, rate);
            s.pending = rate;
            t.insert(id, s);
        }
        t.insert(
            6,
            Stream::new(ClusterIdx(0), RouteIdx(0), Some(8), 0, 100.0),
        ); // other endpoint
        let on_7 = |s: &Stream| s.cluster == ClusterIdx(0) && s.endpoint == Some(7);
        let movable = t.movable(on_7, 1000, 500);
        assert_eq!(movable, vec![(1, 50.0), (2, 30.0), (3, 20.0), (4, 5.0)]); // 25 too young
        assert_eq!(fitting(&movable, 36.0, 10), vec![(2, 30.0), (4, 5.0)]); // 50 too big
        assert_eq!(fitting(&movable, 36.0, 1), vec![(2, 30.0)]);
        assert!(fitting(&movable, 0.0, 10).is_empty());
        assert!(fitting(&movable, 4.0, 10).is_empty()); // none fits (the planner decides)
    }
}
