"""envoy/docker-compose.yaml: valid Compose (the compose-spec JSON schema), every mounted file
exists or is built by `make build`, its Envoy config is the reference template rendered exactly
as tools/render_envoy.py --compose renders it (and Envoy validates it), and the commands are
accepted by the lab CLI."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy_helpers import REPO, SCHEMAS, WASM_FILTER, envoy_validate, harness, http_filter_named, listener_named

COMPOSE = REPO / "envoy" / "docker-compose.yaml"
BUILT_BY_MAKE = {REPO / "target" / "wasm32-wasip1" / "release" / "streamlb.wasm"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts.append(((COMPOSE.parent / source).resolve(), target))
    return mounts


def test_compose_file_is_valid_for_the_compose_spec(compose):
    schema = json.loads((SCHEMAS / "compose" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = copy.deepcopy(compose)
    broken["services"]["envoy"]["portz"] = ["10000:10000"]
    assert list(validator.iter_errors(broken)), "the schema must reject an unknown service field"


def test_every_mounted_file_exists_or_is_built(compose):
    for name, service in compose["services"].items():
        for source, _ in _mounts(service):
            assert source.exists() or source in BUILT_BY_MAKE, f"{name}: {source} missing"
    # Every dependency names a service.
    for name, service in compose["services"].items():
        for dep in service.get("depends_on", []):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"


def test_envoy_config_is_the_rendered_template(compose, tmp_path):
    envoy = compose["services"]["envoy"]
    mounts = {target: source for source, target in _mounts(envoy)}
    config_path = mounts[envoy["command"][envoy["command"].index("-c") + 1]]
    assert config_path == REPO / "envoy" / "envoy.compose.yaml"
    fresh = tmp_path / "envoy.compose.yaml"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "render_envoy.py"), "--compose", "-o", str(fresh)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert config_path.read_text() == fresh.read_text(), (
        "envoy/envoy.compose.yaml is stale: run tools/render_envoy.py --compose"
    )
    config = yaml.safe_load(config_path.read_text())
    # The wasm the config loads is the mounted build; the published port is the listener.
    wasm_filter = http_filter_named(config, WASM_FILTER)
    wasm_in_container = wasm_filter["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
    assert mounts[wasm_in_container] == REPO / "target" / "wasm32-wasip1" / "release" / "streamlb.wasm"
    listen = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    published = [p.rsplit(":", 1)[-1] for p in envoy["ports"]]
    assert str(listen["port_value"]) in published
    # Apart from what compose needs (addresses, pod hostnames, the wasm path), it is the
    # config the e2e tests run.
    pods = [
        {"name": ep["endpoint"]["hostname"], "zone": loc["locality"]["zone"],
         "address": f"{ep['endpoint']['address']['socket_address']['address']}:"
                    f"{ep['endpoint']['address']['socket_address']['port_value']}"}
        for c in config["static_resources"]["clusters"] if c["name"] == "pods"
        for loc in c["load_assignment"]["endpoints"] for ep in loc["lb_endpoints"]
    ]
    e2e = harness.render_config(
        pods=pods,
        admin_port=config["admin"]["address"]["socket_address"]["port_value"],
        admin_gate_port=listener_named(config, "streamlb_admin_gate")["address"]["socket_address"]["port_value"],
        listen_port=listen["port_value"],
        node_zone=config["node"]["locality"]["zone"],
        filter_config=harness.DEFAULT_FILTER_CONFIG,
        wasm=wasm_in_container,
        listen_address="0.0.0.0",
        pods_cluster_type="STRICT_DNS",
    )
    assert config == e2e


def test_envoy_validates_the_compose_config(wasm, tmp_path):
    config = yaml.safe_load((REPO / "envoy" / "envoy.compose.yaml").read_text())
    wasm_filter = http_filter_named(config, WASM_FILTER)
    wasm_filter["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    envoy_validate(config, tmp_path)


def test_pod_endpoints_match_the_pods_service(compose):
    """The pods service serves zones/ports the compose Envoy config expects."""
    command = compose["services"]["pods"]["command"]
    zones = dict(z.split("=") for z in command[command.index("--zones") + 1].split(","))
    base_port = int(command[command.index("--base-port") + 1])
    config = yaml.safe_load((REPO / "envoy" / "envoy.compose.yaml").read_text())
    pods_cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "pods")
    seen = []
    for locality in pods_cluster["load_assignment"]["endpoints"]:
        for ep in locality["lb_endpoints"]:
            address = ep["endpoint"]["address"]["socket_address"]
            assert address["address"] == "pods"
            seen.append((locality["locality"]["zone"], address["port_value"]))
    expected_ports = list(range(base_port, base_port + sum(int(n) for n in zones.values())))
    assert [port for _, port in seen] == expected_ports
    assert {zone: sum(1 for z, _ in seen if z == zone) for zone in zones} == {z: int(n) for z, n in zones.items()}


def _cli_flags(subcommand: str) -> set[str]:
    lab = harness.lab_bin()
    if not lab.exists():
        pytest.fail(f"{lab} missing: run `make build`")
    text = subprocess.run([str(lab), subcommand, "--help"], capture_output=True, text=True, timeout=30).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


@pytest.mark.parametrize(
    "service",
    ["pods", "devices"],
)
def test_compose_commands_are_accepted_by_the_lab_cli(compose, service):
    command = compose["services"][service]["command"]
    assert command[:2] == ["lab", service]
    used = {arg for arg in command[2:] if arg.startswith("--")}
    assert used - _cli_flags(service) == set()
