"""Hostile input in a real Envoy 1.40: header values that are not UTF-8, a backend that sends a
broken ORCA report, an admin endpoint that breaks off mid-answer. None may reach a panic (which
would trap the VM of the whole worker); afterwards devices still stream and are steered.

Envoy runs one worker (--concurrency 1), so a trap would hit the VM every later stream uses,
and the filter's endpoint-header strip is the only one (native_strip=False) so the wasm filter
sees the client's raw bytes.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
import urllib.request

import pytest
import yaml

import streamlb_testkit as harness
from test_filter import config, decision, wait_for_discovery

ENDPOINT = harness.DEFAULT_ENDPOINT_HEADER
# What a trapped VM leaves in Envoy's log (the SDK's panic hook and ours, V8's trap report).
WASM_FAILURE = re.compile(r"Function: proxy_on_\w+ failed|panicked at|streamlb: panic|RuntimeError")


def wasm_failures(envoy: harness.Envoy) -> list[str]:
    return [line for line in envoy.log_text().splitlines() if WASM_FAILURE.search(line)]


def raw_http1(address: str, header_lines: list[bytes]) -> bytes:
    """One HTTP/1.1 request with these raw header lines; returns the status line."""
    host, port = address.rsplit(":", 1)
    request = b"GET /hostile HTTP/1.1\r\nHost: streamlb\r\n" + b"".join(h + b"\r\n" for h in header_lines)
    request += b"Connection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response.split(b"\r\n", 1)[0]


def assert_devices_stream_and_are_steered(envoy: harness.Envoy, pods: harness.Pods) -> None:
    summary = harness.run_devices(envoy.listen_addr, streams=12, mean_rate=10, dist="constant", duration=3)
    assert summary["totals"]["sent"] > 0
    for s in summary["streams"]:
        assert s["acked"] == s["sent"] > 0, s
        d = decision(s)
        assert d.get("endpoint") == pods.by_name(s["pods"][0])["address"], (s["headers"], s["pods"])
    assert not wasm_failures(envoy), wasm_failures(envoy)


@pytest.mark.parametrize(
    "header_line",
    [ENDPOINT.encode() + b": \xff\xfe", b"x-device-id: dev\xff1"],
    ids=["endpoint-header", "device-id"],
)
def test_a_non_utf8_request_header_is_handled_as_bytes(pods, header_line):
    with harness.Envoy(pods, filter_config=config(), concurrency=1, native_strip=False) as envoy:
        wait_for_discovery(envoy)
        for _ in range(3):
            raw_http1(envoy.listen_addr, [header_line])
        assert_devices_stream_and_are_steered(envoy, pods)
        time.sleep(1.0)  # a tick: the counters are flushed
        stats = envoy.stats("streamlb_")
    if header_line.startswith(ENDPOINT.encode()):
        assert stats.get("wasmcustom.streamlb_endpoint_header_stripped_total", 0) >= 3, stats


def test_a_broken_orca_report_from_a_backend_is_ignored(make_pods):
    # Every pod sends `endpoint-load-metrics: TEXT cpu_utilization=1\xff` in headers and trailers.
    pods = make_pods(extra_args=["--orca-raw-hex", b"TEXT cpu_utilization=1\xff".hex()])
    # ORCA headers are read only when they can steer (load.orca_weight > 0).
    with harness.Envoy(pods, filter_config=config(load={"orca_weight": 0.5}), concurrency=1) as envoy:
        wait_for_discovery(envoy)
        assert_devices_stream_and_are_steered(envoy, pods)
        time.sleep(1.0)
        invalid = envoy.stats("streamlb_orca").get("wasmcustom.streamlb_orca_reports_invalid_total", 0)
    assert invalid >= 12, "the filter must have seen (and counted) the broken reports"


class FlakyAdmin:
    """A stand-in for the admin cluster on 127.0.0.1: in mode "partial" it promises a long JSON
    body, sends its first bytes and closes; in mode "proxy" it relays the real admin API."""

    def __init__(self, real_admin: str):
        self.mode = "partial"
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                if outer.mode == "partial":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b'{"cluster_statuses":[{"name":"pods","host_st')
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                with urllib.request.urlopen(f"http://{real_admin}{self.path}", timeout=5) as real:
                    body = real.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyAdmin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def point_admin_cluster_at(envoy: harness.Envoy, port: int) -> None:
    """Rewrites Envoy's config (before start) so the filter's admin cluster reaches `port`."""
    cfg = envoy.config()
    admin = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "streamlb_admin")
    for locality in admin["load_assignment"]["endpoints"]:
        for lb_endpoint in locality["lb_endpoints"]:
            lb_endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
    envoy.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_an_admin_answer_that_breaks_off_is_a_failed_poll(pods):
    envoy = harness.Envoy(pods, filter_config=config(), concurrency=1)
    with FlakyAdmin(envoy.admin_addr) as admin:
        point_admin_cluster_at(envoy, admin.port)
        with envoy:
            run_flaky_admin(envoy, admin, pods)
    # Discovery asks only for the configured cluster.
    assert all(path == "/clusters?format=json&filter=%5E%28pods%29%24" for path in admin.requests), admin.requests


def run_flaky_admin(envoy: harness.Envoy, admin: FlakyAdmin, pods: harness.Pods) -> None:
    assert envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_failed_total", at_least=3)
    assert len(admin.requests) >= 3
    assert not wasm_failures(envoy), wasm_failures(envoy)
    # The admin recovers: discovery does too, and devices are steered.
    admin.mode = "proxy"
    wait_for_discovery(envoy)
    assert_devices_stream_and_are_steered(envoy, pods)
