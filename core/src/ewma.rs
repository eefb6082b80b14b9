//! Exponentially weighted rates with irregular update intervals.
//!
//! [`RateEwma`]: events are counted between updates; an update after `Δt` seconds with `n`
//! events applies
//!
//! ```text
//! r = n / Δt,   α = 1 − e^(−Δt/τ),   x ← x + α · (r − x)
//! ```
//!
//! which is exact for a rate that is constant within each interval, whatever the intervals are:
//! from `x = 0`, a constant rate `r` gives `x(t) = r · (1 − e^(−t/τ))` for any partition of `t`.
//! Hence the bias-corrected rate of a stream of age `a` is `x / (1 − e^(−a/τ))`.
//!
//! [`Decaying`]: a value that decays with half-life `h`: `v(t) = v(t₀) · 2^(−(t−t₀)/h)`.

use super::{Nanos, NANOS_PER_SEC};

/// `x > 0`, false for NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}

/// EWMA of an event rate (events per second).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateEwma {
    value: f64,
}

impl RateEwma {
    /// Fold in `count` events observed over the last `dt_secs` seconds.
    pub fn update(&mut self, count: f64, dt_secs: f64, tau_secs: f64) {
        if !positive(dt_secs) || !positive(tau_secs) || !count.is_finite() {
            return;
        }
        let alpha = 1.0 - (-dt_secs / tau_secs).exp();
        self.value += alpha * (count / dt_secs - self.value);
    }

    pub fn value(&self) -> f64 {
        self.value
    }
}

/// `e^(−age/τ)`: the weight an EWMA started at age 0 still owes to its prior.
pub fn prior_weight(age: Nanos, tau_secs: f64) -> f64 {
    if !positive(tau_secs) {
        return 0.0;
    }
    (-(age as f64 / NANOS_PER_SEC) / tau_secs).exp()
}

/// A non-negative score that halves every `half_life`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Decaying {
    value: f64,
    at: Nanos,
}

impl Decaying {
    pub fn value(&self, now: Nanos, half_life_secs: f64) -> f64 {
        if self.value == 0.0 || !positive(half_life_secs) {
            return self.value;
        }
        let dt = now.saturating_sub(self.at) as f64 / NANOS_PER_SEC;
        self.value * (-dt / half_life_secs).exp2()
    }

    pub fn add(&mut self, now: Nanos, amount: f64, half_life_secs: f64) {
        self.value = self.value(now, half_life_secs) + amount;
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn constant_rate_matches_closed_form_for_any_partition() {
        let mut rng = Rng::new(42);
        for trial in 0..200 {
            let rate = 1.0 + rng.next_f64() * 500.0;
            let tau = 0.5 + rng.next_f64() * 20.0;
            let mut e = RateEwma::default();
            let mut t = 0.0;
            for _ in 0..(1 + rng.below(50)) {
                let dt = 0.001 + rng.next_f64() * 3.0;
                e.update(rate * dt, dt, tau);
                t += dt;
            }
            let want = rate * (1.0 - (-t / tau).exp());
            assert!(
                (e.value() - want).abs() <= 1e-9 * rate.max(1.0),
                "trial {trial}: got {} want {want}",
                e.value()
            );
        }
    }

    #[test]
    fn step_change_converges_with_time_constant() {
        let mut e = RateEwma::default();
        e.update(100.0 * 60.0, 60.0, 5.0); // long at 100/s
        assert!((e.value() - 100.0).abs() < 1e-3);
        let before = e.value();
        e.update(0.0, 5.0, 5.0); // one τ at 0/s
        assert!((e.value() - before * (-1.0f64).exp()).abs() < 1e-9);
    }

    #[test]
    fn bad_intervals_are_ignored() {
        let mut e = RateEwma::default();
        e.update(10.0, 0.0, 5.0);
        e.update(10.0, -1.0, 5.0);
        e.update(f64::NAN, 1.0, 5.0);
        e.update(10.0, f64::NAN, 5.0);
        assert_eq!(e.value(), 0.0);
    }

    #[test]
    fn decaying_halves_per_half_life() {
        let s = 1_000_000_000;
        let mut d = Decaying::default();
        d.add(10 * s, 8.0, 2.0);
        assert!((d.value(12 * s, 2.0) - 4.0).abs() < 1e-12);
        assert!((d.value(16 * s, 2.0) - 1.0).abs() < 1e-12);
        d.add(16 * s, 1.0, 2.0);
        assert!((d.value(18 * s, 2.0) - 1.0).abs() < 1e-12);
        // Time going backwards never grows the score.
        assert!(d.value(0, 2.0) <= 2.0 + 1e-12);
        assert!((prior_weight(5 * s, 5.0) - (-1.0f64).exp()).abs() < 1e-12);
    }
}
