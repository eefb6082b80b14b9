"""Configuration reload through filesystem LDS, in a real Envoy with real gRPC streams.

Envoy gives a new plugin configuration new root contexts in the same VMs and keeps the old
ones (and the old connections' streams) until the old filter chains drain. The new
configuration must govern the streams that were open before the reload, and no old root
context may keep polling, ticking or planning.
"""

from __future__ import annotations

import time

import streamlb_testkit as harness
from test_filter import wait_for_discovery
from test_rebalance import check_accounting, moves

POLLS = "cluster.streamlb_admin.upstream_rq_total"


def config(mode: str, poll_ms: int) -> dict:
    # Streams land at random (one choice, no rate memory): a skew the rebalancer wants to fix.
    return {
        "clusters": ["pods"], "tick_ms": 500, "discovery": {"poll_ms": poll_ms}, "load": {"tau_ms": 2000},
        "pick": {"choices": 1}, "rate_memory": {"header": ""},
        "rebalance": {"mode": mode, "allow_reset": True, "min_age_ms": 3000, "tolerance": 0.01,
                      "hysteresis": 0.0, "max_moves_per_tick": 1, "max_moves_per_minute": 120,
                      "max_share_per_minute": 1.0},
    }


def ended(envoy: harness.Envoy) -> float:
    m = moves(envoy)
    return m.get("reset", 0) + m.get("unavailable", 0)


def test_a_reload_governs_open_streams_and_old_contexts_stop(make_pods):
    pods = make_pods(zones={"a": 6})
    with harness.Envoy(pods, filter_config=config("off", 200), lds=True, concurrency=2,
                       # Old filter chains (and their root contexts) stay for the whole test.
                       extra_args=["--drain-time-s", "600"]) as envoy:
        wait_for_discovery(envoy)
        with harness.start_devices(envoy.listen_addr, streams=24, mean_rate=10, dist="zipf:0.8", duration=40,
                                   reconnect=True, seed=11) as devices:
            time.sleep(6)
            assert ended(envoy) == 0, "rebalancing is off"
            # 1. Rebalancing on: the streams opened before the reload (on old connections, so
            # on the old root contexts) are moved under the new configuration.
            envoy.update_filter_config(config("on", 300))
            deadline = time.monotonic() + 12
            while ended(envoy) == 0 and time.monotonic() < deadline:
                time.sleep(0.25)
            moved_after_on = ended(envoy)
            # 2. Rebalancing off again, slower polls: no move from here on, and one VM polls
            # at the new period.
            envoy.update_filter_config(config("off", 2000))
            time.sleep(1.0)  # the old contexts hand over on their next tick (500 ms)
            moved, polls = ended(envoy), envoy.stats(POLLS).get(POLLS, 0)
            time.sleep(10)
            moved_later = ended(envoy) - moved
            polls_later = envoy.stats(POLLS).get(POLLS, 0) - polls
            active = sum(envoy.stats("streamlb_route_streams_active").values())
            summary = devices.wait()
        log = envoy.log_text()
    handed = [line.split("streamlb: ")[-1] for line in log.splitlines() if "handed" in line]
    print(f"\nmoved after 'on': {moved_after_on}; after 'off': {moved_later}; admin polls in 10 s: {polls_later}; "
          f"active streams {active}\n" + "\n".join(handed))
    assert moved_after_on >= 1, "the reload to 'on' must govern the streams that were already open"
    assert moved_later == 0, "rebalancing was turned off"
    assert polls_later <= 7, f"10 s at poll_ms 2000 is 5 polls, not {polls_later}: an old context still polls"
    assert active == 24, "every open stream is counted once, across the reloads"
    assert any("handed" in h and "0 of 0" not in h for h in handed), handed
    check_accounting(summary, pods)
