//! Fleet view: the pods' own load reports, so that every proxy sees the load that all proxies
//! put on a pod, and pods of unequal or degraded capacity get their fair share.
//!
//! A **report** comes from the pod side (streamlb in its reporter role on the pod's inbound
//! proxy, or the app itself) as an ORCA `endpoint-load-metrics` value:
//! `TEXT rps_fractional=R, application_utilization=U, named_metrics.streams=N,
//! named_metrics.bytes_per_second=B`. R (messages/s, both directions) or B (bytes/s) is the pod's
//! load in this proxy's `load.signal` units, U its utilisation (load / capacity).
//!
//! Per cluster, with the reports younger than `probe.max_age_ms` ("fresh"):
//!
//! ```text
//! capacity of a reporting pod      c_j = R_j / U_j            (when U_j ≥ MIN_UTILIZATION)
//! capacity per unit weight         κ   = Σ c_j / Σ weight_j   over pods with c_j (else 1)
//! capacity of the others           c_j = weight_j · κ
//! fleet load of a reporting pod    F_j = R_j
//! fleet load of a silent pod       F_j = ū_z · c_j,  ū_z = Σ R / Σ c over the reporting pods
//!                                  of its zone (of the cluster if none reports in the zone)
//! ```
//!
//! A silent pod (no fresh report) is assumed to run at its zone's mean, never idle. A placement
//! draws its `pick.choices` candidates among the zone's pods with a fresh report (Prequal's pool
//! of probed replicas), when there are at least two.
//!
//! The load a placement sees is `own_j + max(0, F_j − own_j(report)) + g_j · min(age, 2·interval)`:
//! the report's part beyond what this Envoy had on j when it arrived is the other proxies'
//! share, and this Envoy's own streams count as they are now (a reconnect storm does not see
//! its old streams twice; with a single Envoy the view is exact). `g_j ≥ 0` is how fast the
//! other proxies' share grew between j's last two reports: what they placed since the report
//! is not in it yet, and during a ramp each proxy would otherwise see its own new streams at
//! once and the others' a report later. With the pod's stream count N, the other proxies'
//! share of a report is `max(0, F_j − own_j) · o/(o + y)`, `o = N − n_j` (n_j: this Envoy's
//! streams on j) and y this Envoy's young streams there (Σ of their priors' weights): the
//! residual is also what young streams send beyond their priors. A reporter counts its young streams at their fading prior
//! (`prior · e^(−age/τ)`, as the filter does), so the streams that other proxies just placed are
//! in `F_j`. Capacities are then multiplied by slow start and penalties as before. With no fresh
//! report in a cluster, the cluster uses the local view (this Envoy's own streams only).

use std::fmt;

use super::config::LoadSignal;
use super::orca::OrcaReport;
use super::Nanos;

/// Below this utilisation a pod's capacity is not derived from its report (too noisy).
pub const MIN_UTILIZATION: f64 = 0.02;
/// Reports above these are rejected as implausible.
pub const MAX_UTILIZATION: f64 = 100.0;
pub const MAX_RATE: f64 = 1e12;
pub const MAX_STREAMS: f64 = 1e9;
/// Named metrics of a report.
pub const STREAMS_METRIC: &str = "streams";
pub const BYTES_METRIC: &str = "bytes_per_second";

/// Which load picture a decision used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// The pods' reports (at least one fresh report in the cluster).
    Fleet,
    /// Only this proxy's own streams.
    Local,
}

impl View {
    pub const ALL: [View; 2] = [View::Fleet, View::Local];

    pub fn as_str(self) -> &'static str {
        match self {
            View::Fleet => "fleet",
            View::Local => "local",
        }
    }
}

/// One pod's report of its own load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// Load in the proxy's signal units per second.
    pub rate: f64,
    /// Load / capacity, when the pod knows its capacity.
    pub utilization: Option<f64>,
    /// Active streams into the pod (`named_metrics.streams`), when it says.
    pub streams: Option<f64>,
    /// When the report was received.
    pub at: Nanos,
}

/// Why a report was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReportError {
    /// No `endpoint-load-metrics` value, or not valid ORCA.
    Malformed,
    /// Parsed, but a value is out of range, or the report says nothing about load.
    Implausible,
}

impl ReportError {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportError::Malformed => "malformed",
            ReportError::Implausible => "implausible",
        }
    }
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LoadReport {
    /// The load report in an ORCA report, for a proxy whose load signal is `signal`.
    /// `rps_fractional` (messages/s) or `named_metrics.bytes_per_second` is the load;
    /// `application_utilization` (else `cpu_utilization`) the utilisation.
    pub fn from_orca(
        report: &OrcaReport,
        signal: LoadSignal,
        now: Nanos,
    ) -> Result<LoadReport, ReportError> {
        let rate = match signal {
            LoadSignal::Messages => Some(report.rps_fractional),
            LoadSignal::Bytes => report.named_metric(BYTES_METRIC),
        };
        let utilization = report.utilization();
        let streams = report.named_metric(STREAMS_METRIC);
        let Some(rate) = rate else {
            return Err(ReportError::Implausible);
        };
        // ORCA parsing already refused NaN, infinities and negatives.
        if rate > MAX_RATE
            || utilization.is_some_and(|u| u > MAX_UTILIZATION)
            || streams.is_some_and(|n| n > MAX_STREAMS)
        {
            return Err(ReportError::Implausible);
        }
        Ok(LoadReport {
            rate,
            utilization,
            streams,
            at: now,
        })
    }

    pub fn fresh(&self, now: Nanos, max_age: Nanos) -> bool {
        now.saturating_sub(self.at) <= max_age
    }

    /// The pod's capacity in load units, when its utilisation says it.
    pub fn capacity(&self) -> Option<f64> {
        let u = self.utilization.filter(|&u| u >= MIN_UTILIZATION)?;
        (self.rate > 0.0).then(|| self.rate / u)
    }
}

/// What a reporter measured over all streams into its pod.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MeasuredLoad {
    pub messages_per_second: f64,
    pub bytes_per_second: f64,
    pub streams: u64,
}

/// The ORCA TEXT value a reporter answers a probe with. `capacity`: messages/s at full
/// utilisation (0 = unknown); `app_utilization`: the app's own ORCA utilisation, used when no
/// capacity is configured.
pub fn report_value(load: &MeasuredLoad, capacity: f64, app_utilization: Option<f64>) -> String {
    let utilization = if capacity > 0.0 {
        Some(load.messages_per_second / capacity)
    } else {
        app_utilization
    };
    let mut v = format!(
        "TEXT rps_fractional={:.3}, named_metrics.{BYTES_METRIC}={:.1}, named_metrics.{STREAMS_METRIC}={}",
        load.messages_per_second.max(0.0),
        load.bytes_per_second.max(0.0),
        load.streams
    );
    if let Some(u) = utilization.filter(|u| u.is_finite() && *u >= 0.0) {
        v.push_str(&format!(", application_utilization={u:.4}"));
    }
    v
}

/// The fleet picture of one cluster, computed on refresh from its endpoints' reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FleetSummary {
    /// Capacity (load units) per unit of weight for pods that do not say their own.
    pub capacity_per_weight: f64,
    /// Mean load per unit capacity of the reporting pods (what a silent pod is assumed to run).
    pub mean_utilization: f64,
    /// Pods with a fresh report.
    pub reporting: usize,
}

impl FleetSummary {
    /// From the (weight, fresh report) of each eligible endpoint; `None` when no report is fresh.
    pub fn of<'a>(
        endpoints: impl Iterator<Item = (f64, Option<&'a LoadReport>)> + Clone,
    ) -> Option<FleetSummary> {
        let (mut cap, mut weight, mut reporting) = (0.0, 0.0, 0usize);
        for (w, r) in endpoints.clone() {
            let Some(r) = r else { continue };
            reporting += 1;
            if let Some(c) = r.capacity() {
                cap += c;
                weight += w;
            }
        }
        if reporting == 0 {
            return None;
        }
        let capacity_per_weight = if cap > 0.0 && weight > 0.0 {
            cap / weight
        } else {
            1.0
        };
        let (mut load, mut capacity) = (0.0, 0.0);
        for (w, r) in endpoints {
            if let Some(r) = r {
                load += r.rate;
                capacity += r.capacity().unwrap_or(w * capacity_per_weight);
            }
        }
        Some(FleetSummary {
            capacity_per_weight,
            mean_utilization: if capacity > 0.0 { load / capacity } else { 0.0 },
            reporting,
        })
    }

    /// Base capacity of an endpoint of `weight` with its fresh report, if any.
    pub fn capacity(&self, weight: f64, report: Option<&LoadReport>) -> f64 {
        report
            .and_then(LoadReport::capacity)
            .unwrap_or(weight * self.capacity_per_weight)
    }

    /// (fleet load, base capacity) of an endpoint of `weight` with its fresh report, if any;
    /// a silent one runs at `zone_utilization` (its zone's mean), else at the cluster's mean.
    pub fn estimate(
        &self,
        weight: f64,
        report: Option<&LoadReport>,
        zone_utilization: Option<f64>,
    ) -> (f64, f64) {
        let c = self.capacity(weight, report);
        match report {
            Some(r) => (r.rate, c),
            None => (zone_utilization.unwrap_or(self.mean_utilization) * c, c),
        }
    }
}

/// Which endpoints to probe now: those whose last probe is oldest, at most `max`, none probed
/// less than `interval` ago; equally old ones by `order` (see [`probe_order`]). `last_probe[j]`
/// is when j was last probed (`None`: never).
pub fn due_probes(
    last_probe: &[Option<Nanos>],
    order: &[f64],
    now: Nanos,
    interval: Nanos,
    max: usize,
) -> Vec<usize> {
    let mut due: Vec<(Nanos, f64, usize)> = last_probe
        .iter()
        .zip(order)
        .enumerate()
        .filter_map(|(j, (t, &o))| match t {
            None => Some((0, o, j)),
            Some(t) if now.saturating_sub(*t) >= interval => Some((*t, o, j)),
            Some(_) => None,
        })
        .collect();
    due.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    due.into_iter().take(max).map(|(_, _, j)| j).collect()
}

/// Probe order of the endpoint at `position` among a zone's `n`, for a proxy whose draw for
/// that zone is `salt`: `((position − start) mod n + offset) / n`, start and offset in [0, n)
/// and [0, 1) drawn from the salt. Zones interleave in proportion to their sizes, so the
/// reports fresh at any moment sample every zone (a rotation in discovery order would refresh
/// one zone at a time when a round takes longer than `max_age_ms`), and each proxy starts each
/// zone at its own pod.
pub fn probe_order(position: usize, n: usize, salt: u64) -> f64 {
    let n = n.max(1) as u64;
    let start = salt % n;
    let offset = crate::rng::unit(crate::rng::splitmix64(salt));
    let rotated = (position as u64 % n + n - start) % n;
    (rotated as f64 + offset) / n as f64
}

/// Shared-data record of the reports one prober received: `(address, rate, utilization or -1,
/// at)` per entry. Layout: `u32 count`, then per entry `u16 len, address, f64 rate,
/// f64 utilization, f64 streams, u64 at` (little endian; −1: not reported).
pub fn encode_reports<'a>(reports: impl Iterator<Item = (&'a str, &'a LoadReport)>) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    let mut n: u32 = 0;
    for (address, r) in reports {
        let Ok(len) = u16::try_from(address.len()) else {
            continue;
        };
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(address.as_bytes());
        out.extend_from_slice(&r.rate.to_le_bytes());
        out.extend_from_slice(&r.utilization.unwrap_or(-1.0).to_le_bytes());
        out.extend_from_slice(&r.streams.unwrap_or(-1.0).to_le_bytes());
        out.extend_from_slice(&r.at.to_le_bytes());
        n += 1;
    }
    if let Some(head) = out.get_mut(0..4) {
        head.copy_from_slice(&n.to_le_bytes());
    }
    out
}

/// The inverse of [`encode_reports`]; `None` when the record is corrupt.
pub fn decode_reports(bytes: &[u8]) -> Option<Vec<(String, LoadReport)>> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let mut out = Vec::with_capacity((count as usize).min(4096));
    for _ in 0..count {
        let len = u16::from_le_bytes(take(2)?.try_into().ok()?);
        let address = std::str::from_utf8(take(usize::from(len))?)
            .ok()?
            .to_owned();
        let rate = f64::from_le_bytes(take(8)?.try_into().ok()?);
        let utilization = f64::from_le_bytes(take(8)?.try_into().ok()?);
        let streams = f64::from_le_bytes(take(8)?.try_into().ok()?);
        let at = u64::from_le_bytes(take(8)?.try_into().ok()?);
        if !(rate.is_finite() && rate >= 0.0 && utilization.is_finite() && streams.is_finite()) {
            return None;
        }
        out.push((
            address,
            LoadReport {
                rate,
                utilization: (utilization >= 0.0).then_some(utilization),
                streams: (streams >= 0.0).then_some(streams),
                at,
            },
        ));
    }
    rest.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orca;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn report(rate: f64, utilization: Option<f64>) -> LoadReport {
        LoadReport {
            rate,
            utilization,
            streams: None,
            at: 0,
        }
    }

    #[test]
    fn report_from_orca_and_back() {
        let load = MeasuredLoad {
            messages_per_second: 812.0,
            bytes_per_second: 40_000.0,
            streams: 40,
        };
        let text = report_value(&load, 1000.0, None);
        assert_eq!(
            text,
            "TEXT rps_fractional=812.000, named_metrics.bytes_per_second=40000.0, \
             named_metrics.streams=40, application_utilization=0.8120"
        );
        let orca = orca::parse(&text).unwrap();
        let r = LoadReport::from_orca(&orca, LoadSignal::Messages, 7).unwrap();
        assert_eq!(
            r,
            LoadReport {
                rate: 812.0,
                utilization: Some(0.812),
                streams: Some(40.0),
                at: 7
            }
        );
        assert!((r.capacity().unwrap() - 1000.0).abs() < 1e-9);
        let b = LoadReport::from_orca(&orca, LoadSignal::Bytes, 7).unwrap();
        assert_eq!(b.rate, 40_000.0);
        // Without a configured capacity the app's own utilisation is passed on.
        let app = report_value(&load, 0.0, Some(0.5));
        assert!(app.ends_with("application_utilization=0.5000"), "{app}");
        assert!(!report_value(&load, 0.0, None).contains("utilization"));
    }

    #[test]
    fn implausible_reports_are_refused() {
        let parse = |s: &str| {
            orca::parse(s)
                .map_err(|_| ReportError::Malformed)
                .and_then(|o| LoadReport::from_orca(&o, LoadSignal::Messages, 0))
        };
        assert_eq!(
            parse("TEXT rps_fractional=1e13"),
            Err(ReportError::Implausible)
        );
        assert_eq!(
            parse("TEXT rps_fractional=5, application_utilization=1000"),
            Err(ReportError::Implausible)
        );
        assert_eq!(
            parse("TEXT rps_fractional=5, named_metrics.streams=1e10"),
            Err(ReportError::Implausible)
        );
        assert_eq!(
            parse("TEXT rps_fractional=5, named_metrics.streams=-1"),
            Err(ReportError::Malformed)
        );
        assert_eq!(
            parse("TEXT rps_fractional=NaN"),
            Err(ReportError::Malformed)
        );
        assert_eq!(parse("TEXT rps_fractional=-1"), Err(ReportError::Malformed));
        assert_eq!(parse("garbage"), Err(ReportError::Malformed));
        let o = orca::parse("TEXT rps_fractional=5").unwrap();
        assert_eq!(
            LoadReport::from_orca(&o, LoadSignal::Bytes, 0),
            Err(ReportError::Implausible),
            "no bytes metric for a bytes proxy"
        );
    }

    #[test]
    fn capacity_from_utilisation_and_silent_pods_at_the_mean() {
        // Pod 0: 100 msgs/s at 0.5 → capacity 200. Pod 1: 25 msgs/s at 1.0 (degraded) → 25.
        // Pod 2: silent.
        let r0 = report(100.0, Some(0.5));
        let r1 = report(25.0, Some(1.0));
        let eps = [(1.0, Some(&r0)), (1.0, Some(&r1)), (1.0, None)];
        let s = FleetSummary::of(eps.iter().copied()).unwrap();
        assert_eq!(s.reporting, 2);
        assert!((s.capacity_per_weight - 112.5).abs() < 1e-9);
        assert!((s.mean_utilization - 125.0 / 225.0).abs() < 1e-9);
        assert_eq!(s.estimate(1.0, Some(&r0), None), (100.0, 200.0));
        assert_eq!(s.estimate(1.0, Some(&r1), None), (25.0, 25.0));
        let (load, cap) = s.estimate(2.0, None, None);
        assert!((cap - 225.0).abs() < 1e-9);
        assert!(
            (load / cap - s.mean_utilization).abs() < 1e-9,
            "silent = at the mean"
        );
        assert_eq!(
            s.estimate(2.0, None, Some(0.9)),
            (0.9 * 225.0, 225.0),
            "its zone's mean"
        );
        assert_eq!(FleetSummary::of([(1.0, None)].into_iter()), None);
    }

    #[test]
    fn rates_without_utilisation_keep_weight_units() {
        let r = report(30.0, None);
        let s = FleetSummary::of([(2.0, Some(&r)), (1.0, None)].into_iter()).unwrap();
        assert_eq!(s.capacity_per_weight, 1.0);
        assert_eq!(s.estimate(2.0, Some(&r), None), (30.0, 2.0));
        assert_eq!(s.estimate(1.0, None, None), (15.0, 1.0));
        // An idle pod (utilisation 0) says nothing about its capacity.
        assert_eq!(report(0.0, Some(0.0)).capacity(), None);
    }

    #[test]
    fn probes_go_to_the_oldest_first() {
        let s = 1_000_000_000;
        let last = [Some(5 * s), None, Some(2 * s), Some(9 * s)];
        let order = [0.0; 4];
        assert_eq!(due_probes(&last, &order, 10 * s, 3 * s, 2), vec![1, 2]);
        assert_eq!(due_probes(&last, &order, 10 * s, 3 * s, 8), vec![1, 2, 0]);
        assert!(due_probes(&last, &order, 10 * s, 3 * s, 0).is_empty());
        // Equally old ones by their order.
        let never = [None; 4];
        assert_eq!(
            due_probes(&never, &[0.7, 0.1, 0.4, 0.2], 0, s, 3),
            vec![1, 3, 2]
        );
    }

    #[test]
    fn probe_order_interleaves_zones_by_size() {
        // Zones of 4 and 2 pods: any window of the order holds each zone in proportion.
        let mut all: Vec<(f64, char)> = (0..4)
            .map(|p| (probe_order(p, 4, 11), 'a'))
            .chain((0..2).map(|p| (probe_order(p, 2, 12), 'b')))
            .collect();
        all.sort_by(|x, y| x.0.total_cmp(&y.0));
        for w in all.windows(3) {
            let b = w.iter().filter(|(_, z)| *z == 'b').count();
            assert_eq!(b, 1, "{all:?}");
        }
        // Each zone's order is a rotation of its pods, starting where the salt says.
        let mut zone: Vec<(f64, usize)> = (0..5).map(|p| (probe_order(p, 5, 7), p)).collect();
        zone.sort_by(|x, y| x.0.total_cmp(&y.0));
        let order: Vec<usize> = zone.iter().map(|(_, p)| *p).collect();
        assert_eq!(order, vec![2, 3, 4, 0, 1], "start 7 mod 5");
        assert!(zone.iter().all(|(o, _)| (0.0..1.0).contains(o)));
    }

    #[test]
    fn reports_round_trip_and_corruption_is_detected() {
        let a = LoadReport {
            rate: 12.5,
            utilization: Some(0.25),
            streams: Some(3.0),
            at: 42,
        };
        let b = LoadReport {
            rate: 3.0,
            utilization: None,
            streams: None,
            at: 43,
        };
        let bytes = encode_reports([("10.0.0.1:80", &a), ("10.0.0.2:80", &b)].into_iter());
        let back = decode_reports(&bytes).unwrap();
        assert_eq!(
            back,
            vec![("10.0.0.1:80".to_owned(), a), ("10.0.0.2:80".to_owned(), b)]
        );
        for cut in 0..bytes.len() {
            assert_eq!(decode_reports(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode_reports(&extra), None);
        assert_eq!(
            decode_reports(&encode_reports(std::iter::empty())),
            Some(vec![])
        );
    }
}
