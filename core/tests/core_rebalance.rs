//! The rebalancer's churn budget under a pathological load: rates that flip every few seconds.
//! Simulated time over the real routing core; moved streams reconnect at once with their
//! remembered rates (as devices do after a rebalance).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::HashMap;

use common::snapshot;

use streamlb_core::config::Config;
use streamlb_core::penalty::Outcome;
use streamlb_core::rebalance::Budget;
use streamlb_core::rng::Rng;
use streamlb_core::router::{Router, Source};
use streamlb_core::streams::Direction;
use streamlb_core::Nanos;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const MS: Nanos = 1_000_000;
const SEC: Nanos = 1_000 * MS;

#[test]
fn flipping_rates_never_exceed_the_churn_budget() {
    let cfg = Config::from_json(
        br#"{"clusters":["pods"],"load":{"tau_ms":1000},
             "rebalance":{"mode":"on","min_age_ms":2000,"max_moves_per_tick":3,
                          "max_moves_per_minute":20,"max_share_per_minute":0.25}}"#,
    )
    .unwrap();
    let mut router = Router::new(cfg, "", 9);
    let pods: Vec<(String, String)> = (0..6)
        .map(|i| (format!("10.0.0.{i}:80"), String::new()))
        .collect();
    let snapshot = snapshot(&pods);
    let mut rng = Rng::new(5);
    // (device key, current stream id, rate in phase A, rate in phase B)
    let mut devices: Vec<(u64, u64, f64, f64)> = (0..60)
        .map(|d| {
            // A few heavy devices per phase, different ones in each phase.
            let mut heavy = |p: f64| if rng.next_f64() < p { 120.0 } else { 2.0 };
            (d, d, heavy(0.15), heavy(0.15))
        })
        .collect();
    let mut memory: HashMap<u64, f64> = HashMap::new();
    let mut next_id = 1000;
    let mut now = 0;
    router.apply_snapshot(now, &snapshot);
    for &(key, id, ..) in &devices {
        router
            .place_from(
                now,
                id,
                "t",
                "pods",
                Some(Source {
                    key,
                    rate: None,
                    to: None,
                }),
            )
            .unwrap();
    }
    // The proxy's budget, as the filter keeps it in shared data.
    let mut budget = Budget::default();
    let mut move_times: Vec<Nanos> = Vec::new();
    let mut skipped_budget = 0;
    let mut moves_per_device: HashMap<u64, Vec<Nanos>> = HashMap::new();
    for step in 1..=240u64 {
        now = step * 500 * MS;
        let phase_b = (now / (3 * SEC)) % 2 == 1; // the rates flip every 3 s
        for &(_, id, a, b) in &devices {
            let rate = if phase_b { b } else { a };
            router.on_data(id, Direction::Upstream, (rate / 2.0) as u64, 0);
        }
        if step % 4 == 0 {
            router.apply_snapshot(now, &snapshot);
        }
        router.tick(now);
        for u in router.take_rate_updates() {
            memory.insert(u.key, u.rate);
        }
        let allowance = budget.allowance(
            &router.config().rebalance,
            now,
            500 * MS,
            router.proxy_streams(),
        );
        let plan = router.plan_moves(now, allowance);
        budget.spend(now, plan.moves.len());
        router.commit_moves(now, &plan);
        skipped_budget += plan.skipped_budget.iter().sum::<u64>();
        for m in plan.moves {
            // The stream ends; its device reconnects at once with its remembered rate.
            let device = devices.iter_mut().find(|d| d.1 == m.stream).unwrap();
            router.on_end(now, m.stream, Outcome::Cancelled);
            next_id += 1;
            device.1 = next_id;
            let (key, remembered) = (device.0, memory.get(&device.0).copied());
            router
                .place_from(
                    now,
                    next_id,
                    "t",
                    "pods",
                    Some(Source {
                        key,
                        rate: remembered,
                        to: None,
                    }),
                )
                .unwrap();
            move_times.push(now);
            moves_per_device.entry(key).or_default().push(now);
        }
        for u in router.take_rate_updates() {
            memory.insert(u.key, u.rate);
        }
    }
    let windows: Vec<usize> = (0..=60)
        .map(|start| {
            let from = start * SEC;
            move_times
                .iter()
                .filter(|&&t| t >= from && t < from + 60 * SEC)
                .count()
        })
        .collect();
    let worst = windows.iter().copied().max().unwrap();
    println!(
        "moves: {} in 120 s ({skipped_budget} more wanted but over budget); worst 60 s window {worst}; most moves of one device {}",
        move_times.len(),
        moves_per_device.values().map(Vec::len).max().unwrap_or(0)
    );
    assert!(
        !move_times.is_empty(),
        "flipping load should make the rebalancer act"
    );
    assert!(
        skipped_budget > 0,
        "the load must want more moves than the budget allows"
    );
    assert!(worst <= 20, "per-minute budget exceeded: {worst}");
    assert!(
        worst <= 15,
        "share budget (25 % of 60 streams) exceeded: {worst}"
    );
    let mut per_tick: HashMap<Nanos, usize> = HashMap::new();
    for t in &move_times {
        *per_tick.entry(*t).or_default() += 1;
    }
    assert!(
        per_tick.values().all(|&n| n <= 3),
        "per-tick budget exceeded"
    );
    // min_age: a device is never moved again within 2 s of its last move.
    for times in moves_per_device.values() {
        assert!(
            times.windows(2).all(|w| w[1] - w[0] >= 2 * SEC),
            "{times:?}"
        );
    }
}
