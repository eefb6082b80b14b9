//! Native microbenchmark of the streamlb routing core: cost of a placement (`Router::place` +
//! `on_upstream` + `on_end`) vs number of endpoints, cost of `tick` per tracked stream, cost of a
//! probe event between ticks while placing (`due_probes` every 250 ms, each answer applied on its
//! own as the filter does), and heap bytes per tracked stream and per endpoint (counting
//! allocator). Prints a table and one JSON line.
//!
//! Heap figures are for a 64-bit build; the filter runs as wasm32 (4-byte pointers and usize),
//! so its figures are at most these.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;
use streamlb_core::config::Config;
use streamlb_core::discovery::{ClusterSnapshot, DiscoveredEndpoint};
use streamlb_core::fleet::LoadReport;
use streamlb_core::penalty::Outcome;
use streamlb_core::router::Router;
use streamlb_core::streams::Direction;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}
#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SEC: u64 = 1_000_000_000;

fn snapshot(n: usize, zones: usize) -> Vec<ClusterSnapshot> {
    vec![ClusterSnapshot {
        name: "pods".into(),
        endpoints: (0..n)
            .map(|i| DiscoveredEndpoint {
                address: format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256),
                zone: format!("zone-{}", i % zones),
                healthy: true,
                weight: 1,
            })
            .collect(),
    }]
}

fn router(n: usize, zones: usize) -> Router {
    let cfg = match Config::from_json(br#"{"clusters":["pods"]}"#) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config: {e}");
            std::process::exit(2)
        }
    };
    let mut r = Router::new(cfg, "zone-0", 7);
    r.apply_snapshot(SEC, &snapshot(n, zones));
    r
}

/// Router with `n` endpoints and `streams` established, measured streams; returns it and `now`.
fn loaded(n: usize, zones: usize, streams: u64) -> (Router, u64) {
    let mut r = router(n, zones);
    let mut now = SEC;
    for id in 0..streams {
        if let Some(d) = r.place(now, id, "telemetry", "pods") {
            if let Some(a) = d.primary.as_deref() {
                let z = d.zone.clone();
                r.on_upstream(now, id, a, || z.to_string());
            }
        }
        r.on_data(id, Direction::Upstream, 1 + id % 50, 64);
    }
    for _ in 0..3 {
        now += SEC;
        r.tick(now);
    }
    (r, now)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let iters: u64 = if quick { 20_000 } else { 200_000 };
    let mut rows = Vec::new();
    println!("streamlb core microbenchmark (native, release; {iters} placements per row)");
    println!(
        "{:>9} {:>6} {:>9} | {:>12} {:>14} {:>15} | {:>14} {:>16}",
        "endpoints",
        "zones",
        "streams",
        "place ns/op",
        "tick ns/stream",
        "probe event µs",
        "heap B/stream",
        "heap B/endpoint"
    );
    for &(n, zones) in &[(10usize, 1usize), (100, 1), (1000, 1), (1000, 3)] {
        let streams = (n as u64) * 100;
        // Heap per endpoint.
        let before = live();
        let r0 = router(n, zones);
        let per_endpoint = (live() - before) as f64 / n as f64;
        drop(r0);
        // Heap per stream: placed + measured streams on a warm router.
        let mut r = router(n, zones);
        let mut now = SEC;
        let before = live();
        for id in 0..streams {
            if let Some(d) = r.place(now, id, "telemetry", "pods") {
                if let Some(a) = d.primary.as_deref() {
                    let z = d.zone.clone();
                    r.on_upstream(now, id, a, || z.to_string());
                }
            }
        }
        let per_stream = (live() - before) as f64 / streams as f64;
        drop(r);
        // Placement cost with `streams` established: place a new stream, learn its upstream, end it.
        let (mut r, t) = loaded(n, zones, streams);
        now = t;
        let mut sink = 0usize;
        let start = Instant::now();
        for k in 0..iters {
            let id = 1_000_000_000 + k;
            if let Some(d) = r.place(now, id, "telemetry", "pods") {
                if let Some(a) = d.primary.as_deref() {
                    sink += a.len();
                    let z = d.zone.clone();
                    r.on_upstream(now, id, a, || z.to_string());
                }
            }
            r.on_end(now, id, Outcome::Ok);
        }
        let place_ns = start.elapsed().as_nanos() as f64 / iters as f64;
        black_box(sink);
        // Tick cost per tracked stream.
        let ticks = if quick { 5 } else { 20 };
        let start = Instant::now();
        for _ in 0..ticks {
            now += SEC;
            r.tick(now);
        }
        let tick_ns = start.elapsed().as_nanos() as f64 / (ticks as f64 * streams as f64);
        // A probe event between ticks while placing: the probes due, each answer applied.
        let events: u64 = if quick { 20 } else { 200 };
        let start = Instant::now();
        for k in 0..events {
            now += SEC / 4;
            r.note_placing(now);
            for (_, address) in r.due_probes(now) {
                let report = LoadReport {
                    rate: 100.0 + k as f64,
                    utilization: Some(0.5),
                    streams: Some(100.0),
                    at: now,
                };
                r.apply_reports(now, "pods", &[(address, report)]);
            }
        }
        let probe_us = start.elapsed().as_nanos() as f64 / events as f64 / 1000.0;
        println!(
            "{n:>9} {zones:>6} {streams:>9} | {place_ns:>12.0} {tick_ns:>14.1} {probe_us:>15.1} | {per_stream:>14.0} {per_endpoint:>16.0}"
        );
        rows.push(format!(
            r#"{{"endpoints":{n},"zones":{zones},"streams":{streams},"place_ns":{place_ns:.1},"tick_ns_per_stream":{tick_ns:.2},"probe_event_us":{probe_us:.1},"heap_bytes_per_stream":{per_stream:.1},"heap_bytes_per_endpoint":{per_endpoint:.1}}}"#
        ));
    }
    println!("{{\"microbench\":[{}]}}", rows.join(","));
}
