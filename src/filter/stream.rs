//! Per-HTTP-stream logic (the HTTP context).
//!
//! - Request headers: strip any client-supplied endpoint header, resolve route and cluster, ask
//!   the router, and (in `steer` mode) name `primary,secondary` in the endpoint header.
//! - Bodies: count gRPC messages and bytes per direction. Payload is skipped without copying:
//!   only the 5-byte prefix at a message boundary is read, and the rest of the frame only when
//!   another message starts in it — at most two host calls per DATA frame, none for pure payload.
//! - Response headers/trailers: the real upstream, ORCA reports, statuses.
//! - Done: the outcome updates load and penalties.

use std::cell::RefCell;
use std::rc::Rc;

use super::fleet::{answer_probe, PROBE_HEADER};
use super::host::{parse_number, string_property, Body, HeaderMap, HeaderPairs, Host};
use super::stats::{
    MoveHow, SkipReason, StatusClass, DURATION_US, FIRST_BYTE_US, REQUEST_LATENCY_US,
};
use super::vm::Vm;
use streamlb_core::config::Mode;
use streamlb_core::grpc_framing::FrameCounter;
use streamlb_core::grpc_status;
use streamlb_core::orca::{self, OrcaError, OrcaReport};
use streamlb_core::penalty;
use streamlb_core::rate_memory::{self, Bucket};
use streamlb_core::router::Source;
use streamlb_core::routes::OTHER;
use streamlb_core::streams::Direction;
use streamlb_core::zone;
use streamlb_core::{ClusterIdx, Nanos, RouteIdx};

pub const ORCA_HEADER: &str = "endpoint-load-metrics";
/// The binary form gRPC servers send (base64 `OrcaLoadReport`), usually as a trailer.
pub const ORCA_BIN_HEADER: &str = "endpoint-load-metrics-bin";

pub struct StreamFilter {
    vm: Rc<RefCell<Vm>>,
    id: u64,
    /// (cluster, route) when the stream is covered by the config.
    tracked: Option<(ClusterIdx, RouteIdx)>,
    grpc: bool,
    up: FrameCounter,
    down: FrameCounter,
    debug: Option<(String, String)>,
    http_status: Option<u32>,
    grpc_status: Option<u32>,
    started: Nanos,
    /// The endpoint is in another zone than this proxy (known from the decision, then from the
    /// real upstream).
    cross_zone: bool,
    first_byte_seen: bool,
    /// Placed on a unary route: the exchange is timed whole (no time to first byte), and the
    /// real upstream of a call placed on a named pod is not read at the response (one host call
    /// fewer each); it is read at the end only if the call failed, so the penalty lands on the
    /// pod that failed (a retried call that succeeded counts on the pod named).
    unary_route: bool,
    /// The upstream read was skipped at the response (see `unary_route`).
    upstream_unread: bool,
    /// This filter ended the stream to rebalance it.
    moved: bool,
    ended: bool,
    /// Counted by the reporter role (every stream into the pod), until it ends.
    reported: bool,
}

/// What the adapter does after the request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersAction {
    Continue,
    /// Answered locally (a load probe): stop, nothing is forwarded.
    Answered,
}

/// What the adapter does with a request DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyAction {
    Continue,
    /// The stream was ended locally (rebalance): stop this frame.
    Ended,
}

/// The message a rebalanced client sees.
pub const REBALANCE_MESSAGE: &str = "streamlb: rebalancing, please reconnect";

impl StreamFilter {
    pub fn new(vm: Rc<RefCell<Vm>>, id: u64) -> Self {
        StreamFilter {
            vm,
            id,
            tracked: None,
            grpc: false,
            up: FrameCounter::plain(),
            down: FrameCounter::plain(),
            debug: None,
            http_status: None,
            grpc_status: None,
            started: 0,
            cross_zone: false,
            first_byte_seen: false,
            unary_route: false,
            upstream_unread: false,
            moved: false,
            ended: false,
            reported: false,
        }
    }

    pub fn is_tracked(&self) -> bool {
        self.tracked.is_some()
    }

    pub fn on_request_headers(&mut self, host: &dyn Host) -> HeadersAction {
        let vm = self.vm.clone();
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return HeadersAction::Continue;
        };
        let vm = &mut *vm;
        let headers = request_headers(host, vm);
        strip_endpoint_header(host, vm, &headers);
        if vm.config().reporter.is_some() {
            if answer_probe(host, vm, &headers) {
                return HeadersAction::Answered;
            }
            self.detect_grpc(&headers);
            self.reported = true;
            vm.reporter.on_open();
            if !self.grpc {
                vm.reporter.on_data(1, 0); // a non-gRPC request counts as one message
            }
        }
        self.place(host, vm, &headers);
        HeadersAction::Continue
    }

    fn detect_grpc(&mut self, headers: &HeaderPairs) {
        self.grpc = headers
            .get("content-type")
            .is_some_and(|ct| ct.starts_with(b"application/grpc"));
        if self.grpc {
            self.up = FrameCounter::grpc();
            self.down = FrameCounter::grpc();
        }
    }

    /// Placement of a stream covered by the config: decide, name the pod, count the start.
    fn place(&mut self, host: &dyn Host, vm: &mut Vm, headers: &HeaderPairs) {
        // The cluster first: traffic to a cluster not configured costs one host call here.
        let cluster = match string_property(host, &["xds", "cluster_name"]) {
            Ok(Some(c)) if vm.config().clusters.contains(&c) => c,
            Ok(_) => return, // another cluster, or none (e.g. a direct response)
            Err(e) => return vm.host_error(host, "get_property (xds)", &e),
        };
        let route = match string_property(host, &["xds", "route_name"]) {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => return vm.host_error(host, "get_property (xds)", &e),
        };
        if !vm.config().covers(&route, &cluster) {
            return;
        }
        let now = match host.now() {
            Ok(t) => t,
            Err(e) => return vm.host_error(host, "get_current_time", &e),
        };
        if !self.reported {
            self.detect_grpc(headers);
        }
        // On a unary route: no rate-memory read, and the exchange is timed whole.
        self.unary_route = vm.router.is_unary_route(&route);
        let source = if self.unary_route {
            None
        } else {
            source_of(host, vm, now, headers)
        };
        let Some(decision) = vm.router.place_from(now, self.id, &route, &cluster, source) else {
            return;
        };
        let Some(ci) = vm.router.cluster_index(&cluster) else {
            return;
        };
        let ri = vm.router.streams().get(self.id).map_or(OTHER, |s| s.route);
        self.tracked = Some((ci, ri));
        self.started = now;
        self.cross_zone = zone::crosses(vm.router.local_zone(), &decision.zone).unwrap_or(false);
        let stats = vm.stats.route(ci, ri);
        stats.started += 1;
        stats.active_delta += 1;
        if !self.grpc {
            // Non-gRPC traffic: each request counts as one message.
            stats.messages[0] += 1;
            vm.router.on_data(self.id, Direction::Upstream, 1, 0);
        }
        if vm.config().mode == Mode::Steer {
            let mut value = std::mem::take(&mut vm.endpoint_value);
            if decision.write_header_value(&mut value) {
                let header = &vm.config().endpoint_header;
                if let Err(e) = host.set_header(HeaderMap::Request, header, Some(&value)) {
                    vm.host_error(host, "set endpoint header", &e);
                }
            }
            vm.endpoint_value = value;
        }
        if let Some(name) = &vm.config().debug_header {
            self.debug = Some((name.clone(), decision.debug_value()));
        }
    }

    /// A newer configuration took this stream over (see `vm.rs`): follow it to the `Vm` that
    /// now holds it, with its indices there (untracked when the new configuration does not
    /// cover it).
    fn follow_reload(&mut self) {
        let superseded = self
            .vm
            .try_borrow()
            .is_ok_and(|vm| vm.successor().is_some());
        if self.tracked.is_none() || !superseded {
            return;
        }
        loop {
            let next = match self.vm.try_borrow() {
                Ok(vm) if vm.router.streams().get(self.id).is_none() => vm.successor().cloned(),
                _ => None,
            };
            match next {
                Some(n) => self.vm = n,
                None => break,
            }
        }
        if let Ok(vm) = self.vm.try_borrow() {
            self.tracked = vm
                .router
                .streams()
                .get(self.id)
                .map(|s| (s.cluster, s.route));
        }
    }

    /// Counts the frame, unless the rebalancer chose this stream and the upstream has so far
    /// received whole messages only: then the stream ends here (this frame is not forwarded).
    pub fn on_request_body(&mut self, host: &dyn Host, size: usize) -> BodyAction {
        self.follow_reload();
        if self.tracked.is_some() && self.up.at_message_boundary() && self.move_now(host) {
            return BodyAction::Ended;
        }
        self.count(host, Direction::Upstream, size);
        BodyAction::Continue
    }

    fn move_now(&mut self, host: &dyn Host) -> bool {
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            return false;
        };
        let vm = &mut *vm;
        if !vm.router.move_planned(self.id) || !vm.may_move(host) {
            return false;
        }
        if self.first_byte_seen && !vm.config().rebalance.allow_reset {
            // Planned before its response started: only a reset could end it now.
            if let Some(ci) = vm.router.set_unmovable(self.id) {
                *vm.stats
                    .rebalance
                    .skipped
                    .entry((ci, SkipReason::Unmovable))
                    .or_default() += 1;
            }
            return false;
        }
        if let Err(e) = host.end_stream_unavailable(REBALANCE_MESSAGE) {
            vm.host_error(host, "end stream (rebalance)", &e);
            return false;
        }
        let Some((ci, _)) = self.tracked else {
            return false;
        };
        let how = if self.first_byte_seen {
            MoveHow::Reset
        } else {
            MoveHow::Unavailable
        };
        *vm.stats.rebalance.moved.entry((ci, how)).or_default() += 1;
        self.moved = true;
        self.http_status = Some(200);
        self.grpc_status = Some(grpc_status::UNAVAILABLE);
        true
    }

    pub fn on_response_body(&mut self, host: &dyn Host, size: usize) {
        self.follow_reload();
        self.count(host, Direction::Downstream, size);
    }

    fn count(&mut self, host: &dyn Host, dir: Direction, size: usize) {
        if self.tracked.is_none() && !self.reported {
            return;
        }
        let (counter, which) = match dir {
            Direction::Upstream => (&mut self.up, Body::Request),
            Direction::Downstream => (&mut self.down, Body::Response),
        };
        let (m0, b0) = (counter.messages(), counter.bytes());
        let read_error = counter
            .count_chunk(size, |start, len| host.body(which, start, len))
            .err();
        let (dm, db) = (counter.messages() - m0, counter.bytes() - b0);
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            return;
        };
        if let Some(e) = read_error {
            vm.host_error(host, "get body", &e);
        }
        if self.reported {
            vm.reporter.on_data(dm, db);
        }
        let Some((ci, ri)) = self.tracked else {
            return;
        };
        vm.router.on_data(self.id, dir, dm, db);
        let d = dir.index();
        let t = vm.stats.route(ci, ri);
        if let (Some(m), Some(b)) = (t.messages.get_mut(d), t.bytes.get_mut(d)) {
            *m += dm;
            *b += db;
        }
        if self.cross_zone && dm > 0 {
            *vm.stats.cross_zone_messages.entry(ci).or_default() += dm;
        }
    }

    /// `end_of_stream`: the response ends with these headers (a trailers-only gRPC response
    /// carries its `grpc-status` here; otherwise it is not looked up).
    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) {
        self.follow_reload();
        self.report_app_utilization(host, HeaderMap::Response);
        let Some(key) = self.tracked else {
            return;
        };
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            return;
        };
        let vm = &mut *vm;
        if !self.grpc {
            // gRPC's outcome is its grpc-status; the HTTP status is read at the end only when
            // there is none (one host call fewer per stream).
            self.http_status = host
                .header(HeaderMap::Response, ":status")
                .ok()
                .flatten()
                .and_then(|s| parse_number(&s));
        }
        if end_of_stream {
            if let Ok(Some(s)) = host.header(HeaderMap::Response, "grpc-status") {
                self.grpc_status = parse_number(&s);
            }
        }
        let now = if !self.unary_route || uses_orca(vm) {
            host.now().unwrap_or(0)
        } else {
            self.started // not timed: the stream's start stands in (first seen of an endpoint)
        };
        self.upstream_unread = self.unary_route
            && (vm.router.streams().get(self.id)).is_some_and(|s| s.endpoint.is_some());
        if !self.upstream_unread {
            if let Some(cross) = follow_upstream(host, vm, now, self.id) {
                self.cross_zone = cross;
            }
        }
        if uses_orca(vm) {
            on_orca_report(host, vm, HeaderMap::Response, Some(now), self.id);
        }
        if !vm.config().rebalance.allow_reset {
            // From now on only a reset could end it: never move it, and drop a planned move.
            if let Some(ci) = vm.router.set_unmovable(self.id) {
                *vm.stats
                    .rebalance
                    .skipped
                    .entry((ci, SkipReason::Unmovable))
                    .or_default() += 1;
            }
        }
        let first_byte = !std::mem::replace(&mut self.first_byte_seen, true);
        if first_byte && !self.unary_route {
            let micros = now.saturating_sub(self.started) / 1000;
            let r = vm
                .stats
                .sample(host, &vm.router, FIRST_BYTE_US, key, micros);
            if let Err(e) = r {
                vm.host_error(host, "histogram", &e);
            }
        }
        if let Some((name, value)) = &self.debug {
            if let Err(e) = host.set_header(HeaderMap::Response, name, Some(value)) {
                vm.host_error(host, "set debug header", &e);
            }
        }
    }

    /// Reporter role without a configured capacity: the app's own ORCA utilisation is passed
    /// on in the pod's load report.
    fn report_app_utilization(&mut self, host: &dyn Host, map: HeaderMap) {
        if !self.reported {
            return;
        }
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            return;
        };
        if vm
            .config()
            .reporter
            .as_ref()
            .is_none_or(|r| r.capacity > 0.0)
        {
            return;
        }
        if let Some(u) = read_orca(host, map)
            .ok()
            .flatten()
            .and_then(|r| r.utilization())
        {
            let now = host.now().unwrap_or(0);
            vm.reporter.on_app_utilization(now, u);
        }
    }

    pub fn on_response_trailers(&mut self, host: &dyn Host) {
        self.follow_reload();
        self.report_app_utilization(host, HeaderMap::ResponseTrailers);
        if self.tracked.is_none() {
            return;
        }
        if let Ok(Some(s)) = host.header(HeaderMap::ResponseTrailers, "grpc-status") {
            self.grpc_status = parse_number(&s);
        }
        if let Ok(mut vm) = self.vm.try_borrow_mut() {
            if uses_orca(&vm) {
                on_orca_report(host, &mut vm, HeaderMap::ResponseTrailers, None, self.id);
            }
        }
    }

    /// The stream is over (Envoy's `on_log` / `on_done`); idempotent.
    pub fn on_done(&mut self, host: &dyn Host) {
        self.follow_reload();
        if std::mem::take(&mut self.reported) {
            if let Ok(mut vm) = self.vm.try_borrow_mut() {
                vm.reporter.on_close();
            }
        }
        let Some((ci, ri)) = self.tracked else {
            return;
        };
        if self.ended {
            return;
        }
        self.ended = true;
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            return;
        };
        let vm = &mut *vm;
        let now = host.now().unwrap_or(0);
        if !self.moved && self.grpc_status.is_none() && self.http_status.is_none() {
            // A gRPC stream that ended without a grpc-status (reset, or not a gRPC answer).
            self.http_status = response_code(host);
        }
        let outcome = if self.moved {
            penalty::Outcome::Cancelled // we ended it: not the endpoint's fault
        } else {
            penalty::classify(self.http_status, self.grpc_status)
        };
        if std::mem::take(&mut self.upstream_unread) && outcome == penalty::Outcome::Failed {
            follow_upstream(host, vm, now, self.id);
        }
        vm.router.on_end(now, self.id, outcome);
        let class = if self.moved {
            StatusClass::Moved // a planned move, not an error
        } else {
            StatusClass::of(self.http_status, self.grpc_status)
        };
        let stats = vm.stats.route(ci, ri);
        stats.active_delta -= 1;
        *stats.ended.entry(class).or_default() += 1;
        let micros = now.saturating_sub(self.started) / 1000;
        // Disjoint: a unary exchange's time is its latency, a stream's its duration.
        let unary = !self.grpc || (self.up.messages() <= 1 && self.down.messages() <= 1);
        let histogram = if unary {
            REQUEST_LATENCY_US
        } else {
            DURATION_US
        };
        let result = vm
            .stats
            .sample(host, &vm.router, histogram, (ci, ri), micros);
        if let Err(e) = result {
            vm.host_error(host, "histogram", &e);
        }
    }
}

/// The stream's real upstream (`upstream.address`), its load moved there if it is not the pod
/// named; whether it is in another zone.
fn follow_upstream(host: &dyn Host, vm: &mut Vm, now: Nanos, id: u64) -> Option<bool> {
    match string_property(host, &["upstream", "address"]) {
        Ok(Some(address)) => {
            // The zone property is read only for an endpoint discovery has no zone for.
            let zone = || {
                string_property(host, &["upstream", "locality", "zone"])
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            };
            vm.router.on_upstream(now, id, &address, zone)
        }
        Ok(None) => None,
        Err(e) => {
            vm.host_error(host, "get_property (upstream)", &e);
            None
        }
    }
}

/// The request headers, in one host call. If that fails (logged and counted), the few this
/// filter reads, one call each.
fn request_headers(host: &dyn Host, vm: &mut Vm) -> HeaderPairs {
    match host.headers(HeaderMap::Request) {
        Ok(headers) => headers,
        Err(e) => {
            vm.host_error(host, "get request headers", &e);
            let cfg = vm.config();
            let names = [
                cfg.endpoint_header.as_str(),
                "content-type",
                cfg.rate_memory.header.as_str(),
                ":path",
                ":method",
                PROBE_HEADER,
            ];
            let found: Vec<(&str, Vec<u8>)> = names
                .into_iter()
                .filter(|n| !n.is_empty())
                .filter_map(|n| Some((n, host.header(HeaderMap::Request, n).ok()??)))
                .collect();
            HeaderPairs::encode(found.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())))
        }
    }
}

/// A client must never choose its own pod: remove whatever it sent, always.
fn strip_endpoint_header(host: &dyn Host, vm: &mut Vm, headers: &HeaderPairs) {
    let header = &vm.config().endpoint_header;
    if headers.get(header).is_none() {
        return;
    }
    let result = host.set_header(HeaderMap::Request, header, None);
    vm.stats.health.endpoint_headers_stripped += 1;
    if let Err(e) = result {
        vm.host_error(host, "remove endpoint header", &e);
    }
}

/// The HTTP status of the response sent downstream (`response.code`, an 8-byte integer).
fn response_code(host: &dyn Host) -> Option<u32> {
    let bytes = host.property(&["response", "code"]).ok()??;
    let word: [u8; 8] = bytes.as_slice().try_into().ok()?;
    u32::try_from(i64::from_le_bytes(word)).ok()
}

/// The ORCA report in `map`: the text header, else the binary one gRPC servers send. `Ok(None)`
/// when neither is there; `Err((header, reason))` when the value is not a valid report.
fn read_orca(
    host: &dyn Host,
    map: HeaderMap,
) -> Result<Option<OrcaReport>, (&'static str, String)> {
    type Parse = fn(&str) -> Result<OrcaReport, OrcaError>;
    let (name, value, parse): (_, _, Parse) = if let Ok(Some(v)) = host.header(map, ORCA_HEADER) {
        (ORCA_HEADER, v, orca::parse)
    } else if let Ok(Some(v)) = host.header(map, ORCA_BIN_HEADER) {
        (ORCA_BIN_HEADER, v, orca::parse_bin)
    } else {
        return Ok(None);
    };
    std::str::from_utf8(&value)
        .map_err(|_| "not UTF-8".to_string())
        .and_then(|v| parse(v).map_err(|e| e.to_string()))
        .map(Some)
        .map_err(|e| (name, e))
}

/// Upstream ORCA reports steer placement only with `load.orca_weight > 0`: otherwise their
/// headers are not even looked up (two host calls in response headers, two in trailers).
fn uses_orca(vm: &Vm) -> bool {
    vm.config().load.orca_weight > 0.0
}

/// An upstream's ORCA report: applied when valid, else counted and logged once (a backend can
/// send any bytes). `now` is read from the host only when there is a report (`None`).
fn on_orca_report(host: &dyn Host, vm: &mut Vm, map: HeaderMap, now: Option<Nanos>, id: u64) {
    match read_orca(host, map) {
        Ok(Some(report)) => {
            let now = now.unwrap_or_else(|| host.now().unwrap_or(0));
            vm.router.on_orca(now, id, &report);
        }
        Ok(None) => {}
        Err((name, e)) => {
            vm.stats.health.orca_invalid += 1;
            vm.log_once(
                host,
                "orca",
                &format!("streamlb: invalid {name} from an upstream, ignored: {e}"),
            );
        }
    }
}

/// The stream's source for the rate memory: the configured header's value, else (if allowed)
/// the downstream IP; with its remembered rate when the shared memory has one.
fn source_of(host: &dyn Host, vm: &mut Vm, now: Nanos, headers: &HeaderPairs) -> Option<Source> {
    let cfg = &vm.config().rate_memory;
    if cfg.header.is_empty() {
        return None;
    }
    // Any bytes: a non-UTF-8 id is hashed as it is.
    let key = match headers.get(&cfg.header) {
        Some(v) if !v.is_empty() => v.to_vec(),
        _ if cfg.fallback_to_source_ip => {
            let address = string_property(host, &["source", "address"])
                .ok()
                .flatten()?;
            match address.rsplit_once(':') {
                Some((ip, _port)) => ip.as_bytes().to_vec(),
                None => address.into_bytes(),
            }
        }
        _ => return None,
    };
    let hash = rate_memory::key_hash(&vm.rate_secret, &key);
    let buckets = rate_memory::bucket_count(cfg.capacity);
    let max_age = (cfg.max_age_ms / 1000).min(u64::from(u32::MAX)) as u32;
    let shared_key = rate_memory::shared_key(rate_memory::bucket_of(hash, buckets));
    let now = rate_memory::seconds(now);
    let remembered = match host.shared_get(&shared_key) {
        Ok((Some(bytes), _)) => Bucket::decode(&bytes).get(hash, now, max_age),
        Ok((None, _)) => None,
        Err(e) => {
            vm.host_error(host, "get_shared_data (rate memory)", &e);
            None
        }
    };
    Some(Source {
        key: hash,
        rate: remembered.map(|r| r.rate),
        to: remembered.and_then(|r| r.to),
    })
}
