"""Istio stats settings (istio/components/stats): the component adds the proxy.istio.io/config
annotation; its extraStatTags are the template's stats_tags (same names, same order, Istio's
regex form); and a real Envoy configured the way Istio translates these settings exports the
filter's stats to Prometheus with every tag extracted as a label."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from deploy_helpers import ISTIO, REPO, harness, kustomize, one, reference_config

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: iot-gateway, namespace: iot-gateway}
spec:
  selector: {matchLabels: {istio: iot-gateway}}
  template:
    metadata:
      labels: {istio: iot-gateway}
      annotations: {inject.istio.io/templates: gateway}
    spec:
      containers: [{name: istio-proxy, image: auto}]
"""


def _annotations(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["annotations"]


def _proxy_config(tmp_path: Path) -> tuple[dict, dict]:
    """(rendered Deployment, parsed proxy.istio.io/config) with the component applied."""
    (tmp_path / "deployment.yaml").write_text(DEPLOYMENT)
    component = Path(shutil.os.path.relpath(ISTIO / "components" / "stats", tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [deployment.yaml]\ncomponents: [{component}]\n"
    )
    deployment = one(kustomize(tmp_path), "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    return deployment, yaml.safe_load(annotations["proxy.istio.io/config"])


def istio_histogram_buckets(annotation: str) -> list[dict]:
    """histogram_bucket_settings from sidecar.istio.io/statsHistogramBuckets ({prefix: buckets})."""
    return [{"match": {"prefix": prefix}, "buckets": buckets} for prefix, buckets in json.loads(annotation).items()]


def istio_stats_config(proxy_config: dict) -> dict:
    """The stats_config istiod's bootstrap adds for these ProxyConfig fields (Istio's own
    default inclusions left out: they only add stats)."""
    matcher = proxy_config.get("proxyStatsMatcher", {})
    patterns = [{"prefix": p} for p in matcher.get("inclusionPrefixes", [])]
    patterns += [{"suffix": s} for s in matcher.get("inclusionSuffixes", [])]
    patterns += [{"safe_regex": {"regex": r}} for r in matcher.get("inclusionRegexps", [])]
    return {
        "stats_tags": [{"tag_name": t, "regex": rf"({t}=\.=(.*?);\.;)"} for t in proxy_config["extraStatTags"]],
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    }


def test_component_adds_the_annotation_and_keeps_others(tmp_path):
    deployment, proxy_config = _proxy_config(tmp_path)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["inject.istio.io/templates"] == "gateway"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["name"] == "istio-proxy"
    assert set(proxy_config) == {"proxyStatsMatcher", "extraStatTags"}
    assert set(proxy_config["proxyStatsMatcher"]) <= {"inclusionPrefixes", "inclusionSuffixes", "inclusionRegexps"}


def test_extra_stat_tags_are_the_templates_stats_tags(tmp_path):
    _, proxy_config = _proxy_config(tmp_path)
    template_tags = reference_config()["stats_config"]["stats_tags"]
    assert istio_stats_config(proxy_config)["stats_tags"] == template_tags


def test_histogram_buckets_are_the_templates(tmp_path):
    deployment, _ = _proxy_config(tmp_path)
    buckets = istio_histogram_buckets(_annotations(deployment)["sidecar.istio.io/statsHistogramBuckets"])
    assert buckets == reference_config()["stats_config"].get("histogram_bucket_settings")


def test_envoy_exports_the_filter_stats_with_labels(tmp_path, wasm):
    deployment, proxy_config = _proxy_config(_mkdir(tmp_path / "k"))
    pods = [
        {"name": "a-0", "zone": "a", "address": f"127.0.0.1:{harness.free_port()}"},
        {"name": "b-0", "zone": "b", "address": f"127.0.0.1:{harness.free_port()}"},
    ]
    envoy = harness.Envoy(pods, filter_config={"clusters": ["pods"], "tick_ms": 200,
                                               "discovery": {"poll_ms": 200, "stale_after_ms": 5000}},
                          concurrency=1, workdir=_mkdir(tmp_path / "envoy"))
    config = envoy.config()
    config["stats_config"] = istio_stats_config(proxy_config)
    config["stats_config"]["histogram_bucket_settings"] = istio_histogram_buckets(
        _annotations(deployment)["sidecar.istio.io/statsHistogramBuckets"]
    )
    config["stats_flush_interval"] = "0.5s"
    envoy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with envoy:
        envoy.start_process()
        assert envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_ok_total", 2, timeout=20), envoy.log_text()[-3000:]
        # A few requests on the telemetry route (no pod listens: 503s; unary exchanges) give route, cluster,
        # direction, reason and status_class labelled stats.
        for _ in range(3):
            request = urllib.request.Request(
                f"http://{envoy.listen_addr}/streamlb.lab.v1.Telemetry/Stream",
                data=b"x",
                headers={"content-type": "application/grpc"},
            )
            try:
                urllib.request.urlopen(request, timeout=5).read()
            except urllib.error.HTTPError:
                pass
        assert envoy.wait_for_counter("wasmcustom.streamlb_route_streams_total.route=.=telemetry;.;cluster=.=pods;.;", 3)
        deadline = time.monotonic() + 15
        while "streamlb_route_request_latency_us_bucket" not in (text := envoy.prometheus()) and time.monotonic() < deadline:
            time.sleep(0.5)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    # Only what the matcher includes: the filter's stats, not Envoy's own cluster stats.
    assert "streamlb_discovery_polls_ok_total" in names
    assert not any(n.startswith("envoy_cluster_") for n in names), sorted(names)[:20]
    labelled = [line for line in text.splitlines() if line.startswith("streamlb_")]
    for label in ("route", "cluster", "direction", "reason", "status_class", "view"):
        assert any(f'{label}="' in line for line in labelled), f"no {label} label:\n" + "\n".join(labelled)
    # The template's microsecond buckets, up to 4 h.
    assert any(line.startswith("streamlb_route_request_latency_us_bucket") and 'le="14400000000"' in line for line in labelled)
    # Every exported name is a stat the filter defines: no tag left folded into a name.
    source = "".join(p.read_text() for p in (REPO / "src" / "filter").glob("*.rs"))
    defined = set(re.findall(r'"(streamlb_[a-z0-9_]+)"', source))
    for name in names:
        assert name.startswith("streamlb_"), name
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in defined or base in defined, f"{name}: not a filter stat (tag not extracted?)"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
