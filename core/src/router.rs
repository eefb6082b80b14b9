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
//!
//! Loads and capacities are the fleet view's when the pods' load reports are fresh
//! ([`crate::fleet`], applied with [`Router::apply_reports`]), else this Envoy's own.

use std::borrow::Cow;

use hashbrown::HashMap;

use super::config::{Config, LoadSignal};
use super::discovery::ClusterSnapshot;
use super::endpoints::{self, Cluster};
use super::ewma::prior_weight;
use super::fleet::{self, LoadReport, View};
use super::orca::OrcaReport;
use super::penalty::Outcome;
use super::pick::{self, pick};
use super::rate_memory;
use super::rebalance::{self, MoveWhy, Pace, Plan};
use super::rng::Rng;
use super::routes::{self, RouteNames};
use super::streams::{Counted, Direction, Stream, StreamTable};
use super::zone::{self, Reason, ZoneChoice};
use super::{ClusterIdx, Nanos, RouteIdx, NANOS_PER_SEC};

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
    /// The load picture used.
    pub view: View,
}

impl Decision {
    /// Value for the `override_host` header, `primary[,secondary]`, written into `out` (a
    /// buffer the caller keeps: no allocation per placement). False when there is no primary.
    pub fn write_header_value(&self, out: &mut String) -> bool {
        out.clear();
        let Some(primary) = &self.primary else {
            return false;
        };
        out.push_str(primary);
        if let Some(s) = &self.secondary {
            out.push(',');
            out.push_str(s);
        }
        true
    }

    /// Value for the debug response header.
    pub fn debug_value(&self) -> String {
        format!(
            "zone={};endpoint={};reason={};view={};load={:.3};expected={:.3}",
            self.zone,
            self.primary.as_deref().unwrap_or("-"),
            self.reason.as_str(),
            self.view.as_str(),
            self.projected,
            self.expected_rate
        )
    }
}

/// What a stream was, returned when it ends (for stats).
#[derive(Debug, Clone, PartialEq)]
pub struct EndedStream {
    pub cluster: ClusterIdx,
    pub route: RouteIdx,
    pub started: Nanos,
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

/// Decision counters since the last [`Router::take_counters`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// (cluster, reason) → decisions.
    pub decisions: HashMap<(ClusterIdx, Reason), u64>,
    /// (cluster, zone of the chosen endpoint) → decisions.
    pub to_zone: HashMap<(ClusterIdx, String), u64>,
    /// (cluster, view) → decisions.
    pub views: HashMap<(ClusterIdx, View), u64>,
}

/// `(cluster, zone)` borrowed, to look up [`Counters::to_zone`] without an owned `String`
/// (hashes as the tuple does).
#[derive(Hash)]
struct ZoneKey<'a>(ClusterIdx, &'a str);

impl hashbrown::Equivalent<(ClusterIdx, String)> for ZoneKey<'_> {
    fn equivalent(&self, key: &(ClusterIdx, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

pub struct Router {
    cfg: Config,
    local_zone: String,
    clusters: Vec<Cluster>,
    streams: StreamTable,
    routes: RouteNames,
    /// Learned mean rate per stream: (cluster, route) and per cluster.
    route_rates: HashMap<(ClusterIdx, RouteIdx), f64>,
    cluster_rates: Vec<Option<f64>>,
    rng: Rng,
    /// This VM's own salt for the rebalancer's draws (see [`rebalance::plan_cluster`]).
    salt: u64,
    last_tick: Option<Nanos>,
    counters: Counters,
    /// Rates to write to the rate memory.
    rate_updates: Vec<RateUpdate>,
    /// Other workers of this proxy placing streams at the same time (see [`Router::set_peers`]).
    peers: usize,
    /// Per route: streams in a row that ended as short, successful unary exchanges (see
    /// [`Router::is_unary_route`]).
    unary_streak: Vec<u32>,
    /// When this proxy last placed a stream on a route that is not unary (this VM's, or another
    /// worker's via [`Router::note_placing`]).
    last_placing: Option<Nanos>,
    /// Probe budget: tokens and when they were counted (see [`Router::due_probes`]).
    probe_tokens: (f64, Option<Nanos>),
    /// Epoch t0 of the streams' `young` weights: the last tick (or the first placement).
    young_t0: Option<Nanos>,
}

/// A measured rate to remember, with the stream's (cluster, route) for its cap.
#[derive(Debug, Clone, Copy)]
struct RateUpdate {
    key: u64,
    rate: f64,
    cluster: ClusterIdx,
    route: RouteIdx,
    /// Tag of the endpoint a planned move found room on.
    to: Option<u32>,
}

/// What to write to the rate memory for one source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remember {
    pub key: u64,
    /// Measured rate, capped at [`Router::rate_cap`].
    pub rate: f64,
    /// [`rate_memory::address_tag`] of the endpoint its planned move found room on.
    pub to: Option<u32>,
}

/// A stream handed from one router to another (configuration reload), with the names its
/// indices stood for.
#[derive(Debug, Clone)]
pub struct HandedStream {
    pub id: u64,
    pub stream: Stream,
    pub cluster: String,
    pub route: String,
    /// Its endpoint's address and zone, if known.
    pub endpoint: Option<(String, String)>,
}

/// What is known of a new stream's source (rate memory).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Source {
    pub key: u64,
    /// Its remembered rate, if any.
    pub rate: Option<f64>,
    /// [`rate_memory::address_tag`] of the endpoint a planned move of its stream found room
    /// on, while the move's reconnection is due.
    pub to: Option<u32>,
}

/// Seconds a stream must run before its rate is worth remembering, and between two updates.
const REMEMBER_AFTER: Nanos = 2_000_000_000;
const REMEMBER_EVERY: Nanos = 10_000_000_000;
/// A route whose last this-many streams were short unary exchanges is a unary route.
pub const UNARY_ROUTE_STREAK: u32 = 32;

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
            salt: crate::rng::splitmix64(seed),
            last_tick: None,
            counters: Counters::default(),
            rate_updates: Vec::new(),
            peers: 0,
            unary_streak: Vec::new(),
            last_placing: None,
            probe_tokens: (0.0, None),
            young_t0: None,
        }
    }

    /// Whether `route` is a unary route: its last [`UNARY_ROUTE_STREAK`] streams ended
    /// successfully within 2 s with at most one message each way, and none of its open streams
    /// has carried more. New streams there skip what only lasting streams need: the rate memory
    /// (it holds only streams that ran ≥ 2 s) and the first-byte time (the exchange is timed
    /// whole). One streaming exchange on the route, ended or seen on the tick, ends it.
    pub fn is_unary_route(&mut self, route: &str) -> bool {
        let ri = self.routes.intern(route);
        self.is_unary(ri)
    }

    fn is_unary(&self, ri: RouteIdx) -> bool {
        self.unary_streak.get(ri.0).copied().unwrap_or(0) >= UNARY_ROUTE_STREAK
    }

    /// `route`'s entry in `streaks`, added at 0 when new. None for the fold-over route `other`,
    /// which keeps no streak (so is never unary): it mixes routes, and short calls on some of
    /// them must not turn off the rate memory of lasting streams on the others.
    fn unary_streak(streaks: &mut Vec<u32>, route: RouteIdx) -> Option<&mut u32> {
        if route == routes::OTHER {
            return None;
        }
        if streaks.len() <= route.0 {
            streaks.resize(route.0 + 1, 0);
        }
        streaks.get_mut(route.0)
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

    pub fn cluster(&self, ci: ClusterIdx) -> Option<&Cluster> {
        self.clusters.get(ci.0)
    }

    pub fn cluster_index(&self, name: &str) -> Option<ClusterIdx> {
        self.clusters
            .iter()
            .position(|c| c.name == name)
            .map(ClusterIdx)
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
            let Some(cluster) = self.clusters.get_mut(ci.0) else {
                continue;
            };
            let remap = cluster.apply_snapshot(&self.cfg, now, snap);
            for (_, s) in self.streams.iter_mut().filter(|(_, s)| s.cluster == ci) {
                s.endpoint = s.endpoint.and_then(|old| remap.get(old).copied().flatten());
            }
        }
    }

    /// Expected rate of a new stream on (cluster, route): the learned mean rate per stream,
    /// else the fleet's (the pods' reports), else `load.default_stream_rate`.
    pub fn expected_rate(&self, cluster: ClusterIdx, route: RouteIdx) -> f64 {
        self.learned_rate(cluster, route)
            .or_else(|| self.clusters.get(cluster.0)?.fleet_stream_rate)
            .unwrap_or(self.cfg.load.default_stream_rate)
    }

    /// The mean rate per stream this VM learned for the route, else for the cluster.
    fn learned_rate(&self, cluster: ClusterIdx, route: RouteIdx) -> Option<f64> {
        (self.route_rates.get(&(cluster, route)).copied())
            .or_else(|| self.cluster_rates.get(cluster.0).copied().flatten())
    }

    /// The most a remembered rate may claim on (cluster, route): `rate_memory.max_ratio ×` the
    /// mean per stream, so that no source can make itself look arbitrarily large. The mean is
    /// this VM's learned one, else the other workers' (their shared load over their streams);
    /// with neither, no cap: `default_stream_rate` is no evidence, and a worker's first stream
    /// may well be a device moved off another worker's hot pod.
    pub fn rate_cap(&self, cluster: ClusterIdx, route: RouteIdx) -> f64 {
        let learned = self.learned_rate(cluster, route).or_else(|| {
            let c = self.clusters.get(cluster.0)?;
            let (load, streams) = (c.endpoints.iter()).fold((0.0, 0u64), |(l, n), e| {
                (l + e.remote_load, n + u64::from(e.remote_active))
            });
            (streams > 0 && load > 0.0).then(|| load / streams as f64)
        });
        learned.map_or(f64::INFINITY, |m| self.cfg.rate_memory.max_ratio * m)
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
        if !self.is_unary(ri) {
            self.note_placing(now);
        }
        let remembered = source.and_then(|s| s.rate).is_some();
        let e = self.expected_from(ci, ri, source);
        let choice = self.choose_zone(ci, now, e)?;
        let mut decision = self.pick_endpoints(ci, now, e, choice, remembered)?;
        if let Some(tag) = source.and_then(|s| s.to) {
            self.follow_move(ci, tag, &mut decision);
        }
        let placed_on = decision
            .primary
            .as_ref()
            .and_then(|a| self.cluster(ci)?.index_of(a));
        let young = self.young_weight(now, now);
        let c = self.clusters.get_mut(ci.0)?;
        if let Some(j) = placed_on {
            c.add_stream_load(
                j,
                Counted {
                    young,
                    ..Counted::prior(e)
                },
            );
            c.add_peer_guess(j, self.peers as f64 * e);
        } else {
            decision.reason = Reason::Fallback;
        }
        c.own_load += e;
        if !remembered {
            c.own_unknown += e;
        }
        let mut stream = Stream::new(ci, ri, placed_on, now, e);
        stream.young = young;
        stream.key = source.map(|s| s.key);
        stream.known_prior = remembered;
        if let Some(old) = self.streams.insert(id, stream) {
            self.forget(&old);
        }
        self.count_decision(ci, &decision);
        Some(decision)
    }

    /// A device the rebalancer moved reconnects to the endpoint its move found room on (the
    /// planning worker's view: this worker's may lag it by a tick), if that endpoint is still
    /// healthy and in the zone the zone rule chose. The picked one becomes the retry choice.
    fn follow_move(&self, ci: ClusterIdx, tag: u32, decision: &mut Decision) {
        let (Some(c), Some(primary)) = (self.clusters.get(ci.0), decision.primary.as_ref()) else {
            return;
        };
        let hinted = (c.zones.iter())
            .filter(|z| z.name == decision.zone)
            .flat_map(|z| z.healthy.iter())
            .filter_map(|&j| c.endpoint(j))
            .find(|e| rate_memory::address_tag(&e.address) == tag);
        if let Some(e) = hinted.filter(|e| e.address != *primary) {
            decision.secondary = decision.primary.replace(e.address.clone());
        }
    }

    /// The expected rate of a new stream: its source's remembered rate (capped), else the
    /// learned mean of its route.
    fn expected_from(&self, ci: ClusterIdx, ri: RouteIdx, source: Option<Source>) -> f64 {
        let mean = self.expected_rate(ci, ri);
        source
            .and_then(|s| s.rate)
            .filter(|r| r.is_finite() && *r > 0.0)
            .map_or(mean, |r| r.min(self.rate_cap(ci, ri)))
    }

    /// The zone rule ([`zone::choose`]), or fallback without a fresh discovery snapshot.
    fn choose_zone(&mut self, ci: ClusterIdx, now: Nanos, e: f64) -> Option<ZoneChoice> {
        let stale_after = self.cfg.discovery.stale_after_ms.saturating_mul(1_000_000);
        let c = self.clusters.get(ci.0)?;
        let fresh = c
            .snapshot_at
            .is_some_and(|t| now.saturating_sub(t) <= stale_after);
        if !fresh {
            return Some(ZoneChoice::Any(Reason::Fallback));
        }
        // Tolerance and slack are for known load: the priors of streams of unknown rate carry
        // no evidence, so a storm of them is spread in proportion to capacity. With the fleet
        // view the zones' loads are the pods' measured reports: known.
        let known = if c.fleet.is_some() {
            1.0
        } else {
            c.known_share()
        };
        let lead = now
            .saturating_sub(c.refreshed_at)
            .min(endpoints::unseen_horizon(&self.cfg)) as f64
            / 1e9;
        Some(zone::choose(
            &c.zones,
            &self.local_zone,
            self.cfg.zone.spill_threshold,
            known,
            e,
            self.peers as f64 * e,
            lead,
            &mut self.rng,
        ))
    }

    /// Power of d choices among the zone's candidates: the decision, with primary and retry.
    fn pick_endpoints(
        &mut self,
        ci: ClusterIdx,
        now: Nanos,
        e: f64,
        choice: ZoneChoice,
        remembered: bool,
    ) -> Option<Decision> {
        let choices = match (remembered, self.cfg.pick.remembered_choices) {
            (true, 0) => pick::MAX_CHOICES,
            (true, d) => d,
            (false, _) => self.cfg.pick.choices,
        };
        let orca = OrcaBlend {
            weight: self.cfg.load.orca_weight,
            max_age: self.cfg.load.orca_max_age_ms.saturating_mul(1_000_000),
        };
        let c = self.clusters.get(ci.0)?;
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
            view: if c.fleet.is_some() {
                View::Fleet
            } else {
                View::Local
            },
        };
        if reason == Reason::Fallback {
            return Some(decision);
        }
        let candidates = candidates(c, choice);
        let scorer = Scorer::new(c, now, e, &orca, endpoints::unseen_horizon(&self.cfg));
        let (a, b) = pick(candidates.len(), choices, &mut self.rng, |k| {
            candidates
                .get(k)
                .map_or(f64::INFINITY, |&j| scorer.score(c, j))
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
            decision.projected = scorer.score(c, j);
            decision.zone.clone_from(&ep.zone);
            decision.primary = Some(ep.address.clone());
        }
        decision.secondary = b.and_then(|j| c.endpoint(j)).map(|ep| ep.address.clone());
        Some(decision)
    }

    fn count_decision(&mut self, ci: ClusterIdx, decision: &Decision) {
        *self
            .counters
            .decisions
            .entry((ci, decision.reason))
            .or_default() += 1;
        *self.counters.views.entry((ci, decision.view)).or_default() += 1;
        if decision.primary.is_some() {
            let to_zone = &mut self.counters.to_zone;
            match to_zone.get_mut(&ZoneKey(ci, &decision.zone)) {
                Some(n) => *n += 1,
                None => {
                    to_zone.insert((ci, decision.zone.clone()), 1);
                }
            }
        }
    }

    /// The real upstream of stream `id` became known (`upstream.address`; `zone` is asked for
    /// `upstream.locality.zone` only when discovery has not placed the endpoint in a zone).
    /// Returns whether the endpoint is in another zone than this proxy, when both are known.
    pub fn on_upstream(
        &mut self,
        now: Nanos,
        id: u64,
        address: &str,
        zone: impl FnOnce() -> String,
    ) -> Option<bool> {
        let s = self.streams.get_mut(id)?;
        let c = self.clusters.get_mut(s.cluster.0)?;
        let j = c.observe_upstream(now, address, zone);
        if s.endpoint != Some(j) {
            let k = s.counted();
            if let Some(old) = s.endpoint {
                c.remove_stream_load(old, k);
            }
            c.add_stream_load(j, k);
            s.endpoint = Some(j);
        }
        let zone = c.endpoint(j).map_or("", |e| e.zone.as_str());
        zone::crosses(&self.local_zone, zone)
    }

    /// An ORCA report arrived on stream `id`'s response.
    pub fn on_orca(&mut self, now: Nanos, id: u64, report: &OrcaReport) {
        let (Some(s), Some(u)) = (self.streams.get(id), report.utilization()) else {
            return;
        };
        if let Some(ep) = self
            .clusters
            .get_mut(s.cluster.0)
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
        if let Some(n) = Self::unary_streak(&mut self.unary_streak, s.route) {
            match (s.is_streaming(now, REMEMBER_AFTER), outcome) {
                (true, _) => *n = 0,
                (false, Outcome::Ok) => *n = n.saturating_add(1),
                (false, _) => {} // a short failure says nothing about the route
            }
        }
        if let Some(key) = s
            .key
            .filter(|_| now.saturating_sub(s.started) >= REMEMBER_AFTER)
        {
            self.rate_updates.push(RateUpdate {
                key,
                rate: s.measured_rate(now, self.tau_secs()),
                cluster: s.cluster,
                route: s.route,
                to: None,
            });
        }
        if outcome == Outcome::Failed {
            if let (Some(c), Some(j)) = (self.clusters.get_mut(s.cluster.0), s.endpoint) {
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
        let Some(c) = self.clusters.get_mut(s.cluster.0) else {
            return;
        };
        c.own_load = (c.own_load - s.estimate()).max(0.0);
        if !s.known_prior {
            c.own_unknown = (c.own_unknown - s.pending).max(0.0);
        }
        if let Some(j) = s.endpoint {
            c.remove_stream_load(j, s.counted());
            c.note_ended(j, s.estimate(), s.move_planned);
        }
    }

    /// The `young` weight `e^((started − t0)/τ)` of a stream started at `started` against the
    /// young epoch t0 (set to `now` if there is none yet). The exponent is capped, so weights
    /// stay finite if the timer stops.
    fn young_weight(&mut self, now: Nanos, started: Nanos) -> f64 {
        let t0 = *self.young_t0.get_or_insert(now);
        let tau = self.tau_secs();
        if tau <= 0.0 {
            return 0.0;
        }
        let x = (started as f64 - t0 as f64) / NANOS_PER_SEC / tau;
        x.min(60.0).exp()
    }

    /// Mark stream `id` planned to move (or not): a planned stream's load is set aside from
    /// its endpoint (see [`Cluster::set_aside`]).
    fn set_move_planned(&mut self, id: u64, planned: bool, now: Nanos) {
        let Some(s) = self.streams.get_mut(id) else {
            return;
        };
        if s.move_planned == planned {
            return;
        }
        s.move_planned = planned;
        if planned {
            s.planned_at = now;
        }
        let load = s.load();
        if let (Some(c), Some(j)) = (self.clusters.get_mut(s.cluster.0), s.endpoint) {
            c.set_aside(j, load, planned);
        }
    }

    /// Periodic update: fold counts into rates, recompute loads, learn expected rates.
    pub fn tick(&mut self, now: Nanos) {
        let tau = self.tau_secs();
        // Before the first tick every stream's count covers its whole life.
        let dt_all = self.last_tick.map_or(Nanos::MAX, |t| now.saturating_sub(t));
        self.last_tick = Some(now);
        self.young_t0 = Some(now);
        for c in &mut self.clusters {
            c.own_load = 0.0;
            c.own_unknown = 0.0;
            for e in &mut c.endpoints {
                e.local_rate = 0.0;
                e.local_pending = 0.0;
                e.young = 0.0;
                e.local_active = 0;
                e.peer_guess = 0.0;
                e.aside = 0.0;
                e.ended = [0.0, e.ended[0]];
            }
        }
        // (cluster, route) → (Σ ewma, Σ evidence weight)
        let mut learned: HashMap<(ClusterIdx, RouteIdx), (f64, f64)> = HashMap::new();
        for (_, s) in self.streams.iter_mut() {
            let age = now.saturating_sub(s.started);
            let dt = dt_all.min(age) as f64 / NANOS_PER_SEC;
            if dt > 0.0 {
                s.rate.update(s.unticked, dt, tau);
                s.unticked = 0.0;
            }
            if s.is_streaming(now, REMEMBER_AFTER) {
                if let Some(n) = Self::unary_streak(&mut self.unary_streak, s.route) {
                    *n = 0;
                }
            }
            let w = prior_weight(age, tau);
            s.pending = s.prior * w;
            s.young = w;
            if let Some(c) = self.clusters.get_mut(s.cluster.0) {
                c.own_load += s.estimate();
                if !s.known_prior {
                    c.own_unknown += s.pending;
                }
            }
            if let (Some(c), Some(j)) = (self.clusters.get_mut(s.cluster.0), s.endpoint) {
                if let Some(e) = c.endpoint_mut(j) {
                    let k = s.counted();
                    e.local_rate += k.rate;
                    e.local_pending += k.pending;
                    e.young += k.young;
                    if s.move_planned {
                        e.aside += s.estimate();
                    }
                    e.local_active += 1;
                }
            }
            if let Some(key) = s.key {
                if age >= REMEMBER_AFTER && now.saturating_sub(s.remembered_at) >= REMEMBER_EVERY {
                    s.remembered_at = now;
                    self.rate_updates.push(RateUpdate {
                        key,
                        rate: s.measured_rate(now, tau),
                        cluster: s.cluster,
                        route: s.route,
                        to: None,
                    });
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
            if let Some(acc) = per_cluster.get_mut(ci.0) {
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

    /// Load reports the pods of `cluster` answered probes with: (address, report).
    /// Unknown addresses are ignored; an older report never replaces a newer one.
    pub fn apply_reports(&mut self, now: Nanos, cluster: &str, reports: &[(String, LoadReport)]) {
        let Some(ci) = self.clusters.iter().position(|c| c.name == cluster) else {
            return;
        };
        // This VM's young streams per endpoint: Σ of their priors' weights `e^(−age/τ)`, kept
        // against the epoch t0 as `Σ e^((started − t0)/τ)` (no pass over the streams per report).
        let tau = self.tau_secs();
        let decay = match self.young_t0 {
            Some(t0) if tau > 0.0 => (-(now as f64 - t0 as f64) / NANOS_PER_SEC / tau).exp(),
            _ => 0.0,
        };
        let min_gap = self.cfg.probe.interval_ms.saturating_mul(500_000);
        let Some(c) = self.clusters.get_mut(ci) else {
            return;
        };
        for (address, r) in reports {
            let Some(j) = c.index_of(address) else {
                continue;
            };
            let Some(e) = c.endpoint_mut(j) else {
                continue;
            };
            let own_young = (e.young * decay).max(0.0);
            if e.report.is_none_or(|old| old.at <= r.at) {
                e.note_report(*r, min_gap, own_young);
            }
        }
        c.refresh(&self.cfg, now);
    }

    /// This proxy placed a stream on a route that is not unary at `at` (another worker's
    /// placement, read from shared data, or this VM's own).
    pub fn note_placing(&mut self, at: Nanos) {
        self.last_placing = Some(self.last_placing.map_or(at, |t| t.max(at)));
    }

    /// When this proxy last placed a stream on a route that is not unary, if it has.
    pub fn last_placing(&self) -> Option<Nanos> {
        self.last_placing
    }

    /// Whether this proxy is placing streams: one placed on a route that is not unary within
    /// the last `probe.interval_ms`.
    pub fn is_placing(&self, now: Nanos) -> bool {
        self.last_placing
            .is_some_and(|t| now.saturating_sub(t) <= self.cfg.probe.interval_ms * 1_000_000)
    }

    /// The probe interval now: the placing interval while placing, else `probe.interval_ms`.
    pub fn probe_interval_ms(&self, now: Nanos) -> u64 {
        if self.is_placing(now) {
            self.placing_interval_ms()
        } else {
            self.cfg.probe.interval_ms
        }
    }

    /// `probe.placing_interval_ms`, never above `probe.interval_ms`.
    fn placing_interval_ms(&self) -> u64 {
        let p = &self.cfg.probe;
        p.placing_interval_ms.min(p.interval_ms)
    }

    /// The timer period: `tick_ms`, shorter when probes may run at the placing interval.
    pub fn timer_period_ms(&self) -> u64 {
        if self.cfg.probe.enabled && !self.clusters.is_empty() {
            self.cfg.tick_ms.min(self.placing_interval_ms())
        } else {
            self.cfg.tick_ms
        }
    }

    /// Pods to probe now, (cluster index, address): healthy endpoints whose last probe is
    /// oldest, zones interleaved by size ([`fleet::probe_order`]), none more often than the
    /// [probe interval](Router::probe_interval_ms) less a tenth of the timer period (a timer
    /// that fires a little early must not skip the pods probed one interval ago). The budget is
    /// a token bucket: `probe.max_per_tick` tokens per `tick_ms`, holding at most that many (a
    /// timer that fires early may borrow a tenth, repaid from the next tokens), so a proxy sends
    /// at most `max_per_tick` probes per tick however often it is asked. They are marked as
    /// probed now.
    pub fn due_probes(&mut self, now: Nanos) -> Vec<(ClusterIdx, String)> {
        let p = &self.cfg.probe;
        if !p.enabled {
            return Vec::new();
        }
        let interval_ms = self.probe_interval_ms(now);
        let early = self.timer_period_ms().min(interval_ms) / 10;
        let interval = interval_ms.saturating_sub(early).saturating_mul(1_000_000);
        let most = p.max_per_tick as f64;
        let (tokens, at) = self.probe_tokens;
        let tokens = match at {
            None => most,
            Some(at) => {
                let ticks = now.saturating_sub(at) as f64 / (self.cfg.tick_ms as f64 * 1e6);
                (tokens + ticks * most).min(most)
            }
        };
        // The tokens a timer that fires a tenth early would have had count too.
        let mut left = (tokens + 0.1 * most).min(most).floor() as usize;
        let mut out = Vec::new();
        for (ci, c) in self.clusters.iter_mut().enumerate() {
            let salt = self.salt ^ (ci as u64).rotate_left(40);
            let (mut eligible, mut last, mut order) = (Vec::new(), Vec::new(), Vec::new());
            for (zi, z) in c.zones.iter().enumerate() {
                let zone_salt = crate::rng::splitmix64(salt ^ zi as u64);
                for (p, &j) in z.healthy.iter().enumerate() {
                    eligible.push(j);
                    last.push(c.endpoint(j).and_then(|e| e.last_probe));
                    order.push(fleet::probe_order(p, z.healthy.len(), zone_salt));
                }
            }
            for k in fleet::due_probes(&last, &order, now, interval, left) {
                let Some(e) = eligible.get(k).and_then(|&j| c.endpoint_mut(j)) else {
                    continue;
                };
                e.last_probe = Some(now);
                out.push((ClusterIdx(ci), e.address.clone()));
                left -= 1;
            }
        }
        // A debt of at most a tenth is paid from the next tokens.
        self.probe_tokens = (tokens - out.len() as f64, Some(now));
        out
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

    /// What to remember since the last call: each source's measured rate, capped at
    /// [`Router::rate_cap`], with the destination of its planned move if it has one.
    pub fn take_rate_updates(&mut self) -> Vec<Remember> {
        let updates = std::mem::take(&mut self.rate_updates);
        updates
            .into_iter()
            .map(|u| Remember {
                key: u.key,
                rate: u.rate.min(self.rate_cap(u.cluster, u.route)),
                to: u.to,
            })
            .collect()
    }

    /// Open streams of the whole proxy: this VM's and, from the shared view, the others'.
    pub fn proxy_streams(&self) -> usize {
        let remote: u64 = (self.clusters.iter())
            .flat_map(|c| c.endpoints.iter())
            .map(|e| u64::from(e.remote_active))
            .sum();
        self.streams.len() + usize::try_from(remote).unwrap_or(usize::MAX)
    }

    /// Plan stream moves off hot endpoints (see [`rebalance`]), within `allowance` (a count
    /// allows any move). Nothing changes until [`Router::commit_moves`].
    pub fn plan_moves(&self, now: Nanos, allowance: impl Into<rebalance::Allowance>) -> Plan {
        let cfg = &self.cfg.rebalance;
        let mut allowance = allowance.into();
        let mut plan = Plan::default();
        // Two probe intervals: a report taken after the moves has come in.
        let settle = self.cfg.probe.interval_ms.saturating_mul(2_000_000);
        for (ci, c) in self.clusters.iter().enumerate() {
            // Spilled streams first: they come home while there is room, and a skew somewhere
            // among many pods would otherwise take every round's budget. They spend the
            // reserved half only while no endpoint is far over the mean (see plan_zones).
            if cfg.return_spilled {
                rebalance::plan_zones(
                    cfg,
                    self.cfg.zone.spill_threshold,
                    ClusterIdx(ci),
                    c,
                    &self.local_zone,
                    &self.streams,
                    now,
                    &mut allowance,
                    &mut plan,
                );
            }
            rebalance::plan_cluster(
                cfg,
                Pace {
                    settle,
                    salt: self.salt,
                },
                ClusterIdx(ci),
                c,
                &self.streams,
                now,
                &mut allowance,
                &mut plan,
            );
        }
        plan
    }

    /// Mark the planned streams (they end at their next request message boundary, and are not
    /// planned again meanwhile) and remember their rates now: their clients reconnect before
    /// the streams' ends are flushed.
    pub fn commit_moves(&mut self, now: Nanos, plan: &Plan) {
        let tau = self.tau_secs();
        for m in &plan.moves {
            let shed = matches!(m.why, MoveWhy::Hot | MoveWhy::Room)
                .then(|| self.clusters.get_mut(m.cluster.0)?.endpoint_mut(m.from))
                .flatten();
            if let Some(e) = shed {
                e.shed_at = Some(now);
            }
            self.set_move_planned(m.stream, true, now);
            if let Some((s, key)) = self.streams.get(m.stream).and_then(|s| Some((s, s.key?))) {
                let to = (self.clusters.get(m.cluster.0))
                    .and_then(|c| c.endpoint(m.to_room_on))
                    .map(|e| rate_memory::address_tag(&e.address));
                self.rate_updates.push(RateUpdate {
                    key,
                    rate: s.measured_rate(now, tau),
                    cluster: s.cluster,
                    route: s.route,
                    to,
                });
            }
        }
    }

    /// Drop planned moves older than `deadline` (not carried out: no request message boundary
    /// came). Returns the number dropped per cluster.
    pub fn expire_moves(&mut self, now: Nanos, deadline: Nanos) -> Vec<u64> {
        let mut expired = vec![0; self.clusters.len()];
        let late: Vec<(u64, ClusterIdx)> = self
            .streams
            .iter()
            .filter(|(_, s)| s.move_planned && now.saturating_sub(s.planned_at) >= deadline)
            .map(|(&id, s)| (id, s.cluster))
            .collect();
        for (id, ci) in late {
            self.set_move_planned(id, false, now);
            if let Some(n) = expired.get_mut(ci.0) {
                *n += 1;
            }
        }
        expired
    }

    /// Drop every planned move (rebalancing was turned off or handed to a newer configuration).
    pub fn clear_moves(&mut self) {
        let planned: Vec<u64> = (self.streams.iter())
            .filter(|(_, s)| s.move_planned)
            .map(|(&id, _)| id)
            .collect();
        for id in planned {
            self.set_move_planned(id, false, 0);
        }
    }

    pub fn move_planned(&self, id: u64) -> bool {
        self.streams.get(id).is_some_and(|s| s.move_planned)
    }

    /// The stream's response started and resets are not allowed: never move it. Returns the
    /// cluster of a planned move this drops.
    pub fn set_unmovable(&mut self, id: u64) -> Option<ClusterIdx> {
        let s = self.streams.get_mut(id)?;
        s.unmovable = true;
        let (dropped, ci) = (s.move_planned, s.cluster);
        self.set_move_planned(id, false, 0);
        dropped.then_some(ci)
    }

    /// Remove every stream, with the names of its cluster, route and endpoint, to hand them to
    /// the router of a newer configuration ([`Router::adopt`]).
    pub fn hand_over(&mut self) -> Vec<HandedStream> {
        let ids: Vec<u64> = self.streams.iter().map(|(&id, _)| id).collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(mut stream) = self.streams.remove(id) else {
                continue;
            };
            self.forget(&stream);
            let cluster = self.clusters.get(stream.cluster.0);
            let endpoint = stream
                .endpoint
                .and_then(|j| cluster?.endpoint(j))
                .map(|e| (e.address.clone(), e.zone.clone()));
            stream.move_planned = false;
            out.push(HandedStream {
                id,
                cluster: cluster.map(|c| c.name.clone()).unwrap_or_default(),
                route: self.routes.name(stream.route).to_string(),
                endpoint,
                stream,
            });
        }
        out
    }

    /// Take over a stream from an older configuration's router. Returns its (cluster, route)
    /// indices here, or `None` when this configuration does not cover it (it is then no longer
    /// tracked).
    pub fn adopt(&mut self, now: Nanos, handed: HandedStream) -> Option<(ClusterIdx, RouteIdx)> {
        if !self.cfg.covers(&handed.route, &handed.cluster) {
            return None;
        }
        let ci = self.cluster_index(&handed.cluster)?;
        let ri = self.routes.intern(&handed.route);
        // An adopted stream brings its measured rate: it is not one "open before the first
        // tick" whose whole life the first tick would fold in.
        self.last_tick.get_or_insert(now);
        let mut s = handed.stream;
        s.young = self.young_weight(now, s.started);
        let c = self.clusters.get_mut(ci.0)?;
        s.cluster = ci;
        s.route = ri;
        s.endpoint = handed
            .endpoint
            .map(|(address, zone)| c.observe_upstream(now, &address, || zone));
        if let Some(j) = s.endpoint {
            c.add_stream_load(j, s.counted());
        }
        if let Some(old) = self.streams.insert(handed.id, s) {
            self.forget(&old);
        }
        Some((ci, ri))
    }
}

/// The endpoints a placement chooses among: the chosen zone's healthy ones (every zone's for
/// `Any`); with the fleet view, those whose load was just reported, when there are at least two
/// (the others' load is only assumed).
fn candidates(c: &Cluster, choice: ZoneChoice) -> Cow<'_, [usize]> {
    let healthy: Cow<'_, [usize]> = match choice {
        ZoneChoice::Zone(zi, _) => c
            .zones
            .get(zi)
            .map_or(Cow::Borrowed(&[][..]), |z| Cow::Borrowed(&z.healthy[..])),
        ZoneChoice::Any(_) => c
            .zones
            .iter()
            .flat_map(|z| z.healthy.iter().copied())
            .collect(),
    };
    let reported = |j: &usize| c.endpoint(*j).is_some_and(|e| e.reported);
    if healthy.iter().all(reported) {
        return healthy;
    }
    let probed: Vec<usize> = healthy.iter().copied().filter(reported).collect();
    if probed.len() >= 2 {
        Cow::Owned(probed)
    } else {
        healthy
    }
}

/// How backend ORCA utilisation enters the score (`load.orca_weight`, `load.orca_max_age_ms`).
struct OrcaBlend {
    weight: f64,
    max_age: Nanos,
}

/// The score of an endpoint for a new stream of expected rate `e`:
/// `((load_j + e)/capacity_j) / ((ΣL + e)/ΣC)`, blended with ORCA as
/// `(1−β)·score + β·u_j/ū_orca` when β > 0 and both are known.
struct Scorer {
    now: Nanos,
    horizon: Nanos,
    e: f64,
    mean: f64,
    orca_weight: f64,
    orca_age: Nanos,
    orca_mean: Option<f64>,
}

impl Scorer {
    fn new(c: &Cluster, now: Nanos, e: f64, orca: &OrcaBlend, horizon: Nanos) -> Self {
        let (load, capacity) = c.totals();
        let mean = if capacity > 0.0 {
            (load + e) / capacity
        } else {
            0.0
        };
        let orca_mean = if orca.weight > 0.0 {
            mean_orca(c, now, orca.max_age)
        } else {
            None
        };
        Scorer {
            now,
            horizon,
            e,
            mean,
            orca_weight: orca.weight,
            orca_age: orca.max_age,
            orca_mean,
        }
    }

    fn score(&self, c: &Cluster, j: usize) -> f64 {
        let Some(ep) = c.endpoint(j) else {
            return f64::INFINITY;
        };
        let own = if ep.capacity > 0.0 {
            (ep.load() + ep.unseen(self.now, self.horizon) + self.e) / ep.capacity
        } else {
            f64::INFINITY
        };
        let relative = if self.mean > 0.0 {
            own / self.mean
        } else {
            own
        };
        match (self.orca_mean, ep.orca_utilization(self.now, self.orca_age)) {
            (Some(m), Some(u)) if m > 0.0 => {
                (1.0 - self.orca_weight) * relative + self.orca_weight * (u / m)
            }
            _ => relative,
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
        let mut to_zone: HashMap<(ClusterIdx, String), u64> = HashMap::new();
        let mut value = String::from("left over");
        for id in 0..200 {
            let d = r.place(S, id, "rt", "pods").unwrap();
            let p = d.primary.clone().unwrap();
            assert_ne!(p, "10.0.0.2:1");
            assert_ne!(d.secondary.as_deref(), Some(p.as_str()));
            assert_ne!(d.secondary.as_deref(), Some("10.0.0.2:1"));
            assert!(d.write_header_value(&mut value));
            assert_eq!(value, format!("{p},{}", d.secondary.clone().unwrap()));
            *to_zone.entry((ClusterIdx(0), d.zone.clone())).or_default() += 1;
        }
        assert!(r.place(S, 999, "rt", "other-cluster").is_none());
        assert_eq!(r.take_counters().to_zone, to_zone);
    }

    #[test]
    fn no_fresh_snapshot_means_fallback() {
        let mut r = Router::new(
            cfg(r#"{"clusters":["pods"],"discovery":{"stale_after_ms":5000}}"#),
            "a",
            1,
        );
        let d = r.place(0, 1, "rt", "pods").unwrap();
        assert_eq!(
            (d.reason, d.write_header_value(&mut String::new())),
            (Reason::Fallback, false)
        );
        r.apply_snapshot(0, &snapshot(&[("10.0.0.1:1", "a", true)]));
        assert_eq!(r.place(S, 2, "rt", "pods").unwrap().reason, Reason::Local);
        let d = r.place(6 * S, 3, "rt", "pods").unwrap();
        assert_eq!(d.reason, Reason::Fallback);
        assert_eq!(
            r.take_counters()
                .decisions
                .get(&(ClusterIdx(0), Reason::Fallback)),
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
            r.on_upstream(0, id, "e1:1", String::new);
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
        assert!((r.expected_rate(ClusterIdx(0), rt) - 100.0).abs() < 1.0);
    }

    fn report(rate: f64, utilization: Option<f64>, at: Nanos) -> LoadReport {
        LoadReport {
            rate,
            utilization,
            streams: None,
            at,
        }
    }

    /// A router (seed `seed`) over pods e1, e2, e3 of no zone; new streams are expected at 10/s
    /// and scored on all three.
    fn three_pods(seed: u64) -> Router {
        let mut r = Router::new(
            cfg(r#"{"clusters":["pods"],"pick":{"choices":3},"load":{"default_stream_rate":10}}"#),
            "",
            seed,
        );
        let pods = [("e1:1", "", true), ("e2:1", "", true), ("e3:1", "", true)];
        r.apply_snapshot(0, &snapshot(&pods));
        r
    }

    /// Where `n` new streams (expected 10/s each) land, per address.
    fn spread(r: &mut Router, now: Nanos, first_id: u64, n: u64) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for id in first_id..first_id + n {
            let d = r.place(now, id, "rt", "pods").unwrap();
            *out.entry(d.primary.unwrap()).or_default() += 1;
        }
        out
    }

    #[test]
    fn reports_show_other_proxies_load() {
        // Locally nothing is known; the pods report that other proxies loaded e1 heavily.
        let mut r = three_pods(11);
        let reports = [
            ("e1:1".to_owned(), report(300.0, None, S)),
            ("e2:1".to_owned(), report(0.0, None, S)),
            ("e3:1".to_owned(), report(0.0, None, S)),
        ];
        r.apply_reports(S, "pods", &reports);
        let got = spread(&mut r, S, 1, 20);
        assert_eq!(got.get("e1:1"), None, "{got:?}");
        assert_eq!(got.get("e2:1"), Some(&10), "{got:?}");
        let d = r.place(S, 100, "rt", "pods").unwrap();
        assert_eq!(d.view, View::Fleet);
        assert_eq!(
            r.take_counters().views.get(&(ClusterIdx(0), View::Fleet)),
            Some(&21)
        );
        // Reports age out after probe.max_age_ms (5 s): back to the local view.
        r.tick(7 * S);
        assert_eq!(r.place(7 * S, 101, "rt", "pods").unwrap().view, View::Local);
    }

    /// Streams 0..3 on e1 at 100/s each for 20 s: returns the time.
    fn three_streams_on_e1(r: &mut Router) -> Nanos {
        for id in 0..3 {
            r.place(0, id, "rt", "pods");
            r.on_upstream(0, id, "e1:1", String::new);
        }
        let mut t = 0;
        for _ in 0..20 {
            t += S;
            for id in 0..3 {
                r.on_data(id, Direction::Upstream, 100, 0);
            }
            r.tick(t);
        }
        t
    }

    #[test]
    fn streams_that_ended_since_the_report_do_not_count_twice() {
        // This proxy's three streams on e1 (100/s each) are in e1's report; then they all end
        // (a reconnect storm): their reconnections must not avoid e1 as if it were still busy.
        let mut r = three_pods(14);
        let t = three_streams_on_e1(&mut r);
        let reports = [
            ("e1:1".to_owned(), report(300.0, None, t)),
            ("e2:1".to_owned(), report(0.0, None, t)),
            ("e3:1".to_owned(), report(0.0, None, t)),
        ];
        r.apply_reports(t, "pods", &reports);
        for id in 0..3 {
            r.on_end(t, id, Outcome::Cancelled);
        }
        let got = spread(&mut r, t, 10, 3);
        assert_eq!(got.get("e1:1"), Some(&1), "{got:?}");
    }

    #[test]
    fn a_report_that_arrives_after_the_streams_ended_does_not_count_them_as_others() {
        // As above, but the report comes after the streams ended, from a window that still
        // holds them (pods report over a recent window): e1 is not "busy with others".
        let mut r = three_pods(14);
        let t = three_streams_on_e1(&mut r);
        for id in 0..3 {
            r.on_end(t, id, Outcome::Cancelled);
        }
        let reports = [
            ("e1:1".to_owned(), report(300.0, None, t + S / 10)),
            ("e2:1".to_owned(), report(0.0, None, t + S / 10)),
            ("e3:1".to_owned(), report(0.0, None, t + S / 10)),
        ];
        r.apply_reports(t + S / 10, "pods", &reports);
        let e1 = r.clusters()[0]
            .index_of("e1:1")
            .and_then(|j| r.clusters()[0].endpoint(j));
        assert!(e1.is_some_and(|e| e.load() < 15.0), "{e1:?}"); // 5 % of the report: EWMA lag
        let got = spread(&mut r, t + S / 10, 10, 3);
        assert_eq!(got.get("e1:1"), Some(&1), "{got:?}");
    }

    #[test]
    fn a_degraded_pod_gets_its_capacity_share() {
        // Same rate everywhere, but e1 says it is full (capacity 50) and e2, e3 at a quarter
        // (capacity 200): new streams go mostly to e2 and e3, in proportion to the room left.
        let mut r = three_pods(12);
        let reports = [
            ("e1:1".to_owned(), report(50.0, Some(1.0), S)),
            ("e2:1".to_owned(), report(50.0, Some(0.25), S)),
            ("e3:1".to_owned(), report(50.0, Some(0.25), S)),
        ];
        r.apply_reports(S, "pods", &reports);
        let got = spread(&mut r, S, 1, 30);
        // Fill to equal utilisation: (50 + 10·n1)/50 = (50 + 10·n2)/200 → n1 ≈ 0, n2 = n3 = 15.
        assert!(got.get("e1:1").copied().unwrap_or(0) <= 1, "{got:?}");
        assert!(got.get("e2:1").copied().unwrap_or(0) >= 14, "{got:?}");
    }

    #[test]
    fn other_proxies_streams_not_yet_reported_count_at_their_recent_growth() {
        // e1's other proxies went from 0 to 100 in a second (a ramp); e2 and e3 hold 150.
        let mut r = three_pods(17);
        for (at, e1) in [(S, 0.0), (2 * S, 100.0)] {
            let reports = [
                ("e1:1".to_owned(), report(e1, Some(e1 / 400.0), at)),
                ("e2:1".to_owned(), report(150.0, Some(150.0 / 400.0), at)),
                ("e3:1".to_owned(), report(150.0, Some(150.0 / 400.0), at)),
            ];
            r.apply_reports(at, "pods", &reports);
        }
        // Right at the report e1 is the least loaded; 0.8 s later it is expected at 180.
        assert_eq!(spread(&mut r, 2 * S, 1, 1).get("e1:1"), Some(&1));
        let later = spread(&mut r, 2 * S + 8 * S / 10, 2, 4);
        assert_eq!(later.get("e1:1"), None, "{later:?}");
        // Never more than two probe intervals ahead of the report.
        let c = &r.clusters()[0];
        let e1 = c.endpoint(c.index_of("e1:1").unwrap()).unwrap();
        assert!(
            (e1.others_growth - 100.0).abs() < 1e-9,
            "{}",
            e1.others_growth
        );
        assert!((e1.unseen(10 * S, 2 * S) - 200.0).abs() < 1e-9);
        // A report that shows less than before stops the growth (departures are not guessed).
        r.apply_reports(
            3 * S,
            "pods",
            &[("e1:1".to_owned(), report(60.0, Some(0.15), 3 * S))],
        );
        let c = &r.clusters()[0];
        let e1 = c.endpoint(c.index_of("e1:1").unwrap()).unwrap();
        assert_eq!(e1.unseen(3 * S + S / 2, 2 * S), 0.0);
    }

    #[test]
    fn a_pod_with_only_this_envoys_streams_shows_no_other_proxy_growing() {
        // This Envoy's young streams send 4× their prior: each report holds more than it
        // expects, and more each second as it places more. With the pods' stream counts that
        // residual is its own; without them it reads as other proxies' growth.
        for counted in [true, false] {
            let mut r = three_pods(19);
            for (k, at) in [S, 2 * S].into_iter().enumerate() {
                spread(&mut r, at, 1 + 3 * k as u64, 3);
                let c = &r.clusters()[0];
                let reports: Vec<(String, LoadReport)> = (c.endpoints.iter())
                    .map(|e| {
                        let n = f64::from(e.active());
                        let mut rep = report(40.0 * n, None, at);
                        rep.streams = counted.then_some(n);
                        (e.address.clone(), rep)
                    })
                    .collect();
                r.apply_reports(at, "pods", &reports);
            }
            let c = &r.clusters()[0];
            let growth: f64 = c.endpoints.iter().map(|e| e.others_growth).sum();
            if counted {
                assert_eq!(growth, 0.0);
            } else {
                assert!(growth > 50.0, "{growth}");
            }
        }
    }

    #[test]
    fn the_residual_is_shared_by_stream_numbers() {
        // One young stream of this Envoy and three of other proxies on e1: of the 100 beyond
        // its estimate, three quarters are theirs.
        let mut r = three_pods(23);
        let d = r.place(S, 1, "rt", "pods").unwrap();
        let a = d.primary.unwrap();
        let mut rep = report(110.0, None, S);
        rep.streams = Some(4.0);
        r.apply_reports(S, "pods", &[(a.clone(), rep)]);
        let mut rep = report(210.0, None, 2 * S);
        rep.streams = Some(4.0);
        r.apply_reports(2 * S, "pods", &[(a.clone(), rep)]);
        let c = &r.clusters()[0];
        let e = c.endpoint(c.index_of(&a).unwrap()).unwrap();
        // Residuals 100 then 200 (the stream still counts 10): theirs 3 / (3 + young ≈ 1).
        let young = (-1.0f64 / (r.config().load.tau_ms as f64 / 1000.0)).exp();
        let expected = 200.0 * 3.0 / (3.0 + young) - 100.0 * 3.0 / 4.0;
        assert!(
            (e.others_growth - expected).abs() < 1.0,
            "{} vs {expected}",
            e.others_growth
        );
    }

    #[test]
    fn before_it_learns_a_rate_a_new_stream_is_expected_at_the_fleets_mean_per_stream() {
        let mut r = three_pods(29);
        assert_eq!(r.place(S, 1, "rt", "pods").unwrap().expected_rate, 10.0);
        let mut e1 = report(120.0, None, S);
        e1.streams = Some(3.0);
        let mut e2 = report(80.0, None, S);
        e2.streams = Some(1.0);
        // e3 gives no stream count: its rate is not in the mean.
        let e3 = report(50.0, None, S);
        let reports = [
            ("e1:1".to_owned(), e1),
            ("e2:1".to_owned(), e2),
            ("e3:1".to_owned(), e3),
        ];
        r.apply_reports(S, "pods", &reports);
        assert_eq!(r.place(S, 2, "rt", "pods").unwrap().expected_rate, 50.0);
        // Reports that count no stream leave the default.
        let mut r = three_pods(29);
        r.apply_reports(S, "pods", &[("e3:1".to_owned(), e3)]);
        assert_eq!(r.place(S, 1, "rt", "pods").unwrap().expected_rate, 10.0);
    }

    #[test]
    fn a_silent_pod_is_assumed_at_the_mean_not_idle() {
        let mut r = three_pods(13);
        let reports = [
            ("e1:1".to_owned(), report(100.0, Some(0.5), S)),
            ("e2:1".to_owned(), report(20.0, Some(0.1), S)),
        ];
        r.apply_reports(S, "pods", &reports);
        let c = &r.clusters()[0];
        let e3 = c.endpoint(c.index_of("e3:1").unwrap()).unwrap();
        // Mean utilisation 120/400 = 0.3 on capacity 200 (the others' mean per weight).
        assert!((e3.load() - 60.0).abs() < 1e-9, "{}", e3.load());
        assert!((e3.capacity - 200.0).abs() < 1e-9);
        // e2 runs at 0.1 of 200: the least utilised pod first.
        let got = spread(&mut r, S, 1, 4);
        assert_eq!(got.get("e2:1"), Some(&4), "{got:?}");
        // With two pods reporting, choices are drawn among them: a silent pod is never a
        // magnet for new streams.
        let got = spread(&mut r, S, 10, 20);
        assert_eq!(got.get("e3:1"), None, "{got:?}");
    }

    #[test]
    fn probes_rotate_over_healthy_pods_within_the_budget() {
        let mut r = Router::new(
            cfg(r#"{"clusters":["pods"],"probe":{"max_per_tick":2,"interval_ms":1000}}"#),
            "",
            14,
        );
        r.apply_snapshot(
            0,
            &snapshot(&[
                ("e1:1", "", true),
                ("e2:1", "", false),
                ("e3:1", "", true),
                ("e4:1", "", true),
            ]),
        );
        let first = r.due_probes(S);
        assert_eq!(first.len(), 2);
        let second = r.due_probes(S + S / 2);
        assert_eq!(
            second.len(),
            1,
            "the third healthy pod, the others were probed 0.5 s ago"
        );
        let all: Vec<String> = first.into_iter().chain(second).map(|(_, a)| a).collect();
        assert!(
            !all.contains(&"e2:1".to_owned()),
            "unhealthy pods are not probed"
        );
        assert!(r.due_probes(S + S / 2).is_empty());
        assert_eq!(r.due_probes(3 * S).len(), 2);
        // A tick that fires a few ms early still probes the pods probed one interval ago.
        let early = 4 * S - 5_000_000;
        assert_eq!(r.due_probes(early).len(), 2);
        assert_eq!(r.due_probes(early + S / 2).len(), 1);
        let off = cfg(r#"{"clusters":["pods"],"probe":{"enabled":false}}"#);
        let mut r = Router::new(off, "", 1);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true)]));
        assert!(r.due_probes(S).is_empty());
    }

    #[test]
    fn probes_run_at_the_placing_interval_while_streams_are_placed() {
        let ms = 1_000_000;
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 7);
        assert_eq!(r.timer_period_ms(), 250);
        r.apply_snapshot(
            0,
            &snapshot(&[("e1:1", "", true), ("e2:1", "", true), ("e3:1", "", true)]),
        );
        assert_eq!(r.due_probes(S).len(), 3);
        // Idle: each pod once per `interval_ms`.
        assert!(r.due_probes(S + 300 * ms).is_empty());
        assert_eq!(r.probe_interval_ms(S + 300 * ms), 1000);
        // Placing: every `placing_interval_ms` (a timer 10 ms early still probes).
        r.place(S + 300 * ms, 1, "rt", "pods");
        assert_eq!(r.probe_interval_ms(S + 300 * ms), 250);
        assert_eq!(r.due_probes(S + 300 * ms).len(), 3);
        assert_eq!(r.due_probes(S + 540 * ms).len(), 3);
        // More than `interval_ms` after the last placement: idle again.
        assert!(!r.is_placing(S + 1_400 * ms));
        assert!(r.due_probes(S + 1_400 * ms).is_empty());
        assert_eq!(r.due_probes(S + 1_540 * ms).len(), 3);
        // Another worker's placement (from shared data) counts as this proxy's.
        r.note_placing(S + 1_600 * ms);
        assert_eq!(r.due_probes(S + 1_800 * ms).len(), 3);
        // Unary calls are not placements that need fresh reports.
        let mut id = 10;
        for _ in 0..UNARY_ROUTE_STREAK {
            id += 1;
            r.place(2 * S, id, "unary", "pods");
            r.on_data(id, Direction::Upstream, 1, 10);
            r.on_data(id, Direction::Downstream, 1, 10);
            r.on_end(2 * S, id, Outcome::Ok);
        }
        assert!(r.is_unary_route("unary"));
        r.place(4 * S, 99, "unary", "pods");
        assert!(!r.is_placing(4 * S));
        // Without probes the timer keeps `tick_ms`.
        let off = Router::new(
            cfg(r#"{"clusters":["pods"],"probe":{"enabled":false}}"#),
            "",
            1,
        );
        assert_eq!(off.timer_period_ms(), 1000);
        let slow = r#"{"clusters":["pods"],"probe":{"interval_ms":100,"placing_interval_ms":250}}"#;
        let mut slow = Router::new(cfg(slow), "", 1);
        slow.note_placing(0);
        assert_eq!(slow.probe_interval_ms(0), 100, "never above interval_ms");
        assert_eq!(slow.timer_period_ms(), 100);
    }

    #[test]
    fn the_probe_budget_is_per_tick_however_often_probes_are_asked_for() {
        let ms = 1_000_000;
        let mut r = Router::new(
            cfg(
                r#"{"clusters":["pods"],"probe":{"max_per_tick":4,"interval_ms":50,"placing_interval_ms":50}}"#,
            ),
            "",
            8,
        );
        let pods: Vec<String> = (0..20).map(|i| format!("e{i}:1")).collect();
        let eps: Vec<(&str, &str, bool)> = pods.iter().map(|a| (a.as_str(), "", true)).collect();
        r.apply_snapshot(0, &snapshot(&eps));
        // Asked every 50 ms for 10 s: 4 per second (the first second's 4 at once), not 4 a call.
        let sent: usize = (0..200).map(|k| r.due_probes(S + k * 50 * ms).len()).sum();
        assert!((40..=44).contains(&sent), "{sent}");
    }

    #[test]
    fn young_weights_are_kept_without_a_pass_over_the_streams() {
        let ms = 1_000_000;
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 9);
        let eps = [("e1:1", "", true), ("e2:1", "", true), ("e3:1", "", true)];
        r.apply_snapshot(0, &snapshot(&eps));
        // What apply_reports used to compute per report: Σ e^(−age/τ) over the streams there.
        let brute = |r: &Router, now: Nanos| {
            let mut young = vec![0.0; 3];
            for (_, s) in r.streams.iter() {
                if let Some(j) = s.endpoint.filter(|_| !s.move_planned) {
                    young[j] += prior_weight(now.saturating_sub(s.started), r.tau_secs());
                }
            }
            young
        };
        let kept = |r: &Router, now: Nanos| {
            let t0 = r.young_t0.unwrap_or(now);
            let decay = (-((now - t0) as f64) / 1e9 / r.tau_secs()).exp();
            let c = &r.clusters()[0];
            (0..3)
                .map(|j| c.endpoint(j).map_or(0.0, |e| e.young * decay))
                .collect::<Vec<f64>>()
        };
        let mut now = S;
        for id in 0..30u64 {
            now += 170 * ms;
            r.place(now, id, "rt", "pods");
            if id % 4 == 1 {
                r.on_upstream(now, id, "e3:1", String::new); // Envoy chose another pod
            }
            if id % 5 == 2 {
                r.on_end(now, id - 2, Outcome::Ok);
            }
            if id % 7 == 3 {
                r.set_move_planned(id - 1, true, now);
            }
            if id % 11 == 4 {
                r.set_move_planned(id - 4, false, now);
            }
            if id % 6 == 5 {
                r.tick(now);
            }
            let later = now + 90 * ms;
            let (a, b) = (kept(&r, later), brute(&r, later));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-9, "after {id}: kept {a:?}, brute {b:?}");
            }
        }
        assert!(brute(&r, now).iter().all(|&y| y > 1.0));
    }

    #[test]
    fn a_route_is_unary_until_it_streams() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 3);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        let mut id = 0;
        let mut exchange = |r: &mut Router, t: Nanos, msgs: u64, outcome: Outcome| {
            id += 1;
            r.place(t, id, "rt", "pods");
            r.on_data(id, Direction::Upstream, msgs, 10 * msgs);
            r.on_data(id, Direction::Downstream, 1, 10);
            r.on_end(t + S / 100, id, outcome);
        };
        for n in 0..UNARY_ROUTE_STREAK {
            assert!(!r.is_unary_route("rt"), "after {n} unary exchanges");
            exchange(&mut r, S, 1, Outcome::Ok);
            // Short failures neither count nor reset.
            exchange(&mut r, S, 1, Outcome::Failed);
        }
        assert!(r.is_unary_route("rt"));
        assert!(!r.is_unary_route("other-route"));
        // One streaming exchange ends: lookups again, and the streak starts over.
        exchange(&mut r, 2 * S, 2, Outcome::Ok);
        assert!(!r.is_unary_route("rt"));
        for _ in 0..UNARY_ROUTE_STREAK {
            exchange(&mut r, 3 * S, 1, Outcome::Ok);
        }
        assert!(r.is_unary_route("rt"));
        // An open stream seen streaming on the tick turns them back on before it ends.
        r.place(4 * S, 1000, "rt", "pods");
        r.on_data(1000, Direction::Upstream, 3, 30);
        r.tick(5 * S);
        assert!(!r.is_unary_route("rt"));
    }

    #[test]
    fn the_fold_over_route_is_never_unary() {
        // With max_routes 1, "rt" is tracked and every other name folds into `other`. Short calls
        // on folded routes (a check, a health probe) must not turn off the rate memory of the
        // lasting streams on the other folded routes.
        let mut r = Router::new(cfg(r#"{"clusters":["pods"],"max_routes":1}"#), "", 3);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        assert!(!r.is_unary_route("rt"));
        for id in 1..=2 * UNARY_ROUTE_STREAK as u64 {
            r.place(S, id, &format!("folded-{id}"), "pods");
            r.on_data(id, Direction::Upstream, 1, 10);
            r.on_data(id, Direction::Downstream, 1, 10);
            r.on_end(S + S / 100, id, Outcome::Ok);
        }
        assert!(!r.is_unary_route("folded-1"));
        assert!(!r.is_unary_route("another-folded-route"));
    }

    #[test]
    fn failures_penalize_and_end_releases_load() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 3);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        r.place(0, 1, "rt", "pods");
        r.on_upstream(0, 1, "e1:1", String::new);
        let ended = r.on_end(S, 1, Outcome::Failed).unwrap();
        assert_eq!(ended.cluster, ClusterIdx(0));
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
        r.on_upstream(0, 1, other, || "z".to_string());
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
        r.on_upstream(0, 1, "e1:1", String::new);
        r.place(0, 2, "rt", "pods");
        r.on_upstream(0, 2, "e2:1", String::new);
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
        let mut r = Router::new(
            // Nothing is learned yet: the cap is max_ratio × default_stream_rate (1/s).
            cfg(r#"{"clusters":["pods"],"rate_memory":{"max_ratio":1000}}"#),
            "",
            5,
        );
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        r.tick(0);
        let heavy = Source {
            key: 77,
            rate: Some(100.0),
            to: None,
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
        assert_eq!((updates[0].key, updates[0].to), (77, None));
        assert!((updates[0].rate - 100.0).abs() < 1.0, "{updates:?}"); // bias-corrected
        assert!(r.take_rate_updates().is_empty());
    }

    /// Three endpoints e0..e2; six 10/s streams forced onto e0 (as if placed by another
    /// policy), measured for 20 s.
    fn hot_e0(rebalance: &str) -> (Router, Nanos) {
        let json = format!(r#"{{"clusters":["pods"],"rebalance":{rebalance}}}"#);
        let mut r = Router::new(cfg(&json), "", 5);
        r.apply_snapshot(
            0,
            &snapshot(&[("e0:1", "", true), ("e1:1", "", true), ("e2:1", "", true)]),
        );
        for id in 0..6 {
            r.place(0, id, "rt", "pods");
            r.on_upstream(0, id, "e0:1", String::new);
        }
        let mut t = 0;
        for _ in 0..20 {
            t += S;
            for id in 0..6 {
                r.on_data(id, Direction::Upstream, 10, 0);
            }
            r.tick(t);
        }
        (r, t)
    }

    #[test]
    fn rebalancer_plans_moves_off_a_hot_endpoint_once() {
        let (mut r, t) = hot_e0(r#"{"mode":"on","min_age_ms":1000}"#);
        let plan = r.plan_moves(t, 2);
        assert_eq!(plan.moves.len(), 2, "{plan:?}"); // the allowance
        assert!(plan.skipped_budget[0] > 0, "{plan:?}");
        assert!(plan.moves.iter().all(|m| !r.move_planned(m.stream)));
        r.commit_moves(t, &plan);
        assert!(plan
            .moves
            .iter()
            .all(|m| m.from == 0 && r.move_planned(m.stream)));
        assert!(plan.excess_after[0] < plan.excess_before[0]);
        let again = r.plan_moves(t + S, 10);
        assert!(again
            .moves
            .iter()
            .all(|m| !plan.moves.iter().any(|p| p.stream == m.stream)));
    }

    #[test]
    fn a_mild_skew_does_not_keep_a_spilled_stream_from_coming_home() {
        let json = r#"{"clusters":["pods"],"rebalance":{"mode":"on","min_age_ms":1000}}"#;
        let mut r = Router::new(cfg(json), "a", 5);
        let pods = [("a0:1", "a", true), ("a1:1", "a", true)];
        r.apply_snapshot(
            0,
            &snapshot(&[pods[0], pods[1], ("b0:1", "b", true), ("b1:1", "b", true)]),
        );
        // Mean 37/4 = 9.25: b0 at 11 is over the hot line (10.2), not far over (11.1). Zone a
        // has room for 1.05 · 9.25 · 2 − 16 = 3.4.
        let streams = [
            ("a0:1", 8),
            ("a1:1", 8),
            ("b0:1", 9),
            ("b0:1", 2),
            ("b1:1", 8),
            ("b1:1", 2),
        ];
        for (id, (address, _)) in streams.iter().enumerate() {
            r.place(0, id as u64, "rt", "pods");
            r.on_upstream(0, id as u64, address, || address[..1].to_owned());
        }
        let mut t = 0;
        for _ in 0..20 {
            t += S;
            for (id, (_, rate)) in streams.iter().enumerate() {
                r.on_data(id as u64, Direction::Upstream, *rate, 0);
            }
            r.tick(t);
        }
        let plan = r.plan_moves(t, 1);
        let moved: Vec<(f64, MoveWhy)> =
            plan.moves.iter().map(|m| (m.rate.round(), m.why)).collect();
        assert_eq!(moved, vec![(2.0, MoveWhy::Home)], "{plan:?}");
        // With more budget, the shedding that follows counts the stream gone home as gone: b0
        // is no longer hot, and no stream is planned twice.
        let plan = r.plan_moves(t, 3);
        let mut ids: Vec<u64> = plan.moves.iter().map(|m| m.stream).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), plan.moves.len(), "{plan:?}");
        assert!(
            plan.moves.iter().all(|m| m.why == MoveWhy::Home),
            "{plan:?}"
        );
    }

    #[test]
    fn a_planned_stream_is_counted_as_gone_until_it_ends_or_its_move_is_dropped() {
        let (mut r, t) = hot_e0(r#"{"mode":"on","min_age_ms":1000}"#);
        // e0's (load, active streams), and what they should be: the streams on it that are not
        // planned to move, and all streams on it.
        let e0 = |r: &Router| {
            let e = r.clusters()[0]
                .endpoint(0)
                .map_or((-1.0, 0), |e| (e.load(), e.active()));
            let on_e0 = || r.streams().iter().filter(|(_, s)| s.endpoint == Some(0));
            let staying: f64 = on_e0()
                .filter(|(_, s)| !s.move_planned)
                .map(|(_, s)| s.estimate())
                .sum();
            assert!((e.0 - staying).abs() < 1e-6, "{e:?} vs {staying}");
            assert_eq!(e.1 as usize, on_e0().count());
            assert!(
                (r.clusters()[0].zones[0].load
                    - r.clusters()[0]
                        .endpoints
                        .iter()
                        .map(|e| e.load())
                        .sum::<f64>())
                .abs()
                    < 1e-6
            );
            e.0
        };
        let before = e0(&r);
        let plan = r.plan_moves(t, 2);
        let moving: f64 = plan.moves.iter().map(|m| m.rate).sum();
        r.commit_moves(t, &plan);
        assert!(moving > 0.0 && (e0(&r) - (before - moving)).abs() < 1e-6);
        // The pod still measures them until they end: this Envoy's part of a report stays.
        let in_report = |r: &Router| {
            r.clusters()[0]
                .endpoint(0)
                .map_or(0.0, |e| e.own_in_report())
        };
        assert!((in_report(&r) - before).abs() < 1e-6);
        // A tick keeps it aside (the streams still send).
        for id in 0..6 {
            r.on_data(id, Direction::Upstream, 10, 0);
        }
        r.tick(t + S);
        e0(&r);
        // One planned stream ends: only its slot leaves, its load was gone already.
        let at_end = e0(&r);
        let report_part = in_report(&r);
        r.on_end(t + S, plan.moves[0].stream, Outcome::Cancelled);
        assert!((e0(&r) - at_end).abs() < 1e-6);
        assert!((in_report(&r) - report_part).abs() < 1e-6); // ended: still in the window
                                                             // The other one's move is dropped: its load comes back.
        let deadline = rebalance::move_deadline(S);
        r.expire_moves(t + deadline, deadline);
        assert!(e0(&r) > at_end);
        // The ended stream counts in a report for the tick it ended in and the next.
        let ended = |r: &Router| {
            r.clusters()[0]
                .endpoint(0)
                .map_or(0.0, |e| e.ended[0] + e.ended[1])
        };
        assert!(ended(&r) > 0.0);
        r.tick(t + deadline + S);
        assert!(ended(&r) > 0.0);
        r.tick(t + deadline + 2 * S);
        assert_eq!(ended(&r), 0.0);
    }

    #[test]
    fn planned_moves_not_carried_out_are_dropped_and_count_again() {
        let (mut r, t) = hot_e0(r#"{"mode":"on","min_age_ms":1000}"#);
        let first = r.plan_moves(t, 2);
        r.commit_moves(t, &first);
        let ids = |p: &Plan| -> Vec<u64> { p.moves.iter().map(|m| m.stream).collect() };
        // While planned, the streams are not chosen again.
        let meanwhile = r.plan_moves(t + S, 10);
        assert!(!meanwhile.moves.is_empty());
        assert!(meanwhile
            .moves
            .iter()
            .all(|m| !ids(&first).contains(&m.stream)));
        // Not carried out by the deadline: dropped, and they are candidates again.
        let deadline = rebalance::move_deadline(S);
        assert_eq!(deadline, 5 * S);
        assert_eq!(r.expire_moves(t + deadline - 1, deadline), vec![0]);
        assert_eq!(r.expire_moves(t + deadline, deadline), vec![2]);
        assert!(first.moves.iter().all(|m| !r.move_planned(m.stream)));
        assert_eq!(ids(&r.plan_moves(t + deadline, 2)), ids(&first));
        // A stream whose response started (no resets allowed) loses its planned move.
        let plan = r.plan_moves(t + deadline, 1);
        r.commit_moves(t + deadline, &plan);
        let id = plan.moves[0].stream;
        assert_eq!(r.set_unmovable(id), Some(ClusterIdx(0)));
        assert!(!r.move_planned(id));
        assert_eq!(r.set_unmovable(id), None);
        assert!(r
            .plan_moves(t + deadline, 10)
            .moves
            .iter()
            .all(|m| m.stream != id));
    }

    #[test]
    fn a_moved_device_reconnects_where_its_move_found_room() {
        let (mut r, t) = hot_e0(r#"{"mode":"on","min_age_ms":1000}"#);
        for id in 0..6 {
            if let Some(s) = r.streams.get_mut(id) {
                s.key = Some(100 + id);
            }
        }
        let plan = r.plan_moves(t, 1);
        r.commit_moves(t, &plan);
        let m = plan.moves[0];
        let tag = rate_memory::address_tag(&format!("e{}:1", m.to_room_on));
        let written: Vec<(u64, Option<u32>)> = (r.take_rate_updates().iter())
            .map(|u| (u.key, u.to))
            .collect();
        assert_eq!(written, vec![(100 + m.stream, Some(tag))]);
        assert!(r.take_rate_updates().is_empty());
        // Whatever the picker would choose (e0, where the rest still sends, is never it), the
        // reconnection goes to the hinted endpoint, the pick becomes the retry choice.
        for hinted in ["e0:1", "e1:1", "e2:1"] {
            let source = Source {
                key: 100 + m.stream,
                rate: Some(m.rate),
                to: Some(rate_memory::address_tag(hinted)),
            };
            let d = r.place_from(t, 50, "rt", "pods", Some(source));
            let chosen = d
                .as_ref()
                .map(|d| (d.primary.as_deref(), d.secondary.as_deref()));
            assert!(
                matches!(chosen, Some((Some(p), s)) if p == hinted && s != Some(hinted)),
                "{d:?}"
            );
            r.on_end(t, 50, Outcome::Cancelled);
        }
        // An unknown tag (the endpoint is gone): the picker's choice.
        let source = Source {
            key: 100 + m.stream,
            rate: Some(m.rate),
            to: Some(rate_memory::address_tag("e9:1")),
        };
        let d = r.place_from(t, 51, "rt", "pods", Some(source));
        let primary = d.as_ref().and_then(|d| d.primary.as_deref());
        assert!(primary.is_some() && primary != Some("e0:1"), "{d:?}");
    }

    #[test]
    fn a_worker_that_learned_no_mean_caps_remembered_rates_by_the_other_workers_mean() {
        let mut r = Router::new(cfg(r#"{"clusters":["pods"]}"#), "", 5);
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        let moved = |rate| Source {
            key: 7,
            rate: Some(rate),
            to: None,
        };
        // Nothing learned, nothing shared: a remembered 72/s is placed as 72/s, not capped at
        // 20 × the default rate (1/s).
        let d = r.place_from(0, 1, "rt", "pods", Some(moved(72.0)));
        assert_eq!(d.map(|d| d.expected_rate), Some(72.0));
        // The other workers carry 3 streams at 30/s in all: the cap is 20 × 10/s.
        r.set_remote_loads(0, [("pods", "e1:1", 20.0, 2), ("pods", "e2:1", 10.0, 1)]);
        let d = r.place_from(0, 2, "rt", "pods", Some(moved(1e6)));
        assert_eq!(d.map(|d| d.expected_rate), Some(200.0));
    }

    #[test]
    fn remembered_rates_are_capped_at_a_multiple_of_the_route_mean() {
        let mut r = Router::new(
            cfg(r#"{"clusters":["pods"],"rate_memory":{"max_ratio":20}}"#),
            "",
            5,
        );
        r.apply_snapshot(0, &snapshot(&[("e1:1", "", true), ("e2:1", "", true)]));
        // Ten streams measured at 10/s: the route mean is 10/s.
        for id in 0..10 {
            r.place_from(
                0,
                id,
                "rt",
                "pods",
                Some(Source {
                    key: id,
                    rate: None,
                    to: None,
                }),
            );
        }
        let mut t = 0;
        for _ in 0..30 {
            t += S;
            for id in 0..10 {
                r.on_data(id, Direction::Upstream, 10, 0);
            }
            r.tick(t);
        }
        let rt = r.routes.intern("rt");
        assert!((r.expected_rate(ClusterIdx(0), rt) - 10.0).abs() < 0.5);
        // A source claiming 10^5 × the mean is placed as 20 × the mean.
        let poisoned = Source {
            key: 99,
            rate: Some(1e6),
            to: None,
        };
        let d = r.place_from(t, 100, "rt", "pods", Some(poisoned)).unwrap();
        assert!((d.expected_rate - 200.0).abs() < 10.0, "{d:?}");
        // An honest remembered rate below the cap is used as is.
        let honest = Source {
            key: 98,
            rate: Some(150.0),
            to: None,
        };
        assert_eq!(
            r.place_from(t, 101, "rt", "pods", Some(honest))
                .unwrap()
                .expected_rate,
            150.0
        );
        // What is written is capped too: a stream that really sent 10^5 × the mean.
        r.take_rate_updates();
        for _ in 0..5 {
            t += S;
            r.on_data(100, Direction::Upstream, 1_000_000, 0);
            for id in 0..10 {
                r.on_data(id, Direction::Upstream, 10, 0);
            }
            r.tick(t);
        }
        r.on_end(t, 100, Outcome::Cancelled);
        let updates = r.take_rate_updates();
        let written = updates.iter().find(|u| u.key == 99).unwrap().rate;
        assert!(
            written <= 20.0 * r.expected_rate(ClusterIdx(0), rt) + 1e-9,
            "{updates:?}"
        );
        assert!(written > 100.0, "{updates:?}");
    }

    #[test]
    fn handed_streams_keep_their_load_endpoint_and_rate() {
        let (mut old, t) = hot_e0(r#"{"mode":"on","min_age_ms":1000}"#);
        let plan = old.plan_moves(t, 1);
        old.commit_moves(t, &plan);
        // The new configuration covers the same cluster (listed second) and has discovered it.
        let mut new = Router::new(cfg(r#"{"clusters":["other","pods"]}"#), "", 6);
        new.apply_snapshot(
            t,
            &snapshot(&[("e2:1", "", true), ("e1:1", "", true), ("e0:1", "", true)]),
        );
        let handed = old.hand_over();
        assert_eq!(handed.len(), 6);
        assert!(old.streams().is_empty() && old.clusters()[0].totals().0 < 1e-9);
        for h in handed {
            let id = h.id;
            let (ci, ri) = new.adopt(t, h).unwrap();
            assert_eq!((new.routes().name(ri), ci), ("rt", ClusterIdx(1)));
            assert!(!new.move_planned(id), "a planned move is not carried over");
        }
        let c = &new.clusters()[1];
        let e0 = c.endpoint(c.index_of("e0:1").unwrap()).unwrap();
        assert_eq!(e0.local_active, 6);
        assert!((c.totals().0 - 60.0).abs() < 1.0, "{}", c.totals().0);
        for id in 0..6 {
            new.on_data(id, Direction::Upstream, 10, 0);
        }
        new.tick(t + S);
        let c = &new.clusters()[1];
        let e0 = c.endpoint(c.index_of("e0:1").unwrap()).unwrap();
        assert_eq!(e0.local_active, 6);
        assert!((e0.load() - 60.0).abs() < 2.0, "{}", e0.load());
        // A configuration that does not cover the cluster does not take the stream.
        let mut elsewhere = Router::new(cfg(r#"{"clusters":["other"]}"#), "", 7);
        for h in new.hand_over() {
            assert_eq!(elsewhere.adopt(t, h), None);
        }
        assert!(elsewhere.streams().is_empty());
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
            to: None,
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
            (r.expected_rate(ClusterIdx(0), rt) - 20.0).abs() < 0.5,
            "{}",
            r.expected_rate(ClusterIdx(0), rt)
        );
    }
}
