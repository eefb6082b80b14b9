//! `lab sim` gives the same figures for the same scenario and seed, run after run, so builds can
//! be compared by them. Two processes: a hasher seeded per process (hashbrown's default, which
//! the stream table used) orders iteration alike within one process but not across two.

use std::path::PathBuf;
use std::process::Command;

const SCENARIO: &str = r#"{
  "name": "reproducible", "seed": 25, "duration_s": 60, "warmup_s": 40, "epsilon": 0.1,
  "zones": [{"name": "a", "pods": 34, "capacity": 3000, "orca": true},
            {"name": "b", "pods": 33, "capacity": 3000, "orca": true},
            {"name": "c", "pods": 33, "capacity": 3000, "orca": true}],
  "proxies": {"a": 4, "b": 3, "c": 3},
  "streams": {"count": 10000, "mean_rate": 20, "rate_dist": "pareto:2.5",
              "client_zones": {"a": 0.5, "b": 0.3, "c": 0.2}, "ramp_s": 50}
}"#;

fn sim(scenario: &PathBuf) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args([
            "sim",
            "--policies",
            "streamlb,streamlb_rebalance",
            "--scenario",
        ])
        .arg(scenario)
        .output()
        .expect("lab runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    report["wall_s"] = serde_json::Value::Null; // the one figure that is time, not simulation
    report
}

#[test]
fn two_runs_of_one_scenario_give_the_same_report() {
    let scenario =
        std::env::temp_dir().join(format!("lab-reproducible-{}.json", std::process::id()));
    std::fs::write(&scenario, SCENARIO).expect("write scenario");
    let (first, second) = (sim(&scenario), sim(&scenario));
    let _ = std::fs::remove_file(&scenario);
    let series = &first["policies"]["streamlb_rebalance"]["series"];
    assert!(series.as_array().is_some_and(|s| s.len() > 10), "{series}");
    assert!(first == second, "two runs differ");
}
