#!/usr/bin/env python3
"""Real-Envoy benchmark: every policy on the same scenario and seed, one after the other.

    bench/run.py [--scenario bench/scenarios/zipf08-3zones.json] [--policies a,b,c]
                 [--out-dir bench/results] [--no-pin] [--no-sim]

Per policy: fresh `lab pods` (zones, capacity, ORCA as the scenario says), one Envoy per proxy
in the scenario (node zone = its zone, --concurrency 1), one `lab devices` per client zone aimed
at that zone's Envoy (seed = scenario seed + zone index, like `lab sim`). Ground truth comes from
the pods' GET /stats, sampled every second. Writes bench/results/<scenario>-<date>.json and .html.

Process placement (2 cores): this driver, the pods and the devices are pinned to CPU 0, every
Envoy to CPU 1 (`taskset`), so Envoy's CPU figures are not disturbed by the load generator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import report  # noqa: E402

ALL_POLICIES = [
    "direct",
    "streamlb",
    "streamlb_rebalance",
    "streamlb_shadow",
    "round_robin",
    "least_request",
    "zone_aware",
    "load_aware_locality",
    "client_side_weighted_round_robin",
]
DEFAULT_POLICIES = ALL_POLICIES
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_S = 4.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def streams_per_zone(sc: dict) -> list[tuple[str, int]]:
    """Same split as lab/src/scenario.rs: rounded shares in key order, rest to the last zone."""
    zones = sorted(sc["streams"]["client_zones"].items())
    total = sum(s for _, s in zones)
    count = sc["streams"]["count"]
    left = count
    out = []
    for i, (z, share) in enumerate(zones):
        k = left if i + 1 == len(zones) else min(left, round(count * share / total))
        left -= k
        out.append((z, k))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pin(pid: int, cpu: int) -> None:
    subprocess.run(["taskset", "-a", "-pc", str(cpu), str(pid)], check=True, capture_output=True)


def lb_policy(name: str):
    """Envoy LoadBalancingPolicy for the ORCA peers (dict), or a harness lb name."""
    if name == "load_aware_locality":
        return {
            "policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.load_aware_locality",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.load_aware_locality.v3.LoadAwareLocality",
                    "endpoint_picking_policy": {"policies": [{"typed_extension_config": {
                        "name": "envoy.load_balancing_policies.round_robin",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"},
                    }}]},
                },
            }}]
        }
    if name == "client_side_weighted_round_robin":
        return {
            "policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.client_side_weighted_round_robin",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin",
                    "blackout_period": "1s",
                    "weight_update_period": "1s",
                    "metric_names_for_computing_utilization": ["application_utilization"],
                },
            }}]
        }
    return name


def envoy_setups(policy: str, sc: dict) -> dict:
    """harness.Envoy kwargs for a policy (None for direct)."""
    filter_cfg = deep_merge({"clusters": ["pods"], "tick_ms": 1000}, sc.get("streamlb") or {})
    if policy == "streamlb":
        return {"filter_config": filter_cfg, "lb": "override_host"}
    if policy == "streamlb_rebalance":
        # Rebalancing on; the scenario's streams are bidi, whose responses start at once, so
        # moving them needs allow_reset (clients see INTERNAL, reconnect and resend).
        rebalance = {"rebalance": {"mode": "on", "allow_reset": True}}
        return {"filter_config": deep_merge(filter_cfg, rebalance), "lb": "override_host"}
    if policy == "streamlb_shadow":
        return {"filter_config": deep_merge(filter_cfg, {"mode": "shadow"}), "lb": "override_host"}
    if policy in ("round_robin", "least_request", "zone_aware"):
        return {"filter_config": None, "lb": policy}
    if policy in ("load_aware_locality", "client_side_weighted_round_robin"):
        return {"filter_config": None, "lb": lb_policy(policy)}
    raise ValueError(f"unknown policy {policy}")


def wait_for_discovery(envoy: harness.Envoy, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if envoy.stats("streamlb_discovery_polls_ok").get("wasmcustom.streamlb_discovery_polls_ok_total", 0) > 0:
            time.sleep(1.2)
            return
        time.sleep(0.2)
    raise RuntimeError("streamlb discovery never succeeded")


def run_policy(policy: str, sc: dict, workdir: Path, pin_cpus: bool) -> dict:
    zones = {z["name"]: z["pods"] for z in sc["zones"]}
    capacity = max(float(z.get("capacity", 0)) for z in sc["zones"])
    orca = any(z.get("orca") for z in sc["zones"])
    st = sc["streams"]
    duration, warmup = float(sc["duration_s"]), float(sc["warmup_s"])
    pw = workdir / policy
    pw.mkdir(parents=True, exist_ok=True)
    result: dict = {"policy": policy}
    with harness.Pods(zones=zones, capacity=capacity, orca=orca, workdir=pw) as pods:
        envoys: list[tuple[str, harness.Envoy]] = []
        try:
            if policy != "direct":
                kw = envoy_setups(policy, sc)
                for zone, count in sorted(sc["proxies"].items()):
                    for i in range(count):
                        ew = pw / f"envoy-{zone}-{i}"
                        ew.mkdir(exist_ok=True)
                        envoy = harness.Envoy(pods, node_zone=zone, concurrency=1, workdir=ew, log_level="warn", **kw)
                        envoy.start_process()
                        envoys.append((zone, envoy))
                        if pin_cpus:
                            pin(envoy.proc.pid, 1)
                if kw.get("filter_config"):
                    for _, envoy in envoys:
                        wait_for_discovery(envoy)
            # Idle Envoy CPU (timers, health checks, stats, wasm ticks) before any traffic.
            idle_cores = None
            if envoys:
                c0 = sum(cpu_seconds(e.proc.pid) for _, e in envoys)
                time.sleep(IDLE_S)
                idle_cores = (sum(cpu_seconds(e.proc.pid) for _, e in envoys) - c0) / IDLE_S
            # Devices: one process per client zone (direct: one per pod of that zone).
            devs = []
            for zi, (zone, n) in enumerate(streams_per_zone(sc)):
                if n == 0:
                    continue
                # Devices reconnect (with backoff, resending what was not acknowledged) like
                # real ones: a rebalanced or failed stream comes back.
                common = dict(kind=st.get("kind", "bidi"), seed=int(sc["seed"]) + zi, reconnect=True,
                              extra_args=["--workers", "1", "--ramp", str(st.get("ramp_s", 0)),
                                          "--payload", str(st.get("payload", 64)), "--device-prefix", f"{zone}dev"])
                if policy == "direct":
                    local = [p for p in pods.pods if p["zone"] == zone]
                    for k, p in enumerate(local):
                        share = n // len(local) + (1 if k < n % len(local) else 0)
                        if share == 0:
                            continue
                        c = dict(common)
                        c["extra_args"] = common["extra_args"][:-1] + [f"{zone}dev{k}-"]
                        devs.append((zone, harness.start_devices(p["address"], share, st["mean_rate"], st["rate_dist"],
                                                                 duration, workdir=mkdir(pw / f"dev-{zone}-{k}"), **c)))
                else:
                    targets = [e for z, e in envoys if z == zone] or [e for _, e in envoys]
                    devs.append((zone, harness.start_devices(targets[0].listen_addr, n, st["mean_rate"],
                                                             st["rate_dist"], duration, workdir=mkdir(pw / f"dev-{zone}"), **common)))
            t0 = time.monotonic()
            samples = []
            cpu_at: dict[str, tuple[float, dict]] = {}
            while time.monotonic() - t0 < duration + 0.5:
                now = time.monotonic() - t0
                stats = pods.pod_stats()
                samples.append({"t": now, "messages": {n: s["messages"] for n, s in stats.items()},
                                "up": {n: s["up"] for n, s in stats.items()}})
                for key, at in (("start", warmup), ("end", duration)):
                    if key not in cpu_at and now >= at:
                        cpu_at[key] = (now, {f"{z}-{i}": cpu_seconds(e.proc.pid) for i, (z, e) in enumerate(envoys)})
                if len(samples) % 10 == 0:
                    total = sum(samples[-1]["messages"].values()) - sum(samples[-2]["messages"].values())
                    log(f"  {policy}: t={now:4.0f}s/{duration:.0f}, {total:.0f} msgs in the last second")
                time.sleep(max(0.0, 1.0 - ((time.monotonic() - t0) % 1.0)))
            rss = {f"{z}-{i}": rss_kb(e.proc.pid) for i, (z, e) in enumerate(envoys)}
            reports = []
            for zone, d in devs:
                rep = d.wait(timeout=duration + 60)
                rep["client_zone"] = zone
                reports.append(rep)
                d.close()
        finally:
            for _, e in envoys:
                e.close()
    result.update(summarise(sc, samples, cpu_at, rss, reports, pods_meta=pods.pods))
    if result.get("envoy_cpu") and idle_cores is not None:
        cpu = result["envoy_cpu"]
        cpu["idle_cores"] = idle_cores
        busy = cpu["seconds"] - idle_cores * cpu["window_s"]
        cpu["us_per_message_above_idle"] = busy / cpu["messages"] * 1e6 if cpu["messages"] > 0 else None
    return result


def combine(rs: list[dict]) -> dict:
    """One entry per policy: the first good round's series, medians of the figures over rounds."""
    ok = [r for r in rs if not r.get("error")]
    if not ok:
        return rs[0]
    out = dict(ok[0])
    for key in ("median_max_over_mean", "median_p99_over_mean", "cross_zone", "messages_per_s"):
        out[key] = median([r[key] for r in ok if r.get(key) is not None])
    out["latency_ms"] = {q: median([r["latency_ms"][q] for r in ok if r["latency_ms"].get(q) is not None])
                         for q in ok[0]["latency_ms"]}
    if ok[0].get("envoy_cpu"):
        out["envoy_cpu"] = dict(ok[0]["envoy_cpu"])
        for key in ("us_per_message", "us_per_message_above_idle", "idle_cores", "cores"):
            out["envoy_cpu"][key] = median([r["envoy_cpu"][key] for r in ok
                                            if r.get("envoy_cpu") and r["envoy_cpu"].get(key) is not None])
    out["totals"] = {k: sum(r["totals"].get(k, 0) for r in ok) for k in ok[0]["totals"]}
    out["rounds"] = [{"seed": r.get("seed"), "error": r.get("error"),
                      "max_over_mean": r.get("median_max_over_mean"), "p99_over_mean": r.get("median_p99_over_mean"),
                      "cross_zone": r.get("cross_zone"), "latency_p99_ms": (r.get("latency_ms") or {}).get("p99"),
                      "us_per_message": (r.get("envoy_cpu") or {}).get("us_per_message")} for r in rs]
    return out


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def summarise(sc: dict, samples: list, cpu_at: dict, rss: dict, reports: list, pods_meta: list) -> dict:
    warmup, duration = float(sc["warmup_s"]), float(sc["duration_s"])
    names = [p["name"] for p in pods_meta]
    zone_of = {p["name"]: p["zone"] for p in pods_meta}
    cap = {z["name"]: float(z.get("capacity") or 1.0) for z in sc["zones"]}
    bins = []
    for a, b in zip(samples, samples[1:]):
        dt_ = b["t"] - a["t"]
        if dt_ <= 0:
            continue
        rates = {n: (b["messages"][n] - a["messages"][n]) / dt_ for n in names}
        bins.append({"t": round(b["t"], 2), "rates": rates, "up": b["up"]})
    window = [x for x in bins if x["t"] > warmup]
    mm, pm = [], []
    for x in window:
        up = [n for n in names if x["up"].get(n, True)]
        utils = sorted(x["rates"][n] / cap[zone_of[n]] for n in up)
        mean = sum(x["rates"][n] for n in up) / sum(cap[zone_of[n]] for n in up)
        if mean <= 0:
            continue
        x["max_over_mean"] = utils[-1] / mean
        x["p99_over_mean"] = percentile(utils, 0.99) / mean
        mm.append(x["max_over_mean"])
        pm.append(x["p99_over_mean"])
    msgs_window = 0.0
    if window:
        first = next(s for s in samples if s["t"] >= window[0]["t"] - 1.5)
        last = samples[-1]
        msgs_window = sum(last["messages"][n] - first["messages"][n] for n in names)
    # Messages in the CPU window (between the two CPU snapshots).
    cpu = None
    if "start" in cpu_at and "end" in cpu_at:
        (ts, c0), (te, c1) = cpu_at["start"], cpu_at["end"]
        def msgs_at(t):
            s = min(samples, key=lambda s: abs(s["t"] - t))
            return sum(s["messages"].values())
        m = msgs_at(te) - msgs_at(ts)
        cpu_s = sum(c1[k] - c0[k] for k in c0)
        cpu = {"seconds": cpu_s, "messages": m, "window_s": te - ts,
               "us_per_message": (cpu_s / m * 1e6) if m > 0 and c0 else None,
               "cores": cpu_s / (te - ts) if te > ts else None}
    # Cross-zone share and per-stream truth from the devices.
    acked_all = acked_cross = 0
    lat = []
    totals = {"sent": 0, "acked": 0, "failed": 0, "lost": 0, "unacked": 0}
    statuses: dict[str, int] = {}
    stream_rates = []
    for rep in reports:
        for s in rep["streams"]:
            stream_rates.append((rep["client_zone"], s["rate"]))
            if s.get("zone"):
                acked_all += s["acked"]
                if s["zone"] != rep["client_zone"]:
                    acked_cross += s["acked"]
        for k in totals:
            totals[k] += rep["totals"].get(k, 0)
        for k, v in rep["totals"].get("statuses", {}).items():
            statuses[k] = statuses.get(k, 0) + v
        lat.append({"zone": rep["client_zone"], **rep["latency_ms"]})
    lat_count = sum(l["count"] for l in lat) or 1
    latency = {q: max((l[q] for l in lat if l["count"]), default=None) for q in ("p50", "p99", "p999", "max")}
    latency["weighted_p50"] = sum(l["p50"] * l["count"] for l in lat) / lat_count
    return {
        "bins": [{"t": x["t"], "rates": x["rates"], "max_over_mean": x.get("max_over_mean"),
                  "p99_over_mean": x.get("p99_over_mean")} for x in bins],
        "median_max_over_mean": median(mm),
        "median_p99_over_mean": median(pm),
        "messages_per_s": msgs_window / max(1e-9, (window[-1]["t"] - window[0]["t"] + 1)) if window else 0,
        "cross_zone": acked_cross / acked_all if acked_all else None,
        "latency_ms": latency,
        "latency_by_zone": lat,
        "totals": totals,
        "statuses": statuses,
        "envoy_cpu": cpu,
        "envoy_rss_kb": rss,
        "stream_rates": stream_rates,
    }


def percentile(sorted_v: list[float], q: float) -> float:
    if not sorted_v:
        return 0.0
    k = max(1, min(len(sorted_v), int(-(-q * len(sorted_v) // 1)))) - 1
    return sorted_v[k]


def median(v: list[float]):
    v = sorted(v)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def oracle(sc: dict, stream_rates: list[tuple[str, float]]) -> dict:
    """Lower bound, LPT and cross-zone minimum for the streams the devices actually ran."""
    pods = [(z["name"], float(z.get("capacity") or 1.0)) for z in sc["zones"] for _ in range(z["pods"])]
    caps = [c for _, c in pods]
    rates = sorted((r for _, r in stream_rates), reverse=True)
    sum_r, sum_c = sum(rates), sum(caps)
    bound = max(1.0, rates[0] / max(caps) * sum_c / sum_r) if rates else 1.0
    load = [0.0] * len(pods)
    for r in rates:
        j = min(range(len(pods)), key=lambda j: (load[j] / caps[j], j))
        load[j] += r
    lpt = max(load[j] / caps[j] for j in range(len(pods))) / (sum_r / sum_c)
    eps = float(sc.get("epsilon", 0.1))
    demand: dict[str, float] = {}
    for z, r in stream_rates:
        demand[z] = demand.get(z, 0.0) + r
    min_cross = 0.0
    for z in {p[0] for p in pods}:
        dz = demand.get(z, 0.0) / sum_r
        cz = sum(c for pz, c in pods if pz == z) / sum_c
        min_cross += max(0.0, dz - (1 + eps) * cz)
    return {"lower_bound": bound, "lpt": lpt, "min_cross_zone": min_cross}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default=str(REPO / "bench" / "scenarios" / "zipf08-3zones.json"))
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--no-pin", action="store_true", help="do not taskset Envoy / load generator")
    ap.add_argument("--no-sim", action="store_true", help="skip `lab sim` on the same scenario")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (round k: seed + 1000·k), policies interleaved within a round; medians reported")
    args = ap.parse_args()
    sc = json.loads(Path(args.scenario).read_text())
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in ALL_POLICIES:
            ap.error(f"unknown policy {p!r}; known: {', '.join(ALL_POLICIES)}")
    pin_cpus = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin_cpus:
        pin(os.getpid(), 0)  # children (pods, devices) inherit CPU 0; Envoys are moved to CPU 1
    started = dt.datetime.now(dt.timezone.utc)
    log(f"scenario {sc['name']}: {len(policies)} policies × {sc['duration_s']} s "
        f"(warm-up {sc['warmup_s']} s); pinning {'on' if pin_cpus else 'off'}")
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    oracles = []
    workdir = Path(tempfile.mkdtemp(prefix="streamlb-bench-"))
    try:
        for k in range(args.repeat):
            sck = dict(sc, seed=int(sc["seed"]) + 1000 * k)
            round_rates = None
            for i, p in enumerate(policies):
                log(f"[round {k + 1}/{args.repeat}, seed {sck['seed']}] [{i + 1}/{len(policies)}] {p}")
                try:
                    r = run_policy(p, sck, workdir, pin_cpus)
                    r["seed"] = sck["seed"]
                    runs[p].append(r)
                    if p != "direct" and round_rates is None:
                        round_rates = r["stream_rates"]
                    c = r.get("envoy_cpu") or {}
                    log(f"  {p}: max/mean {fmt(r['median_max_over_mean'])}, p99/mean {fmt(r['median_p99_over_mean'])}, "
                        f"cross-zone {fmt(r['cross_zone'])}, p99 {fmt(r['latency_ms']['p99'])} ms, "
                        f"CPU {fmt(c.get('us_per_message'))} µs/msg, errors {r['totals']['failed']}")
                except Exception as e:  # one policy failing must not lose the others
                    log(f"  {p}: FAILED: {e}")
                    runs[p].append({"policy": p, "error": str(e)[-2000:], "seed": sck["seed"]})
            if round_rates:
                oracles.append(oracle(sck, round_rates))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {p: combine(rs) for p, rs in runs.items()}
    out = {
        "kind": "envoy",
        "scenario": sc,
        "started": started.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname()),
                    "placement": ("driver, lab pods and lab devices on CPU 0, every Envoy on CPU 1 (taskset -a)"
                                  if pin_cpus else "not pinned")},
        "rounds": args.repeat,
        "oracle": {k: median([o[k] for o in oracles]) for k in oracles[0]} if oracles else None,
        "oracle_rounds": oracles,
        "policies": results,
    }
    if not args.no_sim:
        lab = harness.lab_bin()
        log("lab sim on the same scenario (fleet scale from its `sim` section)")
        try:
            proc = subprocess.run([str(lab), "sim", "--scenario", args.scenario], capture_output=True, text=True,
                                  timeout=600, check=True)
            out["sim"] = json.loads(proc.stdout)
        except Exception as e:
            log(f"  lab sim failed: {e}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{sc['name']}-{started.strftime('%Y%m%d-%H%M')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    (out_dir / f"{stem}.html").write_text(report.html(out))
    print(report.markdown_table(out))
    log(f"wrote {out_dir / (stem + '.json')} and .html")
    return 0


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
