//! Failure penalties: each failed stream adds 1 to an endpoint's score, which halves every
//! `half_life`; the endpoint's capacity is scaled by
//!
//! ```text
//! factor = 1 / (1 + weight · score)
//! ```
//!
//! Failures: gRPC `UNAVAILABLE`/`RESOURCE_EXHAUSTED`, HTTP 5xx and 429 (connect failures reach
//! the filter as Envoy's local 503).

use super::grpc_status;

/// How a stream ended, as far as the endpoint's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The client went away or the stream was cancelled: not the endpoint's fault.
    Cancelled,
    /// Counts against the endpoint.
    Failed,
}

/// Classify by HTTP status and gRPC status (either may be unknown).
pub fn classify(http_status: Option<u32>, grpc_status: Option<u32>) -> Outcome {
    match grpc_status {
        Some(grpc_status::UNAVAILABLE | grpc_status::RESOURCE_EXHAUSTED) => return Outcome::Failed,
        Some(grpc_status::CANCELLED) => return Outcome::Cancelled,
        Some(_) => return Outcome::Ok,
        None => {}
    }
    match http_status {
        Some(429) => Outcome::Failed,
        Some(s) if (500..600).contains(&s) => Outcome::Failed,
        Some(_) => Outcome::Ok,
        // No response at all: the client left or the stream was reset. Connect failures and
        // upstream resets reach the filter as Envoy's local 503 reply, counted above.
        None => Outcome::Cancelled,
    }
}

pub fn capacity_factor(score: f64, weight: f64) -> f64 {
    1.0 / (1.0 + (weight * score).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn classification() {
        assert_eq!(classify(Some(200), Some(0)), Outcome::Ok);
        assert_eq!(classify(Some(200), Some(14)), Outcome::Failed);
        assert_eq!(classify(Some(200), Some(8)), Outcome::Failed);
        assert_eq!(classify(Some(200), Some(1)), Outcome::Cancelled);
        assert_eq!(classify(Some(200), Some(3)), Outcome::Ok);
        assert_eq!(classify(Some(503), None), Outcome::Failed);
        assert_eq!(classify(Some(429), None), Outcome::Failed);
        assert_eq!(classify(Some(404), None), Outcome::Ok);
        assert_eq!(classify(None, None), Outcome::Cancelled);
    }

    #[test]
    fn factor_shrinks_with_score() {
        assert_eq!(capacity_factor(0.0, 1.0), 1.0);
        assert_eq!(capacity_factor(1.0, 1.0), 0.5);
        assert_eq!(capacity_factor(3.0, 0.0), 1.0);
    }
}
