//! `lab sim`: fleet-scale placement in simulated time (1 s steps), no Envoy.
//!
//! Every policy sees the same devices (rates, client zones, arrival and reconnect times, bursts,
//! faults). Each proxy decides on its own view: `streamlb` runs one real
//! [`streamlb_core::router::Router`] per proxy worker (workers of one proxy share loads like
//! Envoy workers do through shared data). `streamlb` probes the pods as the filter does
//! (`Router::due_probes` each second, a probe lost with probability `PROBE_LOSS`); a pod answers
//! with its load as a reporter measures it (EWMA with the reporter's τ of its true load plus the
//! fading priors of its young streams, and utilisation = load / capacity when the zone has one),
//! and every worker of the proxy gets the reports. `streamlb_local` is the same without probes (each proxy sees only its own streams);
//! `streamlb_global_view` shares every proxy's own load with all, an ideal no Envoy has.
//! `streamlb_rebalance` is `streamlb` with `rebalance.mode: on`: each second every worker plans
//! moves (`Router::plan_moves`) within its proxy's churn budget, and each moved device
//! reconnects at once. Every streamlb policy remembers each device's rate per proxy (the
//! filter's rate memory by device id), so a reconnecting device is placed by its own rate, and
//! a moved one on the endpoint its move found room on (if the zone rule keeps that zone).
//! The peers are re-implemented:
//! round robin, P2C on this proxy's stream counts (Envoy `least_request`), Envoy zone-aware
//! routing (host-count split + least_request), `load_aware_locality`'s rule (ORCA utilisation per
//! zone, EWMA τ 5 s) with round robin inside the zone. The oracle is the lower bound
//! `max(1, max_i r_i / c_max · Σc/Σr)` and LPT over the streams active at that second.
//!
//! Metrics per second after warm-up, on true rates: utilisation u_j = load_j / capacity_j of each
//! up pod, mean ū = Σload / Σcapacity; max/mean = max_j u_j / ū, p99/mean = p99_j u_j / ū;
//! cross-zone share = rate of streams whose pod's zone differs from the proxy's zone / total;
//! its minimum Σ_z max(0, d_z − (1+ε)·c_z).

#![allow(clippy::needless_range_loop)] // index loops over parallel per-device / per-pod arrays

use crate::scenario::Scenario;
use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use streamlb_core::config::{Config, RebalanceMode};
use streamlb_core::discovery::{ClusterSnapshot, DiscoveredEndpoint};
use streamlb_core::fleet::LoadReport;
use streamlb_core::penalty::Outcome;
use streamlb_core::rebalance::Budget;
use streamlb_core::rng::Rng;
use streamlb_core::router::{Remember, Router, Source};
use streamlb_core::streams::Direction;
use streamlb_core::Nanos;

const SEC: Nanos = 1_000_000_000;
pub const POLICIES: &[&str] = &[
    "streamlb",
    "streamlb_local",
    "round_robin",
    "least_request",
    "zone_aware",
    "load_aware_locality",
    "streamlb_global_view",
    "streamlb_rebalance",
];

/// The world every policy shares, as it is at the current second.
pub struct World {
    pub zones: Vec<String>,
    pub pod_name: Vec<String>,
    pub pod_zone: Vec<usize>,
    pub pod_capacity: Vec<f64>,
    pub pod_up: Vec<bool>,
    pub proxy_zone: Vec<usize>,
    pub dev_rate: Vec<f64>,
    pub dev_proxy: Vec<usize>,
}

impl World {
    fn up_pods(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.pod_up.len()).filter(|&j| self.pod_up[j])
    }
    fn up_in_zone(&self, z: usize) -> impl Iterator<Item = usize> + '_ {
        self.up_pods().filter(move |&j| self.pod_zone[j] == z)
    }
    /// Utilisation a pod reports over ORCA (lab pods: r/C, or r/1000 when unlimited).
    fn orca_util(&self, j: usize, load: f64) -> f64 {
        let c = self.pod_capacity[j];
        if c > 0.0 {
            load / c
        } else {
            load / 1000.0
        }
    }
}

/// One placement policy over all proxies.
trait Policy {
    fn place(&mut self, w: &World, now: Nanos, dev: usize) -> Option<usize>;
    /// `pod` lost stream `dev` (ended, or its pod stopped: `failed`).
    fn end(&mut self, w: &World, now: Nanos, dev: usize, pod: usize, failed: bool);
    /// End of a simulated second; `loads` are the true per-pod loads of this policy.
    fn second(&mut self, _w: &World, _now: Nanos, _assign: &[Option<usize>], _loads: &[f64]) {}
    fn fallbacks(&self) -> u64 {
        0
    }
    /// (sent, unanswered) load probes.
    fn probes(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Planned moves by reason (`hot`, `room`, `home`, `spread`) and those the budget skipped.
    fn moves_by_reason(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Devices whose streams the policy ends now to place them again (rebalancing), after
    /// [`Policy::second`].
    fn moves(&mut self, _w: &World, _now: Nanos) -> Vec<usize> {
        Vec::new()
    }
}

fn without_probes(cfg: &Config) -> Config {
    let mut cfg = cfg.clone();
    cfg.probe.enabled = false;
    cfg
}

fn p2c(rng: &mut Rng, cands: &[usize], count: &[u32]) -> Option<usize> {
    match cands.len() {
        0 => None,
        1 => cands.first().copied(),
        n => {
            let a = rng.below(n);
            let b = (a + 1 + rng.below(n - 1)) % n;
            let (pa, pb) = (cands[a], cands[b]);
            Some(if count[pb] < count[pa] { pb } else { pa })
        }
    }
}

struct RoundRobin {
    next: Vec<usize>,
}
impl Policy for RoundRobin {
    fn place(&mut self, w: &World, _now: Nanos, dev: usize) -> Option<usize> {
        let p = w.dev_proxy[dev];
        let n = w.pod_up.len();
        for _ in 0..n {
            let j = self.next[p] % n;
            self.next[p] = j + 1;
            if w.pod_up[j] {
                return Some(j);
            }
        }
        None
    }
    fn end(&mut self, _: &World, _: Nanos, _: usize, _: usize, _: bool) {}
}

/// Envoy least_request with equal weights: P2C on this proxy's active streams.
struct LeastRequest {
    count: Vec<Vec<u32>>,
    rng: Rng,
}
impl Policy for LeastRequest {
    fn place(&mut self, w: &World, _now: Nanos, dev: usize) -> Option<usize> {
        let p = w.dev_proxy[dev];
        let cands: Vec<usize> = w.up_pods().collect();
        let j = p2c(&mut self.rng, &cands, &self.count[p])?;
        self.count[p][j] += 1;
        Some(j)
    }
    fn end(&mut self, w: &World, _: Nanos, dev: usize, pod: usize, _: bool) {
        let c = &mut self.count[w.dev_proxy[dev]][pod];
        *c = c.saturating_sub(1);
    }
}

/// Envoy zone-aware routing: local share = upstream%/local% of proxies' zone, rest spilled to
/// zones with residual (upstream% − local%) > 0; least_request inside the zone.
struct ZoneAware {
    inner: LeastRequest,
}
impl Policy for ZoneAware {
    fn place(&mut self, w: &World, _now: Nanos, dev: usize) -> Option<usize> {
        let p = w.dev_proxy[dev];
        let nz = w.zones.len();
        let total_up = w.up_pods().count() as f64;
        let total_px = w.proxy_zone.len() as f64;
        let up: Vec<f64> = (0..nz)
            .map(|z| w.up_in_zone(z).count() as f64 / total_up.max(1.0))
            .collect();
        let local: Vec<f64> = (0..nz)
            .map(|z| w.proxy_zone.iter().filter(|&&pz| pz == z).count() as f64 / total_px)
            .collect();
        let lz = w.proxy_zone[p];
        let rng = &mut self.inner.rng;
        let zone = if up[lz] >= local[lz] || rng.next_f64() < up[lz] / local[lz] {
            lz
        } else {
            let residual: Vec<f64> = (0..nz)
                .map(|z| {
                    if z == lz {
                        0.0
                    } else {
                        (up[z] - local[z]).max(0.0)
                    }
                })
                .collect();
            pick_weighted(rng, &residual).unwrap_or(lz)
        };
        let mut cands: Vec<usize> = w.up_in_zone(zone).collect();
        if cands.is_empty() {
            cands = w.up_pods().collect();
        }
        let j = p2c(rng, &cands, &self.inner.count[p])?;
        self.inner.count[p][j] += 1;
        Some(j)
    }
    fn end(&mut self, w: &World, now: Nanos, dev: usize, pod: usize, f: bool) {
        self.inner.end(w, now, dev, pod, f)
    }
}

fn pick_weighted(rng: &mut Rng, weights: &[f64]) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let mut x = rng.next_f64() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return Some(i);
        }
        x -= w;
    }
    weights.iter().rposition(|w| *w > 0.0)
}

/// load_aware_locality: per-zone ORCA utilisation (host mean), EWMA τ 5 s, updated each second.
/// All local (3 % probe to remotes) unless local util > remote host-weighted mean + 0.1; then
/// zones by headroom hosts·(1−util). Round robin inside the zone.
struct LoadAwareLocality {
    util: Vec<Option<f64>>,
    next: Vec<Vec<usize>>,
    rng: Rng,
}
impl Policy for LoadAwareLocality {
    fn place(&mut self, w: &World, _now: Nanos, dev: usize) -> Option<usize> {
        let p = w.dev_proxy[dev];
        let lz = w.proxy_zone[p];
        let nz = w.zones.len();
        let hosts: Vec<f64> = (0..nz).map(|z| w.up_in_zone(z).count() as f64).collect();
        let util: Vec<f64> = self.util.iter().map(|u| u.unwrap_or(0.0)).collect();
        let (rs, rh) = (0..nz).filter(|&z| z != lz).fold((0.0, 0.0), |(s, h), z| {
            (s + util[z] * hosts[z], h + hosts[z])
        });
        let remote_avg = if rh > 0.0 { rs / rh } else { 0.0 };
        let weights: Vec<f64> = if hosts[lz] > 0.0 && util[lz] <= remote_avg + 0.1 {
            if rh > 0.0 && self.rng.next_f64() < 0.03 {
                (0..nz)
                    .map(|z| if z == lz { 0.0 } else { hosts[z] })
                    .collect()
            } else {
                (0..nz).map(|z| if z == lz { 1.0 } else { 0.0 }).collect()
            }
        } else {
            (0..nz)
                .map(|z| hosts[z] * (1.0 - util[z]).max(0.0))
                .collect()
        };
        let zone = pick_weighted(&mut self.rng, &weights).unwrap_or(lz);
        let mut cands: Vec<usize> = w.up_in_zone(zone).collect();
        if cands.is_empty() {
            cands = w.up_pods().collect();
        }
        if cands.is_empty() {
            return None;
        }
        let k = self.next[p][zone] % cands.len();
        self.next[p][zone] = k + 1;
        cands.get(k).copied()
    }
    fn end(&mut self, _: &World, _: Nanos, _: usize, _: usize, _: bool) {}
    fn second(&mut self, w: &World, _now: Nanos, _assign: &[Option<usize>], loads: &[f64]) {
        let alpha = 1.0 - (-1.0f64 / 5.0).exp();
        for z in 0..w.zones.len() {
            let pods: Vec<usize> = w.up_in_zone(z).collect();
            if pods.is_empty() {
                continue;
            }
            let u = pods.iter().map(|&j| w.orca_util(j, loads[j])).sum::<f64>() / pods.len() as f64;
            let slot = &mut self.util[z];
            *slot = Some(slot.map_or(u, |old| old + alpha * (u - old)));
        }
    }
}

/// streamlb: the real routing core, one Router per proxy worker.
struct Streamlb {
    routers: Vec<Router>,
    /// router index → devices currently placed by it (with their stream ids).
    workers: usize,
    stream_id: Vec<u64>,
    next_id: u64,
    carry: Vec<f64>,
    /// When each device's current stream was placed: its first second carries only the part
    /// it was open for.
    placed_at: Vec<Nanos>,
    addr_to_pod: HashMap<String, usize>,
    fallback: LeastRequest,
    fallbacks: u64,
    poll: Nanos,
    last_poll: Option<Nanos>,
    /// Share loads across every router (all proxies), not only within a proxy: an idealised
    /// global view the filter does not have across Envoys.
    global_view: bool,
    /// Pods' own load estimate (what a reporter would answer): EWMA of the true load, and the
    /// fading priors of streams too young to be in it.
    reported: Vec<f64>,
    young: Vec<f64>,
    /// Mean rate per active stream (a reporter's prior for a new stream).
    prior: f64,
    tau_s: f64,
    rng: Rng,
    /// Probes sent and lost, over the run.
    probes: (u64, u64),
    /// Planned moves by reason, and moves the churn budget skipped, over the run.
    moved: BTreeMap<&'static str, u64>,
    /// Per proxy: device → remembered rate (the filter's rate memory) and a moved device's
    /// destination (held until its next placement), and the churn budget.
    memory: Vec<HashMap<u64, (f64, Option<u32>)>>,
    budgets: Vec<Budget>,
    tick: Nanos,
}

/// Share of probes that get no answer (timeouts, resets).
pub const PROBE_LOSS: f64 = 0.02;

impl Streamlb {
    fn new(w: &World, cfg: Config, workers: usize, seed: u64, global_view: bool) -> Self {
        let workers = workers.max(1);
        let poll = cfg.discovery.poll_ms.max(1) * 1_000_000;
        let routers = (0..w.proxy_zone.len() * workers)
            .map(|i| {
                let zone = &w.zones[w.proxy_zone[i / workers]];
                let mut r = Router::new(cfg.clone(), zone, seed.wrapping_add(1000 + i as u64));
                // The proxy's other workers place at the same time, seen only on the tick.
                r.set_peers(workers - 1);
                r
            })
            .collect();
        let mut s = Streamlb {
            routers,
            workers,
            stream_id: vec![0; w.dev_rate.len()],
            next_id: 1,
            carry: vec![0.0; w.dev_rate.len()],
            placed_at: vec![0; w.dev_rate.len()],
            addr_to_pod: w
                .pod_name
                .iter()
                .enumerate()
                .map(|(j, n)| (n.clone(), j))
                .collect(),
            fallback: LeastRequest {
                count: vec![vec![0; w.pod_up.len()]; w.proxy_zone.len()],
                rng: Rng::new(seed ^ 0x5eed),
            },
            fallbacks: 0,
            poll,
            last_poll: None,
            global_view,
            reported: vec![0.0; w.pod_up.len()],
            young: vec![0.0; w.pod_up.len()],
            prior: 0.0,
            tau_s: cfg.reporter_tau_secs(),
            rng: Rng::new(seed ^ 0x9b0b),
            probes: (0, 0),
            moved: BTreeMap::new(),
            memory: vec![HashMap::new(); w.proxy_zone.len()],
            budgets: vec![Budget::default(); w.proxy_zone.len()],
            tick: cfg.tick_ms.max(1) * 1_000_000,
        };
        s.discover(w, 0);
        s
    }
    fn router_of(&self, w: &World, dev: usize) -> usize {
        w.dev_proxy[dev] * self.workers + dev % self.workers
    }
    fn discover(&mut self, w: &World, now: Nanos) {
        let snap = vec![ClusterSnapshot {
            name: "pods".into(),
            endpoints: (0..w.pod_name.len())
                .map(|j| DiscoveredEndpoint {
                    address: w.pod_name[j].clone(),
                    zone: w.zones[w.pod_zone[j]].clone(),
                    healthy: w.pod_up[j],
                    weight: 1,
                })
                .collect(),
        }];
        for r in &mut self.routers {
            r.apply_snapshot(now, &snap);
        }
        self.last_poll = Some(now);
    }
}

impl Policy for Streamlb {
    fn place(&mut self, w: &World, now: Nanos, dev: usize) -> Option<usize> {
        let r = self.router_of(w, dev);
        let id = self.next_id;
        self.next_id += 1;
        self.stream_id[dev] = id;
        self.carry[dev] = 0.0;
        self.placed_at[dev] = now;
        let key = dev as u64;
        let remembered = self.memory[w.dev_proxy[dev]].get_mut(&key);
        let source = Source {
            key,
            rate: remembered.as_ref().map(|m| m.0),
            to: remembered.and_then(|m| m.1.take()),
        };
        let router = &mut self.routers[r];
        let decision = router.place_from(now, id, "telemetry", "pods", Some(source));
        let pod = decision
            .and_then(|d| d.primary)
            .and_then(|a| self.addr_to_pod.get(&a).copied())
            .filter(|&j| w.pod_up[j]);
        let pod = match pod {
            Some(j) => j,
            None => {
                // Envoy's fallback_policy (least_request) routes; the filter learns the upstream.
                self.fallbacks += 1;
                let j = self.fallback.place(w, now, dev)?;
                self.fallback.end(w, now, dev, j, false);
                j
            }
        };
        router.on_upstream(now, id, &w.pod_name[pod], || {
            w.zones[w.pod_zone[pod]].clone()
        });
        self.young[pod] += self.prior;
        Some(pod)
    }
    fn end(&mut self, w: &World, now: Nanos, dev: usize, _pod: usize, failed: bool) {
        let r = self.router_of(w, dev);
        let outcome = if failed { Outcome::Failed } else { Outcome::Ok };
        self.routers[r].on_end(now, self.stream_id[dev], outcome);
    }
    fn second(&mut self, w: &World, now: Nanos, assign: &[Option<usize>], loads: &[f64]) {
        for (dev, a) in assign.iter().enumerate() {
            if a.is_none() {
                continue;
            }
            let open = now.saturating_sub(self.placed_at[dev]).min(SEC) as f64 / SEC as f64;
            let c = &mut self.carry[dev];
            *c += w.dev_rate[dev] * open;
            let whole = c.floor();
            *c -= whole;
            let r = w.dev_proxy[dev] * self.workers + dev % self.workers;
            let msgs = whole as u64;
            self.routers[r].on_data(self.stream_id[dev], Direction::Upstream, msgs, msgs * 64);
        }
        if self
            .last_poll
            .is_none_or(|t| now.saturating_sub(t) >= self.poll)
        {
            self.discover(w, now);
        }
        for (i, r) in self.routers.iter_mut().enumerate() {
            r.tick(now);
            remember(&mut self.memory[i / self.workers], r.take_rate_updates());
        }
        let mut streams = vec![0u32; loads.len()];
        for j in assign.iter().flatten() {
            if let Some(n) = streams.get_mut(*j) {
                *n += 1;
            }
        }
        self.probe(w, now, loads, &streams);
        let group = if self.global_view {
            self.routers.len()
        } else {
            self.workers
        };
        if group > 1 {
            for g in 0..self.routers.len() / group {
                let base = g * group;
                let loads: Vec<Vec<(String, f64, u32)>> = (base..base + group)
                    .map(|i| {
                        self.routers[i]
                            .local_loads()
                            .into_iter()
                            .map(|(_, a, l, n)| (a.to_string(), l, n))
                            .collect()
                    })
                    .collect();
                for k in 0..group {
                    let others = loads
                        .iter()
                        .enumerate()
                        .filter(|(o, _)| *o != k)
                        .flat_map(|(_, v)| v.iter())
                        .map(|(a, l, n)| ("pods", a.as_str(), *l, *n));
                    self.routers[base + k].set_remote_loads(now, others);
                }
            }
        }
    }
    fn fallbacks(&self) -> u64 {
        self.fallbacks
    }
    fn probes(&self) -> (u64, u64) {
        self.probes
    }
    fn moves_by_reason(&self) -> serde_json::Value {
        json!(self.moved)
    }
    fn moves(&mut self, _w: &World, now: Nanos) -> Vec<usize> {
        let cfg = self.routers.first().map(|r| r.config().rebalance.clone());
        let Some(cfg) = cfg.filter(|c| c.mode == RebalanceMode::On) else {
            return Vec::new();
        };
        let mut moved_ids = Vec::new();
        for p in 0..self.routers.len() / self.workers {
            let workers = p * self.workers..(p + 1) * self.workers;
            let streams: usize = self.routers[workers.clone()]
                .iter()
                .map(|r| r.streams().len())
                .sum();
            for i in workers {
                let allowance = self.budgets[p].allowance(&cfg, now, self.tick, streams);
                let plan = self.routers[i].plan_moves(now, allowance);
                self.budgets[p].spend(now, plan.moves.len());
                self.routers[i].commit_moves(now, &plan);
                for m in &plan.moves {
                    *self.moved.entry(m.why.as_str()).or_default() += 1;
                }
                *self.moved.entry("skipped_by_budget").or_default() +=
                    plan.skipped_budget.iter().sum::<u64>();
                remember(&mut self.memory[p], self.routers[i].take_rate_updates());
                moved_ids.extend(plan.moves.iter().map(|m| m.stream));
            }
        }
        let by_id: HashMap<u64, usize> = (self.stream_id.iter().enumerate())
            .filter(|(_, id)| **id > 0)
            .map(|(dev, id)| (*id, dev))
            .collect();
        moved_ids
            .iter()
            .filter_map(|id| by_id.get(id).copied())
            .collect()
    }
}

/// Rate updates into a proxy's rate memory; a destination holds until the device's next
/// placement (a later update without one, e.g. the moved stream's own end, keeps it).
fn remember(memory: &mut HashMap<u64, (f64, Option<u32>)>, updates: Vec<Remember>) {
    for u in updates {
        let m = memory.entry(u.key).or_insert((u.rate, None));
        m.0 = u.rate;
        if u.to.is_some() {
            m.1 = u.to;
        }
    }
}

impl Streamlb {
    /// Pods update their own load estimate; each proxy's first worker probes the pods due, and
    /// every worker of the proxy gets the answers (shared data in Envoy).
    fn probe(&mut self, w: &World, now: Nanos, loads: &[f64], streams: &[u32]) {
        let alpha = 1.0 - (-1.0 / self.tau_s).exp();
        for ((r, y), &l) in self.reported.iter_mut().zip(&mut self.young).zip(loads) {
            *r += alpha * (l - *r);
            *y *= 1.0 - alpha;
        }
        let active = self.stream_id.iter().filter(|&&id| id > 0).count();
        self.prior = loads.iter().sum::<f64>() / active.max(1) as f64;
        for p in 0..self.routers.len() / self.workers {
            let base = p * self.workers;
            let due = self.routers[base].due_probes(now);
            let mut reports = Vec::new();
            for (_, address) in due {
                self.probes.0 += 1;
                let Some(&j) = self.addr_to_pod.get(&address) else {
                    continue;
                };
                if !w.pod_up[j] || self.rng.next_f64() < PROBE_LOSS {
                    self.probes.1 += 1;
                    continue;
                }
                let rate = self.reported[j] + self.young[j];
                let c = w.pod_capacity[j];
                let report = LoadReport {
                    rate,
                    utilization: (c > 0.0).then(|| rate / c),
                    streams: streams.get(j).map(|&n| f64::from(n)),
                    at: now,
                };
                reports.push((address, report));
            }
            if reports.is_empty() {
                continue;
            }
            for r in &mut self.routers[base..base + self.workers] {
                r.apply_reports(now, "pods", &reports);
            }
        }
    }
}

fn make_policy(
    name: &str,
    w: &World,
    cfg: &Config,
    workers: usize,
    seed: u64,
) -> anyhow::Result<Box<dyn Policy>> {
    let np = w.proxy_zone.len();
    let npods = w.pod_up.len();
    let mut rng = Rng::new(seed);
    Ok(match name {
        "streamlb" => Box::new(Streamlb::new(w, cfg.clone(), workers, seed, false)),
        "streamlb_local" => Box::new(Streamlb::new(w, without_probes(cfg), workers, seed, false)),
        "streamlb_global_view" => {
            Box::new(Streamlb::new(w, without_probes(cfg), workers, seed, true))
        }
        "streamlb_rebalance" => {
            let mut cfg = cfg.clone();
            cfg.rebalance.mode = RebalanceMode::On;
            cfg.rebalance.allow_reset = true;
            Box::new(Streamlb::new(w, cfg, workers, seed, false))
        }
        "round_robin" => Box::new(RoundRobin {
            next: (0..np).map(|_| rng.below(npods)).collect(),
        }),
        "least_request" => Box::new(LeastRequest {
            count: vec![vec![0; npods]; np],
            rng,
        }),
        "zone_aware" => Box::new(ZoneAware {
            inner: LeastRequest {
                count: vec![vec![0; npods]; np],
                rng,
            },
        }),
        "load_aware_locality" => Box::new(LoadAwareLocality {
            util: vec![None; w.zones.len()],
            next: (0..np)
                .map(|_| (0..w.zones.len()).map(|_| rng.below(npods)).collect())
                .collect(),
            rng,
        }),
        other => bail!("unknown policy {other:?}; known: {}", POLICIES.join(", ")),
    })
}

/// Per-second figures of one placement.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t: f64,
    pub max_over_mean: f64,
    pub p99_over_mean: f64,
    pub cross_zone: f64,
}

fn sample(w: &World, t: f64, assign: &[Option<usize>], loads: &[f64]) -> Sample {
    let up: Vec<usize> = w.up_pods().collect();
    let total_load: f64 = up.iter().map(|&j| loads[j]).sum();
    let total_cap: f64 = up.iter().map(|&j| cap(w, j)).sum();
    let mean = if total_cap > 0.0 {
        total_load / total_cap
    } else {
        0.0
    };
    let mut utils: Vec<f64> = up.iter().map(|&j| loads[j] / cap(w, j)).collect();
    utils.sort_by(f64::total_cmp);
    let max = utils.last().copied().unwrap_or(0.0);
    let p99 = percentile_sorted(&utils, 0.99);
    let (mut cross, mut all) = (0.0, 0.0);
    for (dev, a) in assign.iter().enumerate() {
        if let Some(j) = a {
            all += w.dev_rate[dev];
            if w.pod_zone[*j] != w.proxy_zone[w.dev_proxy[dev]] {
                cross += w.dev_rate[dev];
            }
        }
    }
    Sample {
        t,
        max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        p99_over_mean: if mean > 0.0 { p99 / mean } else { 0.0 },
        cross_zone: if all > 0.0 { cross / all } else { 0.0 },
    }
}

/// Share of the load at the end by "proxy zone->pod zone".
fn flows(w: &World, assign: &[Option<usize>]) -> serde_json::Map<String, serde_json::Value> {
    let mut by: std::collections::BTreeMap<String, f64> = Default::default();
    let mut all = 0.0;
    for (dev, a) in assign.iter().enumerate() {
        if let Some(j) = a {
            let key = format!(
                "{}->{}",
                w.zones[w.proxy_zone[w.dev_proxy[dev]]], w.zones[w.pod_zone[*j]]
            );
            *by.entry(key).or_default() += w.dev_rate[dev];
            all += w.dev_rate[dev];
        }
    }
    by.into_iter()
        .map(|(k, v)| (k, json!(if all > 0.0 { v / all } else { 0.0 })))
        .collect()
}

/// Relative capacity of pod j (1 when unlimited).
fn cap(w: &World, j: usize) -> f64 {
    let c = w.pod_capacity[j];
    if c > 0.0 {
        c
    } else {
        1.0
    }
}

pub fn percentile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[k]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Oracle figures for the active streams: lower bound, LPT max/mean, cross-zone minimum.
pub fn oracle(w: &World, active: &[bool], eps: f64) -> (f64, f64, f64) {
    let up: Vec<usize> = w.up_pods().collect();
    let mut rates: Vec<f64> = (0..active.len())
        .filter(|&d| active[d])
        .map(|d| w.dev_rate[d])
        .collect();
    let sum_r: f64 = rates.iter().sum();
    let sum_c: f64 = up.iter().map(|&j| cap(w, j)).sum();
    let c_max = up.iter().map(|&j| cap(w, j)).fold(0.0, f64::max);
    let r_max = rates.iter().copied().fold(0.0, f64::max);
    let bound = if sum_r > 0.0 && c_max > 0.0 {
        (r_max / c_max * sum_c / sum_r).max(1.0)
    } else {
        1.0
    };
    // LPT relative to capacity.
    rates.sort_by(|a, b| b.total_cmp(a));
    #[derive(PartialEq)]
    struct Slot(f64, usize);
    impl Eq for Slot {}
    impl PartialOrd for Slot {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Slot {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
        }
    }
    let mut heap: BinaryHeap<Slot> = up.iter().map(|&j| Slot(0.0, j)).collect();
    let mut load = vec![0.0; w.pod_up.len()];
    for r in rates {
        if let Some(Slot(_, j)) = heap.pop() {
            load[j] += r;
            heap.push(Slot(load[j] / cap(w, j), j));
        }
    }
    let mean = if sum_c > 0.0 { sum_r / sum_c } else { 0.0 };
    let max_u = up.iter().map(|&j| load[j] / cap(w, j)).fold(0.0, f64::max);
    let lpt = if mean > 0.0 { max_u / mean } else { 0.0 };
    // Cross-zone minimum.
    let nz = w.zones.len();
    let mut demand = vec![0.0; nz];
    for d in (0..active.len()).filter(|&d| active[d]) {
        demand[w.proxy_zone[w.dev_proxy[d]]] += w.dev_rate[d];
    }
    let min_cross: f64 = (0..nz)
        .map(|z| {
            let dz = if sum_r > 0.0 { demand[z] / sum_r } else { 0.0 };
            let cz = w.up_in_zone(z).map(|j| cap(w, j)).sum::<f64>() / sum_c.max(f64::MIN_POSITIVE);
            (dz - (1.0 + eps) * cz).max(0.0)
        })
        .sum();
    (bound, lpt, min_cross)
}

/// What an online placer reaches (see [`online_greedy`]).
pub struct Online {
    pub max_over_mean: f64,
    pub cross_zone: f64,
}

/// A reference for placement without moves: streams placed one by one in `arrivals` order,
/// each knowing every earlier stream's rate exactly but not its own (counted at `mean_rate`).
/// Without `local_first` each goes to the least-utilised up pod (list scheduling). With
/// `local_first = Some(ε)` it stays in its client zone, on the zone's least-utilised pod, while
/// the zone's utilisation with it stays ≤ (1 + ε) × the fleet's; else it goes to the
/// least-utilised pod of the other zones. Utilisation = load / capacity; ties to the lower index.
pub fn online_greedy(
    w: &World,
    arrivals: &[usize],
    mean_rate: f64,
    local_first: Option<f64>,
) -> Online {
    let up: Vec<usize> = w.up_pods().collect();
    let mut load = vec![0.0; w.pod_up.len()];
    let sum_c: f64 = up.iter().map(|&j| cap(w, j)).sum();
    let (mut total, mut crossed) = (0.0, 0.0);
    let least = |load: &[f64], pods: &mut dyn Iterator<Item = usize>| {
        pods.min_by(|&a, &b| {
            (load[a] / cap(w, a))
                .total_cmp(&(load[b] / cap(w, b)))
                .then(a.cmp(&b))
        })
    };
    // Whether zone z, with the new stream counted at the mean, stays within (1 + ε) × the fleet.
    let has_room = |load: &[f64], z: usize, eps: f64| {
        let zone_cap: f64 = w.up_in_zone(z).map(|j| cap(w, j)).sum();
        let zone_load = w.up_in_zone(z).map(|j| load[j]).sum::<f64>() + mean_rate;
        let fleet_load = up.iter().map(|&j| load[j]).sum::<f64>() + mean_rate;
        zone_cap > 0.0 && zone_load / zone_cap <= (1.0 + eps) * fleet_load / sum_c
    };
    for &d in arrivals {
        let zone = w.proxy_zone[w.dev_proxy[d]];
        let pick = match local_first {
            None => least(&load, &mut up.iter().copied()),
            Some(eps) if has_room(&load, zone, eps) => least(&load, &mut w.up_in_zone(zone)),
            Some(_) => least(
                &load,
                &mut up.iter().copied().filter(|&j| w.pod_zone[j] != zone),
            )
            .or_else(|| least(&load, &mut up.iter().copied())),
        };
        let Some(j) = pick else { continue };
        load[j] += w.dev_rate[d];
        total += w.dev_rate[d];
        if w.pod_zone[j] != zone {
            crossed += w.dev_rate[d];
        }
    }
    let mean = if sum_c > 0.0 { total / sum_c } else { 0.0 };
    let max_u = up.iter().map(|&j| load[j] / cap(w, j)).fold(0.0, f64::max);
    Online {
        max_over_mean: if mean > 0.0 { max_u / mean } else { 0.0 },
        cross_zone: if total > 0.0 { crossed / total } else { 0.0 },
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Event {
    Arrive,
    End,
}

/// Runs the scenario (with its `sim` overrides applied) and returns the JSON report.
/// Zones, pods, proxies and devices of a scenario: per client zone, the rates `lab devices`
/// draws, handed to that zone's proxies in turn (to every proxy if the zone has none).
fn build_world(sc: &Scenario) -> anyhow::Result<World> {
    let zones: Vec<String> = sc.zones.iter().map(|z| z.name.clone()).collect();
    let zone_idx = |name: &str| zones.iter().position(|z| z == name);
    let pods = sc.pod_names();
    let mut proxy_zone = Vec::new();
    for (z, n) in &sc.proxies {
        let zi = zone_idx(z).context("proxy zone")?;
        proxy_zone.extend(std::iter::repeat_n(zi, *n));
    }
    let mut dev_rate = Vec::new();
    let mut dev_proxy = Vec::new();
    for (z, rates) in sc.device_rates()? {
        let zi = zone_idx(&z).context("client zone")?;
        let local: Vec<usize> = (0..proxy_zone.len())
            .filter(|&p| proxy_zone[p] == zi)
            .collect();
        let all: Vec<usize> = (0..proxy_zone.len()).collect();
        let mine = if local.is_empty() { &all } else { &local };
        for (i, r) in rates.into_iter().enumerate() {
            dev_rate.push(r);
            dev_proxy.push(mine[i % mine.len()]);
        }
    }
    Ok(World {
        zones: zones.clone(),
        pod_name: pods.iter().map(|(n, _)| n.clone()).collect(),
        pod_zone: pods.iter().map(|(_, z)| *z).collect(),
        pod_capacity: pods.iter().map(|(_, z)| sc.zones[*z].capacity).collect(),
        pod_up: vec![true; pods.len()],
        proxy_zone,
        dev_rate,
        dev_proxy,
    })
}

/// The filter configuration of the streamlb policies: the scenario's `streamlb` section merged
/// over `{"clusters": ["pods"]}`.
fn filter_config(sc: &Scenario) -> anyhow::Result<Config> {
    let mut cfg_json = json!({"clusters": ["pods"]});
    if !sc.streamlb.is_null() {
        crate::scenario::merge(&mut cfg_json, &sc.streamlb);
    }
    Config::from_json(cfg_json.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("streamlb config: {e}"))
}

/// Arrivals at ramp·i/n (interleaved over zones by a seeded shuffle), then, with stream
/// lifetimes, each device's reconnects (exponential lifetimes, reconnecting at once), in time
/// order.
fn device_events(sc: &Scenario, n: usize, rng: &mut Rng) -> Vec<(f64, usize, Event)> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let ramp = sc.streams.ramp_s.max(0.0);
    let mut events: Vec<(f64, usize, Event)> = order
        .iter()
        .enumerate()
        .map(|(k, &d)| (ramp * k as f64 / n.max(1) as f64, d, Event::Arrive))
        .collect();
    let life = sc.streams.mean_lifetime_s;
    if life > 0.0 {
        for e in events.clone() {
            let mut t = e.0;
            loop {
                t += -life * (1.0 - rng.next_f64()).ln();
                if t >= sc.duration_s {
                    break;
                }
                events.push((t, e.1, Event::End));
            }
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    events
}

pub fn run(
    sc: &Scenario,
    policies: &[String],
    workers: usize,
    progress: bool,
) -> anyhow::Result<serde_json::Value> {
    let started = std::time::Instant::now();
    let mut w = build_world(sc)?;
    let n = w.dev_rate.len();
    let base_rate = w.dev_rate.clone();
    let base_capacity = w.pod_capacity.clone();
    let cfg = filter_config(sc)?;
    let mut rng = Rng::new(sc.seed ^ 0x51);
    let events = device_events(sc, n, &mut rng);
    // Burst membership (seeded).
    let burst_members: Vec<Vec<bool>> = sc
        .bursts
        .iter()
        .map(|b| (0..n).map(|_| rng.next_f64() < b.share).collect())
        .collect();

    let mut pols: Vec<Box<dyn Policy>> = policies
        .iter()
        .map(|p| make_policy(p, &w, &cfg, workers, sc.seed))
        .collect::<anyhow::Result<_>>()?;
    let mut assign: Vec<Vec<Option<usize>>> = vec![vec![None; n]; pols.len()];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); pols.len()];
    let mut pod_series: Vec<Vec<Vec<f64>>> = vec![Vec::new(); pols.len()];
    let mut oracle_series = Vec::new();
    let mut active = vec![false; n];
    let mut ev = 0;
    let steps = sc.duration_s.ceil() as usize;
    let keep_pods = w.pod_up.len() <= 60;
    let mut event_marks: Vec<(f64, String)> = Vec::new();
    for step in 0..steps {
        let t0 = step as f64;
        let now = |t: f64| (t * 1e9) as Nanos + SEC;
        // Faults due in this second.
        for f in sc
            .faults
            .iter()
            .filter(|f| f.at_s >= t0 && f.at_s < t0 + 1.0)
        {
            let j = w
                .pod_name
                .iter()
                .position(|p| *p == f.pod)
                .with_context(|| format!("fault on unknown pod {:?}", f.pod))?;
            event_marks.push((f.at_s, format!("{} {}", f.action, f.pod)));
            match f.action.as_str() {
                "stop" => {
                    w.pod_up[j] = false;
                    for (pi, pol) in pols.iter_mut().enumerate() {
                        for dev in 0..n {
                            if assign[pi][dev] == Some(j) {
                                pol.end(&w, now(f.at_s), dev, j, true);
                                assign[pi][dev] = pol.place(&w, now(f.at_s + 0.05), dev);
                            }
                        }
                    }
                }
                "start" => w.pod_up[j] = true,
                "slow" => w.pod_capacity[j] = base_capacity[j] * f.factor,
                other => bail!("unknown fault action {other:?} (stop | start | slow)"),
            }
        }
        // Bursts.
        for b in &sc.bursts {
            if b.at_s >= t0 && b.at_s < t0 + 1.0 {
                event_marks.push((
                    b.at_s,
                    format!("burst ×{} on {:.0}%", b.factor, b.share * 100.0),
                ));
            }
        }
        for d in 0..n {
            let mut r = base_rate[d];
            for (b, members) in sc.bursts.iter().zip(&burst_members) {
                if members[d] && t0 >= b.at_s && t0 < b.at_s + b.length_s {
                    r *= b.factor;
                }
            }
            w.dev_rate[d] = r;
        }
        // Arrivals and reconnects.
        while ev < events.len() && events[ev].0 < t0 + 1.0 {
            let (t, d, kind) = events[ev];
            ev += 1;
            if kind == Event::End && !active[d] {
                continue;
            }
            for (pi, pol) in pols.iter_mut().enumerate() {
                if let Some(j) = assign[pi][d] {
                    pol.end(&w, now(t), d, j, false);
                }
                assign[pi][d] = pol.place(&w, now(t), d);
            }
            active[d] = true;
        }
        // End of second: true loads, samples, policy updates.
        let t_end = t0 + 1.0;
        let measured = t_end > sc.warmup_s;
        if measured {
            oracle_series.push((t_end, oracle(&w, &active, sc.epsilon)));
        }
        for (pi, pol) in pols.iter_mut().enumerate() {
            let mut loads = vec![0.0; w.pod_up.len()];
            for (d, a) in assign[pi].iter().enumerate() {
                if let Some(j) = a {
                    loads[*j] += w.dev_rate[d];
                }
            }
            samples[pi].push(sample(&w, t_end, &assign[pi], &loads));
            if keep_pods {
                pod_series[pi].push(loads.clone());
            }
            pol.second(&w, now(t_end), &assign[pi], &loads);
            // Moved streams end and their devices reconnect at once.
            for d in pol.moves(&w, now(t_end)) {
                if let Some(j) = assign[pi][d] {
                    pol.end(&w, now(t_end), d, j, false);
                }
                assign[pi][d] = pol.place(&w, now(t_end + 0.05), d);
            }
        }
        if progress && (step % 10 == 9 || step + 1 == steps) {
            let line: Vec<String> = policies
                .iter()
                .zip(&samples)
                .map(|(p, s)| format!("{p} {:.2}", s.last().map_or(0.0, |x| x.max_over_mean)))
                .collect();
            eprintln!(
                "sim t={t_end:>4.0}s/{:.0} active {} | max/mean {} | {:.1}s wall",
                sc.duration_s,
                active.iter().filter(|a| **a).count(),
                line.join(", "),
                started.elapsed().as_secs_f64()
            );
        }
    }

    let in_window = |s: &&Sample| s.t > sc.warmup_s;
    let reconverge = |series: &[Sample], at: f64| -> Option<f64> {
        let before: Vec<f64> = series
            .iter()
            .filter(|s| s.t <= at && s.t > at - 10.0)
            .map(|s| s.max_over_mean)
            .collect();
        let target = median(before) * 1.1;
        series
            .iter()
            .filter(|s| s.t > at + 1.0)
            .find(|s| s.max_over_mean <= target)
            .map(|s| s.t - at)
    };
    let mut out_policies = serde_json::Map::new();
    for (pi, p) in policies.iter().enumerate() {
        let s: Vec<&Sample> = samples[pi].iter().filter(in_window).collect();
        let reconv: Vec<serde_json::Value> = event_marks
            .iter()
            .map(|(at, what)| json!({"event": what, "at_s": at, "seconds": reconverge(&samples[pi], *at)}))
            .collect();
        out_policies.insert(
            p.clone(),
            json!({
                "median_max_over_mean": median(s.iter().map(|x| x.max_over_mean).collect()),
                "median_p99_over_mean": median(s.iter().map(|x| x.p99_over_mean).collect()),
                "worst_max_over_mean": s.iter().map(|x| x.max_over_mean).fold(0.0, f64::max),
                "median_cross_zone": median(s.iter().map(|x| x.cross_zone).collect()),
                "fallbacks": pols[pi].fallbacks(),
                "probes": {"sent": pols[pi].probes().0, "unanswered": pols[pi].probes().1},
                "moves": pols[pi].moves_by_reason(),
                "reconverge": reconv,
                "series": samples[pi],
                "pod_loads": if keep_pods { json!(pod_series[pi]) } else { serde_json::Value::Null },
                "flows": flows(&w, &assign[pi]),
            }),
        );
    }
    let oracle_json = json!({
        "median_lower_bound": median(oracle_series.iter().map(|o| o.1 .0).collect()),
        "median_lpt": median(oracle_series.iter().map(|o| o.1 .1).collect()),
        "median_min_cross_zone": median(oracle_series.iter().map(|o| o.1 .2).collect()),
        "series": oracle_series.iter().map(|(t, (b, l, c))| json!({"t": t, "lower_bound": b, "lpt": l, "min_cross_zone": c})).collect::<Vec<_>>(),
    });
    Ok(json!({
        "kind": "sim",
        "scenario": sc.name,
        "seed": sc.seed,
        "pods": w.pod_up.len(),
        "pod_names": if keep_pods { json!(w.pod_name) } else { serde_json::Value::Null },
        "proxies": w.proxy_zone.len(),
        "workers_per_proxy": workers,
        "streams": n,
        "duration_s": sc.duration_s,
        "warmup_s": sc.warmup_s,
        "epsilon": sc.epsilon,
        "events": event_marks.iter().map(|(t, e)| json!({"at_s": t, "event": e})).collect::<Vec<_>>(),
        "policies": out_policies,
        "oracle": oracle_json,
        "wall_s": started.elapsed().as_secs_f64(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(json: serde_json::Value) -> Scenario {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_moved_device_keeps_its_destination_until_it_is_placed() {
        let update = |rate, to| Remember { key: 7, rate, to };
        let mut memory = HashMap::new();
        remember(&mut memory, vec![update(5.0, Some(42))]);
        // The moved stream's own end writes its rate again, without a destination.
        remember(&mut memory, vec![update(6.0, None)]);
        assert_eq!(memory.get(&7), Some(&(6.0, Some(42))));
    }

    fn one_zone(seed: u64) -> Scenario {
        scenario(json!({
            "name": "t", "seed": seed, "duration_s": 130, "warmup_s": 110,
            "zones": [{"name": "a", "pods": 10}],
            "proxies": {"a": 1},
            "streams": {"count": 1000, "mean_rate": 25, "rate_dist": "zipf:0.8",
                        "client_zones": {"a": 1.0}, "ramp_s": 100}
        }))
    }

    fn all() -> Vec<String> {
        POLICIES.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    /// Streams arrive at 10/s, slowly against τ = 5 s, so placements see measured rates.
    fn rate_aware_core_beats_count_balancing_on_zipf_and_lpt_is_near_the_bound() {
        let (mut ours, mut theirs) = (0.0, 0.0);
        for seed in 1..=5 {
            let r = run(&one_zone(seed), &all(), 1, false).unwrap();
            let m = |p: &str| r["policies"][p]["median_max_over_mean"].as_f64().unwrap();
            ours += m("streamlb") / 5.0;
            theirs += m("least_request") / 5.0;
            let (bound, lpt) = (
                r["oracle"]["median_lower_bound"].as_f64().unwrap(),
                r["oracle"]["median_lpt"].as_f64().unwrap(),
            );
            assert!(bound >= 1.0 && lpt >= bound - 1e-9 && lpt <= bound * 4.0 / 3.0);
        }
        println!("max/mean, mean of 5 seeds: streamlb {ours:.3}, least_request {theirs:.3}");
        assert!(
            ours + 0.1 <= theirs,
            "streamlb {ours:.3} vs least_request {theirs:.3}"
        );
    }

    #[test]
    fn zone_policies_keep_traffic_local_and_the_minimum_matches_the_formula() {
        let sc = scenario(json!({
            "name": "z", "seed": 4, "duration_s": 130, "warmup_s": 110, "epsilon": 0.1,
            "zones": [{"name": "a", "pods": 4}, {"name": "b", "pods": 4}, {"name": "c", "pods": 4}],
            "proxies": {"a": 1, "b": 1, "c": 1},
            "streams": {"count": 1200, "mean_rate": 10, "rate_dist": "constant",
                        "client_zones": {"a": 0.5, "b": 0.3, "c": 0.2}, "ramp_s": 100}
        }));
        let r = run(&sc, &all(), 1, false).unwrap();
        let cross = |p: &str| r["policies"][p]["median_cross_zone"].as_f64().unwrap();
        // d = (0.5, 0.3, 0.2), c = 1/3 each: minimum 0.5 − 1.1/3.
        let min = r["oracle"]["median_min_cross_zone"].as_f64().unwrap();
        assert!((min - (0.5 - 1.1 / 3.0)).abs() < 1e-9, "{min}");
        // Equal proxies per zone and equal pods per zone: zone-aware stays local.
        assert!(cross("zone_aware") < 0.01);
        assert!(cross("round_robin") > 0.6);
        // With one load view over all proxies the core spills only about the excess.
        assert!(
            cross("streamlb_global_view") < min + 0.05,
            "{}",
            cross("streamlb_global_view")
        );
        // The pods' reports give each proxy most of that view.
        println!(
            "cross-zone: streamlb {:.3}, streamlb_local {:.3}, global view {:.3}, minimum {min:.3}",
            cross("streamlb"),
            cross("streamlb_local"),
            cross("streamlb_global_view")
        );
        assert!(cross("streamlb") < min + 0.05, "{}", cross("streamlb"));
        assert!(cross("streamlb") + 0.1 < cross("streamlb_local"));
    }

    #[test]
    fn a_pod_slowed_to_a_quarter_gets_a_quarter_share_with_the_fleet_view() {
        // Two proxies, equal pods of capacity 400 msgs/s; b-0 is slowed to 100 before any
        // stream arrives. Its utilisation is reported, so new streams avoid it.
        let sc = scenario(json!({
            "name": "slow", "seed": 3, "duration_s": 80, "warmup_s": 60,
            "zones": [{"name": "a", "pods": 4, "capacity": 400}],
            "proxies": {"a": 2},
            "streams": {"count": 400, "mean_rate": 2.5, "rate_dist": "constant",
                        "client_zones": {"a": 1.0}, "ramp_s": 50},
            "faults": [{"at_s": 0, "pod": "a-0", "action": "slow", "factor": 0.25}]
        }));
        let policies: Vec<String> = ["streamlb", "streamlb_local"].map(String::from).to_vec();
        let r = run(&sc, &policies, 1, false).unwrap();
        let m = |p: &str| r["policies"][p]["median_max_over_mean"].as_f64().unwrap();
        println!(
            "max/mean: streamlb {:.3}, streamlb_local {:.3}",
            m("streamlb"),
            m("streamlb_local")
        );
        // Utilisation max/mean: capacity-blind placement puts a quarter of the load on a pod of
        // 1/13 of the capacity (≈ 3.2); the fleet view brings it near 1.
        assert!(m("streamlb_local") > 2.5, "{}", m("streamlb_local"));
        assert!(m("streamlb") < 1.3, "{}", m("streamlb"));
    }

    #[test]
    fn zone_moves_bring_three_proxies_to_the_minimum_cross_zone_share() {
        // Three proxies, one per zone, demand 50/30/20 on equal zones, Zipf rates starting
        // within 10 s: rates are unknown while they arrive, so placement alone leaves streams
        // across zones that the zone rule would keep home (0.21 here against 0.13). Rebalancing
        // moves them (within the default budget) until only zone a's excess crosses.
        let sc = scenario(json!({
            "name": "settle", "seed": 8, "duration_s": 240, "warmup_s": 200, "epsilon": 0.1,
            "zones": [{"name": "a", "pods": 2, "capacity": 600, "orca": true},
                      {"name": "b", "pods": 2, "capacity": 600, "orca": true},
                      {"name": "c", "pods": 2, "capacity": 600, "orca": true}],
            "proxies": {"a": 1, "b": 1, "c": 1},
            "streams": {"count": 120, "mean_rate": 20, "rate_dist": "zipf:0.8",
                        "client_zones": {"a": 0.5, "b": 0.3, "c": 0.2}, "ramp_s": 10}
        }));
        let policies: Vec<String> = ["streamlb", "streamlb_rebalance"]
            .map(String::from)
            .to_vec();
        let r = run(&sc, &policies, 1, false).unwrap();
        let cross = |p: &str| r["policies"][p]["median_cross_zone"].as_f64().unwrap();
        let minimum = r["oracle"]["median_min_cross_zone"].as_f64().unwrap();
        println!(
            "cross-zone: streamlb {:.3}, streamlb_rebalance {:.3}, minimum {minimum:.3}",
            cross("streamlb"),
            cross("streamlb_rebalance")
        );
        assert!(
            cross("streamlb") > cross("streamlb_rebalance") + 0.05,
            "placement alone leaves streams to move: {}",
            cross("streamlb")
        );
        assert!(
            cross("streamlb_rebalance") <= minimum + 0.03,
            "{}",
            cross("streamlb_rebalance")
        );
    }
}
