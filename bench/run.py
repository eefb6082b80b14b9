#!/usr/bin/env python3
"""Real-Envoy benchmark: every policy on the same scenario and seed, one after the other.

    bench/run.py [--scenario bench/scenarios/zipf08-3zones.json] [--policies a,b,c]
                 [--out-dir bench/results] [--no-pin] [--no-sim] [--repeat N]
                 [--variant 'streamlb_x={"tick_ms": 250}'] [--variant-wasm streamlb_x=old.wasm]

Per policy: fresh `lab pods` (zones, each zone's capacity, ORCA as the scenario says), one
Envoy per proxy in the scenario (node zone = its zone, --concurrency 1), one `lab devices` per
client zone aimed at that zone's Envoy (seed = scenario seed + zone index, like `lab sim`).
Ground truth comes from the pods' GET /stats, sampled every second. The stream split, the filter
configuration and the oracle come from `lab plan` (the code `lab sim` uses). A failing policy is
logged, every process it started is stopped, and the next one runs. Writes
bench/results/<scenario>-<date>.json and .html.

Process placement (2 cores): this driver, the pods and the devices are pinned to CPU 0, every
Envoy to CPU 1 (`taskset`), so Envoy's CPU figures are not disturbed by the load generator.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import streamlb_testkit as kit

REPO = kit.REPO
ALL_POLICIES = [
    "direct",
    "streamlb",
    "streamlb_local",
    "streamlb_rebalance",
    "streamlb_shadow",
    "floor",
    "floor_bodies",
    "round_robin",
    "least_request",
    "zone_aware",
    "load_aware_locality",
    "client_side_weighted_round_robin",
]
# The floor policies are for the cost benchmark (bench/cost.py); ask for them by name.
DEFAULT_POLICIES = [p for p in ALL_POLICIES if not p.startswith("floor")]
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_S = 4.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lab_plan(scenario_file: Path, defaults: dict | None = None, overrides: tuple[dict, ...] = (),
             stream_rates: list | None = None) -> dict:
    """`lab plan`: streams per client zone, the filter config (deep merge of `defaults`, the
    scenario's `streamlb` section and `overrides`) and, for `stream_rates` ([zone, rate] per
    stream), the oracle. One implementation with `lab sim`."""
    argv = [str(kit.require_lab()), "plan", "--scenario", str(scenario_file)]
    if defaults is not None:
        argv += ["--filter-defaults", json.dumps(defaults)]
    for override in overrides:
        argv += ["--filter-override", json.dumps(override)]
    with tempfile.TemporaryDirectory(prefix="streamlb-plan-") as tmp:
        if stream_rates is not None:
            rates = Path(tmp) / "stream-rates.json"
            rates.write_text(json.dumps(stream_rates))
            argv += ["--stream-rates", str(rates)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"lab plan failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


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


# Filter config of the streamlb policies: `lab plan` merges FILTER_DEFAULTS, the scenario's
# `streamlb` section, then the policy's overrides.
FILTER_DEFAULTS = {"tick_ms": 1000}
STREAMLB_OVERRIDES: dict[str, tuple[dict, ...]] = {
    "streamlb": (),
    # Today's behaviour before the fleet view: each Envoy sees only its own streams.
    "streamlb_local": ({"probe": {"enabled": False}},),
    # Rebalancing on; the scenario's streams are bidi, whose responses start at once, so moving
    # them needs allow_reset (clients see INTERNAL, reconnect and resend).
    "streamlb_rebalance": ({"rebalance": {"mode": "on", "allow_reset": True}},),
    "streamlb_shadow": ({"mode": "shadow"},),
}
# Envoy load balancing of the peers: a kit lb name, or a LoadBalancingPolicy for the ORCA peers.
PEER_LB = {
    "round_robin": "round_robin",
    "least_request": "least_request",
    "zone_aware": "zone_aware",
    "load_aware_locality": kit.lb_policy(
        "load_aware_locality", "LoadAwareLocality",
        endpoint_picking_policy=kit.lb_policy("round_robin", "RoundRobin"),
    ),
    "client_side_weighted_round_robin": kit.lb_policy(
        "client_side_weighted_round_robin", "ClientSideWeightedRoundRobin",
        blackout_period="1s", weight_update_period="1s",
        metric_names_for_computing_utilization=["application_utilization"],
    ),
}
DISCOVERY_STAT = "wasmcustom.streamlb_discovery_polls_ok_total"
# The proxy-wasm floor (bench/floor): a no-op Rust filter, and the same reading every body chunk.
# Envoy's placement is the cluster's fallback (least_request), as with no filter.
# floor_calls: the floor making as many host calls per unary call as streamlb does
# (`a_unary_call_makes_few_host_calls` in src/filter/tests): a body read each way, the rest header reads.
# floor_<kind>_100: 100 host calls of one kind per request, to measure what one costs.
FLOOR_CONFIG = {"floor": {}, "floor_bodies": {"read_bodies": True}, "floor_calls": {"header_reads": 16, "read_bodies": True},
                "floor_streamlb_calls": {"streamlb_calls": True, "read_bodies": True},
                **{f"floor_streamlb_calls_no_{call}": {"streamlb_calls": True, "read_bodies": True, "skip": call}
                   for call in ("set_header", "histogram")},
                "floor_streamlb_calls_upstream_address": {"streamlb_calls": True, "read_bodies": True,
                                                          "upstream_address": True},
                "floor_headers_100": {"header_reads": 100}, "floor_properties_100": {"property_reads": 100},
                "floor_shared_100": {"shared_reads": 100}, "floor_maps_100": {"map_reads": 100}}


def floor_wasm() -> Path:
    """The floor filter's .wasm (`make build-floor`)."""
    return kit.target_dir() / "wasm32-wasip1" / "release" / "streamlb_floor.wasm"


# Variants from the command line: streamlb with more overrides, or another build's .wasm.
VARIANT_WASM: dict[str, Path] = {}


def add_variant(spec: str, wasm: bool) -> str:
    """`NAME=JSON` (overrides on top of streamlb's) or, with `wasm`, `NAME=PATH`; returns NAME."""
    name, sep, value = spec.partition("=")
    if not sep or not name.startswith("streamlb_") or not value:
        raise ValueError(f"expected streamlb_NAME=VALUE, got {spec!r}")
    if wasm:
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{name}: no such file {path}")
        VARIANT_WASM[name] = path
        STREAMLB_OVERRIDES.setdefault(name, ())
    else:
        override = json.loads(value)
        if not isinstance(override, dict):
            raise ValueError(f"{name}: the overrides must be a JSON object")
        STREAMLB_OVERRIDES[name] = STREAMLB_OVERRIDES.get(name, ()) + (override,)
    if name not in ALL_POLICIES:
        ALL_POLICIES.append(name)
    return name


def envoy_setup(policy: str, scenario_file: Path) -> dict:
    """kit.Envoy kwargs for a policy other than direct."""
    if policy in STREAMLB_OVERRIDES:
        plan = lab_plan(scenario_file, FILTER_DEFAULTS, STREAMLB_OVERRIDES[policy])
        setup = {"filter_config": plan["filter_config"], "lb": "override_host"}
        if policy in VARIANT_WASM:
            setup["wasm"] = VARIANT_WASM[policy]
        return setup
    if policy in FLOOR_CONFIG:
        return {"filter_config": FLOOR_CONFIG[policy], "lb": "override_host", "wasm": floor_wasm()}
    if policy in PEER_LB:
        return {"filter_config": None, "lb": PEER_LB[policy]}
    raise ValueError(f"unknown policy {policy}")


def wait_for_discovery(envoy: kit.Envoy, timeout: float = 20.0) -> None:
    if not envoy.wait_for_counter(DISCOVERY_STAT, timeout=timeout):
        raise RuntimeError("streamlb discovery never succeeded")
    time.sleep(1.2)  # every worker reads the snapshot on its tick


def start_envoys(stack: contextlib.ExitStack, policy: str, sc: dict, scenario_file: Path, pods: kit.Pods,
                 pw: Path, pin_cpus: bool) -> list[tuple[str, kit.Envoy]]:
    """One Envoy per proxy of the scenario (none for direct), each closed by `stack`."""
    if policy == "direct":
        return []
    setup = envoy_setup(policy, scenario_file)
    envoys: list[tuple[str, kit.Envoy]] = []
    for zone, count in sorted(sc["proxies"].items()):
        for i in range(count):
            envoy = kit.Envoy(pods, node_zone=zone, concurrency=1, workdir=mkdir(pw / f"envoy-{zone}-{i}"),
                              log_level="warn", **setup)
            stack.enter_context(envoy)
            envoys.append((zone, envoy))
            if pin_cpus:
                pin(envoy.proc.pid, 1)
    if setup["filter_config"] and policy not in FLOOR_CONFIG:
        for _, envoy in envoys:
            wait_for_discovery(envoy)
    return envoys


def idle_envoy_cores(envoys: list[tuple[str, kit.Envoy]]) -> float | None:
    """Envoy CPU (timers, health checks, stats, wasm ticks) before any traffic, in cores."""
    if not envoys:
        return None
    c0 = sum(cpu_seconds(e.proc.pid) for _, e in envoys)
    time.sleep(IDLE_S)
    return (sum(cpu_seconds(e.proc.pid) for _, e in envoys) - c0) / IDLE_S


def start_device_groups(stack: contextlib.ExitStack, policy: str, sc: dict, streams_per_zone: list,
                        pods: kit.Pods, envoys: list[tuple[str, kit.Envoy]], pw: Path) -> list[tuple[str, kit.Devices]]:
    """One `lab devices` per client zone aimed at that zone's Envoy (direct: one per pod of
    that zone), seed = scenario seed + zone index; each closed by `stack`."""
    st = sc["streams"]
    duration = float(sc["duration_s"])
    devs: list[tuple[str, kit.Devices]] = []

    def start(zone: str, target: str, streams: int, prefix: str, workdir: Path, seed: int) -> None:
        # Devices reconnect (with backoff, resending what was not acknowledged) like real ones:
        # a rebalanced or failed stream comes back.
        devices = kit.start_devices(
            target, streams, st["mean_rate"], st["rate_dist"], duration, workdir=mkdir(workdir),
            kind=st.get("kind", "bidi"), seed=seed, reconnect=True,
            extra_args=["--workers", "1", "--ramp", str(st.get("ramp_s", 0)), "--payload", str(st.get("payload", 64)),
                        "--device-prefix", prefix])
        stack.enter_context(devices)
        devs.append((zone, devices))

    for zi, (zone, n) in enumerate(streams_per_zone):
        if n == 0:
            continue
        seed = int(sc["seed"]) + zi
        if policy == "direct":
            local = [p for p in pods.pods if p["zone"] == zone]
            for k, pod in enumerate(local):
                share = n // len(local) + (1 if k < n % len(local) else 0)
                if share:
                    start(zone, pod["address"], share, f"{zone}dev{k}-", pw / f"dev-{zone}-{k}", seed)
        else:
            targets = [e for z, e in envoys if z == zone] or [e for _, e in envoys]
            start(zone, targets[0].listen_addr, n, f"{zone}dev", pw / f"dev-{zone}", seed)
    return devs


def measure(policy: str, sc: dict, pods: kit.Pods, envoys: list[tuple[str, kit.Envoy]]) -> tuple[list, dict]:
    """Samples the pods' message counters every second for the run, and Envoy CPU at the end
    of warm-up and of the run: (samples, {"start"|"end": (t, {envoy: cpu seconds})})."""
    duration, warmup = float(sc["duration_s"]), float(sc["warmup_s"])
    t0 = time.monotonic()
    samples = []
    cpu_at: dict[str, tuple[float, dict]] = {}
    while time.monotonic() - t0 < duration + 0.5:
        now = time.monotonic() - t0
        stats = pods.pod_stats()
        samples.append({"t": now, "messages": {n: s["messages"] for n, s in stats.items()},
                        "up": {n: s["up"] for n, s in stats.items()},
                        "placed": placements_so_far(envoys) if policy.startswith("streamlb") else {}})
        for key, at in (("start", warmup), ("end", duration)):
            if key not in cpu_at and now >= at:
                cpu_at[key] = (now, {f"{z}-{i}": cpu_seconds(e.proc.pid) for i, (z, e) in enumerate(envoys)})
        if len(samples) % 10 == 0:
            total = sum(samples[-1]["messages"].values()) - sum(samples[-2]["messages"].values())
            log(f"  {policy}: t={now:4.0f}s/{duration:.0f}, {total:.0f} msgs in the last second")
        time.sleep(max(0.0, 1.0 - ((time.monotonic() - t0) % 1.0)))
    return samples, cpu_at


def placements_so_far(envoys: list[tuple[str, kit.Envoy]]) -> dict[str, float]:
    """The filter's placements so far, summed over the Envoys, by "proxy zone->endpoint zone"."""
    out: dict[str, float] = {}
    for _, e in envoys:
        try:
            stats = e.stats("streamlb_decisions_by_zone_total")
        except (OSError, RuntimeError):
            continue
        for key, v in stats.items():
            tags = dict(t.split("=.=", 1) for t in key.split(".", 2)[-1].split(";") if "=.=" in t)
            if "from" in tags and "to" in tags:
                k = f"{tags['from']}->{tags['to']}"
                out[k] = out.get(k, 0) + v
    return out


def probe_rates(envoys: list[tuple[str, kit.Envoy]], pods: int, duration: float) -> dict | None:
    """The filter's load probes over the run: per result, and sent per second per proxy and per
    pod (None without the filter or with probes off)."""
    by_result: dict[str, float] = {}
    for _, e in envoys:
        for result, v in e.stats_by_tag("streamlb_probes_total", "result").items():
            by_result[result] = by_result.get(result, 0) + v
    total = sum(by_result.values())
    if not total:
        return None
    return {"by_result": by_result, "per_proxy_per_s": total / len(envoys) / duration,
            "per_pod_per_s": total / pods / duration}


def run_policy(policy: str, sc: dict, scenario_file: Path, workdir: Path, pin_cpus: bool) -> dict:
    """One policy on the scenario: fresh pods (each zone's capacity), its Envoys and devices.
    Every process started here is stopped when it returns or raises."""
    streams_per_zone = lab_plan(scenario_file)["streams_per_zone"]
    zones = {z["name"]: z["pods"] for z in sc["zones"]}
    zone_capacity = {z["name"]: float(z.get("capacity", 0)) for z in sc["zones"]}
    orca = any(z.get("orca") for z in sc["zones"])
    duration = float(sc["duration_s"])
    pw = mkdir(workdir / policy)
    with contextlib.ExitStack() as stack:
        pods = stack.enter_context(kit.Pods(zones=zones, zone_capacity=zone_capacity, orca=orca, workdir=pw))
        envoys = start_envoys(stack, policy, sc, scenario_file, pods, pw, pin_cpus)
        idle_cores = idle_envoy_cores(envoys)
        devs = start_device_groups(stack, policy, sc, streams_per_zone, pods, envoys, pw)
        samples, cpu_at = measure(policy, sc, pods, envoys)
        rss = {f"{z}-{i}": rss_kb(e.proc.pid) for i, (z, e) in enumerate(envoys)}
        probes = probe_rates(envoys, len(pods.pods), duration)
        reports = []
        for zone, devices in devs:
            rep = devices.wait(timeout=duration + 60)
            rep["client_zone"] = zone
            reports.append(rep)
    result: dict = {"policy": policy}
    result.update(summarise(sc, samples, cpu_at, rss, reports, pods_meta=pods.pods))
    if probes:
        result["probes"] = probes
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
    warmup = float(sc["warmup_s"])
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
    flows: dict[str, int] = {}
    for rep in reports:
        for s in rep["streams"]:
            stream_rates.append((rep["client_zone"], s["rate"]))
            if s.get("zone"):
                acked_all += s["acked"]
                key = f"{rep['client_zone']}->{s['zone']}"
                flows[key] = flows.get(key, 0) + s["acked"]
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
        # The filter's placements so far by proxy zone -> endpoint zone, each second.
        "placed": [{"t": round(s["t"], 1), **s["placed"]} for s in samples if s.get("placed")],
        "median_max_over_mean": median(mm),
        "median_p99_over_mean": median(pm),
        "messages_per_s": msgs_window / max(1e-9, (window[-1]["t"] - window[0]["t"] + 1)) if window else 0,
        "cross_zone": acked_cross / acked_all if acked_all else None,
        # Share of acked messages by client zone -> serving zone.
        "flows": {k: v / acked_all for k, v in sorted(flows.items())} if acked_all else {},
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default=str(REPO / "bench" / "scenarios" / "zipf08-3zones.json"))
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--no-pin", action="store_true", help="do not taskset Envoy / load generator")
    ap.add_argument("--no-sim", action="store_true", help="skip `lab sim` on the same scenario")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (round k: seed + 1000·k), policies interleaved within a round; medians reported")
    ap.add_argument("--variant", action="append", default=[], metavar="streamlb_NAME=JSON",
                    help="a policy: streamlb with these config overrides (repeatable; list it in --policies)")
    ap.add_argument("--variant-wasm", action="append", default=[], metavar="streamlb_NAME=PATH",
                    help="a policy: streamlb from another build's .wasm (combines with --variant)")
    args = ap.parse_args()
    try:
        for spec in args.variant:
            add_variant(spec, wasm=False)
        for spec in args.variant_wasm:
            add_variant(spec, wasm=True)
    except (ValueError, json.JSONDecodeError) as e:
        ap.error(f"--variant: {e}")
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
            scenario_file = workdir / f"scenario-round{k}.json"
            scenario_file.write_text(json.dumps(sck))
            round_rates = None
            for i, p in enumerate(policies):
                log(f"[round {k + 1}/{args.repeat}, seed {sck['seed']}] [{i + 1}/{len(policies)}] {p}")
                try:
                    r = run_policy(p, sck, scenario_file, workdir, pin_cpus)
                    r["seed"] = sck["seed"]
                    runs[p].append(r)
                    if p != "direct" and round_rates is None:
                        round_rates = r["stream_rates"]
                    c = r.get("envoy_cpu") or {}
                    log(f"  {p}: max/mean {fmt(r['median_max_over_mean'])}, p99/mean {fmt(r['median_p99_over_mean'])}, "
                        f"cross-zone {fmt(r['cross_zone'])}, p99 {fmt(r['latency_ms']['p99'])} ms, "
                        f"CPU {fmt(c.get('us_per_message'))} µs/msg, errors {r['totals']['failed']}"
                        + (f", probes/s per proxy {r['probes']['per_proxy_per_s']:.1f}, per pod "
                           f"{r['probes']['per_pod_per_s']:.1f}" if r.get("probes") else ""))
                except Exception as e:  # one policy failing must not lose the others
                    log(f"  {p}: FAILED: {e}")
                    runs[p].append({"policy": p, "error": str(e)[-2000:], "seed": sck["seed"]})
            if round_rates:
                try:
                    o = dict(lab_plan(scenario_file, stream_rates=round_rates)["oracle"], seed=sck["seed"])
                    oracles.append(o)
                    log(f"  oracle of round {k + 1}: LPT {fmt(o['lpt'])}; online any pod {fmt(o['online_any_pod'])}, "
                        f"local zone first {fmt(o['online_local_first'])} (cross-zone {fmt(o['online_local_first_cross_zone'])}); "
                        f"cross-zone minimum {fmt(o['min_cross_zone'])}")
                except RuntimeError as e:
                    log(f"  oracle of round {k + 1} failed: {e}")
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
        "oracle": {k: median([o[k] for o in oracles]) for k in oracles[0] if k != "seed"} if oracles else None,
        "oracle_rounds": oracles,
        "policies": results,
    }
    if not args.no_sim:
        lab = kit.require_lab()
        log("lab sim on the same scenario (fleet scale from its `sim` section)")
        try:
            proc = subprocess.run([str(lab), "sim", "--scenario", args.scenario], capture_output=True, text=True,
                                  timeout=600, check=True)
            out["sim"] = json.loads(proc.stdout)
        except Exception as e:
            log(f"  lab sim failed: {e}")
    import report  # noqa: PLC0415 (bench/report.py, beside this script)

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
