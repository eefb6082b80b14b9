//! The router: one per VM. It owns the endpoint tables of the configured clusters and the
//! stream table, and answers "which endpoint gets this new stream?".
//!
//! A placement, for a stream of route r on cluster c:
//! 1. expected rate `e` = learned mean rate per stream of (c, r), else of c, else
//!    `load.default_stream_rate` (see [`Router::expected_rate`]);
//! 2. zone by [`zone::choose`] (local / spill / no-local / fallback);
//! 3. endpoint by [`pick::pick`] over the zone's healthy endpoints, scoring
//!    `(load_j + e) / capacity_j` (blended with ORCA utilisation when `load.orca_weight > 0`);
//! 4. the stream is recorded with prior `e` on the chosen endpoint, so the next placement sees it.

use hashbrown::HashMap;

use super::config::{Config, LoadSignal};
use super::discovery::ClusterSnapshot;
use super::endpoints::Cluster;
use super::ewma::prior_weight;
use super::orca::OrcaReport;
use super::penalty::Outcome;
use super::pick::{self, pick};
use super::rebalance::{self, Budget, Plan};
use super::rng::Rng;
use super::routes::RouteNames;
use super::streams::{Direction, Stream, StreamTable};
use super::zone::{self, Reason, ZoneChoice};
use super::{Nanos, NANOS_PER_SEC};

/// The answer for one new stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub reason: Reason,
    /// Zone of the primary endpoint ("" when unknown or on fallback).
    pub zone: String,
    pub primary: Option<String>,
    /// Retry choice.
    pub secondary: Option<String>,
    /// Projected load per unit capacity of the primary, relative to the cluster mean
    /// (1.0 = at the mean).
    pub projected: f64,
    pub expected_rate: f64,
}

impl Decision {
    /// Value for the `override_host` header: `primary[,secondary]`.
    pub fn header_value(&self) -> Option<String> {
        let primary = self.primary.as_ref()?;
        Some(match &self.secondary {
            Some(s) => format!("{primary},{s}"),
            None => primary.clone(),
        })
    }

    /// Value for the debug response header.
    pub fn debug_value(&self) -> String {
        format!(
            "zone={};endpoint={};reason={};load={:.3};expected={:.3}",
            self.zone,
            self.primary.as_deref().unwrap_or("-"),
            self.reason.as_str(),
            self.projected,
            self.expected_rate
        )
    }
}

/// What a stream was, returned when it ends (for stats).
#[derive(Debug, Clone, PartialEq)]
pub struct EndedStream {
    pub cluster: usize,
    pub route: usize,
    pub started: Nanos,
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

/// Decision counters since the last [`Router::take_counters`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// (cluster, reason) → decisions.
    pub decisions: HashMap<(usize, Reason), u64>,
    /// (cluster, zone of the chosen endpoint) → decisions.
    pub to_zone: HashMap<(usize, String), u64>,
}

pub struct Router {
    cfg: Config,
    local_zone: String,
    clusters: Vec<Cluster>,
    streams: StreamTable,
    routes: RouteNames,
    /// Learned mean rate per stream: (cluster, route) and per cluster.
    route_rates: HashMap<(usize, usize), f64>,
    cluster_rates: Vec<Option<f64>>,
    rng: Rng,
    last_tick: Option<Nanos>,
    counters: Counters,
    budget: Budget,
    /// (key hash, measured rate) to write to the rate memory.
    rate_updates: Vec<(u64, f64)>,
    /// Other workers of this proxy placing streams at the same time (see [`Router::set_peers`]).
    peers: usize,
}

/// What is known of a new stream's source (rate memory).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Source {
    pub key: u64,
    /// Its remembered rate, if any.
    pub rate: Option<f64>,
}

/// Seconds a stream must run before its rate is worth remembering, and between two updates.
const REMEMBER_AFTER: Nanos = 2_000_000_000;
const REMEMBER_EVERY: Nanos = 10_000_000_000;

impl Router {
    /// `local_zone`: from config, else the node's locality (the caller resolves it).
    pub fn new(cfg: Config, local_zone: &str, seed: u64) -> Self {
        let clusters: Vec<Cluster> = cfg.clusters.iter().map(|c| Cluster::new(c)).collect();
        let n = clusters.len();
        Router {
            routes: RouteNames::new(cfg.max_routes),
            cfg,
            local_zone: local_zone.to_string(),
            clusters,
            streams: StreamTable::default(),
            route_rates: HashMap::new(),
            cluster_rates: vec![None; n],
            rng: Rng::new(seed),
            last_tick: None,
            counters: Counters::default(),
            budget: Budget::default(),
            rate_updates: Vec::new(),
            peers: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn local_zone(&self) -> &str {
        &self.local_zone
    }

    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    pub fn cluster_index(&self, name: &str) -> Option<usize> {
        self.clusters.iter().position(|c| c.name == name)
    }

    pub fn routes(&self) -> &RouteNames {
        &self.routes
    }

    pub fn streams(&self) -> &StreamTable {
        &self.streams
    }

    fn tau_secs(&self) -> f64 {
        self.cfg.load.tau_ms as f64 / 1000.0
    }

    /// Apply a discovery snapshot (clusters not configured are ignored).
    pub fn apply_snapshot(&mut self, now: Nanos, snapshots: &[ClusterSnapshot]) {
        for snap in snapshots {
            let Some(ci) = self.cluster_index(&snap.name) else {
                continue;
            };
            let Some(cluster) = self.clusters.get_mut(ci) else {
                continue;
            };
            let remap = cluster.apply_snapshot(&self.cfg, now, snap);
            for (_, s) in self.streams.iter_mut().filter(|(_, s)| s.cluster == ci) {
                s.endpoint = s.endpoint.and_then(|old| remap.get(old).copied().flatten());
            }
        }
    }

    /// Expected rate of a new stream on (cluster, route): the learned mean rate per stream.
    pub fn expected_rate(&self, cluster: usize, route: usize) -> f64 {
        self.route_rates
            .get(&(cluster, route))
            .copied()
            .or_else(|| self.cluster_rates.get(cluster).copied().flatten())
            .unwrap_or(self.cfg.load.default_stream_rate)
    }

    /// Decide where stream `id` goes and record it. `None` when `cluster` is not configured.
    pub fn place(&mut self, now: Nanos, id: u64, route: &str, cluster: &str) -> Option<Decision> {
        self.place_from(now, id, route, cluster, None)
    }

    /// [`Router::place`] for a stream whose source is known: a remembered rate replaces the
    /// learned mean as the expected rate.
    pub fn place_from(
        &mut self,
        now: Nanos,
        id: u64,
        route: &str,
        cluster: &str,
        source: Option<Source>,
    ) -> Option<Decision> {
        let ci = self.cluster_index(cluster)?;
        let ri = self.routes.intern(route);
        let e = source
            .and_then(|s| s.rate)
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or_else(|| self.expected_rate(ci, ri));
        let stale_after = self.cfg.discovery.stale_after_ms.saturating_mul(1_000_000);
        let orca_weight = self.cfg.load.orca_weight;
        let orca_age = self.cfg.load.orca_max_age_ms.saturating_mul(1_000_000);
        let remembered = source.and_then(|s| s.rate).is_some();
        let choices = match (remembered, self.cfg.pick.remembered_choices) {
            (true, 0) => pick::MAX_CHOICES,
            (true, d) => d,
            (false, _) => self.cfg.pick.choices,
        };
        let c = self.clusters.get_mut(ci)?;
        let fresh = c
            .snapshot_at
            .is_some_and(|t| now.saturating_sub(t) <= stale_after);
        let choice = if fresh {
            // Tolerance and slack are for known load: the priors of streams of unknown rate carry
            // no evidence, so a storm of them is spread in proportion to capacity.
            zone::choose(
                &c.zones,
                &self.local_zone,
                self.cfg.zone.spill_threshold,
                c.known_share(),
                e,
                self.peers as f64 * e,
                &mut self.rng,
            )
        } else {
            ZoneChoice::Any(Reason::Fallback)
        };
        let reason = match choice {
            ZoneChoice::Zone(_, r) | ZoneChoice::Any(r) => r,
        };
        let mut decision = Decision {
            reason,
            zone: String::new(),
            primary: None,
            secondary: None,
            projected: 0.0,
            expected_rate: e,
        };
        let mut placed_on = None;
        if reason != Reason::Fallback {
            let candidates: Vec<usize> = match choice {
                ZoneChoice::Zone(zi, _) => c
                    .zones
                    .get(zi)
                    .map(|z| z.healthy.clone())
                    .unwrap_or_default(),
                ZoneChoice::Any(_) => c
                    .zones
                    .iter()
                    .flat_map(|z| z.healthy.iter().copied())
                    .collect(),
            };
            let (load, capacity) = c.totals();
            let mean = if capacity > 0.0 {
                (load + e) / capacity
            } else {
                0.0
            };
            let orca_mean = if orca_weight > 0.0 {
                mean_orca(c, now, orca_age)
            } else {
                None
            };
            let score = |j: usize| -> f64 {
                let Some(ep) = c.endpoint(j) else {
                    return f64::INFINITY;
                };
                let own = if ep.capacity > 0.0 {
                    (ep.load() + e) / ep.capacity
                } else {
                    f64::INFINITY
                };
                let relative = if mean > 0.0 { own / mean } else { own };
                match (orca_mean, ep.orca_utilization(now, orca_age)) {
                    (Some(m), Some(u)) if m > 0.0 => {
                        (1.0 - orca_weight) * relative + orca_weight * (u / m)
                    }
                    _ => relative,
                }
            };
            let (a, b) = pick(candidates.len(), choices, &mut self.rng, |k| {
                candidates.get(k).map_or(f64::INFINITY, |&j| score(j))
            });
            let a = a.and_then(|k| candidates.get(k).copied());
            let mut b = b.and_then(|k| candidates.get(k).copied());
            if b.is_none() && a.is_some() {
                // The zone has one endpoint: retry anywhere else that is healthy.
                b = c
                    .zones
                    .iter()
                    .flat_map(|z| z.healthy.iter().copied())
                    .find(|&j| Some(j) != a);
            }
            if let Some((j, ep)) = a.and_then(|j| Some((j, c.endpoint(j)?))) {
                decision.projected = score(j);
                decision.zone.clone_from(&ep.zone);
                decision.primary = Some(ep.address.clone());
            }
            decision.secondary = b.and_then(|j| c.endpoint(j)).map(|ep| ep.address.clone());
            placed_on = a;
        }
        if let Some(j) = placed_on {
            c.add_stream_load(j, 0.0, e);
            c.add_peer_guess(j, self.peers as f64 * e);
        } else {
            decision.reason = Reason::Fallback;
        }
        c.own_load += e;
        if !remembered {
            c.own_unknown += e;
        }
        let mut stream = Stream::new(ci, ri, placed_on, now, e);
        stream.key = source.map(|s| s.key);
        stream.known_prior = remembered;
        if let Some(old) = self.streams.insert(id, stream) {
            self.forget(&old);
        }
        *self
            .counters
            .decisions
            .entry((ci, decision.reason))
            .or_default() += 1;
        if decision.primary.is_some() {
            *self
                .counters
                .to_zone
                .entry((ci, decision.zone.clone()))
                .or_default() += 1;
        }
        Some(decision)
    }

    /// The real upstream of stream `id` became known (`upstream.address`, `upstream.locality.zone`).
    pub fn on_upstream(&mut self, now: Nanos, id: u64, address: &str, zone: &str) {
        let Some(s) = self.streams.get_mut(id) else {
            return;
        };
        let Some(c) = self.clusters.get_mut(s.cluster) else {
            return;
        };
        let j = c.observe_upstream(now, address, zone);
        if s.endpoint == Some(j) {
            return;
        }
        let (rate, pending) = (s.rate.value(), s.pending);
        if let Some(old) = s.endpoint {
            c.remove_stream_load(old, rate, pending);
        }
        c.add_stream_load(j, rate, pending);
        s.endpoint = Some(j);
    }

    /// An ORCA report arrived on stream `id`'s response.
    pub fn on_orca(&mut self, now: Nanos, id: u64, report: &OrcaReport) {
        let (Some(s), Some(u)) = (self.streams.get(id), report.utilization()) else {
            return;
        };
        if let Some(ep) = self
            .clusters
            .get_mut(s.cluster)
            .and_then(|c| s.endpoint.and_then(|j| c.endpoint_mut(j)))
        {
            ep.orca = Some((u, now));
        }
    }

    /// Count `messages` and `bytes` that just passed on stream `id` in `dir`.
    /// For non-gRPC traffic pass `messages = 0`: each request then counts as one message.
    pub fn on_data(&mut self, id: u64, dir: Direction, messages: u64, bytes: u64) {
        let signal = self.cfg.load.signal;
        let Some(s) = self.streams.get_mut(id) else {
            return;
        };
        let d = dir.index();
        if let (Some(m), Some(b)) = (s.messages.get_mut(d), s.bytes.get_mut(d)) {
            *m += messages;
            *b += bytes;
        }
        s.unticked += match signal {
            LoadSignal::Messages => messages as f64,
            LoadSignal::Bytes => bytes as f64,
        };
    }

    /// Stream `id` ended with `outcome`; failures penalise its endpoint.
    pub fn on_end(&mut self, now: Nanos, id: u64, outcome: Outcome) -> Option<EndedStream> {
        let s = self.streams.remove(id)?;
        self.forget(&s);
        if let Some(key) = s
            .key
            .filter(|_| now.saturating_sub(s.started) >= REMEMBER_AFTER)
        {
            self.rate_updates
                .push((key, s.measured_rate(now, self.tau_secs())));
        }
        if outcome == Outcome::Failed {
            if let (Some(c), Some(j)) = (self.clusters.get_mut(s.cluster), s.endpoint) {
                c.penalize(&self.cfg, now, j);
            }
        }
        Some(EndedStream {
            cluster: s.cluster,
            route: s.route,
            started: s.started,
            messages: s.messages,
            bytes: s.bytes,
        })
    }

    fn forget(&mut self, s: &Stream) {
        let Some(c) = self.clusters.get_mut(s.cluster) else {
            return;
        };
        c.own_load = (c.own_load - s.estimate()).max(0.0);
        if !s.known_prior {
            c.own_unknown = (c.own_unknown - s.pending).max(0.0);
        }
        if let Some(j) = s.endpoint {
            c.remove_stream_load(j, s.rate.value(), s.pending);
        }
    }

    /// Periodic update: fold counts into rates, recompute loads, learn expected rates.
    pub fn tick(&mut self, now: Nanos) {
        let tau = self.tau_secs();
        // Before the first tick every stream's count covers its whole life.
        let dt_all = self.last_tick.map_or(Nanos::MAX, |t| now.saturating_sub(t));
        self.last_tick = Some(now);
        for c in &mut self.clusters {
            c.own_load = 0.0;
            c.own_unknown = 0.0;
            for e in &mut c.endpoints {
                e.local_rate = 0.0;
                e.local_pending = 0.0;
                e.local_active = 0;
                e.peer_guess = 0.0;
            }
        }
        // (cluster, route) → (Σ ewma, Σ evidence weight)
        let mut learned: HashMap<(usize, usize), (f64, f64)> = HashMap::new();
        for (_, s) in self.streams.iter_mut() {
            let age = now.saturating_sub(s.started);
            let dt = dt_all.min(age) as f64 / NANOS_PER_SEC;
            if dt > 0.0 {
                s.rate.update(s.unticked, dt, tau);
                s.unticked = 0.0;
            }
            let w = prior_weight(age, tau);
            s.pending = s.prior * w;
            if let Some(c) = self.clusters.get_mut(s.cluster) {
                c.own_load += s.estimate();
                if !s.known_prior {
                    c.own_unknown += s.pending;
                }
            }
            if let (Some(c), Some(j)) = (self.clusters.get_mut(s.cluster), s.endpoint) {
                if let Some(e) = c.endpoint_mut(j) {
                    e.local_rate += s.rate.value();
                    e.local_pending += s.pending;
                    e.local_active += 1;
                }
            }
            if let Some(key) = s.key {
                if age >= REMEMBER_AFTER && now.saturating_sub(s.remembered_at) >= REMEMBER_EVERY {
                    s.remembered_at = now;
                    self.rate_updates.push((key, s.measured_rate(now, tau)));
                }
            }
            let acc = learned.entry((s.cluster, s.route)).or_default();
            acc.0 += s.rate.value();
            acc.1 += 1.0 - w;
        }
        let mut per_cluster: Vec<(f64, f64)> = vec![(0.0, 0.0); self.clusters.len()];
        for (&(ci, ri), &(sum, weight)) in &learned {
            if weight >= 0.5 {
                self.route_rates.insert((ci, ri), sum / weight);
            }
            if let Some(acc) = per_cluster.get_mut(ci) {
                acc.0 += sum;
                acc.1 += weight;
            }
        }
        for (slot, (sum, weight)) in self.cluster_rates.iter_mut().zip(per_cluster) {
            if weight >= 0.5 {
                *slot = Some(sum / weight);
            }
        }
        for c in &mut self.clusters {
            c.refresh(&self.cfg, now);
        }
    }

    /// This VM's load per endpoint, for the shared cross-worker view:
    /// (cluster, address, load, active streams).
    pub fn local_loads(&self) -> Vec<(&str, &str, f64, u32)> {
        self.clusters
            .iter()
            .flat_map(|c| {
                c.endpoints
                    .iter()
                    .filter(|e| e.local_active > 0 || e.local_rate > 0.0)
                    .map(move |e| {
                        (
                            c.name.as_str(),
                            e.address.as_str(),
                            e.local_rate + e.local_pending,
                            e.local_active,
                        )
                    })
            })
            .collect()
    }

    /// Replace the other workers' load with `loads` (cluster, address, load, active).
    pub fn set_remote_loads<'a>(
        &mut self,
        now: Nanos,
        loads: impl IntoIterator<Item = (&'a str, &'a str, f64, u32)>,
    ) {
        for c in &mut self.clusters {
            for e in &mut c.endpoints {
                e.remote_load = 0.0;
                e.remote_active = 0;
            }
        }
        for (cluster, address, load, active) in loads {
            let Some(c) = self.clusters.iter_mut().find(|c| c.name == cluster) else {
                continue;
            };
            let Some(j) = c.index_of(address) else {
                continue;
            };
            if let Some(e) = c.endpoint_mut(j) {
                e.remote_load += load.max(0.0);
                e.remote_active += active;
            }
        }
        for c in &mut self.clusters {
            c.refresh(&self.cfg, now);
        }
    }

    /// `n` other workers of this proxy place streams too; their placements become visible only
    /// with the next exchange of loads, so until this VM's next tick each is assumed to place
    /// what this VM places (it counts `n ×` each of its own placements).
    pub fn set_peers(&mut self, n: usize) {
        self.peers = n;
    }

    pub fn peers(&self) -> usize {
        self.peers
    }

    pub fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }

    /// Rates to remember since the last call: (key hash, measured rate).
    pub fn take_rate_updates(&mut self) -> Vec<(u64, f64)> {
        std::mem::take(&mut self.rate_updates)
    }

    /// Plan stream moves off hot endpoints (see [`rebalance`]); the planned streams are marked
    /// and not planned again. `workers` share the proxy's churn budget.
    pub fn plan_moves(&mut self, now: Nanos, workers: usize) -> Plan {
        let cfg = self.cfg.rebalance.clone();
        let mut allowance = self
            .budget
            .allowance(&cfg, now, workers, self.streams.len());
        let mut plan = Plan::default();
        for (ci, c) in self.clusters.iter().enumerate() {
            rebalance::plan_cluster(&cfg, ci, c, &self.streams, now, &mut allowance, &mut plan);
        }
        let tau = self.tau_secs();
        for m in &plan.moves {
            self.budget.spend(now);
            if let Some(s) = self.streams.get_mut(m.stream) {
                s.move_planned = true;
                // Remember its rate now: its client reconnects before the stream's end is
                // flushed.
                if let Some(key) = s.key {
                    self.rate_updates.push((key, s.measured_rate(now, tau)));
                }
            }
        }
        plan
    }

    pub fn move_planned(&self, id: u64) -> bool {
        self.streams.get(id).is_some_and(|s| s.move_planned)
    }

    /// The stream's response started and resets are not allowed: never plan to move it.
    pub fn set_unmovable(&mut self, id: u64) {
        if let Some(s) = self.streams.get_mut(id) {
            s.unmovable = true;
        }
    }
}

fn mean_orca(c: &Cluster, now: Nanos, max_age: Nanos) -> Option<f64> {
    let (sum, n) = c
        .zones
        .iter()
        .flat_map(|z| z.healthy.iter())
        .filter_map(|&j| c.endpoint(j)?.orca_utilization(now, max_age))
        .fold((0.0, 0usize), |(s, n), u| (s + u, n + 1));
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DiscoveredEndpoint;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const S: Nanos = 1_000_000_000;

    fn cfg(json: &str) -> Config {
        Config::from_json(json.as_bytes()).unwrap()
    }

    fn snapshot(eps: &[(&str, &str, bool)]) -> Vec<ClusterSnapshot> {
        vec![ClusterSnapshot {
            name: "pods".into(),
            endpoints: eps
                .iter()
                .map(|(a, z, h)| DiscoveredEndpoint {
                    address: (*a).into(),
                    zone: (*z).into(),
                    healthy: *h,
                    weight: 1,
                })
                .collect(),
        }]
    }

    #[test]
    fn names_only_healthy_endpoints_and_a_distinct_retry() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "a", 1);
        r.apply_snapshot(
            0,
            &snapshot(&[
                ("10.0.0.1:1", "a", true),
                ("10.0.0.2:1", "a", false),
                ("10.0.0.3:1", "b", true),
            ]),
        );
        for id in 0..200 {
            let d = r.place(S, id, "rt", "pods").unwrap();
            let p = d.primary.clone().unwrap();
            assert_ne!(p, "10.0.0.2:1");
            assert_ne!(d.secondary.as_deref(), Some(p.as_str()));
            assert_ne!(d.secondary.as_deref(), Some("10.0.0.2:1"));
        }
        assert!(r.place(S, 999, "rt", "other-cluster").is_none());
    }

    #[test]
    fn no_fresh_snapshot_means_fallback() {
        let mut r = Router::new(
            cfg(r#"{"clusters":["pods"],"discovery":{"stale_after_ms":5000}}"#),
            "a",
            1,
        );
        let d = r.place(0, 1, "rt", "pods").unwrap();
        assert_eq!((d.reason, d.header_value()), (Reason::Fallback, None));
        r.apply_snapshot(0, &snapshot(&[("10.0.0.1:1", "a", true)]));
        assert_eq!(r.place(S, 2, "rt", "pods").unwrap().reason, Reason::Local);
        let d = r.place(6 * S, 3, "rt", "pods").unwrap();
        assert_eq!(d.reason, Reason::Fallback);
        assert_eq!(
            r.take_counters().decisions.get(&(0, Reason::Fallback)),
            Some(&2)
        );
    }

    #[test]
    fn placement_avoids_the_endpoint_carrying_heavy_streams() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"],"pick":{"choices":2}}"#), "", 7);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        // Two streams measured at 100/s on e1; then new streams must go to e2.
        for id in [1, 2] {
            r.place(0, id, "rt", "pods");
            r.on_upstream(0, id, "e1:1", "");
        }
        let mut t = 0;
        for _ in 0..10 {
            t += S;
            r.on_data(1, Direction::Upstream, 100, 1000);
            r.on_data(2, Direction::Upstream, 100, 1000);
            r.tick(t);
        }
        // e1 carries 200/s; each new stream is expected at ~100/s: the next two fill e2.
        for id in 10..12 {
            let d = r.place(t, id, "rt", "pods").unwrap();
            assert_eq!(d.primary.as_deref(), Some("e2:1"), "{d:?}");
        }
        // Learned expected rate ≈ 100/s, not the default 1.
        let rt = r.routes.intern("rt");
        assert!((r.expected_rate(0, rt) - 100.0).abs() < 1.0);
    }

    #[test]
    fn failures_penalize_and_end_releases_load() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 3);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        r.place(0, 1, "rt", "pods");
        r.on_upstream(0, 1, "e1:1", "");
        let ended = r.on_end(S, 1, Outcome::Failed).unwrap();
        assert_eq!(ended.cluster, 0);
        let c = &r.clusters()[0];
        let e1 = c.endpoint(c.index_of("e1:1").unwrap()).unwrap();
        assert_eq!((e1.load(), e1.local_active), (0.0, 0));
        assert!(e1.capacity < 0.6, "{}", e1.capacity);
        assert!(r.on_end(S, 1, Outcome::Ok).is_none());
    }

    #[test]
    fn remote_loads_steer_away_and_local_loads_report() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"],"pick":{"choices":2}}"#), "", 5);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        r.set_remote_loads(0, [("pods", "e1:1", 500.0, 10), ("nope", "e1:1", 1.0, 1)]);
        for id in 0..5 {
            assert_eq!(
                r.place(S, id, "rt", "pods").unwrap().primary.as_deref(),
                Some("e2:1")
            );
        }
        let mine = r.local_loads();
        assert_eq!(mine.len(), 1);
        assert_eq!((mine[0].1, mine[0].3), ("e2:1", 5));
    }

    #[test]
    fn shadow_style_reattribution_moves_load_to_the_real_upstream() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 5);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "z", true), ("e2:1", "z", true)]));
        let d = r.place(0, 1, "rt", "pods").unwrap();
        let other = if d.primary.as_deref() == Some("e1:1") {
            "e2:1"
        } else {
            "e1:1"
        };
        r.on_upstream(0, 1, other, "z");
        let c = &r.clusters()[0];
        let moved = c.endpoint(c.index_of(other).unwrap()).unwrap();
        assert_eq!(moved.local_active, 1);
        assert_eq!(c.totals().0, 1.0); // the default expected rate, counted once
    }

    #[test]
    fn orca_blend_prefers_the_less_utilised_endpoint() {
        let mut r = Router::new(
            cfg(r#"{"clusters":["pods"],"load":{"orca_weight":1.0}}"#),
            "",
            5,
        );
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        r.place(0, 1, "rt", "pods");
        r.on_upstream(0, 1, "e1:1", "");
        r.place(0, 2, "rt", "pods");
        r.on_upstream(0, 2, "e2:1", "");
        let report = |u: f64| OrcaReport {
            application_utilization: u,
            ..OrcaReport::default()
        };
        r.on_orca(0, 1, &report(0.9));
        r.on_orca(0, 2, &report(0.1));
        for id in 10..20 {
            assert_eq!(
                r.place(S, id, "rt", "pods").unwrap().primary.as_deref(),
                Some("e2:1")
            );
        }
    }

    #[test]
    fn remembered_rates_place_known_streams_and_ends_are_remembered() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 5);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        r.tick(0);
        let heavy = Source {
            key: 77,
            rate: Some(100.0),
        };
        let d = r.place_from(0, 1, "rt", "pods", Some(heavy)).unwrap();
        assert_eq!(d.expected_rate, 100.0);
        // Light streams with unknown rates (default 1/s) all avoid the heavy one's endpoint.
        for id in 2..20 {
            let e = r.place(0, id, "rt", "pods").unwrap();
            assert_ne!(e.primary, d.primary);
        }
        r.on_data(1, Direction::Upstream, 300, 0);
        r.tick(3 * S);
        r.on_end(3 * S, 1, Outcome::Cancelled);
        let updates = r.take_rate_updates();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].0, 77);
        assert!((updates[0].1 - 100.0).abs() < 1.0, "{updates:?}"); // bias-corrected
        assert!(r.take_rate_updates().is_empty());
    }

    #[test]
    fn rebalancer_plans_moves_off_a_hot_endpoint_once() {
        let mut r = Router::new(
            cfg(
                r#"{"clusters":["pods"],"rebalance":{"mode":"on","min_age_ms":1000,"max_share_per_minute":0.5}}"#,
            ),
            "",
            5,
        );
        let eps: Vec<(String, &str, bool)> =
            (0..3).map(|i| (format!("e{i}:1"), "", true)).collect();
        let eps: Vec<(&str, &str, bool)> =
            eps.iter().map(|(a, z, h)| (a.as_str(), *z, *h)).collect();
        r.apply_snapshot(0, &snapshot(&eps));
        // Six 10/s streams forced onto e0 (as if placed by another policy).
        for id in 0..6 {
            r.place(0, id, "rt", "pods");
            r.on_upstream(0, id, "e0:1", "");
        }
        let mut t = 0;
        for _ in 0..20 {
            t += S;
            for id in 0..6 {
                r.on_data(id, Direction::Upstream, 10, 0);
            }
            r.tick(t);
        }
        let plan = r.plan_moves(t, 1);
        assert_eq!(plan.moves.len(), 2, "{plan:?}"); // max_moves_per_tick
        assert!(plan
            .moves
            .iter()
            .all(|m| m.from == 0 && r.move_planned(m.stream)));
        assert!(plan.excess_after[0] < plan.excess_before[0]);
        let again = r.plan_moves(t + S, 1);
        assert!(again
            .moves
            .iter()
            .all(|m| !plan.moves.iter().any(|p| p.stream == m.stream)));
    }

    #[test]
    fn placements_count_for_the_peers_until_the_tick() {
        let eps = [("e1:1", "", true), ("e2:1", "", true), ("e3:1", "", true)];
        let on_e1 = |peers: usize| {
            let mut r = Router::new(cfg(r#"{"clusters":["pods"],"pick":{"choices":8}}"#), "", 5);
            r.apply_snapshot(0, &snapshot(&eps));
            r.set_peers(peers);
            r.tick(0);
            // The other workers' last exchange: 6 on e1, nothing elsewhere.
            r.set_remote_loads(0, [("pods", "e1:1", 6.0, 6)]);
            (0..7)
                .filter(|&id| {
                    r.place(S, id, "rt", "pods").unwrap().primary.as_deref() == Some("e1:1")
                })
                .count()
        };
        // Alone, e2 and e3 take 6 streams each before e1 gets one; with two peers placing the
        // same burst, e2 and e3 are full after two streams each.
        assert_eq!(on_e1(0), 0);
        assert!(on_e1(2) >= 1);
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 5);
        r.apply_snapshot(0, &snapshot(&eps));
        r.set_peers(3);
        r.place(S, 1, "rt", "pods");
        assert_eq!(r.clusters()[0].totals().0, 4.0);
        r.tick(S); // the exchange: the peers' own placements arrive now
        assert_eq!(r.clusters()[0].totals().0, 1.0);
    }

    #[test]
    fn known_share_grows_with_measurement_and_remembered_rates() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 5);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        r.tick(0);
        assert_eq!(r.clusters()[0].known_share(), 0.0);
        for id in 0..4 {
            r.place(0, id, "rt", "pods");
        }
        assert_eq!(r.clusters()[0].known_share(), 0.0);
        let remembered = Source {
            key: 1,
            rate: Some(4.0),
        };
        r.place_from(0, 9, "rt", "pods", Some(remembered));
        assert!((r.clusters()[0].known_share() - 0.5).abs() < 1e-9); // 4 of 8
        let mut t = 0;
        for _ in 0..30 {
            t += S;
            for id in [0, 1, 2, 3, 9] {
                r.on_data(id, Direction::Upstream, 4, 0);
            }
            r.tick(t);
        }
        assert!(r.clusters()[0].known_share() > 0.99);
        r.on_end(t, 9, Outcome::Ok);
        for id in 0..4 {
            r.on_end(t, id, Outcome::Ok);
        }
        assert!(r.clusters()[0].own_load.abs() < 1e-9);
    }

    #[test]
    fn streams_open_before_the_first_tick_are_measured_over_their_whole_life() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 5);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true)]));
        for id in 0..10 {
            r.place(0, id, "rt", "pods");
            r.on_data(id, Direction::Upstream, 20, 0);
        }
        r.tick(S);
        // 20 messages in its first second: the learned mean is ≈ 20/s, not 0.
        let rt = r.routes.intern("rt");
        assert!(
            (r.expected_rate(0, rt) - 20.0).abs() < 0.5,
            "{}",
            r.expected_rate(0, rt)
        );
    }
}
