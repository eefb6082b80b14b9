//! Per-VM state (the root context's logic). Envoy runs one VM per worker plus one on the main
//! thread; each has its own [`Vm`].
//!
//! On every tick a VM:
//! 1. contends for the discovery lease in shared data; the holder polls the admin `/clusters`
//!    endpoint (off the request path) and publishes a compact snapshot of the configured clusters;
//! 2. applies the newest published snapshot to its router;
//! 3. folds counted traffic into rates (`Router::tick`), publishes its per-endpoint load in the
//!    shared view with compare-and-swap and takes the other VMs' load from it;
//! 4. flushes its accumulated stats.

use hashbrown::{HashMap, HashSet};

use super::host::{string_property, Host, HostError, LogLevel};
use super::stats::Stats;
use streamlb_core::config::{Config, RebalanceMode};
use streamlb_core::discovery;
use streamlb_core::rate_memory::{self, Bucket};
use streamlb_core::router::Router;
use streamlb_core::shared_view::{self, Slot};
use streamlb_core::Nanos;

pub const VM_SEQ_KEY: &str = "streamlb.vm_seq";
pub const LEASE_KEY: &str = "streamlb.discovery.lease";
pub const SNAPSHOT_KEY: &str = "streamlb.discovery.snapshot";
pub const LOAD_KEY: &str = "streamlb.load";
const CAS_ATTEMPTS: usize = 8;
const MS: Nanos = 1_000_000;

pub struct Vm {
    pub router: Router,
    pub id: u64,
    pub stats: Stats,
    logged: HashSet<&'static str>,
    /// Live workers in the shared load view (they split the churn budget).
    workers: usize,
    poll: Option<(u32, Nanos)>,
    next_poll: Nanos,
    snapshot_cas: Option<u32>,
}

impl Vm {
    /// Parse the plugin configuration and set the VM up. The error names the field.
    pub fn configure(host: &dyn Host, config: &[u8]) -> Result<Vm, String> {
        let cfg = Config::from_json(config).map_err(|e| e.to_string())?;
        let local_zone = match &cfg.local_zone {
            Some(z) => z.clone(),
            None => string_property(host, &["xds", "node", "locality", "zone"])
                .ok()
                .flatten()
                .unwrap_or_default(),
        };
        let now = host.now().unwrap_or(0);
        let id = allocate_vm_id(host, now);
        host.set_tick_period_ms(cfg.tick_ms)
            .map_err(|e| format!("cannot set the tick period: {e:?}"))?;
        let seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now;
        Ok(Vm {
            router: Router::new(cfg, &local_zone, seed),
            id,
            stats: Stats::loaded(),
            logged: HashSet::new(),
            workers: 1,
            poll: None,
            next_poll: 0,
            snapshot_cas: None,
        })
    }

    pub fn config(&self) -> &Config {
        self.router.config()
    }

    /// Count a host-call failure; log the first of each kind.
    pub fn host_error(&mut self, host: &dyn Host, what: &'static str, err: &HostError) {
        self.stats.health.host_errors += 1;
        if self.logged.insert(what) {
            host.log(
                LogLevel::Warn,
                &format!(
                    "streamlb: host call failed: {what}: {err:?} (logged once; traffic continues)"
                ),
            );
        }
    }

    pub fn on_tick(&mut self, host: &dyn Host) {
        let now = match host.now() {
            Ok(t) => t,
            Err(e) => return self.host_error(host, "get_current_time", &e),
        };
        self.discovery_tick(host, now);
        self.read_snapshot(host, now);
        self.router.tick(now);
        self.share_load(host, now);
        if self.router.config().rebalance.mode != RebalanceMode::Off {
            self.rebalance(host, now);
        }
        self.remember_rates(host, now);
        self.flush(host);
    }

    fn discovery_tick(&mut self, host: &dyn Host, now: Nanos) {
        let d = &self.router.config().discovery;
        let (poll_ms, timeout_ms) = (d.poll_ms, d.timeout_ms);
        if let Some((_, started)) = self.poll {
            if now.saturating_sub(started) <= (timeout_ms + 1000) * MS {
                return; // in flight
            }
            self.poll = None; // the host never answered: count and retry
            self.stats.health.polls_failed += 1;
        }
        if now < self.next_poll || !self.hold_lease(host, now, poll_ms) {
            return;
        }
        let d = &self.router.config().discovery;
        let headers = [
            (":method", "GET"),
            (":path", d.path.as_str()),
            (":authority", d.authority.as_str()),
        ];
        match host.http_call(&d.admin_cluster, &headers, timeout_ms) {
            Ok(token) => {
                self.poll = Some((token, now));
                self.next_poll = now + poll_ms * MS;
            }
            Err(e) => {
                self.stats.health.polls_failed += 1;
                self.next_poll = now + poll_ms * MS;
                self.release_lease(host);
                self.host_error(host, "dispatch_http_call (discovery)", &e);
            }
        }
    }

    /// Take or renew the discovery lease: `vm id (u64 LE) | expiry ns (u64 LE)`.
    fn hold_lease(&mut self, host: &dyn Host, now: Nanos, poll_ms: u64) -> bool {
        let (current, cas) = match host.shared_get(LEASE_KEY) {
            Ok(v) => v,
            Err(e) => {
                self.host_error(host, "get_shared_data (lease)", &e);
                return false;
            }
        };
        if let Some((holder, until)) = current.as_deref().and_then(decode_lease) {
            if holder != self.id && until > now {
                return false;
            }
        }
        let mut lease = self.id.to_le_bytes().to_vec();
        lease.extend_from_slice(&(now + 3 * poll_ms * MS).to_le_bytes());
        match host.shared_set(LEASE_KEY, &lease, cas) {
            Ok(()) => true,
            Err(HostError::CasMismatch) => false,
            Err(e) => {
                self.host_error(host, "set_shared_data (lease)", &e);
                false
            }
        }
    }

    fn release_lease(&mut self, host: &dyn Host) {
        if let Ok((Some(v), cas)) = host.shared_get(LEASE_KEY) {
            if decode_lease(&v).is_some_and(|(holder, _)| holder == self.id) {
                let _ = host.shared_set(LEASE_KEY, &[], cas);
            }
        }
    }

    /// The admin call answered (`body` is None on failure).
    pub fn on_http_call_response(
        &mut self,
        host: &dyn Host,
        token: u32,
        status: Option<&str>,
        body: Option<&[u8]>,
    ) {
        if self.poll.map(|(t, _)| t) != Some(token) {
            return;
        }
        self.poll = None;
        let now = host.now().unwrap_or(0);
        let parsed = match (status, body) {
            (Some("200"), Some(body)) => {
                let cfg = self.router.config();
                discovery::parse_admin_clusters(body, |name| cfg.clusters.iter().any(|c| c == name))
                    .map_err(|e| e.to_string())
            }
            (status, _) => Err(format!(
                "admin answered status {}",
                status.unwrap_or("none")
            )),
        };
        let clusters = match parsed {
            Ok(c) => c,
            Err(e) => {
                self.stats.health.polls_failed += 1;
                if self.logged.insert("discovery") {
                    host.log(
                        LogLevel::Warn,
                        &format!("streamlb: discovery poll failed: {e} (logged once)"),
                    );
                }
                return;
            }
        };
        self.stats.health.polls_ok += 1;
        let missing: Vec<&String> = (self.router.config().clusters.iter())
            .filter(|w| !clusters.iter().any(|c| &c.name == *w))
            .collect();
        if !missing.is_empty() && !self.logged.contains("missing cluster") {
            host.log(
                LogLevel::Warn,
                &format!("streamlb: configured clusters {missing:?} are not in the admin /clusters output (logged once)"),
            );
            self.logged.insert("missing cluster");
        }
        let encoded = discovery::encode_snapshot(now, &clusters);
        if let Err(e) = host.shared_set(SNAPSHOT_KEY, &encoded, None) {
            self.host_error(host, "set_shared_data (snapshot)", &e);
        }
        self.router.apply_snapshot(now, &clusters);
    }

    fn read_snapshot(&mut self, host: &dyn Host, now: Nanos) {
        let (bytes, cas) = match host.shared_get(SNAPSHOT_KEY) {
            Ok(v) => v,
            Err(e) => return self.host_error(host, "get_shared_data (snapshot)", &e),
        };
        let Some(bytes) = bytes else { return };
        if cas.is_some() && cas == self.snapshot_cas {
            return;
        }
        self.snapshot_cas = cas;
        match discovery::decode_snapshot(&bytes) {
            Ok((_generation, clusters)) => self.router.apply_snapshot(now, &clusters),
            Err(e) => {
                self.stats.health.host_errors += 1;
                if self.logged.insert("snapshot decode") {
                    host.log(
                        LogLevel::Warn,
                        &format!("streamlb: bad discovery snapshot in shared data: {e}"),
                    );
                }
            }
        }
    }

    fn share_load(&mut self, host: &dyn Host, now: Nanos) {
        let expire = 3 * self.router.config().tick_ms * MS;
        let mine = Slot {
            vm: self.id,
            updated_at: now,
            entries: self
                .router
                .local_loads()
                .into_iter()
                .map(|(cluster, address, load, active)| shared_view::Entry {
                    cluster: cluster.to_string(),
                    address: address.to_string(),
                    load: load as f32,
                    active,
                })
                .collect(),
        };
        for _ in 0..CAS_ATTEMPTS {
            let (current, cas) = match host.shared_get(LOAD_KEY) {
                Ok(v) => v,
                Err(e) => return self.host_error(host, "get_shared_data (load)", &e),
            };
            let (record, corrupt) =
                shared_view::merge(current.as_deref(), mine.clone(), now, expire);
            if corrupt.is_some() {
                self.stats.health.host_errors += 1;
            }
            match host.shared_set(LOAD_KEY, &record, cas) {
                Ok(()) => {
                    if let Ok(slots) = shared_view::decode(&record) {
                        self.workers = slots.len().max(1);
                        // The slots are Envoy's workers and its main thread's VM, which places
                        // nothing: the other workers placing streams are the rest.
                        self.router.set_peers(slots.len().saturating_sub(2));
                        let others: Vec<_> = shared_view::others(&slots, self.id, now, expire)
                            .map(|e| {
                                (
                                    e.cluster.as_str(),
                                    e.address.as_str(),
                                    f64::from(e.load),
                                    e.active,
                                )
                            })
                            .collect();
                        self.router.set_remote_loads(now, others);
                    }
                    return;
                }
                Err(HostError::CasMismatch) => self.stats.health.cas_retries += 1,
                Err(e) => return self.host_error(host, "set_shared_data (load)", &e),
            }
        }
    }

    /// Write the rates of streams that ran long enough into the shared rate memory.
    fn remember_rates(&mut self, host: &dyn Host, now: Nanos) {
        let updates = self.router.take_rate_updates();
        if updates.is_empty() {
            return;
        }
        let cfg = &self.router.config().rate_memory;
        let buckets = rate_memory::bucket_count(cfg.capacity);
        let mut by_bucket: HashMap<usize, Vec<(u64, f64)>> = HashMap::new();
        for (hash, rate) in updates {
            by_bucket
                .entry(rate_memory::bucket_of(hash, buckets))
                .or_default()
                .push((hash, rate));
        }
        let seconds = rate_memory::seconds(now);
        for (bucket, entries) in by_bucket {
            let key = rate_memory::shared_key(bucket);
            for attempt in 0..=CAS_ATTEMPTS {
                if attempt == CAS_ATTEMPTS {
                    self.stats.health.host_errors += 1; // gave up: this update is lost
                    break;
                }
                let (current, cas) = match host.shared_get(&key) {
                    Ok(v) => v,
                    Err(e) => return self.host_error(host, "get_shared_data (rate memory)", &e),
                };
                let mut b = current.as_deref().map(Bucket::decode).unwrap_or_default();
                for &(hash, rate) in &entries {
                    b.put(hash, rate, seconds);
                }
                match host.shared_set(&key, &b.encode(), cas) {
                    Ok(()) => break,
                    Err(HostError::CasMismatch) => self.stats.health.cas_retries += 1,
                    Err(e) => return self.host_error(host, "set_shared_data (rate memory)", &e),
                }
            }
        }
    }

    /// Plan moves off hot endpoints; in `on` mode the streams end at their next request frame
    /// on a message boundary (see `stream.rs`), in `shadow` mode they are only reported.
    fn rebalance(&mut self, host: &dyn Host, now: Nanos) {
        let plan = self.router.plan_moves(now, self.workers);
        let shadow = self.router.config().rebalance.mode == RebalanceMode::Shadow;
        let r = &mut self.stats.rebalance;
        for (ci, (before, after)) in plan
            .excess_before
            .iter()
            .zip(&plan.excess_after)
            .enumerate()
        {
            r.excess.insert(ci, (*before, *after));
        }
        for m in &plan.moves {
            *r.planned.entry(m.cluster).or_default() += 1;
            let c = self.router.clusters().get(m.cluster);
            let address = |j: usize| {
                c.and_then(|c| c.endpoint(j))
                    .map_or("-", |e| e.address.as_str())
            };
            host.log(
                LogLevel::Info,
                &format!(
                    "streamlb: rebalance{}: stream {} at {:.1}/s off {} (room on {})",
                    if shadow { " (shadow)" } else { "" },
                    m.stream,
                    m.rate,
                    address(m.from),
                    address(m.to_room_on)
                ),
            );
        }
        for (ci, (&budget, &no_room)) in plan
            .skipped_budget
            .iter()
            .zip(&plan.skipped_no_room)
            .enumerate()
        {
            *r.skipped.entry((ci, "budget")).or_default() += budget;
            *r.skipped.entry((ci, "no_room")).or_default() += no_room;
        }
    }

    /// Write accumulated stats to Envoy.
    pub fn flush(&mut self, host: &dyn Host) {
        if let Err(e) = self.stats.flush(host, &mut self.router) {
            self.host_error(host, "metrics", &e);
        }
    }
}

fn decode_lease(v: &[u8]) -> Option<(u64, Nanos)> {
    let holder = u64::from_le_bytes(v.get(0..8)?.try_into().ok()?);
    let until = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
    Some((holder, until))
}

/// A VM id unique within this Envoy: a counter in shared data, incremented with CAS (falls back
/// to the time if shared data fails).
fn allocate_vm_id(host: &dyn Host, now: Nanos) -> u64 {
    for _ in 0..CAS_ATTEMPTS {
        let Ok((current, cas)) = host.shared_get(VM_SEQ_KEY) else {
            break;
        };
        let next = current
            .as_deref()
            .and_then(|b| b.get(0..8)?.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
            + 1;
        match host.shared_set(VM_SEQ_KEY, &next.to_le_bytes(), cas) {
            Ok(()) => return next,
            Err(HostError::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    now | (1 << 63)
}
