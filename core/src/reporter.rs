//! The reporter role: what streamlb on a pod's inbound proxy measures of all streams into the
//! pod, from every placing proxy, to answer their load probes.
//!
//! Per VM (Envoy worker), with τ = `reporter.tau_ms` (5 s by default):
//!
//! ```text
//! R = EWMA of messages/s (both directions),  B = EWMA of bytes/s
//! Y ← Y · e^(−Δt/τ) on each tick,  Y += R / N on each new stream   (N = active streams)
//! reported messages/s = R + Y
//! ```
//!
//! `Y` is the fading prior of young streams, the same rule the placing filter uses for its own
//! (`prior · e^(−age/τ)`): a stream another proxy just placed counts at the pod's mean rate per
//! stream at once, and hands over to the measurement as it is learned. The VMs of one Envoy share
//! their figures in the shared load view (see `filter::vm`); a probe is answered with their sum.

use super::ewma::RateEwma;
use super::fleet::MeasuredLoad;
use super::{Nanos, NANOS_PER_SEC};

/// Reserved cluster name of the reporter's entries in the shared load view (no Envoy cluster
/// name holds a NUL byte).
pub const SHARED_CLUSTER: &str = "\u{0}reporter";
/// Entry addresses of the reporter's figures in the shared load view.
pub const MESSAGES_ENTRY: &str = "messages";
pub const BYTES_ENTRY: &str = "bytes";
pub const APP_UTILIZATION_ENTRY: &str = "app_utilization";

#[derive(Debug, Clone, Default)]
pub struct Reporter {
    messages: RateEwma,
    bytes: RateEwma,
    young: f64,
    active: u64,
    unticked: (u64, u64),
    last_tick: Option<Nanos>,
    /// The app's own ORCA utilisation and when it was seen.
    app_utilization: Option<(f64, Nanos)>,
}

impl Reporter {
    pub fn on_open(&mut self) {
        self.young += self.mean_per_stream();
        self.active += 1;
    }

    pub fn on_close(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    pub fn on_data(&mut self, messages: u64, bytes: u64) {
        self.unticked.0 += messages;
        self.unticked.1 += bytes;
    }

    /// The app's own utilisation (ORCA on its responses).
    pub fn on_app_utilization(&mut self, now: Nanos, utilization: f64) {
        if utilization.is_finite() && utilization >= 0.0 {
            self.app_utilization = Some((utilization, now));
        }
    }

    pub fn tick(&mut self, now: Nanos, tau_secs: f64) {
        let dt = self
            .last_tick
            .map_or(0.0, |t| now.saturating_sub(t) as f64 / NANOS_PER_SEC);
        self.last_tick = Some(now);
        if dt <= 0.0 {
            return;
        }
        let (m, b) = std::mem::take(&mut self.unticked);
        self.messages.update(m as f64, dt, tau_secs);
        self.bytes.update(b as f64, dt, tau_secs);
        if tau_secs > 0.0 {
            self.young *= (-dt / tau_secs).exp();
        }
    }

    /// This VM's figures.
    pub fn measured(&self) -> MeasuredLoad {
        MeasuredLoad {
            messages_per_second: self.messages.value() + self.young,
            bytes_per_second: self.bytes.value(),
            streams: self.active,
        }
    }

    /// The app's utilisation if seen within `max_age`.
    pub fn app_utilization(&self, now: Nanos, max_age: Nanos) -> Option<f64> {
        self.app_utilization
            .filter(|(_, at)| now.saturating_sub(*at) <= max_age)
            .map(|(u, _)| u)
    }

    fn mean_per_stream(&self) -> f64 {
        if self.active == 0 {
            return 0.0;
        }
        self.messages.value() / self.active as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn measures_all_streams_and_counts_young_ones_at_the_mean() {
        let mut r = Reporter::default();
        r.tick(0, 5.0);
        for _ in 0..4 {
            r.on_open();
        }
        // 4 streams × 10 msgs/s (both directions) for 60 s: the EWMA converges to 40.
        for t in 1..=60 {
            r.on_data(40, 4000);
            r.tick(t * S, 5.0);
        }
        let m = r.measured();
        assert!((m.messages_per_second - 40.0).abs() < 0.2, "{m:?}");
        assert!((m.bytes_per_second - 4000.0).abs() < 20.0, "{m:?}");
        assert_eq!(m.streams, 4);
        // A new stream counts at the mean per stream (10/s) before it is measured…
        r.on_open();
        assert!((r.measured().messages_per_second - 50.0).abs() < 0.3);
        // …and its prior fades as its messages come in.
        for t in 61..=90 {
            r.on_data(50, 5000);
            r.tick(t * S, 5.0);
        }
        assert!(
            (r.measured().messages_per_second - 50.0).abs() < 0.3,
            "{:?}",
            r.measured()
        );
        r.on_close();
        assert_eq!(r.measured().streams, 4);
    }

    #[test]
    fn app_utilisation_expires() {
        let mut r = Reporter::default();
        r.on_app_utilization(S, 0.7);
        r.on_app_utilization(S, f64::NAN);
        assert_eq!(r.app_utilization(2 * S, 5 * S), Some(0.7));
        assert_eq!(r.app_utilization(10 * S, 5 * S), None);
    }
}
