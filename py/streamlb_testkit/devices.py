"""`lab devices`: simulated devices, one long-lived gRPC stream each."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .paths import require_lab
from .processes import Managed, Proc


def devices_argv(
    target: str,
    streams: int,
    mean_rate: float,
    dist: str,
    duration: float,
    out: Path,
    kind: str = "bidi",
    headers: Iterable[tuple[str, str] | str] = (),
    record_headers: Iterable[str] = ("x-streamlb-decision",),
    reconnect: bool = False,
    seed: int = 1,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`lab devices` command line. headers: ("name", "value") pairs or "name:value" strings."""
    argv = [
        str(require_lab()),
        "devices",
        "--target",
        target,
        "--streams",
        str(streams),
        "--mean-rate",
        str(mean_rate),
        "--rate-dist",
        dist,
        "--duration",
        str(duration),
        "--kind",
        kind,
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    for header in headers:
        argv += ["--header", header if isinstance(header, str) else f"{header[0]}:{header[1]}"]
    for name in record_headers:
        argv += ["--record-header", name]
    if reconnect:
        argv.append("--reconnect")
    return argv + list(extra_args)


class Devices(Managed):
    """`lab devices` running in the background (started on construction); wait() returns its
    JSON summary: {"streams": [{"device", "rate", "pods", "zone", "headers", "sent", "acked",
    "failed", "resent", "reconnects", "statuses"}], "totals": {...}, "latency_ms": {...}}.
    Keyword arguments are those of devices_argv() plus workdir."""

    def __init__(self, target: str, streams: int, mean_rate: float, dist: str, duration: float, **kwargs: Any):
        workdir = kwargs.pop("workdir", None)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamlb-devices-"))
        self.duration = duration
        self.out = self.workdir / "devices.json"
        argv = devices_argv(target, streams, mean_rate, dist, duration, self.out, **kwargs)
        self.proc = Proc("devices", argv, self.workdir)

    def start_process(self) -> "Devices":
        return self  # started in __init__

    def running(self) -> bool:
        return self.proc.running()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Waits for the run to end (default: duration + 60 s) and returns the summary."""
        if timeout is None:
            timeout = self.duration + 60
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.stop()
            raise RuntimeError(f"lab devices did not finish in {timeout}s:\n{self.proc.tail()}")
        if code != 0 or not self.out.exists():
            raise RuntimeError(f"lab devices exited {code}:\n{self.proc.tail()}")
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        self.proc.stop()


def start_devices(target: str, streams: int, mean_rate: float, dist: str, duration: float, **kwargs: Any) -> Devices:
    """`lab devices` in the background, for tests that act mid-run."""
    return Devices(target, streams, mean_rate, dist, duration, **kwargs)


def run_devices(
    target: str, streams: int, mean_rate: float, dist: str, duration: float, timeout: float | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Runs `lab devices` to completion and returns its parsed JSON summary."""
    with Devices(target, streams, mean_rate, dist, duration, **kwargs) as devices:
        return devices.wait(timeout)
