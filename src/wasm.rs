//! The proxy-wasm adapter (built only for `wasm32-wasip1`): Envoy's callbacks forwarded to
//! [`crate::filter`], and [`crate::filter::host::Host`] implemented with direct ABI calls
//! ([`crate::abi`]) that return errors and bytes where the SDK's helpers would panic.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, Status};

use crate::abi;
use crate::filter::host::{
    Body, HeaderMap, HeaderPairs, Host, HostError, HostResult, LogLevel, MetricKind,
};
use crate::filter::stream::{BodyAction, HeadersAction, StreamFilter};
use crate::filter::vm::Vm;
use streamlb_core::Nanos;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    // After set_log_level, which installs the SDK's hook (it unwraps the log call).
    std::panic::set_hook(Box::new(|info| {
        abi::log(
            abi::LOG_CRITICAL,
            &format!("streamlb: panic, this worker's VM is lost: {info}"),
        );
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { vm: None }) });
}}

struct EnvoyHost;

// proxy-wasm ABI enum values (MapType, BufferType, MetricType, GrpcStatusCode, LogLevel).
const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const MAP_RESPONSE_TRAILERS: u32 = 3;
const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const BUFFER_REQUEST_BODY: u32 = 0;
const BUFFER_RESPONSE_BODY: u32 = 1;
const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

fn map_type(m: HeaderMap) -> u32 {
    match m {
        HeaderMap::Request => MAP_REQUEST_HEADERS,
        HeaderMap::Response => MAP_RESPONSE_HEADERS,
        HeaderMap::ResponseTrailers => MAP_RESPONSE_TRAILERS,
        HeaderMap::HttpCallResponse => MAP_HTTP_CALL_RESPONSE_HEADERS,
    }
}

fn status(s: Status) -> HostError {
    match s {
        Status::CasMismatch => HostError::CasMismatch,
        other => HostError::Status(format!("{other:?}")),
    }
}

impl Host for EnvoyHost {
    fn now(&self) -> HostResult<Nanos> {
        abi::now()
    }

    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => 1,
            LogLevel::Info => 2,
            LogLevel::Warn => 3,
            LogLevel::Error => 4,
        };
        abi::log(level, message);
    }

    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        abi::property(path)
    }

    fn header(&self, map: HeaderMap, name: &str) -> HostResult<Option<Vec<u8>>> {
        abi::header(map_type(map), name)
    }

    fn headers(&self, map: HeaderMap) -> HostResult<HeaderPairs> {
        abi::headers(map_type(map)).map(HeaderPairs::from_bytes)
    }

    fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> HostResult<()> {
        abi::set_header(map_type(map), name, value.map(str::as_bytes))
    }

    fn body(&self, which: Body, start: usize, len: usize) -> HostResult<Option<Vec<u8>>> {
        let buffer = match which {
            Body::Request => BUFFER_REQUEST_BODY,
            Body::Response => BUFFER_RESPONSE_BODY,
            Body::HttpCallResponse => BUFFER_HTTP_CALL_RESPONSE_BODY,
        };
        abi::buffer(buffer, start, len)
    }

    fn shared_get(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        abi::shared_get(key)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<()> {
        abi::shared_set(key, value, cas)
    }

    /// Through the SDK: it registers the token so that the response reaches the root context.
    /// It returns BadArgument / InternalFailure as errors (Envoy answers nothing else).
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
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        abi::define_metric(kind, name)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> HostResult<()> {
        abi::increment_metric(id, delta)
    }

    fn record_metric(&self, id: u32, value: u64) -> HostResult<()> {
        abi::record_metric(id, value)
    }

    fn set_tick_period_ms(&self, ms: u64) -> HostResult<()> {
        abi::set_tick_period_ms(ms)
    }

    fn end_stream_unavailable(&self, message: &str) -> HostResult<()> {
        abi::send_grpc_response(streamlb_core::grpc_status::UNAVAILABLE as i32, message)
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
        abi::send_response(status, headers, body)
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
        let config = match abi::buffer(BUFFER_PLUGIN_CONFIGURATION, 0, size) {
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

    /// Never `None` (the SDK panics on it): without a configured VM, a pass-through context.
    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // After a reload the newest configuration takes new streams, even on old connections.
        Some(match self.vm.clone() {
            Some(vm) => Box::new(Http(StreamFilter::new(
                Vm::newest(vm),
                u64::from(context_id),
            ))),
            None => Box::new(PassThrough),
        })
    }
}

/// The HTTP context of a VM that has no configuration: every callback continues.
struct PassThrough;

impl Context for PassThrough {}

impl HttpContext for PassThrough {}

struct Http(StreamFilter);

impl Context for Http {
    fn on_done(&mut self) -> bool {
        self.0.on_done(&EnvoyHost);
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        match self.0.on_request_headers(&EnvoyHost) {
            HeadersAction::Continue => Action::Continue,
            HeadersAction::Answered => Action::Pause,
        }
    }

    fn on_http_request_body(&mut self, size: usize, _eos: bool) -> Action {
        match self.0.on_request_body(&EnvoyHost, size) {
            BodyAction::Continue => Action::Continue,
            BodyAction::Ended => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, eos: bool) -> Action {
        self.0.on_response_headers(&EnvoyHost, eos);
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
