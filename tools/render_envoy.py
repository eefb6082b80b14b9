#!/usr/bin/env python3
"""Render envoy/envoy.yaml.tmpl into a static Envoy bootstrap.

  tools/render_envoy.py --compose          writes envoy/envoy.compose.yaml for docker-compose
  tools/render_envoy.py --pods pods.json --admin-port 9901 --listen-port 10000 [-o FILE]
      pods.json: the `lab pods` JSON line, or a list of {"name", "zone", "address"}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import streamlb_testkit as kit

COMPOSE_OUT = kit.REPO / "envoy" / "envoy.compose.yaml"
# docker-compose.yaml: one `pods` container serving six pods on consecutive ports.
COMPOSE_PODS_HOST = "pods"
COMPOSE_BASE_PORT = 50051
COMPOSE_ZONES = {"a": 2, "b": 2, "c": 2}


def compose_pods() -> list[dict[str, str]]:
    pods = []
    for zone, count in COMPOSE_ZONES.items():
        for index in range(count):
            port = COMPOSE_BASE_PORT + len(pods)
            pods.append({"name": f"{zone}-{index}", "zone": zone, "address": f"{COMPOSE_PODS_HOST}:{port}"})
    return pods


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compose", action="store_true", help="fixed ports and hostnames for docker-compose")
    parser.add_argument("--pods", type=Path, help="JSON file: lab pods line or list of pods")
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument("--admin-gate-port", type=int, help="listener passing only GET /clusters (default: admin port + 1)")
    parser.add_argument("--listen-port", type=int, default=10000)
    parser.add_argument("--listen-address", default="127.0.0.1")
    parser.add_argument("--node-zone", default="a")
    parser.add_argument("--lb", default="override_host", choices=kit.LB_CHOICES)
    parser.add_argument("--wasm", default=str(kit.wasm_path()))
    parser.add_argument("--filter-config", default=json.dumps(kit.DEFAULT_FILTER_CONFIG), help="JSON")
    parser.add_argument("--no-filter", action="store_true", help="leave the streamlb filter out")
    parser.add_argument("-o", "--output", type=Path, help="default: stdout (--compose: envoy/envoy.compose.yaml)")
    args = parser.parse_args()

    kwargs = dict(
        admin_port=args.admin_port,
        admin_gate_port=args.admin_gate_port,
        listen_port=args.listen_port,
        node_zone=args.node_zone,
        lb=args.lb,
        wasm=args.wasm,
        filter_config=None if args.no_filter else json.loads(args.filter_config),
        listen_address=args.listen_address,
    )
    header = "# Generated from envoy/envoy.yaml.tmpl by tools/render_envoy.py: do not edit.\n"
    if args.compose:
        kwargs.update(
            pods=compose_pods(),
            listen_address="0.0.0.0",
            wasm="/etc/envoy/streamlb.wasm",
            pods_cluster_type="STRICT_DNS",  # pod hostnames, resolved by Docker's DNS
        )
        header = header.replace("render_envoy.py", "render_envoy.py --compose")
        output = args.output or COMPOSE_OUT
    else:
        if not args.pods:
            parser.error("--pods is required without --compose")
        data = json.loads(args.pods.read_text())
        kwargs["pods"] = data["pods"] if isinstance(data, dict) else data
        output = args.output

    text = header + kit.render_yaml(**kwargs)
    if output:
        output.write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
