"""`tools/image.sh` (what `make image` runs) builds the Istio-compatible wasm OCI image: one
tar+gzip layer holding plugin.wasm equal to the built filter, deterministic, and the generated
kustomize overlay pins the WasmPlugin sha256 to the image's manifest digest (what Istio checks
for oci:// urls). Optionally round-trips through a loopback docker-registry with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy_helpers import REPO, harness, kustomize, one, require_tool, validation_errors

TAG = "test"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def run(argv: list[str], **kwargs) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def build_image(wasm: Path, out: Path, ref: str = "oci://registry.example.com/streamlb/streamlb:test") -> Path:
    env = dict(os.environ, IMAGE_TAG=TAG, IMAGE_REF=ref)
    run([str(REPO / "tools" / "image.sh"), str(wasm), str(out)], env=env)
    return out


@pytest.fixture(scope="module")
def image(wasm, tmp_path_factory) -> Path:
    require_tool("buildah")
    require_tool("skopeo")
    return build_image(wasm, tmp_path_factory.mktemp("image"))


def skopeo_inspect(ref: str, *extra: str) -> dict:
    return json.loads(run(["skopeo", "inspect", *extra, ref]))


def blob(layout: Path, digest: str) -> bytes:
    algo, _, hexdigest = digest.partition(":")
    data = (layout / "blobs" / algo / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its digest"
    return data


def test_layout_is_an_oci_image_layout(image):
    layout = image / "oci"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == TAG
    assert len(blob(layout, entry["digest"])) == entry["size"]


def test_one_layer_holding_plugin_wasm_equal_to_the_build(image, wasm):
    """What Istio's image fetcher does for the "compat" variant: last layer, OCI tar+gzip media
    type, the file whose base name is plugin.wasm."""
    layout = image / "oci"
    raw = run(["skopeo", "inspect", "--raw", f"oci:{layout}:{TAG}"])
    manifest = json.loads(raw)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == OCI_LAYER
    compressed = blob(layout, layer["digest"])
    assert len(compressed) == layer["size"]
    uncompressed = gzip.decompress(compressed)
    with tarfile.open(fileobj=io.BytesIO(uncompressed)) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
        assert [os.path.basename(m.name) for m in files] == ["plugin.wasm"]
        content = tar.extractfile(files[0]).read()
    assert content == wasm.read_bytes()
    assert content[:4] == b"\0asm"
    # The config's rootfs names the uncompressed layer; the layer list agrees with skopeo.
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(uncompressed).hexdigest()]
    inspected = skopeo_inspect(f"oci:{layout}:{TAG}")
    assert inspected["Layers"] == [layer["digest"]]


def test_wasmplugin_sha256_is_the_manifest_digest(image):
    layout = image / "oci"
    raw = run(["skopeo", "inspect", "--raw", f"oci:{layout}:{TAG}"]).encode()
    manifest_digest = hashlib.sha256(raw).hexdigest()
    assert skopeo_inspect(f"oci:{layout}:{TAG}")["Digest"] == f"sha256:{manifest_digest}"
    assert (image / "digest").read_text().strip() == manifest_digest
    objects = kustomize(image / "istio")
    plugin = one(objects, "WasmPlugin")
    assert plugin["spec"]["sha256"] == manifest_digest
    assert plugin["spec"]["url"] == "oci://registry.example.com/streamlb/streamlb:test"
    assert validation_errors(plugin) == []
    # Everything else is istio/base unchanged.
    base = kustomize("istio/base")
    for obj in base:
        if obj["kind"] != "WasmPlugin":
            assert obj in objects
    expected = one(base, "WasmPlugin")
    expected["spec"].update(sha256=manifest_digest, url=plugin["spec"]["url"])
    assert plugin == expected


def test_image_is_deterministic_and_follows_the_wasm(image, wasm, tmp_path):
    again = build_image(wasm, tmp_path / "again")
    assert (again / "digest").read_text() == (image / "digest").read_text()
    other_wasm = tmp_path / "other.wasm"
    other_wasm.write_bytes(wasm.read_bytes() + b"\0")  # a trailing byte: a different module file
    other = build_image(other_wasm, tmp_path / "other")
    assert (other / "digest").read_text() != (image / "digest").read_text()


def test_registry_round_trip_keeps_the_digest(image, tmp_path):
    """Push to a docker-registry on 127.0.0.1 and pull back: the manifest digest the WasmPlugin
    pins survives, so the sha256 holds for the pushed image."""
    registry_bin = require_tool("docker-registry")
    port = harness.free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'storage'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    proc = harness.Proc("registry", [registry_bin, "serve", str(config)], tmp_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert proc.running() and time.monotonic() < deadline, f"registry did not start:\n{proc.tail()}"
            time.sleep(0.1)
        remote = f"docker://127.0.0.1:{port}/streamlb/streamlb:{TAG}"
        run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{image / 'oci'}:{TAG}", remote])
        pushed = skopeo_inspect(remote, "--tls-verify=false")
        assert pushed["Digest"] == "sha256:" + (image / "digest").read_text().strip()
        pulled = tmp_path / "pulled"
        run(["skopeo", "copy", "--src-tls-verify=false", remote, f"oci:{pulled}:{TAG}"])
        assert skopeo_inspect(f"oci:{pulled}:{TAG}")["Digest"] == pushed["Digest"]
    finally:
        proc.stop()
