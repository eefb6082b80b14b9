//! The proxy-wasm adapter (built only for `wasm32-wasip1`): Envoy's callbacks forwarded to
//! [`crate::filter`], and [`crate::filter::host::Host`] implemented with the SDK's `hostcalls`,
//! which return errors instead of panicking like some of the SDK's convenience methods.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{
    Action, BufferType, ContextType, GrpcStatusCode, MapType, MetricType, Status,
};

use crate::core::Nanos;
use crate::filter::host::{Body, HeaderMap, Host, HostError, HostResult, LogLevel, MetricKind};
use crate::filter::stream::{BodyAction, StreamFilter};
use crate::filter::vm::Vm;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { vm: None }) });
}}

struct EnvoyHost;

fn status(s: Status) -> HostError {
    match s {
        Status::CasMismatch => HostError::CasMismatch,
        other => HostError::Status(format!("{other:?}")),
    }
}

fn map_type(m: HeaderMap) -> MapType {
    match m {
        HeaderMap::Request => MapType::HttpRequestHeaders,
        HeaderMap::Response => MapType::HttpResponseHeaders,
        HeaderMap::ResponseTrailers => MapType::HttpResponseTrailers,
        HeaderMap::HttpCallResponse => MapType::HttpCallResponseHeaders,
    }
}

impl Host for EnvoyHost {
    fn now(&self) -> HostResult<Nanos> {
        let t = hostcalls::get_current_time().map_err(status)?;
        Ok(t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as Nanos)
            .unwrap_or(0))
    }

    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => proxy_wasm::types::LogLevel::Debug,
            LogLevel::Info => proxy_wasm::types::LogLevel::Info,
            LogLevel::Warn => proxy_wasm::types::LogLevel::Warn,
            LogLevel::Error => proxy_wasm::types::LogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
    }

    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        hostcalls::get_property(path.to_vec()).map_err(status)
    }

    fn header(&self, map: HeaderMap, name: &str) -> HostResult<Option<String>> {
        hostcalls::get_map_value(map_type(map), name).map_err(status)
    }

    fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> HostResult<()> {
        hostcalls::set_map_value(map_type(map), name, value).map_err(status)
    }

    fn body(&self, which: Body, start: usize, len: usize) -> HostResult<Option<Vec<u8>>> {
        let buffer = match which {
            Body::Request => BufferType::HttpRequestBody,
            Body::Response => BufferType::HttpResponseBody,
            Body::HttpCallResponse => BufferType::HttpCallResponseBody,
        };
        hostcalls::get_buffer(buffer, start, len).map_err(status)
    }

    fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        hostcalls::get_shared_data(key).map_err(status)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(status)
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout_ms: u64,
    ) -> HostResult<u32> {
        hostcalls::dispatch_http_call(
            cluster,
            headers.to_vec(),
            None,
            vec![],
            Duration::from_millis(timeout_ms),
        )
        .map_err(status)
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> HostResult<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).map_err(status)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> HostResult<()> {
        hostcalls::increment_metric(id, delta).map_err(status)
    }

    fn record_metric(&self, id: u32, value: u64) -> HostResult<()> {
        hostcalls::record_metric(id, value).map_err(status)
    }

    fn set_tick_period_ms(&self, ms: u64) -> HostResult<()> {
        hostcalls::set_tick_period(Duration::from_millis(ms)).map_err(status)
    }

    fn end_stream_unavailable(&self, message: &str) -> HostResult<()> {
        hostcalls::send_grpc_response(GrpcStatusCode::Unavailable, Some(message), vec![])
            .map_err(status)
    }
}

struct Root {
    vm: Option<Rc<RefCell<Vm>>>,
}

impl Drop for Root {
    /// Envoy deleted the root context (its configuration drained, or its listener update was
    /// rejected): its `Vm` is nobody's successor any more.
    fn drop(&mut self) {
        if let Some(Ok(mut vm)) = self.vm.as_ref().map(|v| v.try_borrow_mut()) {
            vm.retire();
        }
    }
}

thread_local! {
    /// The newest configured `Vm` of this VM (one wasm instance per thread): a configuration
    /// reload creates a new root context here, and the previous one hands over to it.
    static NEWEST: RefCell<Option<Rc<RefCell<Vm>>>> = const { RefCell::new(None) };
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(vm) = &self.vm else { return };
        let host = EnvoyHost;
        let status = host
            .header(HeaderMap::HttpCallResponse, ":status")
            .ok()
            .flatten();
        let body = host
            .body(Body::HttpCallResponse, 0, body_size)
            .ok()
            .flatten();
        if let Ok(mut vm) = vm.try_borrow_mut() {
            vm.on_http_call_response(&host, token, status.as_deref(), body.as_deref());
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let host = EnvoyHost;
        let config = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(c)) => c,
            Ok(None) => Vec::new(),
            Err(e) => {
                host.log(
                    LogLevel::Error,
                    &format!("streamlb: cannot read the plugin configuration: {e:?}"),
                );
                return false;
            }
        };
        match Vm::configure(&host, &config) {
            Ok(vm) => {
                let vm = Rc::new(RefCell::new(vm));
                let previous = NEWEST.with(|n| match n.try_borrow_mut() {
                    Ok(mut newest) => newest.replace(vm.clone()),
                    Err(_) => None,
                });
                if let Some(Ok(mut old)) = previous.as_ref().map(|p| p.try_borrow_mut()) {
                    old.supersede(vm.clone());
                }
                self.vm = Some(vm);
                true
            }
            Err(e) => {
                host.log(
                    LogLevel::Error,
                    &format!("streamlb: invalid configuration: {e}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(Ok(mut vm)) = self.vm.as_ref().map(|v| v.try_borrow_mut()) {
            vm.on_tick(&EnvoyHost);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // After a reload the newest configuration takes new streams, even on old connections.
        let vm = Vm::newest(self.vm.clone()?);
        Some(Box::new(Http(StreamFilter::new(vm, u64::from(context_id)))))
    }
}

struct Http(StreamFilter);

impl Context for Http {
    fn on_done(&mut self) -> bool {
        self.0.on_done(&EnvoyHost);
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.0.on_request_headers(&EnvoyHost);
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, _eos: bool) -> Action {
        match self.0.on_request_body(&EnvoyHost, size) {
            BodyAction::Continue => Action::Continue,
            BodyAction::Ended => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.0.on_response_headers(&EnvoyHost);
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _eos: bool) -> Action {
        self.0.on_response_body(&EnvoyHost, size);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.0.on_response_trailers(&EnvoyHost);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.0.on_done(&EnvoyHost);
    }
}
