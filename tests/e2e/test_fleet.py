"""The fleet view in real Envoys: pods report their load, every gateway probes them.

Each test starts its own pods, Envoys and devices on free 127.0.0.1 ports and stops them.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import streamlb_testkit as harness
from test_filter import pod_rates

DEBUG = "x-streamlb-decision"
PROBE_PATH = "/.well-known/streamlb/load"
WASM_FAILURE = re.compile(r"Function: proxy_on_\w+ failed|panicked at|streamlb: panic|RuntimeError")


def gateway_config(**overrides):
    cfg = {
        "clusters": ["pods"],
        "debug_header": DEBUG,
        "tick_ms": 500,
        "discovery": {"poll_ms": 500, "stale_after_ms": 5000},
        "probe": {"interval_ms": 500, "max_age_ms": 3000},
        "load": {"default_stream_rate": 10},
    }
    cfg.update(overrides)
    return cfg


def decision(stream: dict) -> dict:
    raw = stream["headers"].get(DEBUG, "")
    return dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)


def probe(address: str, marked: bool = True) -> tuple[int, str]:
    """GET the load path at `address` as a streamlb prober would (marked) or as a client."""
    request = urllib.request.Request(f"http://{address}{PROBE_PATH}")
    if marked:
        request.add_header("x-streamlb-probe", "1")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers.get("endpoint-load-metrics", "")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("endpoint-load-metrics", "")


def parse_report(value: str) -> dict[str, float]:
    assert value.startswith("TEXT "), value
    return {k.strip(): float(v) for k, v in (item.split("=") for item in value[5:].split(","))}


def counter(envoy: harness.Envoy, name: str) -> float:
    return sum(v for k, v in envoy.stats(name).items() if k.startswith(f"wasmcustom.{name}"))


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_gateways_see_one_pods_load_through_its_reporter(make_pods, make_envoy, start_devices):
    pods = make_pods(zones={"a": 1, "b": 1})
    a0 = pods.by_name("a-0")
    # a-0 sits behind its own inbound Envoy running streamlb as reporter (its capacity 400 msgs/s).
    inbound = make_envoy(
        [a0], filter_config={"reporter": {"capacity": 400}, "tick_ms": 500}, node_zone="a", reporter=True
    )
    fronted = [dict(a0, address=inbound.listen_addr), pods.by_name("b-0")]
    gateways = [make_envoy(fronted, filter_config=gateway_config(), node_zone=z) for z in ("a", "b", "a")]
    for g in gateways:
        wait_for(lambda g=g: counter(g, "streamlb_discovery_polls_ok_total") > 0, 15, "discovery")
    # 3 × 8 streams at 5 msgs/s; each gateway's share lands partly on a-0.
    running = [start_devices(g.listen_addr, streams=8, mean_rate=5, dist="constant", duration=14) for g in gateways]
    time.sleep(9)
    truth = pods.pod_stats()
    status, value = probe(inbound.listen_addr)
    time.sleep(1)
    later = pods.pod_stats()
    summaries = [r.wait(60) for r in running]

    # The reporter answered with what every gateway put on a-0 (both directions: each message
    # is acked), and the app never saw a probe.
    assert status == 200, value
    report = parse_report(value)
    a0_rate = (later["a-0"]["messages"] - truth["a-0"]["messages"]) * 2.0
    assert a0_rate > 20, truth
    assert abs(report["rps_fractional"] - a0_rate) <= 0.35 * a0_rate + 5, (report, a0_rate)
    assert abs(report["application_utilization"] - report["rps_fractional"] / 400) < 0.01, report
    streams_on_a0 = sum(1 for s in summaries for st in s["streams"] if st["pods"] and st["pods"][-1] == "a-0")
    assert report["named_metrics.streams"] == streams_on_a0, (report, streams_on_a0)
    assert later["a-0"]["probes"] == 0, "probes must not reach the app behind the reporter"
    # b-0 answers probes itself (an ORCA-speaking app): it saw the gateways' probes.
    assert later["b-0"]["probes"] > 0
    assert counter(inbound, "streamlb_reporter_probes_answered_total") > 0
    for g in gateways:
        assert counter(g, "streamlb_probes_total") > 0
        ok = sum(v for k, v in g.stats("streamlb_probes_total").items() if "result=.=ok;" in k)
        assert ok > 0, g.stats("streamlb_probes")
        assert g.stats("streamlb_fleet_pods_reporting").get(
            "wasmcustom.streamlb_fleet_pods_reporting.cluster=.=pods;.;"
        ) == 2, g.stats("streamlb_fleet")
    # Streams placed after the first reports used the fleet view.
    views = [decision(st).get("view") for s in summaries for st in s["streams"]]
    assert views.count("fleet") >= len(views) // 2, views
    for s in summaries:
        assert s["totals"]["acked"] == s["totals"]["sent"], s["totals"]


def test_a_client_cannot_read_or_fake_a_load_probe(make_pods, make_envoy):
    pods = make_pods(zones={"a": 1})
    a0 = pods.by_name("a-0")
    inbound = make_envoy([a0], filter_config={"reporter": {"capacity": 100}, "tick_ms": 500}, reporter=True)
    gateway = make_envoy([dict(a0, address=inbound.listen_addr)], filter_config=gateway_config())
    # Through the gateway, marked or not: the path is not routed, and the marker is removed.
    assert probe(gateway.listen_addr, marked=True) == (404, "")
    assert probe(gateway.listen_addr, marked=False) == (404, "")
    # At the reporter itself, unmarked: refused without figures, and the app sees nothing.
    assert probe(inbound.listen_addr, marked=False) == (404, "")
    status, value = probe(inbound.listen_addr, marked=True)
    assert status == 200 and value.startswith("TEXT rps_fractional="), (status, value)
    assert pods.pod_stats()["a-0"]["probes"] == 0


def test_a_pod_cut_to_a_quarter_of_its_capacity_gets_fewer_new_streams(make_pods, make_envoy, start_devices):
    # Three equal pods (lab pods answer probes with their utilisation); two gateways.
    pods = make_pods(zones={"a": 3}, capacity=400)
    gateways = [make_envoy(pods, filter_config=gateway_config(local_zone="")) for _ in range(2)]
    for g in gateways:
        wait_for(lambda g=g: counter(g, "streamlb_discovery_polls_ok_total") > 0, 15, "discovery")
    first = [start_devices(g.listen_addr, streams=9, mean_rate=5, dist="constant", duration=30) for g in gateways]
    time.sleep(6)
    pods.set_capacity("a-0", 100)
    time.sleep(4)  # probes (every 0.5 s) see a-0's utilisation rise
    before = pods.pod_stats()
    second = [start_devices(g.listen_addr, streams=15, mean_rate=5, dist="constant", duration=8) for g in gateways]
    late = [r.wait(60) for r in second]
    for r in first:
        r.wait(60)
    new = {name: 0 for name in before}
    for s in late:
        for st in s["streams"]:
            new[st["pods"][0]] += 1
    # a-0 has a quarter of the others' capacity: it gets far fewer than a third of the new
    # streams (capacity-blind balancing would give it a third).
    assert new["a-0"] <= 0.15 * sum(new.values()), new
    assert all(s["totals"]["acked"] == s["totals"]["sent"] for s in late)


def test_garbage_reports_are_counted_and_placement_falls_back_to_the_local_view(make_pods, make_envoy):
    # Pods that answer probes with bytes that are not a report.
    pods = make_pods(zones={"a": 2}, extra_args=["--orca-raw-hex", "54455854206370755f7574696c697a6174696f6e3d31ff"])
    gateway = make_envoy(pods, filter_config=gateway_config())
    wait_for(lambda: counter(gateway, "streamlb_probes_total") >= 4, 15, "probes")
    summary = harness.run_devices(gateway.listen_addr, streams=6, mean_rate=5, dist="constant", duration=3)
    malformed = sum(v for k, v in gateway.stats("streamlb_probes_total").items() if "result=.=malformed;" in k)
    assert malformed >= 4, gateway.stats("streamlb_probes")
    assert all(decision(st).get("view") == "local" for st in summary["streams"]), summary["streams"]
    assert all(decision(st).get("endpoint") for st in summary["streams"]), "still steered"
    assert summary["totals"]["acked"] == summary["totals"]["sent"]
    assert not WASM_FAILURE.search(gateway.log_text()), gateway.log_text()[-3000:]


def crossing_share(summary: dict, pods: harness.Pods, zone: str, which: int) -> float:
    """Share of a gateway's devices whose pod (first: `which` 0, last: -1) is outside `zone`."""
    streams = summary["streams"]
    return sum(pods.by_name(s["pods"][which])["zone"] != zone for s in streams) / len(streams)


def storm_then_settle(make_pods, make_envoy, start_devices, return_spilled: bool) -> dict[str, tuple[float, float]]:
    """Two gateways (zones a and b, two equal pods each), 40 devices each at 5 msgs/s opening
    at once; rebalancing on. Returns per gateway zone: (crossing share at landing, at the end)."""
    pods = make_pods(zones={"a": 2, "b": 2})
    rebalance = {"mode": "on", "allow_reset": True, "min_age_ms": 3000, "max_moves_per_tick": 2,
                 "max_moves_per_minute": 120, "max_share_per_minute": 1.0, "return_spilled": return_spilled}
    gateways = {z: make_envoy(pods, filter_config=gateway_config(rebalance=rebalance), node_zone=z) for z in "ab"}
    for g in gateways.values():
        wait_for(lambda g=g: counter(g, "streamlb_discovery_polls_ok_total") > 0, 15, "discovery")
    running = {z: start_devices(g.listen_addr, streams=40, mean_rate=5, dist="constant", duration=30,
                                reconnect=True, seed=ord(z)) for z, g in gateways.items()}
    summaries = {z: r.wait(90) for z, r in running.items()}
    for z, s in summaries.items():
        t = s["totals"]
        assert t["lost"] == 0 and t["unacked"] == 0 and t["failed"] == t["resent"], (z, t)
    home = {z: sum(v for k, v in g.stats("streamlb_rebalance_zone_moves_total").items() if "reason=.=home" in k)
            for z, g in gateways.items()}
    out = {z: (crossing_share(s, pods, z, 0), crossing_share(s, pods, z, -1)) for z, s in summaries.items()}
    print(f"\nreturn_spilled={return_spilled}: crossing share (landing, end) per gateway {out}; home moves {home}")
    assert all(n > 0 for n in home.values()) == return_spilled, home
    return out


def test_streams_spilled_in_a_storm_come_home_when_their_zone_has_room(make_pods, make_envoy, start_devices):
    # Rates are unknown in a storm, so each gateway spreads its devices by capacity: about half
    # of each cross zones, though each zone can carry its own demand (the minimum is 0). No pod
    # is hot, so only bringing spilled streams home helps: each gateway moves its streams back
    # as its zone has room, which the other gateway frees by doing the same (fleet view).
    shares = storm_then_settle(make_pods, make_envoy, start_devices, return_spilled=True)
    assert all(landing >= 0.25 for landing, _ in shares.values()), shares
    assert all(end <= 0.10 for _, end in shares.values()), shares


def test_without_return_spilled_the_storms_crossing_stays(make_pods, make_envoy, start_devices):
    shares = storm_then_settle(make_pods, make_envoy, start_devices, return_spilled=False)
    assert sum(end for _, end in shares.values()) / 2 >= 0.25, shares


def test_with_rebalancing_a_pod_cut_to_a_quarter_sheds_streams_to_its_capacity_share(make_pods, make_envoy, start_devices):
    # Three equal pods, two gateways, 15 devices each at 4 msgs/s: a-0 carries about a third.
    # Its capacity is then cut to a quarter of the others'; its utilisation reports rise, it is
    # hot by them, and each gateway sheds its share of a-0's excess. Capacity share of a-0:
    # 100 / 900 = 0.11. Connections spread evenly over each gateway's two workers (as reuse_port
    # spreads them): four VMs act on the same reports.
    pods = make_pods(zones={"a": 3}, capacity=400)
    rebalance = {"mode": "on", "allow_reset": True, "min_age_ms": 2000, "max_moves_per_tick": 2,
                 "max_moves_per_minute": 60, "max_share_per_minute": 1.0}
    gateways = [make_envoy(pods, filter_config=gateway_config(local_zone="", rebalance=rebalance), exact_balance=True)
                for _ in range(2)]
    for g in gateways:
        wait_for(lambda g=g: counter(g, "streamlb_discovery_polls_ok_total") > 0, 15, "discovery")
    running = [start_devices(g.listen_addr, streams=15, mean_rate=4, dist="constant", duration=36, reconnect=True,
                             seed=i + 1) for i, g in enumerate(gateways)]
    time.sleep(8)
    before = share_of(pods, "a-0", 3)
    pods.set_capacity("a-0", 100)
    time.sleep(15)  # probes see the utilisation, moves (2 per tick at most), reconnects
    after = share_of(pods, "a-0", 6)
    summaries = [r.wait(90) for r in running]
    moved = sum(counter(g, "streamlb_rebalance_moves_total") for g in gateways)
    print(f"\na-0's share of messages: {before:.3f} before the cut, {after:.3f} 15-21 s after (capacity share 0.111); "
          f"moves {moved}")
    assert before >= 0.25, before
    # Within the tolerance (0.1) of its capacity share, plus one stream of 60 in granularity.
    assert after <= 1.1 * 100 / 900 + 1 / 30, after
    for s in summaries:
        t = s["totals"]
        assert t["lost"] == 0 and t["unacked"] == 0 and t["failed"] == t["resent"], t


def share_of(pods: harness.Pods, name: str, seconds: float) -> float:
    """Pod `name`'s share of all pods' messages over the next `seconds`."""
    rates = pod_rates(pods, seconds)
    return rates[name] / max(1e-9, sum(rates.values()))


def test_probes_run_at_the_placing_interval_while_streams_are_placed(make_pods, make_envoy, start_devices):
    # Lab pods answer probes themselves and count them. Idle: each pod every 2 s; while the
    # gateway places streams (one every 0.25 s here): every 0.25 s.
    pods = make_pods(zones={"a": 2})
    config = gateway_config(tick_ms=1000, probe={"interval_ms": 2000, "placing_interval_ms": 250, "max_age_ms": 5000})
    gateway = make_envoy(pods, filter_config=config, node_zone="a")
    wait_for(lambda: counter(gateway, "streamlb_discovery_polls_ok_total") > 0, 15, "discovery")

    def probes_over(seconds: float) -> int:
        before = pods.pod_stats()
        time.sleep(seconds)
        after = pods.pod_stats()
        return sum(after[p]["probes"] - before[p]["probes"] for p in after)

    idle = probes_over(4)
    running = start_devices(gateway.listen_addr, streams=20, mean_rate=2, dist="constant", duration=12,
                            extra_args=["--ramp", "5"])
    time.sleep(0.5)
    placing = probes_over(4)
    time.sleep(2.5)  # the ramp ended 2 s ago: more than interval_ms, idle again
    settled = probes_over(4)
    summary = running.wait(60)

    # Idle: 2 pods / 2 s over 4 s ≈ 4; placing: 2 pods / 0.25 s ≈ 32.
    assert 1 <= idle <= 8, (idle, placing, settled)
    assert placing >= 16 and placing >= 3 * idle, (idle, placing, settled)
    assert settled <= 8, (idle, placing, settled)
    assert summary["totals"]["acked"] == summary["totals"]["sent"], summary["totals"]
