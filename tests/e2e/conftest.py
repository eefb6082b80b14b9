"""pytest fixtures over harness.py. Every process a test starts is stopped at teardown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_everything_at_exit():
    yield
    harness.stop_all()


@pytest.fixture
def make_pods():
    """Factory: make_pods(zones={"a": 2}, capacity=0, orca=False) -> running harness.Pods."""
    started: list[harness.Pods] = []

    def make(**kwargs) -> harness.Pods:
        pods = harness.Pods(**kwargs)
        started.append(pods)
        return pods.start_process()

    yield make
    for pods in reversed(started):
        pods.close()


@pytest.fixture
def pods(make_pods) -> harness.Pods:
    """Six pods: zones a, b, c with two each."""
    return make_pods()


@pytest.fixture
def make_envoy():
    """Factory: make_envoy(pods, filter_config=None|dict, lb=..., node_zone="a",
    concurrency=2) -> running harness.Envoy."""
    started: list[harness.Envoy] = []

    def make(pods, **kwargs) -> harness.Envoy:
        envoy = harness.Envoy(pods, **kwargs)
        started.append(envoy)
        return envoy.start_process()

    yield make
    for envoy in reversed(started):
        envoy.close()


@pytest.fixture
def start_devices():
    """Factory for `lab devices` in the background: start_devices(target, streams, mean_rate,
    dist, duration, **kwargs) -> harness.Devices (call .wait() for the summary)."""
    started: list[harness.Devices] = []

    def start(*args, **kwargs) -> harness.Devices:
        devices = harness.start_devices(*args, **kwargs)
        started.append(devices)
        return devices

    yield start
    for devices in reversed(started):
        devices.close()
