//! `lab plan`: what the real-Envoy bench (`bench/run.py`) takes from a scenario, computed by
//! the code `lab sim` uses: the streams per client zone, the filter configuration (deep merge)
//! and the oracle figures for the streams the devices really ran.

use crate::scenario::{merge, Scenario};
use crate::sim::{online_greedy, oracle, World};
use anyhow::Context;
use serde_json::{json, Value};

/// `{"clusters": ["pods"]}`, then `defaults`, then the scenario's `streamlb` section, then each
/// of `overrides` in order, merged deep (objects merge, everything else is replaced).
pub fn filter_config(sc: &Scenario, defaults: &Value, overrides: &[Value]) -> Value {
    let mut config = json!({"clusters": ["pods"]});
    for layer in std::iter::once(defaults)
        .chain(std::iter::once(&sc.streamlb))
        .chain(overrides)
    {
        if !layer.is_null() {
            merge(&mut config, layer);
        }
    }
    config
}

/// Lower bound, LPT max/mean and cross-zone minimum for `streams` ((client zone, rate) each)
/// on the scenario's pods, all up, each with its zone's capacity. A stream's demand counts in
/// its client zone, as the bench measures cross-zone traffic.
pub fn oracle_for(sc: &Scenario, streams: &[(String, f64)]) -> anyhow::Result<Value> {
    let zones: Vec<String> = sc.zones.iter().map(|z| z.name.clone()).collect();
    let pods = sc.pod_names();
    let dev_proxy = streams
        .iter()
        .map(|(zone, _)| {
            zones.iter().position(|z| z == zone).with_context(|| {
                format!("stream in zone {zone:?}, which the scenario does not have")
            })
        })
        .collect::<anyhow::Result<Vec<usize>>>()?;
    let world = World {
        pod_name: pods.iter().map(|(name, _)| name.clone()).collect(),
        pod_zone: pods.iter().map(|(_, z)| *z).collect(),
        pod_capacity: pods.iter().map(|(_, z)| sc.zones[*z].capacity).collect(),
        pod_up: vec![true; pods.len()],
        // One stand-in proxy per zone: proxy i is zone i.
        proxy_zone: (0..zones.len()).collect(),
        dev_rate: streams.iter().map(|(_, rate)| *rate).collect(),
        dev_proxy,
        zones,
    };
    let (lower_bound, lpt, min_cross_zone) = oracle(&world, &vec![true; streams.len()], sc.epsilon);
    let arrivals = arrival_order(sc, &world.dev_proxy);
    let mean_rate = sc.streams.mean_rate;
    let any_pod = online_greedy(&world, &arrivals, mean_rate, None);
    let local_first = online_greedy(&world, &arrivals, mean_rate, Some(sc.epsilon));
    Ok(json!({
        "lower_bound": lower_bound, "lpt": lpt, "min_cross_zone": min_cross_zone,
        "online_any_pod": any_pod.max_over_mean,
        "online_local_first": local_first.max_over_mean,
        "online_local_first_cross_zone": local_first.cross_zone,
    }))
}

/// Streams (indices into `zone_of`, each stream's client zone) in the order the devices open
/// them: each zone's k-th of n at `ramp_s · k / n` (one `lab devices` per zone), ties in zone order.
fn arrival_order(sc: &Scenario, zone_of: &[usize]) -> Vec<usize> {
    let zones = zone_of.iter().max().map_or(0, |&z| z + 1);
    let mut per_zone = vec![0usize; zones];
    for &z in zone_of {
        per_zone[z] += 1;
    }
    let mut seen = vec![0usize; zones];
    let mut timed: Vec<(f64, usize)> = zone_of
        .iter()
        .enumerate()
        .map(|(d, &z)| {
            let t = sc.streams.ramp_s * seen[z] as f64 / per_zone[z] as f64;
            seen[z] += 1;
            (t, d)
        })
        .collect();
    timed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    timed.into_iter().map(|(_, d)| d).collect()
}

/// The plan as JSON: `streams_per_zone` ([zone, count] in client-zone order), `filter_config`
/// and, with `streams`, `oracle`.
pub fn plan(
    sc: &Scenario,
    defaults: &Value,
    overrides: &[Value],
    streams: Option<&[(String, f64)]>,
) -> anyhow::Result<Value> {
    let mut out = json!({
        "streams_per_zone": sc.streams_per_zone(),
        "filter_config": filter_config(sc, defaults, overrides),
    });
    if let Some(streams) = streams {
        out["oracle"] = oracle_for(sc, streams)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(capacities: [f64; 2]) -> Scenario {
        serde_json::from_value(json!({
            "name": "t", "duration_s": 10, "warmup_s": 1,
            "zones": [{"name": "a", "pods": 2, "capacity": capacities[0]},
                      {"name": "b", "pods": 1, "capacity": capacities[1]}],
            "proxies": {"a": 1, "b": 1},
            "streams": {"count": 7, "mean_rate": 10, "client_zones": {"a": 0.5, "b": 0.5}},
            "streamlb": {"tick_ms": 250, "rebalance": {"mode": "off", "tolerance": 0.2}}
        }))
        .unwrap()
    }

    #[test]
    fn filter_config_layers_defaults_scenario_then_overrides() {
        let sc = scenario([100.0, 100.0]);
        let config = filter_config(
            &sc,
            &json!({"tick_ms": 1000, "mode": "enforce"}),
            &[
                json!({"rebalance": {"mode": "on"}}),
                json!({"mode": "shadow"}),
            ],
        );
        assert_eq!(
            config,
            json!({"clusters": ["pods"], "tick_ms": 250, "mode": "shadow",
                   "rebalance": {"mode": "on", "tolerance": 0.2}})
        );
    }

    #[test]
    fn streams_split_by_client_zone_shares() {
        let sc = scenario([100.0, 100.0]);
        let plan = plan(&sc, &Value::Null, &[], None).unwrap();
        assert_eq!(plan["streams_per_zone"], json!([["a", 4], ["b", 3]]));
        assert!(plan.get("oracle").is_none());
    }

    #[test]
    fn oracle_uses_each_zones_capacity() {
        // Pods a-0, a-1 (capacity 100) and b-0 (capacity 200); Σc = 400, Σr = 400, mean 1.
        let sc = scenario([100.0, 200.0]);
        let streams: Vec<(String, f64)> = [("a", 200.0), ("a", 100.0), ("b", 100.0)]
            .iter()
            .map(|(z, r)| (z.to_string(), *r))
            .collect();
        let oracle = oracle_for(&sc, &streams).unwrap();
        // Bound: max(1, 200 / 200 · 400 / 400) = 1. LPT (least utilised pod first, ties to
        // the first): 200 → a-0 (util 2), 100 → a-1 (1), 100 → b-0 (0.5): max/mean 2.
        assert_eq!(oracle["lower_bound"], json!(1.0));
        assert_eq!(oracle["lpt"], json!(2.0));
        // Demand a: 300/400 = 0.75 > (1 + 0.1) · 200/400 = 0.55: 0.2 must cross zones.
        let min_cross = oracle["min_cross_zone"].as_f64().unwrap();
        assert!((min_cross - 0.2).abs() < 1e-9, "{min_cross}");
        // With every pod at the largest capacity (200) they differ: the same placement gives
        // max util 1 against mean 400/600.
        let flat = oracle_for(&scenario([200.0, 200.0]), &streams).unwrap();
        assert_eq!(flat["lpt"], json!(1.5));
    }

    #[test]
    fn online_references_place_in_arrival_order_blind_to_the_new_rate() {
        // Pods a-0, a-1, b-0, all capacity 100; ε 0.1; the scenario's mean rate is 10.
        let mut sc = scenario([100.0, 100.0]);
        sc.epsilon = 0.1;
        let streams: Vec<(String, f64)> = [("a", 10.0), ("a", 10.0), ("a", 30.0), ("a", 10.0)]
            .iter()
            .map(|(z, r)| (z.to_string(), *r))
            .collect();
        let oracle = oracle_for(&sc, &streams).unwrap();
        let close = |key: &str, want: f64| {
            let got = oracle[key].as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{key}: {got}, want {want}");
        };
        // Mean load 60/300 = 0.2. Any pod: 10 → a-0, 10 → a-1, 30 → b-0, 10 → a-0: max 0.3.
        close("online_any_pod", 1.5);
        // Local first, each new stream counted at 10: the first would put zone a (2/3 of the
        // capacity) at 0.05 > 1.1 × 10/300, so it goes to b-0; the second stays (a-0); so does
        // the 30 (a-1; counted at 10: 20/200 ≤ 1.1 × 30/300 — at its real rate it would
        // spill); the last would put a at 50/200 > 1.1 × 60/300: b-0. Loads 10, 30, 20.
        close("online_local_first", 1.5);
        close("online_local_first_cross_zone", 20.0 / 60.0);
    }

    #[test]
    fn arrivals_follow_each_zones_ramp() {
        // Zone a's 3 devices open at 0, 3, 6 s; zone b's one at 0 (ties in zone order).
        let mut sc = scenario([100.0, 100.0]);
        sc.streams.ramp_s = 9.0;
        assert_eq!(arrival_order(&sc, &[0, 0, 0, 1]), vec![0, 3, 1, 2]);
    }

    #[test]
    fn oracle_rejects_a_zone_the_scenario_does_not_have() {
        let sc = scenario([100.0, 100.0]);
        let err = oracle_for(&sc, &[("z".to_string(), 1.0)]).unwrap_err();
        assert!(format!("{err:#}").contains("\"z\""), "{err:#}");
    }
}
