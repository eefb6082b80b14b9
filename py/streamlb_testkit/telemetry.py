"""A Python gRPC client for streamlb.lab.v1.Telemetry, with stubs generated from lab/proto."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from .paths import REPO

PROTO_DIR = REPO / "lab" / "proto"

_STUBS: tuple[ModuleType, ModuleType] | None = None
_STUBS_LOCK = threading.Lock()


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # The generated _grpc module imports `telemetry_pb2` by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def telemetry_stubs() -> tuple[ModuleType, ModuleType]:
    """(telemetry_pb2, telemetry_pb2_grpc), generated once per process with grpcio-tools."""
    global _STUBS
    with _STUBS_LOCK:
        if _STUBS is None:
            from grpc_tools import protoc  # noqa: PLC0415 (heavy import, only when needed)

            out = Path(tempfile.mkdtemp(prefix="streamlb-stubs-"))
            args = [
                "protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(PROTO_DIR / "telemetry.proto"),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError("grpc_tools.protoc failed on lab/proto/telemetry.proto")
            pb2 = _load("telemetry_pb2", out / "telemetry_pb2.py")
            _STUBS = (pb2, _load("telemetry_pb2_grpc", out / "telemetry_pb2_grpc.py"))
        return _STUBS


def stream_readings(
    target: str,
    count: int = 3,
    metadata: Sequence[tuple[str, str]] = (),
    device_id: str = "py-device",
    timeout: float = 10.0,
) -> tuple[dict[str, str], list[Any]]:
    """Opens one bidi Telemetry/Stream through `target`, sends `count` readings and half-closes.
    Returns (initial response metadata, acks)."""
    import grpc  # noqa: PLC0415

    pb2, pb2_grpc = telemetry_stubs()

    def readings():
        for seq in range(count):
            yield pb2.Reading(device_id=device_id, seq=seq, sent_unix_nanos=time.time_ns(), payload=b"x" * 16)

    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.TelemetryStub(channel)
        call = stub.Stream(readings(), metadata=list(metadata), timeout=timeout)
        acks = list(call)
        initial = {k: v for k, v in call.initial_metadata()}
    return initial, acks
