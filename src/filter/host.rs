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
    /// The whole map in one host call (one crossing instead of one per header read).
    fn headers(&self, map: HeaderMap) -> HostResult<HeaderPairs>;
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

/// A header map as proxy-wasm serializes it, read by name without copying: a little-endian
/// `u32` count N, N pairs of `u32` (name length, value length), then each name and value
/// followed by a NUL. Bytes that do not follow the format read as no headers from that point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderPairs(Vec<u8>);

impl HeaderPairs {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        HeaderPairs(bytes)
    }

    /// The serialized form of `pairs` (what the host returns).
    pub fn encode<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let pairs: Vec<_> = pairs.into_iter().collect();
        let mut out = Vec::new();
        let len = |b: &[u8]| u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes();
        out.extend(u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_le_bytes());
        for (name, value) in &pairs {
            out.extend(len(name));
            out.extend(len(value));
        }
        for (name, value) in &pairs {
            out.extend_from_slice(name);
            out.push(0);
            out.extend_from_slice(value);
            out.push(0);
        }
        HeaderPairs(out)
    }

    /// (name, value) in order; stops at the first pair the bytes cannot hold.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let bytes = self.0.as_slice();
        let word = |at: usize| -> Option<usize> {
            let b = bytes.get(at..at.checked_add(4)?)?;
            let mut w = [0u8; 4];
            w.copy_from_slice(b);
            usize::try_from(u32::from_le_bytes(w)).ok()
        };
        let count = word(0).unwrap_or(0);
        let mut data = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(4))
            .unwrap_or(usize::MAX);
        (0..count).map_while(move |i| {
            let at = 4 + 8 * i;
            let (name_len, value_len) = (word(at)?, word(at + 4)?);
            let name = bytes.get(data..data.checked_add(name_len)?)?;
            let value_at = data.checked_add(name_len)?.checked_add(1)?;
            let value = bytes.get(value_at..value_at.checked_add(value_len)?)?;
            data = value_at.checked_add(value_len)?.checked_add(1)?;
            Some((name, value))
        })
    }

    /// The first value of `name` (header names are lowercase in Envoy's maps, as in the config).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn header_pairs_are_read_by_name_in_the_hosts_format() {
        let pairs = HeaderPairs::encode([
            (&b":path"[..], &b"/a"[..]),
            (b"x-device-id", b"\xff\x00id"),
            (b"empty", b""),
            (b"x-device-id", b"second"),
        ]);
        let mut expected = vec![4, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0];
        expected.extend([11, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend([11, 0, 0, 0, 6, 0, 0, 0]);
        expected.extend(b":path\0/a\0");
        assert_eq!(pairs.0.get(..expected.len()), Some(&expected[..]));
        assert_eq!(pairs.get(":path"), Some(&b"/a"[..]));
        assert_eq!(pairs.get("x-device-id"), Some(&b"\xff\x00id"[..]));
        assert_eq!(pairs.get("empty"), Some(&b""[..]));
        assert_eq!(pairs.get("absent"), None);
        assert_eq!(pairs.iter().count(), 4);
    }

    #[test]
    fn malformed_header_pairs_read_as_the_pairs_they_hold() {
        let whole = HeaderPairs::encode([(&b"a"[..], &b"1"[..]), (b"b", b"2")]).0;
        // Cut anywhere before the last value's end (its trailing NUL is not needed).
        for cut in 0..whole.len() - 1 {
            let pairs = HeaderPairs::from_bytes(whole.get(..cut).unwrap_or_default().to_vec());
            assert!(pairs.iter().count() < 2, "cut at {cut}");
        }
        // A count far beyond the bytes, and lengths that overflow.
        let mut huge = vec![0xff, 0xff, 0xff, 0xff];
        huge.extend([0xff; 8]);
        assert_eq!(HeaderPairs::from_bytes(huge).iter().count(), 0);
        assert_eq!(HeaderPairs::default().get("a"), None);
    }
}
