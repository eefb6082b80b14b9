//! The glue under a mock host: configuration, discovery lease and snapshot, steering, counting,
//! host failures. Hostile input in [`input`], the fleet view in [`fleet`].

mod fleet;
mod input;

use std::cell::RefCell;
use std::rc::Rc;

use crate::filter::host::{Body, HeaderMap, LogLevel};
use crate::filter::mock::{MockHost, SharedStore};
use crate::filter::shared::{LEASE_KEY, LOAD_KEY, SNAPSHOT_KEY};
use crate::filter::stream::{BodyAction, StreamFilter, REBALANCE_MESSAGE};
use crate::filter::vm::Vm;
use streamlb_core::router::UNARY_ROUTE_STREAK;
use streamlb_core::streams::Direction;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

pub(crate) const SEC: u64 = 1_000_000_000;
pub(crate) const HEADER: &str = "x-gateway-destination-endpoint";

pub(crate) const ADMIN: &str = r#"{"cluster_statuses":[
 {"name":"unrelated","host_statuses":[{"address":{"socket_address":{"address":"10.9.9.9","port_value":1}}}]},
 {"name":"pods","added_via_api":false,"host_statuses":[
  {"address":{"socket_address":{"address":"10.0.0.1","port_value":8080}},"locality":{"zone":"a"},
   "health_status":{"eds_health_status":"HEALTHY"},"weight":1,"stats":[{"name":"rq_active","type":"GAUGE"}]},
  {"address":{"socket_address":{"address":"10.0.0.2","port_value":8080}},"locality":{"zone":"a"},
   "health_status":{"eds_health_status":"HEALTHY","failed_active_health_check":true},"weight":1},
  {"address":{"socket_address":{"address":"10.0.0.3","port_value":8080}},"locality":{"zone":"b"},
   "health_status":{"eds_health_status":"HEALTHY"},"weight":1}]}]}"#;

pub(crate) fn host(store: &SharedStore) -> MockHost {
    let h = MockHost::with_store(store.clone());
    h.set_property("xds.node.locality.zone", "a");
    h.set_property("xds.route_name", "telemetry");
    h.set_property("xds.cluster_name", "pods");
    h.time.set(10 * SEC);
    h
}

pub(crate) fn vm(h: &MockHost, config: &str) -> Rc<RefCell<Vm>> {
    Rc::new(RefCell::new(Vm::configure(h, config.as_bytes()).unwrap()))
}

/// Tick until this VM's discovery call is answered with `ADMIN`.
pub(crate) fn discover(h: &MockHost, vm: &Rc<RefCell<Vm>>) {
    vm.borrow_mut().on_tick(h);
    let (token, cluster, headers) = h.calls.borrow().last().cloned().expect("a discovery call");
    assert_eq!(cluster, "streamlb_admin");
    assert!(headers.contains(&(
        ":path".into(),
        "/clusters?format=json&filter=%5E%28pods%29%24".into()
    )));
    vm.borrow_mut()
        .on_http_call_response(h, token, Some(b"200"), Some(ADMIN.as_bytes()));
}

#[test]
fn invalid_config_names_the_field() {
    let h = host(&SharedStore::default());
    let err = Vm::configure(
        &h,
        br#"{"clusters":["pods"],"zone":{"spill_threshold":1.7}}"#,
    )
    .err()
    .unwrap();
    assert_eq!(err, "zone.spill_threshold: must be in [0, 1], got 1.7");
    let ok = Vm::configure(&h, br#"{"clusters":["pods"]}"#).unwrap();
    assert_eq!(ok.router.local_zone(), "a"); // from the node locality
}

#[test]
fn one_vm_polls_and_every_vm_gets_the_snapshot() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    let (v1, v2) = (
        vm(&h1, r#"{"clusters":["pods"]}"#),
        vm(&h2, r#"{"clusters":["pods"]}"#),
    );
    assert_ne!(v1.borrow().id, v2.borrow().id);
    discover(&h1, &v1);
    v2.borrow_mut().on_tick(&h2);
    assert!(
        h2.calls.borrow().is_empty(),
        "the second VM must not poll while the lease is held"
    );
    assert!(store.borrow().contains_key(LEASE_KEY) && store.borrow().contains_key(SNAPSHOT_KEY));
    let v2 = v2.borrow();
    let pods = &v2.router.clusters()[0];
    assert_eq!(pods.endpoints.len(), 3); // `unrelated` not parsed in
    assert!(pods
        .endpoint(pods.index_of("10.0.0.1:8080").unwrap())
        .unwrap()
        .eligible());
    assert!(!pods
        .endpoint(pods.index_of("10.0.0.2:8080").unwrap())
        .unwrap()
        .eligible());
}

#[test]
fn lease_moves_when_the_holder_stops() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    let (v1, v2) = (
        vm(&h1, r#"{"clusters":["pods"]}"#),
        vm(&h2, r#"{"clusters":["pods"]}"#),
    );
    discover(&h1, &v1);
    h2.time.set(10 * SEC + 3 * 2 * SEC + 1); // past 3 poll periods
    v2.borrow_mut().on_tick(&h2);
    let calls = h2.calls.borrow();
    let admin = calls.iter().filter(|(_, c, _)| c == "streamlb_admin");
    assert_eq!(admin.count(), 1);
}

#[test]
fn workers_learn_how_many_others_place_streams_from_the_shared_view() {
    let store = SharedStore::default();
    let hosts: Vec<MockHost> = (0..3).map(|_| host(&store)).collect();
    let vms: Vec<_> = hosts
        .iter()
        .map(|h| vm(h, r#"{"clusters":["pods"]}"#))
        .collect();
    vms[0].borrow_mut().on_tick(&hosts[0]);
    assert_eq!(vms[0].borrow().router.peers(), 0); // alone in the view so far
    for (h, v) in hosts.iter().zip(&vms) {
        h.time.set(h.time.get() + SEC); // a tick later
        v.borrow_mut().on_tick(h);
    }
    hosts[0].time.set(hosts[0].time.get() + SEC);
    vms[0].borrow_mut().on_tick(&hosts[0]);
    // Three slots: two workers and the main thread's VM, which places nothing.
    assert_eq!(vms[0].borrow().router.peers(), 1);
}

#[test]
fn steers_to_healthy_endpoints_and_strips_client_header() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(
        &h,
        r#"{"clusters":["pods"],"debug_header":"x-streamlb-decision"}"#,
    );
    discover(&h, &v);
    for id in 0..50 {
        h.headers.borrow_mut().clear();
        h.set_request_header(HEADER, "10.0.0.2:8080"); // a client trying to pick its pod
        h.set_request_header("content-type", "application/grpc");
        let mut s = StreamFilter::new(v.clone(), id);
        s.on_request_headers(&h);
        let named = h.get(HeaderMap::Request, HEADER).unwrap();
        let first = named.split(',').next().unwrap();
        assert!(
            first == "10.0.0.1:8080" || first == "10.0.0.3:8080",
            "{named}"
        );
        assert!(
            !named.contains("10.0.0.2"),
            "unhealthy endpoint named: {named}"
        );
        s.on_response_headers(&h, false);
        let debug = h.get(HeaderMap::Response, "x-streamlb-decision").unwrap();
        assert!(debug.contains(&format!("endpoint={first}")), "{debug}");
    }
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric("streamlb_endpoint_header_stripped_total"), 50);
    let local = h.metric("streamlb_decisions_total.cluster=.=pods;.;reason=.=local;.;");
    let spill = h.metric("streamlb_decisions_total.cluster=.=pods;.;reason=.=spill;.;");
    assert_eq!(local + spill, 50);
    assert!(local > 0);
}

#[test]
fn uncovered_traffic_passes_untouched_and_shadow_never_sets_the_header() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["other"]}"#);
    h.host_calls.borrow_mut().clear();
    let mut s = StreamFilter::new(v, 1);
    s.on_request_headers(&h);
    s.on_request_body(&h, 10);
    s.on_response_headers(&h, false);
    s.on_done(&h);
    assert!(!s.is_tracked());
    assert_eq!(h.get(HeaderMap::Request, HEADER), None);
    // Another cluster's stream costs two host calls: the header map and the cluster name.
    let calls: usize = h.host_calls.borrow().values().sum();
    assert_eq!(calls, 2, "{:?}", h.host_calls.borrow());

    let v = vm(&h, r#"{"clusters":["pods"],"mode":"shadow"}"#);
    discover(&h, &v);
    h.set_request_header(HEADER, "10.0.0.3:8080");
    let mut s = StreamFilter::new(v.clone(), 2);
    s.on_request_headers(&h);
    assert!(s.is_tracked());
    assert_eq!(h.get(HeaderMap::Request, HEADER), None); // stripped, not set
    v.borrow_mut().flush(&h);
    assert_eq!(
        h.metric("streamlb_decisions_total.cluster=.=pods;.;reason=.=local;.;"),
        1
    );
}

pub(crate) fn grpc_frames(sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for &n in sizes {
        out.push(0);
        out.extend_from_slice(&(n as u32).to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, n));
    }
    out
}

#[test]
fn counts_grpc_messages_across_chunks_without_reading_pure_payload() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"]}"#);
    discover(&h, &v);
    h.set_request_header("content-type", "application/grpc");
    let mut s = StreamFilter::new(v.clone(), 7);
    s.on_request_headers(&h);
    // 3 small messages, then one of 100 KB over 16 KB chunks.
    let stream = grpc_frames(&[10, 20, 0, 100_000, 5]);
    let chunks: Vec<&[u8]> = stream.chunks(16_384).collect();
    for c in &chunks {
        h.bodies.borrow_mut().insert(Body::Request, c.to_vec());
        s.on_request_body(&h, c.len());
    }
    // Chunk 1: the first prefix, then the rest (more messages start in it); chunks 2..6 hold
    // only payload of the big message: never read; the last: the 5-byte message's prefix only.
    assert_eq!(h.body_reads.get(), 3, "body reads");
    h.set_property("upstream.address", "10.0.0.3:8080");
    h.set_property("upstream.locality.zone", "b");
    s.on_response_headers(&h, false);
    h.time.set(11 * SEC);
    v.borrow_mut().on_tick(&h);
    let tags = "route=.=telemetry;.;cluster=.=pods;.;direction=.=upstream;.;";
    assert_eq!(
        h.metric(&format!("streamlb_route_messages_total.{tags}")),
        5
    );
    assert_eq!(
        h.metric(&format!("streamlb_route_bytes_total.{tags}")),
        stream.len() as i64
    );
    let active = "streamlb_route_streams_active.route=.=telemetry;.;cluster=.=pods;.;";
    assert_eq!(h.metric(active), 1);
    // The load view in shared data carries this stream on the real upstream.
    assert!(store.borrow().get(LOAD_KEY).is_some());
    s.on_done(&h);
    s.on_done(&h); // idempotent
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric(active), 0);
}

#[test]
fn host_failures_are_counted_logged_once_and_never_panic() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"]}"#);
    discover(&h, &v);
    h.failing.borrow_mut().insert("property");
    for id in 0..3 {
        let mut s = StreamFilter::new(v.clone(), id);
        s.on_request_headers(&h);
        assert!(!s.is_tracked());
    }
    h.failing.borrow_mut().clear();
    for m in [
        "shared_get",
        "shared_set",
        "http_call",
        "set_header",
        "header",
        "body",
        "now",
    ] {
        h.failing.borrow_mut().insert(m);
    }
    let mut s = StreamFilter::new(v.clone(), 9);
    s.on_request_headers(&h);
    s.on_request_body(&h, 100);
    s.on_response_headers(&h, false);
    s.on_done(&h);
    v.borrow_mut().on_tick(&h);
    h.failing.borrow_mut().clear();
    v.borrow_mut().flush(&h);
    assert!(h.metric("streamlb_host_errors_total") >= 3);
    let warnings = h
        .logs
        .borrow()
        .iter()
        .filter(|(l, m)| *l == LogLevel::Warn && m.contains("get_property (xds)"))
        .count();
    assert_eq!(warnings, 1);
}

#[test]
fn ten_thousand_route_names_make_at_most_cap_plus_one_series() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"],"max_routes":16}"#);
    discover(&h, &v);
    for id in 0..10_000u64 {
        h.set_property("xds.route_name", &format!("route-{id}"));
        let mut s = StreamFilter::new(v.clone(), id);
        s.on_request_headers(&h);
        s.on_done(&h);
    }
    v.borrow_mut().flush(&h);
    let routes: hashbrown::HashSet<String> = h
        .metric_names
        .borrow()
        .values()
        .filter(|(_, n)| n.starts_with("streamlb_route_streams_total."))
        .map(|(_, n)| n.split(";.;").next().unwrap().to_string())
        .collect();
    assert_eq!(routes.len(), 17, "{routes:?}");
    assert!(routes.contains("streamlb_route_streams_total.route=.=other"));
    let total: i64 = h
        .metric_names
        .borrow()
        .iter()
        .filter(|(_, (_, n))| n.starts_with("streamlb_route_streams_total."))
        .map(|(id, _)| h.metric_values.borrow().get(id).copied().unwrap_or(0))
        .sum();
    assert_eq!(total, 10_000); // folded, not dropped
}

#[test]
fn stream_end_records_status_class_latency_and_cross_zone_messages() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"],"local_zone":"a"}"#);
    discover(&h, &v);
    h.set_request_header("content-type", "application/grpc");
    let mut s = StreamFilter::new(v.clone(), 1);
    s.on_request_headers(&h);
    h.time.set(10 * SEC + 3_000_000); // 3 ms to first byte
    h.set_property("upstream.address", "10.0.0.3:8080");
    h.set_property("upstream.locality.zone", "b");
    h.headers
        .borrow_mut()
        .insert((HeaderMap::Response, ":status".into()), "200".into());
    s.on_response_headers(&h, false);
    let frames = grpc_frames(&[8, 8]);
    h.bodies.borrow_mut().insert(Body::Request, frames.clone());
    s.on_request_body(&h, frames.len());
    h.headers.borrow_mut().insert(
        (HeaderMap::ResponseTrailers, "grpc-status".into()),
        "14".into(),
    );
    s.on_response_trailers(&h);
    h.time.set(12 * SEC);
    s.on_done(&h);
    v.borrow_mut().flush(&h);
    let rc = "route=.=telemetry;.;cluster=.=pods;.;";
    assert_eq!(
        h.metric(&format!(
            "streamlb_route_streams_ended_total.{rc}status_class=.=server_error;.;"
        )),
        1
    );
    assert_eq!(
        h.metric("streamlb_cross_zone_messages_total.cluster=.=pods;.;"),
        2
    );
    assert_eq!(
        h.metric(&format!("streamlb_route_first_byte_us.{rc}")),
        3_000
    );
    assert_eq!(
        h.metric(&format!("streamlb_route_duration_us.{rc}")),
        2_000_000
    );
    // Two messages up: a stream, not a unary call.
    assert_eq!(
        h.metric(&format!("streamlb_route_request_latency_us.{rc}")),
        0
    );
    // UNAVAILABLE penalises the endpoint.
    let vm = v.borrow();
    let c = &vm.router.clusters()[0];
    assert!(
        c.endpoint(c.index_of("10.0.0.3:8080").unwrap())
            .unwrap()
            .capacity
            < 1.0
    );
}

/// Open a gRPC stream `id` that lands on `upstream`, optionally with a device id.
pub(crate) fn open_on(
    h: &MockHost,
    v: &Rc<RefCell<Vm>>,
    id: u64,
    upstream: &str,
    device: Option<&str>,
) -> StreamFilter {
    h.headers.borrow_mut().clear();
    h.set_request_header("content-type", "application/grpc");
    if let Some(d) = device {
        h.set_request_header("x-device-id", d);
    }
    let mut s = StreamFilter::new(v.clone(), id);
    s.on_request_headers(h);
    h.set_property("upstream.address", upstream);
    h.set_property("upstream.locality.zone", "a");
    v.borrow_mut()
        .router
        .on_upstream(h.time.get(), id, upstream, || "a".to_string());
    s
}

pub(crate) fn send(h: &MockHost, s: &mut StreamFilter, frames: &[u8]) -> BodyAction {
    h.bodies.borrow_mut().insert(Body::Request, frames.to_vec());
    s.on_request_body(h, frames.len())
}

#[test]
fn rebalancer_ends_planned_streams_only_at_message_boundaries() {
    let store = SharedStore::default();
    let h = host(&store);
    let config = r#"{"clusters":["pods"],"local_zone":"a","debug_header":"x-d",
        "rebalance":{"mode":"on","min_age_ms":0,"max_moves_per_tick":10,"max_share_per_minute":1.0}}"#;
    let v = vm(&h, config);
    discover(&h, &v);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h, &v, id, "10.0.0.1:8080", None))
        .collect();
    // Stream 5's response has started: without allow_reset it must never be moved.
    streams[5].on_response_headers(&h, false);
    let frame = grpc_frames(&[30]);
    for t in 1..=5 {
        for s in streams.iter_mut() {
            if t > 1 {
                assert_eq!(send(&h, s, &frame[10..]), BodyAction::Continue);
            }
            for _ in 0..10 {
                assert_eq!(send(&h, s, &frame), BodyAction::Continue);
            }
            // Every stream is in the middle of a message when the tick comes.
            assert_eq!(send(&h, s, &frame[..10]), BodyAction::Continue);
        }
        h.time.set(10 * SEC + t * SEC);
        v.borrow_mut().on_tick(&h);
        if (0..6).any(|id| v.borrow().router.move_planned(id)) {
            break;
        }
    }
    let planned: Vec<u64> = (0..6)
        .filter(|&id| v.borrow().router.move_planned(id))
        .collect();
    assert!(!planned.is_empty(), "a hot endpoint must shed streams");
    assert!(!planned.contains(&5));
    let id = planned[0] as usize;
    // The rest of the half-sent message goes through: the pod never sees a truncated message.
    assert_eq!(
        send(&h, &mut streams[id], &frame[10..]),
        BodyAction::Continue
    );
    assert!(h.ended_streams.borrow().is_empty());
    // Now at a boundary: the next frame ends it with UNAVAILABLE.
    assert_eq!(send(&h, &mut streams[id], &frame), BodyAction::Ended);
    assert_eq!(
        h.ended_streams.borrow().as_slice(),
        [REBALANCE_MESSAGE.to_string()]
    );
    streams[id].on_done(&h);
    v.borrow_mut().flush(&h);
    assert_eq!(
        h.metric("streamlb_rebalance_moves_total.cluster=.=pods;.;reason=.=unavailable;.;"),
        1
    );
    assert!(h.metric("streamlb_rebalance_moves_total.cluster=.=pods;.;reason=.=planned;.;") >= 1);
    assert!(h.logged("streamlb: rebalance: stream"));
    // Counted as moved, not as an error.
    let ended =
        "streamlb_route_streams_ended_total.route=.=telemetry;.;cluster=.=pods;.;status_class=.=";
    assert_eq!(h.metric(&format!("{ended}moved;.;")), 1);
    assert_eq!(h.metric(&format!("{ended}server_error;.;")), 0);
    // Ending it was not the endpoint's fault.
    let vm = v.borrow();
    let c = &vm.router.clusters()[0];
    assert_eq!(
        c.endpoint(c.index_of("10.0.0.1:8080").unwrap())
            .unwrap()
            .capacity,
        1.0
    );
}

#[test]
fn shadow_rebalancing_reports_but_never_ends_a_stream() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(
        &h,
        r#"{"clusters":["pods"],"rebalance":{"min_age_ms":0,"max_share_per_minute":1.0}}"#,
    );
    discover(&h, &v);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h, &v, id, "10.0.0.1:8080", None))
        .collect();
    let frame = grpc_frames(&[30]);
    for t in 1..=5 {
        for s in streams.iter_mut() {
            for _ in 0..10 {
                assert_eq!(send(&h, s, &frame), BodyAction::Continue);
            }
        }
        h.time.set(10 * SEC + t * SEC);
        v.borrow_mut().on_tick(&h);
    }
    assert!(h.ended_streams.borrow().is_empty());
    assert!(h.metric("streamlb_rebalance_moves_total.cluster=.=pods;.;reason=.=planned;.;") >= 1);
    assert!(h.logged("streamlb: rebalance (shadow)"));
    // The pods span zones a and b: zone moves are counted from 0 before any.
    v.borrow_mut().flush(&h);
    for reason in ["home", "spread"] {
        let name =
            format!("streamlb_rebalance_zone_moves_total.cluster=.=pods;.;reason=.={reason};.;");
        assert!(h.defined(&name), "{name}");
    }
}

#[test]
fn a_reconnecting_device_is_placed_with_its_remembered_rate() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    // Remembered rates are capped at 20 × the route mean, here (nothing learned yet on the
    // second worker) 20 × default_stream_rate.
    let config = r#"{"clusters":["pods"],"debug_header":"x-d","rebalance":{"mode":"off"},
        "load":{"default_stream_rate":3}}"#;
    let (v1, v2) = (vm(&h1, config), vm(&h2, config));
    discover(&h1, &v1);
    v2.borrow_mut().on_tick(&h2);
    v1.borrow_mut().on_tick(&h1);
    let mut s = open_on(&h1, &v1, 1, "10.0.0.1:8080", Some("meter-42"));
    let frame = grpc_frames(&[30]);
    for t in 1..=4 {
        for _ in 0..40 {
            send(&h1, &mut s, &frame);
        }
        h1.time.set(10 * SEC + t * SEC);
        v1.borrow_mut().on_tick(&h1);
    }
    s.on_done(&h1);
    h1.time.set(h1.time.get() + SEC);
    v1.borrow_mut().on_tick(&h1); // writes the rate to shared data
                                  // The device reconnects through the other worker.
    h2.time.set(h1.time.get());
    h2.headers.borrow_mut().clear();
    h2.set_request_header("x-device-id", "meter-42");
    let mut again = StreamFilter::new(v2.clone(), 2);
    again.on_request_headers(&h2);
    again.on_response_headers(&h2, false);
    let debug = h2.get(HeaderMap::Response, "x-d").unwrap();
    let expected: f64 = debug.split("expected=").nth(1).unwrap().parse().unwrap();
    assert!((expected - 40.0).abs() < 2.0, "{debug}");
    // An unknown device gets the learned mean, not 40.
    h2.headers.borrow_mut().clear();
    h2.set_request_header("x-device-id", "meter-43");
    let mut other = StreamFilter::new(v2.clone(), 3);
    other.on_request_headers(&h2);
    other.on_response_headers(&h2, false);
    let debug = h2.get(HeaderMap::Response, "x-d").unwrap();
    assert!(debug.ends_with("expected=3.000"), "{debug}");
}

/// Ten messages per stream and second, then a tick, for `ticks` seconds from `from` (seconds
/// after 10 s); stops after a tick that planned a move (in `on` mode the next frame would end
/// the stream). Returns the ticks run.
fn run_hot(
    h: &MockHost,
    v: &Rc<RefCell<Vm>>,
    streams: &mut [StreamFilter],
    from: u64,
    ticks: u64,
) -> u64 {
    let frame = grpc_frames(&[30]);
    for t in from..from + ticks {
        for s in streams.iter_mut() {
            for _ in 0..10 {
                assert_eq!(send(h, s, &frame), BodyAction::Continue);
            }
        }
        h.time.set(10 * SEC + t * SEC);
        v.borrow_mut().on_tick(h);
        let vm = v.borrow();
        if vm.router.streams().iter().any(|(_, s)| s.move_planned) {
            return t - from + 1;
        }
    }
    ticks
}

fn metric_of(h: &MockHost, name: &str, reason: &str) -> i64 {
    h.metric(&format!("{name}.cluster=.=pods;.;reason=.={reason};.;"))
}

/// Envoy with `--concurrency 8` runs 9 ticking VMs (8 workers and the main thread). However
/// many there are, the proxy's churn budget holds: per tick window, per minute.
#[test]
fn the_churn_budget_is_per_proxy_whatever_the_worker_count() {
    let store = SharedStore::default();
    let config = r#"{"clusters":["pods"],"local_zone":"a","tick_ms":1000,
        "rebalance":{"mode":"on","allow_reset":true,"min_age_ms":0,"max_moves_per_tick":1,
                     "max_moves_per_minute":3,"max_share_per_minute":1.0}}"#;
    let hosts: Vec<MockHost> = (0..9).map(|_| host(&store)).collect();
    let vms: Vec<_> = hosts.iter().map(|h| vm(h, config)).collect();
    discover(&hosts[0], &vms[0]);
    // Eight workers with six hot streams each (the main thread's VM has none).
    let mut streams: Vec<Vec<StreamFilter>> = (0..8)
        .map(|w| {
            (0..6)
                .map(|i| {
                    open_on(
                        &hosts[w],
                        &vms[w],
                        100 * w as u64 + i,
                        "10.0.0.1:8080",
                        None,
                    )
                })
                .collect()
        })
        .collect();
    let mut planned_per_tick = Vec::new();
    for t in 1..=30 {
        let before: i64 = (0..9)
            .map(|w| {
                vms[w].borrow_mut().flush(&hosts[w]);
                metric_of(&hosts[w], "streamlb_rebalance_moves_total", "planned")
            })
            .sum();
        // The VMs tick in turn within the same second, as Envoy's timers do.
        for w in 0..9 {
            if let Some(ss) = streams.get_mut(w) {
                let frame = grpc_frames(&[30]);
                for s in ss.iter_mut() {
                    for _ in 0..10 {
                        send(&hosts[w], s, &frame);
                    }
                }
            }
            hosts[w].time.set(10 * SEC + t * SEC + w as u64 * 1_000_000);
            vms[w].borrow_mut().on_tick(&hosts[w]);
        }
        let after: i64 = (0..9)
            .map(|w| {
                vms[w].borrow_mut().flush(&hosts[w]);
                metric_of(&hosts[w], "streamlb_rebalance_moves_total", "planned")
            })
            .sum();
        planned_per_tick.push(after - before);
    }
    let total: i64 = planned_per_tick.iter().sum();
    let skipped: i64 = (0..9)
        .map(|w| metric_of(&hosts[w], "streamlb_rebalance_skipped_total", "budget"))
        .sum();
    assert!(
        planned_per_tick.iter().all(|&n| n <= 1),
        "{planned_per_tick:?}"
    );
    assert_eq!(total, 3, "{planned_per_tick:?}"); // 30 s: one minute's budget
    assert!(
        skipped > 0,
        "the skew must want more moves than the budget allows"
    );
}

#[test]
fn a_move_planned_before_the_response_started_is_not_a_reset() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(
        &h,
        r#"{"clusters":["pods"],"local_zone":"a","rebalance":{"mode":"on","min_age_ms":0,
            "max_moves_per_tick":10,"max_share_per_minute":1.0}}"#,
    );
    discover(&h, &v);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h, &v, id, "10.0.0.1:8080", None))
        .collect();
    run_hot(&h, &v, &mut streams, 1, 3);
    let planned: Vec<usize> = (0..6)
        .filter(|&id| v.borrow().router.move_planned(id as u64))
        .collect();
    assert!(!planned.is_empty());
    // The response starts before the stream's next request frame: ending it now would be a
    // reset, which allow_reset (false) forbids.
    for &id in &planned {
        streams[id].on_response_headers(&h, false);
        assert_eq!(
            send(&h, &mut streams[id], &grpc_frames(&[30])),
            BodyAction::Continue
        );
        assert!(!v.borrow().router.move_planned(id as u64));
    }
    assert!(h.ended_streams.borrow().is_empty());
    v.borrow_mut().flush(&h);
    let unmovable = metric_of(&h, "streamlb_rebalance_skipped_total", "unmovable");
    assert_eq!(unmovable, planned.len() as i64);
    assert_eq!(metric_of(&h, "streamlb_rebalance_moves_total", "reset"), 0);
}

/// Reads this VM's excess-before gauge as it was last flushed.
fn excess_before(h: &MockHost) -> i64 {
    h.metric("streamlb_rebalance_excess_before_permille.cluster=.=pods;.;")
}

#[test]
fn shadow_excess_stays_while_the_skew_stays() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(
        &h,
        r#"{"clusters":["pods"],"local_zone":"a","rebalance":{"mode":"shadow","min_age_ms":0,
            "max_share_per_minute":1.0,"max_moves_per_minute":100}}"#,
    );
    discover(&h, &v);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h, &v, id, "10.0.0.1:8080", None))
        .collect();
    run_hot(&h, &v, &mut streams, 1, 4);
    let mut gauges = Vec::new();
    for t in 5..15 {
        run_hot(&h, &v, &mut streams, t, 1);
        gauges.push(excess_before(&h));
    }
    assert!(
        gauges.iter().all(|&g| g > 300),
        "excess before, per tick: {gauges:?}"
    );
    // Planned in shadow mode means "would move", within the budget: here 100 % of 6 streams
    // per minute.
    assert_eq!(
        metric_of(&h, "streamlb_rebalance_moves_total", "planned"),
        6
    );
    assert!(h.ended_streams.borrow().is_empty());
}

#[test]
fn a_planned_move_never_carried_out_is_dropped() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(
        &h,
        r#"{"clusters":["pods"],"local_zone":"a","rebalance":{"mode":"on","min_age_ms":0,
            "max_moves_per_tick":10,"max_share_per_minute":1.0,"max_moves_per_minute":100}}"#,
    );
    discover(&h, &v);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h, &v, id, "10.0.0.1:8080", None))
        .collect();
    run_hot(&h, &v, &mut streams, 1, 3);
    let planned: Vec<usize> = (0..6)
        .filter(|&id| v.borrow().router.move_planned(id as u64))
        .collect();
    assert!(!planned.is_empty());
    let first = excess_before(&h);
    let t0 = h.time.get();
    // The streams keep their rates, but no request frame reaches the filter (counted straight
    // into the router): no boundary comes, no planned move is carried out.
    for t in 1..=5 {
        for id in 0..6 {
            v.borrow_mut()
                .router
                .on_data(id, Direction::Upstream, 10, 300);
        }
        h.time.set(t0 + t * SEC);
        v.borrow_mut().on_tick(&h);
        let dropped = metric_of(&h, "streamlb_rebalance_skipped_total", "expired");
        assert_eq!(
            dropped,
            if t < 5 { 0 } else { planned.len() as i64 },
            "tick {t}"
        );
    }
    assert!(h.ended_streams.borrow().is_empty());
    // The dropped moves count on their endpoint again: the excess is what it was.
    assert!(
        (excess_before(&h) - first).abs() <= 20,
        "{} vs {first}",
        excess_before(&h)
    );
}

/// A configuration reload inside one VM: the new root context's `Vm` takes every stream, the
/// old one stops (no timer, no lease, no moves), and the new configuration governs the old
/// streams from then on.
#[test]
fn a_reload_hands_every_stream_to_the_new_configuration() {
    let store = SharedStore::default();
    let h = host(&store);
    let on = r#"{"clusters":["pods"],"local_zone":"a","rebalance":{"mode":"on","min_age_ms":0,
        "max_moves_per_tick":10,"max_share_per_minute":1.0,"max_moves_per_minute":100}}"#;
    let old = vm(&h, on);
    discover(&h, &old);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h, &old, id, "10.0.0.1:8080", None))
        .collect();
    let before = run_hot(&h, &old, &mut streams, 1, 3);
    assert!((0..6).any(|id| old.borrow().router.move_planned(id)));
    assert!(store
        .borrow()
        .get(LEASE_KEY)
        .is_some_and(|(v, _)| !v.is_empty()));
    // Reload: rebalancing off. The new root context starts in the same VM.
    let new = vm(&h, &on.replace(r#""mode":"on""#, r#""mode":"off""#));
    old.borrow_mut().supersede(new.clone());
    // At once, before any tick: no planned move is carried out.
    for s in streams.iter_mut() {
        assert_eq!(send(&h, s, &grpc_frames(&[30])), BodyAction::Continue);
    }
    // Until the new root context has ticked (Envoy may still reject the update), the old one
    // keeps its streams, but stands down: the lease is released.
    h.time.set(14 * SEC);
    old.borrow_mut().on_tick(&h);
    assert_eq!(old.borrow().router.streams().len(), 6);
    assert!(Rc::ptr_eq(&Vm::newest(old.clone()), &old));
    let holder = |store: &SharedStore| {
        (store.borrow().get(LEASE_KEY)).and_then(|(v, _)| {
            v.get(0..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        })
    };
    assert_eq!(holder(&store), None, "lease released");
    new.borrow_mut().on_tick(&h);
    old.borrow_mut().on_tick(&h);
    assert_eq!(h.tick_period_ms.get(), Some(0), "the old timer stops");
    assert!(old.borrow().router.streams().is_empty());
    assert_eq!(new.borrow().router.streams().len(), 6);
    assert_eq!(holder(&store), Some(new.borrow().id));
    // The streams follow; the new configuration never moves them.
    run_hot(&h, &new, &mut streams, 5, 10);
    assert!(h.ended_streams.borrow().is_empty());
    for s in streams.iter_mut() {
        s.on_done(&h);
    }
    old.borrow_mut().flush(&h);
    new.borrow_mut().flush(&h);
    assert_eq!(
        h.metric("streamlb_route_streams_active.route=.=telemetry;.;cluster=.=pods;.;"),
        0
    );
    let up = h.metric("streamlb_route_messages_total.route=.=telemetry;.;cluster=.=pods;.;direction=.=upstream;.;");
    assert_eq!(up, 6 * (10 * before + 1 + 10 * 10) as i64);
    // New streams on the old root context go to the new configuration.
    assert!(Rc::ptr_eq(&Vm::newest(old.clone()), &new));
}

/// Envoy rejected the listener update after the new root context was configured: it is
/// deleted before it ticks, and the old configuration carries on as before.
#[test]
fn a_rejected_reload_changes_nothing() {
    let store = SharedStore::default();
    let h = host(&store);
    let on = r#"{"clusters":["pods"],"local_zone":"a","rebalance":{"mode":"on","min_age_ms":0,
        "max_moves_per_tick":10,"max_share_per_minute":1.0,"max_moves_per_minute":100}}"#;
    let old = vm(&h, on);
    discover(&h, &old);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h, &old, id, "10.0.0.1:8080", None))
        .collect();
    run_hot(&h, &old, &mut streams, 1, 3);
    let rejected = vm(&h, &on.replace(r#""mode":"on""#, r#""mode":"off""#));
    old.borrow_mut().supersede(rejected.clone());
    rejected.borrow_mut().retire();
    h.time.set(14 * SEC);
    old.borrow_mut().on_tick(&h);
    assert!(Rc::ptr_eq(&Vm::newest(old.clone()), &old));
    assert_eq!(old.borrow().router.streams().len(), 6);
    assert!(rejected.borrow().router.streams().is_empty());
    // Still rebalancing: a planned stream ends at its next boundary.
    let planned: Vec<usize> = (0..6)
        .filter(|&id| old.borrow().router.move_planned(id as u64))
        .collect();
    assert!(!planned.is_empty());
    assert_eq!(
        send(&h, &mut streams[planned[0]], &grpc_frames(&[30])),
        BodyAction::Ended
    );
}

/// The new configuration runs in another VM (e.g. new code): the old one learns of it from
/// shared data and stands down.
#[test]
fn an_outdated_configuration_stands_down() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    let on = r#"{"clusters":["pods"],"local_zone":"a","discovery":{"poll_ms":1000},
        "rebalance":{"mode":"on","min_age_ms":0,"max_moves_per_tick":10,"max_share_per_minute":1.0}}"#;
    let old = vm(&h1, on);
    discover(&h1, &old);
    let mut streams: Vec<StreamFilter> = (0..6)
        .map(|id| open_on(&h1, &old, id, "10.0.0.1:8080", None))
        .collect();
    run_hot(&h1, &old, &mut streams, 1, 3);
    assert!((0..6).any(|id| old.borrow().router.move_planned(id)));
    let polls = h1.calls.borrow().len();
    let new = vm(&h2, &on.replace(r#""mode":"on""#, r#""mode":"off""#));
    h2.time.set(h1.time.get());
    new.borrow_mut().on_tick(&h2); // claims its generation; the old VM still holds the lease
    assert!(h2.calls.borrow().is_empty());
    // At once: the planned moves are not carried out.
    for s in streams.iter_mut() {
        assert_eq!(send(&h1, s, &grpc_frames(&[30])), BodyAction::Continue);
    }
    run_hot(&h1, &old, &mut streams, 4, 10);
    assert_eq!(
        h1.calls.borrow().len(),
        polls,
        "the old configuration polled"
    );
    assert!(h1.ended_streams.borrow().is_empty());
    assert!(h1.logged("stands down"));
    // The old one released the lease: the new one takes it and polls.
    h2.time.set(h1.time.get());
    new.borrow_mut().on_tick(&h2);
    let admin_calls = |h: &MockHost| {
        (h.calls.borrow().iter())
            .filter(|(_, c, _)| c == "streamlb_admin")
            .count()
    };
    assert_eq!(admin_calls(&h2), 1);
    // The same configuration text again is the same generation: nobody stands down.
    let again = vm(&h2, &on.replace(r#""mode":"on""#, r#""mode":"off""#));
    again.borrow_mut().on_tick(&h2);
    new.borrow_mut().on_tick(&h2);
    assert!(!h2.logged("stands down"));
}

#[test]
fn the_rate_memory_key_is_one_secret_per_envoy() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    let (v1, v2) = (
        vm(&h1, r#"{"clusters":["pods"]}"#),
        vm(&h2, r#"{"clusters":["pods"]}"#),
    );
    assert_eq!(v1.borrow().rate_secret, v2.borrow().rate_secret);
    let other_envoy = host(&SharedStore::default());
    let v3 = vm(&other_envoy, r#"{"clusters":["pods"]}"#);
    assert_ne!(v1.borrow().rate_secret, v3.borrow().rate_secret);
}

/// One unary gRPC call `id` to 10.0.0.1 (2 ms long); `status` its `grpc-status`, sent
/// trailers-only (in the response headers, which end the stream) or in trailers after a reply.
fn unary_call(h: &MockHost, v: &Rc<RefCell<Vm>>, id: u64, status: &str, trailers_only: bool) {
    h.headers.borrow_mut().clear();
    h.set_request_header("content-type", "application/grpc");
    h.set_request_header("x-device-id", "meter-1");
    let start = h.time.get();
    let mut s = StreamFilter::new(v.clone(), id);
    s.on_request_headers(h);
    let frames = grpc_frames(&[70]);
    send(h, &mut s, &frames);
    h.set_property("upstream.address", "10.0.0.1:8080");
    h.set_header_bytes(HeaderMap::Response, ":status", b"200");
    if trailers_only {
        h.set_header_bytes(HeaderMap::Response, "grpc-status", status.as_bytes());
        s.on_response_headers(h, true);
    } else {
        s.on_response_headers(h, false);
        h.bodies.borrow_mut().insert(Body::Response, frames.clone());
        s.on_response_body(h, frames.len());
        h.set_header_bytes(
            HeaderMap::ResponseTrailers,
            "grpc-status",
            status.as_bytes(),
        );
        s.on_response_trailers(h);
    }
    h.time.set(start + 2_000_000);
    s.on_done(h);
    s.on_done(h); // Envoy calls both on_log and on_done
}

/// Each host call crosses from wasm into Envoy, and they are most of what a stream's open costs
/// (`bench/cost.py --parts unary`): a unary gRPC call in steer mode with the rate memory on.
#[test]
fn a_unary_call_makes_few_host_calls() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"],"local_zone":"a"}"#);
    discover(&h, &v);
    unary_call(&h, &v, 1, "0", false); // defines the route's histograms
    let calls = |id: u64| {
        h.host_calls.borrow_mut().clear();
        unary_call(&h, &v, id, "0", false);
        let mut by_method: Vec<_> = h.host_calls.take().into_iter().collect();
        by_method.sort();
        let total: usize = by_method.iter().map(|(_, n)| n).sum();
        println!("host calls per unary call: {total} {by_method:?}");
        (total, by_method)
    };
    // Request: the header map (endpoint header to strip, content-type, device id), route and
    // cluster, clock, the device's remembered rate, the endpoint header set; a body read each
    // way; response: clock, upstream address (its zone is known from discovery), first-byte
    // histogram; trailers: grpc-status; end: clock, request-latency histogram.
    let (total, by_method) = calls(2);
    assert_eq!(total, 14, "{by_method:?}");
    for id in 3..3 + u64::from(UNARY_ROUTE_STREAK) {
        unary_call(&h, &v, id, "0", false);
    }
    // On a unary route: no rate-memory read, no clock or first-byte sample at the response,
    // no upstream address (the call succeeded on the pod named).
    let (total, by_method) = calls(100);
    assert_eq!(total, 10, "{by_method:?}");
    let count = |m: &str| {
        by_method
            .iter()
            .find(|(k, _)| *k == m)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(
        (count("shared_get"), count("now"), count("record_metric")),
        (0, 2, 1)
    );
    assert_eq!(count("property"), 2, "cluster and route names only");
    v.borrow_mut().flush(&h);
    let rc = "route=.=telemetry;.;cluster=.=pods;.;";
    assert_eq!(
        h.metric(&format!("streamlb_route_request_latency_us.{rc}")),
        2_000
    );
    assert_eq!(h.metric(&format!("streamlb_route_duration_us.{rc}")), 0);
    let ok = format!("streamlb_route_streams_ended_total.{rc}status_class=.=ok;.;");
    assert_eq!(h.metric(&ok), 3 + i64::from(UNARY_ROUTE_STREAK));
}

/// On a unary route a call's real upstream is read only when the call failed, at its end: the
/// penalty then lands on the pod that failed, not on the pod named (Envoy retried elsewhere).
#[test]
fn a_failed_call_on_a_unary_route_penalises_its_real_upstream() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"],"local_zone":"a"}"#);
    discover(&h, &v);
    for id in 1..=u64::from(UNARY_ROUTE_STREAK) {
        unary_call(&h, &v, id, "0", false);
    }
    let pods = ["10.0.0.1:8080", "10.0.0.2:8080"]; // zone a
    let penalty = |address: &str| {
        let v = v.borrow();
        let c = (v.router.cluster_index("pods")).and_then(|ci| v.router.cluster(ci));
        let c = c.expect("cluster");
        let j = c.index_of(address).expect("endpoint");
        c.endpoint(j)
            .expect("endpoint")
            .penalty
            .value(h.time.get(), 1e9)
    };
    h.headers.borrow_mut().clear();
    h.set_request_header("content-type", "application/grpc");
    let mut s = StreamFilter::new(v.clone(), 1_000);
    s.on_request_headers(&h);
    let named = h.get(HeaderMap::Request, HEADER).expect("named");
    let named = named.split(',').next().expect("primary").to_string();
    let other = *pods.iter().find(|a| **a != named).expect("another pod");
    assert_eq!((penalty(&named), penalty(other)), (0.0, 0.0));
    // Envoy answered from the other pod (a retry), and the call failed.
    h.set_property("upstream.address", other);
    h.set_header_bytes(HeaderMap::Response, ":status", b"200");
    h.set_header_bytes(HeaderMap::Response, "grpc-status", b"14");
    h.host_calls.borrow_mut().clear();
    s.on_response_headers(&h, true);
    let read_at_response = h.host_calls.borrow().get("property").copied();
    assert_eq!(read_at_response, None, "no upstream read at the response");
    s.on_done(&h);
    assert_eq!((penalty(&named), penalty(other)), (0.0, 1.0));
}

/// A gRPC stream's outcome is its grpc-status, so `:status` is not read at the response
/// headers; a stream that ends without one is classed by the HTTP status Envoy sent
/// (`response.code`, read at the end), or as a reset when there was no response.
#[test]
fn a_grpc_stream_without_a_grpc_status_is_classed_by_the_http_status_at_its_end() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"],"local_zone":"a"}"#);
    discover(&h, &v);
    let ended = |code: Option<i64>, id: u64| {
        h.headers.borrow_mut().clear();
        h.properties.borrow_mut().remove("response.code");
        h.set_request_header("content-type", "application/grpc");
        let mut s = StreamFilter::new(v.clone(), id);
        s.on_request_headers(&h);
        h.set_header_bytes(HeaderMap::Response, ":status", b"200");
        s.on_response_headers(&h, false);
        if let Some(code) = code {
            let bytes = code.to_le_bytes().to_vec();
            h.properties
                .borrow_mut()
                .insert("response.code".into(), bytes);
        }
        s.on_done(&h);
    };
    ended(Some(503), 1);
    ended(Some(503), 2);
    ended(None, 3);
    h.host_calls.borrow_mut().clear();
    unary_call(&h, &v, 4, "0", false);
    let statuses = h.host_calls.borrow().get("header").copied();
    assert_eq!(statuses, Some(1), "only grpc-status is read");
    v.borrow_mut().flush(&h);
    let rc = "route=.=telemetry;.;cluster=.=pods;.;";
    let class = |c: &str| {
        h.metric(&format!(
            "streamlb_route_streams_ended_total.{rc}status_class=.={c};.;"
        ))
    };
    assert_eq!(class("server_error"), 2);
    assert_eq!(class("reset"), 1);
    assert_eq!(class("ok"), 1);
}

/// If the host cannot give the request headers in one call, the filter still strips a
/// client's endpoint header and recognises gRPC, reading them one by one.
#[test]
fn without_the_request_header_map_the_filter_still_strips_and_counts() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"],"mode":"shadow"}"#);
    discover(&h, &v);
    h.failing.borrow_mut().insert("headers");
    h.set_request_header(HEADER, "10.0.0.2:8080");
    h.set_request_header("content-type", "application/grpc");
    let mut s = StreamFilter::new(v.clone(), 1);
    s.on_request_headers(&h);
    assert!(s.is_tracked());
    assert_eq!(h.get(HeaderMap::Request, HEADER), None, "stripped");
    let frames = grpc_frames(&[10, 10]);
    send(&h, &mut s, &frames);
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric("streamlb_endpoint_header_stripped_total"), 1);
    assert_eq!(h.metric("streamlb_host_errors_total"), 1);
    let up = "streamlb_route_messages_total.route=.=telemetry;.;cluster=.=pods;.;direction=.=upstream;.;";
    assert_eq!(h.metric(up), 2, "counted as gRPC messages");
}

#[test]
fn a_trailers_only_status_is_read_from_the_response_headers() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"],"local_zone":"a"}"#);
    discover(&h, &v);
    unary_call(&h, &v, 1, "14", true);
    v.borrow_mut().flush(&h);
    let rc = "route=.=telemetry;.;cluster=.=pods;.;";
    let unavailable =
        format!("streamlb_route_streams_ended_total.{rc}status_class=.=server_error;.;");
    assert_eq!(h.metric(&unavailable), 1);
}
