#!/usr/bin/env python3
"""Live demo (`make run`): the same devices (same rates, same seed) against three routings, one
after the other, each for --duration seconds with a reconnect storm midway:

  least_request       Envoy's least_request, no filter (the baseline)
  streamlb            the filter, placement only (rebalance off)
  streamlb_rebalance  the filter with rebalancing on (rebalance: {mode: on, allow_reset: true});
                      the streams it ends reconnect and are placed again

Each run gets fresh lab pods (zones a, b, c by default), fresh Envoys (one, or one per zone
with --envoys 3, each with its own devices) and `lab devices` that reconnect when a stream is
ended. At --storm-at every device drops its stream and reconnects at once, as after a gateway
restart (the Envoys keep running: streamlb's rate memory and the pods' load reports survive).
Every second the screen shows each pod's message rate, grouped by zone. At the end it prints one
summary table and writes an HTML report (per-pod rate over time for each routing).

  max/mean    per 1 s bin: max_j m_j / mean_j m_j over pods j (m_j = messages the pod
              received in the bin); median and p90 over the bins of the run, and per half
              (before / after the storm) the median of its bins and of its last 3 bins
  cross-zone  acked messages served by a pod outside the zone of the device's gateway / all
  p99         ack latency (ack received - reading due), worst device group
  lost        readings the devices generated and never got acked (their ledger)
  LPT         max/mean of the longest-processing-time-first greedy over the devices' rates:
              what a placement that knew every rate in advance would reach
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import streamlb_testkit as kit

CLEAR = "\x1b[H\x1b[2J"
BAR = "█"
# The filter's counters the live view shows (all of them are in Envoy's /stats).
STREAMLB_STAT = re.compile(
    r"^(?:wasmcustom\.)?streamlb_(?:decisions_total|decisions_by_view_total|rebalance_moves_total|probes_total"
    r"|fleet_pods_reporting|route_streams_active)"
)
# The filter's first successful endpoint discovery: devices start after it (or after 15 s).
DISCOVERY_STAT = "wasmcustom.streamlb_discovery_polls_ok_total"
DEFAULT_ZONES = "eu-west-1a=2,eu-west-1b=2,eu-west-1c=2"
# "last N s" of a phase in the table: where the rebalancer has got to (the median of its bins).
SETTLED_BINS = 3

# name -> (what it is, Envoy lb, filter configuration or None)
POLICIES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "least_request": ("Envoy least_request, no filter", "least_request", None),
    "streamlb": ("streamlb, placement only", "override_host", {"rebalance": {"mode": "off"}}),
    "streamlb_rebalance": (
        "streamlb, rebalancing on",
        "override_host",
        {"rebalance": {"mode": "on", "allow_reset": True}},
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=36, help="seconds of device traffic per routing")
    parser.add_argument("--streams", type=int, default=60, help="device streams (split evenly over the gateways)")
    parser.add_argument("--rate", type=float, default=20, help="mean messages/s per stream")
    parser.add_argument("--dist", default="zipf:0.8", help="rate distribution across streams: constant, zipf:S, pareto:A")
    parser.add_argument("--envoys", type=int, default=1, choices=(1, 3),
                        help="1: one gateway in --node-zone; 3: one per zone (the first three), each with its own devices")
    parser.add_argument("--storm-at", type=float, default=None,
                        help="seconds into each run when every device reconnects at once (default: half of --duration)")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--zones", default=DEFAULT_ZONES, help="pods per zone")
    parser.add_argument("--node-zone", default=None, help="the gateway's zone with --envoys 1 (default: the first zone)")
    parser.add_argument("--filter-config", default="{}", help="JSON merged over both streamlb configurations")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="Envoy worker threads per gateway (default: 2 with one gateway, 1 with three)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (and samples)")
    parser.add_argument("--ramp", type=float, default=0, help="spread the first stream starts over this many seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out-dir", default=str(kit.REPO / "build" / "demo"),
                        help="where report.html and demo.json go")
    args = parser.parse_args(argv)
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in args.policies:
        if name not in POLICIES:
            parser.error(f"unknown policy {name!r}: use {', '.join(POLICIES)}")
    try:
        args.zones = {zone: int(count) for zone, count in (kv.split("=") for kv in args.zones.split(","))}
    except ValueError:
        parser.error(f"bad --zones {args.zones!r}: expected ZONE=COUNT,...")
    if args.envoys > len(args.zones):
        parser.error(f"--envoys {args.envoys} needs as many zones, got {len(args.zones)}")
    args.node_zone = args.node_zone or next(iter(args.zones))
    if args.node_zone not in args.zones:
        parser.error(f"--node-zone {args.node_zone!r} is not one of the zones")
    if args.storm_at is None:
        args.storm_at = args.duration / 2
    if not 0 < args.storm_at < args.duration:
        parser.error("--storm-at must be within (0, --duration)")
    if args.streams < args.envoys:
        parser.error("--streams must be at least --envoys")
    try:
        args.filter_config = json.loads(args.filter_config)
    except json.JSONDecodeError as err:
        parser.error(f"--filter-config is not JSON: {err}")
    if args.concurrency is None:
        args.concurrency = 2 if args.envoys == 1 else 1
    return args


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def filter_config(policy: str, extra: dict) -> dict | None:
    own = POLICIES[policy][2]
    return None if own is None else merged(merged(kit.DEFAULT_FILTER_CONFIG, own), extra)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q * len(ordered))) - 1)]


def short_stat_name(name: str) -> str:
    """wasmcustom.streamlb_decisions_total.cluster=.=pods;.;reason=.=local;.; -> streamlb_decisions_total{cluster=pods,reason=local}"""
    name = name.removeprefix("wasmcustom.")
    tags = re.findall(r"\.?([a-z_]+)=\.=(.*?);\.;", name)
    base = re.sub(r"\.?[a-z_]+=\.=.*?;\.;", "", name)
    return base + ("{" + ",".join(f"{k}={v}" for k, v in tags) + "}" if tags else "")


def streamlb_counters(envoys: list[kit.Envoy]) -> dict[str, float]:
    """The filter's counters and gauges, summed over the gateways, by short name."""
    out: dict[str, float] = {}
    for envoy in envoys:
        try:
            stats = envoy.stats()
        except Exception:  # noqa: BLE001 (a slow admin answer must not end the demo)
            continue
        for name, value in stats.items():
            if STREAMLB_STAT.match(name):
                short = short_stat_name(name)
                out[short] = out.get(short, 0) + value
    return out


class Screen:
    """The live view: one redraw per sample (or one plain line without a terminal)."""

    def __init__(self, args: argparse.Namespace, pods_meta: list[dict], done: list[dict]):
        self.args = args
        self.pods_meta = pods_meta
        self.done = done
        self.interactive = sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb"

    def show(self, policy: str, index: int, t: float, rates: dict[str, float], gateway_zones: list[str],
             counters: dict[str, float]) -> None:
        values = list(rates.values())
        mean = ratio(sum(values), len(values))
        max_over_mean = ratio(max(values, default=0.0), mean)
        phase = "before the storm" if t < self.args.storm_at else "after the storm"
        if not self.interactive:
            per_pod = " ".join(f"{n}={r:.0f}" for n, r in rates.items())
            print(f"{policy} t={t:5.1f}s ({phase}) msgs/s {per_pod} | max/mean={max_over_mean:.2f}", flush=True)
            return
        columns, rows = shutil.get_terminal_size((100, 30))
        name_width = max(len(p["name"]) for p in self.pods_meta)
        width = max(10, columns - name_width - 20)
        top = max(values, default=0.0) or 1.0
        storm = "  STORM: every device reconnects" if abs(t - self.args.storm_at) < self.args.interval else ""
        lines = [
            f"streamlb demo  [{index + 1}/{len(self.args.policies)}] {policy}: {POLICIES[policy][0]}",
            f"t={t:5.1f}s of {self.args.duration:.0f}s, storm at {self.args.storm_at:.0f}s ({phase}){storm}",
            f"gateways in {', '.join(gateway_zones)}",
            "",
        ]
        for zone in dict.fromkeys(p["zone"] for p in self.pods_meta):
            lines.append(f"zone {zone}" + (" (has a gateway)" if zone in gateway_zones else ""))
            for pod in self.pods_meta:
                if pod["zone"] == zone:
                    rate = rates.get(pod["name"], 0.0)
                    lines.append(f"  {pod['name']:<{name_width}} {rate:7.0f}/s {BAR * int(round(width * rate / top))}")
        lines += ["", f"mean {mean:7.0f} msgs/s per pod   max/mean now {max_over_mean:5.2f}"]
        for summary in self.done:
            lines.append(
                f"done: {summary['policy']:<19} max/mean median {fmt(summary['max_over_mean']['all']['median'])}"
                f", after the storm {fmt(summary['max_over_mean']['after']['median'])}"
            )
        if counters:
            lines += ["", "streamlb counters (summed over the gateways):"]
            lines += [f"  {name} = {value:g}" for name, value in sorted(counters.items())]
        if len(lines) > rows - 1:  # never scroll: that would break the redraw
            lines = lines[: rows - 2] + ["  …"]
        sys.stdout.write(CLEAR + "\n".join(lines) + "\n")
        sys.stdout.flush()


def gateway_zones(args: argparse.Namespace) -> list[str]:
    return [args.node_zone] if args.envoys == 1 else list(args.zones)[: args.envoys]


def run_policy(policy: str, index: int, args: argparse.Namespace, screen: Screen) -> dict:
    """One routing: fresh pods, gateways and devices; samples the pods every interval. Every
    process started here is stopped when it returns or raises."""
    zones = gateway_zones(args)
    config = filter_config(policy, args.filter_config)
    lb = POLICIES[policy][1]
    with contextlib.ExitStack() as stack:
        pods = stack.enter_context(kit.Pods(zones=args.zones))
        screen.pods_meta = pods.pods
        envoys = [
            stack.enter_context(
                kit.Envoy(pods, filter_config=config, lb=lb, node_zone=zone, concurrency=args.concurrency,
                          log_level="warn")
            )
            for zone in zones
        ]
        if config is not None:
            for envoy in envoys:
                if not envoy.wait_for_counter(DISCOVERY_STAT, timeout=15):
                    print(f"warning: no {DISCOVERY_STAT} after 15 s; starting devices anyway", flush=True)
            time.sleep(1.2)  # every worker applies the snapshot on its next tick
        groups = []
        for zi, (zone, envoy) in enumerate(zip(zones, envoys)):
            streams = args.streams // len(zones) + (1 if zi < args.streams % len(zones) else 0)
            extra = ["--storm-at", str(args.storm_at), "--device-prefix", f"{zone}-dev"]
            if args.ramp:
                extra += ["--ramp", str(args.ramp)]
            devices = kit.start_devices(envoy.listen_addr, streams, args.rate, args.dist, args.duration,
                                        seed=args.seed + zi, reconnect=True, extra_args=extra)
            stack.enter_context(devices)
            groups.append((zone, devices))
        t0 = time.monotonic()
        samples = [{"t": 0.0, "messages": {n: s["messages"] for n, s in pods.pod_stats().items()}}]
        while True:
            next_t = samples[-1]["t"] + args.interval
            if next_t > args.duration + 1e-6:
                break
            time.sleep(max(0.0, t0 + next_t - time.monotonic()))
            now = time.monotonic() - t0
            samples.append({"t": now, "messages": {n: s["messages"] for n, s in pods.pod_stats().items()}})
            a, b = samples[-2], samples[-1]
            rates = {n: (b["messages"][n] - a["messages"].get(n, 0)) / max(1e-6, b["t"] - a["t"]) for n in b["messages"]}
            screen.show(policy, index, now, rates, zones, streamlb_counters(envoys) if config else {})
        counters = streamlb_counters(envoys) if config else {}
        reports = []
        for zone, devices in groups:
            report = devices.wait(timeout=60)
            report["gateway_zone"] = zone
            reports.append(report)
        pods_meta = pods.pods
    return summarise(policy, args, samples, reports, pods_meta, counters)


def summarise(policy: str, args: argparse.Namespace, samples: list[dict], reports: list[dict],
              pods_meta: list[dict], counters: dict[str, float]) -> dict:
    names = [p["name"] for p in pods_meta]
    zone_of = {p["name"]: p["zone"] for p in pods_meta}
    bins = []
    for a, b in zip(samples, samples[1:]):
        span = b["t"] - a["t"]
        rates = {n: (b["messages"][n] - a["messages"].get(n, 0)) / span for n in names}
        mean = sum(rates.values()) / len(rates)
        bins.append({"start": a["t"], "t": b["t"], "rates": rates,
                     "max_over_mean": ratio(max(rates.values()), mean) if mean > 0 else None})
    phases = {
        "all": [x["max_over_mean"] for x in bins if x["max_over_mean"] is not None],
        "before": [x["max_over_mean"] for x in bins if x["max_over_mean"] is not None and x["t"] <= args.storm_at],
        "after": [x["max_over_mean"] for x in bins if x["max_over_mean"] is not None and x["start"] >= args.storm_at],
    }
    settled = {k: quantile(v[-SETTLED_BINS:], 0.5) for k, v in phases.items() if k != "all"}
    acked = cross = generated = 0
    streams, rates, storm, other = 0, [], 0, 0
    statuses: dict[str, int] = {}
    for report in reports:
        for stream in report["streams"]:
            streams += 1
            rates.append(stream["rate"])
            for pod, n in stream.get("acked_by_pod", {}).items():
                acked += n
                if zone_of.get(pod) != report["gateway_zone"]:
                    cross += n
        totals = report["totals"]
        generated += totals["generated"]
        storm += totals.get("storm_reconnects", 0)
        other += totals["reconnects"] - totals.get("storm_reconnects", 0)
        for status, n in totals.get("statuses", {}).items():
            statuses[status] = statuses.get(status, 0) + n
    total_acked = sum(r["totals"]["acked"] for r in reports)
    return {
        "policy": policy,
        "description": POLICIES[policy][0],
        "bins": [{"t": x["t"], "rates": x["rates"], "max_over_mean": x["max_over_mean"]} for x in bins],
        "max_over_mean": {k: {"median": quantile(v, 0.5), "p90": quantile(v, 0.9), "last": settled.get(k)}
                          for k, v in phases.items()},
        "cross_zone": ratio(cross, acked) if acked else None,
        "latency_p99_ms": max((r["latency_ms"]["p99"] for r in reports if r["latency_ms"]["count"]), default=None),
        "generated": generated,
        "acked": total_acked,
        "lost": generated - total_acked,
        "reconnects": {"storm": storm, "other": other},
        "statuses": statuses,
        "streams": streams,
        "stream_rates": rates,
        "lpt_max_over_mean": kit.lpt_max_over_mean(rates, len(names)) if rates and names else None,
        "counters": counters,
    }


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    storm = result["args"]["storm_at"]
    duration = result["args"]["duration"]
    header = [
        "policy",
        "max/mean, whole run: median (p90)",
        f"0–{storm:.0f} s, cold start: median → last {SETTLED_BINS} s",
        f"{storm:.0f}–{duration:.0f} s, after the storm: median → last {SETTLED_BINS} s",
        "cross-zone",
        "p99 latency",
        "reconnects: storm / other",
        "lost",
    ]
    rows = []
    for s in result["policies"]:
        m = s["max_over_mean"]
        rows.append([
            s["policy"],
            f"{fmt(m['all']['median'])} ({fmt(m['all']['p90'])})",
            f"{fmt(m['before']['median'])} → {fmt(m['before']['last'])}",
            f"{fmt(m['after']['median'])} → {fmt(m['after']['last'])}",
            "–" if s["cross_zone"] is None else f"{s['cross_zone']:.1%}",
            "–" if s["latency_p99_ms"] is None else f"{s['latency_p99_ms']:.1f} ms",
            f"{s['reconnects']['storm']} / {s['reconnects']['other']}",
            f"{s['lost']} of {s['generated']}",
        ])
    lpt = result.get("lpt_max_over_mean")
    if lpt is not None:
        rows.append(["LPT (knows every rate)", fmt(lpt), "", "", "", "", "", ""])
    return header, rows


def markdown_table(result: dict) -> str:
    header, rows = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def describe(result: dict) -> str:
    a = result["args"]
    gateways = ", ".join(result["gateway_zones"])
    return (f"{a['streams']} device streams, {a['dist']} rates, mean {a['rate']:g} msgs/s; pods "
            + ", ".join(f"{z}={n}" for z, n in a["zones"].items())
            + f"; {len(result['gateway_zones'])} gateway{'s' if len(result['gateway_zones']) > 1 else ''} in {gateways}"
            f" ({a['concurrency']} worker{'s' if a['concurrency'] > 1 else ''}{' each' if a['envoys'] > 1 else ''});"
            f" {a['duration']:g} s per policy, "
            f"storm at {a['storm_at']:g} s; seed {a['seed']}")


def render_html(result: dict) -> str:
    """The report: summary table, per-pod msgs/s over time (a row per policy, a column per
    zone) and max/mean over time."""
    from streamlb_testkit import plots  # noqa: PLC0415 (matplotlib: slow to import)

    policies = result["policies"]
    pods_meta = result["pods"]
    zones = list(dict.fromkeys(p["zone"] for p in pods_meta))
    storm = result["args"]["storm_at"]
    header, rows = table_rows(result)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>streamlb demo</title>",
        f"<style>{plots.STYLE}</style></head><body>",
        "<h1>streamlb demo: least_request vs streamlb</h1>",
        f"<p>{plots.esc(describe(result))}. Run {plots.esc(result['started'])}.</p>",
        plots.html_table(header, rows),
        "<p>max/mean: per 1 s bin, the busiest pod's message rate over the mean pod's; median and p90 over "
        "the bins. Cross-zone: acked messages served outside the zone of the device's gateway. Lost: readings "
        "generated by the devices and never acked. Storm: every device drops its stream and reconnects at once.</p>",
    ]
    if policies:
        top = max((r for s in policies for b in s["bins"] for r in b["rates"].values()), default=1.0) * 1.05 or 1.0
        fig = plots.figure(11, 0.6 + 2.3 * len(policies))
        axes = fig.subplots(len(policies), len(zones), sharex=True, sharey=True, squeeze=False)
        for row, summary in enumerate(policies):
            ts = [b["t"] for b in summary["bins"]]
            mean = [sum(b["rates"].values()) / max(1, len(b["rates"])) for b in summary["bins"]]
            for col, zone in enumerate(zones):
                ax = axes[row][col]
                for k, pod in enumerate(pods_meta):
                    if pod["zone"] == zone:
                        ax.plot(ts, [b["rates"].get(pod["name"], 0.0) for b in summary["bins"]],
                                color=plots.color(k), linewidth=1.5, label=pod["name"])
                ax.plot(ts, mean, color="black", linestyle=":", linewidth=1, label="mean pod")
                ax.axvline(storm, color="#888888", linestyle="--", linewidth=1)
                ax.set_ylim(0, top)
                ax.grid(True, color="#eeeeee")
                if row == 0:
                    ax.set_title(f"zone {zone}", fontsize=10)
                if col == 0:
                    ax.set_ylabel(f"{summary['policy']}\nmsgs/s", fontsize=9)
                if row == len(policies) - 1:
                    ax.set_xlabel("t (s); dashed: storm")
                    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
        fig.suptitle("Messages/s per pod over time, grouped by zone", fontsize=11)
        parts += ["<h2>Per-pod message rate</h2>", plots.svg(fig)]

        fig = plots.figure(8, 3)
        ax = fig.add_subplot()
        for i, summary in enumerate(policies):
            points = [(b["t"], b["max_over_mean"]) for b in summary["bins"] if b["max_over_mean"] is not None]
            ax.plot([t for t, _ in points], [m for _, m in points], color=plots.color(i), linewidth=1.5,
                    label=summary["policy"])
        if result.get("lpt_max_over_mean") is not None:
            ax.axhline(result["lpt_max_over_mean"], color="black", linestyle=":", linewidth=1, label="LPT")
        ax.axvline(storm, color="#888888", linestyle="--", linewidth=1, label="storm")
        ax.set_ylim(bottom=1.0)
        ax.set_xlabel("t (s)")
        ax.set_ylabel("max/mean")
        ax.set_title("Busiest pod over the mean pod, per 1 s bin", fontsize=10)
        ax.grid(True, color="#eeeeee")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        parts += ["<h2>Imbalance over time</h2>", plots.svg(fig)]
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop_on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_term)
    out_dir = Path(args.out_dir)
    result: dict[str, Any] = {
        "kind": "demo",
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": {k: getattr(args, k) for k in ("duration", "streams", "rate", "dist", "envoys", "storm_at", "zones",
                                                "seed", "concurrency", "filter_config")},
        "gateway_zones": gateway_zones(args),
        "policies": [],
    }
    screen = Screen(args, [], result["policies"])
    try:
        for index, policy in enumerate(args.policies):
            if not screen.interactive:
                print(f"== [{index + 1}/{len(args.policies)}] {policy}: {POLICIES[policy][0]}", flush=True)
            result["policies"].append(run_policy(policy, index, args, screen))
        result["pods"] = screen.pods_meta
    except KeyboardInterrupt:
        print("\nstopped", flush=True)
        return 130
    finally:
        kit.stop_all()
    rates = result["policies"][0]["stream_rates"] if result["policies"] else []
    result["lpt_max_over_mean"] = kit.lpt_max_over_mean(rates, sum(args.zones.values())) if rates else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "report.html").write_text(render_html(result))
    print(f"\n== summary: {describe(result)}\n")
    print(markdown_table(result))
    print(f"\nreport: {out_dir / 'report.html'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
