#!/usr/bin/env python3
"""Live demo (`make run`): lab pods in zones a, b, c, Envoy with the streamlb filter, and
simulated devices; every second it shows each pod's message rate, the imbalance (max/mean) and
the cross-zone share. Ctrl-C stops everything. Without a terminal it prints plain lines.

  max/mean    = max_j m_j / mean_j m_j over pods j, m_j = messages in the last interval
  cross-zone  = messages on pods outside Envoy's zone / all messages
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time

import streamlb_testkit as kit

CLEAR = "\x1b[H\x1b[2J"
BAR = "█"
STREAMLB_STAT = re.compile(r"^(?:wasmcustom\.)?streamlb")
# The filter's first successful endpoint discovery: devices start after it (or after 15 s).
DISCOVERY_STAT = "wasmcustom.streamlb_discovery_polls_ok_total"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60, help="seconds of device traffic")
    parser.add_argument("--streams", type=int, default=60, help="device streams")
    parser.add_argument("--rate", type=float, default=20, help="mean messages/s per stream")
    parser.add_argument("--dist", default="zipf:0.8", help="rate distribution across streams")
    parser.add_argument("--zones", default="a=2,b=2,c=2", help="pods per zone")
    parser.add_argument("--node-zone", default="a", help="Envoy's zone")
    parser.add_argument("--lb", default="override_host", choices=kit.LB_CHOICES)
    parser.add_argument("--no-filter", action="store_true", help="run Envoy without streamlb (baseline)")
    parser.add_argument("--filter-config", default=json.dumps(kit.DEFAULT_FILTER_CONFIG), help="JSON")
    parser.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    parser.add_argument("--ramp", type=float, default=0, help="spread stream starts over this many seconds")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def streamlb_counters(envoy: kit.Envoy) -> dict[str, float]:
    try:
        stats = envoy.stats()
    except Exception:  # noqa: BLE001 (a slow admin answer must not end the demo)
        return {}
    return {name: value for name, value in stats.items() if STREAMLB_STAT.match(name)}


def short_stat_name(name: str) -> str:
    """wasmcustom.streamlb_decisions_total.cluster=.=pods;.;reason=.=local;.; -> streamlb_decisions_total{cluster=pods,reason=local}"""
    name = name.removeprefix("wasmcustom.")
    tags = re.findall(r"\.?([a-z_]+)=\.=(.*?);\.;", name)
    base = re.sub(r"\.?[a-z_]+=\.=.*?;\.;", "", name)
    return base + ("{" + ",".join(f"{k}={v}" for k, v in tags) + "}" if tags else "")


class View:
    def __init__(self, pods: kit.Pods, node_zone: str, interactive: bool):
        self.pods = pods
        self.node_zone = node_zone
        self.interactive = interactive
        self.started = time.monotonic()
        self.last = self._messages()
        self.first = dict(self.last)
        self.last_time = time.monotonic()
        self.imbalance: list[float] = []
        self.cross_shares: list[float] = []

    def _messages(self) -> dict[str, int]:
        return {name: int(s.get("messages", 0)) for name, s in self.pods.pod_stats().items()}

    def tick(self, counters: dict[str, float], devices_running: bool) -> None:
        now = time.monotonic()
        current = self._messages()
        elapsed = max(now - self.last_time, 1e-6)
        rates = {name: (current[name] - self.last.get(name, 0)) / elapsed for name in current}
        self.last, self.last_time = current, now

        values = list(rates.values())
        mean = ratio(sum(values), len(values))
        max_over_mean = ratio(max(values, default=0.0), mean)
        zone_of = {p["name"]: p["zone"] for p in self.pods.pods}
        cross = ratio(sum(r for n, r in rates.items() if zone_of[n] != self.node_zone), sum(values))
        if sum(values) > 0:
            self.imbalance.append(max_over_mean)
            self.cross_shares.append(cross)

        t = now - self.started
        if self.interactive:
            self._draw(t, rates, mean, max_over_mean, cross, counters, devices_running)
        else:
            per_pod = " ".join(f"{n}={r:.0f}" for n, r in rates.items())
            print(
                f"t={t:5.1f}s msgs/s {per_pod} | max/mean={max_over_mean:.2f} cross-zone={cross:.1%}",
                flush=True,
            )

    def _draw(self, t, rates, mean, max_over_mean, cross, counters, devices_running) -> None:
        columns, rows = shutil.get_terminal_size((100, 30))
        width = max(10, columns - 34)
        top = max(rates.values(), default=0.0) or 1.0
        lines = [
            f"streamlb demo  t={t:5.1f}s  Envoy zone {self.node_zone}"
            + ("" if devices_running else "  (devices finished)"),
            "",
        ]
        for zone in self.pods.zone_names():
            marker = " (local)" if zone == self.node_zone else ""
            lines.append(f"zone {zone}{marker}")
            for pod in self.pods.pods:
                if pod["zone"] != zone:
                    continue
                rate = rates.get(pod["name"], 0.0)
                bar = BAR * int(round(width * rate / top))
                lines.append(f"  {pod['name']:<8} {rate:8.0f}/s {bar}")
        lines += [
            "",
            f"mean {mean:8.0f} msgs/s per pod   max/mean {max_over_mean:5.2f}   cross-zone {cross:6.1%}",
        ]
        if counters:
            lines += ["", "streamlb counters:"]
            lines += [f"  {short_stat_name(n)} = {v:g}" for n, v in sorted(counters.items())]
        if len(lines) > rows - 1:  # never scroll: that would break the redraw
            lines = lines[: rows - 2] + ["  …"]
        sys.stdout.write(CLEAR + "\n".join(lines) + "\n")
        sys.stdout.flush()

    def summary(self, devices_summary: dict | None, counters: dict[str, float]) -> str:
        total = self._messages()
        gained = {n: total[n] - self.first.get(n, 0) for n in total}
        zone_of = {p["name"]: p["zone"] for p in self.pods.pods}
        all_msgs = sum(gained.values())
        lines = [
            "",
            "== summary ==",
            "messages per pod: " + " ".join(f"{n}={m}" for n, m in gained.items()),
            f"overall max/mean {ratio(max(gained.values(), default=0), ratio(all_msgs, len(gained))):.3f}"
            f"  cross-zone share {ratio(sum(m for n, m in gained.items() if zone_of[n] != self.node_zone), all_msgs):.1%}",
        ]
        if self.imbalance:
            ordered = sorted(self.imbalance)
            lines.append(
                f"per-second max/mean: median {ordered[len(ordered) // 2]:.2f}, worst {ordered[-1]:.2f}"
            )
        if devices_summary:
            totals = devices_summary.get("totals", {})
            lines.append("devices: " + json.dumps(totals, sort_keys=True))
            if devices_summary.get("latency_ms"):
                lines.append("ack latency ms: " + json.dumps(devices_summary["latency_ms"], sort_keys=True))
        for name, value in sorted(counters.items()):
            lines.append(f"{short_stat_name(name)} = {value:g}")
        return "\n".join(lines)


def main() -> int:
    args = parse_args()

    def stop_on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_term)
    zones = {zone: int(count) for zone, count in (kv.split("=") for kv in args.zones.split(","))}
    filter_config = None if args.no_filter else json.loads(args.filter_config)
    interactive = sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb"

    pods = envoy = devices = None
    devices_summary = None
    counters: dict[str, float] = {}
    try:
        pods = kit.Pods(zones=zones).start_process()
        envoy = kit.Envoy(
            pods, filter_config=filter_config, lb=args.lb, node_zone=args.node_zone, concurrency=args.concurrency
        ).start_process()
        print(
            f"pods: {', '.join(p['name'] + '@' + p['address'] for p in pods.pods)}\n"
            f"envoy: listen {envoy.listen_addr}, admin {envoy.admin_addr}, lb {args.lb}, "
            f"filter {'off' if filter_config is None else 'on'}",
            flush=True,
        )
        if filter_config is not None and not envoy.wait_for_counter(DISCOVERY_STAT, timeout=15):
            print(f"warning: no {DISCOVERY_STAT} after 15 s; starting devices anyway", flush=True)
        devices = kit.start_devices(
            envoy.listen_addr,
            args.streams,
            args.rate,
            args.dist,
            args.duration,
            seed=args.seed,
            extra_args=["--ramp", str(args.ramp)] if args.ramp else [],
        )
        view = View(pods, args.node_zone, interactive)
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            time.sleep(args.interval)
            counters = streamlb_counters(envoy)
            view.tick(counters, devices.running())
        try:
            devices_summary = devices.wait(timeout=30)
        except RuntimeError as err:
            print(f"devices: {err}", file=sys.stderr)
        counters = streamlb_counters(envoy)
        print(view.summary(devices_summary, counters), flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nstopped", flush=True)
        return 130
    finally:
        for part in (devices, envoy, pods):
            if part is not None:
                part.close()
        kit.stop_all()


if __name__ == "__main__":
    sys.exit(main())
