//! `lab pods`: N gRPC test pods (h2c, one listener each) plus an HTTP/1.1 control API.
//!
//! Each pod counts its streams and messages, tags every response with `x-pod` / `x-pod-zone`
//! and, with ORCA on, `endpoint-load-metrics` in initial metadata and trailers. A request that
//! still carries the endpoint-override header (default `x-gateway-destination-endpoint`) is
//! answered with `x-pod-saw-endpoint-header: <its value>`, so tests can check a proxy strips it.
//!
//! Overload model (`capacity` C msgs/s, 0 = unlimited): with r the pod's message rate over
//! the last second, each ack of the bidi `Stream` is held back by
//! `delay = min((r - C) / C, 5) seconds` when r > C, else 0 (acks stay in order; reading
//! is not blocked). `Upload` is not delayed.

use crate::proto::telemetry_server::{Telemetry, TelemetryServer};
use crate::proto::{Ack, Reading, UploadSummary};
use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tonic::codegen::Service;
use tonic::{Request, Response, Status, Streaming};

/// Cap of the overload ack delay.
const MAX_ACK_DELAY: Duration = Duration::from_secs(5);
/// Utilisation denominator when capacity is unlimited.
const UNLIMITED_UTILIZATION_BASE: f64 = 1000.0;
const WINDOW_BUCKETS: usize = 10;
const WINDOW_BUCKET_MS: u64 = 100;

/// Message rate over the last second: 10 buckets of 100 ms (the current one partial).
#[derive(Debug)]
pub struct RateWindow {
    origin: Instant,
    /// (bucket number since origin, count in it)
    buckets: Mutex<[(u64, u64); WINDOW_BUCKETS]>,
}

impl RateWindow {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            buckets: Mutex::new([(u64::MAX, 0); WINDOW_BUCKETS]),
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_millis() as u64 / WINDOW_BUCKET_MS
    }

    pub fn record(&self, now: Instant) {
        self.record_n(now, 1);
    }

    /// Count `n` (messages, or bytes) at `now`.
    pub fn record_n(&self, now: Instant, n: u64) {
        let slot = self.slot(now);
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        if let Some(bucket) = buckets.get_mut((slot % WINDOW_BUCKETS as u64) as usize) {
            if bucket.0 != slot {
                *bucket = (slot, 0);
            }
            bucket.1 += n;
        }
    }

    /// Counted in the last 1 s (msgs/s, or bytes/s).
    pub fn rate(&self, now: Instant) -> f64 {
        let slot = self.slot(now);
        let Ok(buckets) = self.buckets.lock() else {
            return 0.0;
        };
        buckets
            .iter()
            .filter(|(s, _)| *s != u64::MAX && slot.saturating_sub(*s) < WINDOW_BUCKETS as u64)
            .map(|(_, count)| *count)
            .sum::<u64>() as f64
    }
}

/// Counters for one RPC kind.
#[derive(Debug, Default)]
pub struct KindStats {
    pub streams_total: AtomicU64,
    pub messages: AtomicU64,
}

/// The bytes one gRPC message takes in DATA frames (5-byte prefix and encoded message), as the
/// filter counts them for `load.signal: bytes` and its reporter reports them.
fn grpc_bytes(message: &impl prost::Message) -> u64 {
    5 + message.encoded_len() as u64
}

#[derive(Debug)]
pub struct PodStats {
    pub streams_active: AtomicU64,
    pub streams_total: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// Inbound streams that ended in a decode error (truncated or malformed message).
    pub truncated: AtomicU64,
    /// Inbound streams that ended in any other error (reset, cancel, connection loss).
    pub stream_errors: AtomicU64,
    pub bidi: KindStats,
    pub upload: KindStats,
    pub unary: KindStats,
    pub window: RateWindow,
    /// gRPC bytes over the last second, both directions (see [`grpc_bytes`]).
    pub bytes_window: RateWindow,
    /// Load probes answered.
    pub probes: AtomicU64,
}

impl PodStats {
    fn new() -> Self {
        Self {
            streams_active: AtomicU64::new(0),
            streams_total: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            stream_errors: AtomicU64::new(0),
            bidi: KindStats::default(),
            upload: KindStats::default(),
            unary: KindStats::default(),
            window: RateWindow::new(),
            bytes_window: RateWindow::new(),
            probes: AtomicU64::new(0),
        }
    }

    fn record_message(&self, kind: &KindStats, reading: &Reading, now: Instant) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        kind.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(reading.payload.len() as u64, Ordering::Relaxed);
        self.window.record(now);
        self.bytes_window.record_n(now, grpc_bytes(reading));
    }

    /// An ack sent back: its bytes count in the load report's bytes/s.
    fn record_reply(&self, ack: &Ack, now: Instant) {
        self.bytes_window.record_n(now, grpc_bytes(ack));
    }

    fn record_inbound_error(&self, status: &Status) {
        // tonic reports a truncated body ("Unexpected EOF decoding stream") and prost
        // decode failures as INTERNAL; resets/cancels map to other codes.
        if status.code() == tonic::Code::Internal {
            self.truncated.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stream_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Decrements `streams_active` when a stream's handler state is dropped, however it ends.
struct ActiveStream(Arc<Pod>);

impl ActiveStream {
    fn open(pod: &Arc<Pod>, kind: &KindStats) -> Self {
        pod.stats.streams_active.fetch_add(1, Ordering::Relaxed);
        pod.stats.streams_total.fetch_add(1, Ordering::Relaxed);
        kind.streams_total.fetch_add(1, Ordering::Relaxed);
        Self(pod.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.stats.streams_active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct PodRun {
    accept: JoinHandle<()>,
    /// Dropping it (or sending true) ends every open stream of this run.
    _stop: watch::Sender<bool>,
}

impl Drop for PodRun {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

pub struct Pod {
    pub name: String,
    pub zone: String,
    pub address: SocketAddr,
    /// msgs/s (f64 bits; the control API can change it); 0 = unlimited.
    capacity: AtomicU64,
    pub orca: Option<OrcaFormat>,
    /// Sent as every `endpoint-load-metrics` value instead of the load report.
    pub orca_raw: Option<http::HeaderValue>,
    /// Request header echoed back as `x-pod-saw-endpoint-header` when present.
    pub endpoint_header: http::HeaderName,
    pub stats: PodStats,
    run: Mutex<Option<PodRun>>,
}

fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("creating a TCP socket")?;
    socket.set_reuseaddr(true).context("setting SO_REUSEADDR")?;
    socket
        .bind(address)
        .with_context(|| format!("binding {address}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("listening on {address}"))
}

impl Pod {
    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn launch(
        name: String,
        zone: String,
        config: &PodsConfig,
    ) -> anyhow::Result<Arc<Self>> {
        Self::launch_at(name, zone, config, Listen::default().pod_address(0)).await
    }

    /// Binds `address` (port 0 = any free port) and starts serving.
    pub async fn launch_at(
        name: String,
        zone: String,
        config: &PodsConfig,
        address: SocketAddr,
    ) -> anyhow::Result<Arc<Self>> {
        let listener = bind(address)?;
        let address = listener.local_addr().context("reading the bound address")?;
        let capacity = config.capacity_of(&zone);
        let pod = Arc::new(Self {
            name,
            zone,
            address,
            capacity: AtomicU64::new(capacity.to_bits()),
            orca: config.orca,
            orca_raw: config
                .orca_raw
                .as_deref()
                .map(http::HeaderValue::from_bytes)
                .transpose()
                .context("--orca-raw-hex: not a valid header value")?,
            endpoint_header: config.endpoint_header.clone(),
            stats: PodStats::new(),
            run: Mutex::new(None),
        });
        pod.serve(listener)?;
        Ok(pod)
    }

    pub fn is_up(&self) -> bool {
        self.run.lock().map(|run| run.is_some()).unwrap_or(false)
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(self.clone(), listener, stop_rx));
        let mut run = self
            .run
            .lock()
            .map_err(|_| anyhow::anyhow!("pod {} state lock poisoned", self.name))?;
        *run = Some(PodRun {
            accept,
            _stop: stop_tx,
        });
        Ok(())
    }

    /// Serves again on the same address; Ok(false) if it was already up.
    pub fn start(self: &Arc<Self>) -> anyhow::Result<bool> {
        if self.is_up() {
            return Ok(false);
        }
        let listener = bind(self.address)?;
        self.serve(listener)?;
        Ok(true)
    }

    /// Closes the listener, drops every connection and ends every open stream with an
    /// error; returns false if it was already stopped.
    pub fn stop(&self) -> bool {
        let run = self.run.lock().ok().and_then(|mut run| run.take());
        run.is_some()
    }

    /// Message rate over the last second.
    pub fn rate(&self) -> f64 {
        self.stats.window.rate(Instant::now())
    }

    /// msgs/s before acks are delayed; 0 = unlimited.
    pub fn capacity(&self) -> f64 {
        f64::from_bits(self.capacity.load(Ordering::Relaxed))
    }

    pub fn set_capacity(&self, capacity: f64) {
        self.capacity.store(capacity.to_bits(), Ordering::Relaxed);
    }

    /// ORCA-style utilisation: rate / capacity, or rate / 1000 when unlimited.
    pub fn utilization(&self, rate: f64) -> f64 {
        let capacity = self.capacity();
        if capacity > 0.0 {
            rate / capacity
        } else {
            rate / UNLIMITED_UTILIZATION_BASE
        }
    }

    /// The answer to a load probe (`GET /.well-known/streamlb/load`), as an ORCA-speaking app
    /// gives it: messages/s in both directions (each bidi message is acked), active streams,
    /// gRPC bytes/s both ways (for proxies whose `load.signal` is bytes) and, when the pod has a
    /// capacity, its utilisation, in the `endpoint-load-metrics` TEXT form.
    pub fn probe_report(&self) -> String {
        let rate = self.rate();
        let total = self.stats.messages.load(Ordering::Relaxed).max(1) as f64;
        let bidi = self.stats.bidi.messages.load(Ordering::Relaxed) as f64;
        let both_directions = rate * (1.0 + bidi / total);
        let mut report = format!(
            "TEXT rps_fractional={both_directions:.3}, named_metrics.streams={}, \
             named_metrics.bytes_per_second={:.1}",
            self.stats.streams_active.load(Ordering::Relaxed),
            self.stats.bytes_window.rate(Instant::now())
        );
        // An unlimited pod does not know its utilisation: it says none (not r/1000).
        if self.capacity() > 0.0 {
            report.push_str(&format!(
                ", application_utilization={:.4}",
                self.utilization(rate)
            ));
        }
        report
    }

    /// The ORCA (header name, value) this pod sends: the configured raw bytes, else its load
    /// report in its form.
    fn orca_header(&self, format: OrcaFormat) -> (&'static str, http::HeaderValue) {
        match &self.orca_raw {
            Some(raw) => (ORCA_HEADER, raw.clone()),
            None => {
                let (name, value) = self.load_report(format);
                (name, header_value(&value))
            }
        }
    }

    /// The ORCA load report as a (header name, value) pair in the given form.
    pub fn load_report(&self, format: OrcaFormat) -> (&'static str, String) {
        let rate = self.rate();
        let utilization = self.utilization(rate);
        match format {
            OrcaFormat::Text => (
                ORCA_HEADER,
                format!("TEXT application_utilization={utilization:.4}, rps_fractional={rate:.2}"),
            ),
            OrcaFormat::Bin => {
                let report = streamlb_core::orca::OrcaLoadReportProto {
                    application_utilization: utilization,
                    rps_fractional: rate,
                    ..Default::default()
                };
                let bytes = prost::Message::encode_to_vec(&report);
                (ORCA_BIN_HEADER, BASE64.encode(bytes))
            }
        }
    }

    /// Overload delay for an ack right now (see the module doc).
    fn ack_delay(&self, now: Instant) -> Duration {
        let capacity = self.capacity();
        if capacity <= 0.0 {
            return Duration::ZERO;
        }
        let rate = self.stats.window.rate(now);
        if rate <= capacity {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((rate - capacity) / capacity).min(MAX_ACK_DELAY)
    }

    pub fn snapshot(&self) -> PodSnapshot {
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let kind = |k: &KindStats| KindSnapshot {
            streams_total: load(&k.streams_total),
            messages: load(&k.messages),
        };
        let rate = self.rate();
        PodSnapshot {
            name: self.name.clone(),
            zone: self.zone.clone(),
            address: self.address.to_string(),
            up: self.is_up(),
            streams_active: load(&self.stats.streams_active),
            streams_total: load(&self.stats.streams_total),
            messages: load(&self.stats.messages),
            bytes: load(&self.stats.bytes),
            truncated: load(&self.stats.truncated),
            stream_errors: load(&self.stats.stream_errors),
            rate_1s: rate,
            utilization: self.utilization(rate),
            capacity: self.capacity(),
            probes: load(&self.stats.probes),
            kinds: KindsSnapshot {
                bidi: kind(&self.stats.bidi),
                upload: kind(&self.stats.upload),
                unary: kind(&self.stats.unary),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct KindSnapshot {
    pub streams_total: u64,
    pub messages: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct KindsSnapshot {
    pub bidi: KindSnapshot,
    pub upload: KindSnapshot,
    pub unary: KindSnapshot,
}

/// `GET /stats` body.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    pub pods: Vec<PodSnapshot>,
}

/// One pod in `GET /stats`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PodSnapshot {
    pub name: String,
    pub zone: String,
    pub address: String,
    pub up: bool,
    pub streams_active: u64,
    pub streams_total: u64,
    pub messages: u64,
    pub bytes: u64,
    pub truncated: u64,
    pub stream_errors: u64,
    pub rate_1s: f64,
    pub utilization: f64,
    pub capacity: f64,
    /// Load probes the pod answered (`GET /.well-known/streamlb/load`).
    pub probes: u64,
    pub kinds: KindsSnapshot,
}

async fn accept_loop(pod: Arc<Pod>, listener: TcpListener, stop: watch::Receiver<bool>) {
    // Owned here: aborting this task drops the set, which aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    connections.spawn(serve_connection(pod.clone(), tcp, stop.clone()));
                }
                Err(error) => {
                    eprintln!("pod {}: accept failed: {error}", pod.name);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(pod: Arc<Pod>, tcp: TcpStream, stop: watch::Receiver<bool>) {
    let _ = tcp.set_nodelay(true);
    let grpc = TelemetryServer::new(PodService {
        pod: pod.clone(),
        stop,
    });
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let mut grpc = grpc.clone();
        let pod = pod.clone();
        async move {
            if request.method() == http::Method::GET && request.uri().path() == LOAD_PATH {
                pod.stats.probes.fetch_add(1, Ordering::Relaxed);
                let mut response = http::Response::new(PodBody {
                    inner: tonic::body::Body::empty(),
                    orca: None,
                });
                let report = match &pod.orca_raw {
                    Some(raw) => raw.clone(),
                    None => header_value(&pod.probe_report()),
                };
                response.headers_mut().insert(ORCA_HEADER, report);
                return Ok(response);
            }
            let saw_endpoint = request.headers().get(&pod.endpoint_header).cloned();
            std::future::poll_fn(|cx| {
                <TelemetryServer<PodService> as Service<http::Request<Incoming>>>::poll_ready(
                    &mut grpc, cx,
                )
            })
            .await?;
            let response = grpc.call(request).await?;
            let mut response = decorate(&pod, response);
            if let Some(value) = saw_endpoint {
                response.headers_mut().insert(SAW_ENDPOINT_HEADER, value);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tcp), service)
        .await;
    if let Err(error) = served {
        eprintln!("connection error: {error}");
    }
}

fn header_value(text: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(text).unwrap_or_else(|_| http::HeaderValue::from_static("invalid"))
}

/// Adds `x-pod`, `x-pod-zone` (and ORCA) to the response headers; ORCA also to trailers.
fn decorate(
    pod: &Arc<Pod>,
    response: http::Response<tonic::body::Body>,
) -> http::Response<PodBody> {
    let (mut parts, body) = response.into_parts();
    parts.headers.insert("x-pod", header_value(&pod.name));
    parts.headers.insert("x-pod-zone", header_value(&pod.zone));
    if let Some(format) = pod.orca {
        let (name, value) = pod.orca_header(format);
        parts.headers.insert(name, value);
    }
    let orca = pod.orca.map(|format| (pod.clone(), format));
    http::Response::from_parts(parts, PodBody { inner: body, orca })
}

/// Response body that stamps ORCA load into the trailers.
pub struct PodBody {
    inner: tonic::body::Body,
    orca: Option<(Arc<Pod>, OrcaFormat)>,
}

impl http_body::Body for PodBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let orca = self.orca.clone();
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match (frame.into_trailers(), orca) {
                    (Ok(mut trailers), Some((pod, format))) => {
                        let (name, value) = pod.orca_header(format);
                        trailers.insert(name, value);
                        http_body::Frame::trailers(trailers)
                    }
                    (Ok(trailers), None) => http_body::Frame::trailers(trailers),
                    (Err(data_frame), _) => data_frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone)]
struct PodService {
    pod: Arc<Pod>,
    stop: watch::Receiver<bool>,
}

fn stopped_status() -> Status {
    Status::unavailable("pod stopped")
}

/// Resolves when the pod's run is stopped (sender sent true or was dropped).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

type AckStream = Pin<Box<dyn futures_util::Stream<Item = Result<Ack, Status>> + Send>>;

/// State of one bidi stream: inbound readings and acks waiting for their release time.
struct AckState {
    pod: Arc<Pod>,
    inbound: Streaming<Reading>,
    inbound_done: bool,
    finished: bool,
    queue: VecDeque<(Instant, Ack)>,
    stop: watch::Receiver<bool>,
    _active: ActiveStream,
}

impl AckState {
    async fn next_ack(&mut self) -> Option<Result<Ack, Status>> {
        loop {
            if self.finished {
                return None;
            }
            let release = self.queue.front().map(|(at, _)| *at);
            if let Some(at) = release {
                if at <= Instant::now() {
                    return self.queue.pop_front().map(|(_, ack)| Ok(ack));
                }
            } else if self.inbound_done {
                return None;
            }
            tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => {
                    self.finished = true;
                    return Some(Err(stopped_status()));
                }
                _ = tokio::time::sleep_until(release.unwrap_or_else(Instant::now).into()), if release.is_some() => {}
                message = self.inbound.message(), if !self.inbound_done => match message {
                    Ok(Some(reading)) => {
                        let now = Instant::now();
                        self.pod.stats.record_message(&self.pod.stats.bidi, &reading, now);
                        let mut at = now + self.pod.ack_delay(now);
                        // Keep acks in order when the delay shrinks.
                        if let Some((last, _)) = self.queue.back() {
                            at = at.max(*last);
                        }
                        let ack = Ack {
                            seq: reading.seq,
                            pod: self.pod.name.clone(),
                            sent_unix_nanos: reading.sent_unix_nanos,
                        };
                        self.pod.stats.record_reply(&ack, now);
                        self.queue.push_back((at, ack));
                    }
                    Ok(None) => self.inbound_done = true,
                    Err(status) => {
                        self.pod.stats.record_inbound_error(&status);
                        self.finished = true;
                        return Some(Err(status));
                    }
                },
            }
        }
    }
}

#[tonic::async_trait]
impl Telemetry for PodService {
    async fn send(&self, request: Request<Reading>) -> Result<Response<Ack>, Status> {
        if *self.stop.borrow() {
            return Err(stopped_status());
        }
        let _active = ActiveStream::open(&self.pod, &self.pod.stats.unary);
        let reading = request.into_inner();
        let now = Instant::now();
        self.pod
            .stats
            .record_message(&self.pod.stats.unary, &reading, now);
        let delay = self.pod.ack_delay(now);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let ack = Ack {
            seq: reading.seq,
            pod: self.pod.name.clone(),
            sent_unix_nanos: reading.sent_unix_nanos,
        };
        self.pod.stats.record_reply(&ack, Instant::now());
        Ok(Response::new(ack))
    }

    async fn upload(
        &self,
        request: Request<Streaming<Reading>>,
    ) -> Result<Response<UploadSummary>, Status> {
        let _active = ActiveStream::open(&self.pod, &self.pod.stats.upload);
        let mut inbound = request.into_inner();
        let mut stop = self.stop.clone();
        let mut received = 0;
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return Err(stopped_status()),
                message = inbound.message() => match message {
                    Ok(Some(reading)) => {
                        self.pod.stats.record_message(&self.pod.stats.upload, &reading, Instant::now());
                        received += 1;
                    }
                    Ok(None) => break,
                    Err(status) => {
                        self.pod.stats.record_inbound_error(&status);
                        return Err(status);
                    }
                },
            }
        }
        Ok(Response::new(UploadSummary {
            received,
            pod: self.pod.name.clone(),
        }))
    }

    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<Reading>>,
    ) -> Result<Response<AckStream>, Status> {
        let state = AckState {
            pod: self.pod.clone(),
            inbound: request.into_inner(),
            inbound_done: false,
            finished: false,
            queue: VecDeque::new(),
            stop: self.stop.clone(),
            _active: ActiveStream::open(&self.pod, &self.pod.stats.bidi),
        };
        let acks = futures_util::stream::unfold(state, |mut state| async move {
            let next = state.next_ack().await?;
            Some((next, state))
        });
        Ok(Response::new(Box::pin(acks)))
    }
}

/// `--zones a=2,b=1` → [("a", 2), ("b", 1)] in the given order.
pub fn parse_zones(text: &str) -> anyhow::Result<Vec<(String, usize)>> {
    let mut zones = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((zone, count)) = part.split_once('=') else {
            bail!("bad zone spec {part:?}: expected ZONE=COUNT");
        };
        let zone = zone.trim();
        if zone.is_empty()
            || !zone
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("bad zone name {zone:?}: use letters, digits, '-' or '_'");
        }
        let count: usize = count
            .trim()
            .parse()
            .with_context(|| format!("bad pod count in {part:?}"))?;
        if zones.iter().any(|(z, _): &(String, usize)| z == zone) {
            bail!("zone {zone:?} given twice");
        }
        zones.push((zone.to_string(), count));
    }
    if zones.iter().map(|(_, n)| n).sum::<usize>() == 0 {
        bail!("--zones names no pods");
    }
    Ok(zones)
}

#[derive(Debug, Clone)]
pub struct PodsConfig {
    pub zones: Vec<(String, usize)>,
    /// msgs/s per pod (0 = unlimited), unless `zone_capacity` names the pod's zone.
    pub capacity: f64,
    /// Per-zone capacity, over `capacity`.
    pub zone_capacity: Vec<(String, f64)>,
    /// Report ORCA load in this form (`None`: no report).
    pub orca: Option<OrcaFormat>,
    /// Bytes sent as every `endpoint-load-metrics` value instead of the report (a backend that
    /// sends garbage, for tests).
    pub orca_raw: Option<Vec<u8>>,
    /// Request header to echo as `x-pod-saw-endpoint-header` (see the module doc).
    pub endpoint_header: http::HeaderName,
}

/// The form of the pods' ORCA load report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrcaFormat {
    /// `endpoint-load-metrics: TEXT application_utilization=…, rps_fractional=…`.
    Text,
    /// `endpoint-load-metrics-bin: <base64 OrcaLoadReport protobuf>`, as gRPC servers send it.
    Bin,
}

pub const ORCA_HEADER: &str = "endpoint-load-metrics";
/// The path a pod answers load probes on (what streamlb probes by default).
pub const LOAD_PATH: &str = streamlb_core::config::DEFAULT_LOAD_PATH;
pub const ORCA_BIN_HEADER: &str = "endpoint-load-metrics-bin";

impl PodsConfig {
    /// Capacity of a pod in `zone`.
    pub fn capacity_of(&self, zone: &str) -> f64 {
        self.zone_capacity
            .iter()
            .find(|(z, _)| z == zone)
            .map_or(self.capacity, |(_, c)| *c)
    }
}

/// `--zone-capacity a=300,b=600` → [("a", 300.0), ("b", 600.0)]; every zone must be in `zones`
/// and every value a finite number >= 0.
pub fn parse_zone_capacity(
    text: &str,
    zones: &[(String, usize)],
) -> anyhow::Result<Vec<(String, f64)>> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((zone, value)) = part.split_once('=') else {
            bail!("bad zone capacity {part:?}: expected ZONE=MSGS_PER_S");
        };
        let zone = zone.trim();
        if !zones.iter().any(|(z, _)| z == zone) {
            bail!("--zone-capacity names zone {zone:?}, which --zones does not have");
        }
        if out.iter().any(|(z, _)| z == zone) {
            bail!("zone {zone:?} given twice in --zone-capacity");
        }
        let capacity: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("bad capacity in {part:?}"))?;
        if !(capacity.is_finite() && capacity >= 0.0) {
            bail!("capacity in {part:?} must be >= 0");
        }
        out.push((zone.to_string(), capacity));
    }
    Ok(out)
}

/// The Gateway API Inference Extension endpoint-picker header (what override_host reads).
pub const DEFAULT_ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";
/// Response header naming the endpoint header value a pod received.
pub const SAW_ENDPOINT_HEADER: &str = "x-pod-saw-endpoint-header";

/// Where the pods and the control server listen (`--host`, `--base-port`, `--control-port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// Address every pod and the control server bind.
    pub host: IpAddr,
    /// 0: every pod binds port 0 (any free port). N > 0: pod i (ready-line order) binds N + i.
    pub base_port: u16,
    /// Control server port; None: `base_port + CONTROL_PORT_OFFSET` if `base_port` > 0, else 0.
    pub control_port: Option<u16>,
}

/// With `--base-port N` and no `--control-port`, the control server binds N + 100.
pub const CONTROL_PORT_OFFSET: u16 = 100;

impl Default for Listen {
    /// 127.0.0.1, every port chosen by the kernel.
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            base_port: 0,
            control_port: None,
        }
    }
}

impl Listen {
    fn pod_address(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.host, port)
    }

    /// The addresses of `pods` pods (in ready-line order) and of the control server; errors if
    /// a fixed port would pass 65535 or the control port falls among the pod ports.
    pub fn addresses(&self, pods: usize) -> anyhow::Result<(Vec<SocketAddr>, SocketAddr)> {
        let pod_ports: Vec<u16> = if self.base_port == 0 {
            vec![0; pods]
        } else {
            (0..pods)
                .map(|i| u16::try_from(usize::from(self.base_port) + i).ok())
                .collect::<Option<_>>()
                .with_context(|| {
                    format!(
                        "--base-port {}: {pods} pods pass port 65535",
                        self.base_port
                    )
                })?
        };
        let control_port = match self.control_port {
            Some(port) => port,
            None if self.base_port == 0 => 0,
            None => self
                .base_port
                .checked_add(CONTROL_PORT_OFFSET)
                .with_context(|| {
                    format!(
                        "--base-port {}: control port base+{CONTROL_PORT_OFFSET} passes 65535; give --control-port",
                        self.base_port
                    )
                })?,
        };
        if control_port != 0 && pod_ports.contains(&control_port) {
            bail!("control port {control_port} is also a pod port; give another --control-port");
        }
        Ok((
            pod_ports.iter().map(|&p| self.pod_address(p)).collect(),
            self.pod_address(control_port),
        ))
    }
}

/// All pods plus the control server.
pub struct Fleet {
    pub pods: Vec<Arc<Pod>>,
    pub control: SocketAddr,
    control_task: JoinHandle<()>,
}

#[derive(Serialize)]
struct ReadyPod<'a> {
    name: &'a str,
    zone: &'a str,
    address: String,
}

#[derive(Serialize)]
struct Ready<'a> {
    control: String,
    pods: Vec<ReadyPod<'a>>,
}

impl Fleet {
    /// Every pod and the control server on 127.0.0.1, ports chosen by the kernel.
    pub async fn launch(config: &PodsConfig) -> anyhow::Result<Self> {
        Self::launch_on(config, &Listen::default()).await
    }

    /// Every pod and the control server at the addresses `listen` gives.
    pub async fn launch_on(config: &PodsConfig, listen: &Listen) -> anyhow::Result<Self> {
        let total = config.zones.iter().map(|(_, n)| n).sum();
        let (pod_addresses, control_address) = listen.addresses(total)?;
        let names = config
            .zones
            .iter()
            .flat_map(|(zone, count)| (0..*count).map(move |index| (zone, index)));
        let mut pods = Vec::new();
        for ((zone, index), address) in names.zip(pod_addresses) {
            let name = format!("{zone}-{index}");
            pods.push(Pod::launch_at(name, zone.clone(), config, address).await?);
        }
        let listener = bind(control_address)?;
        let control = listener
            .local_addr()
            .context("reading the control address")?;
        let control_task = tokio::spawn(control_loop(listener, pods.clone()));
        Ok(Self {
            pods,
            control,
            control_task,
        })
    }

    /// The one JSON line printed when everything is ready.
    pub fn ready_line(&self) -> String {
        let ready = Ready {
            control: self.control.to_string(),
            pods: self
                .pods
                .iter()
                .map(|p| ReadyPod {
                    name: &p.name,
                    zone: &p.zone,
                    address: p.address.to_string(),
                })
                .collect(),
        };
        serde_json::to_string(&ready).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn shutdown(self) {
        self.control_task.abort();
        for pod in &self.pods {
            pod.stop();
        }
    }
}

async fn control_loop(listener: TcpListener, pods: Vec<Arc<Pod>>) {
    let pods = Arc::new(pods);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let pods = pods.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let pods = pods.clone();
                            async move { Ok::<_, Infallible>(control(&pods, request).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
                Err(error) => {
                    eprintln!("control: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn json_response(status: http::StatusCode, body: impl Serialize) -> http::Response<Full<Bytes>> {
    let text = serde_json::to_string(&body)
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
    let mut response = http::Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn control(
    pods: &[Arc<Pod>],
    request: http::Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    use http::{Method, StatusCode};
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    // Drain the request body (ignored).
    let _ = request.into_body().collect().await;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["stats"]) => {
            let stats = Stats {
                pods: pods.iter().map(|p| p.snapshot()).collect(),
            };
            json_response(StatusCode::OK, stats)
        }
        (&Method::POST, ["pods", name, "capacity", value]) => {
            let Some(pod) = pods.iter().find(|p| p.name == *name) else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({ "error": format!("unknown pod {name:?}") }),
                );
            };
            match value.parse::<f64>() {
                Ok(c) if c.is_finite() && c >= 0.0 => {
                    pod.set_capacity(c);
                    eprintln!("pod {name}: capacity {c}");
                    json_response(
                        StatusCode::OK,
                        serde_json::json!({ "pod": name, "capacity": c }),
                    )
                }
                _ => json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": format!("capacity must be a number >= 0, got {value:?}") }),
                ),
            }
        }
        (&Method::POST, ["pods", name, action @ ("stop" | "start")]) => {
            let Some(pod) = pods.iter().find(|p| p.name == *name) else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({ "error": format!("unknown pod {name:?}") }),
                );
            };
            let changed = if *action == "stop" {
                Ok(pod.stop())
            } else {
                pod.start()
            };
            match changed {
                Ok(changed) => {
                    eprintln!("pod {name}: {action} (changed: {changed})");
                    json_response(
                        StatusCode::OK,
                        serde_json::json!({ "pod": name, "up": pod.is_up(), "changed": changed }),
                    )
                }
                Err(error) => json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": format!("{action} {name}: {error:#}") }),
                ),
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no route {method} {path}; use GET /stats, POST /pods/NAME/stop|start, POST /pods/NAME/capacity/MSGS_PER_S") }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_counts_the_last_second_only() {
        let window = RateWindow::new();
        let t0 = window.origin;
        for i in 0..50 {
            window.record(t0 + Duration::from_millis(i * 10)); // 50 msgs in 0..0.5 s
        }
        assert_eq!(window.rate(t0 + Duration::from_millis(600)), 50.0);
        // 1.55 s later the buckets of 0..0.5 s have left the window.
        assert_eq!(window.rate(t0 + Duration::from_millis(1550)), 0.0);
    }

    #[test]
    fn a_pod_counts_grpc_bytes_per_second_both_ways_for_its_load_report() {
        let stats = PodStats::new();
        let t0 = stats.bytes_window.origin;
        let reading = crate::proto::Reading {
            payload: bytes::Bytes::from(vec![0u8; 100]),
            ..Default::default()
        };
        let ack = Ack {
            seq: 1,
            pod: "a-0".into(),
            sent_unix_nanos: 1,
        };
        for i in 0..3 {
            let now = t0 + Duration::from_millis(i * 100);
            stats.record_message(&stats.bidi, &reading, now);
            stats.record_reply(&ack, now);
        }
        let at = t0 + Duration::from_millis(400);
        // Each way a 5-byte gRPC prefix and the encoded message: a reading of 100 payload bytes
        // encodes to 102 (tag, length), the ack to 9 (seq 2, pod "a-0" 5, sent 2).
        let per_exchange = (5 + 102) + (5 + 9);
        assert_eq!(stats.bytes_window.rate(at), 3.0 * per_exchange as f64);
        assert_eq!(stats.window.rate(at), 3.0);
    }

    #[test]
    fn listen_addresses_default_fixed_and_invalid() {
        let any = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let default = Listen::default().addresses(3).ok();
        assert_eq!(default, Some((vec![any(0); 3], any(0))));
        let fixed = Listen {
            base_port: 50051,
            ..Listen::default()
        };
        let (pods, control) = fixed.addresses(3).unwrap();
        assert_eq!(pods, vec![any(50051), any(50052), any(50053)]);
        assert_eq!(control, any(50151));
        let own_control = Listen {
            control_port: Some(9000),
            ..fixed
        };
        assert_eq!(own_control.addresses(3).unwrap().1, any(9000));
        let host = Listen {
            host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ..fixed
        };
        assert_eq!(host.addresses(1).unwrap().0[0].to_string(), "0.0.0.0:50051");
        // Past 65535, or a control port among the pod ports.
        let high = Listen {
            base_port: 65534,
            control_port: Some(1000),
            ..fixed
        };
        assert!(high.addresses(2).is_ok());
        assert!(high.addresses(3).is_err());
        let no_room_for_control = Listen {
            base_port: 65500,
            ..fixed
        };
        assert!(no_room_for_control.addresses(1).is_err());
        assert!(fixed.addresses(100).is_ok());
        assert!(fixed.addresses(101).is_err());
        let clash = Listen {
            control_port: Some(50052),
            ..fixed
        };
        assert!(clash.addresses(2).is_err());
        assert!(clash.addresses(1).is_ok());
    }

    /// GET `path` from the control server; the whole HTTP/1.1 response as text.
    async fn http_get(address: SocketAddr, path: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        tcp.read_to_string(&mut response).await?;
        Ok(response)
    }

    /// A fleet on 127.0.0.1 with a base port that was free a moment ago (retried on a race).
    async fn launch_fixed(config: &PodsConfig) -> (Fleet, u16) {
        let mut errors = Vec::new();
        for _ in 0..20 {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base_port = probe.local_addr().unwrap().port();
            drop(probe);
            let listen = Listen {
                base_port,
                ..Listen::default()
            };
            match Fleet::launch_on(config, &listen).await {
                Ok(fleet) => return (fleet, base_port),
                Err(error) => errors.push(format!("{error:#}")),
            }
        }
        panic!("no free base port: {errors:?}");
    }

    #[tokio::test]
    async fn fixed_ports_are_bound_in_ready_line_order_and_kept_across_restart() {
        let config = PodsConfig {
            zones: vec![("a".into(), 2), ("b".into(), 1)],
            capacity: 0.0,
            zone_capacity: Vec::new(),
            orca: None,
            orca_raw: None,
            endpoint_header: http::HeaderName::from_static(DEFAULT_ENDPOINT_HEADER),
        };
        let (fleet, base) = launch_fixed(&config).await;
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let ready: serde_json::Value = serde_json::from_str(&fleet.ready_line()).unwrap();
        let expected = serde_json::json!({
            "control": at(base + 100).to_string(),
            "pods": [
                {"name": "a-0", "zone": "a", "address": at(base).to_string()},
                {"name": "a-1", "zone": "a", "address": at(base + 1).to_string()},
                {"name": "b-0", "zone": "b", "address": at(base + 2).to_string()},
            ],
        });
        assert_eq!(ready, expected);
        for pod in &fleet.pods {
            assert!(
                TcpStream::connect(pod.address).await.is_ok(),
                "{}",
                pod.name
            );
        }
        let stats = http_get(at(base + 100), "/stats").await.unwrap();
        assert!(stats.starts_with("HTTP/1.1 200"), "{stats}");
        assert!(
            stats.contains(&format!("\"address\":\"{}\"", at(base + 2))),
            "{stats}"
        );

        // A second fleet on the same ports fails on the first one taken.
        let taken = Listen {
            base_port: base,
            ..Listen::default()
        };
        let error = Fleet::launch_on(&config, &taken).await.err().unwrap();
        assert!(
            format!("{error:#}").contains(&format!("binding {}", at(base))),
            "{error:#}"
        );

        // Stop and start: the same fixed port again.
        let pod = fleet.pods.get(1).unwrap().clone();
        assert!(pod.stop());
        // The aborted accept task drops its listener when the runtime next polls it.
        let mut refused = false;
        for _ in 0..200 {
            if TcpStream::connect(at(base + 1)).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "a stopped pod still accepts");
        assert!(pod.start().unwrap());
        assert_eq!(pod.address, at(base + 1));
        assert!(TcpStream::connect(at(base + 1)).await.is_ok());
        fleet.shutdown();
    }

    #[tokio::test]
    async fn each_zone_gets_its_own_capacity() {
        let zones = parse_zones("a=2,b=1,c=1").unwrap();
        let zone_capacity = parse_zone_capacity("a=300, b=600", &zones).unwrap();
        let config = PodsConfig {
            zones,
            capacity: 50.0,
            zone_capacity,
            orca: Some(OrcaFormat::Text),
            orca_raw: None,
            endpoint_header: http::HeaderName::from_static(DEFAULT_ENDPOINT_HEADER),
        };
        let fleet = Fleet::launch_on(&config, &Listen::default()).await.unwrap();
        let capacities: Vec<(&str, f64)> = fleet
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.capacity()))
            .collect();
        assert_eq!(
            capacities,
            [
                ("a-0", 300.0),
                ("a-1", 300.0),
                ("b-0", 600.0),
                ("c-0", 50.0)
            ]
        );
        // ORCA utilisation is relative to the pod's own capacity.
        assert_eq!(fleet.pods[2].utilization(300.0), 0.5);
        fleet.shutdown();
    }

    #[test]
    fn zone_capacity_rejects_unknown_zones_and_bad_values() {
        let zones = parse_zones("a=1,b=1").unwrap();
        assert_eq!(parse_zone_capacity("", &zones).unwrap(), Vec::new());
        for bad in ["x=1", "a", "a=-1", "a=nan", "a=inf", "a=1,a=2", "a=fast"] {
            assert!(parse_zone_capacity(bad, &zones).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn zones_parse_in_order_and_reject_garbage() {
        let zones = parse_zones("a=2,b=1").ok();
        assert_eq!(zones, Some(vec![("a".into(), 2), ("b".into(), 1)]));
        for bad in ["a", "a=x", "a=1,a=2", "=1", "a=0", "a b=1"] {
            assert!(parse_zones(bad).is_err(), "{bad} accepted");
        }
    }
}
