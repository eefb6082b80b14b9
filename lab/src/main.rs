//! `lab`: gRPC test pods (`lab pods`) and an IoT device simulator (`lab devices`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::time::Duration;
use streamlb_lab::devices::{self, DevicesConfig, Header, Kind};
use streamlb_lab::pods::{self, Fleet, Listen, PodsConfig};
use streamlb_lab::rates::RateDist;

#[derive(Parser)]
#[command(
    name = "lab",
    about = "streamlb lab: gRPC test pods and a device simulator"
)]
struct Cli {
    /// Tokio worker threads.
    #[arg(long, global = true, default_value_t = 2)]
    workers: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N gRPC pods (h2c, 127.0.0.1 by default) plus a JSON control API; prints one ready line.
    Pods {
        /// Pods per zone, e.g. a=2,b=2,c=2 (names a-0, a-1, b-0, ...).
        #[arg(long)]
        zones: String,
        /// Messages/s per pod before acks are delayed (0 = unlimited).
        #[arg(long, default_value_t = 0.0)]
        capacity: f64,
        /// Per-zone capacity over --capacity, e.g. a=300,b=600.
        #[arg(long, default_value = "")]
        zone_capacity: String,
        /// Report load in ORCA form (initial metadata and trailers).
        #[arg(long)]
        orca: bool,
        /// The ORCA form with --orca: `text` (`endpoint-load-metrics`) or `bin`
        /// (`endpoint-load-metrics-bin`, as gRPC servers send it).
        #[arg(long, value_enum, default_value_t = pods::OrcaFormat::Text)]
        orca_format: pods::OrcaFormat,
        /// Send these bytes (hex) as every `endpoint-load-metrics` value instead of the load
        /// report: a backend that sends garbage (implies ORCA on).
        #[arg(long)]
        orca_raw_hex: Option<String>,
        /// Request header echoed back as `x-pod-saw-endpoint-header` when a request carries it.
        #[arg(long, default_value = pods::DEFAULT_ENDPOINT_HEADER)]
        endpoint_header: String,
        /// Do not exit when stdin reaches EOF (by default a closed stdin stops the pods).
        #[arg(long)]
        ignore_stdin: bool,
        /// IP address every pod and the control server bind (0.0.0.0 in a container).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// First pod port: pods bind N, N+1, ... in ready-line order (0 = any free port each).
        #[arg(long, default_value_t = 0)]
        base_port: u16,
        /// Control server port (default: base-port + 100 with --base-port, else any free port).
        #[arg(long)]
        control_port: Option<u16>,
    },
    /// Simulate devices: one long-lived gRPC stream each, open-loop at per-stream rates.
    Devices {
        /// host:port of the gRPC server or proxy (h2c).
        #[arg(long)]
        target: String,
        #[arg(long)]
        streams: usize,
        /// Mean messages/s per stream.
        #[arg(long)]
        mean_rate: f64,
        /// constant | zipf:S | pareto:A
        #[arg(long, default_value = "constant")]
        rate_dist: RateDist,
        /// Seconds of sending (then half-close and wait up to 5 s for acks).
        #[arg(long)]
        duration: f64,
        /// bidi (Stream) | upload (Upload)
        #[arg(long, default_value = "bidi")]
        kind: Kind,
        /// Payload bytes per reading.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Seed for rates and phases (default: from the clock; echoed in the report).
        #[arg(long)]
        seed: Option<u64>,
        /// Extra request header NAME:VALUE (repeatable).
        #[arg(long = "header")]
        headers: Vec<Header>,
        /// Response header to record per stream besides x-pod and x-pod-zone (repeatable).
        #[arg(long = "record-header")]
        record_headers: Vec<String>,
        /// Reconnect on UNAVAILABLE/INTERNAL/UNKNOWN with backoff 50 ms doubling to 2 s,
        /// resending unacked readings first.
        #[arg(long)]
        reconnect: bool,
        #[arg(long, default_value = "dev")]
        device_prefix: String,
        /// Spread stream starts evenly over this many seconds.
        #[arg(long, default_value_t = 0.0)]
        ramp: f64,
        /// One status line per second on stderr.
        #[arg(long)]
        progress: bool,
        /// Reconnect storm at this many seconds after the start (repeatable, below
        /// --duration): every open stream half-closes, waits for its acks and reconnects at
        /// once, on a new connection, as after a gateway restart.
        #[arg(long = "storm-at")]
        storm_at: Vec<f64>,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// What the real-Envoy bench takes from a scenario (streams per client zone, the filter
    /// configuration, the oracle for given streams), computed as `lab sim` does; JSON on stdout.
    Plan {
        /// Scenario file (bench/scenarios/*.json), without its `sim` section.
        #[arg(long)]
        scenario: std::path::PathBuf,
        /// JSON object merged under the scenario's `streamlb` section.
        #[arg(long, default_value = "null")]
        filter_defaults: String,
        /// JSON object merged over the scenario's `streamlb` section (repeatable, in order).
        #[arg(long = "filter-override")]
        filter_overrides: Vec<String>,
        /// JSON file: [[client zone, rate], ...] of the streams run; adds `oracle`.
        #[arg(long)]
        stream_rates: Option<std::path::PathBuf>,
    },
    /// Fleet-scale placement in simulated time over the real routing core and the peers'
    /// algorithms (bench/README.md); JSON report on stdout.
    Sim {
        /// Scenario file (bench/scenarios/*.json); its `sim` section is merged over the rest.
        #[arg(long)]
        scenario: std::path::PathBuf,
        /// Comma-separated policies (default: all).
        #[arg(long, value_delimiter = ',')]
        policies: Vec<String>,
        /// Workers (routers sharing load) per proxy for streamlb.
        #[arg(long = "proxy-workers", default_value_t = 1)]
        proxy_workers: usize,
        /// The scenario's seed replaced.
        #[arg(long)]
        seed: Option<u64>,
        /// JSON object merged over the scenario's `streamlb` section (repeatable, in order).
        #[arg(long = "filter-override")]
        filter_overrides: Vec<String>,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Progress lines on stderr.
        #[arg(long)]
        progress: bool,
    },
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{flag} must be a non-negative number of seconds"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if let Command::Sim {
        scenario,
        policies,
        proxy_workers,
        seed,
        filter_overrides,
        out,
        progress,
    } = &cli.command
    {
        return run_sim(
            scenario,
            policies,
            *proxy_workers,
            *seed,
            filter_overrides,
            out.as_deref(),
            *progress,
        );
    }
    if let Command::Plan {
        scenario,
        filter_defaults,
        filter_overrides,
        stream_rates,
    } = &cli.command
    {
        return run_plan(
            scenario,
            filter_defaults,
            filter_overrides,
            stream_rates.as_deref(),
        );
    }
    let result = match cli.command {
        Command::Sim { .. } | Command::Plan { .. } => Ok(()),
        Command::Pods {
            zones,
            capacity,
            zone_capacity,
            orca,
            orca_format,
            orca_raw_hex,
            endpoint_header,
            ignore_stdin,
            host,
            base_port,
            control_port,
        } => {
            if !(capacity.is_finite() && capacity >= 0.0) {
                anyhow::bail!("--capacity must be >= 0");
            }
            let zones = pods::parse_zones(&zones)?;
            let config = PodsConfig {
                zone_capacity: pods::parse_zone_capacity(&zone_capacity, &zones)?,
                zones,
                capacity,
                orca: (orca || orca_raw_hex.is_some()).then_some(orca_format),
                orca_raw: orca_raw_hex.as_deref().map(parse_hex).transpose()?,
                endpoint_header: http::HeaderName::from_bytes(
                    endpoint_header.to_ascii_lowercase().as_bytes(),
                )
                .with_context(|| format!("bad --endpoint-header {endpoint_header:?}"))?,
            };
            let listen = Listen {
                host,
                base_port,
                control_port,
            };
            runtime.block_on(run_pods(config, listen, !ignore_stdin))
        }
        Command::Devices {
            target,
            streams,
            mean_rate,
            rate_dist,
            duration,
            kind,
            payload,
            seed,
            headers,
            record_headers,
            reconnect,
            device_prefix,
            ramp,
            progress,
            storm_at,
            out,
        } => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
            let config = DevicesConfig {
                target,
                streams,
                mean_rate,
                rate_dist,
                duration: seconds(duration, "--duration")?,
                kind,
                payload,
                seed,
                headers,
                record_headers: record_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                reconnect,
                device_prefix,
                ramp: seconds(ramp, "--ramp")?,
                progress,
                storm_at: storm_at
                    .iter()
                    .map(|at| seconds(*at, "--storm-at"))
                    .collect::<anyhow::Result<_>>()?,
            };
            runtime.block_on(run_devices(config, out))
        }
    };
    // Do not wait for the blocking stdin reader or lingering connection tasks.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn run_pods(config: PodsConfig, listen: Listen, watch_stdin: bool) -> anyhow::Result<()> {
    let fleet = Fleet::launch_on(&config, &listen).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", fleet.ready_line()).context("writing the ready line")?;
        stdout.flush().context("flushing stdout")?;
    }
    eprintln!(
        "lab pods: {} pods, control http://{}, capacity {} (by zone {:?}), orca {:?}",
        fleet.pods.len(),
        fleet.control,
        config.capacity,
        config.zone_capacity,
        config.orca
    );
    let (stdin_closed_tx, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    if watch_stdin {
        // A plain thread: its blocking read must not hold up runtime shutdown.
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            let mut stdin = std::io::stdin();
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            let _ = stdin_closed_tx.send(());
        });
    } else {
        std::mem::forget(stdin_closed_tx);
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let reason = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
        _ = stdin_closed => "stdin closed",
    };
    eprintln!("lab pods: stopping ({reason})");
    fleet.shutdown();
    Ok(())
}

async fn run_devices(config: DevicesConfig, out: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let report = devices::run(config).await?;
    let json = serde_json::to_string(&report).context("serialising the report")?;
    if let Some(path) = out {
        std::fs::write(&path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}").context("writing the report")?;
    stdout.flush().context("flushing stdout")?;
    Ok(())
}

fn run_sim(
    scenario: &std::path::Path,
    policies: &[String],
    workers: usize,
    seed: Option<u64>,
    filter_overrides: &[String],
    out: Option<&std::path::Path>,
    progress: bool,
) -> anyhow::Result<()> {
    let mut sc = streamlb_lab::scenario::Scenario::load(scenario, true)?;
    if let Some(seed) = seed {
        sc.seed = seed;
    }
    for text in filter_overrides {
        streamlb_lab::scenario::merge(&mut sc.streamlb, &json_arg("--filter-override", text)?);
    }
    let policies: Vec<String> = if policies.is_empty() {
        streamlb_lab::sim::POLICIES
            .iter()
            .map(|p| p.to_string())
            .collect()
    } else {
        policies.to_vec()
    };
    let report = streamlb_lab::sim::run(&sc, &policies, workers, progress)?;
    let json = serde_json::to_string(&report).context("serialising the report")?;
    if let Some(path) = out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}").context("writing the report")?;
    Ok(())
}

/// `--orca-raw-hex`: pairs of hex digits.
fn parse_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        anyhow::bail!("--orca-raw-hex: odd number of hex digits");
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .with_context(|| {
                    format!(
                        "--orca-raw-hex: bad hex {:?}",
                        String::from_utf8_lossy(pair)
                    )
                })
        })
        .collect()
}

/// A JSON command-line value.
fn json_arg(flag: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("{flag} is not JSON: {text}"))
}

fn run_plan(
    scenario: &std::path::Path,
    filter_defaults: &str,
    filter_overrides: &[String],
    stream_rates: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let sc = streamlb_lab::scenario::Scenario::load(scenario, false)?;
    let defaults = json_arg("--filter-defaults", filter_defaults)?;
    let overrides = filter_overrides
        .iter()
        .map(|text| json_arg("--filter-override", text))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let streams: Option<Vec<(String, f64)>> = match stream_rates {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: expected [[zone, rate], ...]", path.display()))?,
            )
        }
        None => None,
    };
    let plan = streamlb_lab::plan::plan(&sc, &defaults, &overrides, streams.as_deref())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{plan}").context("writing the plan")?;
    Ok(())
}
