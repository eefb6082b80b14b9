"""The Envoy bootstrap, rendered from envoy/envoy.yaml.tmpl (for the tests, the demo, the bench
and tools/render_envoy.py)."""

from __future__ import annotations

import copy
import json
import os
import string
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .paths import REPO, wasm_path

TEMPLATE = REPO / "envoy" / "envoy.yaml.tmpl"
DEFAULT_ENDPOINT_HEADER = "x-gateway-destination-endpoint"
LB_CHOICES = ("override_host", "least_request", "round_robin", "zone_aware")
# The filter configuration the demo and the compose config use.
DEFAULT_FILTER_CONFIG: dict[str, Any] = {"clusters": ["pods"], "debug_header": "x-streamlb-decision"}


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def lb_policy(name: str, type_name: str, **config: Any) -> dict[str, Any]:
    """A LoadBalancingPolicy with one envoy.load_balancing_policies.<name> entry."""
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


def _gateways_cluster(zones: Sequence[str], admin_port: int) -> dict[str, Any]:
    """Zone-aware routing's local cluster: one gateway per zone (never connected to)."""
    return {
        "name": "gateways",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "gateways",
            "endpoints": [
                {
                    "locality": {"zone": zone},
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}}
                    ],
                }
                for zone in zones
            ],
        },
    }


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
    admin_gate_port: int | None = None,
    native_strip: bool = True,
    reporter: bool = False,
    exact_balance: bool = False,
) -> dict[str, Any]:
    """The Envoy bootstrap as a dict, from envoy/envoy.yaml.tmpl.

    filter_config None: no wasm filter (baseline). lb: "override_host" (the template),
    "least_request", "round_robin", "zone_aware" (least_request with zone-aware routing; the
    local cluster `gateways` says one gateway per zone in `gateway_zones`, default the pod
    zones), or a LoadBalancingPolicy dict used as is. health_checks False drops the pods'
    active TCP health check. exact_balance spreads the listener's connections evenly over the
    workers (without reuse_port, which the template turns off, a few workers may take most).
    """
    values = {
        "admin_port": admin_port,
        "admin_gate_port": admin_gate_port if admin_gate_port is not None else admin_port + 1,
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
    if exact_balance:
        listener["connection_balance_config"] = {"exact_balance": {}}
    config["admin"]["address"]["socket_address"]["address"] = admin_address
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if filter_config is None:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.wasm"]
    if not native_strip:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.header_mutation"]
    if reporter:
        # A pod's inbound proxy: probes arrive marked and are answered by the filter.
        for f in hcm["http_filters"]:
            if f["name"] == "envoy.filters.http.header_mutation":
                mutations = f["typed_config"]["mutations"]["request_mutations"]
                mutations[:] = [m for m in mutations if m.get("remove") != "x-streamlb-probe"]
        for vhost in hcm["route_config"]["virtual_hosts"]:
            vhost["routes"] = [r for r in vhost["routes"] if r.get("name") != "load-probes"]

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
        pods_cluster["load_balancing_policy"] = lb_policy("least_request", "LeastRequest")
    elif lb == "round_robin":
        pods_cluster["load_balancing_policy"] = lb_policy("round_robin", "RoundRobin")
    elif lb == "zone_aware":
        pods_cluster["load_balancing_policy"] = lb_policy(
            "least_request",
            "LeastRequest",
            locality_lb_config={
                "zone_aware_lb_config": {"min_cluster_size": 1, "routing_enabled": {"value": 100}}
            },
        )
        # Zone-aware routing compares the share of *gateways* per zone (this local cluster)
        # with the share of pods per zone.
        zones = list(gateway_zones or dict.fromkeys(p["zone"] for p in pods))
        clusters.append(_gateways_cluster(zones, admin_port))
        config["cluster_manager"] = {"local_cluster_name": "gateways"}
    else:
        raise ValueError(f"lb must be one of {LB_CHOICES} or a policy dict, not {lb!r}")
    return config


def render_yaml(**kwargs: Any) -> str:
    return yaml.safe_dump(render_config(**kwargs), sort_keys=False, width=120)
