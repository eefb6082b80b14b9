//! Per-stream message rates for the device simulator.
//!
//! Every distribution is scaled so the arithmetic mean over the streams is exactly the
//! requested mean rate R (rate_i = R * n * w_i / sum(w)).

use crate::rng::SplitMix64;
use anyhow::{bail, Context};
use std::fmt;
use std::str::FromStr;

/// How per-stream rates are spread around the mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateDist {
    /// Every stream sends at the mean rate.
    Constant,
    /// Zipf with exponent S: the k-th stream of a random permutation gets weight 1/k^S.
    Zipf(f64),
    /// Pareto with shape A (x_m = 1): weight = U^(-1/A), U uniform in (0, 1].
    Pareto(f64),
}

impl FromStr for RateDist {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let (name, param) = match text.split_once(':') {
            Some((name, param)) => (name, Some(param)),
            None => (text, None),
        };
        let parse_param = |what: &str| -> anyhow::Result<f64> {
            let raw = param.with_context(|| format!("{name} needs a parameter: {name}:{what}"))?;
            let value: f64 = raw
                .parse()
                .with_context(|| format!("bad {name} parameter {raw:?}"))?;
            if !(value.is_finite() && value > 0.0) {
                bail!("{name} parameter must be a positive number, got {raw}");
            }
            Ok(value)
        };
        match name {
            "constant" if param.is_none() => Ok(Self::Constant),
            "zipf" => Ok(Self::Zipf(parse_param("S")?)),
            "pareto" => Ok(Self::Pareto(parse_param("A")?)),
            _ => bail!("unknown rate distribution {text:?}: use constant, zipf:S or pareto:A"),
        }
    }
}

impl fmt::Display for RateDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Constant => write!(f, "constant"),
            Self::Zipf(s) => write!(f, "zipf:{s}"),
            Self::Pareto(a) => write!(f, "pareto:{a}"),
        }
    }
}

/// Rates (msgs/s) for `n` streams with mean exactly `mean` (up to float rounding).
pub fn stream_rates(dist: RateDist, n: usize, mean: f64, rng: &mut SplitMix64) -> Vec<f64> {
    let weights: Vec<f64> = match dist {
        RateDist::Constant => vec![1.0; n],
        RateDist::Zipf(s) => {
            let mut ranks: Vec<usize> = (1..=n).collect();
            rng.shuffle(&mut ranks);
            ranks.iter().map(|&k| 1.0 / (k as f64).powf(s)).collect()
        }
        RateDist::Pareto(a) => (0..n)
            .map(|_| {
                let u = 1.0 - rng.next_f64(); // (0, 1]
                u.powf(-1.0 / a)
            })
            .collect(),
    };
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 || !sum.is_finite() {
        return vec![mean; n];
    }
    let scale = mean * n as f64 / sum;
    weights.iter().map(|w| w * scale).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean(rates: &[f64]) -> f64 {
        rates.iter().sum::<f64>() / rates.len() as f64
    }

    #[test]
    fn every_distribution_is_scaled_to_the_requested_mean() {
        for dist in [
            RateDist::Constant,
            RateDist::Zipf(0.8),
            RateDist::Zipf(1.5),
            RateDist::Pareto(1.2),
            RateDist::Pareto(3.0),
        ] {
            for n in [1, 7, 400] {
                let rates = stream_rates(dist, n, 25.0, &mut SplitMix64::new(9));
                assert_eq!(rates.len(), n);
                assert!(
                    (mean(&rates) - 25.0).abs() < 1e-9,
                    "{dist} n={n}: {}",
                    mean(&rates)
                );
                assert!(rates.iter().all(|r| *r > 0.0), "{dist}: zero rate");
            }
        }
    }

    #[test]
    fn zipf_rates_follow_one_over_k_to_the_s() {
        let s = 0.8;
        let mut rates = stream_rates(RateDist::Zipf(s), 50, 10.0, &mut SplitMix64::new(3));
        rates.sort_by(|a, b| b.total_cmp(a));
        for (k, rate) in rates.iter().enumerate() {
            let expected = rates[0] / ((k + 1) as f64).powf(s);
            assert!(
                (rate - expected).abs() < 1e-9,
                "rank {k}: {rate} vs {expected}"
            );
        }
    }

    #[test]
    fn seeded_rates_are_reproducible_and_seed_dependent() {
        let dist = RateDist::Pareto(1.5);
        let a = stream_rates(dist, 20, 5.0, &mut SplitMix64::new(1));
        let b = stream_rates(dist, 20, 5.0, &mut SplitMix64::new(1));
        let c = stream_rates(dist, 20, 5.0, &mut SplitMix64::new(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Zipf places the heavy stream on a seed-dependent position.
        let argmax = |r: &[f64]| {
            r.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map(|(i, _)| i)
        };
        let positions: std::collections::HashSet<_> = (0..10)
            .map(|seed| {
                argmax(&stream_rates(
                    RateDist::Zipf(1.0),
                    50,
                    1.0,
                    &mut SplitMix64::new(seed),
                ))
            })
            .collect();
        assert!(positions.len() > 1);
    }

    #[test]
    fn parses_distribution_names() {
        assert_eq!(
            "constant".parse::<RateDist>().ok(),
            Some(RateDist::Constant)
        );
        assert_eq!(
            "zipf:0.8".parse::<RateDist>().ok(),
            Some(RateDist::Zipf(0.8))
        );
        assert_eq!(
            "pareto:1.5".parse::<RateDist>().ok(),
            Some(RateDist::Pareto(1.5))
        );
        for bad in ["zipf", "zipf:-1", "pareto:x", "uniform", "constant:2"] {
            assert!(bad.parse::<RateDist>().is_err(), "{bad} accepted");
        }
    }
}
