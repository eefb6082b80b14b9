//! `lab devices`: M long-lived gRPC streams, one per simulated device, each sending open-loop
//! at its own rate; honest per-stream loss accounting (see `ledger`) and ack latency
//! (ack receive time - intended send time).

use crate::hist::Histogram;
use crate::ledger::{Counts, Ledger};
use crate::proto::telemetry_client::TelemetryClient;
use crate::proto::Reading;
use crate::rates::{stream_rates, RateDist};
use crate::rng::SplitMix64;
use anyhow::{bail, Context};
use bytes::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How long to wait for outstanding acks after the send phase ends (streams half-closed).
pub const DRAIN: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Pseudo status recorded when the drain wait ran out before the stream ended.
pub const DRAIN_TIMEOUT: &str = "DRAIN_TIMEOUT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `Stream`: one ack per reading.
    Bidi,
    /// `Upload`: client-streaming, one summary at the end.
    Upload,
}

impl FromStr for Kind {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> anyhow::Result<Self> {
        match text {
            "bidi" => Ok(Self::Bidi),
            "upload" => Ok(Self::Upload),
            _ => bail!("unknown kind {text:?}: use bidi or upload"),
        }
    }
}

/// `NAME:VALUE` request header.
#[derive(Debug, Clone)]
pub struct Header {
    pub name: AsciiMetadataKey,
    pub value: AsciiMetadataValue,
}

impl FromStr for Header {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> anyhow::Result<Self> {
        let Some((name, value)) = text.split_once(':') else {
            bail!("bad header {text:?}: expected NAME:VALUE");
        };
        Ok(Self {
            name: AsciiMetadataKey::from_str(&name.trim().to_ascii_lowercase())
                .with_context(|| format!("bad header name {name:?}"))?,
            value: AsciiMetadataValue::from_str(value.trim())
                .with_context(|| format!("bad header value {value:?}"))?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct DevicesConfig {
    /// host:port of the gRPC server (h2c).
    pub target: String,
    pub streams: usize,
    pub mean_rate: f64,
    pub rate_dist: RateDist,
    pub duration: Duration,
    pub kind: Kind,
    pub payload: usize,
    pub seed: u64,
    pub headers: Vec<Header>,
    pub record_headers: Vec<String>,
    pub reconnect: bool,
    pub device_prefix: String,
    pub ramp: Duration,
    pub progress: bool,
    /// Reconnect storms: at each of these offsets from the start (each below `duration`),
    /// every open stream half-closes, waits for its acks and reconnects at once.
    pub storm_at: Vec<Duration>,
}

/// One device stream in the final report.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub device: String,
    pub rate: f64,
    /// Pod (`x-pod`) of each attempt, null when the attempt got no response headers.
    pub pods: Vec<Option<String>>,
    /// `x-pod-zone` of the last attempt that had one.
    pub zone: Option<String>,
    /// Recorded response headers of the last attempt that had them.
    pub headers: BTreeMap<String, String>,
    #[serde(flatten)]
    pub counts: Counts,
    /// New attempts after the first: after a failure, or for a storm.
    pub reconnects: u64,
    /// Reconnects for a storm (`--storm-at`).
    pub storm_reconnects: u64,
    /// Acks received per pod (`x-pod` of the attempt that got them).
    pub acked_by_pod: BTreeMap<String, u64>,
    /// How each attempt ended: gRPC code names ("OK", "UNAVAILABLE", ...) or DRAIN_TIMEOUT.
    pub statuses: BTreeMap<String, u64>,
    /// Message of the last failed attempt.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    #[serde(flatten)]
    pub counts: Counts,
    pub reconnects: u64,
    pub storm_reconnects: u64,
    pub statuses: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyMs {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub kind: Kind,
    pub rate_dist: String,
    pub mean_rate: f64,
    pub seed: u64,
    pub streams: Vec<StreamReport>,
    pub totals: Totals,
    /// Bidi only (upload has no per-reading ack): ack time - intended send time.
    pub latency_ms: LatencyMs,
    pub duration_s: f64,
}

/// Sums of `streams`.
pub fn totals(streams: &[StreamReport]) -> Totals {
    let mut totals = Totals::default();
    for stream in streams {
        let (t, c) = (&mut totals.counts, &stream.counts);
        t.generated += c.generated;
        t.sent += c.sent;
        t.acked += c.acked;
        t.failed += c.failed;
        t.resent += c.resent;
        t.unacked += c.unacked;
        t.lost += c.lost;
        t.unsent += c.unsent;
        totals.reconnects += stream.reconnects;
        totals.storm_reconnects += stream.storm_reconnects;
        for (status, n) in &stream.statuses {
            *totals.statuses.entry(status.clone()).or_default() += n;
        }
    }
    totals
}

/// gRPC code name as in the spec ("UNAVAILABLE").
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// UNAVAILABLE, INTERNAL, and UNKNOWN (how tonic reports most transport errors) reconnect.
fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Internal | Code::Unknown)
}

/// Live totals for `--progress`.
#[derive(Default)]
struct Live {
    sent: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    reconnects: AtomicU64,
    open: AtomicU64,
}

struct Shared {
    config: DevicesConfig,
    endpoint: Endpoint,
    /// Run start; intended send times are offsets from it.
    base: Instant,
    base_unix_nanos: u64,
    /// Send phase ends here; the drain wait ends at `end + DRAIN`.
    end: Instant,
    /// Storm instants, ascending, all before `end`.
    storms: Vec<Instant>,
    payload: Bytes,
    latency: Histogram,
    live: Live,
}

/// Open-loop send schedule of one stream.
struct Schedule {
    next: Instant,
    interval: Duration,
    end: Instant,
}

impl Schedule {
    fn active(&self) -> bool {
        self.next < self.end
    }

    /// Puts every reading due by `now` into the ledger.
    fn generate_due(&mut self, now: Instant, base: Instant, ledger: &mut Ledger) {
        while self.active() && self.next <= now {
            ledger.generate(self.next.duration_since(base).as_nanos() as u64);
            self.next += self.interval;
        }
    }
}

enum Outcome {
    /// The stream ended with OK (or the drain timed out, when `timed_out`); `storm`: it was
    /// half-closed for a storm, not at the end of the send phase.
    Clean {
        timed_out: bool,
        storm: bool,
    },
    Failed(Status),
}

struct Device {
    shared: Arc<Shared>,
    name: String,
    metadata: MetadataMap,
    schedule: Schedule,
    ledger: Ledger,
    report: StreamReport,
    /// x-pod of the current attempt.
    attempt_pod: Option<String>,
    /// Index of the next storm in `shared.storms`.
    next_storm: usize,
}

impl Device {
    fn record_headers(&mut self, metadata: &MetadataMap) {
        // A `-bin` value is kept as sent on the wire (base64).
        let text = |name: &str| {
            if name.ends_with("-bin") {
                let v = metadata.get_bin(name)?;
                return Some(String::from_utf8_lossy(v.as_encoded_bytes()).into_owned());
            }
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if let Some(pod) = text("x-pod") {
            self.attempt_pod = Some(pod);
        }
        if let Some(zone) = text("x-pod-zone") {
            self.report.zone = Some(zone);
        }
        let names = ["x-pod", "x-pod-zone"]
            .into_iter()
            .chain(self.shared.config.record_headers.iter().map(String::as_str));
        for name in names {
            if let Some(value) = text(name) {
                self.report.headers.insert(name.to_string(), value);
            }
        }
    }

    /// Moves due readings (and queued resends) onto the stream, if one is open.
    fn send_ready(&mut self, tx: &Option<mpsc::UnboundedSender<Reading>>) {
        let Some(tx) = tx else {
            return;
        };
        let outgoing = self.ledger.take_to_send();
        self.shared
            .live
            .sent
            .fetch_add(outgoing.len() as u64, Ordering::Relaxed);
        for out in outgoing {
            let reading = Reading {
                device_id: self.name.clone(),
                seq: out.entry.seq,
                sent_unix_nanos: self.shared.base_unix_nanos + out.entry.due_nanos,
                payload: self.shared.payload.clone(),
            };
            // A closed receiver means the call already ended; the outcome reports it.
            let _ = tx.send(reading);
        }
    }

    fn count_acks_of_pod(&mut self, acked: u64) {
        if let (Some(pod), true) = (&self.attempt_pod, acked > 0) {
            *self.report.acked_by_pod.entry(pod.clone()).or_default() += acked;
        }
    }

    fn next_storm(&self) -> Option<Instant> {
        self.shared.storms.get(self.next_storm).copied()
    }

    /// When the open stream next needs attention: a reading due, or a storm.
    fn wake(&self) -> Instant {
        match self.next_storm() {
            Some(storm) => storm.min(self.schedule.next),
            None => self.schedule.next,
        }
    }

    /// Whether an open stream must half-close now: the send phase is over, or a storm is due
    /// (which is then consumed and `storm` set).
    fn close_due(&mut self, open: bool, storm: &mut bool) -> bool {
        if !open {
            return false;
        }
        if !self.schedule.active() {
            return true;
        }
        if self.next_storm().is_some_and(|at| Instant::now() >= at) {
            self.next_storm += 1;
            *storm = true;
            return true;
        }
        false
    }

    fn on_ack(&mut self, seq: u64) {
        if let Some(entry) = self.ledger.ack(seq) {
            self.count_acks_of_pod(1);
            self.shared.live.acked.fetch_add(1, Ordering::Relaxed);
            let due = self.shared.base + Duration::from_nanos(entry.due_nanos);
            let latency = Instant::now().saturating_duration_since(due);
            self.shared.latency.record(latency.as_micros() as u64);
        }
    }

    /// Generates on schedule (no stream open) until `until`.
    async fn idle_until(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            self.schedule
                .generate_due(now, self.shared.base, &mut self.ledger);
            if now >= until {
                return;
            }
            let wake = if self.schedule.active() {
                self.schedule.next.min(until)
            } else {
                until
            };
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Connects (TCP + HTTP/2 handshake) while readings keep coming due; nothing is written
    /// to a connection that could not be established.
    async fn connect(&mut self) -> Result<Channel, Status> {
        let shared = self.shared.clone();
        let connecting = shared.endpoint.connect();
        tokio::pin!(connecting);
        loop {
            let wake = if self.schedule.active() {
                self.schedule.next
            } else {
                shared.end + DRAIN
            };
            tokio::select! {
                connected = &mut connecting => {
                    return connected.map_err(|e| Status::from_error(Box::new(e)));
                }
                _ = tokio::time::sleep_until(wake) => {
                    self.schedule.generate_due(Instant::now(), shared.base, &mut self.ledger);
                }
            }
        }
    }

    /// One call: connect, send (resends first), read acks, half-close at the end of the send
    /// phase or at a storm, wait for the server to finish or the drain deadline.
    async fn attempt(&mut self) -> Outcome {
        let shared = self.shared.clone();
        let channel = match self.connect().await {
            Ok(channel) => channel,
            Err(status) => return Outcome::Failed(status),
        };
        // A storm that passed while this device was not connected is already this new stream.
        let now = Instant::now();
        while self.next_storm().is_some_and(|at| at <= now) {
            self.next_storm += 1;
        }
        let mut storm = false;
        let mut client = TelemetryClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tx = Some(tx);
        self.schedule
            .generate_due(Instant::now(), shared.base, &mut self.ledger);
        self.send_ready(&tx);
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        *request.metadata_mut() = self.metadata.clone();
        let drain_deadline = shared.end + DRAIN;
        let tick = tokio::time::sleep_until(self.wake());
        tokio::pin!(tick);
        let drain = tokio::time::sleep_until(drain_deadline);
        tokio::pin!(drain);
        match shared.config.kind {
            Kind::Bidi => {
                let call = client.stream(request);
                tokio::pin!(call);
                let mut inbound = None;
                loop {
                    if self.close_due(tx.is_some(), &mut storm) {
                        tx = None; // half-close
                        if storm {
                            drain
                                .as_mut()
                                .reset((Instant::now() + DRAIN).min(drain_deadline));
                        }
                    }
                    tokio::select! {
                        _ = &mut tick, if tx.is_some() => {
                            self.schedule.generate_due(Instant::now(), shared.base, &mut self.ledger);
                            self.send_ready(&tx);
                            tick.as_mut().reset(self.wake());
                        }
                        response = &mut call, if inbound.is_none() => match response {
                            Ok(response) => {
                                self.record_headers(response.metadata());
                                inbound = Some(response.into_inner());
                            }
                            Err(status) => {
                                self.record_headers(status.metadata());
                                return Outcome::Failed(status);
                            }
                        },
                        message = next_message(&mut inbound), if inbound.is_some() => match message {
                            Ok(Some(ack)) => self.on_ack(ack.seq),
                            Ok(None) => return Outcome::Clean { timed_out: false, storm },
                            Err(status) => return Outcome::Failed(status),
                        },
                        _ = &mut drain => return Outcome::Clean { timed_out: true, storm },
                    }
                }
            }
            Kind::Upload => {
                let call = client.upload(request);
                tokio::pin!(call);
                loop {
                    if self.close_due(tx.is_some(), &mut storm) {
                        tx = None;
                        if storm {
                            drain
                                .as_mut()
                                .reset((Instant::now() + DRAIN).min(drain_deadline));
                        }
                    }
                    tokio::select! {
                        _ = &mut tick, if tx.is_some() => {
                            self.schedule.generate_due(Instant::now(), shared.base, &mut self.ledger);
                            self.send_ready(&tx);
                            tick.as_mut().reset(self.wake());
                        }
                        response = &mut call => match response {
                            Ok(response) => {
                                self.record_headers(response.metadata());
                                let received = response.into_inner().received;
                                let before = self.ledger.counts().acked;
                                self.ledger.ack_upload(received);
                                let acked = self.ledger.counts().acked - before;
                                self.count_acks_of_pod(acked);
                                shared.live.acked.fetch_add(acked, Ordering::Relaxed);
                                return Outcome::Clean { timed_out: false, storm };
                            }
                            Err(status) => {
                                self.record_headers(status.metadata());
                                return Outcome::Failed(status);
                            }
                        },
                        _ = &mut drain => return Outcome::Clean { timed_out: true, storm },
                    }
                }
            }
        }
    }

    async fn run(mut self, start: Instant) -> StreamReport {
        tokio::time::sleep_until(start).await;
        let shared = self.shared.clone();
        let drain_deadline = shared.end + DRAIN;
        let mut backoff = BACKOFF_START;
        shared.live.open.fetch_add(1, Ordering::Relaxed);
        loop {
            self.attempt_pod = None;
            let outcome = self.attempt().await;
            self.report.pods.push(self.attempt_pod.take());
            let status = match outcome {
                Outcome::Clean { timed_out, storm } => {
                    self.ledger.end_clean();
                    let status = if timed_out { DRAIN_TIMEOUT } else { "OK" };
                    if storm && Instant::now() < shared.end {
                        // Straight back, like every other device: that is the storm.
                        *self.report.statuses.entry(status.to_string()).or_default() += 1;
                        self.report.reconnects += 1;
                        self.report.storm_reconnects += 1;
                        shared.live.reconnects.fetch_add(1, Ordering::Relaxed);
                        backoff = BACKOFF_START;
                        continue;
                    }
                    status
                }
                Outcome::Failed(status) => {
                    let failed = self.ledger.attempt_failed();
                    shared.live.failed.fetch_add(failed, Ordering::Relaxed);
                    let name = code_name(status.code());
                    let connected = self.report.pods.last().is_some_and(Option::is_some);
                    if connected {
                        backoff = BACKOFF_START;
                    }
                    let now = Instant::now();
                    let retry = shared.config.reconnect
                        && retryable(status.code())
                        && (now < shared.end
                            || (now < drain_deadline
                                && self.ledger.counts().failed > self.ledger.counts().resent));
                    *self.report.statuses.entry(name.to_string()).or_default() += 1;
                    self.report.last_error = Some(format!("{name}: {}", status.message()));
                    if retry {
                        self.idle_until(now + backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_CAP);
                        self.report.reconnects += 1;
                        shared.live.reconnects.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if shared.config.progress {
                        eprintln!("{}: gave up after {name}: {}", self.name, status.message());
                    }
                    break;
                }
            };
            *self.report.statuses.entry(status.to_string()).or_default() += 1;
            break;
        }
        shared.live.open.fetch_sub(1, Ordering::Relaxed);
        self.report.counts = self.ledger.finish();
        self.report
    }
}

async fn next_message<T>(inbound: &mut Option<tonic::Streaming<T>>) -> Result<Option<T>, Status> {
    match inbound {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn millis(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Runs the whole simulation and returns the report.
pub async fn run(config: DevicesConfig) -> anyhow::Result<Report> {
    if config.streams == 0 {
        bail!("--streams must be at least 1");
    }
    if !(config.mean_rate.is_finite() && config.mean_rate > 0.0) {
        bail!("--mean-rate must be a positive number");
    }
    let endpoint = Endpoint::from_shared(format!("http://{}", config.target))
        .with_context(|| format!("bad --target {:?}", config.target))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let mut rng = SplitMix64::new(config.seed);
    let mut storm_at = config.storm_at.clone();
    storm_at.sort();
    if let Some(last) = storm_at.last() {
        if *last >= config.duration {
            bail!(
                "--storm-at {}s is not within --duration {}s",
                last.as_secs_f64(),
                config.duration.as_secs_f64()
            );
        }
    }
    let rates = stream_rates(config.rate_dist, config.streams, config.mean_rate, &mut rng);
    let base = Instant::now();
    let shared = Arc::new(Shared {
        endpoint,
        base,
        base_unix_nanos: unix_nanos_now(),
        end: base + config.duration,
        storms: storm_at.iter().map(|at| base + *at).collect(),
        payload: Bytes::from(vec![0x5a; config.payload]),
        latency: Histogram::new(),
        live: Live::default(),
        config,
    });
    let config = &shared.config;
    let mut tasks = Vec::with_capacity(config.streams);
    for (index, rate) in rates.iter().copied().enumerate() {
        let name = format!("{}-{index}", config.device_prefix);
        let mut metadata = MetadataMap::new();
        for header in &config.headers {
            metadata.append(header.name.clone(), header.value.clone());
        }
        let device_value = AsciiMetadataValue::from_str(&name)
            .with_context(|| format!("device id {name:?} is not a valid header value"))?;
        metadata.insert("x-device-id", device_value);
        let start = base + config.ramp.mul_f64(index as f64 / config.streams as f64);
        let interval = Duration::from_secs_f64(1.0 / rate);
        // Random phase so streams that start together do not send in lockstep.
        let phase = interval.mul_f64(rng.next_f64());
        let device = Device {
            shared: shared.clone(),
            name: name.clone(),
            metadata,
            schedule: Schedule {
                next: start + phase,
                interval,
                end: shared.end,
            },
            ledger: Ledger::new(),
            report: StreamReport {
                device: name,
                rate,
                pods: Vec::new(),
                zone: None,
                headers: BTreeMap::new(),
                counts: Counts::default(),
                reconnects: 0,
                storm_reconnects: 0,
                acked_by_pod: BTreeMap::new(),
                statuses: BTreeMap::new(),
                last_error: None,
            },
            attempt_pod: None,
            next_storm: 0,
        };
        tasks.push(tokio::spawn(device.run(start)));
    }
    let progress = config
        .progress
        .then(|| tokio::spawn(progress_loop(shared.clone())));
    let mut streams = Vec::with_capacity(tasks.len());
    for task in tasks {
        streams.push(task.await.context("a device task failed")?);
    }
    if let Some(progress) = progress {
        progress.abort();
    }
    let latency = &shared.latency;
    Ok(Report {
        target: config.target.clone(),
        kind: config.kind,
        rate_dist: config.rate_dist.to_string(),
        mean_rate: config.mean_rate,
        seed: config.seed,
        totals: totals(&streams),
        streams,
        latency_ms: LatencyMs {
            count: latency.count(),
            p50: millis(latency.quantile(0.5)),
            p99: millis(latency.quantile(0.99)),
            p999: millis(latency.quantile(0.999)),
            max: millis(latency.max()),
        },
        duration_s: base.elapsed().as_secs_f64(),
    })
}

async fn progress_loop(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let live = &shared.live;
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        eprintln!(
            "devices t={:.0}s open={} sent={} acked={} failed={} reconnects={} p99_ms={:.1}",
            shared.base.elapsed().as_secs_f64(),
            load(&live.open),
            load(&live.sent),
            load(&live.acked),
            load(&live.failed),
            load(&live.reconnects),
            millis(shared.latency.quantile(0.99)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(sent: u64, acked: u64, failed: u64, status: &str) -> StreamReport {
        StreamReport {
            device: "d".into(),
            rate: 1.0,
            pods: vec![],
            zone: None,
            headers: BTreeMap::new(),
            counts: Counts {
                generated: sent,
                sent,
                acked,
                failed,
                ..Counts::default()
            },
            reconnects: failed.min(1),
            storm_reconnects: 0,
            acked_by_pod: BTreeMap::new(),
            statuses: BTreeMap::from([(status.to_string(), 1)]),
            last_error: None,
        }
    }

    #[test]
    fn totals_sum_every_stream_and_merge_statuses() {
        let streams = [
            stream(10, 10, 0, "OK"),
            stream(7, 4, 3, "UNAVAILABLE"),
            stream(5, 5, 0, "OK"),
        ];
        let t = totals(&streams);
        assert_eq!(
            (t.counts.sent, t.counts.acked, t.counts.failed),
            (22, 19, 3)
        );
        assert_eq!(t.reconnects, 1);
        assert_eq!(t.statuses.get("OK"), Some(&2));
        assert_eq!(t.statuses.get("UNAVAILABLE"), Some(&1));
    }

    #[test]
    fn headers_parse_and_reject_garbage() {
        let h: Header = "X-Tenant: blue".parse().expect("valid header");
        assert_eq!(h.name.as_str(), "x-tenant");
        assert_eq!(h.value.to_str().ok(), Some("blue"));
        assert!("novalue".parse::<Header>().is_err());
        assert!("bad name:v".parse::<Header>().is_err());
    }

    #[test]
    fn schedule_generates_every_due_reading_and_stops_at_the_end() {
        let base = Instant::now();
        let mut schedule = Schedule {
            next: base,
            interval: Duration::from_millis(100),
            end: base + Duration::from_millis(1000),
        };
        let mut ledger = Ledger::new();
        schedule.generate_due(base + Duration::from_millis(250), base, &mut ledger);
        assert_eq!(ledger.counts().generated, 3); // 0, 100, 200 ms
        schedule.generate_due(base + Duration::from_secs(60), base, &mut ledger);
        assert_eq!(ledger.counts().generated, 10);
        assert!(!schedule.active());
    }
}
