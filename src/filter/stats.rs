//! What the filter counts between two ticks, and how it is written to Envoy stats.
//!
//! The per-message path only adds to these fields; [`Stats::flush`] turns them into host calls
//! once per tick. Every label is bounded: routes are capped (`max_routes`, the rest fold into
//! `other`), clusters come from the config, zones from discovery, the rest are fixed sets.
//! Every VM adds to the same Envoy stats, so counters and the active-stream gauge are written as
//! deltas; cluster gauges are computed from the merged cross-worker view and set. Cluster
//! gauges use the router's load estimate per endpoint (measured rate plus the priors of streams
//! too young to be measured), in the `load.signal` unit (messages/s by default).
//!
//! No label name may end with another one (`from_zone` would contain `zone=`, and Envoy's tag
//! regexes would match inside it): hence `from`/`to` for the zones of a decision.

use hashbrown::HashMap;

use super::host::{Host, HostError, MetricKind};
use super::metrics::{tagged, Metrics};
use streamlb_core::config::RebalanceMode;
use streamlb_core::grpc_status;
use streamlb_core::rebalance::MoveWhy;
use streamlb_core::router::Router;
use streamlb_core::{ClusterIdx, Nanos, RouteIdx};

/// How a stream ended, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Ok,
    ClientError,
    ServerError,
    /// No status at all: reset, or the client went away.
    Reset,
    /// Ended by the rebalancer (planned, not an error).
    Moved,
}

impl StatusClass {
    pub const ALL: [StatusClass; 5] = [
        StatusClass::Ok,
        StatusClass::ClientError,
        StatusClass::ServerError,
        StatusClass::Reset,
        StatusClass::Moved,
    ];

    /// gRPC status when present, else HTTP status: `ok` = gRPC OK or HTTP 1xx–3xx;
    /// `client_error` = CANCELLED, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
    /// PERMISSION_DENIED, FAILED_PRECONDITION, OUT_OF_RANGE, UNAUTHENTICATED or HTTP 4xx;
    /// `server_error` = every other gRPC code or HTTP 5xx; `reset` = neither.
    pub fn of(http: Option<u32>, grpc: Option<u32>) -> StatusClass {
        match (grpc, http) {
            (Some(grpc_status::OK), _) => StatusClass::Ok,
            (
                Some(
                    grpc_status::CANCELLED
                    | grpc_status::INVALID_ARGUMENT
                    | grpc_status::NOT_FOUND
                    | grpc_status::ALREADY_EXISTS
                    | grpc_status::PERMISSION_DENIED
                    | grpc_status::FAILED_PRECONDITION
                    | grpc_status::OUT_OF_RANGE
                    | grpc_status::UNAUTHENTICATED,
                ),
                _,
            ) => StatusClass::ClientError,
            (Some(_), _) => StatusClass::ServerError,
            (None, Some(s)) if s < 400 => StatusClass::Ok,
            (None, Some(s)) if s < 500 => StatusClass::ClientError,
            (None, Some(_)) => StatusClass::ServerError,
            (None, None) => StatusClass::Reset,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Ok => "ok",
            StatusClass::ClientError => "client_error",
            StatusClass::ServerError => "server_error",
            StatusClass::Reset => "reset",
            StatusClass::Moved => "moved",
        }
    }
}

/// Traffic of one (route, cluster) since the last flush.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RouteStats {
    pub started: u64,
    /// Change of the active-stream count.
    pub active_delta: i64,
    pub ended: HashMap<StatusClass, u64>,
    /// [upstream, downstream]
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

/// Filter-health counters since the last flush.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Health {
    pub polls_ok: u64,
    pub polls_failed: u64,
    pub host_errors: u64,
    pub cas_retries: u64,
    pub endpoint_headers_stripped: u64,
    /// ORCA headers/trailers from upstreams that could not be parsed (ignored).
    pub orca_invalid: u64,
    /// Load probes answered in the reporter role.
    pub probes_answered: u64,
    /// Shared-data updates given up after losing every compare-and-swap attempt.
    pub cas_lost: u64,
    /// Size of the last admin answer and how long its parse took (µs), on the polling VM.
    pub discovery_body_bytes: Option<u64>,
    pub discovery_parse_us: Option<u64>,
}

/// How a moved stream was ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveHow {
    /// Before its response started: the client got a clean `UNAVAILABLE`.
    Unavailable,
    /// After: a reset (the client sees `INTERNAL`).
    Reset,
}

/// Why a wanted move was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The churn budget was spent.
    Budget,
    /// No endpoint could take the stream.
    NoRoom,
    /// Its response started and resets are not allowed.
    Unmovable,
    /// Planned but not carried out in time.
    Expired,
}

impl MoveHow {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveHow::Unavailable => "unavailable",
            MoveHow::Reset => "reset",
        }
    }
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Budget => "budget",
            SkipReason::NoRoom => "no_room",
            SkipReason::Unmovable => "unmovable",
            SkipReason::Expired => "expired",
        }
    }
}

/// Rebalancing since the last flush, per cluster.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RebalanceStats {
    /// Moves planned (in `shadow` mode: moves it would make).
    pub planned: HashMap<ClusterIdx, u64>,
    /// Of those, moves of streams placed in another zone: home, or to a zone with more room.
    pub zone_moves: HashMap<(ClusterIdx, MoveWhy), u64>,
    /// Streams really ended, by how.
    pub moved: HashMap<(ClusterIdx, MoveHow), u64>,
    /// Wanted moves not made, by why.
    pub skipped: HashMap<(ClusterIdx, SkipReason), u64>,
    /// Excess above the hot line as a share of load, before and after the planned moves.
    pub excess: HashMap<ClusterIdx, (f64, f64)>,
}

#[derive(Debug, Default)]
pub struct Stats {
    /// (cluster, route) → traffic.
    pub routes: HashMap<(ClusterIdx, RouteIdx), RouteStats>,
    /// cluster → messages (both directions) on streams whose endpoint is in another zone.
    pub cross_zone_messages: HashMap<ClusterIdx, u64>,
    pub health: Health,
    pub config_loads: u64,
    pub rebalance: RebalanceStats,
    pub fleet: FleetStats,
    metrics: Metrics,
    /// (histogram, cluster, route) → metric id: a stream's samples format no names.
    route_histograms: HashMap<(&'static str, ClusterIdx, RouteIdx), u32>,
}

/// How a load probe ended, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeResult {
    /// A valid report.
    Ok,
    /// No answer: connect failure, reset or timeout.
    Failed,
    /// An answer other than 200.
    Status,
    /// No `endpoint-load-metrics` header, or not valid ORCA.
    Malformed,
    /// Valid ORCA, but out of range or without the load figure.
    Implausible,
    /// The call could not be dispatched.
    Dispatch,
    /// The host never called back.
    Lost,
}

impl ProbeResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeResult::Ok => "ok",
            ProbeResult::Failed => "failed",
            ProbeResult::Status => "status",
            ProbeResult::Malformed => "malformed",
            ProbeResult::Implausible => "implausible",
            ProbeResult::Dispatch => "dispatch_error",
            ProbeResult::Lost => "lost",
        }
    }
}

/// Probing since the last flush.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FleetStats {
    /// (cluster, result) → probes.
    pub probes: HashMap<(ClusterIdx, ProbeResult), u64>,
    /// (cluster, round trip in µs) of the answered probes.
    pub latency_us: Vec<(ClusterIdx, u64)>,
    /// Set by the prober VM (when it sent probes): the time its report gauges are computed at.
    pub probed_at: Option<Nanos>,
}

/// Histogram names (values in microseconds; buckets in envoy/envoy.yaml.tmpl).
pub const FIRST_BYTE_US: &str = "streamlb_route_first_byte_us";
pub const DURATION_US: &str = "streamlb_route_duration_us";
pub const REQUEST_LATENCY_US: &str = "streamlb_route_request_latency_us";
pub const PROBE_LATENCY_US: &str = "streamlb_probe_latency_us";

impl Stats {
    /// Fresh stats of a VM whose configuration just loaded.
    pub fn loaded() -> Self {
        Stats {
            config_loads: 1,
            ..Stats::default()
        }
    }

    pub fn route(&mut self, cluster: ClusterIdx, route: RouteIdx) -> &mut RouteStats {
        self.routes.entry((cluster, route)).or_default()
    }

    /// Record one histogram sample now (once per stream event, never per message).
    pub fn sample(
        &mut self,
        host: &dyn Host,
        router: &Router,
        name: &'static str,
        (cluster, route): (ClusterIdx, RouteIdx),
        micros: u64,
    ) -> Result<(), HostError> {
        let id = match self.route_histograms.get(&(name, cluster, route)) {
            Some(&id) => id,
            None => {
                let tags = route_tags(router, cluster, route);
                let tagged = tagged(name, &[("route", &tags.0), ("cluster", &tags.1)]);
                let id = self.metrics.id(host, MetricKind::Histogram, &tagged)?;
                self.route_histograms.insert((name, cluster, route), id);
                id
            }
        };
        host.record_metric(id, micros)
    }

    /// Write everything accumulated since the last flush. Returns the first host error.
    pub fn flush(&mut self, host: &dyn Host, router: &mut Router) -> Result<(), HostError> {
        let mut out = Flush {
            host,
            metrics: &mut self.metrics,
            first_error: None,
        };
        flush_decisions(&mut out, router);
        flush_routes(&mut out, router, &mut self.routes);
        flush_clusters(&mut out, router, &mut self.cross_zone_messages);
        flush_rebalance(&mut out, router, std::mem::take(&mut self.rebalance));
        flush_fleet(&mut out, router, std::mem::take(&mut self.fleet));
        flush_health(
            &mut out,
            std::mem::take(&mut self.health),
            std::mem::take(&mut self.config_loads),
        );
        out.first_error.map_or(Ok(()), Err)
    }
}

/// Metric writes of one flush; the first host error is kept, the rest still run.
struct Flush<'a> {
    host: &'a dyn Host,
    metrics: &'a mut Metrics,
    first_error: Option<HostError>,
}

impl Flush<'_> {
    fn note(&mut self, r: Result<(), HostError>) {
        if let Err(e) = r {
            self.first_error.get_or_insert(e);
        }
    }

    fn count(&mut self, name: &str, tags: &[(&str, &str)], n: u64) {
        let r = self.metrics.count(self.host, &tagged(name, tags), n);
        self.note(r);
    }

    fn gauge(&mut self, name: &str, tags: &[(&str, &str)], value: u64) {
        let r = self.metrics.gauge(self.host, &tagged(name, tags), value);
        self.note(r);
    }

    fn sample(&mut self, name: &str, tags: &[(&str, &str)], value: u64) {
        let r = self.metrics.sample(self.host, &tagged(name, tags), value);
        self.note(r);
    }
}

fn flush_decisions(out: &mut Flush<'_>, router: &mut Router) {
    let counters = router.take_counters();
    let local_zone = router.local_zone().to_string();
    for ((ci, reason), n) in counters.decisions {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str()), ("reason", reason.as_str())];
        out.count("streamlb_decisions_total", &tags, n);
    }
    for ((ci, to_zone), n) in counters.to_zone {
        let c = cluster_name(router, ci);
        let tags = [
            ("cluster", c.as_str()),
            ("from", local_zone.as_str()),
            ("to", to_zone.as_str()),
        ];
        out.count("streamlb_decisions_by_zone_total", &tags, n);
    }
    for ((ci, view), n) in counters.views {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str()), ("view", view.as_str())];
        out.count("streamlb_decisions_by_view_total", &tags, n);
    }
}

fn flush_routes(
    out: &mut Flush<'_>,
    router: &Router,
    routes: &mut HashMap<(ClusterIdx, RouteIdx), RouteStats>,
) {
    for ((ci, ri), t) in routes.iter_mut() {
        let (route, c) = route_tags(router, *ci, *ri);
        let base = [("route", route.as_str()), ("cluster", c.as_str())];
        out.count("streamlb_route_streams_total", &base, t.started);
        if t.active_delta != 0 {
            let name = tagged("streamlb_route_streams_active", &base);
            let r = out.metrics.gauge_add(out.host, &name, t.active_delta);
            out.note(r);
        }
        for (class, n) in t.ended.drain() {
            let tags = [base[0], base[1], ("status_class", class.as_str())];
            out.count("streamlb_route_streams_ended_total", &tags, n);
        }
        for (d, dir) in ["upstream", "downstream"].into_iter().enumerate() {
            let tags = [base[0], base[1], ("direction", dir)];
            let msgs = t.messages.get(d).copied().unwrap_or(0);
            let bytes = t.bytes.get(d).copied().unwrap_or(0);
            out.count("streamlb_route_messages_total", &tags, msgs);
            out.count("streamlb_route_bytes_total", &tags, bytes);
        }
        *t = RouteStats::default();
    }
}

/// Cross-zone messages, and gauges from the merged view: imbalance and load per zone.
fn flush_clusters(out: &mut Flush<'_>, router: &Router, cross_zone: &mut HashMap<ClusterIdx, u64>) {
    for (ci, c) in router.clusters().iter().enumerate() {
        let tags = [("cluster", c.name.as_str())];
        let cross = cross_zone.remove(&ClusterIdx(ci)).unwrap_or(0);
        out.count("streamlb_cross_zone_messages_total", &tags, cross);
        let rates: Vec<f64> = c
            .zones
            .iter()
            .flat_map(|z| z.healthy.iter())
            .filter_map(|&j| c.endpoint(j))
            .map(|e| e.load())
            .collect();
        let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
        let max = rates.iter().copied().fold(0.0, f64::max);
        let imbalance = if mean > 0.0 { max / mean } else { 0.0 };
        out.gauge(
            "streamlb_cluster_imbalance_permille",
            &tags,
            (imbalance * 1000.0).round() as u64,
        );
        for z in &c.zones {
            let rate: f64 = (z.healthy.iter())
                .filter_map(|&j| c.endpoint(j))
                .map(|e| e.load())
                .sum();
            let tags = [("cluster", c.name.as_str()), ("zone", z.name.as_str())];
            out.gauge(
                "streamlb_zone_messages_per_second",
                &tags,
                rate.round() as u64,
            );
        }
    }
}

fn flush_rebalance(out: &mut Flush<'_>, router: &Router, r: RebalanceStats) {
    for (ci, n) in r.planned {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str()), ("reason", "planned")];
        out.count("streamlb_rebalance_moves_total", &tags, n);
    }
    // Zone moves are counted from 0 wherever they can happen, so their series exist (and a
    // dashboard's rate() over them reads 0) before the first move.
    let mut zone_moves = r.zone_moves;
    let cfg = &router.config().rebalance;
    if cfg.mode != RebalanceMode::Off && cfg.return_spilled && !router.local_zone().is_empty() {
        let spanning = router.clusters().iter().enumerate();
        for (ci, _) in spanning.filter(|(_, c)| c.zones.len() > 1) {
            for why in [MoveWhy::Home, MoveWhy::Spread] {
                zone_moves.entry((ClusterIdx(ci), why)).or_default();
            }
        }
    }
    for ((ci, why), n) in zone_moves {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str()), ("reason", why.as_str())];
        out.count("streamlb_rebalance_zone_moves_total", &tags, n);
    }
    for ((ci, how), n) in r.moved {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str()), ("reason", how.as_str())];
        out.count("streamlb_rebalance_moves_total", &tags, n);
    }
    for ((ci, why), n) in r.skipped {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str()), ("reason", why.as_str())];
        out.count("streamlb_rebalance_skipped_total", &tags, n);
    }
    for (ci, (before, after)) in r.excess {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str())];
        let permille = |x: f64| (x * 1000.0).round() as u64;
        out.gauge(
            "streamlb_rebalance_excess_before_permille",
            &tags,
            permille(before),
        );
        out.gauge(
            "streamlb_rebalance_excess_after_permille",
            &tags,
            permille(after),
        );
    }
}

/// Probes by result and their latency; per cluster, the pods with a fresh report and the age of
/// the oldest one used.
fn flush_fleet(out: &mut Flush<'_>, router: &Router, f: FleetStats) {
    for ((ci, result), n) in f.probes {
        let c = cluster_name(router, ci);
        let tags = [("cluster", c.as_str()), ("result", result.as_str())];
        out.count("streamlb_probes_total", &tags, n);
    }
    for (ci, micros) in f.latency_us {
        let c = cluster_name(router, ci);
        out.sample(PROBE_LATENCY_US, &[("cluster", c.as_str())], micros);
    }
    let Some(now) = f.probed_at else {
        return; // not the prober: its gauges are the prober's to set
    };
    let max_age = router.config().probe.max_age_ms * 1_000_000;
    for c in router.clusters() {
        let ages: Vec<u64> = c
            .endpoints
            .iter()
            .filter_map(|e| e.report.filter(|r| r.fresh(now, max_age)))
            .map(|r| now.saturating_sub(r.at) / 1_000_000)
            .collect();
        let tags = [("cluster", c.name.as_str())];
        out.gauge("streamlb_fleet_pods_reporting", &tags, ages.len() as u64);
        out.gauge(
            "streamlb_fleet_report_age_max_ms",
            &tags,
            ages.iter().copied().max().unwrap_or(0),
        );
    }
}

fn flush_health(out: &mut Flush<'_>, h: Health, config_loads: u64) {
    for (name, n) in [
        ("streamlb_config_loads_total", config_loads),
        ("streamlb_discovery_polls_ok_total", h.polls_ok),
        ("streamlb_discovery_polls_failed_total", h.polls_failed),
        ("streamlb_host_errors_total", h.host_errors),
        ("streamlb_cas_retries_total", h.cas_retries),
        ("streamlb_cas_lost_total", h.cas_lost),
        (
            "streamlb_endpoint_header_stripped_total",
            h.endpoint_headers_stripped,
        ),
        ("streamlb_orca_reports_invalid_total", h.orca_invalid),
        ("streamlb_reporter_probes_answered_total", h.probes_answered),
    ] {
        out.count(name, &[], n);
    }
    // Only the VM that polled sets these; the others leave them as they are.
    if let Some(bytes) = h.discovery_body_bytes {
        out.gauge("streamlb_discovery_body_bytes", &[], bytes);
    }
    if let Some(us) = h.discovery_parse_us {
        out.gauge("streamlb_discovery_parse_us", &[], us);
    }
}

fn cluster_name(router: &Router, ci: ClusterIdx) -> String {
    router
        .cluster(ci)
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

fn route_tags(router: &Router, ci: ClusterIdx, ri: RouteIdx) -> (String, String) {
    (
        router.routes().name(ri).to_string(),
        cluster_name(router, ci),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(Some(200), Some(0)), StatusClass::Ok);
        assert_eq!(
            StatusClass::of(Some(200), Some(1)),
            StatusClass::ClientError
        );
        assert_eq!(
            StatusClass::of(Some(200), Some(14)),
            StatusClass::ServerError
        );
        assert_eq!(
            StatusClass::of(Some(200), Some(13)),
            StatusClass::ServerError
        );
        assert_eq!(StatusClass::of(Some(204), None), StatusClass::Ok);
        assert_eq!(StatusClass::of(Some(429), None), StatusClass::ClientError);
        assert_eq!(StatusClass::of(Some(503), None), StatusClass::ServerError);
        assert_eq!(StatusClass::of(None, None), StatusClass::Reset);
    }
}
