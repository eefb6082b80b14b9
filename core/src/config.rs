//! Plugin configuration: the JSON in the filter's `configuration` (a `StringValue`).
//!
//! Every field has a default except `clusters`. Unknown fields are rejected, and every invalid
//! value is reported with its JSON path and the reason, e.g.
//! `zone.spill_threshold: must be in [0, 1], got 1.7`.

use serde::Deserialize;
use std::fmt;

/// `steer` sets the endpoint header; `shadow` decides, counts and reports but leaves routing to
/// Envoy's own policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Steer,
    Shadow,
}

/// Which measured rate is the load of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadSignal {
    /// gRPC messages per second, both directions summed (bytes for non-gRPC traffic).
    #[default]
    Messages,
    /// Bytes per second, both directions summed.
    Bytes,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `steer` (default) or `shadow`.
    pub mode: Mode,
    /// Upstream clusters (`xds.cluster_name`) whose streams streamlb places. Required.
    pub clusters: Vec<String>,
    /// Route names (`xds.route_name`) to cover; empty (default) covers every route to `clusters`.
    pub routes: Vec<String>,
    /// Request header read by the cluster's `override_host` policy.
    pub endpoint_header: String,
    /// Response header carrying the decision, for debugging. Off (`null`) by default.
    pub debug_header: Option<String>,
    /// This proxy's zone. Default: the node's `locality.zone`. Empty disables zone awareness.
    pub local_zone: Option<String>,
    /// Period of the timer that updates rates, merges the cross-worker view and flushes stats.
    pub tick_ms: u64,
    /// At most this many distinct route names are tracked; the rest fold into `other`.
    pub max_routes: usize,
    pub discovery: DiscoveryConfig,
    pub load: LoadConfig,
    pub zone: ZoneConfig,
    pub pick: PickConfig,
    pub slow_start: SlowStartConfig,
    pub penalty: PenaltyConfig,
    pub rate_memory: RateMemoryConfig,
    pub rebalance: RebalanceConfig,
    pub probe: ProbeConfig,
    /// The reporter role (on a pod's inbound proxy): answer load probes. Off (`null`) by default.
    pub reporter: Option<ReporterConfig>,
}

/// Probing the pods of the placed clusters for their load reports (the fleet view).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Probe pods; off: the local view only.
    pub enabled: bool,
    /// Path probed (a `GET` through the placed cluster, the pod named with `endpoint_header`).
    pub path: String,
    /// `:authority` of a probe.
    pub authority: String,
    /// Each pod is probed at most this often by one proxy.
    pub interval_ms: u64,
    /// The same while this proxy places streams (one placed on a route that is not unary within
    /// the last `interval_ms`), so the other proxies' placements show in a report sooner. A
    /// value above `interval_ms` counts as `interval_ms`.
    pub placing_interval_ms: u64,
    /// At most this many probes per `tick_ms` per proxy (a token bucket: probes may run between
    /// ticks, at the placing interval).
    pub max_per_tick: usize,
    pub timeout_ms: u64,
    /// Reports older than this are ignored; a cluster without a fresh report uses the local view.
    pub max_age_ms: u64,
}

/// The reporter role: streamlb on a pod's inbound proxy measures every stream into the pod and
/// answers `GET path` locally with an ORCA report (the request never reaches the app).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReporterConfig {
    pub path: String,
    /// Messages/s the pod can serve (utilisation = rate / capacity); 0: the app's own ORCA
    /// utilisation when it sends one, else none.
    pub capacity: f64,
    /// Time constant of the reported rate (EWMA) and of a young stream's fading prior (the
    /// pod's own setting; the placing side's is `load.tau_ms`).
    pub tau_ms: u64,
}

/// The probe and reporter path.
pub const DEFAULT_LOAD_PATH: &str = "/.well-known/streamlb/load";

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            enabled: true,
            path: DEFAULT_LOAD_PATH.into(),
            authority: "streamlb-probe".into(),
            interval_ms: 1000,
            placing_interval_ms: 250,
            max_per_tick: 256,
            timeout_ms: 250,
            max_age_ms: 5000,
        }
    }
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            path: DEFAULT_LOAD_PATH.into(),
            capacity: 0.0,
            tau_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// STATIC cluster pointing at Envoy's admin listener (Istio sidecar: 127.0.0.1:15000).
    pub admin_cluster: String,
    /// `:authority` sent to the admin listener.
    pub authority: String,
    /// Admin path polled for endpoints: `/clusters` with query parameters, `format=json` among
    /// them. Without a `filter` parameter, one that matches exactly `clusters` is added.
    pub path: String,
    /// Poll period of the elected VM.
    pub poll_ms: u64,
    /// Timeout of one admin call.
    pub timeout_ms: u64,
    /// A snapshot older than this is stale: endpoints are no longer named (Envoy's fallback
    /// policy routes) until discovery recovers.
    pub stale_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// EWMA time constant τ of measured rates.
    pub tau_ms: u64,
    pub signal: LoadSignal,
    /// Expected rate of a new stream (per second, in `signal` units) before any stream of its
    /// route has been measured.
    pub default_stream_rate: f64,
    /// Weight β of backend ORCA utilisation in the score, in [0, 1]; 0 ignores ORCA.
    pub orca_weight: f64,
    /// An ORCA report older than this is ignored.
    pub orca_max_age_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZoneConfig {
    /// Stay in the local zone while its load per unit capacity is at most
    /// `(1 + spill_threshold) ×` the cluster-wide mean.
    pub spill_threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PickConfig {
    /// d in power-of-d-choices.
    pub choices: usize,
    /// d for a stream whose rate is remembered (its size is known); 0 = every endpoint of the
    /// zone (greedy on known sizes, which approaches LPT; many proxies hit by the same
    /// reconnect storm may then herd a little more than with d = 2).
    pub remembered_choices: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlowStartConfig {
    /// Ramp-up window for endpoints that appear after the first discovery; 0 disables.
    pub window_ms: u64,
    /// Envoy's aggression `a`: capacity factor `max(min_weight_percent/100, (t/window)^(1/a))`.
    pub aggression: f64,
    pub min_weight_percent: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PenaltyConfig {
    /// Half-life of an endpoint's failure score.
    pub half_life_ms: u64,
    /// Capacity factor is `1 / (1 + weight × score)`; 0 disables penalties.
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateMemoryConfig {
    /// Request header identifying a stream's source (device); empty disables rate memory.
    pub header: String,
    /// Without the header, key by the downstream IP (last resort: devices behind one NAT share it).
    pub fallback_to_source_ip: bool,
    /// Entries remembered (fixed memory: 24 bytes each, in Envoy shared data).
    pub capacity: usize,
    /// A remembered rate older than this is forgotten.
    pub max_age_ms: u64,
    /// A remembered rate is capped at `max_ratio ×` the learned mean rate per stream of its
    /// route (else cluster, else `load.default_stream_rate`), when written and when read.
    pub max_ratio: f64,
}

/// `off`, `shadow` (plan and report moves, end nothing) or `on` (end the chosen streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RebalanceMode {
    Off,
    #[default]
    Shadow,
    On,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebalanceConfig {
    pub mode: RebalanceMode,
    /// An endpoint is hot above `mean × (1 + tolerance)` load per unit capacity.
    pub tolerance: f64,
    /// Moves bring a hot endpoint down to `mean × (1 + tolerance − hysteresis)`, and only to
    /// endpoints that stay below that level, so nothing oscillates.
    pub hysteresis: f64,
    /// Streams younger than this are never moved.
    pub min_age_ms: u64,
    /// Budget per proxy, shared by all its workers (in shared data): moves in any `tick_ms`
    /// window, in any minute, and as a share of the proxy's streams per minute.
    pub max_moves_per_tick: u32,
    pub max_moves_per_minute: u32,
    /// At most this share of the proxy's streams is moved per minute.
    pub max_share_per_minute: f64,
    /// Allow ending streams whose response has started: the client sees a reset (`INTERNAL`).
    /// Off: only streams still awaiting response headers are moved (clean `UNAVAILABLE`).
    pub allow_reset: bool,
    /// Bring streams placed in another zone back once the local zone has room for them
    /// (planned before moves off hot endpoints; only from the unreserved half of the budget
    /// while an endpoint is far over the mean).
    pub return_spilled: bool,
}

impl Default for RateMemoryConfig {
    fn default() -> Self {
        RateMemoryConfig {
            header: "x-device-id".into(),
            fallback_to_source_ip: false,
            capacity: 65_536,
            max_age_ms: 24 * 3_600_000,
            max_ratio: 20.0,
        }
    }
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            mode: RebalanceMode::Shadow,
            tolerance: 0.1,
            hysteresis: 0.05,
            min_age_ms: 10_000,
            max_moves_per_tick: 2,
            max_moves_per_minute: 30,
            max_share_per_minute: 0.1,
            allow_reset: false,
            return_spilled: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Steer,
            clusters: Vec::new(),
            routes: Vec::new(),
            endpoint_header: "x-gateway-destination-endpoint".into(),
            debug_header: None,
            local_zone: None,
            tick_ms: 1000,
            max_routes: 64,
            discovery: DiscoveryConfig::default(),
            load: LoadConfig::default(),
            zone: ZoneConfig::default(),
            pick: PickConfig::default(),
            slow_start: SlowStartConfig::default(),
            penalty: PenaltyConfig::default(),
            rate_memory: RateMemoryConfig::default(),
            rebalance: RebalanceConfig::default(),
            probe: ProbeConfig::default(),
            reporter: None,
        }
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            admin_cluster: "streamlb_admin".into(),
            authority: "streamlb-admin".into(),
            path: "/clusters?format=json".into(),
            poll_ms: 2000,
            timeout_ms: 1000,
            stale_after_ms: 30_000,
        }
    }
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            tau_ms: 5000,
            signal: LoadSignal::Messages,
            default_stream_rate: 1.0,
            orca_weight: 0.0,
            orca_max_age_ms: 10_000,
        }
    }
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            spill_threshold: 0.1,
        }
    }
}

impl Default for PickConfig {
    fn default() -> Self {
        PickConfig {
            choices: 2,
            remembered_choices: 0,
        }
    }
}

impl Default for SlowStartConfig {
    fn default() -> Self {
        SlowStartConfig {
            window_ms: 30_000,
            aggression: 1.0,
            min_weight_percent: 10.0,
        }
    }
}

impl Default for PenaltyConfig {
    fn default() -> Self {
        PenaltyConfig {
            half_life_ms: 10_000,
            weight: 1.0,
        }
    }
}

/// A configuration error: where (JSON path) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

fn err(path: &str, reason: String) -> ConfigError {
    ConfigError {
        path: path.into(),
        reason,
    }
}

impl Config {
    /// The reporter role's time constant in seconds (`reporter.tau_ms`, its default when the
    /// role is off).
    pub fn reporter_tau_secs(&self) -> f64 {
        let ms = self
            .reporter
            .as_ref()
            .map_or(ReporterConfig::default().tau_ms, |r| r.tau_ms);
        ms as f64 / 1000.0
    }

    /// Parse and validate the plugin configuration.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let config: Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // serde_json appends " at line L column C"; the path says more.
            let mut reason = inner.to_string();
            if let Some(at) = reason.rfind(" at line ") {
                reason.truncate(at);
            }
            err(&path, reason)
        })?;
        de.end()
            .map_err(|e| err("", format!("trailing data after the JSON object: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.clusters.is_empty() && self.reporter.is_none() {
            return Err(err(
                "clusters",
                "must name at least one upstream cluster (or configure `reporter`)".into(),
            ));
        }
        for (i, c) in self.clusters.iter().enumerate() {
            non_empty(&format!("clusters[{i}]"), c)?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            non_empty(&format!("routes[{i}]"), r)?;
        }
        header_name("endpoint_header", &self.endpoint_header)?;
        if let Some(h) = &self.debug_header {
            header_name("debug_header", h)?;
        }
        int_in("tick_ms", self.tick_ms, 50, 60_000)?;
        int_in("max_routes", self.max_routes as u64, 1, 10_000)?;
        let d = &self.discovery;
        non_empty("discovery.admin_cluster", &d.admin_cluster)?;
        non_empty("discovery.authority", &d.authority)?;
        admin_path("discovery.path", &d.path)?;
        int_in("discovery.poll_ms", d.poll_ms, 100, 600_000)?;
        int_in("discovery.timeout_ms", d.timeout_ms, 10, 60_000)?;
        if d.stale_after_ms < d.poll_ms {
            return Err(err(
                "discovery.stale_after_ms",
                format!(
                    "must be at least discovery.poll_ms ({}), got {}",
                    d.poll_ms, d.stale_after_ms
                ),
            ));
        }
        let l = &self.load;
        int_in("load.tau_ms", l.tau_ms, 100, 3_600_000)?;
        float_in(
            "load.default_stream_rate",
            l.default_stream_rate,
            1e-9,
            1e12,
        )?;
        float_in("load.orca_weight", l.orca_weight, 0.0, 1.0)?;
        int_in("load.orca_max_age_ms", l.orca_max_age_ms, 100, 3_600_000)?;
        float_in("zone.spill_threshold", self.zone.spill_threshold, 0.0, 1.0)?;
        int_in("pick.choices", self.pick.choices as u64, 1, 64)?;
        int_in(
            "pick.remembered_choices",
            self.pick.remembered_choices as u64,
            0,
            64,
        )?;
        let s = &self.slow_start;
        int_in("slow_start.window_ms", s.window_ms, 0, 3_600_000)?;
        float_in("slow_start.aggression", s.aggression, 0.01, 100.0)?;
        float_in(
            "slow_start.min_weight_percent",
            s.min_weight_percent,
            0.0,
            100.0,
        )?;
        let p = &self.penalty;
        int_in("penalty.half_life_ms", p.half_life_ms, 100, 3_600_000)?;
        float_in("penalty.weight", p.weight, 0.0, 1000.0)?;
        let m = &self.rate_memory;
        if !m.header.is_empty() {
            header_name("rate_memory.header", &m.header)?;
        }
        int_in("rate_memory.capacity", m.capacity as u64, 64, 16_777_216)?;
        int_in(
            "rate_memory.max_age_ms",
            m.max_age_ms,
            1000,
            30 * 24 * 3_600_000,
        )?;
        float_in("rate_memory.max_ratio", m.max_ratio, 1.0, 1e6)?;
        let r = &self.rebalance;
        float_in("rebalance.tolerance", r.tolerance, 0.01, 10.0)?;
        float_in("rebalance.hysteresis", r.hysteresis, 0.0, r.tolerance)?;
        int_in("rebalance.min_age_ms", r.min_age_ms, 0, 86_400_000)?;
        int_in(
            "rebalance.max_moves_per_tick",
            u64::from(r.max_moves_per_tick),
            0,
            10_000,
        )?;
        int_in(
            "rebalance.max_moves_per_minute",
            u64::from(r.max_moves_per_minute),
            0,
            100_000,
        )?;
        float_in(
            "rebalance.max_share_per_minute",
            r.max_share_per_minute,
            0.0,
            1.0,
        )?;
        let p = &self.probe;
        path_in("probe.path", &p.path)?;
        non_empty("probe.authority", &p.authority)?;
        int_in("probe.interval_ms", p.interval_ms, 50, 3_600_000)?;
        int_in(
            "probe.placing_interval_ms",
            p.placing_interval_ms,
            50,
            3_600_000,
        )?;
        int_in("probe.max_per_tick", p.max_per_tick as u64, 0, 1000)?;
        int_in("probe.timeout_ms", p.timeout_ms, 10, 10_000)?;
        int_in("probe.max_age_ms", p.max_age_ms, 100, 3_600_000)?;
        if p.max_age_ms < p.interval_ms {
            return Err(err(
                "probe.max_age_ms",
                format!(
                    "must be at least probe.interval_ms ({}), got {}",
                    p.interval_ms, p.max_age_ms
                ),
            ));
        }
        if let Some(r) = &self.reporter {
            path_in("reporter.path", &r.path)?;
            float_in("reporter.capacity", r.capacity, 0.0, 1e12)?;
            int_in("reporter.tau_ms", r.tau_ms, 100, 3_600_000)?;
        }
        Ok(())
    }

    /// Whether this route/cluster pair is covered (clusters are few: a linear scan is fastest).
    pub fn covers(&self, route: &str, cluster: &str) -> bool {
        self.clusters.iter().any(|c| c == cluster)
            && (self.routes.is_empty() || self.routes.iter().any(|r| r == route))
    }
}

/// An HTTP path without query: `/` then visible ASCII.
fn path_in(path: &str, v: &str) -> Result<(), ConfigError> {
    let ok = v.starts_with('/') && v.bytes().all(|b| b.is_ascii_graphic() && b != b'?');
    if ok {
        Ok(())
    } else {
        Err(err(
            path,
            format!("must be an absolute path without query, got {v:?}"),
        ))
    }
}

/// Discovery reads only `GET /clusters?format=json…`.
fn admin_path(path: &str, v: &str) -> Result<(), ConfigError> {
    let (route, query) = v.split_once('?').unwrap_or((v, ""));
    if route != "/clusters" {
        return Err(err(
            path,
            format!("must be /clusters with query parameters (discovery reads only GET /clusters), got {v:?}"),
        ));
    }
    if v.bytes().any(|b| b <= b' ' || b == b'#' || b >= 0x7f) {
        return Err(err(
            path,
            format!(
                "must be printable ASCII without spaces or '#' (percent-encode them), got {v:?}"
            ),
        ));
    }
    if !query.split('&').any(|kv| kv == "format=json") {
        return Err(err(path, format!("must ask for format=json, got {v:?}")));
    }
    Ok(())
}

fn non_empty(path: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() {
        Err(err(path, "must not be empty".into()))
    } else {
        Ok(())
    }
}

/// HTTP/2 header names: lowercase token characters only.
fn header_name(path: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(err(
            path,
            format!("must be a lowercase HTTP header name ([a-z0-9_-]+), got {v:?}"),
        ))
    }
}

fn int_in(path: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(err(path, format!("must be in [{lo}, {hi}], got {v}")))
    }
}

fn float_in(path: &str, v: f64, lo: f64, hi: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(err(path, format!("must be in [{lo}, {hi}], got {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(s: &str) -> Result<Config, String> {
        Config::from_json(s.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(r#"{"clusters":["pods"]}"#).unwrap();
        assert_eq!(c.mode, Mode::Steer);
        assert_eq!(c.endpoint_header, "x-gateway-destination-endpoint");
        assert_eq!(c.debug_header, None);
        assert_eq!(c.pick.choices, 2);
        assert_eq!(c.zone.spill_threshold, 0.1);
        assert_eq!(c.load.tau_ms, 5000);
        assert!(c.covers("any-route", "pods"));
        assert!(!c.covers("any-route", "other"));
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"{"mode":"shadow","clusters":["a","b"],"routes":["telemetry"],
                "endpoint_header":"x-ep","debug_header":"x-dbg","local_zone":"z1",
                "tick_ms":500,"max_routes":8,
                "discovery":{"admin_cluster":"adm","poll_ms":1000,"stale_after_ms":5000},
                "load":{"tau_ms":2000,"signal":"bytes","orca_weight":0.5},
                "zone":{"spill_threshold":0.2},"pick":{"choices":3},
                "slow_start":{"window_ms":0},"penalty":{"weight":2.0}}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Shadow);
        assert_eq!(c.load.signal, LoadSignal::Bytes);
        assert_eq!(c.local_zone.as_deref(), Some("z1"));
        assert!(c.covers("telemetry", "b"));
        assert!(!c.covers("other", "b"));
    }

    #[test]
    fn errors_name_the_field_and_reason() {
        let cases = [
            (
                r#"{"clusters":["p"],"zone":{"spill_threshold":1.7}}"#,
                "zone.spill_threshold: must be in [0, 1], got 1.7",
            ),
            (
                r#"{"clusters":["p"],"pick":{"choices":0}}"#,
                "pick.choices: must be in [1, 64], got 0",
            ),
            (
                r#"{"clusters":[]}"#,
                "clusters: must name at least one upstream cluster",
            ),
            (r#"{}"#, "clusters: must name at least one upstream cluster"),
            (
                r#"{"clusters":["p"],"endpoint_header":"X Bad"}"#,
                "endpoint_header: must be a lowercase HTTP header name",
            ),
            (
                r#"{"clusters":["p"],"load":{"taus":1}}"#,
                "load.taus: unknown field `taus`",
            ),
            (
                r#"{"clusters":["p"],"mode":"yolo"}"#,
                "mode: unknown variant `yolo`",
            ),
            (
                r#"{"clusters":["p"],"tick_ms":"fast"}"#,
                "tick_ms: invalid type: string \"fast\"",
            ),
            (
                r#"{"clusters":["p"],"probe":{"placing_interval_ms":10}}"#,
                "probe.placing_interval_ms: must be in [50, 3600000], got 10",
            ),
            (r#"{"clusters":[""]}"#, "clusters[0]: must not be empty"),
            (
                r#"{"clusters":["p"],"discovery":{"path":"/quitquitquit"}}"#,
                "discovery.path: must be /clusters with query parameters",
            ),
            (
                r#"{"clusters":["p"],"discovery":{"path":"/clusters/../stats?format=json"}}"#,
                "discovery.path: must be /clusters with query parameters",
            ),
            (
                r#"{"clusters":["p"],"discovery":{"path":"/clusters"}}"#,
                "discovery.path: must ask for format=json",
            ),
            (
                r#"{"clusters":["p"],"discovery":{"path":"/clusters?format=json&filter=a b"}}"#,
                "discovery.path: must be printable ASCII",
            ),
        ];
        for (json, want) in cases {
            let got = parse(json).unwrap_err();
            assert!(got.starts_with(want), "{json}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for s in ["", "null", "[]", "{", "{\"clusters\":[\"p\"]} x", "\u{0}"] {
            assert!(parse(s).is_err(), "{s:?}");
        }
    }
}
