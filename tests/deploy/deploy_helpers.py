"""Helpers for the deployment tests (imported as deploy_helpers, not conftest, so they never
clash with tests/e2e/conftest.py): kustomize rendering, Istio CRD schema validation (plus the
CEL rules that matter, checked by hand), the rendered reference Envoy config."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

import streamlb_testkit as harness
from streamlb_testkit import REPO

ISTIO = REPO / "istio"
# Istio CRDs and the compose-spec schema, with their provenance in SOURCES.md.
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# Every kustomization shipped in istio/.
KUSTOMIZATIONS = ["istio/base", "istio/overlays/inbound", "istio/overlays/traffic-extension"]
ISTIO_ADMIN_PORT = 15000
# The loopback listener that passes only GET /clusters to the admin API (istio/base).
ISTIO_ADMIN_GATE_PORT = 15180


def kustomize(path: str | Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH` as a list of objects."""
    result = subprocess.run(
        [require_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Istio CRD schemas


def _strict(schema: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON schema as the API server applies it with
    strict field validation (kubectl's default): unknown fields are errors unless
    x-kubernetes-preserve-unknown-fields; `nullable` allows null."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> CRD, from the vendored schemas."""
    crds = {}
    for path in sorted((SCHEMAS / "istio").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = crd
    return crds


def crd_spec_schema(api_version: str, kind: str) -> dict[str, Any]:
    group, _, version = api_version.partition("/")
    crd = _crds().get((group, kind))
    if crd is None:
        raise KeyError(f"no CRD for {api_version} {kind} in {SCHEMAS / 'istio'}")
    for served in crd["spec"]["versions"]:
        if served["name"] == version and served.get("served"):
            return _strict(served["schema"]["openAPIV3Schema"]["properties"]["spec"])
    raise KeyError(f"{kind}: version {version} is not served by the CRD")


def is_istio(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].split("/")[0].endswith(".istio.io")


def metadata_errors(obj: dict[str, Any]) -> list[str]:
    meta = obj.get("metadata", {})
    errors = []
    name = meta.get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name) or len(name) > 253:
        errors.append(f"metadata.name {name!r} is not a DNS subdomain")
    namespace = meta.get("namespace")
    if not namespace or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace):
        errors.append(f"metadata.namespace {namespace!r} missing or invalid")
    return errors


def _url_scheme_ok(url: str) -> bool:
    """WasmPlugin/TrafficExtension CEL: isURL(self) ? scheme in [...] : isURL("http://" + self)."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    return scheme in ("", "http", "https", "oci", "file")


def _selector_errors(selector: dict[str, Any] | None, where: str) -> list[str]:
    errors = []
    labels = (selector or {}).get("matchLabels") or (selector or {}).get("labels") or {}
    for key, value in labels.items():
        if not key:
            errors.append(f"{where}: key must not be empty")
        if "*" in key or "*" in str(value):
            errors.append(f"{where}: wildcard not allowed in label match")
    return errors


def cel_errors(obj: dict[str, Any]) -> list[str]:
    """The x-kubernetes-validations rules of the CRDs used here, by hand."""
    spec = obj.get("spec", {})
    kind = obj["kind"]
    errors: list[str] = []
    if kind in ("WasmPlugin", "TrafficExtension"):
        wasm = spec if kind == "WasmPlugin" else spec.get("wasm", {})
        if "url" in wasm and not _url_scheme_ok(wasm["url"]):
            errors.append("url must have schema one of [http, https, file, oci]")
        selectors = sum(1 for key in ("selector", "targetRef", "targetRefs") if key in spec)
        if selectors > 1:
            errors.append("only one of targetRefs or selector can be set")
        for env in (wasm.get("vmConfig") or {}).get("env", []):
            if env.get("valueFrom") == "HOST" and "value" in env:
                errors.append("value may only be set when valueFrom is INLINE")
        refs = list(spec.get("targetRefs", [])) + ([spec["targetRef"]] if "targetRef" in spec else [])
        for ref in refs:
            if ref.get("namespace"):
                errors.append("cross namespace referencing is not currently supported")
        errors += _selector_errors(spec.get("selector"), f"{kind}.selector")
    if kind == "EnvoyFilter":
        if "workloadSelector" in spec and "targetRefs" in spec:
            errors.append("only one of targetRefs or workloadSelector can be set")
        errors += _selector_errors(spec.get("workloadSelector"), "EnvoyFilter.workloadSelector")
    return errors


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Everything the API server would reject in an Istio object: schema, CEL, metadata."""
    schema = crd_spec_schema(obj["apiVersion"], obj["kind"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"spec.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj.get("spec", {}))
    ]
    return errors + cel_errors(obj) + metadata_errors(obj)


# ---------------------------------------------------------------------------------------------
# The reference Envoy config (envoy/envoy.yaml.tmpl as the e2e tests render it)

FIXED_PODS = [
    {"name": "a-0", "zone": "a", "address": "127.0.0.1:50051"},
    {"name": "b-0", "zone": "b", "address": "127.0.0.1:50052"},
]


def reference_config(admin_port: int = 19000, listen_port: int = 19001, admin_gate_port: int = 19002) -> dict[str, Any]:
    return harness.render_config(
        pods=FIXED_PODS,
        admin_port=admin_port,
        listen_port=listen_port,
        admin_gate_port=admin_gate_port,
        filter_config=harness.DEFAULT_FILTER_CONFIG,
        wasm=harness.wasm_path(),
    )


def cluster_named(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def listener_named(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in config["static_resources"]["listeners"] if item["name"] == name)


def http_filter_named(config: dict[str, Any], name: str) -> dict[str, Any]:
    """An HTTP filter of the devices listener (the first listener) by name."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == name)


WASM_FILTER = "envoy.filters.http.wasm"
STRIP_FILTER = "envoy.filters.http.header_mutation"


def route_named(config: dict[str, Any], name: str) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            if route.get("name") == name:
                return route
    raise KeyError(name)


def envoy_validate(config: dict[str, Any], workdir: Path) -> str:
    """`envoy --mode validate` (starts the wasm VM: the filter's on_configure runs)."""
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return harness.validate_config(path)


def require_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not on PATH: run `make deps` (Makefile APT_PACKAGES; kubectl: see README)")
    return found


def deepcopy(value: Any) -> Any:
    return copy.deepcopy(value)
