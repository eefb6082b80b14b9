"""`lab pods` (gRPC test pods in zones, all in one process) and a client of its control API."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .paths import require_lab
from .processes import Managed, Proc, http_request

DEFAULT_ZONES = {"a": 2, "b": 2, "c": 2}


class Pods(Managed):
    """`lab pods`: gRPC test pods in zones.

    The process prints one JSON line: {"control": "127.0.0.1:P", "pods": [{"name", "zone",
    "address"}, ...]}; the control API serves GET /stats and POST /pods/<name>/stop|start.
    capacity: msgs/s per pod (0 = unlimited); zone_capacity: per-zone values over it.
    """

    def __init__(
        self,
        zones: Mapping[str, int] | None = None,
        capacity: float = 0,
        orca: bool = False,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        start_timeout: float = 20.0,
        zone_capacity: Mapping[str, float] | None = None,
    ):
        self.zones = dict(zones or DEFAULT_ZONES)
        self.capacity = capacity
        self.zone_capacity = dict(zone_capacity or {})
        self.orca = orca
        self.extra_args = list(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamlb-pods-"))
        self.start_timeout = start_timeout
        self.proc: Proc | None = None
        self.control = ""
        self.pods: list[dict[str, Any]] = []

    def argv(self) -> list[str]:
        argv = [str(require_lab()), "pods", "--zones", ",".join(f"{z}={n}" for z, n in self.zones.items())]
        if self.capacity:
            argv += ["--capacity", str(self.capacity)]
        if self.zone_capacity:
            argv += ["--zone-capacity", ",".join(f"{z}={c}" for z, c in self.zone_capacity.items())]
        if self.orca:
            argv += ["--orca"]
        return argv + self.extra_args

    def start_process(self) -> "Pods":
        self.proc = Proc("pods", self.argv(), self.workdir)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            first = self.proc.stdout_text().split("\n", 1)
            if len(first) == 2:
                info = json.loads(first[0])
                self.control = info["control"]
                self.pods = info["pods"]
                return self
            if not self.proc.running():
                break
            time.sleep(0.05)
        self.proc.stop()
        raise RuntimeError(f"lab pods did not report its pods:\n{self.proc.tail()}")

    # --- lookups
    @property
    def names(self) -> list[str]:
        return [p["name"] for p in self.pods]

    def by_name(self, name: str) -> dict[str, Any]:
        for pod in self.pods:
            if pod["name"] == name:
                return pod
        raise KeyError(name)

    def by_address(self, address: str) -> dict[str, Any]:
        for pod in self.pods:
            if pod["address"] == address:
                return pod
        raise KeyError(address)

    def zone_names(self) -> list[str]:
        """Zones in first-seen order of the pods list."""
        return list(dict.fromkeys(pod["zone"] for pod in self.pods))

    # --- control API
    def stats(self) -> dict[str, Any]:
        """{"pods": [{"name", "zone", "address", "up", "streams_active", "streams_total",
        "messages", "bytes", "truncated"}]}"""
        status, body = http_request("GET", f"http://{self.control}/stats")
        if status != 200:
            raise RuntimeError(f"GET /stats -> {status}: {body}")
        return json.loads(body)

    def pod_stats(self) -> dict[str, dict[str, Any]]:
        """stats() keyed by pod name."""
        return {p["name"]: p for p in self.stats()["pods"]}

    def stop(self, name: str) -> None:
        self._post(name, "stop")

    def start(self, name: str) -> None:
        self._post(name, "start")

    def set_capacity(self, name: str, capacity: float) -> None:
        """The pod's capacity (msgs/s) from now on: its acks slow down above it, and its load
        reports say the new utilisation."""
        self._post(name, f"capacity/{capacity:g}")

    def _post(self, name: str, action: str) -> None:
        status, body = http_request("POST", f"http://{self.control}/pods/{name}/{action}", body=b"")
        if status // 100 != 2:
            raise RuntimeError(f"{action} {name} -> {status}: {body}")
