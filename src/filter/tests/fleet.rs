//! The fleet view's glue under the mock host: the lease holder probes the pods through the
//! placed cluster, reports reach every VM, bad answers are counted, and the reporter role answers
//! only marked GET probes, with every stream it saw.

use super::{discover, grpc_frames, host, send, vm, HEADER, SEC};
use crate::filter::fleet::PROBE_HEADER;
use crate::filter::host::HeaderMap;
use crate::filter::mock::{MockHost, SharedStore};
use crate::filter::shared::reports_key;
use crate::filter::stream::{HeadersAction, StreamFilter};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// The probes among the host's calls: (token, named pod).
fn probes(h: &MockHost) -> Vec<(u32, String)> {
    h.calls
        .borrow()
        .iter()
        .filter(|(_, cluster, _)| cluster == "pods")
        .map(|(token, _, headers)| {
            let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            assert_eq!(get(":path").as_deref(), Some("/.well-known/streamlb/load"));
            assert_eq!(get(PROBE_HEADER).as_deref(), Some("1"));
            (*token, get(HEADER).expect("the pod is named"))
        })
        .collect()
}

/// Answer a probe: `:status` and the ORCA header (None: no header).
fn answer(
    h: &MockHost,
    v: &std::rc::Rc<std::cell::RefCell<crate::filter::vm::Vm>>,
    token: u32,
    status: &str,
    orca: Option<&[u8]>,
) {
    h.set_header_bytes(HeaderMap::HttpCallResponse, ":status", status.as_bytes());
    match orca {
        Some(value) => {
            h.set_header_bytes(HeaderMap::HttpCallResponse, "endpoint-load-metrics", value)
        }
        None => {
            h.headers.borrow_mut().remove(&(
                HeaderMap::HttpCallResponse,
                "endpoint-load-metrics".to_string(),
            ));
        }
    }
    v.borrow_mut()
        .on_http_call_response(h, token, Some(status.as_bytes()), Some(b""));
}

#[test]
fn the_lease_holder_probes_healthy_pods_and_every_vm_gets_the_reports() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    let config = r#"{"clusters":["pods"],"debug_header":"x-d","load":{"default_stream_rate":10}}"#;
    let (v1, v2) = (vm(&h1, config), vm(&h2, config));
    discover(&h1, &v1);
    h1.time.set(11 * SEC);
    v1.borrow_mut().on_tick(&h1);
    let sent = probes(&h1);
    let mut named: Vec<&str> = sent.iter().map(|(_, a)| a.as_str()).collect();
    named.sort_unstable();
    // 10.0.0.2 fails its health check: never probed.
    assert_eq!(named, ["10.0.0.1:8080", "10.0.0.3:8080"]);
    for (token, address) in &sent {
        let report: &[u8] = if address == "10.0.0.1:8080" {
            b"TEXT rps_fractional=900, application_utilization=0.9, named_metrics.streams=30"
        } else {
            b"TEXT rps_fractional=100, application_utilization=0.1, named_metrics.streams=5"
        };
        answer(&h1, &v1, *token, "200", Some(report));
    }
    v1.borrow_mut().on_tick(&h1);
    assert!(store.borrow().contains_key(&reports_key("pods")));
    // The other VM never probed, yet places on the reports: the busy pod in zone a is avoided
    // even though it is this proxy's only local pod, by spilling to b.
    v2.borrow_mut().on_tick(&h2);
    assert!(probes(&h2).is_empty(), "only the lease holder probes");
    h2.set_request_header("content-type", "application/grpc");
    let mut s = StreamFilter::new(v2.clone(), 7);
    s.on_request_headers(&h2);
    s.on_response_headers(&h2, false);
    let debug = h2.get(HeaderMap::Response, "x-d").unwrap();
    assert!(debug.contains("view=fleet"), "{debug}");
    assert!(debug.contains("endpoint=10.0.0.3:8080"), "{debug}");
    v1.borrow_mut().flush(&h1);
    v2.borrow_mut().flush(&h2);
    assert_eq!(
        h1.metric("streamlb_probes_total.cluster=.=pods;.;result=.=ok;.;"),
        2
    );
    assert_eq!(
        h2.metric("streamlb_decisions_by_view_total.cluster=.=pods;.;view=.=fleet;.;"),
        1
    );
    assert_eq!(
        h1.metric("streamlb_fleet_pods_reporting.cluster=.=pods;.;"),
        2
    );
}

#[test]
fn bad_answers_are_counted_by_kind_and_never_trusted() {
    let h = host(&SharedStore::default());
    let v = vm(&h, r#"{"clusters":["pods"],"probe":{"interval_ms":1000}}"#);
    discover(&h, &v);
    let bad: [(&str, Option<&[u8]>, &str); 6] = [
        ("503", None, "status"),
        ("200", None, "malformed"),
        ("200", Some(b"TEXT cpu_utilization=1\xff"), "malformed"),
        ("200", Some(b"TEXT rps_fractional=NaN"), "malformed"),
        ("200", Some(b"TEXT rps_fractional=-5"), "malformed"),
        (
            "200",
            Some(b"TEXT rps_fractional=5, application_utilization=1e9"),
            "implausible",
        ),
    ];
    let mut t = 11;
    for (status, orca, _) in bad {
        h.time.set(t * SEC);
        t += 2;
        let before = probes(&h).len();
        v.borrow_mut().on_tick(&h);
        let sent = probes(&h);
        assert!(sent.len() > before, "probes go out every interval");
        for (token, _) in &sent[before..] {
            answer(&h, &v, *token, status, orca);
        }
    }
    // A call the host answers without a response (timeout, reset): failed.
    h.time.set(t * SEC);
    let before = probes(&h).len();
    v.borrow_mut().on_tick(&h);
    for (token, _) in &probes(&h)[before..] {
        h.headers
            .borrow_mut()
            .remove(&(HeaderMap::HttpCallResponse, ":status".to_string()));
        v.borrow_mut().on_http_call_response(&h, *token, None, None);
    }
    v.borrow_mut().flush(&h);
    let count = |r: &str| {
        h.metric(&format!(
            "streamlb_probes_total.cluster=.=pods;.;result=.={r};.;"
        ))
    };
    assert_eq!(count("status"), 2);
    assert_eq!(count("malformed"), 8);
    assert_eq!(count("implausible"), 2);
    assert_eq!(count("failed"), 2);
    assert_eq!(count("ok"), 0);
    // No report was accepted: the cluster stays on the local view.
    let v = v.borrow();
    assert!(v.router.clusters()[0].fleet.is_none());
}

#[test]
fn a_probe_that_is_never_answered_is_counted_lost() {
    let h = host(&SharedStore::default());
    let v = vm(&h, r#"{"clusters":["pods"],"probe":{"timeout_ms":250}}"#);
    discover(&h, &v);
    h.time.set(11 * SEC);
    v.borrow_mut().on_tick(&h);
    assert_eq!(probes(&h).len(), 2);
    h.time.set(13 * SEC);
    v.borrow_mut().on_tick(&h);
    v.borrow_mut().flush(&h);
    assert_eq!(
        h.metric("streamlb_probes_total.cluster=.=pods;.;result=.=lost;.;"),
        2
    );
}

#[test]
fn the_reporter_answers_marked_get_probes_with_every_stream_it_saw() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    let config = r#"{"reporter":{"capacity":200},"tick_ms":1000}"#;
    let (v1, v2) = (vm(&h1, config), vm(&h2, config));
    // Two workers, 2 streams each, 20 messages/s each (both directions counted).
    let frame = grpc_frames(&[16]);
    let mut streams = Vec::new();
    for (k, (h, v)) in [(&h1, &v1), (&h2, &v2)].into_iter().enumerate() {
        h.set_request_header(":path", "/streamlb.lab.v1.Telemetry/Stream");
        h.set_request_header(":method", "POST");
        h.set_request_header("content-type", "application/grpc");
        for i in 0..2 {
            let mut s = StreamFilter::new(v.clone(), (k * 10 + i) as u64);
            assert_eq!(s.on_request_headers(h), HeadersAction::Continue);
            streams.push((h, v, s));
        }
    }
    for t in 1..=30 {
        for (h, _, s) in &mut streams {
            for _ in 0..20 {
                send(h, s, &frame);
            }
        }
        for (h, v) in [(&h1, &v1), (&h2, &v2)] {
            h.time.set(10 * SEC + t * SEC);
            v.borrow_mut().on_tick(h);
        }
    }
    // A marked GET probe on worker 1: answered locally with both workers' figures.
    h1.set_request_header(":path", "/.well-known/streamlb/load?x=1");
    h1.set_request_header(":method", "GET");
    h1.set_request_header(PROBE_HEADER, "1");
    let mut probe = StreamFilter::new(v1.clone(), 99);
    assert_eq!(probe.on_request_headers(&h1), HeadersAction::Answered);
    let (status, headers, _) = h1.local_responses.borrow().last().cloned().unwrap();
    assert_eq!(status, 200);
    let report = headers
        .iter()
        .find(|(k, _)| k == "endpoint-load-metrics")
        .map(|(_, v)| v.clone())
        .unwrap();
    let orca = streamlb_core::orca::parse(&report).unwrap();
    assert!((orca.rps_fractional - 80.0).abs() < 5.0, "{report}");
    assert!(
        (orca.application_utilization - 0.4).abs() < 0.03,
        "{report}"
    );
    assert_eq!(orca.named_metric("streams"), Some(4.0), "{report}");
    // Without the marker (a client through a gateway): 404, no figures; other methods: 405.
    h1.headers
        .borrow_mut()
        .remove(&(HeaderMap::Request, PROBE_HEADER.to_string()));
    assert_eq!(
        StreamFilter::new(v1.clone(), 100).on_request_headers(&h1),
        HeadersAction::Answered
    );
    assert_eq!(h1.local_responses.borrow().last().unwrap().0, 404);
    h1.set_request_header(PROBE_HEADER, "1");
    h1.set_request_header(":method", "POST");
    StreamFilter::new(v1.clone(), 101).on_request_headers(&h1);
    assert_eq!(h1.local_responses.borrow().last().unwrap().0, 405);
    // Ended streams leave the count.
    for (h, _, s) in &mut streams {
        s.on_done(*h);
    }
    assert_eq!(v1.borrow().reporter.measured().streams, 0);
    v1.borrow_mut().flush(&h1);
    assert_eq!(h1.metric("streamlb_reporter_probes_answered_total"), 1);
}

#[test]
fn the_reporter_learns_a_new_stream_at_reporter_tau_not_load_tau() {
    let store = SharedStore::default();
    let h = host(&store);
    // load.tau_ms (the placing side's smoothing) is 5 s; the reporter's own τ is 1 s.
    let v = vm(
        &h,
        r#"{"reporter":{"tau_ms":1000},"load":{"tau_ms":5000},"tick_ms":1000}"#,
    );
    h.set_request_header(":path", "/streamlb.lab.v1.Telemetry/Stream");
    h.set_request_header(":method", "POST");
    h.set_request_header("content-type", "application/grpc");
    let frame = grpc_frames(&[16]);
    let open = |id: u64| {
        let mut s = StreamFilter::new(v.clone(), id);
        assert_eq!(s.on_request_headers(&h), HeadersAction::Continue);
        s
    };
    let mut streams: Vec<(StreamFilter, usize)> = (0..4).map(|i| (open(i), 10)).collect();
    let mut t = 10;
    let mut run = |streams: &mut Vec<(StreamFilter, usize)>, seconds: u64| {
        for _ in 0..seconds {
            for (s, rate) in streams.iter_mut() {
                for _ in 0..*rate {
                    send(&h, s, &frame);
                }
            }
            t += 1;
            h.time.set(t * SEC);
            v.borrow_mut().on_tick(&h);
        }
    };
    run(&mut streams, 30);
    let rate = || v.borrow().reporter.measured().messages_per_second;
    assert!((rate() - 40.0).abs() < 1.0, "{}", rate());
    // A heavy stream (100 messages/s) joins: two seconds later the pod reports ≥ 90 % of
    // its 140 (with τ = 5 s it would report about 80).
    streams.push((open(9), 100));
    run(&mut streams, 2);
    assert!(rate() >= 0.9 * 140.0, "{}", rate());
}

#[test]
fn while_any_worker_places_streams_the_prober_probes_between_ticks() {
    let store = SharedStore::default();
    let (h1, h2) = (host(&store), host(&store));
    let config = r#"{"clusters":["pods"]}"#;
    let (v1, v2) = (vm(&h1, config), vm(&h2, config));
    // The timer runs at probe.placing_interval_ms; ticks stay at tick_ms.
    assert_eq!(h1.tick_period_ms.get(), Some(250));
    discover(&h1, &v1);
    h1.time.set(11 * SEC);
    v1.borrow_mut().on_tick(&h1);
    let first = probes(&h1);
    assert_eq!(first.len(), 2);
    for (token, _) in &first {
        answer(&h1, &v1, *token, "200", Some(b"TEXT rps_fractional=10"));
    }
    let probes_ok = "streamlb_probes_total.cluster=.=pods;.;result=.=ok;.;";
    let published = || {
        store
            .borrow()
            .get(&reports_key("pods"))
            .map(|(_, cas)| *cas)
    };
    let before = published();
    // Nothing placed: between ticks no pod is due (each once per interval_ms); the reports
    // that arrived since the tick are published.
    h1.time.set(11 * SEC + SEC / 2);
    v1.borrow_mut().on_tick(&h1);
    assert_eq!(probes(&h1).len(), 2);
    let after = published();
    assert_ne!(after, before);
    // The other worker places a stream and publishes that on its timer.
    h2.time.set(11 * SEC + SEC / 2);
    v2.borrow_mut().on_tick(&h2);
    h2.set_request_header("content-type", "application/grpc");
    let mut s = StreamFilter::new(v2.clone(), 1);
    s.on_request_headers(&h2);
    assert!(s.is_tracked());
    h2.time.set(11 * SEC + 3 * SEC / 4);
    v2.borrow_mut().on_tick(&h2);
    // The prober probes again 0.75 s after the last probes, between its ticks.
    h1.time.set(11 * SEC + 3 * SEC / 4);
    v1.borrow_mut().on_tick(&h1);
    assert_eq!(probes(&h1).len(), 4);
    assert_eq!(published(), after, "no new report: nothing published again");
    // Between ticks nothing but probes: the stats are flushed on the tick.
    assert_eq!(h1.metric(probes_ok), 0);
    h1.time.set(12 * SEC);
    v1.borrow_mut().on_tick(&h1);
    assert_eq!(h1.metric(probes_ok), 2);
}
