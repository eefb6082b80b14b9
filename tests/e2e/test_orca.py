"""Backend ORCA reports in real Envoy: the TEXT header and the binary trailer gRPC servers send
(`endpoint-load-metrics-bin`) both steer placement when `load.orca_weight` is on.

Each test starts its own pods, Envoy and devices on free 127.0.0.1 ports and stops them.
"""

from __future__ import annotations

import time

import pytest

import streamlb_testkit as harness


def config():
    return {
        "clusters": ["pods"],
        "local_zone": "",
        "tick_ms": 500,
        "discovery": {"poll_ms": 500, "stale_after_ms": 5000},
        # Only the backends' ORCA utilisation decides: no probes, no measured rates.
        "probe": {"enabled": False},
        "load": {"orca_weight": 1.0},
    }


@pytest.mark.parametrize("form", ["text", "bin"])
def test_orca_utilisation_steers_new_streams(make_pods, make_envoy, form):
    # b-0 can take 100× what a-0 can: at the same rate it reports 1/100 of the utilisation.
    pods = make_pods(
        zones={"a": 1, "b": 1},
        zone_capacity={"a": 40, "b": 4000},
        orca=True,
        extra_args=["--orca-format", form],
    )
    # One worker: ORCA utilisation is learned per worker (not shared), and a worker that got none
    # of the first wave would place by the zone rule alone (README, Limitations).
    envoy = make_envoy(pods, filter_config=config(), node_zone="a", concurrency=1)
    assert envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_ok_total"), envoy.log_text()[-2000:]
    time.sleep(1.0)
    # A first wave loads both pods; reports come on every stream's response headers (and
    # trailers), so the second wave, opening over 4 s while the first still runs, learns a-0's
    # utilisation from its own first streams.
    with harness.start_devices(envoy.listen_addr, streams=8, mean_rate=10, dist="constant", duration=12) as first:
        time.sleep(3)
        second = harness.run_devices(
            envoy.listen_addr, streams=20, mean_rate=10, dist="constant", duration=6, extra_args=["--ramp", "4"]
        )
        first.wait()
    landed = [s["pods"][0] for s in second["streams"]]
    assert landed.count("b-0") >= 17, landed
    invalid = envoy.stats("streamlb_orca_reports_invalid").get("wasmcustom.streamlb_orca_reports_invalid_total", 0)
    assert invalid == 0
