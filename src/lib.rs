//! streamlb — a proxy-wasm filter for Envoy that places long-lived gRPC/HTTP2 streams on
//! endpoints by measured message rate and by zone.
//!
//! - `streamlb_core` (the `core/` crate): the routing logic, pure Rust, no proxy-wasm types;
//!   time and randomness are inputs.
//! - [`filter`]: the glue between Envoy and the core, written against the [`filter::host`] traits
//!   so it runs natively under a mock host in tests.
//! - `wasm` (only on `wasm32-wasip1`): the proxy-wasm adapter Envoy loads, over `abi` (the
//!   proxy-wasm ABI calls, returning errors where the SDK's helpers panic).

pub mod filter;

#[cfg(target_os = "wasi")]
mod abi;
#[cfg(target_os = "wasi")]
mod wasm;
