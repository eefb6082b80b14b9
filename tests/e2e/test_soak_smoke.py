"""The soak machinery (tools/soak.py, `make soak`) in a ~45 s run: three Envoys, one fault of each
kind (pod kill, admin path down, reload, zone down, hot restart), every invariant but the RSS
slope (too short) checked, and the report written."""

from __future__ import annotations

import json
import subprocess
import sys

import streamlb_testkit as harness

SOAK = harness.REPO / "tools" / "soak.py"


def test_soak_smoke_runs_every_fault_and_holds_the_invariants(tmp_path):
    argv = [sys.executable, str(SOAK), "--smoke", "--minutes", "0.7", "--sample-s", "2", "--settle-s", "4",
            "--cohorts", "1", "--streams", "4", "--mean-life", "15", "--min-life", "8", "--max-life", "20",
            "--drain-s", "10", "--out-dir", str(tmp_path)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert (tmp_path / "soak.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    print("\n" + run.stdout[-2500:])

    failed = [i for i in result["invariants"] if not i["pass"]]
    assert not failed, failed
    assert run.returncode == 0, run.stderr[-3000:]
    names = {i["name"] for i in result["invariants"]}
    assert names == {"no-wasm-failure", "ledger", "placement", "counters"}

    faults = {f["kind"]: f for f in result["faults"]}
    assert set(faults) == {"pod-kill", "admin-down", "reload", "zone-down", "hot-restart"}
    assert all(f["ran"] and not f["error"] for f in faults.values()), faults
    # The admin path down: every Envoy's discovery polls failed, and were counted.
    assert all(n >= 2 for n in faults["admin-down"]["detail"]["polls_failed"].values()), faults["admin-down"]
    # A reload loads the new configuration in every Envoy (one per VM: 2 workers + main).
    assert all(n >= 3 for n in faults["reload"]["detail"]["config_loads"].values()), faults["reload"]
    assert faults["hot-restart"]["detail"]["epoch"] == 1
    assert result["placement"]["named"] > 0
    # The devices saw the faults (streams ended by the pod kills) and lost nothing.
    assert result["devices"]["counts"]["failed"] > 0
    assert result["devices"]["counts"]["lost"] == 0
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html and "FAIL" not in html
