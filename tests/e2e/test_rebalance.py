"""Rebalancing established streams and rate memory, in a real Envoy with real gRPC streams.

Streams start all at once with unknown rates, so they are placed as if by stream count and the
per-pod message rates start skewed; the rebalancer then moves streams off hot pods (bidi streams
whose response started: `allow_reset`, the client sees INTERNAL and reconnects, resending what
was not acknowledged), and reconnecting devices are placed by their remembered rates. The
accounting of every message is checked on both sides.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import streamlb_testkit as harness
from test_filter import max_over_mean, pod_rates, wait_for_discovery

STREAMS, RATE, DIST = 60, 10, "zipf:0.8"


def config(mode: str) -> dict:
    return {
        "clusters": ["pods"], "tick_ms": 500, "debug_header": "x-streamlb-decision",
        "discovery": {"poll_ms": 1000},
        "load": {"tau_ms": 2000},
        # Streams of unknown rate land at random: a skewed start. Remembered ones use every pod.
        "pick": {"choices": 1},
        "rebalance": {"mode": mode, "allow_reset": True, "min_age_ms": 8000, "tolerance": 0.05,
                      "hysteresis": 0.02, "max_moves_per_tick": 2, "max_moves_per_minute": 60,
                      "max_share_per_minute": 1.0},
    }


def series(pods: harness.Pods, seconds: float, step: float = 2.0) -> list[float]:
    out = []
    for _ in range(int(seconds / step)):
        out.append(round(max_over_mean(pod_rates(pods, step)), 3))
    return out


def moves(envoy: harness.Envoy) -> dict[str, float]:
    return {k.split("reason=.=")[1].split(";")[0]: v
            for k, v in envoy.stats("streamlb_rebalance_moves_total").items()}


def ended_by_class(envoy: harness.Envoy) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in envoy.stats("streamlb_route_streams_ended_total").items():
        status_class = k.split("status_class=.=")[1].split(";")[0]
        out[status_class] = out.get(status_class, 0) + v
    return out


def check_accounting(summary: dict, pods: harness.Pods) -> None:
    t = summary["totals"]
    assert t["sent"] == t["acked"] + t["failed"] + t["unacked"], t
    assert t["unacked"] == 0 and t["lost"] == 0, t
    assert t["failed"] == t["resent"], t
    assert all(p["truncated"] == 0 for p in pods.stats()["pods"]), "a pod saw a truncated message"


def run(make_pods, mode: str, storm: bool):
    """Skewed start, a time series of max/mean, then (if `storm`) a full reconnect storm."""
    pods = make_pods(zones={"a": 6})
    result = {}
    with harness.Envoy(pods, filter_config=config(mode)) as envoy:
        wait_for_discovery(envoy)
        # With a storm to follow, the devices end together just after the measured part (43 s).
        with harness.start_devices(envoy.listen_addr, streams=STREAMS, mean_rate=RATE, dist=DIST,
                                   duration=46 if storm else 60, reconnect=True, seed=3) as devices:
            time.sleep(1.5)
            result["start"] = max_over_mean(pod_rates(pods, 4))  # before any stream is old enough to move
            result["series"] = series(pods, 36)
            result["moves"] = moves(envoy)
            result["skipped"] = envoy.stats("streamlb_rebalance_skipped_total")
            if not storm:
                return pods, result
            # A full reconnect storm: every device drops at once and reconnects (same ids).
            result["first"] = devices.wait()
        time.sleep(1.0)
        with harness.start_devices(envoy.listen_addr, streams=STREAMS, mean_rate=RATE, dist=DIST, duration=28,
                                   reconnect=True, seed=3) as again:
            time.sleep(2)
            result["storm_landing"] = max_over_mean(pod_rates(pods, 4))
            # Windows ending 8, 10, …, 24 s after the storm: remembered rates let the rebalancer act
            # as soon as min_age passes.
            result["storm_series"] = series(pods, 18)
            result["storm_moves"] = moves(envoy)
            result["summary"] = again.wait()
        time.sleep(1.0)  # a tick: every ended stream is counted
        result["ended"] = ended_by_class(envoy)
        result["final_moves"] = moves(envoy)
        result["log"] = envoy.log_text()
    result["lpt"] = harness.lpt_max_over_mean([s["rate"] for s in result["summary"]["streams"]], 6)
    return pods, result


def test_rebalancing_brings_skewed_pods_to_the_mean_and_remembered_rates_survive_a_storm(make_pods):
    pods, r = run(make_pods, "on", storm=True)
    print(f"\nrebalance on: start {r['start']:.3f}, max/mean every 2 s: {r['series']}")
    def expected_vs_truth(streams: list[dict]) -> list[tuple[float, float]]:
        # The decision header of the stream's last connection, against its true rate (the filter
        # counts both directions: readings + acks).
        return [(float(s["headers"]["x-streamlb-decision"].split("expected=")[-1]), 2 * s["rate"]) for s in streams]

    def remembered(pairs: list[tuple[float, float]]) -> bool:
        return all(abs(e - t) <= 0.15 * t + 1 for e, t in pairs)

    streams = r["summary"]["streams"]
    moved_first = [s for s in r["first"]["streams"] if s["reconnects"] > 0]
    moved_again = [s["device"] for s in streams if s["reconnects"] > 0]
    print(f"moves {r['moves']}, skipped {r['skipped']}")
    print(f"storm: landed at {r['storm_landing']:.3f}, max/mean every 2 s from 8 s: {r['storm_series']}; "
          f"LPT on the same rates {r['lpt']:.3f}; moved again after it: {len(moved_again)} (moves in all: {r['storm_moves']})")
    # A device moved by the rebalancer reconnects with its own rate, remembered when the move
    # was planned, not the mean ...
    assert moved_first, "the skewed start must have moved some devices"
    assert remembered(expected_vs_truth(moved_first)), [
        (p, {k: s[k] for k in ("device", "rate", "reconnects", "statuses", "pods", "headers")})
        for p, s in zip(expected_vs_truth(moved_first), moved_first) if not remembered([p])]
    # ... and after the storm every device is placed by its own remembered rate (also one moved
    # again after it).
    assert remembered(expected_vs_truth(streams)), expected_vs_truth(streams)
    # Random placement of 60 Zipf streams on 6 pods: typically 1.4–1.8 (it can land near 1.25).
    assert r["start"] >= 1.2, "the scenario must start skewed"
    ts = r["series"]
    # A storm settles within 10 % of LPT in 20 s: the cold start (windows ending 7.5, 9.5, … s
    # after the devices started; from 19.5 s on) ...
    assert max(ts[6:]) <= 1.10 * r["lpt"], (ts, r["lpt"])
    # Budget: at most 60 moves per minute (max_share_per_minute 1.0 × 60 streams allows as many:
    # the storm's moves come within the same minute); the measured part lasted 43 s.
    assert 0 < r["moves"].get("reset", 0) <= 60, r["moves"]
    assert "streamlb: rebalance: stream" in r["log"]
    # ... and the reconnect storm (windows ending 8, 10, … s after it; from 20 s on). Arrivals in a
    # storm come in random order: greedy on known sizes alone lands around 1.27 (median, this
    # scenario, simulated).
    assert max(r["storm_series"][6:]) <= 1.10 * r["lpt"], (r["storm_series"], r["lpt"])
    check_accounting(r["summary"], pods)
    # Every stream the rebalancer ended is counted as moved, none as an error.
    ended_moves = r["final_moves"].get("reset", 0) + r["final_moves"].get("unavailable", 0)
    print(f"streams ended by class: {r['ended']}")
    assert r["ended"].get("moved", 0) == ended_moves > 0, (r["ended"], r["final_moves"])
    assert r["ended"].get("server_error", 0) == 0, r["ended"]


def test_without_rebalancing_the_skew_stays(make_pods):
    pods, r = run(make_pods, "off", storm=False)
    print(f"\nrebalance off: start {r['start']:.3f}, max/mean every 2 s: {r['series']}; moves {r['moves']}")
    assert not r["moves"].get("reset") and not r["moves"].get("unavailable")
    # The skew does not come down by itself.
    assert r["start"] >= 1.2 and min(r["series"]) >= 0.95 * r["start"], r


LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]")


def planned_times(log: str, shadow: bool = False) -> list[float]:
    """Envoy's log timestamps (s) of the filter's planned-move lines, in order."""
    needle = "streamlb: rebalance (shadow): stream" if shadow else "streamlb: rebalance: stream"
    times = []
    for line in log.splitlines():
        m = LOG_TIME.match(line)
        if m and needle in line:
            times.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return times


def churn_config(mode: str, **rebalance) -> dict:
    """A skew that never goes away: new streams land at random (one choice, no rate memory)
    and any move that does not raise the pair's maximum is wanted (no hysteresis)."""
    return {
        "clusters": ["pods"], "tick_ms": 500, "discovery": {"poll_ms": 1000}, "load": {"tau_ms": 2000},
        "pick": {"choices": 1}, "rate_memory": {"header": ""},
        "rebalance": {"mode": mode, "allow_reset": True, "min_age_ms": 3000, "tolerance": 0.01,
                      "hysteresis": 0.0, **rebalance},
    }


def test_the_churn_budget_is_per_proxy_with_eight_workers(make_pods):
    """`--concurrency 8`: nine VMs tick (eight workers and the main thread), streams spread
    over the workers (exact balance: accepts race without reuse_port, and CI once saw 3 of 8
    workers used), and together they stay within the proxy's budget."""
    pods = make_pods(zones={"a": 6})
    budget = {"max_moves_per_tick": 1, "max_moves_per_minute": 10, "max_share_per_minute": 1.0}
    with harness.Envoy(pods, filter_config=churn_config("on", **budget), concurrency=8, exact_balance=True) as envoy:
        wait_for_discovery(envoy)
        started = time.monotonic()
        harness.run_devices(envoy.listen_addr, streams=48, mean_rate=10, dist="zipf:0.8", duration=30,
                            reconnect=True, seed=5)
        assert time.monotonic() - started < 60, "the checks below assume the run fits in one minute"
        planned = moves(envoy).get("planned", 0)
        ended = moves(envoy).get("reset", 0) + moves(envoy).get("unavailable", 0)
        skipped = {k.split("reason=.=")[1].split(";")[0]: v
                   for k, v in envoy.stats("streamlb_rebalance_skipped_total").items()}
        workers = [v for k, v in envoy.stats(r"^listener\.127\.0\.0\.1_\d+\.worker_\d+\.downstream_cx_total$").items()
                   if v > 0]
        times = planned_times(envoy.log_text())
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:])]
    print(f"\nplanned {planned}, ended {ended}, skipped {skipped}; connections per worker {workers}; gaps {gaps}")
    assert len(workers) >= 4, f"streams must be spread over the workers: {workers}"
    assert skipped.get("budget", 0) > 0, "the skew must want more moves than the budget allows"
    assert 1 <= planned <= 10, planned  # per minute (the whole run)
    assert planned == len(times)
    assert all(g >= 0.4 for g in gaps), f"two moves in one tick window (500 ms): {gaps}"
    assert ended <= planned


def excess_permille(rates: dict[str, float], tolerance: float) -> float:
    """1000 × Σ max(0, r_j − (1 + tolerance) × mean) / Σ r over equal pods (the filter's
    streamlb_rebalance_excess_before_permille, from the pods' own counts)."""
    values = list(rates.values())
    mean = sum(values) / len(values)
    return 1000 * sum(max(0.0, r - (1 + tolerance) * mean) for r in values) / sum(values)


def test_shadow_excess_gauges_stay_while_the_skew_stays(make_pods):
    """In shadow mode nothing moves, so the excess the filter reports must stay what the pods
    see, tick after tick (a plan that is never carried out must not count as done)."""
    pods = make_pods(zones={"a": 6})
    cfg = churn_config("shadow", max_moves_per_tick=2, max_moves_per_minute=1000, max_share_per_minute=1.0)
    with harness.Envoy(pods, filter_config=cfg, concurrency=1) as envoy:
        wait_for_discovery(envoy)
        with harness.start_devices(envoy.listen_addr, streams=24, mean_rate=10, dist="zipf:0.8", duration=30,
                                   seed=7):
            time.sleep(8)  # past min_age (3 s) and τ (2 s): planning has run for a while
            first = pods.pod_stats()
            before = []
            for _ in range(20):
                stats = envoy.stats("streamlb_rebalance_excess_before")
                before.append(next(iter(stats.values())))
                time.sleep(0.5)
            last = pods.pod_stats()
        planned = moves(envoy).get("planned", 0)
        log = envoy.log_text()
    rates = {n: (last[n]["messages"] - first[n]["messages"]) / 10 for n in last}
    truth = excess_permille(rates, 0.01)
    print(f"\nshadow: excess before {before}; from the pods {truth:.0f}; max/mean {max_over_mean(rates):.2f}; "
          f"planned {planned}")
    assert max_over_mean(rates) >= 1.1, "the scenario must stay skewed (shadow ends nothing)"
    assert all(0.75 * truth <= b <= 1.25 * truth for b in before), (before, truth)
    assert planned > 0 and "streamlb: rebalance (shadow): stream" in log
    assert "streamlb: rebalance: stream" not in log
