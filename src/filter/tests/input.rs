//! Hostile input under the mock host: header values, ORCA reports and admin responses hold
//! arbitrary bytes; none may panic, each is handled as a value. And what a VM finds in shared
//! data is trusted only as far as its age allows.

use std::cell::RefCell;
use std::rc::Rc;

use super::{discover, grpc_frames, host, open_on, send, vm, ADMIN, HEADER, SEC};
use crate::filter::host::HeaderMap;
use crate::filter::mock::SharedStore;
use crate::filter::shared::SNAPSHOT_KEY;
use crate::filter::stream::StreamFilter;
use crate::filter::vm::Vm;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

#[test]
fn a_non_utf8_endpoint_header_is_stripped_and_replaced() {
    let h = host(&SharedStore::default());
    let v = vm(&h, r#"{"clusters":["pods"]}"#);
    discover(&h, &v);
    h.set_header_bytes(HeaderMap::Request, HEADER, b"\xff\xfe");
    let mut s = StreamFilter::new(v.clone(), 1);
    s.on_request_headers(&h);
    let named = h.get(HeaderMap::Request, HEADER).expect("a UTF-8 endpoint");
    assert!(named.starts_with("10.0.0.1:8080") || named.starts_with("10.0.0.3:8080"));
    v.borrow_mut().flush(&h);
    // In shadow mode nothing is set: the client's bytes are gone all the same.
    let v = vm(&h, r#"{"clusters":["pods"],"mode":"shadow"}"#);
    discover(&h, &v);
    h.set_header_bytes(HeaderMap::Request, HEADER, b"\xff\xfe");
    StreamFilter::new(v.clone(), 2).on_request_headers(&h);
    assert_eq!(h.get_bytes(HeaderMap::Request, HEADER), None);
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric("streamlb_endpoint_header_stripped_total"), 2);
}

#[test]
fn a_non_utf8_device_id_is_remembered_by_its_bytes() {
    let store = SharedStore::default();
    let (h, h2) = (host(&store), host(&store));
    // default_stream_rate 10: a remembered rate counts up to 20× it before any measurement.
    let config = r#"{"clusters":["pods"],"debug_header":"x-d","rebalance":{"mode":"off"},"load":{"default_stream_rate":10}}"#;
    let (v, v2) = (vm(&h, config), vm(&h2, config));
    discover(&h, &v);
    v2.borrow_mut().on_tick(&h2);
    h.set_request_header("content-type", "application/grpc");
    h.set_header_bytes(HeaderMap::Request, "x-device-id", b"dev\xff1");
    let mut s = StreamFilter::new(v.clone(), 1);
    s.on_request_headers(&h);
    v.borrow_mut()
        .router
        .on_upstream(h.time.get(), 1, "10.0.0.1:8080", || "a".to_string());
    let frame = grpc_frames(&[30]);
    for t in 1..=4 {
        for _ in 0..40 {
            send(&h, &mut s, &frame);
        }
        h.time.set(10 * SEC + t * SEC);
        v.borrow_mut().on_tick(&h);
    }
    s.on_done(&h);
    h.time.set(h.time.get() + SEC);
    v.borrow_mut().on_tick(&h); // writes the rate to shared data
                                // The device reconnects through another worker, which has measured nothing itself.
    h2.time.set(h.time.get());
    let expected = |id: &[u8], stream: u64| {
        h2.headers.borrow_mut().clear();
        h2.set_header_bytes(HeaderMap::Request, "x-device-id", id);
        let mut s = StreamFilter::new(v2.clone(), stream);
        s.on_request_headers(&h2);
        s.on_response_headers(&h2, false);
        let debug = h2.get(HeaderMap::Response, "x-d").expect("decision");
        let e: f64 = debug.split("expected=").nth(1).unwrap().parse().unwrap();
        e
    };
    assert!((expected(b"dev\xff1", 3) - 40.0).abs() < 2.0);
    // Other bytes that a lossy UTF-8 conversion would map to the same string: not remembered.
    assert!((expected(b"dev\xfe1", 4) - 40.0).abs() > 10.0);
}

#[test]
fn orca_headers_are_not_read_without_orca_weight() {
    let h = host(&SharedStore::default());
    let v = vm(&h, r#"{"clusters":["pods"]}"#);
    discover(&h, &v);
    let mut s = open_on(&h, &v, 1, "10.0.0.1:8080", None);
    let orca = crate::filter::stream::ORCA_HEADER;
    h.set_header_bytes(HeaderMap::Response, orca, b"TEXT cpu_utilization=x");
    s.on_response_headers(&h, false);
    h.set_header_bytes(HeaderMap::ResponseTrailers, orca, b"TEXT cpu_utilization=y");
    s.on_response_trailers(&h);
    s.on_done(&h);
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric("streamlb_orca_reports_invalid_total"), 0);
    assert!(!h.logged(orca));
}

#[test]
fn invalid_orca_reports_are_counted_logged_once_and_ignored() {
    let h = host(&SharedStore::default());
    let v = vm(&h, r#"{"clusters":["pods"],"load":{"orca_weight":0.5}}"#);
    discover(&h, &v);
    let mut s = open_on(&h, &v, 1, "10.0.0.1:8080", None);
    let orca = crate::filter::stream::ORCA_HEADER;
    h.set_header_bytes(HeaderMap::Response, ":status", b"2\xff0");
    h.set_header_bytes(HeaderMap::Response, orca, b"TEXT cpu_utilization=1\xff");
    s.on_response_headers(&h, false);
    h.set_header_bytes(HeaderMap::ResponseTrailers, "grpc-status", b"\xff");
    h.set_header_bytes(HeaderMap::ResponseTrailers, orca, b"TEXT cpu_utilization=x");
    s.on_response_trailers(&h);
    let mut ok = open_on(&h, &v, 2, "10.0.0.1:8080", None);
    h.set_header_bytes(HeaderMap::Response, orca, b"TEXT cpu_utilization=0.5");
    ok.on_response_headers(&h, false);
    s.on_done(&h);
    ok.on_done(&h);
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric("streamlb_orca_reports_invalid_total"), 2);
    let warnings = h
        .logs
        .borrow()
        .iter()
        .filter(|(_, m)| m.contains(orca))
        .count();
    assert_eq!(warnings, 1);
    // Neither status parsed: the first stream ended without one.
    let rc = "route=.=telemetry;.;cluster=.=pods;.;";
    assert_eq!(
        h.metric(&format!(
            "streamlb_route_streams_ended_total.{rc}status_class=.=reset;.;"
        )),
        2
    );
}

/// (`:status`, body) of an admin call, as the host gives them.
type AdminAnswer<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

#[test]
fn failed_or_partial_admin_responses_are_failed_polls() {
    let store = SharedStore::default();
    let h = host(&store);
    let v = vm(&h, r#"{"clusters":["pods"]}"#);
    let partial = &ADMIN.as_bytes()[..ADMIN.len() / 2];
    let answers: [AdminAnswer; 6] = [
        (None, None),                      // the call failed (reset, timeout)
        (Some(b"\xff\xfe"), None),         // a status that is not a number
        (Some(b"200"), None),              // no body
        (Some(b"200"), Some(partial)),     // the connection closed mid-body
        (Some(b"200"), Some(b"\xff\xfe")), // not JSON
        (Some(b"503"), Some(ADMIN.as_bytes())),
    ];
    for (i, (status, body)) in answers.into_iter().enumerate() {
        h.time.set(10 * SEC + 2 * SEC * i as u64);
        v.borrow_mut().on_tick(&h);
        let token = h.calls.borrow().last().expect("a poll").0;
        assert_eq!(token as usize, i + 1, "one poll per period");
        v.borrow_mut()
            .on_http_call_response(&h, token, status, body);
    }
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric("streamlb_discovery_polls_failed_total"), 6);
    assert_eq!(h.metric("streamlb_discovery_polls_ok_total"), 0);
    assert!(!store.borrow().contains_key(SNAPSHOT_KEY));
    assert!(h.logged("no response from the admin cluster"));
    // Discovery recovers on the next good answer.
    h.time.set(30 * SEC);
    discover(&h, &v);
    v.borrow_mut().flush(&h);
    assert_eq!(h.metric("streamlb_discovery_polls_ok_total"), 1);
    // The last answer's size and parse time (the mock's clock stands still).
    assert_eq!(
        h.metric("streamlb_discovery_body_bytes"),
        ADMIN.len() as i64
    );
    assert_eq!(h.metric("streamlb_discovery_parse_us"), 0);
    assert!(h
        .metric_names
        .borrow()
        .values()
        .any(|(_, name)| name == "streamlb_discovery_parse_us"));
}

/// Open a stream through `v` at `h`'s time; the endpoint it was steered to, if any.
fn steered(h: &crate::filter::mock::MockHost, v: &Rc<RefCell<Vm>>, id: u64) -> Option<String> {
    h.headers.borrow_mut().clear();
    StreamFilter::new(v.clone(), id).on_request_headers(h);
    h.get(HeaderMap::Request, HEADER)
}

#[test]
fn a_snapshot_is_trusted_only_until_stale_after_from_its_poll() {
    let store = SharedStore::default();
    let h1 = host(&store);
    let config = r#"{"clusters":["pods"],"discovery":{"stale_after_ms":30000}}"#;
    let v1 = vm(&h1, config);
    discover(&h1, &v1); // polled at 10 s
                        // A VM that starts (e.g. after a reload) 29 s later uses it; until 40 s, not after.
    let h2 = host(&store);
    h2.time.set(39 * SEC);
    let v2 = vm(&h2, config);
    v2.borrow_mut().on_tick(&h2);
    assert!(steered(&h2, &v2, 1).is_some());
    h2.time.set(40 * SEC + 1);
    assert_eq!(steered(&h2, &v2, 2), None);
    // A VM that starts 31 s later never uses it.
    let h3 = host(&store);
    h3.time.set(41 * SEC);
    let v3 = vm(&h3, config);
    v3.borrow_mut().on_tick(&h3);
    assert_eq!(steered(&h3, &v3, 3), None);
}
