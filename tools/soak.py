#!/usr/bin/env python3
"""Soak test (`make soak`): three Envoys with the filter, lab pods in three zones, devices with
churn, bursts and rebalancing, and faults on a schedule, with invariants checked throughout.

Setup: pods in zones a, b, c; one Envoy per zone (`--concurrency 2`, filesystem LDS, an access
log of every stream); probes on (the fleet view), rebalancing on with `allow_reset`. Each Envoy
has cohorts of devices (`lab devices --reconnect`, Zipf rates): a cohort runs for an exponential
lifetime, then its streams end and it starts again with the same device ids (churn; the rate
memory sees them again); some cohort runs have a reconnect storm midway (bursts).

Faults (times scale with --minutes; see schedule()):
  pod-kill     one pod stopped every minute, started again 20 s later (round robin)
  zone-down    every pod of one zone stopped for 60 s, once
  admin-down   each Envoy's admin gate answers 503 for 30 s (discovery polls fail)
  reload       the filter configuration pushed through LDS with changed values, every 5 min
  hot-restart  one Envoy hot-restarted (`--restart-epoch 1`), once

Invariants (pass/fail in the report):
  no-wasm-failure   no VM panic or wasm failure line in any Envoy log (checked every sample)
  ledger            every reading the devices sent was acked, or failed and was resent:
                    lost = 0, unacked = 0, sent = acked + failed + unacked, failed = resent
  placement         no stream placed on a pod that was down when placed. The filter can know a
                    pod is down only after Envoy's health check marks it (interval 1 s + timeout
                    0.5 s), the next discovery poll (poll_ms) and the next tick (tick_ms): a
                    placement on a stopped pod within that grace after the stop is counted as a
                    race, later ones as violations
  counters          the filter's message counters against the devices' ledger: every acked
                    reading passed the filter both ways (acked <= filter) and the filter saw no
                    more than was sent (upstream <= sent; downstream <= acked + failed + unacked)
  rss-flat          Envoy RSS slope after warm-up (linear regression) < 1 MB per 10 minutes,
                    for each Envoy process that ran at least 3 minutes after warm-up

Writes build/soak/report.html (RSS over time per Envoy, errors and moves per fault, the
invariants) and build/soak/soak.json. Exit status 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import sys
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlb_testkit as kit

WASM_FAILURE = re.compile(r"Function: proxy_on_\w+ failed|panicked at|streamlb: panic|RuntimeError|Wasm VM failed")
DEBUG_HEADER = "x-streamlb-decision"
ZONES = ("a", "b", "c")
# Health check of the template (interval 1 s, timeout 0.5 s, unhealthy after 1 failure).
HEALTH_CHECK_S = 1.5
RSS_WARMUP_FRACTION = 0.2
RSS_MIN_SPAN_S = 180.0
RSS_GOAL_MB_PER_10MIN = 1.0
# The filter configuration alternates between these two at each reload.
RELOAD_VALUES = (
    {"zone": {"spill_threshold": 0.1}, "rebalance": {"tolerance": 0.1}, "discovery": {"poll_ms": 1000},
     "probe": {"interval_ms": 1000}},
    {"zone": {"spill_threshold": 0.2}, "rebalance": {"tolerance": 0.15}, "discovery": {"poll_ms": 1500},
     "probe": {"interval_ms": 1500}},
)
TICK_MS = 1000


def filter_config(variant: int, mean_rate: float) -> dict[str, Any]:
    values = RELOAD_VALUES[variant % len(RELOAD_VALUES)]
    return {
        "clusters": ["pods"],
        "debug_header": DEBUG_HEADER,
        "tick_ms": TICK_MS,
        "discovery": {**values["discovery"]},
        "load": {"default_stream_rate": mean_rate},
        "zone": {**values["zone"]},
        "probe": {**values["probe"]},
        "rebalance": {"mode": "on", "allow_reset": True, "min_age_ms": 10000, **values["rebalance"]},
    }


def grace_s() -> float:
    """How long after a pod stops the filter may still name it (see the module doc)."""
    poll_ms = max(v["discovery"]["poll_ms"] for v in RELOAD_VALUES)
    return HEALTH_CHECK_S + poll_ms / 1000 + TICK_MS / 1000 + 0.5


# --- Envoy with an access log, a switchable admin gate and hot restart


class SoakEnvoy(kit.Envoy):
    """kit.Envoy (with lds=True) plus: an access log of every device stream (start time, the
    endpoint the filter named, the upstream used, gRPC status), an admin gate that can be
    switched to 503 (discovery fails), and hot restart (`--restart-epoch`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.gate_open = True
        self.base_id = random.randint(1_000, 2**31 - 1)
        self.epoch = 0
        self.old_procs: list[kit.Proc] = []
        self.access_log: Path | None = None
        self.lds_lock = threading.Lock()
        super().__init__(*args, lds=True, **kwargs)
        self.access_log = self.workdir / "access.log"
        self.write_config()

    def config(self) -> dict[str, Any]:
        config = super().config()
        # Counters latch on each admin read: across a hot restart the new epoch merges exactly
        # what the old one counted after our last read of it.
        config["stats_flush_on_admin"] = True
        listeners = config["static_resources"]["listeners"]
        if self.access_log is not None:
            devices = next(l for l in listeners if l["name"] == "devices")
            hcm = devices["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["access_log"] = [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(self.access_log),
                    "log_format": {"json_format": {
                        "start": "%START_TIME(%s.%3f)%",
                        "path": "%REQ(:PATH)%",
                        "device": "%REQ(X-DEVICE-ID)%",
                        "named": f"%REQ({self.endpoint_header.upper()})%",
                        "upstream": "%UPSTREAM_HOST%",
                        "grpc": "%GRPC_STATUS(NUMBER)%",
                        "flags": "%RESPONSE_FLAGS%",
                        "duration_ms": "%DURATION%",
                    }},
                },
            }]
        gate = next(l for l in listeners if l["name"] == "streamlb_admin_gate")
        gate_hcm = gate["filter_chains"][0]["filters"][0]["typed_config"]
        # One poll per connection: a pooled connection would stay on the drained gate listener
        # (old routes) for --drain-time-s after each switch.
        gate_hcm["common_http_protocol_options"] = {"max_requests_per_connection": 1}
        if not self.gate_open:
            gate_hcm["route_config"]["virtual_hosts"][0]["routes"] = [
                {"name": "down", "match": {"prefix": "/"}, "direct_response": {"status": 503}}
            ]
        return config

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--base-id") + 1] = str(self.base_id)
        return argv + ["--restart-epoch", str(self.epoch)]

    def set_admin_gate(self, open_: bool, timeout: float = 15.0) -> None:
        name = "listener_manager.lds.update_success"
        with self.lds_lock:
            before = self.stats(f"^{re.escape(name)}$").get(name, 0)
            self.gate_open = open_
            self._write_lds(self.config()["static_resources"]["listeners"])
            if not self.wait_for_counter(name, before + 1, timeout):
                raise RuntimeError("Envoy did not accept the admin gate update")

    def update_filter_config(self, filter_config: Any, timeout: float = 15.0) -> None:
        with self.lds_lock:  # faults run in parallel: one listener update at a time
            super().update_filter_config(filter_config, timeout)

    def hot_restart(self, timeout: float = 60.0) -> None:
        """Starts epoch N+1 beside the running Envoy; the old one drains and exits by itself
        (--drain-time-s, --parent-shutdown-time-s)."""
        assert self.proc is not None
        self.epoch += 1
        self.old_procs.append(self.proc)
        self.proc = kit.Proc(f"envoy-epoch{self.epoch}", self.argv(), self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.running():
                raise RuntimeError(f"hot restart: epoch {self.epoch} exited:\n{self.proc.tail(40)}")
            try:
                # /server_info, not /stats: a stats read of the old epoch would latch its counters.
                info = json.loads(self.admin("/server_info"))
                if int(info["command_line_options"]["restart_epoch"]) == self.epoch:
                    return
            except (urllib.error.URLError, ConnectionError, OSError, RuntimeError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"hot restart: epoch {self.epoch} did not take over:\n{self.proc.tail(40)}")

    def all_procs(self) -> list[kit.Proc]:
        return self.old_procs + ([self.proc] if self.proc else [])

    def log_text(self) -> str:
        return "\n".join(p.stderr_text() for p in self.all_procs())

    def close(self) -> None:
        for proc in self.old_procs:
            proc.stop()
        super().close()


# --- the schedule


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # seconds after the start
    duration: float = 0.0
    done: bool = False
    start_wall: float | None = None
    end_wall: float | None = None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def schedule(total_s: float, pods: list[dict[str, Any]], smoke: bool = False) -> list[Fault]:
    """The faults of a run of total_s seconds. smoke: one of each, squeezed into ~40 s."""
    if smoke:
        zone_c = [p["name"] for p in pods if p["zone"] == "c"]
        first = next(p["name"] for p in pods if p["zone"] == "a")
        return [
            Fault("pod-kill", first, 5, 6),
            Fault("admin-down", "all", 13, 8),
            Fault("reload", "all", 23),
            Fault("zone-down", "c:" + ",".join(zone_c), 27, 6),
            Fault("hot-restart", "envoy-a", 35),
        ]
    faults: list[Fault] = []
    zone_down = Fault("zone-down", "", 0.55 * total_s, 60)
    zone = "c"
    zone_down.target = zone + ":" + ",".join(p["name"] for p in pods if p["zone"] == zone)
    faults.append(zone_down)
    faults.append(Fault("admin-down", "all", 0.35 * total_s, 30))
    faults.append(Fault("hot-restart", "envoy-a", 0.85 * total_s))
    at = 150.0
    while at < total_s - 30:
        faults.append(Fault("reload", "all", at))
        at += 300
    # One pod a minute, round robin over the pods outside the downed zone at the time.
    order = [p["name"] for p in pods]
    k = 0
    for minute in range(1, int(total_s // 60) + 1):
        at = 60.0 * minute
        if at + 20 > total_s - 20:
            break
        overlaps_zone = zone_down.at - 20 <= at <= zone_down.at + zone_down.duration
        for _ in order:
            name = order[k % len(order)]
            k += 1
            if not (overlaps_zone and name in zone_down.target):
                break
        faults.append(Fault("pod-kill", name, at, 20))
    return sorted(faults, key=lambda f: f.at)


# --- devices with churn


class Cohort(threading.Thread):
    """Devices that come and go: runs `lab devices` with an exponential lifetime again and again
    (same device ids) until `until`; some runs carry a reconnect storm midway."""

    def __init__(self, name: str, target: str, streams: int, mean_rate: float, until: float,
                 mean_life: float, life_bounds: tuple[float, float], seed: int, storm_prob: float):
        super().__init__(name=name, daemon=True)
        self.target, self.streams, self.mean_rate, self.until = target, streams, mean_rate, until
        self.mean_life, self.life_bounds, self.storm_prob = mean_life, life_bounds, storm_prob
        self.rng = random.Random(seed)
        self.seed = seed
        self.runs: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.current: kit.Devices | None = None
        self.stopping = False

    def run(self) -> None:
        run = 0
        while not self.stopping:
            left = self.until - time.time()
            if left < self.life_bounds[0]:
                break
            life = min(max(self.rng.expovariate(1 / self.mean_life), self.life_bounds[0]), self.life_bounds[1], left)
            storm = life >= 20 and self.rng.random() < self.storm_prob
            extra = ["--device-prefix", self.name]
            if storm:
                extra += ["--storm-at", f"{life / 2:.1f}"]
            run += 1
            started = time.time()
            try:
                self.current = kit.Devices(self.target, self.streams, self.mean_rate, "zipf:0.8", life,
                                           reconnect=True, seed=self.seed * 1000 + run, extra_args=extra)
                summary = self.current.wait()
                self.runs.append({"start": started, "end": time.time(), "life": life, "storm": storm,
                                  "totals": summary["totals"],
                                  # reconnects include the storm's
                                  "attempts": sum(1 + s["reconnects"] for s in summary["streams"])})
            except Exception as err:  # noqa: BLE001 - recorded, reported, fails the ledger
                self.errors.append(f"{time.strftime('%H:%M:%S')} {err}"[:2000])
            finally:
                if self.current:
                    self.current.close()
                    self.current = None

    def stop(self) -> None:
        self.stopping = True
        if self.current:
            self.current.stop()


# --- sampling


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


STAT_RE = re.compile(
    r"^wasmcustom\.streamlb_(route_streams_ended_total|route_messages_total|route_streams_total"
    r"|rebalance_moves_total|discovery_polls_failed_total|discovery_polls_ok_total|decisions_total"
    r"|config_loads_total|host_errors_total|cas_lost_total)(.*)$"
)
TAG_RE = re.compile(r"(\w+)=\.=(.*?);\.;")


def filter_counters(envoy: SoakEnvoy) -> dict[str, float]:
    """The filter's counters of one Envoy, keyed `name{tag=value,...}` (route `telemetry` only
    for the per-route ones)."""
    out: dict[str, float] = {}
    for name, value in envoy.stats("^wasmcustom\\.streamlb_").items():
        m = STAT_RE.match(name)
        if not m:
            continue
        tags = dict(TAG_RE.findall(m.group(2)))
        if tags.get("route", "telemetry") != "telemetry":
            continue
        tags.pop("route", None)
        tags.pop("cluster", None)
        key = m.group(1) + ("{" + ",".join(f"{k}={v}" for k, v in sorted(tags.items())) + "}" if tags else "")
        out[key] = out.get(key, 0) + value
    return out


def summed(counters: dict[str, float], prefix: str, **tags: str) -> float:
    total = 0.0
    for key, value in counters.items():
        name, _, rest = key.partition("{")
        if name != prefix:
            continue
        kv = dict(t.split("=", 1) for t in rest.rstrip("}").split(",") if t)
        if all(kv.get(k) == v for k, v in tags.items()):
            total += value
    return total


# --- the run


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.total_s = args.minutes * 60
        self.samples: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.envoys: dict[str, SoakEnvoy] = {}
        self.pods: kit.Pods | None = None
        self.cohorts: list[Cohort] = []
        self.variant = 0
        self.lock = threading.Lock()
        self.sampling = threading.Lock()

    def log(self, text: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {text}", flush=True)

    # faults
    def apply(self, fault: Fault) -> None:
        assert self.pods is not None
        fault.start_wall = time.time()
        if fault.kind == "pod-kill":
            self.pods.stop(fault.target)
            time.sleep(fault.duration)
            self.pods.start(fault.target)
        elif fault.kind == "zone-down":
            names = fault.target.split(":", 1)[1].split(",")
            for name in names:
                self.pods.stop(name)
            time.sleep(fault.duration)
            for name in names:
                self.pods.start(name)
        elif fault.kind == "admin-down":
            before = {z: e.stats("polls_failed").get("wasmcustom.streamlb_discovery_polls_failed_total", 0)
                      for z, e in self.envoys.items()}
            for envoy in self.envoys.values():
                envoy.set_admin_gate(False)
            time.sleep(fault.duration)
            for envoy in self.envoys.values():
                envoy.set_admin_gate(True)
            time.sleep(2)
            fault.detail["polls_failed"] = {
                z: e.stats("polls_failed").get("wasmcustom.streamlb_discovery_polls_failed_total", 0) - before[z]
                for z, e in self.envoys.items()}
        elif fault.kind == "reload":
            self.variant += 1
            config = filter_config(self.variant, self.args.rate)
            loads = {z: e.stats("config_loads").get("wasmcustom.streamlb_config_loads_total", 0)
                     for z, e in self.envoys.items()}
            for envoy in self.envoys.values():
                envoy.update_filter_config(config)
            time.sleep(2)
            fault.detail["config"] = RELOAD_VALUES[self.variant % len(RELOAD_VALUES)]
            fault.detail["config_loads"] = {
                z: e.stats("config_loads").get("wasmcustom.streamlb_config_loads_total", 0) - loads[z]
                for z, e in self.envoys.items()}
        elif fault.kind == "hot-restart":
            envoy = self.envoys[fault.target.split("-", 1)[1]]
            with self.sampling:
                self.sample_locked()  # the old epoch's last read
                envoy.hot_restart()
            fault.detail["epoch"] = envoy.epoch
        fault.end_wall = time.time()

    def run_fault(self, fault: Fault) -> None:
        """One fault at its time, in its own thread (faults may overlap). Processes die with the
        thread that started them (PR_SET_PDEATHSIG): the thread stays until the run is torn
        down, so a hot-restarted Envoy lives on."""
        wait = self.t0 + fault.at - time.time()
        if not (wait > 0 and self.stop_event.wait(wait)):
            self.log(f"fault {fault.kind} {fault.target} ({fault.duration:g} s)")
            try:
                self.apply(fault)
            except Exception as err:  # noqa: BLE001 - reported as a failed fault
                fault.error = str(err)[:2000]
                fault.end_wall = fault.end_wall or time.time()
                self.log(f"fault {fault.kind} failed: {err}")
        fault.done = True
        self.release.wait()

    def start_faults(self, faults: list[Fault]) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.run_fault, args=(f,), daemon=True) for f in faults]
        for t in threads:
            t.start()
        return threads

    # sampling
    def sample(self) -> None:
        with self.sampling:
            self.sample_locked()

    def sample_locked(self) -> None:
        assert self.pods is not None
        now = time.time()
        entry: dict[str, Any] = {"t": now - self.t0, "rss": {}, "counters": {}, "epoch": {}, "pods_up": {}}
        for zone, envoy in self.envoys.items():
            entry["epoch"][zone] = envoy.epoch
            for proc in envoy.all_procs():
                if proc.running():
                    mb = rss_mb(proc.pid)
                    if mb is not None:
                        entry["rss"][f"envoy-{zone} ({proc.name}, pid {proc.pid})"] = mb
            try:
                entry["counters"][zone] = filter_counters(envoy)
            except (urllib.error.URLError, ConnectionError, OSError, RuntimeError, ValueError) as err:
                entry["counters"][zone] = None
                entry.setdefault("errors", []).append(f"envoy-{zone}: {err}")
            bad = [line for line in envoy.log_text().splitlines() if WASM_FAILURE.search(line)]
            if bad:
                with self.lock:
                    for line in bad[:5]:
                        if line not in self.failures:
                            self.failures.append(line)
        try:
            entry["pods_up"] = {p["name"]: p["up"] for p in self.pods.stats()["pods"]}
        except (urllib.error.URLError, ConnectionError, OSError, RuntimeError, ValueError):
            pass
        self.samples.append(entry)

    def run(self) -> dict[str, Any]:
        args = self.args
        self.stop_event = threading.Event()
        self.release = threading.Event()
        with kit.Pods(zones={z: args.pods_per_zone for z in ZONES}) as pods:
            self.pods = pods
            envoys = []
            try:
                for zone in ZONES:
                    envoy = SoakEnvoy(pods, filter_config=filter_config(0, args.rate), node_zone=zone,
                                      concurrency=args.concurrency,
                                      extra_args=["--drain-time-s", str(args.drain_s),
                                                  "--parent-shutdown-time-s", str(args.drain_s + 30)])
                    envoys.append(envoy)
                    envoy.start_process()
                    self.envoys[zone] = envoy
                for envoy in envoys:
                    if not envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_ok_total", 1, 30):
                        raise RuntimeError(f"no discovery:\n{envoy.log_text()[-3000:]}")
                return self._run(pods)
            finally:
                self.stop_event.set()
                self.release.set()
                for cohort in self.cohorts:
                    cohort.stop()
                for envoy in envoys:
                    envoy.close()

    def _run(self, pods: kit.Pods) -> dict[str, Any]:
        args = self.args
        self.t0 = time.time()
        until = self.t0 + self.total_s
        faults = schedule(self.total_s, pods.pods, smoke=args.smoke)
        for zone, envoy in self.envoys.items():
            for j in range(args.cohorts):
                cohort = Cohort(f"{zone}-c{j}", envoy.listen_addr, args.streams, args.rate, until,
                                args.mean_life, (args.min_life, args.max_life),
                                seed=args.seed * 100 + ZONES.index(zone) * 10 + j, storm_prob=args.storm_prob)
                self.cohorts.append(cohort)
                cohort.start()
        self.start_faults(faults)
        next_print = 0.0
        while any(c.is_alive() for c in self.cohorts) or time.time() < until:
            self.sample()
            if time.time() - self.t0 >= next_print:
                last = self.samples[-1]
                rss = ", ".join(f"{k.split(' ')[0]} {v:.0f}" for k, v in last["rss"].items())
                self.log(f"RSS MB: {rss}; cohorts alive {sum(c.is_alive() for c in self.cohorts)}")
                next_print += 60
            time.sleep(args.sample_s)
            if time.time() > until + args.max_life + 120:
                self.failures.append("devices did not finish in time")
                break
        self.stop_event.set()
        deadline = time.time() + 180
        while not all(f.done for f in faults) and time.time() < deadline:
            time.sleep(0.5)
        # The last ticks flush the counters; a hot-restarted Envoy merges its old epoch's counts
        # on its next stats flush. Read until two reads agree (at most 15 s).
        time.sleep(2.5 * TICK_MS / 1000)
        self.sample()
        for _ in range(15):
            time.sleep(1)
            before = self.samples[-1]["counters"]
            self.sample()
            if self.samples[-1]["counters"] == before:
                break
        return self.evaluate(faults)

    # evaluation
    def accumulate(self) -> None:
        """Each sample's `acc`: per Envoy, its counters plus the last values read from its
        earlier epochs (a hot-restarted Envoy starts its wasm stats from zero; what the old epoch
        counts after its admin closed is not observable)."""
        last: dict[str, dict[int, dict[str, float]]] = {}
        for s in self.samples:
            s["acc"] = {}
            for zone in self.envoys:
                epoch = s.get("epoch", {}).get(zone, 0)
                counters = s["counters"].get(zone)
                if counters is not None:
                    last.setdefault(zone, {})[epoch] = counters
                acc: dict[str, float] = {}
                for e, c in last.get(zone, {}).items():
                    if e <= epoch:
                        for k, v in c.items():
                            acc[k] = acc.get(k, 0) + v
                s["acc"][zone] = acc

    def evaluate(self, faults: list[Fault]) -> dict[str, Any]:
        args = self.args
        totals = {k: 0 for k in ("generated", "sent", "acked", "failed", "resent", "unacked", "lost", "unsent")}
        attempts = reconnects = storm_reconnects = 0
        statuses: dict[str, int] = {}
        runs = 0
        errors = []
        for cohort in self.cohorts:
            errors += cohort.errors
            for run in cohort.runs:
                runs += 1
                for k in totals:
                    totals[k] += run["totals"].get(k, 0)
                reconnects += run["totals"].get("reconnects", 0)
                storm_reconnects += run["totals"].get("storm_reconnects", 0)
                attempts += run["attempts"]
                for k, v in run["totals"].get("statuses", {}).items():
                    statuses[k] = statuses.get(k, 0) + v
        devices = {"counts": totals, "runs": runs, "stream_attempts": attempts, "reconnects": reconnects,
                   "storm_reconnects": storm_reconnects, "statuses": statuses, "errors": errors}

        self.accumulate()
        final = self.samples[-1]["acc"]
        filt: dict[str, Any] = {"up": 0.0, "down": 0.0, "streams": 0.0, "ended": {}, "moves": 0.0,
                                "polls_failed": 0.0}
        per_envoy = {}
        for zone, counters in final.items():
            up = summed(counters, "route_messages_total", direction="upstream")
            down = summed(counters, "route_messages_total", direction="downstream")
            filt["up"] += up
            filt["down"] += down
            filt["streams"] += summed(counters, "route_streams_total")
            filt["moves"] += summed(counters, "rebalance_moves_total") - summed(
                counters, "rebalance_moves_total", reason="planned")
            filt["polls_failed"] += summed(counters, "discovery_polls_failed_total")
            for cls in ("ok", "client_error", "server_error", "reset", "moved"):
                filt["ended"][cls] = filt["ended"].get(cls, 0) + summed(
                    counters, "route_streams_ended_total", status_class=cls)
            dev = {k: 0 for k in ("sent", "acked", "failed", "unacked")}
            attempts_zone = 0
            for cohort in self.cohorts:
                if cohort.name.startswith(zone + "-"):
                    for run in cohort.runs:
                        attempts_zone += run["attempts"]
                        for k in dev:
                            dev[k] += run["totals"].get(k, 0)
            restarted = self.envoys[zone].epoch > 0
            # Every acked reading passed the filter both ways; the filter saw no more than was
            # sent. Across a hot restart: the old epoch's counters as last read, plus the new
            # epoch's (which merges what the old one counts after that read while it drains).
            lower_ok = dev["acked"] <= up and dev["acked"] <= down
            upper_ok = up <= dev["sent"] and down <= dev["acked"] + dev["failed"] + dev["unacked"]
            per_envoy[zone] = {"filter_up": up, "filter_down": down, "filter_streams": summed(
                counters, "route_streams_total"), "devices": dev, "device_stream_attempts": attempts_zone,
                "hot_restarted": restarted, "pass": bool(lower_ok and upper_ok)}
        filt["per_envoy"] = per_envoy

        placement = self.placements(faults)
        rss = self.rss_slopes(faults)
        c = totals
        invariants = [
            ("no-wasm-failure", not self.failures, f"{len(self.failures)} failure lines"
             + ("" if not self.failures else ": " + self.failures[0][:300])),
            ("ledger", c["lost"] == 0 and c["unacked"] == 0 and c["sent"] == c["acked"] + c["failed"] + c["unacked"]
             and c["failed"] == c["resent"] and not errors and runs > 0,
             f"sent {c['sent']}, acked {c['acked']}, failed {c['failed']}, resent {c['resent']}, "
             f"unacked {c['unacked']}, lost {c['lost']}, never sent at the end {c['unsent']}; "
             f"{runs} device runs, {len(errors)} failed runs"),
            ("placement", placement["violations"] == 0 and placement["checked"] > 0,
             f"{placement['checked']} placements checked, {placement['on_down_pod_within_grace']} on a pod stopped "
             f"< {placement['grace_s']:.1f} s before (race, allowed), {placement['violations']} violations"),
            ("counters", bool(per_envoy) and all(v["pass"] for v in per_envoy.values()),
             "; ".join(f"envoy-{z}: filter up {v['filter_up']:.0f} / down {v['filter_down']:.0f}, devices sent "
                       f"{v['devices']['sent']} / acked {v['devices']['acked']} / failed {v['devices']['failed']}"
                       f"; streams {v['filter_streams']:.0f} / attempts {v['device_stream_attempts']}"
                       + (" (hot-restarted)" if v["hot_restarted"] else "")
                       for z, v in per_envoy.items())),
            ("rss-flat", bool(rss["segments"]) and all(s["slope_mb_per_10min"] < RSS_GOAL_MB_PER_10MIN
                                                       for s in rss["segments"] if s["span_s"] >= RSS_MIN_SPAN_S)
             and any(s["span_s"] >= RSS_MIN_SPAN_S for s in rss["segments"]),
             "; ".join(f"{s['name']}: {s['slope_mb_per_10min']:+.2f} MB/10 min over {s['span_s']:.0f} s "
                       f"(steps at reloads/hot restart {s['steps_at_reloads_mb']} MB; largest slope between them "
                       + ("-" if s["max_slope_between_reloads_mb_per_10min"] is None
                          else f"{s['max_slope_between_reloads_mb_per_10min']:+.2f}") + " MB/10 min)"
                       for s in rss["segments"]) or "no segment"),
        ]
        if args.smoke:
            # Too short for a slope: the smoke only checks the machinery.
            invariants = [i for i in invariants if i[0] != "rss-flat"]
        return {
            "started": dt.datetime.fromtimestamp(self.t0, dt.timezone.utc).isoformat(timespec="seconds"),
            "minutes": args.minutes,
            "wall_s": time.time() - self.t0,
            "setup": {"envoys": len(self.envoys), "concurrency": args.concurrency, "zones": list(ZONES),
                      "pods_per_zone": args.pods_per_zone, "cohorts_per_envoy": args.cohorts,
                      "streams_per_cohort": args.streams, "mean_rate": args.rate,
                      "mean_life_s": args.mean_life, "envoy": str(kit.envoy_bin())},
            "invariants": [{"name": n, "pass": bool(p), "detail": d} for n, p, d in invariants],
            "devices": devices,
            "filter": filt,
            "placement": placement,
            "faults": self.fault_rows(faults, placement),
            "rss": rss,
            "samples": self.samples,
        }

    def down_intervals(self, faults: list[Fault]) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for f in faults:
            if f.kind not in ("pod-kill", "zone-down") or f.start_wall is None:
                continue
            names = [f.target] if f.kind == "pod-kill" else f.target.split(":", 1)[1].split(",")
            end = f.end_wall or time.time()
            for name in names:
                out.setdefault(name, []).append((f.start_wall, end))
        return out

    def access_entries(self) -> list[dict[str, Any]]:
        entries = []
        for zone, envoy in self.envoys.items():
            if envoy.access_log is None or not envoy.access_log.exists():
                continue
            for line in envoy.access_log.read_text(errors="replace").splitlines():
                try:
                    e = json.loads(line)
                    e["start"] = float(e["start"])
                except (ValueError, KeyError, TypeError):
                    continue
                if not str(e.get("path", "")).startswith("/streamlb.lab.v1.Telemetry/"):
                    continue
                e["envoy"] = zone
                entries.append(e)
        return entries

    def placements(self, faults: list[Fault]) -> dict[str, Any]:
        assert self.pods is not None
        grace = grace_s()
        down = self.down_intervals(faults)
        by_address = {p["address"]: p["name"] for p in self.pods.pods}
        checked = named = race = 0
        violations: list[dict[str, Any]] = []
        for e in self.access_entries():
            checked += 1
            first = str(e.get("named") or "").split(",")[0].strip()
            if not first or first == "-":
                continue  # fallback: Envoy's own policy picked (it skips unhealthy hosts)
            named += 1
            pod = by_address.get(first)
            for start, end in down.get(pod or "", []):
                if start <= e["start"] < end:
                    if e["start"] < start + grace:
                        race += 1
                    else:
                        violations.append({**e, "pod": pod, "down_since_s": e["start"] - start})
        return {"checked": checked, "named": named, "grace_s": grace, "on_down_pod_within_grace": race,
                "violations": len(violations), "violation_examples": violations[:10]}

    def at(self, wall: float) -> dict[str, Any]:
        """The last sample taken at or before `wall` (the first if none)."""
        t = wall - self.t0
        best = self.samples[0]
        for s in self.samples:
            if s["t"] <= t:
                best = s
        return best

    def fault_rows(self, faults: list[Fault], placement: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        entries = self.access_entries()
        for f in faults:
            if f.start_wall is None:
                rows.append({"kind": f.kind, "target": f.target, "at_s": f.at, "ran": False, "error": f.error})
                continue
            end = (f.end_wall or f.start_wall) + self.args.settle_s
            a = self.at(f.start_wall - 0.01)
            b = self.at(end)

            def delta(prefix: str, **tags: str) -> float:
                total = 0.0
                for zone in self.envoys:
                    total += summed(b["acc"][zone], prefix, **tags) - summed(a["acc"][zone], prefix, **tags)
                return total

            failed_streams = sum(1 for e in entries if f.start_wall <= e["start"] + float(e.get("duration_ms") or 0) / 1000
                                 < end and str(e.get("grpc")) not in ("0", "-", "None", ""))
            rows.append({
                "kind": f.kind, "target": f.target, "at_s": round(f.start_wall - self.t0, 1),
                "duration_s": round((f.end_wall or f.start_wall) - f.start_wall, 1), "ran": True, "error": f.error,
                "window_s": round(end - f.start_wall, 1),
                "errors": delta("route_streams_ended_total", status_class="server_error")
                + delta("route_streams_ended_total", status_class="reset")
                + delta("route_streams_ended_total", status_class="client_error"),
                "moved": delta("route_streams_ended_total", status_class="moved"),
                "streams_started": delta("route_streams_total"),
                "polls_failed": delta("discovery_polls_failed_total"),
                "fallback_decisions": delta("decisions_total", reason="fallback"),
                "streams_ended_not_ok_access_log": failed_streams,
                "detail": f.detail,
            })
        return rows

    def rss_slopes(self, faults: list[Fault]) -> dict[str, Any]:
        """Per Envoy process, after warm-up: the least-squares slope over the whole run, the
        RSS steps at reloads and hot restarts, and the largest slope between them (windows of at
        least 2 minutes)."""
        warm = RSS_WARMUP_FRACTION * self.total_s
        cuts = sorted(f.start_wall - self.t0 for f in faults
                      if f.kind in ("reload", "hot-restart") and f.start_wall is not None)
        series: dict[str, list[tuple[float, float]]] = {}
        for s in self.samples:
            for name, mb in s["rss"].items():
                series.setdefault(name, []).append((s["t"], mb))
        segments = []
        for name, points in series.items():
            pts = [(t, mb) for t, mb in points if t >= warm]
            if len(pts) < 3:
                continue
            steps = []
            for cut in cuts:
                before = [mb for t, mb in pts if t < cut]
                after = [mb for t, mb in pts if cut + 20 <= t]
                if before and after:
                    steps.append(round(after[0] - before[-1], 2))
            bounds = [pts[0][0]] + [c for c in cuts if pts[0][0] < c < pts[-1][0]] + [pts[-1][0] + 1]
            between = [slope([(t, mb) for t, mb in pts if lo + (20 if k else 0) <= t < hi])
                       for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi - lo >= 120]
            segments.append({"name": name, "span_s": pts[-1][0] - pts[0][0], "points": len(pts),
                             "slope_mb_per_10min": slope(pts) * 600, "rss_mb_first": pts[0][1],
                             "rss_mb_last": pts[-1][1], "rss_mb_max": max(mb for _, mb in pts),
                             "steps_at_reloads_mb": steps,
                             "max_slope_between_reloads_mb_per_10min":
                                 max((b * 600 for b in between), default=None)})
        return {"warmup_s": warm, "segments": segments, "series": series}


def slope(pts: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) points, per second (0 with fewer than 2 distinct t)."""
    if len(pts) < 2:
        return 0.0
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    my = sum(y for _, y in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    return sum((t - mt) * (y - my) for t, y in pts) / var if var else 0.0


# --- report


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    from streamlb_testkit import plots  # noqa: PLC0415 (matplotlib is slow to import)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    fig = plots.figure(9, 3.5)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(result["rss"]["series"].items()):
        ax.plot([t / 60 for t, _ in points], [mb for _, mb in points], color=plots.color(i), label=name, lw=1.2)
    for f in result["faults"]:
        if f.get("ran"):
            ax.axvline(f["at_s"] / 60, color="#bbb", lw=0.6, ls=":")
    ax.axvline(result["rss"]["warmup_s"] / 60, color="#888", lw=0.8, ls="--")
    ax.set_xlabel("minutes (dotted: faults; dashed: end of warm-up)")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Envoy RSS per process")
    ax.legend(fontsize=7, loc="lower right")
    chart = plots.svg(fig)
    inv = plots.html_table(["invariant", "result", "detail"],
                           [(i["name"], "PASS" if i["pass"] else "FAIL", i["detail"]) for i in result["invariants"]])
    faults = plots.html_table(
        ["fault", "target", "at (s)", "lasted (s)", "window (s)", "errors", "moved", "streams started",
         "failed polls", "fallback placements", "streams ended not OK (access log)", "detail / error"],
        [(f["kind"], f["target"], f.get("at_s"), f.get("duration_s", ""), f.get("window_s", ""),
          f"{f.get('errors', 0):.0f}", f"{f.get('moved', 0):.0f}", f"{f.get('streams_started', 0):.0f}",
          f"{f.get('polls_failed', 0):.0f}", f"{f.get('fallback_decisions', 0):.0f}",
          f.get("streams_ended_not_ok_access_log", ""),
          f.get("error") or json.dumps(f.get("detail", {}))) for f in result["faults"]])
    rss = plots.html_table(
        ["Envoy process", "span after warm-up (s)", "slope (MB / 10 min)", "first", "last", "max",
         "steps at reloads / hot restart (MB)", "largest slope between them (MB / 10 min)"],
        [(s["name"], f"{s['span_s']:.0f}", f"{s['slope_mb_per_10min']:+.2f}", f"{s['rss_mb_first']:.1f}",
          f"{s['rss_mb_last']:.1f}", f"{s['rss_mb_max']:.1f}", ", ".join(f"{x:+.2f}" for x in s["steps_at_reloads_mb"]),
          "" if s["max_slope_between_reloads_mb_per_10min"] is None
          else f"{s['max_slope_between_reloads_mb_per_10min']:+.2f}")
         for s in result["rss"]["segments"]])
    d = result["devices"]
    setup = plots.esc(json.dumps(result["setup"]))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>streamlb soak</title>
<style>{plots.STYLE}</style></head><body>
<h1>streamlb soak: {result['minutes']:g} minutes from {result['started']}</h1>
<p>Setup: <code>{setup}</code></p>
<h2>Invariants</h2>{inv}
<h2>Faults: errors and moves in each fault's window (start to end + settle)</h2>{faults}
<p>errors: streams the filter counted as ended with <code>server_error</code>, <code>reset</code> or
<code>client_error</code>, over the three Envoys; moved: streams ended by the rebalancer.</p>
<h2>Envoy RSS</h2>{chart}{rss}
<h2>Devices</h2><p>{d['runs']} device runs, {d['stream_attempts']} stream attempts ({d['reconnects']} reconnects,
{d['storm_reconnects']} in storms); statuses {plots.esc(json.dumps(d['statuses']))};
ledger {plots.esc(json.dumps(d['counts']))}</p>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--smoke", action="store_true", help="one fault of each kind in ~40 s, no RSS verdict")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--pods-per-zone", type=int, default=2)
    p.add_argument("--cohorts", type=int, default=3, help="device cohorts per Envoy")
    p.add_argument("--streams", type=int, default=8, help="streams per cohort")
    p.add_argument("--rate", type=float, default=3.0, help="mean msgs/s per stream (Zipf 0.8)")
    p.add_argument("--mean-life", type=float, default=90, help="mean cohort lifetime, s")
    p.add_argument("--min-life", type=float, default=20)
    p.add_argument("--max-life", type=float, default=240)
    p.add_argument("--storm-prob", type=float, default=0.3, help="share of cohort runs with a storm midway")
    p.add_argument("--drain-s", type=int, default=120, help="Envoy --drain-time-s (LDS updates, hot restart)")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--settle-s", type=float, default=10.0, help="a fault's window lasts this long past its end")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", default=str(kit.REPO / "build" / "soak"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak = Soak(args)
    soak.t0 = time.time()
    result = soak.run()
    path = write_report(result, Path(args.out_dir))
    for i in result["invariants"]:
        print(f"{'PASS' if i['pass'] else 'FAIL'} {i['name']}: {i['detail']}")
    for f in result["faults"]:
        print(f"fault {f['kind']:11} {f['target']:>14} at {f.get('at_s')}s: errors {f.get('errors', 0):.0f}, "
              f"moved {f.get('moved', 0):.0f}, failed polls {f.get('polls_failed', 0):.0f}"
              + (f", ERROR {f['error']}" if f.get("error") else ""))
    print(f"report: {path}")
    return 0 if all(i["pass"] for i in result["invariants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
