#!/usr/bin/env python3
"""Filter settings side by side at fleet scale (`lab sim`, the scenarios' simulator sections),
over seeds: each variant's settings merged over the scenario's `streamlb` section (`lab sim
--filter-override`).

    bench/sweep_config.py --variant 'probe64={"probe":{"max_per_tick":64}}' \\
        --variant 'probe256={"probe":{"max_per_tick":256}}' \\
        [--scenarios zipf08-3zones,pareto-fleet] [--scenario-dir bench/scenarios] [--seeds 0,1,2]
        [--jobs 2] [--out FILE.md]

Seed k runs the scenario's seed + k. Prints (and writes with --out) one Markdown table: per
scenario, policy and variant the medians over seeds of pod max/mean over LPT and of the
cross-zone share, with each seed's value, and the scenario's minimum crossing.
"""

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = "zipf08-3zones,pareto-fleet,fleet-unequal-zones,fleet-degraded-pod"


def fmt(values: list[float]) -> str:
    """The median in bold, then each seed's value."""
    return f"**{statistics.median(values):.3f}** ({', '.join(f'{x:.3f}' for x in values)})"


def variant(text: str) -> tuple[str, dict]:
    name, sep, settings = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        value = json.loads(settings)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{name}: not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{name}: settings must be a JSON object")
    return name, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default=str(REPO / "target/release/lab"))
    ap.add_argument("--variant", type=variant, action="append", required=True)
    ap.add_argument("--scenarios", default=SCENARIOS)
    ap.add_argument("--scenario-dir", type=Path, default=REPO / "bench/scenarios")
    ap.add_argument("--policies", default="streamlb,streamlb_rebalance")
    ap.add_argument("--seeds", default="0,1,2", help="offsets added to each scenario's seed")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for sc_name in args.scenarios.split(","):
        path = args.scenario_dir / f"{sc_name}.json"
        seed = json.loads(path.read_text()).get("seed", 1)
        runs += [(sc_name, vname, settings, path, seed + k) for vname, settings in args.variant for k in seeds]

    def run(r):
        sc_name, _, settings, path, seed = r
        out = subprocess.run([args.lab, "sim", "--scenario", str(path), "--policies", args.policies,
                              "--seed", str(seed), "--filter-override", json.dumps(settings)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"lab sim failed on {sc_name} (seed {seed}): {out.stderr.strip()[-2000:]}")
        return r, json.loads(out.stdout)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(run, runs))
    rows = {}
    minimum = {}
    for (sc_name, vname, _, _, _), d in results:
        lpt = d["oracle"]["median_lpt"]
        minimum.setdefault(sc_name, []).append(d["oracle"]["median_min_cross_zone"])
        for pname, p in d["policies"].items():
            cell = rows.setdefault((sc_name, pname, vname), ([], []))
            cell[0].append(p["median_max_over_mean"] / lpt if lpt > 0 else float("nan"))
            cell[1].append(p["median_cross_zone"])
    lines = [f"Seeds: scenario seed + {args.seeds}; settings: " +
             "; ".join(f"`{n}` = `{json.dumps(s)}`" for n, s in args.variant), "",
             "| scenario (min. crossing) | policy | variant | max/mean ÷ LPT | cross-zone |",
             "|---|---|---|---|---|"]
    for (sc_name, pname, vname), (mm, cz) in rows.items():
        lines.append(f"| {sc_name} ({statistics.median(minimum[sc_name]):.3f}) | {pname} | {vname} "
                     f"| {fmt(mm)} | {fmt(cz)} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
