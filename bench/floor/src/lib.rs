//! The proxy-wasm floor, for the cost benchmark (`bench/cost.py`, `make bench-cost`): an HTTP
//! filter that receives every callback and returns. With the plugin configuration
//! `{"read_bodies": true}` it also reads each request and response body chunk once (one host
//! call and one copy into the VM, as streamlb's message counting may do), and drops it.
//! Built through the same SDK and entry points as streamlb, so the difference between the two is
//! streamlb's own work.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { read_bodies: false }) });
}}

struct Root {
    read_bodies: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.read_bodies = read_bodies(&config);
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor {
            read_bodies: self.read_bodies,
            bytes: 0,
        }))
    }
}

/// `"read_bodies": true` anywhere in the JSON configuration (no JSON parser: bench only).
fn read_bodies(config: &[u8]) -> bool {
    let text: String = String::from_utf8_lossy(config)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    text.contains("\"read_bodies\":true")
}

struct Floor {
    read_bodies: bool,
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
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _eos: bool) -> Action {
        self.read(BufferType::HttpResponseBody, size);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        Action::Continue
    }

    fn on_log(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::read_bodies;

    #[test]
    fn read_bodies_flag() {
        assert!(read_bodies(br#"{"read_bodies": true}"#));
        assert!(!read_bodies(br#"{"read_bodies": false}"#));
        assert!(!read_bodies(b""));
    }
}
