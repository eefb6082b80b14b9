#!/usr/bin/env python3
"""Cost benchmark: what streamlb adds to Envoy, against no filter and the proxy-wasm floor.

    bench/cost.py [--rounds 5] [--parts cpu,unary_cpu,unary,memory] [--policies none,floor,floor_bodies,streamlb]
                  [--streams 100] [--rate 1000] [--window 10] [--out-dir build/bench-cost]

Policies: `none` (no wasm filter), `floor` (bench/floor: a Rust proxy-wasm filter that receives
every callback and returns), `floor_bodies` (the same, reading every body chunk), `floor_calls`
(the floor making 18 host calls per unary call, as streamlb does: 16 header reads and a body read
each way), `floor_streamlb_calls` (the floor making exactly the host calls streamlb makes for a
unary call on a unary route, naming the pods in turn: streamlb minus it is streamlb's own work),
`floor_<kind>_100` (100 header, property, shared-data or whole-header-map reads per request: one call's cost), `streamlb`
(the filter, default configuration: placement, rebalance in shadow, probes), `streamlb_shadow`
(`mode: shadow`: no header set), `streamlb_baseline` (another build, `--baseline-wasm`: before/after).
Every Envoy has the same bootstrap (envoy/envoy.yaml.tmpl) but for the wasm filter.

Parts:
- cpu: per message. One Envoy (`--concurrency 1`) pinned to CPU 1, `lab pods` and `lab devices`
  (bidi streams, one reading up and its ack down per message) on CPU 0. Envoy CPU
  (utime+stime of /proc/<pid>/stat) over the measured window / messages the pods received in it.
  Default 100 streams × 1,000 msgs/s: Envoy near a full core, where the figure varies least.
- unary_cpu: per call, at saturation. `h2load` keeps `--unary-streams` unary gRPC calls
  (Telemetry/Send) in flight on each of `--unary-cpu-clients` connections; Envoy CPU per call.
- unary: per call, paced (latency). `h2load` sends calls at a fixed rate from connections opened
  1/rate s apart (so calls interleave, not in lockstep bursts); Envoy CPU per call, and latency
  p50/p99 from h2load's per-request log after the warm-up.
- memory: Envoy VmRSS with 1,000 and 10,000 endpoints (a STATIC cluster of 127.0.0.1 ports,
  no health checks, nothing listening), and after 100,000 distinct devices streamed through
  streamlb with and without rate memory (capacity 100,000).

Rounds: every round runs every policy once, the order rotated by one each round, so a
disturbance (other work on the machine) hits the policies alike. Per policy: median and min–max
over rounds; per round, the paired difference of each policy and the one before it in
`--policies`. The 1-minute load average is recorded at the start and end of each part.
Writes build/bench-cost/cost-<date>.json and .md, prints the markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: cpu_seconds, rss_kb, pin, floor_wasm)

import streamlb_testkit as kit  # noqa: E402
import yaml  # noqa: E402

REPO = kit.REPO
POLICIES = ["none", *bench.FLOOR_CONFIG, "streamlb", "streamlb_shadow", "streamlb_baseline"]
DEFAULT_POLICIES = ["none", "floor", "floor_bodies", "streamlb"]
STREAMLB_CONFIG = {"clusters": ["pods"], "tick_ms": 1000}
# --baseline-wasm: another build of streamlb (e.g. before a change), run as `streamlb_baseline`.
BASELINE_WASM: list[Path] = []
# --streamlb-extra: merged into the streamlb policies' configuration (to find where a cost is).
STREAMLB_EXTRA: dict = {}
UNARY_PATH = "/streamlb.lab.v1.Telemetry/Send"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def envoy_kwargs(policy: str, filter_extra: dict | None = None) -> dict:
    if policy == "none":
        return {"filter_config": None}
    if policy in bench.FLOOR_CONFIG:
        return {"filter_config": bench.FLOOR_CONFIG[policy], "wasm": bench.floor_wasm()}
    if policy in ("streamlb", "streamlb_shadow", "streamlb_baseline"):
        config = dict(STREAMLB_CONFIG, **(filter_extra or {}), **STREAMLB_EXTRA)
        if policy == "streamlb_shadow":
            config["mode"] = "shadow"
        if policy == "streamlb_baseline":
            if not BASELINE_WASM:
                raise ValueError("streamlb_baseline needs --baseline-wasm")
            return {"filter_config": config, "wasm": BASELINE_WASM[0]}
        return {"filter_config": config}
    raise ValueError(f"unknown policy {policy}")


def distinct_free_ports(n: int) -> list[int]:
    """n ports on 127.0.0.1 that were free a moment ago, all different (held open together)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@contextlib.contextmanager
def envoy_for(policy: str, pods, workdir: Path, pin_cpu: bool, filter_extra: dict | None = None,
              health_checks: bool = True, wait_discovery: bool = True, many_streams: bool = False):
    """One Envoy for `policy`. many_streams: the pods cluster's circuit breakers raised (Envoy's
    default of 1,024 concurrent requests would fail the memory part's waves of streams)."""
    kwargs = envoy_kwargs(policy, filter_extra)
    if (kwargs.get("filter_config") or {}).get("streamlb_calls"):
        # The floor names the pods in turn, as streamlb spreads calls over them.
        kwargs["filter_config"] = dict(kwargs["filter_config"],
                                       endpoints=",".join(p["address"] for p in pods.pods))
    envoy = kit.Envoy(pods, node_zone="a", concurrency=1, workdir=bench.mkdir(workdir), log_level="warn",
                      lb="override_host", health_checks=health_checks, **kwargs)
    # Three distinct ports: picked one by one, two can be the same (seen: the admin gate and the
    # listener on one port, Envoy refusing the config).
    envoy.admin_port, envoy.admin_gate_port, envoy.listen_port = distinct_free_ports(3)
    envoy.write_config()
    if many_streams:
        config = yaml.safe_load(envoy.config_path.read_text())
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "pods":
                cluster["circuit_breakers"] = {"thresholds": [
                    {"max_connections": 1_000_000, "max_pending_requests": 1_000_000, "max_requests": 1_000_000}]}
        envoy.config_path.write_text(yaml.safe_dump(config, sort_keys=False, width=120))
    with envoy:
        if pin_cpu:
            bench.pin(envoy.proc.pid, 1)
        if policy.startswith("streamlb") and wait_discovery:
            bench.wait_for_discovery(envoy)
        yield envoy


def unary_calls_by_pod(pods) -> list[int]:
    return [p["kinds"]["unary"]["messages"] for p in pods.stats()["pods"]]


def pod_messages(pods) -> int:
    return sum(p["messages"] for p in pods.stats()["pods"])


def spread(values: list[float]) -> dict:
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    out = {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v)}
    if len(v) >= 4:
        q = statistics.quantiles(v, n=4)
        out["q1"], out["q3"] = q[0], q[2]
    if len(v) >= 2:
        out["sd"] = statistics.stdev(v)
    return out


def rounds_needed(sd: float | None, precision: float) -> int | None:
    """Rounds for a 95 % interval of the mean paired difference of ± `precision`, given the
    round-to-round sd of that difference (normal approximation), never fewer than 5 (a sign
    test needs 5 of 5 rounds on one side for p < 0.05)."""
    if sd is None:
        return None
    return max(5, math.ceil((1.96 * sd / precision) ** 2))


def attempt(what: str, run_once, tries: int = 4) -> dict:
    """run_once() → its result, tried again on failure (up to `tries` times) (e.g. a port picked free that was
    taken by the time Envoy bound it); {"error": …} when every try failed."""
    error = ""
    for t in range(tries):
        try:
            return run_once(t)
        except Exception as e:  # one failure must not lose the other rounds
            error = str(e)[-2000:]
            log(f"  {what}: FAILED (try {t + 1}/{tries}): {error.splitlines()[-1] if error else e!r}")
    return {"error": error}


def rotated(policies: list[str], k: int) -> list[str]:
    k %= len(policies)
    return policies[k:] + policies[:k]


# ---------------------------------------------------------------- cpu per message

def cpu_round(policy: str, pods, args, workdir: Path, pin_cpu: bool) -> dict:
    with envoy_for(policy, pods, workdir / "envoy", pin_cpu) as envoy:
        pid = envoy.proc.pid
        duration = args.warmup + args.window + 1.0
        with kit.start_devices(envoy.listen_addr, args.streams, args.rate, "constant", duration,
                               workdir=bench.mkdir(workdir / "devices"), seed=1, record_headers=(),
                               extra_args=["--workers", "1", "--ramp", "1", "--payload", str(args.payload)]) as devices:
            t0 = time.monotonic()
            time.sleep(args.warmup)
            c0, m0, w0 = bench.cpu_seconds(pid), pod_messages(pods), time.monotonic()
            time.sleep(args.window)
            c1, m1, w1 = bench.cpu_seconds(pid), pod_messages(pods), time.monotonic()
            report = devices.wait(timeout=duration + 60 - (time.monotonic() - t0))
        rss = bench.rss_kb(pid)
    msgs = m1 - m0
    return {
        "us_per_message": (c1 - c0) / msgs * 1e6 if msgs > 0 else None,
        "cpu_s": c1 - c0, "messages": msgs, "window_s": w1 - w0,
        "msgs_per_s": msgs / (w1 - w0), "envoy_cores": (c1 - c0) / (w1 - w0),
        "failed": report["totals"].get("failed", 0), "lost": report["totals"].get("lost", 0),
        "rss_kb": rss,
    }


def interleaved_rounds(args, policies: list[str], pods_dir: Path, run_round, describe) -> dict:
    """`args.rounds` rounds over fresh-per-run Envoys and one set of pods, the policy order
    rotated each round: {"load_start", "rounds": [{round, load, policies: {p: result}}], "load_end"}.
    `run_round(policy, pods, round, try)` measures one; `describe(result)` is its log line."""
    out: dict = {"load_start": loadavg(), "rounds": []}
    with kit.Pods(zones={"a": 2}, workdir=bench.mkdir(pods_dir)) as pods:
        for k in range(args.rounds):
            row = {"round": k + 1, "load": loadavg(), "policies": {}}
            for p in rotated(policies, k):
                r = attempt(f"round {k + 1} {p}", lambda t, p=p: run_round(p, pods, k, t))
                if "error" not in r:
                    log(f"  round {k + 1} {p}: {describe(r)}")
                row["policies"][p] = r
            out["rounds"].append(row)
    out["load_end"] = loadavg()
    return out


def part_cpu(args, policies: list[str], workdir: Path, pin_cpu: bool) -> dict:
    log(f"cpu: {args.streams} bidi streams × {args.rate} msgs/s (= {args.streams * args.rate} msgs/s), "
        f"{args.rounds} rounds × {len(policies)} policies, window {args.window} s; load {loadavg()}")
    out = interleaved_rounds(
        args, policies, workdir / "pods",
        lambda p, pods, k, t: cpu_round(p, pods, args, bench.mkdir(workdir / f"cpu-{k}-{p}-{t}"), pin_cpu),
        lambda r: (f"{fmt(r['us_per_message'])} µs/msg at {r['msgs_per_s']:.0f} msgs/s "
                   f"({r['envoy_cores']:.2f} cores), failed {r['failed']}"))
    out["summary"] = summarise(out["rounds"], policies, "us_per_message")
    return out


def summarise(rounds: list[dict], policies: list[str], key: str) -> dict:
    per = {p: [r["policies"].get(p, {}).get(key) for r in rounds] for p in policies}
    summary: dict = {"policies": {p: spread(v) for p, v in per.items()}, "differences": {}}
    pairs = [(b, a) for a, b in zip(policies, policies[1:])]
    if "streamlb" in policies and "floor_bodies" in policies:
        pairs.append(("streamlb", "floor_bodies"))
    if "streamlb" in policies and "floor" in policies:
        pairs.append(("streamlb", "floor"))
    if "streamlb" in policies and "none" in policies:
        pairs.append(("streamlb", "none"))
    for a, b in dict.fromkeys(pairs):
        d = [x - y for x, y in zip(per[a], per[b]) if x is not None and y is not None]
        s = spread(d)
        s["rounds_for_0.5us"] = rounds_needed(s.get("sd"), 0.5)
        s["per_round"] = d
        summary["differences"][f"{a} − {b}"] = s
    return summary


# ---------------------------------------------------------------- unary calls

def grpc_body(path: Path) -> None:
    """One gRPC-framed Reading {device_id: "h2load", seq: 1, payload: 64 bytes}."""
    device = b"h2load"
    payload = bytes(64)
    msg = b"\x0a" + bytes([len(device)]) + device + b"\x10\x01" + b"\x22" + bytes([len(payload)]) + payload
    path.write_bytes(b"\x00" + len(msg).to_bytes(4, "big") + msg)


def h2load_latencies(log_file: Path, since_us: float = 0.0) -> list[float]:
    """Per-request durations (ms) of 2xx requests started at or after `since_us` (epoch µs)
    from h2load's --log-file (start time µs, status, duration µs per line)."""
    out = []
    for line in log_file.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].startswith("2") and int(parts[0]) >= since_us:
            out.append(int(parts[2]) / 1000.0)
    return sorted(out)


def quantile(sorted_v: list[float], q: float) -> float | None:
    if not sorted_v:
        return None
    return sorted_v[min(len(sorted_v) - 1, int(q * len(sorted_v)))]


def unary_round(policy: str, pods, args, workdir: Path, pin_cpu: bool, closed: bool) -> dict:
    body = workdir / "reading.grpc"
    grpc_body(body)
    h2load = shutil.which("h2load")
    if not h2load:
        raise RuntimeError("h2load missing (Debian package nghttp2-client; `make bench-cost` installs it)")
    with envoy_for(policy, pods, workdir / "envoy", pin_cpu) as envoy:
        pid = envoy.proc.pid
        clients = args.unary_cpu_clients if closed else args.unary_clients
        per_client = args.unary_rate / clients
        url = f"http://{envoy.listen_addr}{UNARY_PATH}"
        log_file = workdir / "h2load.log"
        # The connections open one every 1/rate s (`--rate 1 --rate-period`, whole ms), so calls
        # interleave evenly. Started together, h2load's clients send in lockstep: a burst of
        # `clients` calls every 1/per_client s, where each call queues behind the others and
        # latency shows the CPU per call times the burst (seen: +0.7 ms p50 for +42 µs/call).
        # `--rate` excludes `-D`: the run is `-n` calls long and warm-up calls are dropped below.
        if closed:
            # Closed loop: each connection keeps `--unary-streams` calls in flight, so Envoy handles
            # many calls per wake-up and its CPU per call is mostly per-call work (less noise).
            load = ["-c", str(clients), "-m", str(args.unary_streams),
                    "-D", f"{args.unary_warmup + args.unary_window:g}"]
        else:
            total = round(args.unary_rate * (args.unary_warmup + args.unary_window))
            load = ["-c", str(clients), "-m", "1", "--rps", f"{per_client:g}", "-n", str(total),
                    "--rate", "1", "--rate-period", f"{max(1, round(1000 / args.unary_rate))}ms"]
        argv = [h2load, url, "-d", str(body), *load,
                "-H", "content-type: application/grpc", "-H", "te: trailers",
                "-H", "x-device-id: h2load", "--log-file", str(log_file)]
        started_us = time.time() * 1e6
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=kit.die_with_parent if hasattr(kit, "die_with_parent") else None)
        time.sleep(args.unary_warmup + 0.5)
        c0, p0, w0 = bench.cpu_seconds(pid), unary_calls_by_pod(pods), time.monotonic()
        with perf_record(args, pid, policy):
            time.sleep(args.unary_window - 1.0)
        c1, p1, w1 = bench.cpu_seconds(pid), unary_calls_by_pod(pods), time.monotonic()
        m0, m1 = sum(p0), sum(p1)
        by_pod = [b - a for a, b in zip(p0, p1)]
        try:
            text, _ = proc.communicate(timeout=args.unary_window + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
            raise RuntimeError(f"h2load did not finish:\n{text[-2000:]}")
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited {proc.returncode}:\n{text[-2000:]}")
    lat = h2load_latencies(log_file, since_us=started_us + args.unary_warmup * 1e6)
    calls = m1 - m0  # calls the pods answered in the CPU window
    calls_per_s = calls / (w1 - w0)
    failed = sum(1 for line in log_file.read_text().splitlines() if len(line.split()) >= 2
                 and not line.split()[1].startswith("2"))
    return {
        "us_per_call": (c1 - c0) / calls * 1e6 if calls > 0 else None,
        "cpu_s": c1 - c0, "calls_per_s": calls_per_s, "window_s": w1 - w0,
        "pod_shares": [round(n / calls, 3) if calls else None for n in by_pod],
        "p50_ms": quantile(lat, 0.50), "p99_ms": quantile(lat, 0.99), "calls": len(lat), "failed": failed,
        "h2load_tail": "\n".join(text.strip().splitlines()[-12:]),
    }


@contextlib.contextmanager
def perf_record(args, pid: int, policy: str):
    """With `--perf-dir`: `perf record` samples Envoy over the window (where its CPU goes: the
    wasm code shows as JIT memory, host calls as Envoy's own). Profiling perturbs the figure."""
    if not args.perf_dir:
        yield
        return
    out = Path(args.perf_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(list(out.glob(f"{policy}-*.data")))
    proc = subprocess.Popen(["perf", "record", "-q", "-F", "4999", "-p", str(pid),
                             "-o", str(out / f"{policy}-{n}.data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(2)
        proc.wait(timeout=30)


def part_unary(args, policies: list[str], workdir: Path, pin_cpu: bool, closed: bool) -> dict:
    """closed: `unary_cpu` (CPU per call at saturation); else `unary` (paced: latency)."""
    load = "closed" if closed else "paced"
    clients = args.unary_cpu_clients if closed else args.unary_clients
    log(f"unary ({load}): {f'{args.unary_streams} in flight per connection' if closed else f'{args.unary_rate} calls/s'}, "
        f"{clients} h2load clients, {args.rounds} rounds, "
        f"window {args.unary_window} s; load {loadavg()}")
    out = interleaved_rounds(
        args, policies, workdir / "pods-unary",
        lambda p, pods, k, t: unary_round(p, pods, args, bench.mkdir(workdir / f"unary-{load}-{k}-{p}-{t}"),
                                          pin_cpu, closed),
        lambda r: (f"{fmt(r['us_per_call'])} µs/call at {r['calls_per_s']:.0f} calls/s, "
                   f"p50 {fmt(r['p50_ms'])} ms, p99 {fmt(r['p99_ms'])} ms, failed {r['failed']}, pod shares {r.get('pod_shares')}"))
    out["load"] = load
    out["clients"] = clients
    out["summary"] = summarise(out["rounds"], policies, "us_per_call")
    out["summary"]["p99_ms"] = {p: spread([r["policies"].get(p, {}).get("p99_ms") for r in out["rounds"]])
                                for p in policies}
    out["summary"]["p50_ms"] = {p: spread([r["policies"].get(p, {}).get("p50_ms") for r in out["rounds"]])
                                for p in policies}
    return out


# ---------------------------------------------------------------- memory

def fake_endpoints(n: int, zones: int = 3) -> list[dict]:
    """n endpoints 127.0.0.1:<port> in `zones` zones; nothing listens there (no health checks)."""
    return [{"name": f"e{i}", "zone": "abc"[i % zones], "address": f"127.0.0.1:{20000 + i}"} for i in range(n)]


def healthy_endpoints_seen(envoy) -> float:
    stats = envoy.stats("streamlb_.*endpoints")
    return sum(v for k, v in stats.items() if "endpoints" in k)


def memory_case(policy: str, endpoints: int, workdir: Path, args, fill_devices: int = 0, pods=None,
                extra: dict | None = None) -> dict:
    """RSS of one Envoy: with `endpoints` fake endpoints, or (pods given) after `fill_devices`
    distinct devices streamed through it."""
    pod_list = fake_endpoints(endpoints) if pods is None else pods
    with envoy_for(policy, pod_list, workdir, False, filter_extra=extra, health_checks=False,
                   wait_discovery=False, many_streams=pods is not None) as envoy:
        seen = None
        if policy.startswith("streamlb"):
            try:
                bench.wait_for_discovery(envoy, timeout=60)
                seen = "discovery ok"
            except RuntimeError as e:
                seen = f"discovery FAILED: {e}"
        time.sleep(args.memory_settle)
        filled = None
        if fill_devices and pods is not None:
            filled = fill_rate_memory(envoy, fill_devices, workdir, args)
            time.sleep(args.memory_settle)
        rss = bench.rss_kb(envoy.proc.pid)
        discovery = dict(envoy.stats("streamlb_(discovery|host_errors|cas)"))
    return {"rss_kb": rss, "discovery": seen, "stats": discovery, "filled": filled}


def fill_rate_memory(envoy, devices: int, workdir: Path, args) -> dict:
    """Streams from `devices` distinct device ids, each open ≥ 2.5 s (the filter remembers a
    rate after 2 s and at the stream's end), in waves of `args.fill_wave`."""
    written = 0
    waves = math.ceil(devices / args.fill_wave)
    for w in range(waves):
        n = min(args.fill_wave, devices - w * args.fill_wave)
        report = kit.run_devices(envoy.listen_addr, n, 1.0, "constant", 2.6, workdir=bench.mkdir(workdir / f"fill-{w}"),
                                 seed=1, record_headers=(),
                                 extra_args=["--workers", "2", "--ramp", "0.5", "--payload", "8",
                                             "--device-prefix", f"fill{w}-"], timeout=120)
        ok = sum(1 for s in report["streams"] if s.get("statuses", {}).get("OK") and s.get("acked", 0) > 0)
        written += ok
        log(f"    fill wave {w + 1}/{waves}: {n} devices, {ok} streams ended OK")
    return {"devices_ok": written, "waves": waves}


def expected_occupancy(keys: int, capacity: int | None = None, ways: int = 32) -> float:
    """Expected share of the rate memory's slots in use after `keys` distinct random keys:
    buckets of `ways` (a full bucket evicts), so Σ min(X, ways) with X ~ Poisson(keys/buckets)."""
    capacity = capacity or keys
    buckets = max(1, -(-capacity // ways))
    lam = keys / buckets
    p, used = math.exp(-lam), 0.0
    for k in range(0, 20 * ways + int(4 * lam) + 10):
        if k > 0:
            p *= lam / k
        used += min(k, ways) * p
    return used / ways


def part_memory(args, policies: list[str], workdir: Path) -> dict:
    out: dict = {"load_start": loadavg(), "cases": []}
    log(f"memory: endpoints {args.memory_endpoints}, rate memory {args.fill_devices} devices; load {out['load_start']}")
    for n in args.memory_endpoints:
        for p in policies:
            try:
                r = memory_case(p, n, bench.mkdir(workdir / f"mem-{n}-{p}"), args)
            except Exception as e:
                r = {"error": str(e)[-2000:]}
            r.update(policy=p, endpoints=n)
            log(f"  {n} endpoints, {p}: RSS {fmt((r.get('rss_kb') or 0) / 1024)} MB {r.get('discovery') or ''}")
            out["cases"].append(r)
    if args.fill_devices:
        # The same traffic through each: streamlb without rate memory, streamlb remembering
        # every device (capacity = the devices).
        cases = [("streamlb", {"rate_memory": {"header": ""}}, 0),
                 ("streamlb", {"rate_memory": {"capacity": args.fill_devices}}, args.fill_devices)]
        with kit.Pods(zones={"a": 2}, workdir=bench.mkdir(workdir / "pods-mem")) as pods:
            for i, (p, extra, capacity) in enumerate(cases):
                if p not in policies:
                    continue
                try:
                    r = memory_case(p, 0, bench.mkdir(workdir / f"mem-fill-{i}"), args,
                                    fill_devices=args.fill_devices, pods=pods, extra=extra)
                except Exception as e:
                    r = {"error": str(e)[-2000:]}
                r.update(policy=p, endpoints=len(pods.pods), rate_memory=capacity,
                         config=extra, devices=args.fill_devices)
                log(f"  {args.fill_devices} devices, rate memory {capacity}, {p}: "
                    f"RSS {fmt((r.get('rss_kb') or 0) / 1024)} MB {r.get('filled')}")
                out["cases"].append(r)
        out["rate_memory_occupancy"] = expected_occupancy(args.fill_devices)
    out["load_end"] = loadavg()
    return out


# ---------------------------------------------------------------- report

def fmt(v, nd: int = 2) -> str:
    return "–" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def spread_cell(s: dict, nd: int = 2) -> str:
    if not s or s.get("median") is None:
        return "–"
    cell = f"{fmt(s['median'], nd)} [{fmt(s['min'], nd)}–{fmt(s['max'], nd)}]"
    if "q1" in s:
        cell += f" IQR {fmt(s['q1'], nd)}–{fmt(s['q3'], nd)}"
    return cell


def markdown(out: dict) -> str:
    lines = [f"# Cost benchmark {out['started']}", "",
             f"Machine: {out['machine']['cpus']} CPUs; {out['machine']['placement']}. "
             f"Envoy {out['machine'].get('envoy', '?')}. Rounds: {out['rounds']} (policy order rotated each round).", ""]
    cpu = out.get("cpu")
    if cpu:
        lines += [f"## Envoy CPU per message ({out['args']['streams']} bidi streams × {out['args']['rate']} msgs/s; "
                  f"one message = one reading up + its ack down; window {out['args']['window']} s)", "",
                  f"1-minute load average: start {cpu['load_start']}, end {cpu['load_end']}; "
                  f"per round: {', '.join(str(r['load']) for r in cpu['rounds'])}.", "",
                  "| policy | µs/msg median [min–max] | per round | msgs/s (median) |", "|---|---|---|---|"]
        for p, s in cpu["summary"]["policies"].items():
            per = [r["policies"].get(p, {}) for r in cpu["rounds"]]
            rate = statistics.median([x["msgs_per_s"] for x in per if x.get("msgs_per_s")] or [0])
            lines.append(f"| {p} | {spread_cell(s)} | {', '.join(fmt(x.get('us_per_message')) for x in per)} | {rate:.0f} |")
        lines += ["", "| difference (paired by round) | µs/msg median [min–max] | sd | rounds for ±0.5 µs |", "|---|---|---|---|"]
        for name, s in cpu["summary"]["differences"].items():
            lines.append(f"| {name} | {spread_cell(s)} | {fmt(s.get('sd'))} | {rounds_needed(s.get('sd'), 0.5) or '–'} |")
        ratios = ratio_lines(cpu["summary"]["policies"], "none")
        if ratios:
            lines += ["", "Ratios of medians to `none`: " + ", ".join(ratios) + "."]
        lines.append("")
    for un in (out.get("unary_cpu"), out.get("unary")):
        if not un:
            continue
        a = out["args"]
        clients = un.get("clients", a["unary_clients"])
        load = (f"closed loop: {clients} connections × {a['unary_streams']} calls in flight; Envoy CPU per call "
                "at saturation, latencies are a saturated proxy's queueing"
                if un.get("load", a.get("unary_load")) == "closed"
                else f"{a['unary_rate']} calls/s, {clients} connections opened 1/rate s apart")
        lines += [f"## Unary calls (h2load, {load}; window {a['unary_window']} s)", "",
                  f"1-minute load average: start {un['load_start']}, end {un['load_end']}.", "",
                  "| policy | Envoy µs/call median [min–max] | p50 ms (median) | p99 ms median [min–max] |", "|---|---|---|---|"]
        for p, s in un["summary"]["policies"].items():
            lines.append(f"| {p} | {spread_cell(s, 1)} | {fmt(un['summary']['p50_ms'][p].get('median'))} | "
                         f"{spread_cell(un['summary']['p99_ms'][p])} |")
        lines += ["", "| difference (paired by round) | µs/call median [min–max] | sd | rounds for ±5 µs |", "|---|---|---|---|"]
        for name, s in un["summary"]["differences"].items():
            lines.append(f"| {name} | {spread_cell(s, 1)} | {fmt(s.get('sd'), 1)} | {rounds_needed(s.get('sd'), 5.0) or '–'} |")
        lines.append("")
    mem = out.get("memory")
    if mem:
        lines += ["## Envoy RSS (one worker)", "", f"1-minute load average: start {mem['load_start']}, end {mem['load_end']}.", "",
                  "| endpoints | rate memory | policy | VmRSS MB | note |", "|---|---|---|---|---|"]
        for c in mem["cases"]:
            note = c.get("error") or c.get("discovery") or ""
            if c.get("filled"):
                note += f" filled: {c['filled']}"
            lines.append(f"| {c['endpoints']} | {c.get('rate_memory', '')} | {c['policy']} | "
                         f"{fmt((c.get('rss_kb') or 0) / 1024, 1)} | {note} |")
        if mem.get("rate_memory_occupancy"):
            lines += ["", f"Rate memory: {100 * mem['rate_memory_occupancy']:.1f} % of its slots expected in use "
                          f"after {mem['cases'][-1].get('devices', '?')} random device ids (buckets of 32 evict)."]
        lines.append("")
    return "\n".join(lines)


def ratio_lines(policies: dict, base: str) -> list[str]:
    b = (policies.get(base) or {}).get("median")
    if not b:
        return []
    return [f"{p} {s['median'] / b:.3f}" for p, s in policies.items() if p != base and s.get("median")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cpu,unary_cpu,unary,memory")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=100)
    # 100,000 msgs/s offered: Envoy's one worker runs near a full core, where its CPU per
    # message varies least (sd of a paired difference ≈ 0.3 µs, against ≈ 3.5 at 10,000).
    ap.add_argument("--rate", type=float, default=1000.0, help="msgs/s per stream")
    ap.add_argument("--payload", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--unary-rate", type=float, default=1000.0)
    ap.add_argument("--unary-clients", type=int, default=10)
    ap.add_argument("--unary-warmup", type=float, default=3.0)
    ap.add_argument("--unary-window", type=float, default=15.0)
    ap.add_argument("--unary-cpu-clients", type=int, default=4, help="connections of the unary_cpu part")
    ap.add_argument("--unary-streams", type=int, default=8, help="calls in flight per connection (unary_cpu)")
    ap.add_argument("--memory-endpoints", default="1000,10000")
    ap.add_argument("--memory-settle", type=float, default=3.0)
    ap.add_argument("--fill-devices", type=int, default=100_000)
    # Below Envoy's and the pods' limits on concurrent streams (waves of 3,000 lost streams).
    ap.add_argument("--fill-wave", type=int, default=1_000)
    ap.add_argument("--baseline-wasm", help="another streamlb .wasm, run as policy streamlb_baseline")
    ap.add_argument("--streamlb-extra", default="{}", help="JSON merged into the streamlb configuration")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="only print the markdown of earlier runs' JSON files (their parts merged)")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--perf-dir", help="record a `perf` profile of Envoy in each unary window here")
    ap.add_argument("--out-dir", default=str(REPO / "build" / "bench-cost"))
    args = ap.parse_args()
    if args.render:
        merged: dict = {}
        for f in args.render:
            run_ = json.loads(Path(f).read_text())
            for key in ("cpu", "unary_cpu", "unary", "memory"):
                if key in run_:
                    merged[key] = run_[key]
                    if key != "memory":  # summaries again, with today's pairs
                        order = [q for q in POLICIES if q in run_[key]["rounds"][0]["policies"]]
                        old_summary = run_[key]["summary"]
                        run_[key]["summary"] = summarise(run_[key]["rounds"], order,
                                                         "us_per_message" if key == "cpu" else "us_per_call")
                        for extra in ("p50_ms", "p99_ms"):
                            if extra in old_summary:
                                run_[key]["summary"][extra] = old_summary[extra]
                    merged.setdefault("args", {}).update(run_["args"] if key != "memory" else {})
            for key in ("started", "machine", "rounds"):
                merged.setdefault(key, run_[key])
            merged.setdefault("args", run_["args"])
        print(markdown(merged))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    STREAMLB_EXTRA.update(json.loads(args.streamlb_extra))
    if args.baseline_wasm:
        BASELINE_WASM.append(Path(args.baseline_wasm).resolve())
    args.memory_endpoints = [int(x) for x in args.memory_endpoints.split(",") if x.strip()]
    if any(p.startswith("floor") for p in policies) and not bench.floor_wasm().exists():
        ap.error(f"{bench.floor_wasm()} missing: run `make build-floor`")
    pin_cpu = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin_cpu:
        bench.pin(os.getpid(), 0)  # pods, devices, h2load inherit CPU 0; each Envoy goes to CPU 1
    started = dt.datetime.now(dt.timezone.utc)
    envoy_version = subprocess.run([str(kit.envoy_bin()), "--version"], capture_output=True, text=True).stdout
    out: dict = {
        "kind": "cost", "started": started.isoformat(timespec="seconds"), "rounds": args.rounds,
        "args": {k: v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname()),
                    "envoy": envoy_version.split("version:")[-1].split()[0].split("/")[1] if "/" in envoy_version else "?",
                    "placement": ("driver, lab pods, lab devices and h2load on CPU 0; Envoy (--concurrency 1) on CPU 1"
                                  if pin_cpu else "not pinned")},
        "load_start": loadavg(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="streamlb-cost-"))
    try:
        if "cpu" in parts:
            out["cpu"] = part_cpu(args, policies, workdir, pin_cpu)
        if "unary_cpu" in parts:
            out["unary_cpu"] = part_unary(args, policies, workdir, pin_cpu, closed=True)
        if "unary" in parts:
            out["unary"] = part_unary(args, policies, workdir, pin_cpu, closed=False)
        if "memory" in parts:
            out["memory"] = part_memory(args, policies, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["load_end"] = loadavg()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"cost-{started.strftime('%Y%m%d-%H%M')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    text = markdown(out)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    print(text)
    log(f"wrote {out_dir / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
