//! The filter under the mock host, fed arbitrary bytes wherever Envoy hands it data that
//! clients, backends or the admin API control: the admin call's `:status` and body, request
//! header values (endpoint header, device id, content-type), the source address, response
//! headers and trailers (`:status`, `grpc-status`, ORCA) and bodies. Nothing may panic, and
//! after request headers the endpoint header is absent or names discovered endpoints only.
//!
//! Input: fields separated by 0x00 bytes, in the order of `Field`; a missing field is an
//! absent header (an empty field is an empty value).
#![no_main]

use std::cell::RefCell;
use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use streamlb::filter::host::{Body, HeaderMap};
use streamlb::filter::mock::{MockHost, SharedStore};
use streamlb::filter::stream::{StreamFilter, ORCA_HEADER};
use streamlb::filter::vm::Vm;

const SEC: u64 = 1_000_000_000;
const ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";
const CONFIG: &[u8] = br#"{"clusters":["pods"],"debug_header":"x-d",
    "rate_memory":{"fallback_to_source_ip":true},"load":{"orca_weight":0.5},
    "rebalance":{"mode":"on","min_age_ms":0,"allow_reset":true,"max_share_per_minute":1.0}}"#;
/// A well-formed admin answer, so that placement (not only the fallback) runs.
const ADMIN: &[u8] = br#"{"cluster_statuses":[{"name":"pods","host_statuses":[
 {"address":{"socket_address":{"address":"10.0.0.1","port_value":8080}},"locality":{"zone":"a"},"weight":1},
 {"address":{"socket_address":{"address":"10.0.0.2","port_value":8080}},"locality":{"zone":"b"},"weight":2}]}]}"#;

/// The input's fields, in order.
#[derive(Clone, Copy)]
enum Field {
    AdminStatus,
    AdminBody,
    EndpointHeader,
    DeviceId,
    ContentType,
    SourceAddress,
    RequestBody,
    Status,
    GrpcStatus,
    Orca,
    ResponseBody,
    TrailerGrpcStatus,
    TrailerOrca,
}

fuzz_target!(|data: &[u8]| {
    let fields: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let field = |f: Field| fields.get(f as usize).copied();

    let h = MockHost::with_store(SharedStore::default());
    h.set_property("xds.node.locality.zone", "a");
    h.set_property("xds.route_name", "telemetry");
    h.set_property("xds.cluster_name", "pods");
    h.time.set(10 * SEC);
    let vm = Rc::new(RefCell::new(Vm::configure(&h, CONFIG).expect("valid config")));

    // The admin answers first with the fuzzed status and body, then (next poll) well.
    vm.borrow_mut().on_tick(&h);
    let token = h.calls.borrow().last().map(|c| c.0).expect("a poll");
    vm.borrow_mut().on_http_call_response(
        &h,
        token,
        field(Field::AdminStatus),
        field(Field::AdminBody),
    );
    h.time.set(13 * SEC);
    vm.borrow_mut().on_tick(&h);
    if let Some(token) = h.calls.borrow().last().map(|c| c.0) {
        vm.borrow_mut()
            .on_http_call_response(&h, token, Some(b"200"), Some(ADMIN));
    }

    for (f, name) in [
        (Field::EndpointHeader, ENDPOINT_HEADER),
        (Field::DeviceId, "x-device-id"),
        (Field::ContentType, "content-type"),
    ] {
        if let Some(v) = field(f) {
            h.set_header_bytes(HeaderMap::Request, name, v);
        }
    }
    if let Some(v) = field(Field::SourceAddress) {
        h.properties
            .borrow_mut()
            .insert("source.address".into(), v.to_vec());
    }
    let mut s = StreamFilter::new(vm.clone(), 1);
    s.on_request_headers(&h);
    if let Some(named) = h.get_bytes(HeaderMap::Request, ENDPOINT_HEADER) {
        let named = String::from_utf8(named).expect("the filter sets UTF-8");
        let v = vm.borrow();
        let cluster = &v.router.clusters()[0];
        for address in named.split(',') {
            assert!(
                cluster.index_of(address).is_some(),
                "{address:?} was not discovered"
            );
        }
    }

    h.set_property("upstream.address", "10.0.0.2:8080");
    if let Some(b) = field(Field::RequestBody) {
        h.bodies.borrow_mut().insert(Body::Request, b.to_vec());
        s.on_request_body(&h, b.len());
    }
    for (f, name) in [
        (Field::Status, ":status"),
        (Field::GrpcStatus, "grpc-status"),
        (Field::Orca, ORCA_HEADER),
    ] {
        if let Some(v) = field(f) {
            h.set_header_bytes(HeaderMap::Response, name, v);
        }
    }
    s.on_response_headers(&h, true);
    if let Some(b) = field(Field::ResponseBody) {
        h.bodies.borrow_mut().insert(Body::Response, b.to_vec());
        s.on_response_body(&h, b.len());
    }
    for (f, name) in [
        (Field::TrailerGrpcStatus, "grpc-status"),
        (Field::TrailerOrca, ORCA_HEADER),
    ] {
        if let Some(v) = field(f) {
            h.set_header_bytes(HeaderMap::ResponseTrailers, name, v);
        }
    }
    s.on_response_trailers(&h);
    h.time.set(20 * SEC);
    vm.borrow_mut().on_tick(&h);
    s.on_request_body(&h, 0);
    s.on_done(&h);
    vm.borrow_mut().flush(&h);
});
