//! In-process end-to-end checks: pods + device simulator over real loopback h2c.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use streamlb_lab::devices::{self, DevicesConfig, Kind, Report};
use streamlb_lab::pods::{Fleet, OrcaFormat, Pod, PodsConfig};
use streamlb_lab::rates::RateDist;

fn fleet_config(capacity: f64, orca: Option<OrcaFormat>) -> PodsConfig {
    PodsConfig {
        zones: vec![("a".into(), 1), ("b".into(), 1)],
        capacity,
        zone_capacity: Vec::new(),
        orca,
        orca_raw: None,
        endpoint_header: http::HeaderName::from_static("x-gateway-destination-endpoint"),
    }
}

fn devices_config(target: &Arc<Pod>, kind: Kind, seconds: f64, reconnect: bool) -> DevicesConfig {
    DevicesConfig {
        target: target.address.to_string(),
        streams: 20,
        mean_rate: 25.0,
        rate_dist: RateDist::Zipf(0.8),
        duration: Duration::from_secs_f64(seconds),
        kind,
        payload: 32,
        seed: 11,
        headers: vec!["x-tenant:blue".parse().expect("header")],
        record_headers: vec!["endpoint-load-metrics".into()],
        reconnect,
        device_prefix: "t".into(),
        ramp: Duration::from_millis(200),
        progress: false,
        storm_at: Vec::new(),
    }
}

fn check_ledger(report: &Report) {
    for s in &report.streams {
        let c = &s.counts;
        assert_eq!(
            c.sent,
            c.acked + c.failed + c.unacked,
            "{}: {c:?}",
            s.device
        );
        assert_eq!(c.failed, c.resent + c.lost, "{}: {c:?}", s.device);
        assert_eq!(
            c.generated,
            c.sent - c.resent + c.unsent,
            "{}: {c:?}",
            s.device
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_streams_are_all_acked_and_counted_by_the_pod() {
    let fleet = Fleet::launch(&fleet_config(0.0, Some(OrcaFormat::Text)))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let report = devices::run(devices_config(&pod, Kind::Bidi, 2.0, false))
        .await
        .expect("devices");
    let t = &report.totals.counts;
    // 20 streams * 25/s * 2 s = 1000 readings (phases and rounding move it a little).
    assert!((900..=1100).contains(&t.sent), "{t:?}");
    assert_eq!(t.acked, t.sent, "{t:?}");
    assert_eq!(report.totals.statuses.get("OK"), Some(&20));
    assert_eq!(report.latency_ms.count, t.acked);
    check_ledger(&report);
    let snap = pod.snapshot();
    assert_eq!(snap.messages, t.sent);
    assert_eq!(snap.bytes, t.sent * 32);
    assert_eq!(snap.streams_total, 20);
    assert_eq!(snap.streams_active, 0);
    assert_eq!(snap.truncated, 0);
    assert_eq!(fleet.pods[1].snapshot().messages, 0);
    for s in &report.streams {
        assert_eq!(s.pods, vec![Some("a-0".to_string())]);
        assert_eq!(s.zone.as_deref(), Some("a"));
        let load = s.headers.get("endpoint-load-metrics").expect("orca header");
        assert!(load.starts_with("TEXT application_utilization="), "{load}");
    }
    fleet.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_orca_reports_decode_with_the_filters_parser() {
    let fleet = Fleet::launch(&fleet_config(0.0, Some(OrcaFormat::Bin)))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let mut config = devices_config(&pod, Kind::Bidi, 2.0, false);
    config.record_headers = vec![
        "endpoint-load-metrics-bin".into(),
        "endpoint-load-metrics".into(),
    ];
    let report = devices::run(config).await.expect("devices");
    assert_eq!(report.totals.statuses.get("OK"), Some(&20));
    for s in &report.streams {
        assert!(
            !s.headers.contains_key("endpoint-load-metrics"),
            "text form not sent"
        );
        let value = s
            .headers
            .get("endpoint-load-metrics-bin")
            .expect("bin header");
        streamlb_core::orca::parse_bin(value).expect("valid OrcaLoadReport");
    }
    fleet.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pod_fails_streams_and_reconnects_resend_everything() {
    let fleet = Fleet::launch(&fleet_config(0.0, None))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let bouncer = {
        let pod = pod.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            assert!(pod.stop());
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(pod.snapshot().streams_active, 0, "open streams not aborted");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(pod.start().expect("restart on the same port"));
        })
    };
    let report = devices::run(devices_config(&pod, Kind::Bidi, 3.0, true))
        .await
        .expect("devices");
    bouncer.await.expect("bouncer");
    check_ledger(&report);
    let t = &report.totals;
    assert!(t.reconnects >= 20, "every stream reconnects: {t:?}");
    assert_eq!(t.counts.lost, 0, "{t:?}");
    assert_eq!(t.counts.unacked, 0, "{t:?}");
    assert_eq!(t.counts.unsent, 0, "{t:?}");
    assert_eq!(
        t.counts.acked, t.counts.generated,
        "every reading acked once: {t:?}"
    );
    assert_eq!(t.statuses.get("OK"), Some(&20));
    for s in &report.streams {
        assert_eq!(s.pods.first(), Some(&Some("a-0".to_string())));
        assert_eq!(s.pods.last(), Some(&Some("a-0".to_string())));
    }
    // The pod saw every reading at least once (failed ones may have arrived unacked).
    assert!(pod.snapshot().messages >= t.counts.acked);
    fleet.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_reconnects_every_stream_at_once_and_loses_nothing() {
    let fleet = Fleet::launch(&fleet_config(0.0, None))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let mut config = devices_config(&pod, Kind::Bidi, 3.0, false);
    config.storm_at = vec![Duration::from_millis(1500)];
    let watcher = {
        let pod = pod.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let before = pod.snapshot().streams_total;
            tokio::time::sleep(Duration::from_millis(1000)).await;
            (before, pod.snapshot().streams_total)
        })
    };
    let report = devices::run(config).await.expect("devices");
    let (before, after) = watcher.await.expect("watcher");
    assert_eq!(
        (before, after),
        (20, 40),
        "every stream reopened within 0.5 s of the storm"
    );
    check_ledger(&report);
    let t = &report.totals;
    assert_eq!((t.reconnects, t.storm_reconnects), (20, 20), "{t:?}");
    assert_eq!(
        t.statuses.get("OK"),
        Some(&40),
        "both attempts end cleanly: {t:?}"
    );
    assert_eq!(t.counts.acked, t.counts.generated, "nothing lost: {t:?}");
    assert_eq!(t.counts.failed, 0, "{t:?}");
    assert_eq!(pod.snapshot().messages, t.counts.acked, "no duplicates");
    for s in &report.streams {
        assert_eq!(s.pods.len(), 2, "{}: {:?}", s.device, s.pods);
        assert_eq!(
            s.acked_by_pod.get("a-0"),
            Some(&s.counts.acked),
            "{}",
            s.device
        );
    }
    fleet.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_summary_counts_every_reading() {
    let fleet = Fleet::launch(&fleet_config(0.0, None))
        .await
        .expect("fleet");
    let pod = fleet.pods[1].clone();
    let report = devices::run(devices_config(&pod, Kind::Upload, 1.0, false))
        .await
        .expect("devices");
    let t = &report.totals.counts;
    assert!(t.sent > 300, "{t:?}");
    assert_eq!(t.acked, t.sent, "{t:?}");
    assert_eq!(pod.snapshot().kinds.upload.messages, t.sent);
    assert_eq!(pod.snapshot().kinds.upload.streams_total, 20);
    check_ledger(&report);
    fleet.shutdown();
}

/// The unary `Send` the cost benchmark drives with h2load: one Ack per Reading, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_send_acks_and_counts_each_reading() {
    use streamlb_lab::proto::{telemetry_client::TelemetryClient, Reading};
    let fleet = Fleet::launch(&fleet_config(0.0, None))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let mut client = TelemetryClient::connect(format!("http://{}", pod.address))
        .await
        .expect("connect");
    for seq in 1..=3 {
        let ack = client
            .send(Reading {
                device_id: "d".into(),
                seq,
                sent_unix_nanos: 7,
                payload: Bytes::from_static(b"xyz"),
            })
            .await
            .expect("send")
            .into_inner();
        assert_eq!((ack.seq, ack.sent_unix_nanos), (seq, 7));
        assert_eq!(ack.pod, pod.name);
    }
    let snapshot = pod.snapshot();
    assert_eq!(snapshot.kinds.unary.messages, 3);
    assert_eq!(snapshot.kinds.unary.streams_total, 3);
    assert_eq!(snapshot.messages, 3);
    assert_eq!(snapshot.bytes, 9);
    fleet.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_pod_delays_acks() {
    // 20 streams * 25/s = 500 msgs/s against capacity 250: delay = (500 - 250) / 250 = 1 s.
    let fleet = Fleet::launch(&fleet_config(250.0, None))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let report = devices::run(devices_config(&pod, Kind::Bidi, 2.5, false))
        .await
        .expect("devices");
    assert_eq!(report.totals.counts.acked, report.totals.counts.sent);
    assert!(report.latency_ms.p99 > 500.0, "{:?}", report.latency_ms);
    assert!(report.latency_ms.max < 2000.0, "{:?}", report.latency_ms);
    fleet.shutdown();
}

/// A gRPC message whose length prefix promises more bytes than the stream carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_message_is_counted() {
    let fleet = Fleet::launch(&fleet_config(0.0, None))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let mut sender = h2_client(&pod).await;
    let mut body = vec![0u8, 0, 0, 0, 100]; // uncompressed, 100 bytes promised
    body.extend_from_slice(&[0x10, 1, 0x18, 2]); // only 4 arrive
    let request = http::Request::post(format!(
        "http://{}/streamlb.lab.v1.Telemetry/Stream",
        pod.address
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("x-gateway-destination-endpoint", "127.0.0.1:1")
    .body(http_body_util::Full::new(Bytes::from(body)))
    .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let header = |name: &str| response.headers().get(name).map(|v| v.as_bytes().to_vec());
    assert_eq!(header("x-pod"), Some(b"a-0".to_vec()));
    assert_eq!(
        header("x-pod-saw-endpoint-header"),
        Some(b"127.0.0.1:1".to_vec())
    );
    let collected = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"13"[..])
    );
    let snap = pod.snapshot();
    assert_eq!(
        (snap.truncated, snap.messages, snap.streams_active),
        (1, 0, 0)
    );
    fleet.shutdown();
}

/// An h2c connection to `pod`.
async fn h2_client<B>(pod: &Arc<Pod>) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(pod.address)
        .await
        .expect("connect");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// GET /.well-known/streamlb/load over h2c: the pod's ORCA load report.
async fn probe(pod: &Arc<Pod>) -> String {
    let mut sender = h2_client(pod).await;
    let request = http::Request::get(format!(
        "http://{}{}",
        pod.address,
        streamlb_lab::pods::LOAD_PATH
    ))
    .body(http_body_util::Empty::<Bytes>::new())
    .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response
        .headers()
        .get("endpoint-load-metrics")
        .expect("load report")
        .to_str()
        .expect("ascii")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_answer_load_probes_in_the_filters_units() {
    let fleet = Fleet::launch(&fleet_config(1000.0, None))
        .await
        .expect("fleet");
    let pod = fleet.pods[0].clone();
    let run = tokio::spawn(devices::run(devices_config(&pod, Kind::Bidi, 2.0, false)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let value = probe(&pod).await;
    let orca = streamlb_core::orca::parse(&value).expect("valid ORCA");
    let report = streamlb_core::fleet::LoadReport::from_orca(
        &orca,
        streamlb_core::config::LoadSignal::Messages,
        0,
    )
    .expect("a load report");
    // 20 streams × 25 msgs/s, each acked: ≈ 1000 messages/s in both directions.
    assert!((800.0..=1200.0).contains(&report.rate), "{value}");
    // Utilisation counts what the pod receives against its capacity: ≈ 500 / 1000.
    let u = report.utilization.expect("utilisation");
    assert!((0.4..=0.6).contains(&u), "{value}");
    assert_eq!(orca.named_metric("streams"), Some(20.0), "{value}");
    run.await.expect("join").expect("devices");
    // The capacity can be cut at run time (a degraded pod): its utilisation goes up.
    pod.set_capacity(250.0);
    assert_eq!(pod.snapshot().capacity, 250.0);
    assert_eq!(pod.snapshot().probes, 1);
    fleet.shutdown();
}
