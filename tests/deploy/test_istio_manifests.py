"""Every object `kubectl kustomize` renders from istio/ is valid for its Istio CRD (schema with
strict fields, CEL rules by hand); the plugin configs are accepted by the filter itself; the
overlays agree with the base and with the reference Envoy config."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from deploy_helpers import (
    ISTIO,
    KUSTOMIZATIONS,
    REPO,
    by_kind,
    cel_errors,
    deepcopy,
    envoy_validate,
    is_istio,
    kustomize,
    one,
    WASM_FILTER,
    http_filter_named,
    reference_config,
    validation_errors,
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {path: kustomize(path) for path in KUSTOMIZATIONS}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_istio_object_is_valid_for_its_crd(rendered, path):
    objects = rendered[path]
    istio_objects = [o for o in objects if is_istio(o)]
    assert istio_objects, f"{path} renders no Istio object"
    for obj in istio_objects:
        assert validation_errors(obj) == [], f"{path}: {obj['kind']}/{obj['metadata']['name']}"


def test_base_has_the_gateway_plugin_and_envoyfilter(rendered):
    objects = rendered["istio/base"]
    assert sorted(o["kind"] for o in objects) == ["EnvoyFilter", "WasmPlugin"]
    plugin = one(objects, "WasmPlugin")["spec"]
    filt = one(objects, "EnvoyFilter")["spec"]
    # Both select the same gateway workload.
    assert plugin["selector"]["matchLabels"] == filt["workloadSelector"]["labels"]
    assert plugin["match"] == [{"mode": "CLIENT"}]
    assert plugin["type"] == "HTTP"
    # Right before the router, after authn/authz/stats; last among unphased plugins.
    assert plugin["phase"] == "UNSPECIFIED_PHASE" and plugin["priority"] < 0
    assert plugin["failStrategy"] == "FAIL_RELOAD"


# --- negative tests: the validation must catch mistakes -----------------------------------


def _base_plugin(rendered) -> dict:
    return deepcopy(one(rendered["istio/base"], "WasmPlugin"))


def test_unknown_field_fails_validation(rendered):
    plugin = _base_plugin(rendered)
    plugin["spec"]["failStrategyy"] = "FAIL_OPEN"
    assert any("failStrategyy" in e for e in validation_errors(plugin))
    filt = deepcopy(one(rendered["istio/base"], "EnvoyFilter"))
    filt["spec"]["configPatches"][0]["match"]["cluster"]["port"] = 50051  # portNumber is right
    assert any("port" in e for e in validation_errors(filt))


@pytest.mark.parametrize(
    "field, value",
    [
        ("failStrategy", "FAIL_CLOSED"),  # the Envoy spelling; Istio's is FAIL_CLOSE
        ("phase", "ROUTER"),
        ("sha256", "not-a-digest"),
        ("priority", "high"),
        ("match", [{"mode": "OUTBOUND"}]),
        ("match", [{"mode": "SERVER", "ports": [{"number": 70000}]}]),
    ],
)
def test_invalid_value_fails_validation(rendered, field, value):
    plugin = _base_plugin(rendered)
    plugin["spec"][field] = value
    assert validation_errors(plugin) != []


def test_cel_rules_are_checked(rendered):
    plugin = _base_plugin(rendered)
    assert cel_errors(plugin) == []
    plugin["spec"]["url"] = "ftp://registry.example.com/streamlb:dev"
    assert any("url must have schema" in e for e in cel_errors(plugin))
    for url in ("oci://r.example.com/x:1", "file:///opt/x.wasm", "https://x/y.wasm", "r.example.com/x:1"):
        plugin["spec"]["url"] = url
        assert cel_errors(plugin) == [], url
    plugin["spec"]["targetRefs"] = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "iot"}]
    assert any("only one of targetRefs or selector" in e for e in validation_errors(plugin))
    plugin["spec"].pop("selector")
    assert validation_errors(plugin) == []
    plugin["spec"]["targetRefs"][0]["namespace"] = "elsewhere"
    assert any("cross namespace" in e for e in validation_errors(plugin))
    filt = deepcopy(one(rendered["istio/base"], "EnvoyFilter"))
    filt["spec"]["targetRefs"] = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "iot"}]
    assert any("workloadSelector" in e for e in validation_errors(filt))


# --- the plugin configs are accepted by the filter itself -----------------------------------


def _plugin_configs(rendered) -> list[tuple[str, dict]]:
    configs = []
    for path, objects in rendered.items():
        for obj in by_kind(objects, "WasmPlugin"):
            configs.append((f"{path}:{obj['metadata']['name']}", obj["spec"]["pluginConfig"]))
        for obj in by_kind(objects, "TrafficExtension"):
            configs.append((f"{path}:{obj['metadata']['name']}", obj["spec"]["wasm"]["pluginConfig"]))
    return configs


def _istio_json(value):
    """Istio passes pluginConfig (a protobuf Struct: every number a double) to the filter as
    JSON; protojson prints integral doubles without a fraction."""
    if isinstance(value, dict):
        return {k: _istio_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_istio_json(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


def test_every_plugin_config_is_accepted_by_the_filter(rendered, wasm, tmp_path):
    configs = _plugin_configs(rendered)
    assert len(configs) == 3
    for name, plugin_config in configs:
        config = reference_config()
        wasm_filter = http_filter_named(config, WASM_FILTER)
        wasm_filter["typed_config"]["config"]["configuration"]["value"] = json.dumps(_istio_json(plugin_config))
        try:
            envoy_validate(config, tmp_path)
        except RuntimeError as err:
            pytest.fail(f"{name}: the filter rejects its pluginConfig:\n{err}")


def test_a_bad_plugin_config_is_rejected_by_the_filter(rendered, wasm, tmp_path):
    plugin_config = deepcopy(_plugin_configs(rendered)[0][1])
    plugin_config["zone"]["spill_threshold"] = 1.7
    config = reference_config()
    wasm_filter = http_filter_named(config, WASM_FILTER)
    wasm_filter["typed_config"]["config"]["configuration"]["value"] = json.dumps(plugin_config)
    with pytest.raises(RuntimeError):
        envoy_validate(config, tmp_path)


def test_base_documents_every_config_field():
    """Each field of the filter's Config structs appears in the base WasmPlugin (set, or in a
    comment with its meaning)."""
    source = (REPO / "core" / "src" / "config.rs").read_text()
    fields = set(re.findall(r"^\s*pub (\w+):", source, re.M)) - {"path", "reason"}
    text = (ISTIO / "base" / "wasmplugin.yaml").read_text()
    missing = sorted(f for f in fields if not re.search(rf"^\s*#?\s*{f}:", text, re.M))
    assert missing == []


# --- overlays agree with the base -------------------------------------------------------------


def test_traffic_extension_is_the_same_filter(rendered):
    plugin = one(rendered["istio/base"], "WasmPlugin")["spec"]
    objects = rendered["istio/overlays/traffic-extension"]
    assert by_kind(objects, "WasmPlugin") == [], "the overlay must replace the WasmPlugin"
    ext = one(objects, "TrafficExtension")
    assert ext["metadata"]["namespace"] == one(rendered["istio/base"], "WasmPlugin")["metadata"]["namespace"]
    spec = ext["spec"]
    for key in ("selector", "priority", "match"):
        assert spec[key] == plugin[key], key
    assert (spec["phase"], plugin["phase"]) == ("UNSPECIFIED", "UNSPECIFIED_PHASE")
    for key in ("url", "imagePullPolicy", "type", "failStrategy", "pluginConfig"):
        assert spec["wasm"][key] == plugin[key], key
    assert one(objects, "EnvoyFilter") == one(rendered["istio/base"], "EnvoyFilter")


def test_inbound_overlay_hpa_reads_the_adapter_metric(rendered):
    objects = rendered["istio/overlays/inbound"]
    plugin = one(objects, "WasmPlugin")["spec"]
    assert plugin["match"][0]["mode"] == "SERVER"
    assert plugin["pluginConfig"]["mode"] == "shadow"
    assert all(c.startswith("inbound|") for c in plugin["pluginConfig"]["clusters"])
    ports = {p["number"] for p in plugin["match"][0]["ports"]}
    assert {f"inbound|{p}||" for p in ports} == set(plugin["pluginConfig"]["clusters"])
    # The EnvoyFilter's admin cluster is the one the plugin polls, in the same workloads.
    filt = one(objects, "EnvoyFilter")["spec"]
    assert filt["workloadSelector"]["labels"] == plugin["selector"]["matchLabels"]
    added = [p["patch"]["value"]["name"] for p in filt["configPatches"]
             if p["applyTo"] == "CLUSTER" and p["patch"]["operation"] == "ADD"]
    assert added[0] == plugin["pluginConfig"]["discovery"]["admin_cluster"]

    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["namespace"] == one(objects, "WasmPlugin")["metadata"]["namespace"]
    spec = hpa["spec"]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    float(metric["pods"]["target"]["averageValue"])

    adapter = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # The series is a stat the filter really emits.
    stats_source = "".join(p.read_text() for p in (REPO / "src" / "filter").glob("*.rs"))
    assert f'"{series}"' in stats_source
