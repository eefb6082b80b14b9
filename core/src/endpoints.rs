//! The endpoint table of one upstream cluster, with per-endpoint load and per-zone aggregates.
//!
//! The table is replaced wholesale by each discovery snapshot (Envoy admin `/clusters`) and refined
//! passively by the real upstream seen on responses. Load bookkeeping:
//!
//! ```text
//! own_j      = local_rate_j + local_pending_j + remote_load_j + peer_guess_j
//! load_j     = own_j, or own_j + max(0, F_j − own_j at the report) with the fleet view
//! local_rate_j    = Σ over this VM's streams on j of their rate EWMA
//! local_pending_j = Σ prior_s · e^(−age_s/τ)   (what the EWMA has not yet learned of young streams)
//! peer_guess_j    = (other workers) × the priors this VM placed on j since its last tick
//! capacity_j = base_j · slow_start_j · penalty_j,  base_j = weight_j, or c_j with the fleet view
//! ```
//!
//! `F_j` and `c_j` come from the pods' load reports ([`crate::fleet`]): what the report holds
//! beyond this Envoy's own load at that moment is the other proxies' share; this Envoy's own
//! streams (placed, ended, moved since) are counted as they are now.
//!
//! `local_*` is recomputed from the stream table on every tick and adjusted incrementally
//! between ticks (placement, re-attribution, stream end), so a burst of placements between two
//! ticks already sees itself. The other workers' placements arrive only with the next exchange
//! (on the tick); until then each of them is assumed to be placing a burst like this VM's, so W
//! workers hit by one storm do not each fill the same headroom. Zone aggregates (`Σ load`, `Σ capacity` over healthy endpoints)
//! are kept beside, so a placement costs O(zones + d), not O(endpoints).

use hashbrown::HashMap;

use super::config::Config;
use super::discovery::ClusterSnapshot;
use super::ewma::Decaying;
use super::fleet::{FleetSummary, LoadReport};
use super::streams::Counted;
use super::{penalty, slow_start, Nanos};

#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `ip:port`, as Envoy prints it and `override_host` reads it.
    pub address: String,
    /// Locality zone; empty when unknown.
    pub zone: String,
    /// Healthy per the last discovery snapshot. Only healthy, discovered endpoints are named.
    pub healthy: bool,
    /// Listed by discovery (not only seen passively on a response).
    pub discovered: bool,
    pub weight: f64,
    /// When this VM first saw the endpoint; `None` if it was in the first snapshot.
    pub first_seen: Option<Nanos>,
    pub local_rate: f64,
    pub local_pending: f64,
    pub local_active: u32,
    /// Σ of the `young` weights of this VM's streams here that are not planned to move,
    /// against the router's young epoch (kept as streams come, go and move; rebuilt each tick).
    pub young: f64,
    /// Load and active streams of the other workers of this Envoy (shared view).
    pub remote_load: f64,
    pub remote_active: u32,
    /// Load the other workers are assumed to have placed here since the last tick: each is taken
    /// to place what this VM placed (see the module doc). Reset on every tick.
    pub peer_guess: f64,
    pub penalty: Decaying,
    /// Latest ORCA utilisation and when it was reported.
    pub orca: Option<(f64, Nanos)>,
    /// The pod's latest load report (fleet view) and when this proxy last probed it.
    pub report: Option<LoadReport>,
    pub last_probe: Option<Nanos>,
    /// Fleet load `F_j` as of the last refresh; `None` when the cluster uses the local view.
    pub fleet_load: Option<f64>,
    /// Its report was fresh at the last refresh.
    pub reported: bool,
    /// How fast the other proxies' load here grew between its last two reports (per second,
    /// never negative), and their load at the last report: their streams placed since are
    /// not in the report yet (see [`Self::unseen`]).
    pub others_growth: f64,
    pub others_seen: Option<(f64, Nanos)>,
    /// This Envoy's own load on the endpoint when its report arrived (what of the report is not
    /// the other proxies').
    pub own_at_report: f64,
    /// Load of this VM's streams here that are planned to move (set aside from `local_*`, but
    /// still sending until they end).
    pub aside: f64,
    /// Load of this VM's streams here that ended since the last tick, and in the tick before:
    /// a pod's report measures a recent window, which may still hold them.
    pub ended: [f64; 2],
    /// When this VM last planned moves off it for being hot.
    pub shed_at: Option<Nanos>,
    /// Capacity as of the last refresh (slow start and penalties change it over time).
    pub capacity: f64,
    /// `capacity` before slow start and penalties: the weight, or `c_j` with the fleet view.
    base_capacity: f64,
}

impl Endpoint {
    fn new(address: &str, zone: &str, first_seen: Option<Nanos>) -> Self {
        Endpoint {
            address: address.to_string(),
            zone: zone.to_string(),
            healthy: false,
            discovered: false,
            weight: 1.0,
            first_seen,
            local_rate: 0.0,
            local_pending: 0.0,
            young: 0.0,
            local_active: 0,
            remote_load: 0.0,
            remote_active: 0,
            peer_guess: 0.0,
            penalty: Decaying::default(),
            orca: None,
            report: None,
            last_probe: None,
            fleet_load: None,
            reported: false,
            others_growth: 0.0,
            others_seen: None,
            own_at_report: 0.0,
            aside: 0.0,
            ended: [0.0; 2],
            shed_at: None,
            capacity: 1.0,
            base_capacity: 1.0,
        }
    }

    /// What this Envoy itself measured and placed on the endpoint (and its guess of the other
    /// workers' burst).
    pub fn own_load(&self) -> f64 {
        self.local_rate + self.local_pending + self.remote_load + self.peer_guess
    }

    /// This Envoy's part of a report arriving now: its load here, plus its streams here that
    /// are about to move or ended within the last two ticks (still in the report's window;
    /// otherwise they would count as the other proxies' load until the next report).
    pub fn own_in_report(&self) -> f64 {
        self.own_load() + self.aside + self.ended[0] + self.ended[1]
    }

    /// The endpoint's load: the fleet view's when the cluster has one, else [`Self::own_load`].
    pub fn load(&self) -> f64 {
        let own = self.own_load();
        self.fleet_load
            .map_or(own, |f| own + (f - self.own_at_report).max(0.0))
    }

    /// The other proxies' load here not yet in its report: their growth between the last two
    /// reports, carried on for the report's age (at most `horizon`).
    pub fn unseen(&self, now: Nanos, horizon: Nanos) -> f64 {
        match self.report {
            Some(r) if self.fleet_load.is_some() && self.others_growth > 0.0 => {
                self.others_growth * now.saturating_sub(r.at).min(horizon) as f64 / 1e9
            }
            _ => 0.0,
        }
    }

    /// A new report arrived: the other proxies' part of it, and how fast it grew since the
    /// one before (reports less than `min_gap` apart keep the growth as it was). `own_young`:
    /// how many of this VM's streams here are still unknown (Σ of their priors' weights).
    ///
    /// What the report holds beyond this Envoy's estimate is the other proxies' streams, and
    /// also what this Envoy's young streams send beyond their priors. When the pod says how
    /// many streams it has, that residual is shared between the two by their numbers: a pod
    /// with only this Envoy's streams shows no other proxy growing there.
    pub fn note_report(&mut self, report: LoadReport, min_gap: Nanos, own_young: f64) {
        self.report = Some(report);
        self.own_at_report = self.own_in_report();
        let residual = (report.rate - self.own_at_report).max(0.0);
        let others = match report.streams {
            Some(n) => {
                let theirs = (n - f64::from(self.active())).max(0.0);
                let young = own_young.max(0.0);
                if theirs + young > 0.0 {
                    residual * theirs / (theirs + young)
                } else {
                    0.0
                }
            }
            None => residual,
        };
        match self.others_seen {
            Some((before, at)) if report.at.saturating_sub(at) >= min_gap.max(1) => {
                let dt = report.at.saturating_sub(at) as f64 / 1e9;
                self.others_growth = ((others - before) / dt).max(0.0);
                self.others_seen = Some((others, report.at));
            }
            Some(_) => {}
            None => self.others_seen = Some((others, report.at)),
        }
    }

    pub fn active(&self) -> u32 {
        self.local_active + self.remote_active
    }

    /// Usable for naming in `override_host`.
    pub fn eligible(&self) -> bool {
        self.healthy && self.discovered
    }

    /// Fresh ORCA utilisation, if any.
    pub fn orca_utilization(&self, now: Nanos, max_age: Nanos) -> Option<f64> {
        self.orca
            .filter(|(_, at)| now.saturating_sub(*at) <= max_age)
            .map(|(u, _)| u)
    }

    fn refresh_capacity(&mut self, cfg: &Config, now: Nanos) {
        let penalty_score = self
            .penalty
            .value(now, cfg.penalty.half_life_ms as f64 / 1000.0);
        self.capacity = self.base_capacity
            * slow_start::capacity_factor(&cfg.slow_start, self.first_seen, now)
            * penalty::capacity_factor(penalty_score, cfg.penalty.weight);
    }
}

/// How long the other proxies' growth is carried on past a report: two probe intervals (the
/// next report should have come by then).
pub fn unseen_horizon(cfg: &Config) -> Nanos {
    cfg.probe.interval_ms.saturating_mul(2_000_000)
}

/// The healthy endpoints of one zone and their summed load and capacity.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    pub name: String,
    pub healthy: Vec<usize>,
    pub load: f64,
    pub capacity: f64,
    /// Σ of its endpoints' [`Endpoint::others_growth`] whose report is younger than the
    /// horizon: the other proxies' load expected to arrive per second since the refresh.
    pub growth: f64,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    by_address: HashMap<String, usize>,
    pub zones: Vec<Zone>,
    /// When the last discovery snapshot was applied.
    pub snapshot_at: Option<Nanos>,
    /// When the zone sums were last recomputed ([`Self::refresh`]).
    pub refreshed_at: Nanos,
    /// The fleet picture as of the last refresh; `None`: local view.
    pub fleet: Option<FleetSummary>,
    /// This VM's load estimate over its streams on the cluster, and the part of it that is
    /// priors of streams of unknown rate (kept by the router).
    pub own_load: f64,
    pub own_unknown: f64,
    /// The fleet's mean rate per stream, `Σ R / Σ N` over the fresh reports that give a
    /// stream count: the expected rate of a new stream before this VM has learned one.
    pub fleet_stream_rate: Option<f64>,
}

impl Cluster {
    pub fn new(name: &str) -> Self {
        Cluster {
            name: name.to_string(),
            endpoints: Vec::new(),
            by_address: HashMap::new(),
            zones: Vec::new(),
            snapshot_at: None,
            refreshed_at: 0,
            fleet: None,
            own_load: 0.0,
            own_unknown: 0.0,
            fleet_stream_rate: None,
        }
    }

    pub fn index_of(&self, address: &str) -> Option<usize> {
        self.by_address.get(address).copied()
    }

    pub fn endpoint(&self, i: usize) -> Option<&Endpoint> {
        self.endpoints.get(i)
    }

    pub fn endpoint_mut(&mut self, i: usize) -> Option<&mut Endpoint> {
        self.endpoints.get_mut(i)
    }

    /// Replace the table with a discovery snapshot, keeping what is known of endpoints still
    /// listed. Returns the old index → new index map, for the stream table to follow.
    pub fn apply_snapshot(
        &mut self,
        cfg: &Config,
        now: Nanos,
        snapshot: &ClusterSnapshot,
    ) -> Vec<Option<usize>> {
        let first = self.snapshot_at.is_none();
        let mut old: Vec<Option<Endpoint>> = self.endpoints.drain(..).map(Some).collect();
        let old_index = std::mem::take(&mut self.by_address);
        let mut remap = vec![None; old.len()];
        for d in &snapshot.endpoints {
            if self.by_address.contains_key(&d.address) {
                continue; // duplicate address in one snapshot: first wins
            }
            let kept = old_index
                .get(&d.address)
                .and_then(|&i| old.get_mut(i).and_then(Option::take).map(|e| (i, e)));
            let mut e = match kept {
                Some((i, mut e)) => {
                    if let Some(slot) = remap.get_mut(i) {
                        *slot = Some(self.endpoints.len());
                    }
                    // Seen before only passively: born now, unless this is the first snapshot.
                    if !e.discovered && first {
                        e.first_seen = None;
                    }
                    e
                }
                None => Endpoint::new(&d.address, &d.zone, if first { None } else { Some(now) }),
            };
            e.discovered = true;
            e.healthy = d.healthy;
            e.weight = f64::from(d.weight.max(1));
            if !d.zone.is_empty() {
                e.zone.clone_from(&d.zone);
            }
            self.by_address
                .insert(e.address.clone(), self.endpoints.len());
            self.endpoints.push(e);
        }
        self.snapshot_at = Some(now);
        self.refresh(cfg, now);
        remap
    }

    /// A response came from `address`: learn the endpoint if new, its zone if unknown (`zone`
    /// is asked only then). Returns its index.
    pub fn observe_upstream(
        &mut self,
        now: Nanos,
        address: &str,
        zone: impl FnOnce() -> String,
    ) -> usize {
        if let Some(i) = self.index_of(address) {
            if let Some(e) = self.endpoints.get_mut(i).filter(|e| e.zone.is_empty()) {
                e.zone = zone();
            }
            return i;
        }
        let first_seen = self.snapshot_at.map(|_| now);
        let i = self.endpoints.len();
        self.endpoints
            .push(Endpoint::new(address, &zone(), first_seen));
        self.by_address.insert(address.to_string(), i);
        i
    }

    /// Recompute the fleet view, capacities and zone aggregates from the endpoints.
    pub fn refresh(&mut self, cfg: &Config, now: Nanos) {
        let max_age = cfg.probe.max_age_ms.saturating_mul(1_000_000);
        let fresh = |e: &Endpoint| e.report.as_ref().filter(|r| r.fresh(now, max_age)).copied();
        self.fleet = FleetSummary::of(self.endpoints.iter().filter(|e| e.eligible()).map(|e| {
            (
                e.weight,
                e.report.as_ref().filter(|r| r.fresh(now, max_age)),
            )
        }));
        // Per zone: (Σ reported load, Σ capacity) of the pods with a fresh report.
        let mut zone_sums: HashMap<&str, (f64, f64)> = HashMap::new();
        let (mut counted_rate, mut streams) = (0.0, 0.0);
        if let Some(summary) = self.fleet {
            for e in self.endpoints.iter().filter(|e| e.eligible()) {
                if let Some(r) = fresh(e) {
                    let acc = zone_sums.entry(e.zone.as_str()).or_default();
                    acc.0 += r.rate;
                    acc.1 += summary.capacity(e.weight, Some(&r));
                    if let Some(n) = r.streams {
                        counted_rate += r.rate;
                        streams += n;
                    }
                }
            }
        }
        self.fleet_stream_rate =
            (streams >= 1.0 && counted_rate > 0.0).then(|| counted_rate / streams);
        let zone_utilization: HashMap<String, f64> = zone_sums
            .into_iter()
            .filter(|(_, (_, c))| *c > 0.0)
            .map(|(z, (l, c))| (z.to_owned(), l / c))
            .collect();
        for e in &mut self.endpoints {
            let report = fresh(e);
            e.reported = report.is_some();
            match self.fleet {
                Some(summary) => {
                    let zu = zone_utilization.get(&e.zone).copied();
                    let (load, base) = summary.estimate(e.weight, report.as_ref(), zu);
                    if report.is_none() {
                        // A silent pod's assumed load includes what this Envoy has there now.
                        e.own_at_report = e.own_load();
                    }
                    e.fleet_load = Some(load);
                    e.base_capacity = base;
                }
                None => {
                    e.fleet_load = None;
                    e.base_capacity = e.weight;
                }
            }
        }
        for z in &mut self.zones {
            z.healthy.clear();
            z.load = 0.0;
            z.capacity = 0.0;
            z.growth = 0.0;
        }
        let horizon = unseen_horizon(cfg);
        self.refreshed_at = now;
        for (i, e) in self.endpoints.iter_mut().enumerate() {
            e.refresh_capacity(cfg, now);
            if !e.eligible() {
                continue;
            }
            let zi = match self.zones.iter().position(|z| z.name == e.zone) {
                Some(zi) => zi,
                None => {
                    self.zones.push(Zone {
                        name: e.zone.clone(),
                        ..Zone::default()
                    });
                    self.zones.len() - 1
                }
            };
            if let Some(z) = self.zones.get_mut(zi) {
                z.healthy.push(i);
                z.load += e.load() + e.unseen(now, horizon);
                z.capacity += e.capacity;
                if e.report.is_some_and(|r| now.saturating_sub(r.at) < horizon) {
                    z.growth += e.others_growth;
                }
            }
        }
        self.zones.retain(|z| !z.healthy.is_empty());
    }

    /// Add `delta` to endpoint `i`'s local pending load (and to its zone's sum).
    pub fn add_pending(&mut self, i: usize, delta: f64) {
        let Some(e) = self.endpoints.get_mut(i) else {
            return;
        };
        e.local_pending = (e.local_pending + delta).max(0.0);
        self.add_zone_load(i, delta);
    }

    /// Add `delta` to endpoint `i`'s guessed load of the other workers (and to its zone's sum).
    pub fn add_peer_guess(&mut self, i: usize, delta: f64) {
        let Some(e) = self.endpoints.get_mut(i) else {
            return;
        };
        e.peer_guess += delta;
        self.add_zone_load(i, delta);
    }

    /// Share of this VM's own load estimate on the cluster that is known (measured, or a
    /// remembered rate) rather than the prior of a stream of unknown rate; 0 with no load.
    pub fn known_share(&self) -> f64 {
        if self.own_load > 0.0 {
            (1.0 - self.own_unknown / self.own_load).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// Remove a stream's contribution from endpoint `i`.
    pub fn remove_stream_load(&mut self, i: usize, k: Counted) {
        let Some(e) = self.endpoints.get_mut(i) else {
            return;
        };
        e.local_rate = (e.local_rate - k.rate).max(0.0);
        e.local_pending = (e.local_pending - k.pending).max(0.0);
        e.young -= k.young; // exact inverse: read clamped (Router::apply_reports)
        e.local_active = e.local_active.saturating_sub(1);
        self.add_zone_load(i, -(k.rate + k.pending));
    }

    /// A stream planned to move leaves (`aside`) or rejoins endpoint `i`'s load: it ends at its
    /// next request message, so placements and plans count it as gone. It stays among the
    /// endpoint's active streams until it ends.
    pub fn set_aside(&mut self, i: usize, k: Counted, aside: bool) {
        let Some(e) = self.endpoints.get_mut(i) else {
            return;
        };
        let sign = if aside { -1.0 } else { 1.0 };
        e.local_rate = (e.local_rate + sign * k.rate).max(0.0);
        e.local_pending = (e.local_pending + sign * k.pending).max(0.0);
        e.young += sign * k.young;
        e.aside = (e.aside - sign * (k.rate + k.pending)).max(0.0);
        self.add_zone_load(i, sign * (k.rate + k.pending));
    }

    /// A stream of `load` on endpoint `i` ended (`was_aside`: its load was set aside already).
    pub fn note_ended(&mut self, i: usize, load: f64, was_aside: bool) {
        if let Some(e) = self.endpoints.get_mut(i) {
            if was_aside {
                e.aside = (e.aside - load).max(0.0);
            }
            e.ended[0] += load;
        }
    }

    /// Add a stream's contribution to endpoint `i`.
    pub fn add_stream_load(&mut self, i: usize, k: Counted) {
        let Some(e) = self.endpoints.get_mut(i) else {
            return;
        };
        e.local_rate += k.rate;
        e.local_pending += k.pending;
        e.young += k.young;
        e.local_active += 1;
        self.add_zone_load(i, k.rate + k.pending);
    }

    fn add_zone_load(&mut self, i: usize, delta: f64) {
        let Some(e) = self.endpoints.get(i) else {
            return;
        };
        if !e.eligible() {
            return;
        }
        if let Some(z) = self.zones.iter_mut().find(|z| z.name == e.zone) {
            z.load = (z.load + delta).max(0.0);
        }
    }

    /// Record a failure against endpoint `i` and lower its capacity at once.
    pub fn penalize(&mut self, cfg: &Config, now: Nanos, i: usize) {
        let Some(e) = self.endpoints.get_mut(i) else {
            return;
        };
        let before = e.capacity;
        e.penalty
            .add(now, 1.0, cfg.penalty.half_life_ms as f64 / 1000.0);
        e.refresh_capacity(cfg, now);
        let delta = e.capacity - before;
        if e.eligible() {
            let zone = e.zone.clone();
            if let Some(z) = self.zones.iter_mut().find(|z| z.name == zone) {
                z.capacity = (z.capacity + delta).max(0.0);
            }
        }
    }

    /// Σ load and Σ capacity over healthy endpoints.
    pub fn totals(&self) -> (f64, f64) {
        self.zones
            .iter()
            .fold((0.0, 0.0), |(l, c), z| (l + z.load, c + z.capacity))
    }

    pub fn has_eligible(&self) -> bool {
        !self.zones.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DiscoveredEndpoint;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const S: Nanos = 1_000_000_000;

    pub(crate) fn snap(name: &str, eps: &[(&str, &str, bool, u32)]) -> ClusterSnapshot {
        ClusterSnapshot {
            name: name.into(),
            endpoints: eps
                .iter()
                .map(|(a, z, h, w)| DiscoveredEndpoint {
                    address: (*a).into(),
                    zone: (*z).into(),
                    healthy: *h,
                    weight: *w,
                })
                .collect(),
        }
    }

    #[test]
    fn snapshot_replaces_table_and_keeps_known_state() {
        let cfg = Config::default();
        let mut c = Cluster::new("pods");
        let remap = c.apply_snapshot(
            &cfg,
            S,
            &snap(
                "pods",
                &[("10.0.0.1:80", "a", true, 1), ("10.0.0.2:80", "b", true, 2)],
            ),
        );
        assert!(remap.is_empty());
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.endpoint(0).unwrap().first_seen, None); // first snapshot: not new
        c.add_stream_load(
            1,
            Counted {
                rate: 5.0,
                pending: 1.0,
                young: 0.0,
            },
        );
        let remap = c.apply_snapshot(
            &cfg,
            10 * S,
            &snap(
                "pods",
                &[
                    ("10.0.0.3:80", "a", true, 1),
                    ("10.0.0.2:80", "b", false, 2),
                ],
            ),
        );
        assert_eq!(remap, vec![None, Some(1)]);
        let kept = c.endpoint(1).unwrap();
        assert_eq!(kept.address, "10.0.0.2:80");
        assert_eq!(kept.local_rate, 5.0);
        assert!(!kept.healthy);
        assert_eq!(c.endpoint(0).unwrap().first_seen, Some(10 * S)); // new after the first
        assert_eq!(c.zones.len(), 1); // b has no healthy endpoint left
        assert_eq!(c.zones[0].name, "a");
    }

    #[test]
    fn zone_aggregates_follow_incremental_updates() {
        let cfg = Config::default();
        let mut c = Cluster::new("pods");
        c.apply_snapshot(
            &cfg,
            0,
            &snap(
                "pods",
                &[
                    ("1.1.1.1:1", "a", true, 1),
                    ("1.1.1.2:1", "a", true, 3),
                    ("1.1.1.3:1", "b", true, 1),
                ],
            ),
        );
        assert_eq!(c.totals(), (0.0, 5.0));
        c.add_pending(0, 2.0);
        let k = |rate, pending| Counted {
            rate,
            pending,
            young: 0.0,
        };
        c.add_stream_load(2, k(4.0, 0.5));
        c.remove_stream_load(2, k(1.0, 0.5));
        let a = c.zones.iter().find(|z| z.name == "a").unwrap();
        assert_eq!((a.load, a.capacity, a.healthy.len()), (2.0, 4.0, 2));
        assert_eq!(c.totals().0, 5.0);
        let fresh = {
            let mut d = c.clone();
            d.refresh(&cfg, 0);
            d.totals()
        };
        assert_eq!(fresh, c.totals());
        c.penalize(&cfg, 0, 1);
        assert!((c.endpoint(1).unwrap().capacity - 1.5).abs() < 1e-12);
        assert!((c.totals().1 - 3.5).abs() < 1e-12);
    }

    #[test]
    fn passive_observation_learns_zone_but_never_makes_an_endpoint_nameable() {
        let cfg = Config::default();
        let mut c = Cluster::new("pods");
        let i = c.observe_upstream(S, "10.0.0.9:80", || "c".to_string());
        assert_eq!(c.endpoint(i).unwrap().zone, "c");
        assert!(!c.endpoint(i).unwrap().eligible());
        assert_eq!(c.observe_upstream(S, "10.0.0.9:80", || "x".to_string()), i);
        c.apply_snapshot(&cfg, 2 * S, &snap("pods", &[("10.0.0.9:80", "", true, 1)]));
        let e = c.endpoint(0).unwrap();
        assert!(e.eligible());
        assert_eq!(e.zone, "c"); // discovery without locality keeps the passive zone
        assert_eq!(e.first_seen, None);
    }
}
