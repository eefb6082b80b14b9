"""bench/run.py on real processes: what it takes from `lab plan`, and that a policy failing
mid-run stops every process it started. bench/vm_cost.mjs on the built .wasm files under V8."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import streamlb_testkit as kit

SCENARIO = {
    "name": "bench-test",
    "seed": 5,
    "duration_s": 6,
    "warmup_s": 2,
    "zones": [{"name": "a", "pods": 1, "capacity": 100, "orca": True},
              {"name": "b", "pods": 2, "capacity": 300}],
    "proxies": {"a": 1},
    "streams": {"count": 5, "mean_rate": 5, "rate_dist": "constant", "client_zones": {"a": 0.6, "b": 0.4}},
    "streamlb": {"rebalance": {"tolerance": 0.3}},
}


@pytest.fixture
def bench():
    """bench/run.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_run", kit.REPO / "bench" / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scenario_file(tmp_path):
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(SCENARIO))
    return path


def test_stream_split_filter_config_and_oracle_come_from_lab(bench, scenario_file):
    assert bench.lab_plan(scenario_file)["streams_per_zone"] == [["a", 3], ["b", 2]]
    setup = bench.envoy_setup("streamlb_rebalance", scenario_file)
    assert setup["filter_config"] == {"clusters": ["pods"], "tick_ms": 1000,
                                      "rebalance": {"tolerance": 0.3, "mode": "on", "allow_reset": True}}
    assert bench.envoy_setup("streamlb_shadow", scenario_file)["filter_config"]["mode"] == "shadow"
    # Pods: a-0 (100), b-0 and b-1 (300 each); Σc = 700. Three streams of 100 from zone a.
    oracle = bench.lab_plan(scenario_file, stream_rates=[["a", 100], ["a", 100], ["a", 100]])["oracle"]
    assert oracle["lower_bound"] == pytest.approx(1.0)
    # LPT, least utilised first: a-0 → 1.0, b-0 → 1/3, b-1 → 1/3; mean 300/700.
    assert oracle["lpt"] == pytest.approx(1.0 / (300 / 700))
    # Zone a demands everything, holds 1/7 of the capacity: 1 − 1.1/7 must cross.
    assert oracle["min_cross_zone"] == pytest.approx(1 - 1.1 / 7)
    # Online, blind to each new rate (counted at the mean, 5): any pod fills a-0, b-0, b-1 in
    # turn; local first spills the first (zone a would exceed 1.1 × the fleet), keeps the second
    # on a-0 and spills the third to b-1. Both end like LPT, with 2 of 3 streams crossing.
    assert oracle["online_any_pod"] == pytest.approx(1.0 / (300 / 700))
    assert oracle["online_local_first"] == pytest.approx(1.0 / (300 / 700))
    assert oracle["online_local_first_cross_zone"] == pytest.approx(2 / 3)
    with pytest.raises(RuntimeError, match="lab plan failed"):
        bench.lab_plan(scenario_file, stream_rates=[["z", 1]])


def test_a_failing_policy_stops_every_process_it_started(bench, scenario_file, tmp_path, monkeypatch):
    running_at_failure: list[kit.Proc] = []

    def fail_mid_run(*args, **kwargs):
        running_at_failure.extend(p for p in kit.live_processes() if p.running())
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(bench, "measure", fail_mid_run)
    with pytest.raises(RuntimeError, match="measurement failed"):
        bench.run_policy("streamlb", SCENARIO, scenario_file, tmp_path, pin_cpus=False)
    # Pods, the zone-a Envoy and one devices process per client zone were up ...
    assert sorted(p.name for p in running_at_failure) == ["devices", "devices", "envoy", "pods"]
    # ... each zone's pods with that zone's capacity ...
    pods_argv = next(p.argv for p in running_at_failure if p.name == "pods")
    assert pods_argv[pods_argv.index("--zone-capacity") + 1] == "a=100.0,b=300.0"
    # ... and none is left.
    assert kit.live_processes() == []
    assert not any(p.running() for p in running_at_failure)


def vm_cost(tmp_path, *extra):
    """bench/vm_cost.mjs --quick on the built streamlb and floor .wasm files: (exit code, stderr,
    its JSON)."""
    out = tmp_path / "vm.json"
    proc = subprocess.run(
        ["node", str(kit.REPO / "bench" / "vm_cost.mjs"), "--quick", "--target-dir", str(kit.target_dir()),
         "--json", str(out), *extra],
        capture_output=True, text=True, timeout=120, cwd=kit.REPO)
    return proc.returncode, proc.stderr, json.loads(out.read_text())


def test_vm_cost_runs_streamlb_and_the_floor_on_v8_through_the_same_host_calls(tmp_path):
    """The V8 harness drives the real .wasm files: streamlb names a pod on every call (both pods
    over the run), and the floor that stands for streamlb's host calls makes the same ones."""
    code, err, result = vm_cost(tmp_path)
    assert code == 0, err
    by_module = {m["module"]: m for m in result["modules"]}
    assert set(by_module) == {"floor", "floor_bodies", "floor_streamlb_calls", "streamlb"}
    assert by_module["streamlb"]["host_calls_per_call"] == by_module["floor_streamlb_calls"]["host_calls_per_call"] == 10
    one_call = by_module["streamlb"]["host_calls_of_one_call"]
    assert one_call == by_module["floor_streamlb_calls"]["host_calls_of_one_call"]
    assert one_call.count("replace_header_map_value") == 1 and one_call[0] == "get_header_map_pairs"
    assert by_module["floor_bodies"]["host_calls_of_one_call"] == ["get_buffer_bytes"] * 2
    assert sorted(result["named"]["streamlb"]) == ["127.0.0.1:40001", "127.0.0.1:40002"]
    assert all(len(m["us_per_call"]) == result["rounds"] and min(m["us_per_call"]) > 0 for m in result["modules"])
    # A streamlb that does not steer (shadow mode: no endpoint header set) fails both checks.
    code, err, result = vm_cost(tmp_path, "--streamlb-config", '{"mode": "shadow"}')
    assert code == 1
    assert "named a pod on 0 of" in err and "floor_streamlb_calls makes [" in err
    shadow = next(m for m in result["modules"] if m["module"] == "streamlb")
    assert "replace_header_map_value" not in shadow["host_calls_of_one_call"]


SWEEP_SCENARIO = {
    "name": "sweep-test",
    "seed": 3,
    "duration_s": 20,
    "warmup_s": 10,
    "epsilon": 0.1,
    "zones": [{"name": z, "pods": 2, "capacity": 600, "orca": True} for z in "abc"],
    "proxies": {"a": 1, "b": 1, "c": 1},
    "streams": {"count": 300, "mean_rate": 10, "rate_dist": "constant", "kind": "bidi",
                "client_zones": {"a": 0.6, "b": 0.2, "c": 0.2}, "ramp_s": 5, "mean_lifetime_s": 0},
    "streamlb": {},
}


def sweep(tmp_path, *args):
    (tmp_path / "sweep-test.json").write_text(json.dumps(SWEEP_SCENARIO))
    argv = [sys.executable, str(kit.REPO / "bench" / "sweep_config.py"),
            "--lab", str(kit.lab_bin()), "--scenario-dir", str(tmp_path), "--scenarios", "sweep-test",
            "--policies", "streamlb", "--seeds", "0,1", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_sweep_config_runs_each_variant_with_its_settings_over_seeds(tmp_path):
    """Each variant's settings reach the simulated filter: a zone rule that keeps its zone up to
    twice the mean keeps zone a's streams home once rates are known (only the first streams, of
    unknown rate, spread); one that spills at the mean sends zone a's excess out."""
    out = tmp_path / "sweep.md"
    run = sweep(tmp_path, "--variant", 'stay={"zone":{"spill_threshold":1}}',
                "--variant", 'spill={"zone":{"spill_threshold":0}}', "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| sweep-test")]
    assert [(r[2].strip(), r[3].strip()) for r in rows] == [("streamlb", "stay"), ("streamlb", "spill")]
    crossing = {r[3].strip(): [float(x) for x in r[5].split("(")[1].rstrip(") ").split(",")] for r in rows}
    assert all(len(v) == 2 for v in crossing.values())  # one per seed
    # Zone a has 0.6 of the load and a third of the capacity: at least 0.6 − 1/3 leaves it.
    assert min(crossing["spill"]) > 0.6 - 1 / 3
    assert max(crossing["stay"]) + 0.2 < min(crossing["spill"])
    bad = sweep(tmp_path, "--variant", "broken={not json")
    assert bad.returncode == 2 and "broken: not JSON" in bad.stderr
