"""pytest fixtures for the deployment tests; helpers live in deploy_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import streamlb_testkit as harness


@pytest.fixture(scope="session", autouse=True)
def _stop_everything_at_exit():
    yield
    harness.stop_all()


@pytest.fixture(scope="session")
def wasm() -> Path:
    path = harness.wasm_path()
    if not path.exists():
        pytest.fail(f"{path} missing: run `make build-wasm`")
    return path
