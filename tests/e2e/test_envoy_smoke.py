"""Envoy without the filter, on the rendered reference config: gRPC streams reach the pods, the
override_host policy obeys the endpoint header, every LB variant of the template loads, and the
admin gate passes only GET /clusters.

The header tests run without the native strip (native_strip=False): with it, a client's
endpoint header never reaches the load balancer (test_filter.py)."""

from __future__ import annotations

import collections

import streamlb_testkit as harness
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
    envoy = make_envoy(pods, filter_config=None, lb="override_host", native_strip=False)
    for pod in pods.pods:
        for _ in range(2):
            assert open_stream(envoy, metadata=[(HEADER, pod["address"])]) == pod["name"]


def test_override_host_falls_back_on_unknown_host(pods, make_envoy):
    envoy = make_envoy(pods, filter_config=None, lb="override_host", native_strip=False)
    assert open_stream(envoy, metadata=[(HEADER, "127.0.0.1:1")]) in pods.names


def test_header_is_ignored_without_override_host(pods, make_envoy):
    # Proves the previous test measures the policy, not chance or the pods.
    envoy = make_envoy(pods, filter_config=None, lb="round_robin", native_strip=False)
    target = pods.pods[0]
    served = {open_stream(envoy, metadata=[(HEADER, target["address"])]) for _ in range(6)}
    assert served != {target["name"]}, served


def test_zone_aware_keeps_streams_in_node_zone(pods, make_envoy):
    # One gateway per zone and equal pods per zone: zone-aware routing keeps all traffic local.
    envoy = make_envoy(pods, filter_config=None, lb="zone_aware", node_zone="b")
    served = {open_stream(envoy) for _ in range(8)}
    assert {pods.by_name(name)["zone"] for name in served} == {"b"}, served


def host_health(envoy, cluster="pods"):
    """address -> (failed_active_health_check, weight) from /clusters?format=json."""
    out = {}
    for status in envoy.clusters()["cluster_statuses"]:
        if status["name"] != cluster:
            continue
        for host in status.get("host_statuses", []):
            sock = host["address"]["socket_address"]
            address = f"{sock['address']}:{sock['port_value']}"
            out[address] = (bool(host["health_status"].get("failed_active_health_check")), host.get("weight", 1))
    return out


def wait_until(predicate, timeout=10.0, step=0.2):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_stopped_pod_fails_health_check_and_gets_no_streams(pods, make_envoy):
    envoy = make_envoy(pods, filter_config=None, lb="round_robin")
    victim = pods.by_name("b-0")
    assert not any(failed for failed, _ in host_health(envoy).values())
    pods.stop("b-0")
    assert wait_until(lambda: host_health(envoy)[victim["address"]][0]), host_health(envoy)
    served = {open_stream(envoy) for _ in range(12)}
    assert "b-0" not in served and len(served) == 5, served
    pods.start("b-0")
    assert wait_until(lambda: not host_health(envoy)[victim["address"]][0]), host_health(envoy)


def test_pod_weight_is_rendered_and_used(pods, make_envoy):
    weighted = [dict(p, weight=5 if p["name"] == "c-1" else 1) for p in pods.pods]
    envoy = make_envoy(weighted, filter_config=None, lb="round_robin")
    weights = {addr: w for addr, (_, w) in host_health(envoy).items()}
    assert weights[pods.by_name("c-1")["address"]] == 5
    assert sorted(weights.values()) == [1, 1, 1, 1, 1, 5]
    served = collections.Counter(open_stream(envoy, count=1) for _ in range(30))
    # Weighted round robin: c-1 gets 5/10 of the streams, every other pod 1/10.
    assert served["c-1"] >= 10, served


def gate(envoy, path, method="GET"):
    """A request to the admin gate listener: (status, body)."""
    return harness.http_request(method, f"http://127.0.0.1:{envoy.admin_gate_port}{path}", body=b"" if method == "POST" else None)


def test_the_admin_gate_passes_only_get_clusters(pods, make_envoy):
    import json
    import urllib.parse

    envoy = make_envoy(pods, filter_config=None)
    status, body = gate(envoy, "/clusters?format=json&filter=" + urllib.parse.quote("^(pods)$"))
    assert status == 200
    assert [c["name"] for c in json.loads(body)["cluster_statuses"]] == ["pods"]
    for method, path in [("POST", "/quitquitquit"), ("POST", "/clusters"), ("GET", "/stats"),
                         ("GET", "/config_dump"), ("GET", "/clusters/../config_dump"),
                         ("POST", "/healthcheck/fail"), ("GET", "/")]:
        status, _ = gate(envoy, path, method)
        assert status == 403, (method, path, status)
    # The admin API itself saw none of them: Envoy still runs and is healthy.
    assert envoy.running()
    assert envoy.admin("/ready").strip() == "LIVE"
