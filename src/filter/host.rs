//! What the filter needs from its host (Envoy through proxy-wasm, or a mock in tests).
//! Every call can fail; callers handle the error (log once, count, carry on).

use streamlb_core::Nanos;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// Shared data changed since it was read (compare-and-swap lost).
    CasMismatch,
    /// Anything else the host reported.
    Status(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderMap {
    Request,
    Response,
    ResponseTrailers,
    HttpCallResponse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Body {
    Request,
    Response,
    HttpCallResponse,
}

pub type HostResult<T> = Result<T, HostError>;

pub trait Host {
    /// Current time in ns.
    fn now(&self) -> HostResult<Nanos>;
    fn log(&self, level: LogLevel, message: &str);
    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>>;
    /// A header value as the bytes it holds (any bytes: a client can send non-UTF-8).
    fn header(&self, map: HeaderMap, name: &str) -> HostResult<Option<Vec<u8>>>;
    /// Set (`Some`) or remove (`None`) a header.
    fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> HostResult<()>;
    fn body(&self, which: Body, start: usize, len: usize) -> HostResult<Option<Vec<u8>>>;
    fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)>;
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()>;
    /// Dispatch an HTTP call; returns its token.
    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout_ms: u64,
    ) -> HostResult<u32>;
    fn define_metric(&self, kind: MetricKind, name: &str) -> HostResult<u32>;
    fn increment_metric(&self, id: u32, delta: i64) -> HostResult<()>;
    fn record_metric(&self, id: u32, value: u64) -> HostResult<()>;
    fn set_tick_period_ms(&self, ms: u64) -> HostResult<()>;
    /// End the current HTTP stream with a local gRPC `UNAVAILABLE` (trailers-only before the
    /// response started; a reset after).
    fn end_stream_unavailable(&self, message: &str) -> HostResult<()>;
    /// Answer the current HTTP request locally (it is not forwarded).
    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()>;
}

/// A property as a UTF-8 string (Envoy returns strings raw).
pub fn string_property(host: &dyn Host, path: &[&str]) -> HostResult<Option<String>> {
    Ok(host
        .property(path)?
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty()))
}

/// A header value parsed as a decimal number (`:status`, `grpc-status`); `None` when it is not
/// one.
pub fn parse_number(bytes: &[u8]) -> Option<u32> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}
