//! Rebalancing: move established streams off hot endpoints.
//!
//! With `m = ΣL / ΣC` the cluster's mean load per unit capacity, τ = `tolerance` and
//! η = `hysteresis`:
//!
//! - endpoint j is **hot** while `L_j > (1 + τ) · m · C_j`;
//! - its **excess** is `L_j − (1 + τ − η) · m · C_j` — moves bring it below the hot line by a
//!   margin, so it does not flip back at the next tick;
//! - this proxy worker sheds its share of the excess (its own load on j over `L_j`, since the
//!   other workers shed theirs), choosing streams at least `min_age` old, largest estimate that
//!   still fits the remaining excess first (fewest moves for the most excess); when no stream
//!   fits its share `e` of the excess, it moves its smallest (`q`) with probability
//!   `max(s, e / q)` (`s`: the proxy's share of `L_j`, all its workers), drawn once per settle
//!   window, so that the proxies on j together shed about the excess, or one stream when the
//!   excess is less than one — not one stream each per tick;
//! - with the fleet view, an endpoint it shed waits two probe intervals before being shed
//!   again: until then its reports do not show the moves (this proxy's or the others'), and
//!   shedding on them would shed too much;
//! - a stream is moved only if some other endpoint k can take it and stay at or below
//!   `(1 + τ − η) · m · C_k`, or at least end `η · m` below the source's current level (per
//!   unit capacity) — each move then lowers the pair's maximum by a margin, so moves cannot
//!   cycle; moves already planned are counted;
//! - within the churn budget of the whole proxy ([`Budget`]): per tick, per minute and a share
//!   of streams per minute. Only an endpoint **far over**, `L_j ≥ (1 + 2τ) · m · C_j` (a pod
//!   that slowed down, a zone that failed), may spend the whole minute's budget; moves off
//!   endpoints less far over spend at most half of it ([`Allowance`]), so that chasing the
//!   small imbalances of churn never leaves a proxy without moves when a pod degrades. Zone
//!   moves (below) are planned first in each round and may spend it all (they end once the
//!   spilled streams are home), but only the half while some endpoint is far over: among
//!   many pods some skew always remains, and moves after it would never bring streams home.
//!
//! **Spilled streams come home** (`return_spilled`):
//! with θ = `zone.spill_threshold`, the local zone's room is
//! `R = (1 + θ − η) · m · C_local − L_local − P` (P: this proxy's planned moves not ended yet
//! that left other zones), of which this proxy takes its share
//! `s = O / (L_local + O_remote)` (O: its own load on the cluster, O_remote: on other zones; with
//! one proxy in the zone s ≈ 1, with k alike proxies ≈ 1/k, so they do not all fill the same
//! room). Its streams on other zones' endpoints are chosen, largest that fits `s·R` first. The
//! reconnecting client is placed by the zone rule, which keeps it local: the zone stays η·m
//! per unit capacity below the spill line, so nothing spills back.
//!
//! **Spill spreads evenly** (same switch, same rounds): a proxy's stream on another zone z
//! moves when a third zone y can take it and stay at most at the mean m (the line up to which
//! placement spills into a zone: its tolerance stays for its own clients) and a hysteresis
//! margin (η·m) below z's level; the proxy moves its share (its load on z over `L_z`) of what
//! evens the two, `x = (L_z·C_y − L_y·C_z) / (C_y + C_z)`. The zone rule re-places each by
//! headroom. Each move lowers the pair's maximum by a margin, so moves cannot cycle, and the
//! spill of a full zone ends where the other zones' own demand leaves room, so their streams can
//! come home.
//!
//! A moved stream is ended by the filter at a request message boundary; its client reconnects
//! and the new stream is placed with its remembered rate. A planned move that is not carried
//! out within [`move_deadline`] (the stream sent nothing at a boundary, or its response started
//! without `allow_reset`) is dropped, and its stream counts on its endpoint again.

use super::config::RebalanceConfig;
use super::endpoints::Cluster;
use super::streams::StreamTable;
use super::ClusterIdx;
use super::Nanos;

const MINUTE: Nanos = 60_000_000_000;

/// How long a planned move may wait for its stream's next request message boundary:
/// `max(3 ticks, 5 s)`.
pub fn move_deadline(tick: Nanos) -> Nanos {
    tick.saturating_mul(3).max(5_000_000_000)
}

/// Why a stream moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveWhy {
    /// Its endpoint is hot.
    Hot,
    /// It was placed in another zone, and the local zone has room for it now.
    Home,
    /// It was placed in another zone, and a third zone has more room.
    Spread,
    /// Its endpoint is the coolest, and a stream off a hot endpoint fits nowhere else: it makes
    /// room for that stream.
    Room,
}

impl MoveWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveWhy::Hot => "hot",
            MoveWhy::Home => "home",
            MoveWhy::Spread => "spread",
            MoveWhy::Room => "room",
        }
    }
}

/// One planned move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Move {
    pub stream: u64,
    pub cluster: ClusterIdx,
    pub from: usize,
    pub to_room_on: usize,
    pub rate: f64,
    pub why: MoveWhy,
}

/// What one planning round did, for stats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub moves: Vec<Move>,
    /// Per cluster (index): moves wanted but not made because the budget was spent.
    pub skipped_budget: Vec<u64>,
    /// Per cluster: moves wanted that found no endpoint with room.
    pub skipped_no_room: Vec<u64>,
    /// Per cluster: Σ excess above the hot line over Σ load, before and after the planned moves.
    pub excess_before: Vec<f64>,
    pub excess_after: Vec<f64>,
}

/// The per-cluster slot `ci` of one of [`Plan`]'s vectors (grown with zeros as needed: zone
/// moves and moves off hot endpoints count into the same cluster's slot, whichever runs first).
fn slot<T: Default + Clone>(v: &mut Vec<T>, ci: ClusterIdx) -> Option<&mut T> {
    if v.len() <= ci.0 {
        v.resize(ci.0 + 1, T::default());
    }
    v.get_mut(ci.0)
}

impl Plan {
    /// Every per-cluster figure of cluster `ci` present (0 until counted), so that a cluster
    /// with nothing to plan still reports its zeros.
    fn open(&mut self, ci: ClusterIdx) {
        slot(&mut self.skipped_budget, ci);
        slot(&mut self.skipped_no_room, ci);
        slot(&mut self.excess_before, ci);
        slot(&mut self.excess_after, ci);
    }
}

/// Moves a proxy may still plan now: `all` off endpoints far over the mean (at least 2τ) and
/// zone moves, `mild` (never more than `all`) off endpoints less far over. Each move planned
/// spends from both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub all: usize,
    pub mild: usize,
}

impl From<usize> for Allowance {
    /// The same allowance for every move.
    fn from(n: usize) -> Self {
        Allowance { all: n, mild: n }
    }
}

impl Allowance {
    /// Spend `n` moves if allowed (`far_over`: off an endpoint far over the mean).
    fn spend(&mut self, n: usize, far_over: bool) -> bool {
        let left = if far_over {
            self.all
        } else {
            self.mild.min(self.all)
        };
        if left < n {
            return false;
        }
        self.all = self.all.saturating_sub(n);
        self.mild = self.mild.saturating_sub(n).min(self.all);
        true
    }
}

/// The churn budget of one proxy: the times of its recent moves, shared by all its workers
/// (the filter keeps it in Envoy shared data and updates it with compare-and-swap, so the
/// limits hold whatever the worker count).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Budget {
    /// (time, moves) per claim, oldest first, at most a minute old.
    claims: Vec<(Nanos, u32)>,
}

const BUDGET_VERSION: u8 = 1;
const CLAIM: usize = 12;

impl Budget {
    /// Moves still allowed at `now`: at most `max_moves_per_tick` in any window of `tick`,
    /// and per minute `max_moves_per_minute` and `⌈max_share_per_minute × streams⌉` (`streams`:
    /// the proxy's open streams), of which moves that are not off an endpoint far over the
    /// mean may take half (rounded up).
    pub fn allowance(
        &self,
        cfg: &RebalanceConfig,
        now: Nanos,
        tick: Nanos,
        streams: usize,
    ) -> Allowance {
        let within = |window: Nanos| -> usize {
            self.claims
                .iter()
                .filter(|(t, _)| now.saturating_sub(*t) < window)
                .map(|&(_, n)| n as usize)
                .sum()
        };
        let per_tick = (cfg.max_moves_per_tick as usize).saturating_sub(within(tick));
        let minute = within(MINUTE);
        let by_share = (cfg.max_share_per_minute * streams as f64).ceil() as usize;
        let per_minute = (cfg.max_moves_per_minute as usize).min(by_share);
        let all = per_tick.min(per_minute.saturating_sub(minute));
        let mild = all.min(per_minute.div_ceil(2).saturating_sub(minute));
        Allowance { all, mild }
    }

    /// Record `moves` made at `now` and forget claims older than a minute.
    pub fn spend(&mut self, now: Nanos, moves: usize) {
        self.claims.retain(|(t, _)| now.saturating_sub(*t) < MINUTE);
        if moves > 0 {
            self.claims
                .push((now, u32::try_from(moves).unwrap_or(u32::MAX)));
        }
    }

    pub fn moves_last_minute(&self, now: Nanos) -> usize {
        self.claims
            .iter()
            .filter(|(t, _)| now.saturating_sub(*t) < MINUTE)
            .map(|&(_, n)| n as usize)
            .sum()
    }

    /// `version (1) | (time u64 LE, moves u32 LE)*`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.claims.len() * CLAIM);
        out.push(BUDGET_VERSION);
        for (t, n) in &self.claims {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }

    /// Decodes what [`Budget::encode`] wrote; anything else decodes as far as it is whole (an
    /// unknown version as empty).
    pub fn decode(bytes: &[u8]) -> Budget {
        let claims = match bytes.split_first() {
            Some((&BUDGET_VERSION, rest)) => rest
                .chunks_exact(CLAIM)
                .filter_map(|c| {
                    let t = u64::from_le_bytes(c.get(0..8)?.try_into().ok()?);
                    let n = u32::from_le_bytes(c.get(8..12)?.try_into().ok()?);
                    Some((t, n))
                })
                .collect(),
            _ => Vec::new(),
        };
        Budget { claims }
    }
}

/// Load per unit capacity at and above which an endpoint is **far over** the mean `m`:
/// `(1 + 2τ) · m`.
fn far_over_line(cfg: &RebalanceConfig, mean: f64) -> f64 {
    (1.0 + 2.0 * cfg.tolerance) * mean
}

/// Σ max(0, L_j − line · C_j) / ΣL over the loads given.
fn excess_share(loads: &[f64], caps: &[f64], line: f64) -> f64 {
    let total: f64 = loads.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let over: f64 = loads
        .iter()
        .zip(caps)
        .map(|(l, c)| (l - line * c).max(0.0))
        .sum();
    over / total
}

/// How a VM paces its moves against the other workers and proxies it cannot see.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// A reported endpoint shed less than `settle` ago is left alone: its reports lag the moves
    /// (the other proxies' moves too), and shedding again on them would shed too much. Also the
    /// window of one draw (below).
    pub settle: Nanos,
    /// This VM's salt for the draw, once per settle window, of whether to move its smallest
    /// stream off a hot endpoint when none fits its share of the excess (see the module doc).
    pub salt: u64,
}

/// Plan moves for one cluster. `allowance` is spent for each move planned.
#[allow(clippy::too_many_arguments)]
pub fn plan_cluster(
    cfg: &RebalanceConfig,
    pace: Pace,
    ci: ClusterIdx,
    cluster: &Cluster,
    streams: &StreamTable,
    now: Nanos,
    allowance: &mut Allowance,
    plan: &mut Plan,
) {
    let eligible: Vec<usize> = cluster
        .zones
        .iter()
        .flat_map(|z| z.healthy.iter().copied())
        .collect();
    let mut loads: Vec<f64> = eligible
        .iter()
        .map(|&j| cluster.endpoint(j).map_or(0.0, |e| e.load()))
        .collect();
    let caps: Vec<f64> = eligible
        .iter()
        .map(|&j| cluster.endpoint(j).map_or(0.0, |e| e.capacity))
        .collect();
    // Moves already in the plan (zone moves, planned first) have left their endpoints; the
    // excess before counts them as not yet planned.
    let unplanned = loads.clone();
    let planned: Vec<u64> = (plan.moves.iter())
        .filter(|m| m.cluster == ci)
        .map(|m| {
            for (j, delta) in [(m.from, -m.rate), (m.to_room_on, m.rate)] {
                if let Some(l) =
                    (eligible.iter().position(|&e| e == j)).and_then(|k| loads.get_mut(k))
                {
                    *l = (*l + delta).max(0.0);
                }
            }
            m.stream
        })
        .collect();
    let (total_load, total_cap) = (loads.iter().sum::<f64>(), caps.iter().sum::<f64>());
    plan.open(ci);
    if eligible.len() < 2 || total_load <= 0.0 || total_cap <= 0.0 {
        return;
    }
    let mean = total_load / total_cap;
    let hot = (1.0 + cfg.tolerance) * mean;
    let far_over = far_over_line(cfg, mean);
    let target = (1.0 + cfg.tolerance - cfg.hysteresis) * mean;
    if let Some(x) = slot(&mut plan.excess_before, ci) {
        *x = excess_share(&unplanned, &caps, hot);
    }
    let mut order: Vec<usize> = (0..eligible.len()).collect();
    order.sort_by(|&a, &b| {
        let over = |k: usize| {
            loads.get(k).copied().unwrap_or(0.0) - hot * caps.get(k).copied().unwrap_or(0.0)
        };
        over(b).total_cmp(&over(a))
    });
    let min_age = cfg.min_age_ms.saturating_mul(1_000_000);
    let room = Room {
        ci,
        planned: &planned,
        eligible: &eligible,
        caps: &caps,
        streams,
        now,
        min_age,
    };
    for k in order {
        let (Some(&j), Some(&load), Some(&cap)) = (eligible.get(k), loads.get(k), caps.get(k))
        else {
            continue;
        };
        if load <= hot * cap {
            break; // sorted by excess: the rest are not hot either
        }
        let Some(ep) = cluster.endpoint(j) else {
            continue;
        };
        if ep.reported
            && ep
                .shed_at
                .is_some_and(|t| now.saturating_sub(t) < pace.settle)
        {
            continue;
        }
        let share = ((ep.local_rate + ep.local_pending) / load).min(1.0);
        let my_excess = (load - target * cap) * share;
        let on_j = |s: &crate::streams::Stream| s.cluster == ci && s.endpoint == Some(j);
        let mut movable = streams.movable(on_j, now, min_age);
        movable.retain(|(id, _)| !planned.contains(id));
        let mut candidates = crate::streams::fitting(&movable, my_excess, usize::MAX);
        let smallest = movable.iter().rev().find(|(_, est)| *est > 0.0);
        if let (true, Some(&(id, rate))) = (candidates.is_empty() && my_excess > 0.0, smallest) {
            // None fits this VM's share: its smallest still sheds the excess. Every proxy on j
            // faces the same choice: each moves it with probability max(the proxy's share of
            // L_j, this VM's excess / the stream), drawn once per window, so that together they
            // shed about the excess, or one stream when the excess is less than one. (The
            // workers of one proxy see each other's moves a tick later: they need no draw.)
            let window = now.checked_div(pace.settle).unwrap_or(now);
            let p = (ep.own_load() / load).max(my_excess / rate);
            if coin(window ^ (j as u64).rotate_left(48), pace.salt, p) {
                candidates.push((id, rate));
            }
        }
        for (id, rate) in candidates {
            // Where the stream may go: under the target, or at least a hysteresis margin below
            // where the source is now (the maximum then drops by that margin each move, so moves
            // cannot cycle).
            let source_level = loads.get(k).copied().unwrap_or(0.0) / cap;
            let bound = target.max(source_level - cfg.hysteresis * mean);
            let steps = match coolest_fit(&loads, &caps, rate, bound, k) {
                Some(d) => vec![(id, rate, k, d, MoveWhy::Hot)],
                None => {
                    let Some(steps) = room.make_room(&loads, (id, rate, k), bound) else {
                        if let Some(n) = slot(&mut plan.skipped_no_room, ci) {
                            *n += 1;
                        }
                        continue;
                    };
                    steps
                }
            };
            if !allowance.spend(steps.len(), load >= far_over * cap) {
                if let Some(n) = slot(&mut plan.skipped_budget, ci) {
                    *n += 1;
                }
                continue;
            }
            for (stream, rate, from, to, why) in steps {
                if let Some(src) = loads.get_mut(from) {
                    *src -= rate;
                }
                if let Some(dst) = loads.get_mut(to) {
                    *dst += rate;
                }
                plan.moves.push(Move {
                    stream,
                    cluster: ci,
                    from: eligible.get(from).copied().unwrap_or(j),
                    to_room_on: eligible.get(to).copied().unwrap_or(j),
                    rate,
                    why,
                });
            }
        }
    }
    if let Some(x) = slot(&mut plan.excess_after, ci) {
        *x = excess_share(&loads, &caps, hot);
    }
}

/// A draw that comes true with probability `p`, fixed by (what, salt).
fn coin(what: u64, salt: u64, p: f64) -> bool {
    p >= 1.0 || crate::rng::unit(crate::rng::splitmix64(what ^ salt.rotate_left(32))) < p
}

/// Of the endpoints other than `except` (indices into `loads`), the one with the lowest level
/// after taking `rate`, if that level is at most `bound`.
fn coolest_fit(loads: &[f64], caps: &[f64], rate: f64, bound: f64, except: usize) -> Option<usize> {
    (0..loads.len())
        .filter(|&d| d != except)
        .filter_map(|d| {
            let (l, c) = (loads.get(d)?, caps.get(d)?);
            let after = (l + rate) / c;
            (*c > 0.0 && after <= bound).then_some((d, after))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(d, _)| d)
}

/// One planned step of a chain: (stream, rate, from, to, why), endpoints as indices into the
/// planner's `eligible`.
type Step = (u64, f64, usize, usize, MoveWhy);

/// What [`Room::make_room`] reads.
struct Room<'a> {
    ci: ClusterIdx,
    /// Streams already in the plan.
    planned: &'a [u64],
    eligible: &'a [usize],
    caps: &'a [f64],
    streams: &'a StreamTable,
    now: Nanos,
    min_age: Nanos,
}

/// How many of the coolest endpoints a blocked stream tries to make room on.
const ROOM_TRIES: usize = 3;

impl Room<'_> {
    /// A stream `(id, rate, from)` off a hot endpoint fits nowhere (every endpoint would end
    /// above `bound`): when the pods are near even, one big stream too many sits on the hot one
    /// and no single move lowers the maximum. Free room for it on one of the coolest endpoints
    /// d: move d's smaller streams (this proxy's, at least `min_age` old) to endpoints where
    /// they stay at most at `bound` (the hot source, once the stream left, may take them: a
    /// swap), until d with the stream is at most at `bound`. Every endpoint touched ends at or
    /// below `bound`, below the source's level, so chains cannot cycle either. Returns the
    /// steps, the blocked stream first, or `None`.
    fn make_room(
        &self,
        loads: &[f64],
        blocked: (u64, f64, usize),
        bound: f64,
    ) -> Option<Vec<Step>> {
        let (id, rate, from) = blocked;
        let level = |d: usize| {
            let c = self.caps.get(d).copied().unwrap_or(0.0);
            if c > 0.0 {
                loads.get(d).copied().unwrap_or(0.0) / c
            } else {
                f64::INFINITY
            }
        };
        let mut cool: Vec<usize> = (0..loads.len()).filter(|&d| d != from).collect();
        cool.sort_by(|&a, &b| level(a).total_cmp(&level(b)));
        cool.into_iter().take(ROOM_TRIES).find_map(|d| {
            let j = *self.eligible.get(d)?;
            let cd = *self.caps.get(d)?;
            let mut l = loads.to_vec();
            *l.get_mut(from)? -= rate;
            *l.get_mut(d)? += rate;
            let mut need = l.get(d)? - bound * cd;
            let mut on_d = self.streams.movable(
                |s| s.cluster == self.ci && s.endpoint == Some(j),
                self.now,
                self.min_age,
            );
            on_d.retain(|&(sid, est)| est > 0.0 && est < rate && !self.planned.contains(&sid));
            let mut steps = vec![(id, rate, from, d, MoveWhy::Hot)];
            while need > 0.0 {
                let fits = |est: f64, l: &[f64]| coolest_fit(l, self.caps, est, bound, d);
                // The smallest stream that covers what is left, else the largest that does not.
                let pick = (on_d.iter().rev())
                    .position(|&(_, est)| est >= need && fits(est, &l).is_some())
                    .map(|p| on_d.len() - 1 - p)
                    .or_else(|| on_d.iter().position(|&(_, est)| fits(est, &l).is_some()))?;
                let (sid, est) = on_d.remove(pick);
                let t = fits(est, &l)?;
                *l.get_mut(d)? -= est;
                *l.get_mut(t)? += est;
                need -= est;
                steps.push((sid, est, d, t, MoveWhy::Room));
            }
            Some(steps)
        })
    }
}

/// Plan moves of this proxy's streams on other zones of one cluster (module doc: "Spilled
/// streams come home", "Spill goes where there is room"). `allowance` is spent for each
/// move.
#[allow(clippy::too_many_arguments)]
pub fn plan_zones(
    cfg: &RebalanceConfig,
    spill_threshold: f64,
    ci: ClusterIdx,
    cluster: &Cluster,
    local_zone: &str,
    streams: &StreamTable,
    now: Nanos,
    allowance: &mut Allowance,
    plan: &mut Plan,
) {
    let zones = &cluster.zones;
    let Some(li) = zones.iter().position(|z| z.name == local_zone) else {
        return;
    };
    let (total_load, total_cap) = zones
        .iter()
        .fold((0.0, 0.0), |(l, c), z| (l + z.load, c + z.capacity));
    if zones.len() < 2 || local_zone.is_empty() || total_load <= 0.0 || total_cap <= 0.0 {
        return;
    }
    let zone_of = |j: usize| {
        let e = cluster.endpoint(j).filter(|e| e.eligible())?;
        zones.iter().position(|z| z.name == e.zone)
    };
    let remote_zone = |s: &crate::streams::Stream| {
        (s.cluster == ci)
            .then_some(s.endpoint)
            .flatten()
            .and_then(zone_of)
            .filter(|&z| z != li)
    };
    let mut loads: Vec<f64> = zones.iter().map(|z| z.load).collect();
    let caps: Vec<f64> = zones.iter().map(|z| z.capacity).collect();
    // Planned moves not ended yet, off other zones (their load is set aside there already):
    // their clients come back here.
    for (_, s) in streams.iter().filter(|(_, s)| s.move_planned) {
        if remote_zone(s).is_some() {
            if let Some(l) = loads.get_mut(li) {
                *l += s.estimate();
            }
        }
    }
    // What this proxy has on each zone.
    let mut own = vec![0.0; zones.len()];
    for (j, e) in cluster.endpoints.iter().enumerate() {
        if let Some(o) = zone_of(j).and_then(|z| own.get_mut(z)) {
            *o += e.own_load();
        }
    }
    let mean = total_load / total_cap;
    let target = (1.0 + spill_threshold - cfg.hysteresis) * mean;
    // Zone moves end once the spilled streams are home: they may spend the whole budget, but
    // only half while an endpoint is far over (a pod that slowed keeps the reserved half).
    let far_over = far_over_line(cfg, mean);
    let far_over_somewhere = zones.iter().flat_map(|z| z.healthy.iter()).any(|&j| {
        (cluster.endpoint(j)).is_some_and(|e| e.capacity > 0.0 && e.load() >= far_over * e.capacity)
    });
    let room = |loads: &[f64], z: usize| {
        caps.get(z).copied().unwrap_or(0.0) * target - loads.get(z).copied().unwrap_or(0.0)
    };
    let min_age = cfg.min_age_ms.saturating_mul(1_000_000);
    // This proxy's movable streams on other zones, largest first: (id, rate, endpoint, zone).
    let mut candidates: Vec<(u64, f64, usize, usize)> = streams
        .movable(|s| remote_zone(s).is_some(), now, min_age)
        .into_iter()
        .filter_map(|(id, rate)| {
            let s = streams.get(id)?;
            Some((id, rate, s.endpoint?, remote_zone(s)?))
        })
        .collect();
    let mut push = |plan: &mut Plan, loads: &mut [f64], c: (u64, f64, usize, usize), to, why| {
        let (id, rate, from, z) = c;
        let Some(room_on) = least_loaded(cluster, zones.get(to)) else {
            return false;
        };
        if !allowance.spend(1, !far_over_somewhere) {
            if let Some(n) = slot(&mut plan.skipped_budget, ci) {
                *n += 1;
            }
            return false;
        }
        if let Some(l) = loads.get_mut(z) {
            *l -= rate;
        }
        if let Some(l) = loads.get_mut(to) {
            *l += rate;
        }
        plan.moves.push(Move {
            stream: id,
            cluster: ci,
            from,
            to_room_on: room_on,
            rate,
            why,
        });
        true
    };
    // Home: this proxy's share of the local zone's room.
    let own_total: f64 = own.iter().sum();
    let own_remote = own_total - own.get(li).copied().unwrap_or(0.0);
    let local_load = loads.get(li).copied().unwrap_or(0.0);
    if own_remote > 0.0 && room(&loads, li) > 0.0 {
        let share = (own_total / (local_load + own_remote)).clamp(0.0, 1.0);
        let sizes: Vec<(u64, f64)> = candidates.iter().map(|c| (c.0, c.1)).collect();
        let home = crate::streams::fitting(&sizes, share * room(&loads, li), usize::MAX);
        for (id, _) in home {
            let Some(k) = candidates.iter().position(|c| c.0 == id) else {
                continue;
            };
            let c = candidates.remove(k);
            if !push(plan, &mut loads, c, li, MoveWhy::Home) {
                candidates.insert(k, c);
            }
        }
    }
    // Spread: between two other zones z and y, this proxy's share of what evens their levels,
    // while y, after taking the stream, stays at most at the mean and a hysteresis margin below z.
    let level = |loads: &[f64], z: usize| {
        let c = caps.get(z).copied().unwrap_or(0.0);
        if c > 0.0 {
            loads.get(z).copied().unwrap_or(0.0) / c
        } else {
            f64::INFINITY
        }
    };
    let mut remote: Vec<usize> = (0..zones.len()).filter(|&z| z != li).collect();
    remote.sort_by(|&a, &b| level(&loads, b).total_cmp(&level(&loads, a)));
    for &z in &remote {
        let (l, o) = (
            loads.get(z).copied().unwrap_or(0.0),
            own.get(z).copied().unwrap_or(0.0),
        );
        if l <= 0.0 || o <= 0.0 {
            continue;
        }
        let on_z: Vec<(u64, f64, usize, usize)> =
            candidates.iter().copied().filter(|c| c.3 == z).collect();
        let fits = |y: usize, rate: f64, loads: &[f64]| {
            let cy = caps.get(y).copied().unwrap_or(0.0);
            let after = (loads.get(y).copied().unwrap_or(0.0) + rate) / cy;
            cy > 0.0 && after <= mean && after <= level(loads, z) - cfg.hysteresis * mean
        };
        let best = |rate: f64, loads: &[f64]| {
            (remote.iter().copied())
                .filter(|&y| y != z && fits(y, rate, loads))
                .min_by(|&a, &b| level(loads, a).total_cmp(&level(loads, b)))
        };
        // This proxy's share (its load on z over L_z) of what evens z and its best partner y:
        // (L_z − x)/C_z = (L_y + x)/C_y.
        let smallest = on_z.last().map_or(0.0, |c| c.1);
        let Some(y) = best(smallest, &loads) else {
            continue;
        };
        let (cz, cy) = (
            caps.get(z).copied().unwrap_or(0.0),
            caps.get(y).copied().unwrap_or(0.0),
        );
        let even = (l * cy - loads.get(y).copied().unwrap_or(0.0) * cz) / (cy + cz);
        let mut left = even * (o / l).min(1.0);
        let mut moved = false;
        for &c in &on_z {
            if c.1 > left {
                continue;
            }
            let Some(y) = best(c.1, &loads) else {
                continue;
            };
            if push(plan, &mut loads, c, y, MoveWhy::Spread) {
                left -= c.1;
                moved = true;
            }
        }
        // Nothing fits the share: the smallest stream still moves if the pair rule allows.
        if let (false, Some(&c)) = (moved, on_z.last()) {
            if let Some(y) = best(c.1, &loads) {
                push(plan, &mut loads, c, y, MoveWhy::Spread);
            }
        }
    }
}

/// The endpoint of `zone` with the least load per unit capacity.
fn least_loaded(cluster: &Cluster, zone: Option<&crate::endpoints::Zone>) -> Option<usize> {
    let level = |j: &usize| {
        cluster
            .endpoint(*j)
            .filter(|e| e.capacity > 0.0)
            .map_or(f64::INFINITY, |e| e.load() / e.capacity)
    };
    zone?
        .healthy
        .iter()
        .copied()
        .min_by(|a, b| level(a).total_cmp(&level(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RebalanceConfig};
    use crate::discovery::{ClusterSnapshot, DiscoveredEndpoint};
    use crate::streams::Stream;
    use crate::RouteIdx;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const S: Nanos = 1_000_000_000;

    fn setup(loads: &[&[f64]]) -> (Cluster, StreamTable) {
        let cfg = Config::default();
        let mut c = Cluster::new("pods");
        let snap = ClusterSnapshot {
            name: "pods".into(),
            endpoints: (0..loads.len())
                .map(|i| DiscoveredEndpoint {
                    address: format!("e{i}:1"),
                    zone: String::new(),
                    healthy: true,
                    weight: 1,
                })
                .collect(),
        };
        c.apply_snapshot(&cfg, 0, &snap);
        let mut t = StreamTable::default();
        let mut id = 0;
        for (j, rates) in loads.iter().enumerate() {
            for &r in *rates {
                let mut s = Stream::new(ClusterIdx(0), RouteIdx(0), Some(j), 0, r);
                s.pending = r;
                c.add_stream_load(j, s.counted());
                t.insert(id, s);
                id += 1;
            }
        }
        (c, t)
    }

    /// Endpoints `<zone>-<i>` with the given streams per endpoint, all placed by this proxy.
    fn setup_zoned(zones: &[(&str, &[&[f64]])]) -> (Cluster, StreamTable) {
        let cfg = Config::default();
        let mut c = Cluster::new("pods");
        let endpoints = zones
            .iter()
            .flat_map(|(z, eps)| (0..eps.len()).map(move |i| (z, i)))
            .map(|(z, i)| DiscoveredEndpoint {
                address: format!("{z}-{i}:1"),
                zone: z.to_string(),
                healthy: true,
                weight: 1,
            })
            .collect();
        let snap = ClusterSnapshot {
            name: "pods".into(),
            endpoints,
        };
        c.apply_snapshot(&cfg, 0, &snap);
        let mut t = StreamTable::default();
        let rates = zones.iter().flat_map(|(_, eps)| eps.iter());
        for (j, rates) in rates.enumerate() {
            for &r in *rates {
                let mut s = Stream::new(ClusterIdx(0), RouteIdx(0), Some(j), 0, r);
                s.pending = r;
                c.add_stream_load(j, s.counted());
                t.insert(t.len() as u64, s);
            }
        }
        (c, t)
    }

    fn plan_home_first(c: &Cluster, t: &StreamTable, now: Nanos) -> Vec<Move> {
        let (cfg, theta) = (
            RebalanceConfig::default(),
            Config::default().zone.spill_threshold,
        );
        let mut allowance = Allowance::from(10);
        let mut plan = Plan::default();
        plan_zones(
            &cfg,
            theta,
            ClusterIdx(0),
            c,
            "a",
            t,
            now,
            &mut allowance,
            &mut plan,
        );
        assert_eq!(allowance.all, 10 - plan.moves.len());
        plan.moves
    }

    /// [`plan_cluster`] on the cluster of index 0.
    fn plan_first(
        cfg: &RebalanceConfig,
        c: &Cluster,
        t: &StreamTable,
        now: Nanos,
        allowance: &mut Allowance,
        plan: &mut Plan,
    ) {
        plan_cluster(
            cfg,
            Pace::default(),
            ClusterIdx(0),
            c,
            t,
            now,
            allowance,
            plan,
        );
    }

    #[test]
    fn sheds_excess_with_few_moves_to_endpoints_with_room() {
        let cfg = RebalanceConfig::default();
        // mean 20: e0 at 40 is hot (line 22), target 21 → excess 19.
        let (c, t) = setup(&[
            &[20.0, 10.0, 6.0, 4.0],
            &[10.0, 10.0],
            &[5.0, 5.0],
            &[10.0, 0.5],
        ]);
        let mut allowance = Allowance::from(10);
        let mut plan = Plan::default();
        plan_first(&cfg, &c, &t, 100 * S, &mut allowance, &mut plan);
        let moved: Vec<f64> = plan.moves.iter().map(|m| m.rate).collect();
        assert_eq!(moved, vec![10.0, 6.0]); // 20 does not fit 19; 10 + 6 = 16 ≤ 19, 4 > 3 left
        assert!(plan.moves.iter().all(|m| m.from == 0 && m.to_room_on != 0));
        assert!(plan.excess_after[0] < plan.excess_before[0]);
        assert_eq!(allowance.all, 8);
    }

    /// Carry out a plan as reconnecting clients would: each moved stream lands where room
    /// was found for it.
    fn carry_out(c: &mut Cluster, t: &mut StreamTable, plan: &Plan) {
        for m in &plan.moves {
            if let Some(s) = t.get_mut(m.stream) {
                c.remove_stream_load(m.from, s.counted());
                c.add_stream_load(m.to_room_on, s.counted());
                s.endpoint = Some(m.to_room_on);
            }
        }
    }

    fn levels(c: &Cluster) -> Vec<f64> {
        c.endpoints.iter().map(|e| e.load()).collect()
    }

    #[test]
    fn a_big_stream_too_many_on_a_hot_endpoint_gets_room_made_for_it() {
        // Seen in a real Envoy (60 Zipf streams on 6 pods, mean 200): e0 holds 173 + 100 at
        // 1.36 × mean; the 100 fits on no pod (the coolest, at 176, would end at 1.38). No single
        // move lowers the maximum; freeing a small stream off the coolest one does.
        let cfg = RebalanceConfig {
            tolerance: 0.05,
            hysteresis: 0.02,
            ..RebalanceConfig::default()
        };
        let small = |total: f64| -> Vec<f64> {
            let mut v = vec![30.0, 25.0, 20.0, 15.0, 12.0, 9.0, 7.0];
            v.push(total - v.iter().sum::<f64>());
            v
        };
        let pods: Vec<Vec<f64>> = vec![
            vec![173.0, 100.0],
            small(182.0),
            small(180.0),
            small(188.0),
            small(176.0),
            small(201.0),
        ];
        let rows: Vec<&[f64]> = pods.iter().map(|p| p.as_slice()).collect();
        let (mut c, mut t) = setup(&rows);
        let mut first = Plan::default();
        plan_first(&cfg, &c, &t, 100 * S, &mut Allowance::from(2), &mut first);
        let why: Vec<(MoveWhy, f64, usize, usize)> = (first.moves.iter())
            .map(|m| (m.why, m.rate, m.from, m.to_room_on))
            .collect();
        // The 100 goes to the coolest pod (e4), whose 7 makes room by going to e0: a swap.
        assert_eq!(
            why,
            vec![(MoveWhy::Hot, 100.0, 0, 4), (MoveWhy::Room, 7.0, 4, 0)],
            "{first:?}"
        );
        assert_eq!(first.skipped_no_room, vec![0]);
        // Round after round (moves carried out, streams old enough again), the pods even out.
        let mut plan = first;
        for round in 0..20 {
            carry_out(&mut c, &mut t, &plan);
            plan = Plan::default();
            plan_first(
                &cfg,
                &c,
                &t,
                (101 + round) * 100 * S,
                &mut Allowance::from(2),
                &mut plan,
            );
            if plan.moves.is_empty() {
                break;
            }
        }
        let max = levels(&c).into_iter().fold(0.0, f64::max);
        assert!(plan.moves.is_empty(), "still moving: {plan:?}");
        assert!(max <= 1.05 * 200.0, "{:?}", levels(&c));
    }

    #[test]
    fn only_an_endpoint_far_over_the_mean_may_spend_the_reserved_half_of_the_budget() {
        let cfg = RebalanceConfig::default(); // τ = 0.1: hot above 1.1 × mean, far over 1.2 ×
        let no_mild = Allowance { all: 2, mild: 0 };
        // mean 20: e0 at 23 is hot (line 22) but not far over (24).
        let (c, t) = setup(&[&[10.0, 6.0, 4.0, 3.0], &[20.0], &[18.0], &[19.0]]);
        let (mut allowance, mut plan) = (no_mild, Plan::default());
        plan_first(&cfg, &c, &t, 100 * S, &mut allowance, &mut plan);
        assert!(plan.moves.is_empty(), "{plan:?}");
        assert_eq!(plan.skipped_budget[0], 1);
        // mean 20.1: e0 at 40 is far over (24.1).
        let (c, t) = setup(&[&[20.0, 10.0, 6.0, 4.0], &[10.0, 10.0], &[10.0], &[10.5]]);
        let (mut allowance, mut plan) = (no_mild, Plan::default());
        plan_first(&cfg, &c, &t, 100 * S, &mut allowance, &mut plan);
        assert_eq!(plan.moves.len(), 2);
        assert_eq!(allowance, Allowance { all: 0, mild: 0 });
    }

    #[test]
    fn balanced_clusters_and_young_streams_do_not_move() {
        let cfg = RebalanceConfig::default();
        let (c, t) = setup(&[&[10.0, 10.5], &[10.0, 10.0]]);
        let mut allowance = Allowance::from(10);
        let mut plan = Plan::default();
        plan_first(&cfg, &c, &t, 100 * S, &mut allowance, &mut plan);
        assert!(plan.moves.is_empty());
        let (c, t) = setup(&[&[20.0, 10.0, 6.0, 4.0], &[10.0]]);
        plan_first(&cfg, &c, &t, S, &mut allowance, &mut plan); // 1 s old
        assert!(plan.moves.is_empty());
    }

    #[test]
    fn budget_caps_moves_per_tick_minute_and_share() {
        let cfg = RebalanceConfig {
            max_moves_per_tick: 3,
            max_moves_per_minute: 5,
            max_share_per_minute: 0.5,
            ..RebalanceConfig::default()
        };
        let tick = S;
        let mut b = Budget::default();
        let all = |b: &Budget, now, streams| b.allowance(&cfg, now, tick, streams).all;
        assert_eq!(
            b.allowance(&cfg, 0, tick, 100),
            Allowance { all: 3, mild: 3 }
        );
        b.spend(0, 2);
        assert_eq!(all(&b, S / 2, 100), 1); // 2 of 3 spent in this tick window
        b.spend(S / 2, 1);
        assert_eq!(all(&b, S / 2, 100), 0);
        assert_eq!(all(&b, S, 100), 2); // the first claim left the window
                                        // 5 per minute, 3 spent: 2 left, none of them for moves off endpoints not far over
                                        // (they may take ⌈5 / 2⌉ = 3 a minute).
        assert_eq!(
            b.allowance(&cfg, 2 * S, tick, 100),
            Allowance { all: 2, mild: 0 }
        );
        assert_eq!(all(&b, 2 * S, 6), 0); // 50 % of 6 streams = 3 already moved
        assert_eq!(b.moves_last_minute(2 * S), 3);
        assert_eq!(all(&b, 61 * S, 100), 3); // the minute has passed
                                             // The record survives shared data; garbage and unknown versions decode as empty.
        assert_eq!(Budget::decode(&b.encode()), b);
        assert_eq!(Budget::decode(&[]), Budget::default());
        assert_eq!(Budget::decode(&[9, 1, 2, 3]), Budget::default());
        b.spend(61 * S, 0);
        assert_eq!(b.moves_last_minute(61 * S), 0);
        assert_eq!(b.encode(), vec![1]); // old claims are forgotten
        let (c, t) = setup(&[
            &[20.0, 10.0, 6.0, 4.0],
            &[10.0, 10.0],
            &[5.0, 5.0],
            &[10.0, 0.5],
        ]);
        let mut allowance = Allowance::from(1);
        let mut plan = Plan::default();
        plan_first(&cfg, &c, &t, 100 * S, &mut allowance, &mut plan);
        assert_eq!((plan.moves.len(), plan.skipped_budget[0]), (1, 1));
    }

    #[test]
    fn a_move_that_lowers_the_pairs_maximum_is_allowed_when_nobody_stays_under_target() {
        let cfg = RebalanceConfig::default();
        // mean 100; e0 at 140 holds 100 + 40; the others at 95, 90, 75: no pod can take the 40
        // and stay under 103, but e3 ends at 115, well below e0's 140.
        let (c, t) = setup(&[&[100.0, 40.0], &[95.0], &[90.0], &[75.0]]);
        let mut allowance = Allowance::from(10);
        let mut plan = Plan::default();
        plan_first(&cfg, &c, &t, 100 * S, &mut allowance, &mut plan);
        assert_eq!(plan.moves.len(), 1, "{plan:?}");
        assert_eq!((plan.moves[0].rate, plan.moves[0].to_room_on), (40.0, 3));
        assert!(plan.excess_after[0] < plan.excess_before[0]);
    }

    #[test]
    fn spilled_streams_come_home_when_the_local_zone_has_room() {
        // Mean 52/4 = 13 per pod; zone a's line with hysteresis: 1.05 · 13 · 2 = 27.3, load 20:
        // room 7.3. Of the streams on zone b (10, 8, 10, 4) only the 4 fits.
        let (c, t) = setup_zoned(&[
            ("a", &[&[10.0], &[10.0]]),
            ("b", &[&[10.0, 8.0], &[10.0, 4.0]]),
        ]);
        let moves = plan_home_first(&c, &t, 100 * S);
        assert_eq!(moves.len(), 1, "{moves:?}");
        let m = moves[0];
        assert_eq!((m.rate, m.why, m.from), (4.0, MoveWhy::Home, 3));
        assert!(c.endpoint(m.to_room_on).is_some_and(|e| e.zone == "a"));
        // Young streams stay; so does everything when the local zone is at its line.
        assert!(plan_home_first(&c, &t, S).is_empty());
        let (c, t) = setup_zoned(&[
            ("a", &[&[14.0], &[14.0]]),
            ("b", &[&[10.0, 8.0], &[10.0, 4.0]]),
        ]);
        assert!(plan_home_first(&c, &t, 100 * S).is_empty()); // line 1.05 · 15 · 2 = 31.5 < 28 + 4
    }

    #[test]
    fn zone_moves_keep_the_reserved_half_while_an_endpoint_is_far_over() {
        let plan_with = |c: &Cluster, t: &StreamTable, allowance: Allowance| {
            let (mut allowance, mut plan) = (allowance, Plan::default());
            let theta = Config::default().zone.spill_threshold;
            let cfg = RebalanceConfig::default();
            let a = "a";
            plan_zones(
                &cfg,
                theta,
                ClusterIdx(0),
                c,
                a,
                t,
                100 * S,
                &mut allowance,
                &mut plan,
            );
            plan.moves
                .iter()
                .map(|m| (m.rate, m.why))
                .collect::<Vec<_>>()
        };
        let reserved = Allowance { all: 1, mild: 0 };
        // Mean 19/4 = 4.75, far line 5.7: b's pods at 5.5 are only mildly over. Zone a's room
        // 1.05 · 4.75 · 2 − 8 = 1.98: a 1 comes home, from the whole budget.
        let b: &[&[f64]] = &[&[4.5, 1.0], &[4.5, 1.0]];
        let (c, t) = setup_zoned(&[("a", &[&[4.0], &[4.0]]), ("b", b)]);
        assert_eq!(plan_with(&c, &t, reserved), vec![(1.0, MoveWhy::Home)]);
        // Zone c's pod at 9 is far over the mean 5.6 (line 6.72): the reserved half is its.
        let (c, t) = setup_zoned(&[("a", &[&[4.0], &[4.0]]), ("b", b), ("c", &[&[9.0]])]);
        assert!(plan_with(&c, &t, reserved).is_empty());
        // The moves the budget stopped count on their cluster, though zone moves are planned
        // before that cluster's moves off hot endpoints (which used to open its count).
        let (mut allowance, mut plan) = (reserved, Plan::default());
        let cfg = RebalanceConfig::default();
        let theta = Config::default().zone.spill_threshold;
        let (ci, now) = (ClusterIdx(0), 100 * S);
        plan_zones(&cfg, theta, ci, &c, "a", &t, now, &mut allowance, &mut plan);
        assert!(plan.moves.is_empty());
        assert!(
            plan.skipped_budget.first().is_some_and(|&n| n > 0),
            "{plan:?}"
        );
        let moves = plan_with(&c, &t, Allowance::from(2));
        assert_eq!(moves, vec![(1.0, MoveWhy::Home), (1.0, MoveWhy::Home)]);
    }

    #[test]
    fn a_proxy_takes_only_its_share_of_the_room_and_counts_moves_under_way() {
        // Zone a: 3 pods at 10; zone b: 2 pods with 10 + 8 and 10 + 2.5. Mean 60.5/5 = 12.1,
        // line 1.05 · 12.1 · 3 = 38.1: room 8.1. All of it placed by this proxy: the 8 comes home.
        let b: &[&[f64]] = &[&[10.0, 8.0], &[10.0, 2.5]];
        let (c, t) = setup_zoned(&[("a", &[&[10.0], &[10.0], &[10.0]]), ("b", b)]);
        let rates = |m: Vec<Move>| m.iter().map(|m| m.rate).collect::<Vec<_>>();
        assert_eq!(rates(plan_home_first(&c, &t, 100 * S)), vec![8.0]);
        // The same loads, but a-2's 10 is another proxy's: this one's share is
        // 50.5 / (30 + 30.5) = 0.83 of the room, 6.8: only the 2.5 fits.
        let (mut c, t) = setup_zoned(&[("a", &[&[10.0], &[10.0], &[]]), ("b", b)]);
        if let Some(z) = c.zones.iter_mut().find(|z| z.name == "a") {
            z.load += 10.0;
        }
        assert_eq!(rates(plan_home_first(&c, &t, 100 * S)), vec![2.5]);
        let (mut c, mut t) = setup_zoned(&[
            ("a", &[&[10.0], &[10.0]]),
            ("b", &[&[10.0, 8.0], &[10.0, 4.0]]),
        ]);
        // The 4 is already on its way home (its load set aside, as the router does when it
        // commits a move): nothing else fits in what is left (3.3).
        for (_, s) in t.iter_mut().filter(|(_, s)| s.prior == 4.0) {
            s.move_planned = true;
            if let Some(j) = s.endpoint {
                c.set_aside(j, s.load(), true);
            }
        }
        assert!(plan_home_first(&c, &t, 100 * S).is_empty());
    }

    #[test]
    fn spill_moves_from_a_fuller_zone_to_one_with_more_room() {
        // Zone a (local) is full; this proxy's 10 + 4 sit on zone b, which other proxies fill to
        // 40; zone c holds 20 of theirs. Mean 100/6: spread fills a zone up to 33.3.
        let spread = |b_others: f64, c_others: f64| {
            let b: &[&[f64]] = &[&[10.0], &[4.0]];
            let (mut c, t) =
                setup_zoned(&[("a", &[&[20.0], &[20.0]]), ("b", b), ("c", &[&[], &[]])]);
            for (z, extra) in [("b", b_others), ("c", c_others)] {
                if let Some(z) = c.zones.iter_mut().find(|x| x.name == z) {
                    z.load += extra;
                }
            }
            let moves = plan_home_first(&c, &t, 100 * S);
            let zone_of = |j: usize| c.endpoint(j).map(|e| e.zone.clone()).unwrap_or_default();
            moves
                .iter()
                .map(|m| (m.rate, m.why, zone_of(m.to_room_on)))
                .collect::<Vec<_>>()
        };
        // Evening b and c takes 10; this proxy's share (14 of b's 40) is 3.5, which no stream
        // fits: the smallest still goes, as c stays below the mean and a margin below b.
        assert_eq!(
            spread(26.0, 20.0),
            vec![(4.0, MoveWhy::Spread, "c".to_string())]
        );
        // b and c level: nothing moves.
        assert!(spread(16.0, 30.0).is_empty());
        // c would take the 4 and stay under the target (mean 20.2, target 21.2, c after 20.5)
        // and a margin below b (22), but above the mean: c's room above it is for c's own
        // clients, as at placement. Nothing moves.
        assert!(spread(30.0, 37.0).is_empty());
    }

    #[test]
    fn a_proxy_whose_share_fits_no_stream_moves_one_by_a_draw_per_window() {
        let cfg = RebalanceConfig::default();
        // e0 reports 40, of which this proxy's two streams are 16 (share 0.4); mean 31, target
        // 32.55: excess 7.45, this proxy's share of it 2.98, less than a stream.
        let reported = |c: &mut Cluster, report: f64| {
            if let Some(e) = c.endpoint_mut(0) {
                e.fleet_load = Some(report);
                e.own_at_report = 16.0;
            }
        };
        // How often a round moves one, over 2,000 rounds half a second apart.
        let frequency = |c: &Cluster, t: &StreamTable| {
            let rounds = 2000;
            let moved: usize = (0..rounds)
                .map(|k| {
                    let (mut allowance, mut plan) = (Allowance::from(10), Plan::default());
                    let now = 100 * S + k * 500_000_000;
                    plan_first(&cfg, c, t, now, &mut allowance, &mut plan);
                    plan.moves.len()
                })
                .sum();
            moved as f64 / rounds as f64
        };
        let (mut c, t) = setup(&[&[8.0, 8.0], &[28.0], &[28.0], &[28.0]]);
        reported(&mut c, 40.0);
        let f = frequency(&c, &t);
        assert!((f - 0.4).abs() < 0.05, "{f}");
        // More excess: e0 reports 56 (this proxy's 16: share 0.29); mean 35, target 36.75:
        // excess 19.25, this proxy's part 5.5 of a stream of 8: probability 0.69.
        let (mut big, t_big) = setup(&[&[8.0, 8.0], &[28.0], &[28.0], &[28.0]]);
        reported(&mut big, 56.0);
        let f = frequency(&big, &t_big);
        assert!((f - 0.69).abs() < 0.05, "{f}");
        // One draw per settle window: the ticks of a window all decide alike, windows differ.
        let pace = Pace {
            settle: 2 * S,
            salt: 7,
        };
        let window = |w: u64| -> Vec<usize> {
            (0..4)
                .map(|k| {
                    let (mut allowance, mut plan) = (Allowance::from(10), Plan::default());
                    let now = w * 2 * S + k * 500_000_000;
                    plan_cluster(
                        &cfg,
                        pace,
                        ClusterIdx(0),
                        &c,
                        &t,
                        now,
                        &mut allowance,
                        &mut plan,
                    );
                    plan.moves.len()
                })
                .collect()
        };
        let windows: Vec<Vec<usize>> = (50..90).map(window).collect();
        assert!(
            windows.iter().all(|w| w.iter().all(|&n| n == w[0])),
            "{windows:?}"
        );
        assert!(windows.iter().any(|w| w[0] == 1) && windows.iter().any(|w| w[0] == 0));
        // The same 24 on another worker of this proxy (it sees this one's moves a tick later):
        // no draw, the smallest always moves.
        let (mut own, t_own) = setup(&[&[8.0, 8.0], &[28.0], &[28.0], &[28.0]]);
        if let Some(e) = own.endpoint_mut(0) {
            e.remote_load = 24.0;
        }
        for k in 0..20 {
            let (mut allowance, mut plan) = (Allowance::from(10), Plan::default());
            plan_first(
                &cfg,
                &own,
                &t_own,
                100 * S + k * S,
                &mut allowance,
                &mut plan,
            );
            assert_eq!(plan.moves.len(), 1);
        }
    }

    #[test]
    fn a_reported_endpoint_just_shed_waits_for_reports_that_show_it() {
        let cfg = RebalanceConfig::default();
        let (mut c, t) = setup(&[&[20.0, 10.0, 6.0, 4.0], &[10.0, 10.0], &[5.0, 5.0], &[10.5]]);
        if let Some(e) = c.endpoint_mut(0) {
            e.reported = true;
            e.shed_at = Some(99 * S);
        }
        let plan_at = |c: &Cluster, now: Nanos| {
            let (mut allowance, mut plan) = (Allowance::from(10), Plan::default());
            plan_cluster(
                &cfg,
                Pace {
                    settle: 2 * S,
                    salt: 0,
                },
                ClusterIdx(0),
                c,
                &t,
                now,
                &mut allowance,
                &mut plan,
            );
            plan.moves.len()
        };
        assert_eq!(plan_at(&c, 100 * S), 0); // shed 1 s ago, settle 2 s
        assert_eq!(plan_at(&c, 101 * S), 2);
        // The local view is exact: no wait.
        if let Some(e) = c.endpoint_mut(0) {
            e.reported = false;
        }
        assert_eq!(plan_at(&c, 100 * S), 2);
    }
}
