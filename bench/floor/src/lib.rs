//! The proxy-wasm floor, for the cost benchmark (`bench/cost.py`, `make bench-cost`): an HTTP
//! filter that receives every callback and returns. With the plugin configuration
//! `{"read_bodies": true}` it also reads each request and response body chunk once (one host
//! call and one copy into the VM, as streamlb's message counting may do), and drops it. With
//! `{"header_reads": N}` it reads the request's `content-type` header N times at the request
//! headers, with `{"property_reads": N}` the `xds.route_name` property, with
//! `{"shared_reads": N}` a 768-byte shared-data value (a rate-memory bucket's size), with
//! `{"map_reads": N}` the whole request header map in one call: what one
//! host call of each kind costs, measured with N large (each returns bytes into the VM).
//! With `{"streamlb_calls": true, "endpoints": "ip:port,ip:port"}` it makes the host calls streamlb makes
//! for a unary call on a unary route, and nothing else: the header map, the cluster and route
//! names, the clock, the endpoint header set to one of `endpoints` in turn (Envoy then matches the route again
//! and `override_host` picks that pod), the trailers' `grpc-status`, the clock again and one
//! histogram sample; so streamlb minus this floor is streamlb's own work. `"skip":
//! "set_header,histogram"` leaves those out, `"upstream_address": true` adds that property read
//! at the response headers (what each costs).
//! Built through the same SDK and entry points as streamlb, so the difference between the two is
//! streamlb's own work.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone, Copy)]
struct Reads {
    headers: usize,
    properties: usize,
    shared: usize,
    maps: usize,
}

#[derive(Default)]
struct Root {
    read_bodies: bool,
    reads: Reads,
    /// `streamlb_calls`: the pods to name in the endpoint header, in turn.
    endpoints: Vec<String>,
    histogram: Option<u32>,
    variant: Variant,
}

/// Changes to the `streamlb_calls` set: a call left out, or one added.
#[derive(Default, Clone, Copy)]
struct Variant {
    no_set_header: bool,
    no_histogram: bool,
    /// streamlb reads it on a unary route only when a call failed.
    upstream_address: bool,
}

const SHARED_KEY: &str = "streamlb_floor.bucket";

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.read_bodies = flag(&config, "read_bodies");
        self.reads = Reads {
            headers: number(&config, "header_reads"),
            properties: number(&config, "property_reads"),
            shared: number(&config, "shared_reads"),
            maps: number(&config, "map_reads"),
        };
        if flag(&config, "streamlb_calls") {
            self.endpoints = string(&config, "endpoints")
                .map(|e| e.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            let skip = string(&config, "skip").unwrap_or_default();
            let skips = |name: &str| skip.split(',').any(|s| s == name);
            self.variant = Variant {
                no_set_header: skips("set_header"),
                no_histogram: skips("histogram"),
                upstream_address: flag(&config, "upstream_address"),
            };
            self.histogram =
                hostcalls::define_metric(MetricType::Histogram, "floor_latency_us").ok();
        }
        if self.reads.shared > 0 {
            let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&[7u8; 768]), None);
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor {
            read_bodies: self.read_bodies,
            reads: self.reads,
            bytes: 0,
            endpoint: self
                .endpoints
                .get(context_id as usize % self.endpoints.len().max(1))
                .cloned(),
            histogram: self.histogram,
            variant: self.variant,
            started: 0,
        }))
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
}

/// The request header map in one host call, as serialized bytes (as streamlb reads it; the
/// SDK's `get_map_bytes` would also split it into one allocation per header).
fn request_header_map_len() -> usize {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers outlive the call; the host allocated `size` bytes at `data` (through
    // the SDK's `proxy_on_memory_allocate`), which the Vec takes and frees.
    unsafe {
        if proxy_get_header_map_pairs(0, &mut data, &mut size) != 0 || data.is_null() {
            return 0;
        }
        Vec::from_raw_parts(data, size, size).len()
    }
}

fn compact(config: &[u8]) -> String {
    String::from_utf8_lossy(config)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// `"<key>": true` anywhere in the JSON configuration (no JSON parser: bench only).
fn flag(config: &[u8], key: &str) -> bool {
    compact(config).contains(&format!("\"{key}\":true"))
}

/// The string after `"<key>":` (no escapes).
fn string(config: &[u8], key: &str) -> Option<String> {
    let text = compact(config);
    let (_, rest) = text.split_once(&format!("\"{key}\":\""))?;
    rest.split_once('"').map(|(v, _)| v.to_string())
}

fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The number after `"<key>":` (0 when absent).
fn number(config: &[u8], key: &str) -> usize {
    let text = compact(config);
    text.split_once(&format!("\"{key}\":"))
        .map(|(_, rest)| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Floor {
    read_bodies: bool,
    reads: Reads,
    endpoint: Option<String>,
    histogram: Option<u32>,
    variant: Variant,
    started: u64,
    /// Bytes read, so the reads are not optimised away.
    bytes: usize,
}

impl Floor {
    fn read(&mut self, buffer: BufferType, size: usize) {
        if self.read_bodies {
            if let Ok(Some(chunk)) = hostcalls::get_buffer(buffer, 0, size) {
                self.bytes = self.bytes.wrapping_add(chunk.len());
            }
        }
    }
}

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for _ in 0..self.reads.headers {
            if let Ok(Some(v)) =
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "content-type")
            {
                self.bytes = self.bytes.wrapping_add(v.len());
            }
        }
        for _ in 0..self.reads.properties {
            if let Ok(Some(v)) = hostcalls::get_property(vec!["xds", "route_name"]) {
                self.bytes = self.bytes.wrapping_add(v.len());
            }
        }
        for _ in 0..self.reads.maps {
            self.bytes = self.bytes.wrapping_add(request_header_map_len());
        }
        for _ in 0..self.reads.shared {
            if let Ok((Some(v), _)) = hostcalls::get_shared_data(SHARED_KEY) {
                self.bytes = self.bytes.wrapping_add(v.len());
            }
        }
        if let Some(endpoint) = &self.endpoint {
            self.bytes = self.bytes.wrapping_add(request_header_map_len());
            for name in ["cluster_name", "route_name"] {
                if let Ok(Some(v)) = hostcalls::get_property(vec!["xds", name]) {
                    self.bytes = self.bytes.wrapping_add(v.len());
                }
            }
            self.started = now_nanos();
            if !self.variant.no_set_header {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "x-gateway-destination-endpoint",
                    Some(endpoint),
                );
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, _eos: bool) -> Action {
        self.read(BufferType::HttpRequestBody, size);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.endpoint.is_some() && self.variant.upstream_address {
            if let Ok(Some(v)) = hostcalls::get_property(vec!["upstream", "address"]) {
                self.bytes = self.bytes.wrapping_add(v.len());
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _eos: bool) -> Action {
        self.read(BufferType::HttpResponseBody, size);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        if self.endpoint.is_some() {
            if let Ok(Some(v)) =
                hostcalls::get_map_value_bytes(MapType::HttpResponseTrailers, "grpc-status")
            {
                self.bytes = self.bytes.wrapping_add(v.len());
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let (Some(_), Some(h), false) =
            (&self.endpoint, self.histogram, self.variant.no_histogram)
        {
            let micros = now_nanos().saturating_sub(self.started) / 1000;
            let _ = hostcalls::record_metric(h, micros);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{flag, number, string};

    #[test]
    fn numbers() {
        assert_eq!(number(br#"{"header_reads": 18}"#, "header_reads"), 18);
        assert_eq!(number(br#"{"read_bodies": true}"#, "header_reads"), 0);
    }

    #[test]
    fn strings() {
        let config = br#"{"streamlb_calls": true, "endpoints": "127.0.0.1:80"}"#;
        assert_eq!(string(config, "endpoints").as_deref(), Some("127.0.0.1:80"));
        assert_eq!(string(config, "other"), None);
    }

    #[test]
    fn flags() {
        assert!(flag(br#"{"read_bodies": true}"#, "read_bodies"));
        assert!(!flag(br#"{"read_bodies": false}"#, "read_bodies"));
        assert!(!flag(b"", "read_bodies"));
        assert!(!flag(br#"{"read_bodies": true}"#, "streamlb_calls"));
    }
}
