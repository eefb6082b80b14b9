"""pytest fixtures over streamlb_testkit. Every process a test starts is stopped at teardown."""

from __future__ import annotations

import pytest

import streamlb_testkit as kit


@pytest.fixture(scope="session", autouse=True)
def _stop_everything_at_exit():
    yield
    kit.stop_all()


@pytest.fixture
def make_pods():
    """Factory: make_pods(zones={"a": 2}, capacity=0, orca=False) -> running kit.Pods."""
    started: list[kit.Pods] = []

    def make(**kwargs) -> kit.Pods:
        pods = kit.Pods(**kwargs)
        started.append(pods)
        return pods.start_process()

    yield make
    for pods in reversed(started):
        pods.close()


@pytest.fixture
def pods(make_pods) -> kit.Pods:
    """Six pods: zones a, b, c with two each."""
    return make_pods()


@pytest.fixture
def make_envoy():
    """Factory: make_envoy(pods, filter_config=None|dict, lb=..., node_zone="a",
    concurrency=2) -> running kit.Envoy."""
    started: list[kit.Envoy] = []

    def make(pods, **kwargs) -> kit.Envoy:
        envoy = kit.Envoy(pods, **kwargs)
        started.append(envoy)
        return envoy.start_process()

    yield make
    for envoy in reversed(started):
        envoy.close()


@pytest.fixture
def start_devices():
    """Factory for `lab devices` in the background: start_devices(target, streams, mean_rate,
    dist, duration, **kwargs) -> kit.Devices (call .wait() for the summary)."""
    started: list[kit.Devices] = []

    def start(*args, **kwargs) -> kit.Devices:
        devices = kit.start_devices(*args, **kwargs)
        started.append(devices)
        return devices

    yield start
    for devices in reversed(started):
        devices.close()
