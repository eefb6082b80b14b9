"""Single source of truth: every Envoy fragment inside the EnvoyFilter patches is the fragment of
envoy/envoy.yaml.tmpl that the real-Envoy e2e tests load (rendered by harness.render_config),
with only Istio's names and the admin port substituted; and Envoy 1.40 validates a bootstrap
built from an Istio-shaped cluster and route with exactly these patches applied."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from deploy_helpers import (
    ISTIO_ADMIN_GATE_PORT,
    ISTIO_ADMIN_PORT,
    STRIP_FILTER,
    WASM_FILTER,
    by_kind,
    cluster_named,
    envoy_validate,
    http_filter_named,
    kustomize,
    listener_named,
    one,
    reference_config,
    route_named,
)

TEMPLATE_ADMIN_PORT = 19000
TEMPLATE_ADMIN_GATE_PORT = 19002
# Template port -> the port the Istio manifests use.
ISTIO_PORTS = {TEMPLATE_ADMIN_PORT: ISTIO_ADMIN_PORT, TEMPLATE_ADMIN_GATE_PORT: ISTIO_ADMIN_GATE_PORT}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return reference_config(admin_port=TEMPLATE_ADMIN_PORT, admin_gate_port=TEMPLATE_ADMIN_GATE_PORT)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize("istio/base")


def _patches(envoy_filter: dict[str, Any], apply_to: str, operation: str) -> list[dict[str, Any]]:
    return [
        p
        for p in envoy_filter["spec"]["configPatches"]
        if p["applyTo"] == apply_to and p["patch"]["operation"] == operation
    ]


def _with_istio_ports(fragment: Any) -> Any:
    """A template fragment with the admin and gate ports the Istio manifests use."""
    if isinstance(fragment, list):
        return [_with_istio_ports(v) for v in fragment]
    if not isinstance(fragment, dict):
        return fragment
    out = {k: _with_istio_ports(v) for k, v in fragment.items()}
    if "socket_address" in out:
        address = out["socket_address"]
        assert address["port_value"] in ISTIO_PORTS, address
        out["socket_address"] = dict(address, port_value=ISTIO_PORTS[address["port_value"]])
    return out


def _renamed(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    cluster = copy.deepcopy(cluster)
    cluster["name"] = name
    cluster["load_assignment"]["cluster_name"] = name
    return cluster


def test_pods_cluster_policy_is_the_templates(base, reference):
    plugin = one(base, "WasmPlugin")["spec"]["pluginConfig"]
    (patch,) = _patches(one(base, "EnvoyFilter"), "CLUSTER", "MERGE")
    template_policy = cluster_named(reference, "pods")["load_balancing_policy"]
    assert patch["patch"]["value"] == {"load_balancing_policy": template_policy}
    # The header override_host reads is the one the filter sets.
    override = template_policy["policies"][0]["typed_extension_config"]["typed_config"]
    assert override["override_host_sources"] == [{"header": plugin["endpoint_header"]}]
    # The patched cluster is the one the filter places streams for.
    match = patch["match"]["cluster"]
    assert plugin["clusters"] == [f"outbound|{match['portNumber']}||{match['service']}"]


@pytest.mark.parametrize("path", ["istio/base", "istio/overlays/inbound"])
def test_admin_cluster_and_gate_are_the_templates(path, reference):
    objects = kustomize(path)
    plugin = one(objects, "WasmPlugin")["spec"]["pluginConfig"]
    admin_name = plugin["discovery"]["admin_cluster"]
    envoy_filter = one(objects, "EnvoyFilter")
    clusters = [p["patch"]["value"] for p in _patches(envoy_filter, "CLUSTER", "ADD")]
    assert clusters == [
        _with_istio_ports(_renamed(cluster_named(reference, "streamlb_admin"), admin_name)),
        _with_istio_ports(cluster_named(reference, "streamlb_envoy_admin")),
    ]
    (gate,) = _patches(envoy_filter, "LISTENER", "ADD")
    assert gate["patch"]["value"] == _with_istio_ports(listener_named(reference, "streamlb_admin_gate"))


@pytest.mark.parametrize("path", ["istio/base", "istio/overlays/inbound"])
def test_native_endpoint_header_strip_is_the_templates(path, reference):
    objects = kustomize(path)
    plugin = one(objects, "WasmPlugin")["spec"]["pluginConfig"]
    (patch,) = _patches(one(objects, "EnvoyFilter"), "HTTP_FILTER", "INSERT_FIRST")
    assert patch["match"]["listener"]["filterChain"]["filter"]["name"] == "envoy.filters.network.http_connection_manager"
    template = copy.deepcopy(http_filter_named(reference, STRIP_FILTER))
    mutations = template["typed_config"]["mutations"]["request_mutations"]
    removed = [m["remove"] for m in mutations]
    assert removed == [plugin.get("endpoint_header", "x-gateway-destination-endpoint"), "x-streamlb-probe"]
    if "reporter" in plugin:
        # A pod's own sidecar answers probes: it must keep their marker.
        mutations.pop()
    assert patch["patch"]["value"] == template
    # First in the template's chain too: before the wasm filter.
    hcm = reference["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["name"] == STRIP_FILTER


ISTIO_FAIL_STRATEGY = {"FAIL_CLOSE": "FAIL_CLOSED", "FAIL_OPEN": "FAIL_OPEN", "FAIL_RELOAD": "FAIL_RELOAD"}


@pytest.mark.parametrize("path", ["istio/base", "istio/overlays/inbound", "istio/overlays/traffic-extension"])
def test_fail_strategy_is_the_templates(path, reference):
    template = http_filter_named(reference, WASM_FILTER)["typed_config"]["config"]
    assert "fail_open" not in template
    objects = kustomize(path)
    strategies = [o["spec"]["failStrategy"] for o in by_kind(objects, "WasmPlugin")]
    strategies += [o["spec"]["wasm"]["failStrategy"] for o in by_kind(objects, "TrafficExtension")]
    assert strategies and all(ISTIO_FAIL_STRATEGY[s] == template["failure_policy"] for s in strategies), strategies


def test_stream_route_settings_are_the_templates(base, reference):
    (patch,) = _patches(one(base, "EnvoyFilter"), "HTTP_ROUTE", "MERGE")
    name = patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
    template_route = route_named(reference, name)["route"]
    # Everything but the cluster (Istio's own, from the VirtualService).
    assert patch["patch"]["value"] == {"route": {k: v for k, v in template_route.items() if k != "cluster"}}
    assert patch["patch"]["value"]["route"]["timeout"] == "0s"


def test_a_changed_fragment_is_detected(base, reference):
    """The comparison is not vacuous: a template fragment that differs from the patch fails."""
    changed = copy.deepcopy(cluster_named(reference, "pods")["load_balancing_policy"])
    fallback = changed["policies"][0]["typed_extension_config"]["typed_config"]["fallback_policy"]
    fallback["policies"][0]["typed_extension_config"]["name"] = "envoy.load_balancing_policies.round_robin"
    (patch,) = _patches(one(base, "EnvoyFilter"), "CLUSTER", "MERGE")
    assert patch["patch"]["value"] != {"load_balancing_policy": changed}


# --- Envoy validates the patches applied to Istio-shaped config --------------------------------


def proto_merge(dst: Any, src: Any) -> Any:
    """EnvoyFilter MERGE: messages merge field by field, repeated fields append, scalars replace."""
    if isinstance(dst, dict) and isinstance(src, dict):
        out = dict(dst)
        for key, value in src.items():
            out[key] = proto_merge(dst[key], value) if key in dst else copy.deepcopy(value)
        return out
    if isinstance(dst, list) and isinstance(src, list):
        return list(dst) + copy.deepcopy(src)
    return copy.deepcopy(src)


def _istio_cluster(name: str) -> dict[str, Any]:
    """An outbound cluster with the load-balancing fields istiod generates (endpoints static
    here instead of EDS)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "lb_policy": "LEAST_REQUEST",
        "common_lb_config": {"healthy_panic_threshold": {"value": 50}},
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_requests": 4294967295}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "locality": {"zone": zone},
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": f"10.0.{i}.1", "port_value": 50051}}}}
                    ],
                }
                for i, zone in enumerate("abc")
            ],
        },
    }


def test_envoy_validates_the_patched_config(base, reference, wasm, tmp_path):
    plugin = one(base, "WasmPlugin")["spec"]
    envoy_filter = one(base, "EnvoyFilter")
    (lb_patch,) = _patches(envoy_filter, "CLUSTER", "MERGE")
    admin_patches = _patches(envoy_filter, "CLUSTER", "ADD")
    (gate_patch,) = _patches(envoy_filter, "LISTENER", "ADD")
    (strip_patch,) = _patches(envoy_filter, "HTTP_FILTER", "INSERT_FIRST")
    (route_patch,) = _patches(envoy_filter, "HTTP_ROUTE", "MERGE")
    cluster_name = plugin["pluginConfig"]["clusters"][0]
    route_name = route_patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]

    config = copy.deepcopy(reference)
    config["admin"]["address"]["socket_address"]["port_value"] = ISTIO_ADMIN_PORT  # not bound in validate mode
    config["static_resources"]["clusters"] = [
        proto_merge(_istio_cluster(cluster_name), lb_patch["patch"]["value"]),
        *(copy.deepcopy(p["patch"]["value"]) for p in admin_patches),
    ]
    config["static_resources"]["listeners"] = [
        config["static_resources"]["listeners"][0],
        copy.deepcopy(gate_patch["patch"]["value"]),
    ]
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    # Istio's chain: the wasm plugin before the router; the strip patch goes first.
    hcm["http_filters"] = [copy.deepcopy(strip_patch["patch"]["value"])] + [
        f for f in hcm["http_filters"] if f["name"] != STRIP_FILTER
    ]
    # Istio's route: the VirtualService's name and cluster, Istio's own retry/timeout fields.
    istio_route = {
        "name": route_name,
        "match": {"prefix": "/"},
        "route": {"cluster": cluster_name, "timeout": "15s", "max_grpc_timeout": "0s"},
    }
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [proto_merge(istio_route, route_patch["patch"]["value"])]
    wasm_filter = http_filter_named(config, WASM_FILTER)
    wasm_filter["typed_config"]["config"]["configuration"]["value"] = json.dumps(plugin["pluginConfig"])

    patched_cluster = config["static_resources"]["clusters"][0]
    assert patched_cluster["load_balancing_policy"] == lb_patch["patch"]["value"]["load_balancing_policy"]
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"] == "0s"
    envoy_validate(config, tmp_path)


def test_envoy_rejects_the_policy_with_locality_weighted_lb(base, reference, wasm, tmp_path):
    """Known limit (documented in istio/base/envoyfilter.yaml): istiod adds
    common_lb_config.locality_weighted_lb_config for a DestinationRule with
    localityLbSetting.distribute, and Envoy refuses it next to load_balancing_policy."""
    (lb_patch,) = _patches(one(base, "EnvoyFilter"), "CLUSTER", "MERGE")
    config = copy.deepcopy(reference)
    cluster = _istio_cluster("pods")
    cluster["common_lb_config"] = {"locality_weighted_lb_config": {}}
    config["static_resources"]["clusters"] = [
        proto_merge(cluster, lb_patch["patch"]["value"]),
        cluster_named(reference, "streamlb_admin"),
        cluster_named(reference, "streamlb_envoy_admin"),
    ]
    with pytest.raises(RuntimeError, match="load_balancing_policy cannot be combined"):
        envoy_validate(config, tmp_path)


def test_envoy_rejects_a_broken_patch(base, reference, wasm, tmp_path):
    """The validation above can fail: a fallback-less override_host policy is refused."""
    envoy_filter = one(base, "EnvoyFilter")
    (lb_patch,) = _patches(envoy_filter, "CLUSTER", "MERGE")
    value = copy.deepcopy(lb_patch["patch"]["value"])
    value["load_balancing_policy"]["policies"][0]["typed_extension_config"]["typed_config"].pop("fallback_policy")
    config = copy.deepcopy(reference)
    pods = cluster_named(config, "pods")
    pods.update(value)
    with pytest.raises(RuntimeError):
        envoy_validate(config, tmp_path)


def test_every_envoyfilter_patch_is_covered():
    """A new patch must come with a comparison here."""
    kinds = set()
    for path in ("istio/base", "istio/overlays/inbound", "istio/overlays/traffic-extension"):
        for envoy_filter in by_kind(kustomize(path), "EnvoyFilter"):
            for patch in envoy_filter["spec"]["configPatches"]:
                kinds.add((patch["applyTo"], patch["patch"]["operation"]))
    assert kinds == {
        ("CLUSTER", "MERGE"),
        ("CLUSTER", "ADD"),
        ("LISTENER", "ADD"),
        ("HTTP_FILTER", "INSERT_FIRST"),
        ("HTTP_ROUTE", "MERGE"),
    }
