//! Power of d choices: sample `d` distinct candidates uniformly, keep the lowest score.
//!
//! Sampling (rather than scanning for the global minimum) keeps independent proxies and workers
//! from herding onto the same endpoint between two load updates; ties fall to sampling order,
//! which is random. The runner-up is returned as the retry choice.

use super::rng::Rng;

/// Most choices supported (the config caps `pick.choices` at this).
pub const MAX_CHOICES: usize = 64;

/// Picks among `n` candidates (`0..n`), scoring each sampled one with `score` (lower is
/// better). Returns (best, runner-up). With `d >= n` every candidate is scored, starting at a
/// random offset so ties break randomly.
pub fn pick(
    n: usize,
    d: usize,
    rng: &mut Rng,
    mut score: impl FnMut(usize) -> f64,
) -> (Option<usize>, Option<usize>) {
    let d = d.clamp(1, MAX_CHOICES);
    let mut best: Option<(usize, f64)> = None;
    let mut second: Option<(usize, f64)> = None;
    let mut consider = |k: usize, s: f64| {
        let s = if s.is_nan() { f64::INFINITY } else { s };
        match best {
            Some((_, bs)) if s >= bs => {
                if second.is_none_or(|(_, ss)| s < ss) {
                    second = Some((k, s));
                }
            }
            _ => {
                second = best;
                best = Some((k, s));
            }
        }
    };
    if d >= n {
        let start = rng.below(n);
        for j in 0..n {
            let k = (start + j) % n;
            consider(k, score(k));
        }
    } else {
        let mut taken = [usize::MAX; MAX_CHOICES];
        let mut count = 0;
        while count < d {
            let k = rng.below(n);
            if taken.iter().take(count).any(|&t| t == k) {
                continue;
            }
            if let Some(slot) = taken.get_mut(count) {
                *slot = k;
            }
            count += 1;
            consider(k, score(k));
        }
        if d == 1 && n > 1 {
            // One choice gives no runner-up: draw a distinct one for retries, unscored.
            let first = taken.first().copied().unwrap_or(0);
            let other = (first + 1 + rng.below(n - 1)) % n;
            second = Some((other, f64::INFINITY));
        }
    }
    (best.map(|b| b.0), second.map(|s| s.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn full_scan_finds_minimum_and_runner_up() {
        let scores = [5.0, 1.0, 3.0, 2.0];
        let mut rng = Rng::new(1);
        for _ in 0..20 {
            let (a, b) = pick(4, 8, &mut rng, |k| scores[k]);
            assert_eq!((a, b), (Some(1), Some(3)));
        }
    }

    #[test]
    fn ties_break_randomly() {
        let mut rng = Rng::new(3);
        let mut wins = [0; 5];
        for _ in 0..5000 {
            let (a, _) = pick(5, 5, &mut rng, |_| 1.0);
            wins[a.unwrap()] += 1;
        }
        assert!(wins.iter().all(|&w| w > 800), "{wins:?}");
    }

    #[test]
    fn two_choices_are_distinct_and_better_than_random() {
        let mut rng = Rng::new(9);
        let mut sum = 0usize;
        for _ in 0..10_000 {
            let (a, b) = pick(10, 2, &mut rng, |k| k as f64);
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_ne!(a, b);
            assert!(a < b);
            sum += a;
        }
        // E[min of 2 distinct of 0..10] = Σ_k C(10−k, 2) / C(10, 2) = 120/45; uniform: 4.5.
        let mean = sum as f64 / 10_000.0;
        assert!((mean - 2.667).abs() < 0.1, "{mean}");
    }

    #[test]
    fn degenerate_inputs() {
        let mut rng = Rng::new(5);
        assert_eq!(pick(0, 2, &mut rng, |_| 0.0), (None, None));
        assert_eq!(pick(1, 2, &mut rng, |_| 0.0), (Some(0), None));
        let (a, b) = pick(3, 1, &mut rng, |_| f64::NAN);
        assert!(a.is_some() && b.is_some() && a != b);
    }
}
