"""Envoy as a child process, in front of lab pods, and its admin API."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .envoy_config import DEFAULT_ENDPOINT_HEADER, render_config
from .paths import envoy_bin, wasm_path
from .pods import Pods
from .processes import Managed, Proc, die_with_parent, free_port, http_request


def validate_config(path: Path) -> str:
    """`envoy --mode validate` on a config file (starts the wasm VM, so the filter's
    on_configure runs). Returns its output; raises RuntimeError when invalid."""
    result = subprocess.run(
        [str(envoy_bin()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=die_with_parent,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"envoy --mode validate failed ({result.returncode}):\n{output}")
    return output


class Envoy(Managed):
    """Envoy in front of `pods`, rendered from envoy/envoy.yaml.tmpl.

    filter_config None runs without the streamlb filter. Exposes listen_addr, admin(path),
    stats() (counters and gauges by name), prometheus(), clusters(), log_text(), validate().
    """

    def __init__(
        self,
        pods: Pods | Sequence[Mapping[str, Any]],
        filter_config: Mapping[str, Any] | None = None,
        lb: str | Mapping[str, Any] = "override_host",
        node_zone: str = "a",
        concurrency: int = 2,
        endpoint_header: str = DEFAULT_ENDPOINT_HEADER,
        wasm: str | os.PathLike | None = None,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        start_timeout: float = 60.0,
        gateway_zones: Sequence[str] | None = None,
        health_checks: bool = True,
        native_strip: bool = True,
        reporter: bool = False,
        lds: bool = False,
        exact_balance: bool = False,
    ):
        self.health_checks = health_checks
        self.native_strip = native_strip
        self.reporter = reporter
        self.lds = lds
        self.exact_balance = exact_balance
        self.pod_list = list(pods.pods if isinstance(pods, Pods) else pods)
        self.filter_config = filter_config
        self.lb = lb
        self.node_zone = node_zone
        self.concurrency = concurrency
        self.endpoint_header = endpoint_header
        self.wasm = Path(wasm) if wasm else wasm_path()
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamlb-envoy-"))
        self.start_timeout = start_timeout
        self.gateway_zones = gateway_zones
        self.admin_port = free_port()
        self.admin_gate_port = free_port()
        self.listen_port = free_port()
        self.config_path = self.workdir / "envoy.yaml"
        self.lds_path = self.workdir / "lds.yaml"
        self.proc: Proc | None = None
        self.write_config()

    @property
    def listen_addr(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    @property
    def admin_addr(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def config(self) -> dict[str, Any]:
        return render_config(
            pods=self.pod_list,
            admin_port=self.admin_port,
            listen_port=self.listen_port,
            node_zone=self.node_zone,
            filter_config=self.filter_config,
            wasm=self.wasm,
            lb=self.lb,
            endpoint_header=self.endpoint_header,
            gateway_zones=self.gateway_zones,
            health_checks=self.health_checks,
            admin_gate_port=self.admin_gate_port,
            native_strip=self.native_strip,
            reporter=self.reporter,
            exact_balance=self.exact_balance,
        )

    def write_config(self) -> Path:
        if self.filter_config is not None and not self.wasm.exists():
            raise FileNotFoundError(f"{self.wasm} missing: run `make build`")
        config = self.config()
        if self.lds:
            # Filesystem LDS: the listeners live in lds.yaml, which Envoy watches (a rename into
            # place is an update).
            listeners = config["static_resources"].pop("listeners")
            config["dynamic_resources"] = {
                "lds_config": {"path_config_source": {"path": str(self.lds_path)}, "resource_api_version": "V3"}
            }
            self._write_lds(listeners)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False, width=120))
        return self.config_path

    def _write_lds(self, listeners: list[dict[str, Any]]) -> None:
        resources = [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **l} for l in listeners]
        staging = self.workdir / "lds.yaml.next"
        staging.write_text(yaml.safe_dump({"resources": resources}, sort_keys=False, width=120))
        os.replace(staging, self.lds_path)

    def update_filter_config(self, filter_config: Mapping[str, Any], timeout: float = 15.0) -> None:
        """With `lds=True`: push a new filter configuration as a listener update and wait until
        Envoy has accepted it (listener_manager.lds.update_success grows)."""
        if not self.lds:
            raise RuntimeError("update_filter_config needs Envoy(lds=True)")
        name = "listener_manager.lds.update_success"
        before = self.stats(f"^{re.escape(name)}$").get(name, 0)
        self.filter_config = dict(filter_config)
        self._write_lds(self.config()["static_resources"]["listeners"])
        if not self.wait_for_counter(name, before + 1, timeout):
            raise RuntimeError(f"Envoy did not accept the listener update:\n{self.proc.tail(40) if self.proc else ''}")

    def validate(self) -> str:
        """validate_config() on the rendered config."""
        return validate_config(self.config_path)

    def argv(self) -> list[str]:
        return [
            str(envoy_bin()),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            self.log_level,
            # Its own shared-memory region, so envoys started side by side do not clash.
            "--base-id",
            str(random.randint(1_000, 2**31 - 1)),
            *self.extra_args,
        ]

    def start_process(self) -> "Envoy":
        self.proc = Proc("envoy", self.argv(), self.workdir)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.proc.running():
                break
            try:
                status, body = http_request("GET", f"http://{self.admin_addr}/ready", timeout=1.0)
                if status == 200 and body.strip() == "LIVE":
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.proc.stop()
        raise RuntimeError(f"envoy did not become ready:\n{self.proc.tail(60)}")

    def running(self) -> bool:
        return bool(self.proc and self.proc.running())

    def admin(self, path: str, method: str = "GET") -> str:
        status, body = http_request(method, f"http://{self.admin_addr}{path}", body=b"" if method == "POST" else None)
        if status != 200:
            raise RuntimeError(f"{method} admin {path} -> {status}: {body}")
        return body

    def stats(self, filter_regex: str | None = None) -> dict[str, int | float]:
        """Counters and gauges from /stats?format=json, by full stat name (tags still in the
        name). Histograms are left out: see stats_json()."""
        out: dict[str, int | float] = {}
        for entry in self.stats_json(filter_regex).get("stats", []):
            if "name" in entry and "value" in entry:
                out[entry["name"]] = entry["value"]
        return out

    def stats_by_tag(self, filter_regex: str, tag: str) -> dict[str, float]:
        """Counters and gauges matching `filter_regex` summed by the value of the filter's tag
        `tag` (`tag=.=VALUE;.;` in the stat name); stats without it count under "?"."""
        marker = f"{tag}=.="
        out: dict[str, float] = {}
        for name, value in self.stats(filter_regex).items():
            key = name.split(marker, 1)[1].split(";", 1)[0] if marker in name else "?"
            out[key] = out.get(key, 0) + value
        return out

    def stats_json(self, filter_regex: str | None = None) -> dict[str, Any]:
        path = "/stats?format=json"
        if filter_regex:
            path += "&filter=" + urllib.parse.quote(filter_regex)
        return json.loads(self.admin(path))

    def wait_for_counter(self, name: str, at_least: float = 1, timeout: float = 15.0) -> bool:
        """Waits until stat `name` (full name, e.g. wasmcustom.streamlb_discovery_polls_ok_total)
        reaches `at_least`; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats(f"^{re.escape(name)}$").get(name, 0) >= at_least:
                return True
            time.sleep(0.2)
        return False

    def prometheus(self) -> str:
        return self.admin("/stats/prometheus")

    def clusters(self) -> dict[str, Any]:
        return json.loads(self.admin("/clusters?format=json"))

    def log_text(self) -> str:
        return self.proc.stderr_text() if self.proc else ""
