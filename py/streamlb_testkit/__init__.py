"""streamlb's test kit: lab pods, Envoy with or without the filter, lab devices, a gRPC client
and Prometheus text parsing, for tests/, bench/ and tools/. Installed editable into .venv by
`make venv`.

    paths        the repository and its binaries ($STREAMLB_LAB, $STREAMLB_WASM, $STREAMLB_ENVOY)
    processes    child processes that die with us; stop_all()
    pods         `lab pods` and its control API
    envoy_config the Envoy bootstrap from envoy/envoy.yaml.tmpl
    envoy        Envoy as a process and its admin API
    devices      `lab devices`
    telemetry    a grpcio client of the lab's Telemetry service
    prometheus   Prometheus text exposition, parsed with prometheus_client
    balance      max/mean of a load spread, and the LPT oracle's
    plots        report charts (matplotlib to inline SVG) and HTML tables; import it explicitly
"""

from .balance import lpt_max_over_mean, max_over_mean
from .devices import Devices, devices_argv, run_devices, start_devices
from .envoy import Envoy, validate_config
from .envoy_config import (
    DEFAULT_ENDPOINT_HEADER,
    DEFAULT_FILTER_CONFIG,
    LB_CHOICES,
    TEMPLATE,
    lb_policy,
    pod_endpoints,
    render_config,
    render_yaml,
)
from .paths import REPO, envoy_bin, lab_bin, require_lab, target_dir, wasm_path
from .pods import DEFAULT_ZONES, Pods
from .processes import Managed, Proc, free_port, http_request, live_processes, stop_all
from .prometheus import Exposition, parse_exposition
from .prometheus import samples as prometheus_samples
from .telemetry import PROTO_DIR, stream_readings, telemetry_stubs

__all__ = [
    "DEFAULT_ENDPOINT_HEADER",
    "DEFAULT_FILTER_CONFIG",
    "DEFAULT_ZONES",
    "LB_CHOICES",
    "PROTO_DIR",
    "REPO",
    "TEMPLATE",
    "Devices",
    "Envoy",
    "Exposition",
    "Managed",
    "Pods",
    "Proc",
    "devices_argv",
    "envoy_bin",
    "free_port",
    "http_request",
    "lab_bin",
    "lb_policy",
    "live_processes",
    "lpt_max_over_mean",
    "max_over_mean",
    "parse_exposition",
    "pod_endpoints",
    "prometheus_samples",
    "render_config",
    "render_yaml",
    "require_lab",
    "run_devices",
    "start_devices",
    "stop_all",
    "stream_readings",
    "target_dir",
    "telemetry_stubs",
    "validate_config",
    "wasm_path",
]
