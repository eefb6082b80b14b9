//! The fleet view's glue (see `streamlb_core::fleet`).
//!
//! - **Probing**: the VM that holds the discovery lease sends the probes due
//!   (`Router::due_probes`): a `GET probe.path` dispatched to the placed cluster itself, the pod
//!   named in the endpoint header that the cluster's `override_host` policy obeys. The answer's
//!   `endpoint-load-metrics` header is the pod's load report. Probes run on the timer, off the
//!   request path: a stream open never waits for one.
//! - **Sharing**: the prober publishes the fresh reports of each cluster in shared data
//!   (`streamlb.fleet.v2.<cluster>`); every other VM applies them on its timer events.
//! - **Answering** (reporter role): a probe that reaches streamlb on a pod's inbound proxy is
//!   answered locally with what that Envoy measured over every stream into the pod.

use hashbrown::HashMap;

use super::host::{parse_number, HeaderMap, HeaderPairs, Host};
use super::shared::reports_key;
use super::stats::{FleetStats, ProbeResult};
use streamlb_core::fleet::{self, LoadReport, ReportError};
use streamlb_core::orca;
use streamlb_core::router::Router;
use streamlb_core::ClusterIdx;
use streamlb_core::Nanos;

/// Marks streamlb's own probes. Gateways remove it from client requests natively (see
/// envoy/envoy.yaml.tmpl), and a reporter answers only requests that carry it.
pub const PROBE_HEADER: &str = "x-streamlb-probe";

const MS: Nanos = 1_000_000;

struct InFlight {
    cluster: ClusterIdx,
    address: String,
    sent: Nanos,
}

#[derive(Default)]
pub struct Prober {
    in_flight: HashMap<u32, InFlight>,
    /// Per cluster: the CAS of the last published record applied.
    applied: HashMap<ClusterIdx, u32>,
    /// A report arrived since the prober last published them.
    unpublished: bool,
}

impl Prober {
    /// Send the probes due now (the prober VM only).
    pub fn send(
        &mut self,
        host: &dyn Host,
        router: &mut Router,
        stats: &mut FleetStats,
        now: Nanos,
    ) {
        let timeout = router.config().probe.timeout_ms;
        // A probe the host never answered (it should time out): counted once, then forgotten.
        let lost_after = (timeout + 1000) * MS;
        self.in_flight.retain(|_, p| {
            let keep = now.saturating_sub(p.sent) <= lost_after;
            if !keep {
                *stats
                    .probes
                    .entry((p.cluster, ProbeResult::Lost))
                    .or_default() += 1;
            }
            keep
        });
        for (ci, address) in router.due_probes(now) {
            let Some(cluster) = router.cluster(ci).map(|c| c.name.clone()) else {
                continue;
            };
            let cfg = router.config();
            let headers = [
                (":method", "GET"),
                (":path", cfg.probe.path.as_str()),
                (":authority", cfg.probe.authority.as_str()),
                (cfg.endpoint_header.as_str(), address.as_str()),
                (PROBE_HEADER, "1"),
            ];
            match host.http_call(&cluster, &headers, timeout) {
                Ok(token) => {
                    self.in_flight.insert(
                        token,
                        InFlight {
                            cluster: ci,
                            address,
                            sent: now,
                        },
                    );
                }
                Err(_) => *stats.probes.entry((ci, ProbeResult::Dispatch)).or_default() += 1,
            }
        }
    }

    /// A dispatched call answered; `false` when `token` is not a probe.
    pub fn on_response(
        &mut self,
        host: &dyn Host,
        token: u32,
        router: &mut Router,
        stats: &mut FleetStats,
        now: Nanos,
    ) -> bool {
        let Some(p) = self.in_flight.remove(&token) else {
            return false;
        };
        let result = read_report(host, router, now);
        let outcome = match result {
            Ok(report) => {
                let cluster = router.cluster(p.cluster).map(|c| c.name.clone());
                if let Some(cluster) = cluster {
                    router.apply_reports(now, &cluster, &[(p.address, report)]);
                    self.unpublished = true;
                }
                stats
                    .latency_us
                    .push((p.cluster, now.saturating_sub(p.sent) / 1000));
                ProbeResult::Ok
            }
            Err(r) => r,
        };
        *stats.probes.entry((p.cluster, outcome)).or_default() += 1;
        true
    }

    /// The prober publishes each cluster's fresh reports (on a tick, and between ticks when a
    /// report arrived); the other VMs apply them.
    pub fn share(
        &mut self,
        host: &dyn Host,
        router: &mut Router,
        prober: bool,
        tick: bool,
        now: Nanos,
    ) {
        if prober && !tick && !self.unpublished {
            return;
        }
        if prober {
            self.unpublished = false;
        }
        let max_age = router.config().probe.max_age_ms * MS;
        for ci in (0..router.clusters().len()).map(ClusterIdx) {
            let Some(c) = router.cluster(ci) else {
                continue;
            };
            let key = reports_key(&c.name);
            if prober {
                let fresh = c.endpoints.iter().filter_map(|e| {
                    let r = e.report.as_ref().filter(|r| r.fresh(now, max_age))?;
                    Some((e.address.as_str(), r))
                });
                let _ = host.shared_set(&key, &fleet::encode_reports(fresh), None);
                continue;
            }
            let Ok((Some(bytes), cas)) = host.shared_get(&key) else {
                continue;
            };
            if cas.is_some() && cas == self.applied.get(&ci).copied() {
                continue;
            }
            if let Some(cas) = cas {
                self.applied.insert(ci, cas);
            }
            if let Some(reports) = fleet::decode_reports(&bytes) {
                let name = c.name.clone();
                router.apply_reports(now, &name, &reports);
            }
        }
    }
}

/// The load report in a probe's answer.
fn read_report(host: &dyn Host, router: &Router, now: Nanos) -> Result<LoadReport, ProbeResult> {
    let status = host
        .header(HeaderMap::HttpCallResponse, ":status")
        .ok()
        .flatten();
    match status.as_deref().and_then(parse_number) {
        Some(200) => {}
        Some(_) => return Err(ProbeResult::Status),
        None => return Err(ProbeResult::Failed),
    }
    let value = host
        .header(HeaderMap::HttpCallResponse, super::stream::ORCA_HEADER)
        .ok()
        .flatten()
        .ok_or(ProbeResult::Malformed)?;
    let report = std::str::from_utf8(&value)
        .ok()
        .and_then(|v| orca::parse(v).ok())
        .ok_or(ProbeResult::Malformed)?;
    LoadReport::from_orca(&report, router.config().load.signal, now).map_err(|e| match e {
        ReportError::Malformed => ProbeResult::Malformed,
        ReportError::Implausible => ProbeResult::Implausible,
    })
}

/// Reporter role: a request for `reporter.path` is a load probe, answered here with this
/// Envoy's figures (it never reaches the app). Returns whether it was one.
pub fn answer_probe(host: &dyn Host, vm: &mut super::vm::Vm, headers: &HeaderPairs) -> bool {
    let Some(cfg) = &vm.config().reporter else {
        return false;
    };
    let path = headers.get(":path").unwrap_or_default();
    let route = path.split(|&b| b == b'?').next().unwrap_or_default();
    if route != cfg.path.as_bytes() {
        return false;
    }
    let get = headers.get(":method") == Some(b"GET");
    let marked = headers.get(PROBE_HEADER).is_some();
    let result = if !marked {
        // Not from a streamlb prober (a client, through a gateway that does not strip the
        // marker): no figures, and nothing reaches the app.
        host.send_response(404, &[], b"")
    } else if get {
        let now = host.now().unwrap_or(0);
        let value = vm.load_report(now);
        vm.stats.health.probes_answered += 1;
        host.send_response(
            200,
            &[
                (super::stream::ORCA_HEADER, value.as_str()),
                ("content-type", "text/plain"),
            ],
            value.as_bytes(),
        )
    } else {
        host.send_response(405, &[("allow", "GET")], b"load probes are GET\n")
    };
    if let Err(e) = result {
        vm.host_error(host, "send_local_response (probe)", &e);
    }
    true
}
