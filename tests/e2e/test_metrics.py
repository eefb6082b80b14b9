"""The filter's stats, read from Envoy's /stats/prometheus and from a real Prometheus.

Known traffic (40 streams x 25 msgs/s, bidi with one ack per reading) goes through Envoy; the
counters must match what the devices counted, carry real labels, and Prometheus's rate() must
give the true message rate.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import streamlb_testkit as harness
from streamlb_testkit.prometheus import samples as prom_samples

STREAMS, RATE = 40, 25
CONFIG = {"clusters": ["pods"], "tick_ms": 1000}


class Prometheus:
    """Debian's prometheus on a free 127.0.0.1 port, scraping Envoy's admin every second."""

    def __init__(self, envoy_admin: str):
        self.dir = Path(tempfile.mkdtemp(prefix="streamlb-prom-"))
        self.port = harness.free_port()
        (self.dir / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: envoy\n"
            "    metrics_path: /stats/prometheus\n"
            f"    static_configs: [{{targets: ['{envoy_admin}']}}]\n"
        )
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus not installed: run `make deps`")
        self.proc = harness.Proc("prometheus", [
            binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], self.dir)

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def close(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def loaded(pods):
    """Envoy with the filter, Prometheus scraping it, devices running for 45 s."""
    with harness.Envoy(pods, filter_config=CONFIG) as envoy:
        assert envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_ok_total"), envoy.log_text()[-2000:]
        time.sleep(1.5)  # every worker reads the snapshot on its tick
        prom = Prometheus(envoy.admin_addr)
        try:
            with harness.start_devices(envoy.listen_addr, streams=STREAMS, mean_rate=RATE, dist="constant",
                                       duration=45) as devices:
                yield envoy, prom, devices
        finally:
            prom.close()


def test_known_traffic_appears_with_labels_and_prometheus_rate_is_true(loaded):
    envoy, prom, devices = loaded
    time.sleep(38)
    # sum by (route) over both directions: readings up plus acks down = 2 x 40 x 25.
    both = prom.query("sum by (route) (rate(streamlb_route_messages_total[30s]))")
    up = prom.query('sum by (route) (rate(streamlb_route_messages_total{direction="upstream"}[30s]))')
    print(f"\nPromQL both directions: {both}\nPromQL upstream: {up}")
    assert [r["metric"] for r in both] == [{"route": "telemetry"}]
    assert float(both[0]["value"][1]) == pytest.approx(2 * STREAMS * RATE, rel=0.1)
    assert float(up[0]["value"][1]) == pytest.approx(STREAMS * RATE, rel=0.1)
    active = prom.query("sum(streamlb_route_streams_active)")
    assert float(active[0]["value"][1]) == STREAMS

    summary = devices.wait()
    time.sleep(2.5)  # stream ends and the last tick's counts are flushed
    text = envoy.prometheus()
    samples = {(l.get("route"), l.get("cluster"), l.get("direction")): v
               for l, v in prom_samples(text, "streamlb_route_messages_total")}
    totals = summary["totals"]
    print(f"devices {totals}; envoy {samples}")
    # Exact: every message the devices sent passed the filter and was counted once.
    assert samples[("telemetry", "pods", "upstream")] == totals["sent"]
    assert samples[("telemetry", "pods", "downstream")] == totals["acked"]
    started = prom_samples(text, "streamlb_route_streams_total")
    assert started == [({"route": "telemetry", "cluster": "pods"}, STREAMS)]
    ended = {l["status_class"]: v for l, v in prom_samples(text, "streamlb_route_streams_ended_total")}
    assert ended.get("ok") == STREAMS, ended
    # Real Prometheus histograms, with the documented microsecond buckets; Envoy merges
    # histogram samples on its stats flush (every 5 s).
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and prom_samples(text, "streamlb_route_duration_us_count") != [
            ({"route": "telemetry", "cluster": "pods"}, STREAMS)]:
        time.sleep(0.5)
        text = envoy.prometheus()
    buckets = prom_samples(text, "streamlb_route_duration_us_bucket")
    assert {l["le"] for l, _ in buckets} >= {"100", "1000000", "14400000000", "+Inf"}, buckets
    count = prom_samples(text, "streamlb_route_duration_us_count")
    assert count == [({"route": "telemetry", "cluster": "pods"}, STREAMS)]
    first_byte = prom_samples(text, "streamlb_route_first_byte_us_count")
    assert first_byte[0][1] == STREAMS
    decisions = prom_samples(text, "streamlb_decisions_total")
    assert sum(v for _, v in decisions) == STREAMS
    assert all(set(l) == {"cluster", "reason"} for l, _ in decisions), decisions
    by_zone = prom_samples(text, "streamlb_decisions_by_zone_total")
    assert all(set(l) == {"cluster", "from", "to"} for l, _ in by_zone), by_zone
    for name in ["streamlb_cluster_imbalance_permille", "streamlb_zone_messages_per_second",
                 "streamlb_cross_zone_messages_total", "streamlb_config_loads_total",
                 "streamlb_discovery_polls_ok_total", "streamlb_host_errors_total"]:
        assert prom_samples(text, name), f"{name} missing"
    assert prom_samples(text, "streamlb_host_errors_total")[0][1] == 0


def unary_calls(envoy: harness.Envoy, count: int) -> dict:
    """`count` unary Telemetry/Send calls through grpcio (lab/py/device.py --unary)."""
    out = subprocess.run(
        [str(harness.REPO / ".venv" / "bin" / "python"), str(harness.REPO / "lab" / "py" / "device.py"),
         "--target", envoy.listen_addr, "--count", str(count), "--unary", "--timeout", "5"],
        capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unary_calls_are_timed_as_requests_and_classed_by_grpc_status(pods):
    """Unary exchanges land in request_latency (not duration); a pod answering UNAVAILABLE
    (trailers-only) is a server error. Past 32 calls the route is unary (no rate-memory read,
    no first-byte time): every call is still counted and timed."""
    calls = 60
    with harness.Envoy(pods, filter_config=CONFIG) as envoy:
        assert envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_ok_total"), envoy.log_text()[-2000:]
        time.sleep(1.5)
        ok = unary_calls(envoy, calls)
        assert ok["statuses"] == {"OK": calls}, ok
        names = [p["name"] for p in pods.stats()["pods"]]
        for name in names:
            pods.stop(name)
        failed = unary_calls(envoy, 10)
        assert failed["statuses"] == {"UNAVAILABLE": 10}, failed
        deadline = time.monotonic() + 15
        rc = {"route": "telemetry", "cluster": "pods"}
        while True:
            text = envoy.prometheus()
            latency = prom_samples(text, "streamlb_route_request_latency_us_count")
            ended = {l["status_class"]: v for l, v in prom_samples(text, "streamlb_route_streams_ended_total")}
            if (latency == [(rc, calls + 10)] and ended.get("server_error") == 10) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ended == {"ok": calls, "server_error": 10}, ended
        assert latency == [(rc, calls + 10)], latency
        assert prom_samples(text, "streamlb_route_duration_us_count") in ([], [(rc, 0)])
        # Time to the response headers is recorded until the route is unary (32 successful
        # unary calls on the worker that served them; the failed calls may go to another).
        first_byte = dict((tuple(sorted(l.items())), v) for l, v in
                          prom_samples(text, "streamlb_route_first_byte_us_count"))
        assert 32 <= first_byte.get(tuple(sorted(rc.items())), 0) <= 42, first_byte
        assert prom_samples(text, "streamlb_host_errors_total")[0][1] == 0
