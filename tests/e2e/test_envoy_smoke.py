"""Envoy without the filter, on the rendered reference config: gRPC streams reach the pods, the
override_host policy obeys the endpoint header, and every LB variant of the template loads."""

from __future__ import annotations

import collections

import harness
import pytest

HEADER = harness.DEFAULT_ENDPOINT_HEADER


def open_stream(envoy, metadata=(), count=3):
    initial, acks = harness.stream_readings(envoy.listen_addr, count=count, metadata=metadata)
    assert [a.seq for a in acks] == list(range(count))
    pods_in_acks = {a.pod for a in acks}
    assert len(pods_in_acks) == 1, pods_in_acks
    pod = pods_in_acks.pop()
    assert initial.get("x-pod") == pod, initial
    return pod


@pytest.mark.parametrize("lb", harness.LB_CHOICES)
def test_every_lb_variant_validates(pods, lb):
    envoy = harness.Envoy(pods, filter_config=None, lb=lb)
    try:
        envoy.validate()
    finally:
        envoy.close()


def test_streams_reach_pods_and_are_counted(pods, make_envoy):
    envoy = make_envoy(pods, filter_config=None, lb="override_host")
    before = {name: s["messages"] for name, s in pods.pod_stats().items()}
    served = collections.Counter(open_stream(envoy, count=4) for _ in range(12))
    assert set(served) <= set(pods.names)
    # least_request fallback with no header: 12 streams do not all land on one pod.
    assert len(served) > 1, served
    after = {name: s["messages"] for name, s in pods.pod_stats().items()}
    gained = {name: after[name] - before[name] for name in after}
    assert sum(gained.values()) == 12 * 4, gained
    assert {n for n, g in gained.items() if g} == set(served)
    # Envoy's own view agrees: 12 requests went to cluster pods.
    assert envoy.stats()["cluster.pods.upstream_rq_total"] == 12


def test_override_host_obeys_header(pods, make_envoy):
    envoy = make_envoy(pods, filter_config=None, lb="override_host")
    for pod in pods.pods:
        for _ in range(2):
            assert open_stream(envoy, metadata=[(HEADER, pod["address"])]) == pod["name"]


def test_override_host_falls_back_on_unknown_host(pods, make_envoy):
    envoy = make_envoy(pods, filter_config=None, lb="override_host")
    assert open_stream(envoy, metadata=[(HEADER, "127.0.0.1:1")]) in pods.names


def test_header_is_ignored_without_override_host(pods, make_envoy):
    # Proves the previous test measures the policy, not chance or the pods.
    envoy = make_envoy(pods, filter_config=None, lb="round_robin")
    target = pods.pods[0]
    served = {open_stream(envoy, metadata=[(HEADER, target["address"])]) for _ in range(6)}
    assert served != {target["name"]}, served


def test_zone_aware_keeps_streams_in_node_zone(pods, make_envoy):
    # One gateway per zone and equal pods per zone: zone-aware routing keeps all traffic local.
    envoy = make_envoy(pods, filter_config=None, lb="zone_aware", node_zone="b")
    served = {open_stream(envoy) for _ in range(8)}
    assert {pods.by_name(name)["zone"] for name in served} == {"b"}, served
