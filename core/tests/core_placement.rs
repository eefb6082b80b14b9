//! Placement quality of the routing core, in simulated time (no Envoy): skewed rates, zones.
//! Runs natively and, with `--target wasm32-unknown-unknown`, under wasm-bindgen-test in Node.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod common;

use common::snapshot;
use streamlb_core::config::Config;
use streamlb_core::rng::Rng;
use streamlb_core::router::{Router, Source};
use streamlb_core::streams::Direction;
use streamlb_core::Nanos;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SEC: Nanos = 1_000_000_000;

fn zipf_rates(n: usize, s: f64, mean: f64, rng: &mut Rng) -> Vec<f64> {
    let mut rates: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let scale = mean * n as f64 / rates.iter().sum::<f64>();
    rates.iter_mut().for_each(|r| *r *= scale);
    for i in (1..n).rev() {
        rates.swap(i, rng.below(i + 1));
    }
    rates
}

/// One simulated proxy: a router plus the true rates of the streams it placed.
struct Proxy {
    router: Router,
    zone: String,
    /// (stream id, true rate, fractional message carry)
    streams: Vec<(u64, f64, f64)>,
}

impl Proxy {
    /// Feed one second of true traffic and tick.
    fn second(&mut self, now: Nanos) {
        for (id, rate, carry) in &mut self.streams {
            *carry += *rate;
            let whole = carry.floor();
            *carry -= whole;
            self.router
                .on_data(*id, Direction::Upstream, whole as u64, whole as u64 * 64);
        }
        self.router.tick(now);
    }
}

/// Places `rates` (stream i from proxy `origin[i]`) one by one, `per_second` per simulated
/// second, proxies sharing their loads each second like Envoy workers through shared data.
/// Returns per-endpoint true load and the cross-zone share of traffic.
fn simulate(
    config: &str,
    pods: &[(String, String)],
    proxy_zones: &[&str],
    rates: &[f64],
    origin: &[usize],
    per_second: usize,
) -> (Vec<f64>, f64) {
    let cfg = Config::from_json(config.as_bytes()).unwrap();
    let mut proxies: Vec<Proxy> = proxy_zones
        .iter()
        .enumerate()
        .map(|(i, z)| {
            let mut router = Router::new(cfg.clone(), z, 100 + i as u64);
            router.apply_snapshot(0, &snapshot(pods));
            Proxy {
                router,
                zone: z.to_string(),
                streams: Vec::new(),
            }
        })
        .collect();
    let mut landed = vec![0.0; pods.len()];
    let mut cross = 0.0;
    let mut now = SEC;
    for (i, (&rate, &p)) in rates.iter().zip(origin).enumerate() {
        let proxy = &mut proxies[p];
        let d = proxy
            .router
            .place(now, i as u64, "telemetry", "pods")
            .unwrap();
        let chosen = d.primary.expect("an endpoint is named");
        let j = pods.iter().position(|(a, _)| *a == chosen).unwrap();
        proxy
            .router
            .on_upstream(now, i as u64, &chosen, || pods[j].1.clone());
        proxy.streams.push((i as u64, rate, 0.0));
        landed[j] += rate;
        if pods[j].1 != proxy.zone {
            cross += rate;
        }
        if (i + 1) % per_second == 0 {
            now += SEC;
            for p in proxies.iter_mut() {
                p.router.apply_snapshot(now, &snapshot(pods)); // discovery keeps polling
                p.second(now);
            }
            let loads: Vec<Vec<(String, String, f64, u32)>> = proxies
                .iter()
                .map(|p| {
                    p.router
                        .local_loads()
                        .into_iter()
                        .map(|(c, a, l, n)| (c.to_string(), a.to_string(), l, n))
                        .collect()
                })
                .collect();
            for (k, p) in proxies.iter_mut().enumerate() {
                let others = loads
                    .iter()
                    .enumerate()
                    .filter(|(o, _)| *o != k)
                    .flat_map(|(_, v)| v.iter())
                    .map(|(c, a, l, n)| (c.as_str(), a.as_str(), *l, *n));
                p.router.set_remote_loads(now, others);
            }
        }
    }
    (landed, cross / rates.iter().sum::<f64>())
}

fn max_over_mean(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    loads.iter().cloned().fold(0.0, f64::max) / mean
}

/// Envoy `least_request` with equal weights: P2C on this proxy's active stream counts.
fn count_balanced(rates: &[f64], pods: usize, rng: &mut Rng) -> Vec<f64> {
    let mut counts = vec![0usize; pods];
    let mut loads = vec![0.0; pods];
    for &r in rates {
        let a = rng.below(pods);
        let b = (a + 1 + rng.below(pods - 1)) % pods;
        let j = if counts[a] <= counts[b] { a } else { b };
        counts[j] += 1;
        loads[j] += r;
    }
    loads
}

#[test]
fn skewed_rates_land_far_better_than_stream_count_balancing() {
    let pods: Vec<(String, String)> = (0..10)
        .map(|i| (format!("10.0.0.{i}:8080"), String::new()))
        .collect();
    let mut streamlb = Vec::new();
    let mut by_count = Vec::new();
    for seed in 1..=10u64 {
        let mut rng = Rng::new(seed);
        let rates = zipf_rates(1000, 0.8, 25.0, &mut rng);
        let (landed, _) = simulate(
            r#"{"clusters":["pods"]}"#,
            &pods,
            &[""],
            &rates,
            &vec![0; 1000],
            10,
        );
        streamlb.push(max_over_mean(&landed));
        by_count.push(max_over_mean(&count_balanced(&rates, 10, &mut rng)));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ours, theirs) = (mean(&streamlb), mean(&by_count));
    println!(
        "Zipf(0.8), 1,000 streams, 10 pods, 10 seeds: max/mean streamlb {ours:.3} {streamlb:.3?}"
    );
    println!(
        "                                            max/mean by count  {theirs:.3} {by_count:.3?}"
    );
    assert!(ours <= 1.25, "streamlb max/mean {ours:.3}");
    assert!(
        theirs - ours >= 0.2,
        "streamlb {ours:.3} vs count-based {theirs:.3}"
    );
}

#[test]
fn zone_demand_50_30_20_crosses_zones_only_for_the_excess() {
    let zones = ["a", "b", "c"];
    let pods: Vec<(String, String)> = zones
        .iter()
        .flat_map(|z| (0..2).map(move |i| (format!("{z}-{i}:8080"), z.to_string())))
        .collect();
    let mut rng = Rng::new(42);
    let n = 1200;
    let rates: Vec<f64> = (0..n).map(|_| 20.0 + 10.0 * rng.next_f64()).collect();
    let origin: Vec<usize> = (0..n)
        .map(|_| match rng.next_f64() {
            x if x < 0.5 => 0,
            x if x < 0.8 => 1,
            _ => 2,
        })
        .collect();
    let threshold = 0.1;
    let config = format!(r#"{{"clusters":["pods"],"zone":{{"spill_threshold":{threshold}}}}}"#);
    let (landed, cross) = simulate(&config, &pods, &zones, &rates, &origin, 12);
    // Demand shares as generated; capacity shares 1/3 each; pods sized to the mean load, so
    // "at most (1 + θ) × capacity" is the bound the zone policy promises.
    let total: f64 = rates.iter().sum();
    let demand: Vec<f64> = (0..3)
        .map(|z| {
            rates
                .iter()
                .zip(&origin)
                .filter(|(_, &o)| o == z)
                .map(|(r, _)| r)
                .sum::<f64>()
                / total
        })
        .collect();
    let minimum: f64 = demand
        .iter()
        .map(|d| (d - (1.0 + threshold) / 3.0).max(0.0))
        .sum();
    let capacity = total / pods.len() as f64;
    let worst = landed.iter().cloned().fold(0.0, f64::max) / capacity;
    println!("demand {demand:.3?}; cross-zone share {cross:.4}, minimum {minimum:.4}; worst pod {worst:.3}× capacity");
    assert!(
        (cross - minimum).abs() <= 0.02,
        "cross {cross:.4} vs minimum {minimum:.4}"
    );
    // Placement sees estimates, the check sees true rates: allow 1 % for young streams' rates.
    assert!(
        worst <= (1.0 + threshold) * 1.01,
        "a pod runs at {worst:.3}× its capacity"
    );
}

/// A reconnect storm: the streams of `rates` open with no rate known (or, `remembered`, each
/// with its own rate from the rate memory), in `waves` equal groups half a second past each
/// tick (one wave: all at the same instant), through one proxy in zone `zone` whose `workers`
/// workers each take the connections that reach them (at random) and see each other's
/// placements on the tick. Returns per-endpoint true load.
#[allow(clippy::too_many_arguments)]
fn storm(
    config: &str,
    pods: &[(String, String)],
    zone: &str,
    rates: &[f64],
    remembered: bool,
    workers: usize,
    waves: usize,
    rng: &mut Rng,
) -> Vec<f64> {
    let cfg = Config::from_json(config.as_bytes()).unwrap();
    let mut routers: Vec<Router> = (0..workers)
        .map(|k| {
            let mut r = Router::new(cfg.clone(), zone, rng.next_u64() ^ k as u64);
            r.apply_snapshot(0, &snapshot(pods));
            r.set_peers(workers - 1);
            r.tick(0);
            r
        })
        .collect();
    let mut landed = vec![0.0; pods.len()];
    // (worker, stream id, rate, placed at)
    let mut open: Vec<(usize, u64, f64, Nanos)> = Vec::new();
    let per_wave = rates.len().div_ceil(waves);
    for (w, wave) in rates.chunks(per_wave).enumerate() {
        let at = w as Nanos * SEC + SEC / 2;
        for &rate in wave {
            let k = rng.below(workers);
            let id = open.len() as u64;
            let router = &mut routers[k];
            let source = remembered.then_some(Source {
                key: id + 1,
                rate: Some(rate),
                to: None,
            });
            let d = router
                .place_from(at, id, "telemetry", "pods", source)
                .unwrap();
            let chosen = d.primary.expect("an endpoint is named");
            let j = pods.iter().position(|(a, _)| *a == chosen).unwrap();
            router.on_upstream(at, id, &chosen, || pods[j].1.clone());
            landed[j] += rate;
            open.push((k, id, rate, at));
        }
        // The tick: messages since the last tick (or the stream's start), then loads exchanged.
        let now = (w as Nanos + 1) * SEC;
        for &(k, id, rate, placed) in &open {
            let since = placed.max(now - SEC);
            let n = (rate * (now - since) as f64 / 1e9).round() as u64;
            routers[k].on_data(id, Direction::Upstream, n, n * 64);
        }
        for r in routers.iter_mut() {
            r.tick(now);
        }
        let loads: Vec<Vec<(String, String, f64, u32)>> = routers
            .iter()
            .map(|r| {
                r.local_loads()
                    .into_iter()
                    .map(|(c, a, l, n)| (c.to_string(), a.to_string(), l, n))
                    .collect()
            })
            .collect();
        for (k, r) in routers.iter_mut().enumerate() {
            let others = loads
                .iter()
                .enumerate()
                .filter(|(o, _)| *o != k)
                .flat_map(|(_, v)| v.iter())
                .map(|(c, a, l, n)| (c.as_str(), a.as_str(), *l, *n));
            r.set_remote_loads(now, others);
        }
    }
    landed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

/// The pods of `make run`: two per zone a, b, c.
fn three_zones() -> Vec<(String, String)> {
    ["a", "b", "c"]
        .iter()
        .flat_map(|z| (0..2).map(move |i| (format!("{z}-{i}:8080"), z.to_string())))
        .collect()
}

#[test]
fn a_storm_of_unknown_rates_lands_no_worse_than_least_request() {
    // make run's storm: 60 streams, Zipf(0.8), one proxy in zone a, six pods in three zones.
    let pods = three_zones();
    let seeds = 1000u64;
    for (waves, workers) in [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (2, 8)] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for seed in 1..=seeds {
            let mut rng = Rng::new(seed);
            let rates = zipf_rates(60, 0.8, 20.0, &mut rng);
            let landed = storm(
                r#"{"clusters":["pods"]}"#,
                &pods,
                "a",
                &rates,
                false,
                workers,
                waves,
                &mut rng,
            );
            ours.push(max_over_mean(&landed));
            theirs.push(max_over_mean(&count_balanced(&rates, pods.len(), &mut rng)));
        }
        let (ours, theirs) = (median(ours), median(theirs));
        println!(
            "storm in {waves} wave(s), {workers} worker(s), {seeds} seeds: median max/mean streamlb {ours:.3}, least_request {theirs:.3}"
        );
        if waves == 1 {
            // All at one instant nothing is known: any placement is blind, and the medians agree
            // within sampling error (the difference of two 1,000-seed medians has an SD of
            // ≈ 0.012; over 20,000 seeds: 1.620, 1.629 and 1.634 vs 1.626).
            assert!(
                ours <= theirs + 0.025,
                "{workers} workers: streamlb {ours:.3} vs least_request {theirs:.3}"
            );
        } else {
            // Half of it a second later: the first tick's measurements place the rest.
            assert!(
                ours <= theirs,
                "{workers} workers: streamlb {ours:.3} vs least_request {theirs:.3}"
            );
        }
    }
}

#[test]
fn a_storm_of_unknown_rates_is_spread_by_capacity_whatever_the_workers() {
    // Equal rates: the share of streams is the share of load. Before the storm fix the local
    // zone took 40 % of it with one worker and 57 % with eight (each worker's own slack).
    let pods = three_zones();
    let rates = vec![20.0; 60];
    for workers in [1, 2, 8, 16] {
        let (mut local, mut worst, mut worst_p2c) = (Vec::new(), Vec::new(), Vec::new());
        for seed in 1..=200u64 {
            let mut rng = Rng::new(seed);
            let landed = storm(
                r#"{"clusters":["pods"]}"#,
                &pods,
                "a",
                &rates,
                false,
                workers,
                1,
                &mut rng,
            );
            local.push((landed[0] + landed[1]) / 1200.0);
            worst.push(max_over_mean(&landed));
            worst_p2c.push(max_over_mean(&count_balanced(&rates, pods.len(), &mut rng)));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (local, worst, worst_p2c) = (median(local), mean(&worst), mean(&worst_p2c));
        println!(
            "equal rates, {workers} worker(s): local share {local:.3}; mean max/mean streamlb {worst:.3}, least_request {worst_p2c:.3}"
        );
        assert!(
            (local - 1.0 / 3.0).abs() <= 0.02,
            "{workers} workers: local share {local:.3}"
        );
        if workers == 1 {
            assert_eq!(
                worst, 1.0,
                "one worker sees every placement: exactly 10 streams a pod"
            );
        }
        if workers <= 2 {
            assert!(
                worst <= worst_p2c,
                "{workers} workers: {worst:.3} vs {worst_p2c:.3}"
            );
        }
    }
}

/// Longest processing time first: max/mean of the near-optimal static placement.
fn lpt(rates: &[f64], pods: usize) -> f64 {
    let mut sorted = rates.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut loads: Vec<f64> = vec![0.0; pods];
    for r in sorted {
        let k = (0..pods)
            .min_by(|&a, &b| loads[a].total_cmp(&loads[b]))
            .unwrap_or(0);
        loads[k] += r;
    }
    max_over_mean(&loads)
}

#[test]
fn a_storm_of_remembered_rates_lands_like_greedy_in_arrival_order() {
    // test_rebalance's storm: 60 devices, Zipf(0.8), every rate remembered, six pods of one
    // zone, all reconnecting at one instant, in random order. One worker places each on the
    // least loaded pod as it arrives (online list scheduling: the big streams that come last
    // land on full pods). Several workers see each other's placements only on the tick, each
    // balancing its own part (300 seeds, median [p90]: 1 worker 1.27 [1.58], 2 workers 1.45
    // [1.65], 4 workers 1.52 [1.82]; LPT, which sorts the rates first, 1.01). Sizing the other
    // workers' guessed burst by the mean placed instead of the stream's own rate made no
    // difference (1.46 with 2 workers): only sharing placements within the burst would.
    let pods: Vec<(String, String)> = (0..6)
        .map(|i| (format!("a-{i}:8080"), "a".to_string()))
        .collect();
    let seeds = 300u64;
    let mut medians = Vec::new();
    for workers in [1, 2, 4] {
        let (mut ours, mut best) = (Vec::new(), Vec::new());
        for seed in 1..=seeds {
            let mut rng = Rng::new(seed);
            let rates = zipf_rates(60, 0.8, 10.0, &mut rng);
            let landed = storm(
                r#"{"clusters":["pods"]}"#,
                &pods,
                "a",
                &rates,
                true,
                workers,
                1,
                &mut rng,
            );
            ours.push(max_over_mean(&landed));
            best.push(lpt(&rates, pods.len()));
        }
        ours.sort_by(f64::total_cmp);
        let p90 = ours[ours.len() * 9 / 10];
        let (ours, best) = (median(ours), median(best));
        println!(
            "remembered storm, {workers} worker(s), {seeds} seeds: median max/mean {ours:.3} (p90 {p90:.3}), LPT {best:.3}"
        );
        medians.push(ours);
    }
    assert!(medians[0] <= 1.30, "one worker: {medians:?}");
    assert!(
        medians.iter().all(|m| *m <= medians[0] + 0.3),
        "more workers: {medians:?}"
    );
}
