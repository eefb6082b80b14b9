//! The proxy-wasm adapter (wasm32-wasip1 only).
