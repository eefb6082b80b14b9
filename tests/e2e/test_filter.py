"""streamlb in a real Envoy 1.40, with real gRPC pods and devices (issue: the filter in Envoy).

Each test starts its own pods, Envoy and devices on free 127.0.0.1 ports and stops them.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

import streamlb_testkit as harness

DEBUG = "x-streamlb-decision"
ENDPOINT = harness.DEFAULT_ENDPOINT_HEADER


def config(**overrides):
    cfg = {"clusters": ["pods"], "debug_header": DEBUG, "tick_ms": 500,
           "discovery": {"poll_ms": 500, "stale_after_ms": 5000}}
    cfg.update(overrides)
    return cfg


def decision(stream: dict) -> dict:
    """The filter's debug header of a stream, as a dict (zone, endpoint, reason, load)."""
    raw = stream["headers"].get(DEBUG, "")
    return dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)


def wait_for_discovery(envoy: harness.Envoy, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if envoy.stats("streamlb_discovery_polls_ok").get("wasmcustom.streamlb_discovery_polls_ok_total", 0) > 0:
            time.sleep(1.0)  # let every worker read the snapshot on its tick
            return
        time.sleep(0.2)
    raise AssertionError(f"discovery never succeeded:\n{envoy.log_text()[-3000:]}")


def pod_rates(pods: harness.Pods, seconds: float) -> dict[str, float]:
    """Messages per second each pod received over the next `seconds` (ground truth)."""
    before = pods.pod_stats()
    time.sleep(seconds)
    after = pods.pod_stats()
    return {n: (after[n]["messages"] - before[n]["messages"]) / seconds for n in after}


def steady_rates(pods: harness.Pods, envoy: harness.Envoy, settle: float, window: float, **devices) -> dict[str, float]:
    """Starts devices through `envoy`, waits `settle` s, returns each pod's msgs/s over `window` s."""
    with harness.start_devices(envoy.listen_addr, **devices) as running:
        time.sleep(settle)
        rates = pod_rates(pods, window)
        running.stop()
    return rates


def max_over_mean(rates: dict[str, float]) -> float:
    return harness.max_over_mean(rates.values())


def test_streams_land_on_the_pod_the_filter_names(pods):
    with harness.Envoy(pods, filter_config=config()) as envoy:
        wait_for_discovery(envoy)
        summary = harness.run_devices(envoy.listen_addr, streams=30, mean_rate=10, dist="constant", duration=4)
    assert summary["totals"]["sent"] > 0
    for s in summary["streams"]:
        d = decision(s)
        assert d, f"no decision header on {s['device']}: {s['headers']}"
        landed = pods.by_name(s["pods"][0])["address"]
        assert d["endpoint"] == landed, f"{s['device']}: filter named {d['endpoint']}, pod {landed} got it"
        assert s["acked"] == s["sent"]


@pytest.mark.parametrize("native_strip", [True, False], ids=["native-strip", "filter-strip"])
def test_client_cannot_choose_its_pod(pods, native_strip):
    """Envoy's header_mutation filter removes a client's endpoint header before the wasm filter
    sees it; without it (native_strip False) the wasm filter strips it itself."""
    target = pods.by_name("c-1")["address"]
    with harness.Envoy(pods, filter_config=config(), native_strip=native_strip) as envoy:
        wait_for_discovery(envoy)
        summary = harness.run_devices(envoy.listen_addr, streams=30, mean_rate=5, dist="constant", duration=3,
                                      headers=[(ENDPOINT, target)])
        time.sleep(1.0)  # a tick: the counters are flushed
        stripped = envoy.stats().get("wasmcustom.streamlb_endpoint_header_stripped_total", 0)
    landed = [s["pods"][0] for s in summary["streams"]]
    for s in summary["streams"]:
        assert decision(s)["endpoint"] == pods.by_name(s["pods"][0])["address"]
    assert landed.count("c-1") < len(landed) / 2, landed
    if native_strip:
        assert stripped == 0, "the header must be gone before the wasm filter runs"
    else:
        assert stripped >= 30


@pytest.mark.parametrize("native_strip", [True, False], ids=["native-strip", "control"])
def test_without_the_wasm_filter_a_client_still_cannot_choose_its_pod(pods, native_strip):
    """The strip does not depend on the VM: with no wasm filter at all (as when the module is
    missing), the native strip still removes the header. Control: without it, the header wins."""
    target = pods.by_name("c-1")["address"]
    with harness.Envoy(pods, filter_config=None, native_strip=native_strip) as envoy:
        summary = harness.run_devices(envoy.listen_addr, streams=30, mean_rate=5, dist="constant", duration=3,
                                      headers=[(ENDPOINT, target)])
    landed = [s["pods"][0] for s in summary["streams"]]
    assert all(s["acked"] == s["sent"] > 0 for s in summary["streams"])
    if native_strip:
        assert landed.count("c-1") < len(landed) / 2, landed
    else:
        assert landed.count("c-1") == len(landed), landed


def run_skew(pods, envoy_kwargs, seed):
    """Per-pod msgs/s after the 20 s ramp, and the LPT max/mean of the devices' own rates."""
    with harness.Envoy(pods, **envoy_kwargs) as envoy:
        if envoy_kwargs.get("filter_config"):
            wait_for_discovery(envoy)
        with harness.start_devices(envoy.listen_addr, streams=300, mean_rate=5, dist="zipf:0.8", duration=36,
                                   seed=seed, extra_args=["--ramp", "20"]) as devices:
            time.sleep(24)  # the ramp plus a few seconds
            rates = pod_rates(pods, 10)
            summary = devices.wait()
    return rates, harness.lpt_max_over_mean([s["rate"] for s in summary["streams"]], len(rates))


def test_skewed_rates_are_balanced_better_than_least_request(make_pods):
    """least_request picks at random, so one run of it can land well by luck (CI once saw 1.19
    against streamlb's 1.10): the claim is streamlb near the oracle, and not worse than it.
    Placement here is blind to each new stream's rate (no device is remembered yet) and the two
    workers see each other's placements through the pods' reports (probed every 250 ms while
    placing) and on the tick: 8 runs with probes every second gave 1.055–1.158 × LPT, and 8 runs
    with the 250 ms probes 1.042–1.152, each time one over the 1.15 bound (least_request ≈
    1.2–1.7). A placer that knows every earlier stream's rate exactly reaches 1.098 × LPT on
    these rates in this order (the bench's online reference), so the bound leaves 0.05 for not
    knowing them at once and for the two workers. The bound stays: a failure here is that
    margin, and a reason to improve placement, not to widen it."""
    pods = make_pods(zones={"a": 6})
    ours, oracle = run_skew(pods, {"filter_config": config(load={"tau_ms": 2000})}, seed=7)
    pods2 = make_pods(zones={"a": 6})
    theirs, _ = run_skew(pods2, {"lb": "least_request"}, seed=7)
    print(f"\nper-pod msgs/s, streamlb:      {sorted(round(v) for v in ours.values())}  max/mean {max_over_mean(ours):.3f}")
    print(f"per-pod msgs/s, least_request: {sorted(round(v) for v in theirs.values())}  max/mean {max_over_mean(theirs):.3f}")
    print(f"LPT on the same rates: {oracle:.3f}")
    assert max_over_mean(ours) <= 1.15 * oracle
    assert max_over_mean(ours) < max_over_mean(theirs)


def zone_share(pods: harness.Pods, rates: dict[str, float], zone: str) -> float:
    total = sum(rates.values())
    return sum(r for n, r in rates.items() if pods.by_name(n)["zone"] == zone) / total


def test_zone_traffic_stays_local_while_the_zone_has_capacity(make_pods):
    # Zone a holds most of the capacity (weights), so nearly everything stays local.
    pods = make_pods(zones={"a": 2, "b": 2, "c": 2})
    weighted = [dict(p, weight=20 if p["zone"] == "a" else 1) for p in pods.pods]
    with harness.Envoy(weighted, filter_config=config(), node_zone="a") as envoy:
        wait_for_discovery(envoy)
        rates = steady_rates(pods, envoy, 8, 6, streams=40, mean_rate=20, dist="constant", duration=20,
                             extra_args=["--ramp", "5"])
    local = zone_share(pods, rates, "a")
    print(f"\nzone a share with zone a at 40/44 of capacity: {local:.3f}")
    assert local >= 0.95


def test_zone_spills_only_the_excess(make_pods):
    # Equal pods: zone a has 1/3 of the capacity and all the demand; it keeps (1 + 0.1) / 3.
    pods = make_pods(zones={"a": 2, "b": 2, "c": 2})
    with harness.Envoy(pods, filter_config=config(), node_zone="a") as envoy:
        wait_for_discovery(envoy)
        rates = steady_rates(pods, envoy, 12, 8, streams=60, mean_rate=20, dist="constant", duration=25,
                             extra_args=["--ramp", "8"])
        stats = envoy.stats("streamlb_decisions_total")
    local = zone_share(pods, rates, "a")
    minimum_cross = 1 - 1.1 / 3
    print(f"\nzone a share {local:.3f}; cross-zone {1 - local:.3f}, minimum {minimum_cross:.3f}; {stats}")
    assert abs((1 - local) - minimum_cross) <= 0.06
    spills = sum(v for k, v in stats.items() if "reason=.=spill" in k or k.endswith(".spill"))
    assert spills > 0


def test_a_storm_through_eight_workers_is_spread_by_capacity(make_pods):
    # 60 streams of unknown rate open at once through an Envoy with 8 workers, each of which sees
    # the others' placements only on its tick. Each must count the others' burst, and spend no
    # zone tolerance on rates nobody knows: zone a keeps a third, every pod about 10 streams.
    # (Before: zone a took 27-33 of them, the busiest pod 15.) With 8 workers racing for the
    # connections the landing varies by a couple of streams: zone a took 22-25 in 16 runs on two
    # builds (2026-11-30); 25 still separates it from the 27-33 of the fault.
    pods = make_pods(zones={"a": 2, "b": 2, "c": 2})
    with harness.Envoy(pods, filter_config=config(), node_zone="a", concurrency=8) as envoy:
        wait_for_discovery(envoy)
        summary = harness.run_devices(envoy.listen_addr, streams=60, mean_rate=5, dist="constant", duration=3)
    landed = [s["pods"][0] for s in summary["streams"]]
    counts = {name: landed.count(name) for name in pods.names}
    local = sum(n for name, n in counts.items() if pods.by_name(name)["zone"] == "a")
    print(f"\nstreams per pod {counts}; zone a {local} of 60")
    assert local <= 25, counts
    assert max(counts.values()) <= 14, counts


def test_stopped_pod_streams_reconnect_elsewhere_and_nothing_is_lost(pods):
    with harness.Envoy(pods, filter_config=config(), node_zone="") as envoy:
        wait_for_discovery(envoy)
        with harness.start_devices(envoy.listen_addr, streams=24, mean_rate=20, dist="constant", duration=16,
                                   reconnect=True) as devices:
            time.sleep(5)
            pods.stop("a-0")
            summary = devices.wait()
        received = sum(p["messages"] for p in pods.stats()["pods"])
        time.sleep(2)  # health checks and discovery have seen a-0 down by now
        later = harness.run_devices(envoy.listen_addr, streams=24, mean_rate=5, dist="constant", duration=3, seed=2)
    hit = [s for s in summary["streams"] if s["pods"][0] == "a-0"]
    assert hit, "no stream was on a-0 before it stopped"
    for s in hit:
        assert s["reconnects"] >= 1, s
        assert s["pods"][-1] != "a-0", s
    totals = summary["totals"]
    print(f"\ntotals {totals}; pods received {received}")
    # Every message sent was acknowledged or reported to the client as failed, and every
    # failed one was sent again: nothing lost, nothing acknowledged that no pod counted.
    assert totals["sent"] == totals["acked"] + totals["failed"] + totals["unacked"], totals
    assert totals["unacked"] == 0 and totals["lost"] == 0, totals
    assert totals["failed"] == totals["resent"], totals
    assert totals["acked"] == totals["generated"], totals
    assert totals["acked"] <= received <= totals["sent"], (totals, received)
    assert all(p["truncated"] == 0 for p in pods.stats()["pods"])
    a0 = pods.by_name("a-0")["address"]
    assert all(decision(s)["endpoint"] != a0 for s in later["streams"]), "a stopped pod was named"
    assert all(s["pods"][0] != "a-0" for s in later["streams"])


def test_invalid_config_is_refused_with_the_field_named(pods):
    envoy = harness.Envoy(pods, filter_config={"clusters": ["pods"], "zone": {"spill_threshold": 1.7}},
                          start_timeout=20)
    with pytest.raises(Exception):
        envoy.start_process()
    log = envoy.log_text()
    envoy.close()
    assert "zone.spill_threshold: must be in [0, 1], got 1.7" in log, log[-3000:]


def test_shadow_mode_decides_and_counts_but_does_not_steer(pods):
    with harness.Envoy(pods, filter_config=config(mode="shadow"), node_zone="") as envoy:
        wait_for_discovery(envoy)
        summary = harness.run_devices(envoy.listen_addr, streams=60, mean_rate=5, dist="constant", duration=3,
                                      record_headers=(DEBUG, "x-pod-saw-endpoint-header"))
        time.sleep(1.5)
        decisions = sum(v for k, v in envoy.stats("streamlb_decisions_total").items())
    assert decisions >= 60
    assert all("x-pod-saw-endpoint-header" not in s["headers"] for s in summary["streams"])
    matches = sum(decision(s)["endpoint"] == pods.by_name(s["pods"][0])["address"] for s in summary["streams"])
    # least_request places independently of the shadow decision: about 1 in 6 agree by chance.
    assert matches < 30, matches


def test_a_grpcio_client_is_steered_too(pods):
    with harness.Envoy(pods, filter_config=config()) as envoy:
        wait_for_discovery(envoy)
        out = subprocess.run(
            [str(harness.REPO / ".venv" / "bin" / "python"), str(harness.REPO / "lab" / "py" / "device.py"),
             "--target", envoy.listen_addr, "--count", "20"],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["acked"] == result["sent"] == 20
    named = dict(kv.split("=", 1) for kv in result["headers"][DEBUG].split(";"))["endpoint"]
    assert named == pods.by_name(result["pod"])["address"]
