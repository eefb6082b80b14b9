#!/usr/bin/env python3
"""How fast rebalancing recovers from a pod slowed to a quarter in steady state, over seeds and
fault times (`lab sim`, scenario fleet-degraded-pod's simulator section, one fault at a time).

    bench/sweep_degraded.py [--lab target/release/lab ...] [--seeds 41,42,43] [--at 100,115,130,145,160]

Prints per lab binary (e.g. two builds) the seconds until pod max/mean is back within 10 % of
its level before the fault (`reconverge`), per run and their median; 99 = not back in 60 s.
"""

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lab", nargs="+", default=[str(REPO / "target/release/lab")])
    ap.add_argument("--seeds", default="41,42,43")
    ap.add_argument("--at", default="100,115,130,145,160", help="fault times (s)")
    args = ap.parse_args()
    base = json.loads((REPO / "bench/scenarios/fleet-degraded-pod.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "scenario.json"
        for lab in args.lab:
            seconds = []
            for seed in map(int, args.seeds.split(",")):
                for at in map(float, args.at.split(",")):
                    sc = json.loads(json.dumps(base))
                    sc["seed"] = seed
                    sc["sim"]["faults"] = [{"at_s": at, "pod": "a-0", "action": "slow", "factor": 0.25}]
                    sc["sim"]["duration_s"] = at + 60
                    scenario.write_text(json.dumps(sc))
                    out = subprocess.run([lab, "sim", "--scenario", str(scenario), "--policies",
                                          "streamlb_rebalance"], capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout)["policies"]["streamlb_rebalance"]
                    seconds.append(r["reconverge"][0]["seconds"] or 99)
            print(f"{lab}: {seconds} median {statistics.median(seconds)} s")


if __name__ == "__main__":
    main()
