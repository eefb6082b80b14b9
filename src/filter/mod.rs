//! Envoy glue over the host traits.
