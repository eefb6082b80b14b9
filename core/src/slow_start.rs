//! Slow start: an endpoint that appeared recently gets a reduced share of capacity.
//!
//! Envoy's formula (`slow_start_config`), with `t` the time since the endpoint was first seen,
//! `W` the window, `a` the aggression and `m` the minimum weight percent:
//!
//! ```text
//! factor = max(m / 100, (max(t, 1 s) / W)^(1/a))   while t < W, else 1
//! ```
//!
//! Endpoints present in the first discovery snapshot a VM sees are not new: a restarting proxy
//! must not treat a whole cluster as just born.

use super::config::SlowStartConfig;
use super::{Nanos, NANOS_PER_SEC};

pub fn capacity_factor(cfg: &SlowStartConfig, first_seen: Option<Nanos>, now: Nanos) -> f64 {
    let (Some(born), true) = (first_seen, cfg.window_ms > 0) else {
        return 1.0;
    };
    let window = cfg.window_ms as f64 / 1000.0;
    let age = now.saturating_sub(born) as f64 / NANOS_PER_SEC;
    if age >= window {
        return 1.0;
    }
    let time_factor = age.max(1.0) / window;
    let ramp = time_factor.powf(1.0 / cfg.aggression.max(0.01));
    ramp.max(cfg.min_weight_percent / 100.0).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const S: Nanos = 1_000_000_000;

    fn cfg(window_s: u64, aggression: f64, min_pct: f64) -> SlowStartConfig {
        SlowStartConfig {
            window_ms: window_s * 1000,
            aggression,
            min_weight_percent: min_pct,
        }
    }

    #[test]
    fn linear_ramp_with_floor() {
        let c = cfg(20, 1.0, 10.0);
        assert_eq!(capacity_factor(&c, None, 5 * S), 1.0);
        assert!((capacity_factor(&c, Some(100 * S), 100 * S) - 0.1).abs() < 1e-12); // floor
        assert!((capacity_factor(&c, Some(100 * S), 110 * S) - 0.5).abs() < 1e-12);
        assert!((capacity_factor(&c, Some(100 * S), 119 * S) - 0.95).abs() < 1e-12);
        assert_eq!(capacity_factor(&c, Some(100 * S), 120 * S), 1.0);
    }

    #[test]
    fn aggression_bends_the_curve() {
        let c = cfg(20, 2.0, 0.0);
        assert!((capacity_factor(&c, Some(0), 5 * S) - 0.5).abs() < 1e-12); // (1/4)^(1/2)
        let off = cfg(0, 1.0, 10.0);
        assert_eq!(capacity_factor(&off, Some(0), 0), 1.0);
    }
}
