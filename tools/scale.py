#!/usr/bin/env python3
"""Scale in real Envoy (`make scale`): 10,000 endpoints, 100,000 device ids, 10,000 route names.

One Envoy (`--concurrency 2`) in front of 10,000 real lab pods (zones a, b, c; one cluster
`pods`, STATIC, health checks off, upstream connections closed after 1 s idle) with 10,000
routes (`r0` … `r9999`, chosen by the request header `x-route`), circuit breakers raised to
100,000 (the defaults, 1,024 connections and requests, overflow with streams spread over 10,000
pods). A Python gRPC client opens 100,000 short streams, each with its own `x-device-id`, route
`r(i/2 mod 10000)`: one reading, a pause of 2.1 s (the rate memory keeps streams that ran 2 s), a second reading, close.
Every other device sends 1 KB readings, the rest 16 B (`load.signal: bytes`), so a device's
remembered rate differs from its route's mean.

The same run against the same Envoy without the filter gives the baseline RSS. Reported:
  discovery      the admin answer's size and the filter's parse time (streamlb_discovery_body_bytes,
                 streamlb_discovery_parse_us), polls ok / failed
  memory         Envoy RSS with and without the filter, idle and after every 25,000 streams
  rate memory    after the 100,000 ids (capacity 65,536 by default): devices seen last are still
                 remembered (placed with their own rate, `expected=` in the debug header), devices
                 seen first were evicted (placed with the route mean): the table stays bounded
  metrics        streamlb metric families, series, and `route` label values in /stats/prometheus
                 (routes beyond `max_routes` per VM fold into `route="other"`)

Writes build/scale/scale.json and build/scale/report.html. Exit status 1 when a bound fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import streamlb_testkit as kit
from prometheus_client.parser import text_string_to_metric_families

DEBUG_HEADER = "x-streamlb-decision"
STREAM_PATH = "/streamlb.lab.v1.Telemetry/"


class ScaleEnvoy(kit.Envoy):
    """kit.Envoy with `routes` header-matched routes to `pods` and idle upstream connections
    closed after 1 s (10,000 pods would otherwise keep 20,000 connections open)."""

    def __init__(self, *args: Any, routes: int, **kwargs: Any):
        self.route_count = routes
        super().__init__(*args, health_checks=False, **kwargs)
        self.pick_ports()

    def pick_ports(self) -> None:
        # Below the ephemeral range: with 10,000 pods, Envoy's own upstream connections (probes
        # start before the wasm listener is bound) would otherwise take a port chosen by free_port().
        self.admin_port, self.admin_gate_port, self.listen_port = low_ports(3)
        self.write_config()

    def start_process(self) -> "ScaleEnvoy":
        # Ports are chosen free but bound a moment later; with 10,000 pods and their connections
        # the ephemeral range is crowded, so another socket can take one meanwhile: new ports.
        for attempt in range(3):
            try:
                super().start_process()
                self.wait_listening()
                return self
            except RuntimeError as err:
                if self.proc:
                    self.proc.stop()
                if attempt == 2 or not re.search(r"cannot bind|duplicate address", str(err)):
                    raise
                self.pick_ports()
        raise AssertionError("unreachable")

    def wait_listening(self, timeout: float = 120) -> None:
        """/ready says LIVE before a listener with a wasm filter is bound: wait for the device port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or not self.proc.running():
                raise RuntimeError(f"envoy exited:\n{self.log_text()[-3000:]}")
            with socket.socket() as sock:
                sock.settimeout(1)
                if sock.connect_ex(("127.0.0.1", self.listen_port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"device listener not bound:\n{self.log_text()[-3000:]}")


    def config(self) -> dict[str, Any]:
        config = super().config()
        listener = config["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        vhost = hcm["route_config"]["virtual_hosts"][0]
        named = [{
            "name": f"r{i}",
            "match": {"prefix": STREAM_PATH, "headers": [{"name": "x-route", "string_match": {"exact": f"r{i}"}}]},
            "route": {"cluster": "pods", "timeout": "0s"},
        } for i in range(self.route_count)]
        at = next(i for i, r in enumerate(vhost["routes"]) if r.get("name") == "telemetry")
        vhost["routes"][at:at] = named
        pods = next(c for c in config["static_resources"]["clusters"] if c["name"] == "pods")
        options = pods["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        options["common_http_protocol_options"] = {"idle_timeout": "1s"}
        # Envoy's default circuit breakers (1,024 connections and requests per cluster) overflow
        # here: each stream to a different pod needs its own connection, and probes add more.
        limit = {"max_connections": 100_000, "max_pending_requests": 100_000, "max_requests": 100_000}
        pods["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", **limit}]}
        return config


def low_ports(n: int) -> list[int]:
    """n distinct free ports in [20000, 32768), below Linux's default ephemeral range."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def streams(target: str, first: int, count: int, routes: int, hold: float, concurrency: int,
                  channels: int, record: dict[int, str] | None = None) -> dict[str, int]:
    """`count` streams with device ids first … first+count-1; returns counts of outcomes. With
    `record`, also the debug header of each stream by id (hold 0: one reading, close)."""
    import grpc  # noqa: PLC0415

    pb2, pb2_grpc = kit.telemetry_stubs()
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [pb2_grpc.TelemetryStub(c) for c in chans]
    sem = asyncio.Semaphore(concurrency)
    outcome: dict[str, Any] = {"ok": 0, "failed": 0, "errors": {}}

    async def one(i: int) -> None:
        big = i % 2 == 0
        payload = b"x" * (1024 if big else 16)
        # Devices i and i+1 share a route: every route carries small and big readings.
        md = (("x-device-id", f"scale-{i}"), ("x-route", f"r{(i // 2) % routes}"))
        async with sem:
            call = None
            try:
                call = stubs[i % channels].Stream(metadata=md, timeout=60)
                await call.write(pb2.Reading(device_id=f"scale-{i}", seq=0, payload=payload))
                if hold:
                    await asyncio.sleep(hold)
                    await call.write(pb2.Reading(device_id=f"scale-{i}", seq=1, payload=payload))
                await call.done_writing()
                async for _ in call:
                    pass
                if record is not None:
                    for key, value in await call.initial_metadata():
                        if key == DEBUG_HEADER:
                            record[i] = value
                outcome["ok"] += 1
            except (grpc.RpcError, asyncio.InvalidStateError):
                outcome["failed"] += 1
                why = "no call"
                if call is not None:
                    why = f"{await call.code()}: {await call.details()}"[:200]
                outcome["errors"][why] = outcome["errors"].get(why, 0) + 1

    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    for c in chans:
        await c.close()
    return outcome


def expected_of(debug: str) -> float | None:
    m = re.search(r"(?:^|;)expected=([0-9.eE+-]+)", debug)
    return float(m.group(1)) if m else None


def prometheus_figures(envoy: kit.Envoy) -> dict[str, Any]:
    text = envoy.prometheus()
    exposed = kit.parse_exposition(text)
    families = {f for f in exposed.types if f.startswith("streamlb_")}
    series = 0
    routes: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("streamlb_"):
            for sample in family.samples:
                series += 1
                if "route" in sample.labels:
                    routes.add(sample.labels["route"])
    all_series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return {"streamlb_families": len(families), "streamlb_series": series, "route_label_values": len(routes),
            "route_other": "other" in routes, "envoy_series_total": all_series, "bytes": len(text)}


# The filter's default probe.max_per_tick (per tick_ms, 1 s by default).
DEFAULT_PROBE_BUDGET = 256
PROBES = r"^wasmcustom\.streamlb_probes_total"


def gauge(envoy: kit.Envoy, name: str) -> float:
    full = f"wasmcustom.{name}"
    return envoy.stats(f"^{re.escape(full)}$").get(full, 0)


def run_pass(args: argparse.Namespace, pods: kit.Pods, with_filter: bool) -> dict[str, Any]:
    filter_config = {
        "clusters": ["pods"],
        "debug_header": DEBUG_HEADER,
        "max_routes": args.max_routes,
        "load": {"signal": "bytes"},
        "rate_memory": {"capacity": args.capacity},
        "discovery": {"poll_ms": args.poll_ms, "timeout_ms": args.discovery_timeout_ms},
        **args.filter_settings,
    } if with_filter else None
    out: dict[str, Any] = {"filter": filter_config, "checkpoints": []}
    with ScaleEnvoy(pods, filter_config=filter_config, routes=args.routes, concurrency=args.concurrency,
                    log_level="warn", start_timeout=180) as envoy:
        assert envoy.proc is not None
        pid = envoy.proc.pid
        try:
            return measure(args, envoy, pid, out, with_filter)
        except Exception:
            print(f"Envoy log (tail):\n{envoy.log_text()[-4000:]}", flush=True)
            raise


def measure(args: argparse.Namespace, envoy: ScaleEnvoy, pid: int, out: dict[str, Any],
            with_filter: bool) -> dict[str, Any]:
    envoy.wait_listening()
    started = time.monotonic()
    t = time.monotonic()
    status, body = kit.http_request("GET", f"http://{envoy.admin_addr}/clusters?format=json&filter=%5E%28pods%29%24",
                                    timeout=60)
    out["admin_clusters"] = {"status": status, "bytes": len(body.encode()), "seconds": time.monotonic() - t}
    if with_filter:
        if not envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_ok_total", 1, 120):
            raise RuntimeError(f"no discovery at scale:\n{envoy.log_text()[-3000:]}")
    time.sleep(3)
    probes_at = (time.monotonic(), envoy.stats_by_tag(PROBES, "result") if with_filter else {})
    out["checkpoints"].append({"streams": 0, "rss_mb": rss_mb(pid), "s": time.monotonic() - started})
    print(f"  {'filter' if with_filter else 'no filter'}: idle RSS {out['checkpoints'][-1]['rss_mb']:.0f} MB",
          flush=True)
    done = 0
    outcomes = {"ok": 0, "failed": 0}
    errors: dict[str, int] = {}
    while done < args.devices:
        n = min(args.checkpoint, args.devices - done)
        got = asyncio.run(streams(envoy.listen_addr, done, n, args.routes, args.hold, args.parallel,
                                  args.channels))
        for k in ("ok", "failed"):
            outcomes[k] += got[k]
        for why, count in got["errors"].items():
            errors[why] = errors.get(why, 0) + count
        done += n
        time.sleep(2)
        point = {"streams": done, "rss_mb": rss_mb(pid), "s": time.monotonic() - started, **got}
        out["checkpoints"].append(point)
        print(f"  {done} streams: RSS {point['rss_mb']:.0f} MB, ok {got['ok']}, failed {got['failed']}, "
              f"{point['s']:.0f} s {got['errors'] or ''}", flush=True)
    out["outcomes"] = {**outcomes, "errors": errors}
    if with_filter:
        # Probes sent while the streams ran (the VM holding the discovery lease probes the pods,
        # at most probe.max_per_tick per tick): their rate and results.
        now, by_result = time.monotonic(), envoy.stats_by_tag(PROBES, "result")
        sent = {k: v - probes_at[1].get(k, 0) for k, v in by_result.items()}
        out["probes"] = {"by_result": sent, "seconds": now - probes_at[0],
                         "per_second": sum(sent.values()) / max(now - probes_at[0], 1e-9),
                         "pods_reporting": sum(envoy.stats(r"^wasmcustom\.streamlb_fleet_pods_reporting").values())}
        out["discovery"] = {
            "body_bytes": gauge(envoy, "streamlb_discovery_body_bytes"),
            "parse_us": gauge(envoy, "streamlb_discovery_parse_us"),
            "polls_ok": gauge(envoy, "streamlb_discovery_polls_ok_total"),
            "polls_failed": gauge(envoy, "streamlb_discovery_polls_failed_total"),
            "host_errors": gauge(envoy, "streamlb_host_errors_total"),
            "cas_retries": gauge(envoy, "streamlb_cas_retries_total"),
            "cas_lost": gauge(envoy, "streamlb_cas_lost_total"),
        }
        # The rate memory: devices seen first vs last (small readings: their own rate is far
        # below the route mean, so remembered and forgotten are told apart).
        probe = args.probe_devices
        first_ids = [i for i in range(0, args.devices) if i % 2 == 1][:probe]
        last_ids = [i for i in range(0, args.devices) if i % 2 == 1][-probe:]
        record: dict[int, str] = {}
        for ids in (first_ids, last_ids):
            for i in ids:
                asyncio.run(streams(envoy.listen_addr, i, 1, args.routes, 0, 1, 1, record))
        first_exp = [e for i in first_ids if (e := expected_of(record.get(i, ""))) is not None]
        last_exp = [e for i in last_ids if (e := expected_of(record.get(i, ""))) is not None]
        out["rate_memory"] = {
            "first_devices_expected_median": statistics.median(first_exp) if first_exp else None,
            "last_devices_expected_median": statistics.median(last_exp) if last_exp else None,
            "answers": [len(first_exp), len(last_exp)],
            "examples_first": [record.get(i) for i in first_ids[:3]],
            "examples_last": [record.get(i) for i in last_ids[-3:]],
        }
        time.sleep(2.5)  # a tick flushes the counters of the last streams
        out["prometheus"] = prometheus_figures(envoy)
        out["log_failures"] = [line for line in envoy.log_text().splitlines()
                               if re.search(r"Function: proxy_on_\w+ failed|panicked at|RuntimeError", line)][:5]
    else:
        out["prometheus"] = prometheus_figures(envoy)
    return out


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    from streamlb_testkit import plots  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps(result, indent=1))
    w, wo = result["with_filter"], result["without_filter"]
    rows = [(a["streams"], f"{b['rss_mb']:.1f}", f"{a['rss_mb']:.1f}", f"{a['rss_mb'] - b['rss_mb']:+.1f}")
            for a, b in zip(w["checkpoints"], wo["checkpoints"])]
    mem = plots.html_table(["streams so far", "RSS without filter (MB)", "RSS with filter (MB)", "delta (MB)"], rows)
    checks = plots.html_table(["check", "result", "detail"],
                              [(c["name"], "PASS" if c["pass"] else "FAIL", c["detail"]) for c in result["checks"]])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>streamlb scale</title>
<style>{plots.STYLE}</style></head><body><h1>streamlb at scale in real Envoy</h1>
<p><code>{plots.esc(json.dumps(result['setup']))}</code></p><h2>Checks</h2>{checks}<h2>Memory</h2>{mem}
<h2>Discovery</h2><p>{plots.esc(json.dumps(w.get('discovery')))}; admin answer measured from outside:
{plots.esc(json.dumps(w.get('admin_clusters')))}</p>
<h2>Metrics</h2><p>with the filter: {plots.esc(json.dumps(w['prometheus']))}<br>without:
{plots.esc(json.dumps(wo['prometheus']))}</p><h2>Rate memory</h2><p>{plots.esc(json.dumps(w.get('rate_memory')))}</p>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoints", type=int, default=10_000, help="lab pods, split over zones a, b, c")
    p.add_argument("--devices", type=int, default=100_000, help="distinct device ids (one stream each)")
    p.add_argument("--routes", type=int, default=10_000)
    p.add_argument("--max-routes", type=int, default=64, help="the filter's max_routes")
    p.add_argument("--capacity", type=int, default=65536, help="the filter's rate_memory.capacity")
    p.add_argument("--filter-settings", type=json_object, default={},
                   help='JSON object of top-level filter settings to add or replace, e.g. \'{"probe":{"enabled":false}}\'')
    p.add_argument("--poll-ms", type=int, default=5000)
    p.add_argument("--discovery-timeout-ms", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=2, help="Envoy workers")
    p.add_argument("--hold", type=float, default=2.1, help="seconds between a stream's two readings")
    p.add_argument("--parallel", type=int, default=1000, help="streams open at once")
    p.add_argument("--channels", type=int, default=64, help="HTTP/2 connections of the client")
    p.add_argument("--checkpoint", type=int, default=25_000, help="RSS every this many streams")
    p.add_argument("--probe-devices", type=int, default=200)
    p.add_argument("--out-dir", default=str(kit.REPO / "build" / "scale"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    per_zone = {z: args.endpoints // 3 + (1 if i < args.endpoints % 3 else 0) for i, z in enumerate("abc")}
    started = time.time()
    with kit.Pods(zones=per_zone, start_timeout=120) as pods:
        print(f"{len(pods.pods)} pods up", flush=True)
        without = run_pass(args, pods, with_filter=False)
        with_f = run_pass(args, pods, with_filter=True)
    vms = args.concurrency  # worker VMs that see requests
    prom = with_f["prometheus"]
    route_bound = vms * (args.max_routes + 1)
    mem = with_f["rate_memory"]
    probes = with_f["probes"]
    probe_settings = args.filter_settings.get("probe") or {}
    probing = probe_settings.get("enabled", True)
    budget = probe_settings.get("max_per_tick", DEFAULT_PROBE_BUDGET)
    expected_probes = min(args.endpoints, budget)
    checks = [
        ("streams", with_f["outcomes"]["failed"] == 0 and with_f["outcomes"]["ok"] == args.devices,
         f"with filter {with_f['outcomes']}, without {without['outcomes']}"),
        ("no-wasm-failure", not with_f["log_failures"], "; ".join(with_f["log_failures"]) or "none"),
        ("discovery", with_f["discovery"]["polls_ok"] > 0 and with_f["discovery"]["body_bytes"] > 0,
         f"{with_f['discovery']}"),
        # Each pod is due every second (probe.interval_ms 1000), at most probe.max_per_tick per
        # tick of 1 s: min(pods, budget) probes/s expected, answered.
        ("probe-budget", (not probing) or (0.75 * expected_probes <= probes["per_second"] <= 1.1 * budget
                                           and probes["by_result"].get("ok", 0) > 0),
         f"{probes['per_second']:.0f} probes/s over {probes['seconds']:.0f} s (expected {expected_probes}/s: "
         f"{args.endpoints} pods, budget {budget}/s), by result {probes['by_result']}, "
         f"pods reporting at the end {probes['pods_reporting']:.0f}" if probing else "probes off"),
        ("route-labels-fold", prom["route_label_values"] <= route_bound and prom["route_other"],
         f"{prom['route_label_values']} route label values for {args.routes} routes (bound: {vms} workers x "
         f"(max_routes {args.max_routes} + 1) = {route_bound}); 'other' present: {prom['route_other']}"),
        ("rate-memory-bounded",
         mem["first_devices_expected_median"] is not None and mem["last_devices_expected_median"] is not None
         and (args.devices <= args.capacity
              or mem["first_devices_expected_median"] > 3 * mem["last_devices_expected_median"]),
         f"expected rate of the first {args.probe_devices} small devices (evicted: route mean) "
         f"{mem['first_devices_expected_median']}, of the last {args.probe_devices} (remembered: own rate) "
         f"{mem['last_devices_expected_median']}; capacity {args.capacity}, {args.devices} ids"),
    ]
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": time.time() - started,
        "setup": {"endpoints": args.endpoints, "devices": args.devices, "routes": args.routes,
                  "max_routes": args.max_routes, "capacity": args.capacity, "concurrency": args.concurrency,
                  "hold_s": args.hold, "parallel": args.parallel},
        "checks": [{"name": n, "pass": bool(p), "detail": d} for n, p, d in checks],
        "with_filter": with_f,
        "without_filter": without,
    }
    path = write_report(result, Path(args.out_dir))
    for c in result["checks"]:
        print(f"{'PASS' if c['pass'] else 'FAIL'} {c['name']}: {c['detail']}")
    for a, b in zip(with_f["checkpoints"], without["checkpoints"]):
        print(f"RSS at {a['streams']} streams: {b['rss_mb']:.0f} MB without, {a['rss_mb']:.0f} MB with the filter "
              f"({a['rss_mb'] - b['rss_mb']:+.0f})")
    print(f"report: {path}")
    return 0 if all(c["pass"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
