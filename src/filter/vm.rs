//! Per-VM state (the root context's logic). Envoy runs one VM per worker plus one on the main
//! thread; each root context (one per VM and plugin configuration) has its own [`Vm`].
//!
//! On every tick a VM:
//! 1. contends for the discovery lease in shared data; the holder polls the admin `/clusters`
//!    endpoint (off the request path) and publishes a compact snapshot of the configured clusters;
//! 2. applies the newest published snapshot to its router;
//! 3. folds counted traffic into rates (`Router::tick`), publishes its per-endpoint load in the
//!    shared view with compare-and-swap and takes the other VMs' load from it;
//! 4. probes pods for their load reports if it holds the lease, shares the reports (see
//!    [`super::fleet`]), and folds the reporter role's counts;
//! 5. plans rebalancing moves within the proxy's churn budget (shared data, compare-and-swap);
//! 6. flushes its accumulated stats.
//!
//! Configuration reload. Envoy (1.40, checked with filesystem LDS) gives a new plugin
//! configuration a new root context in the **same** VM of each worker and of the main thread;
//! the old root contexts keep their timers and their streams (new streams on old connections
//! too) until the old filter chains are gone (with `--drain-time-s 600` they still ticked 30 s
//! after their last connection closed). So:
//! - on its first tick (a listener update Envoy rejects never ticks) every configuration claims
//!   a generation in shared data (`GENERATION_KEY`: a new configuration text gets the next
//!   number);
//! - in the same VM, the adapter links each `Vm` to its successor ([`Vm::supersede`]) and
//!   marks a `Vm` whose root context Envoy deleted ([`Vm::retire`]). Once the successor has
//!   ticked, the old `Vm` hands all its streams to it on its own next tick (rates, endpoints,
//!   load and the active-stream gauge go along), releases the discovery lease, flushes its stats
//!   and stops its timer; its stream contexts follow on their next callback, and it gives new
//!   streams to the newest `Vm`. From then on the new configuration governs every stream;
//! - a `Vm` that sees a newer generation but has no successor (the new configuration runs in
//!   another VM, e.g. new code) stands down: no lease, no polls, no rebalancing; it only keeps
//!   measuring and reporting its own streams;
//! - either way a planned move is not carried out once a newer configuration exists.

use std::cell::RefCell;
use std::rc::Rc;

use hashbrown::{HashMap, HashSet};

use super::fleet::Prober;
use super::host::{string_property, Host, HostError, LogLevel};
use super::shared::{
    self, Step, UpdateError, BUDGET_KEY, GENERATION_KEY, LEASE_KEY, LOAD_KEY, PLACING_KEY,
    SECRET_KEY, SNAPSHOT_KEY, VM_SEQ_KEY,
};
use super::stats::{SkipReason, Stats};
use streamlb_core::config::{Config, RebalanceMode};
use streamlb_core::discovery;
use streamlb_core::fleet::MeasuredLoad;
use streamlb_core::rate_memory::{self, Bucket, Secret};
use streamlb_core::rebalance::{self, Budget, MoveWhy};
use streamlb_core::reporter::{self, Reporter};
use streamlb_core::router::{Remember, Router};
use streamlb_core::shared_view::{self, Slot};
use streamlb_core::{ClusterIdx, Nanos};

const MS: Nanos = 1_000_000;

pub struct Vm {
    pub router: Router,
    pub id: u64,
    pub stats: Stats,
    logged: HashSet<&'static str>,
    poll: Option<(u32, Nanos)>,
    next_poll: Nanos,
    snapshot_cas: Option<u32>,
    /// This VM holds the discovery lease (and probes) until then.
    lease_until: Nanos,
    prober: Prober,
    /// The reporter role's counts (used when `reporter` is configured).
    pub reporter: Reporter,
    /// The other VMs' reporter figures and app utilisation, from the shared load view.
    reporter_others: MeasuredLoad,
    reporter_app_utilization: Option<f64>,
    /// Hash of the configuration text.
    config_hash: u64,
    /// This configuration's generation, claimed on the first tick (0: not yet, or shared data
    /// failed; never outdated then).
    generation: u64,
    /// The first tick ran (the root context is live).
    ticked: bool,
    /// When the next full tick is due: the timer fires more often than `tick_ms` when probes
    /// may run at `probe.placing_interval_ms`, and the events between ticks only probe.
    next_tick: Nanos,
    /// This configuration was the newest one at the last tick.
    current: bool,
    /// The latest placement time this VM published to, or read from, the other workers.
    placing_shared: Nanos,
    /// Envoy deleted this root context (e.g. its listener update was rejected).
    retired: bool,
    /// Standing down: a newer configuration exists (no lease, no polls, no moves).
    stood_down: bool,
    /// A newer configuration exists (seen in shared data).
    outdated: bool,
    /// The root context of a newer configuration in this same VM.
    successor: Option<Rc<RefCell<Vm>>>,
    /// Key of the rate memory's hash.
    pub rate_secret: Secret,
    /// The endpoint header's value, written for each placement (kept: no allocation per call).
    pub endpoint_value: String,
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
        let seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now;
        let router = Router::new(cfg, &local_zone, seed);
        host.set_tick_period_ms(router.timer_period_ms())
            .map_err(|e| format!("cannot set the tick period: {e:?}"))?;
        let mut vm = Vm {
            router,
            id,
            stats: Stats::loaded(),
            logged: HashSet::new(),
            poll: None,
            next_poll: 0,
            snapshot_cas: None,
            lease_until: 0,
            prober: Prober::default(),
            reporter: Reporter::default(),
            reporter_others: MeasuredLoad::default(),
            reporter_app_utilization: None,
            config_hash: rate_memory::key_hash(&[0, 0], config),
            generation: 0,
            ticked: false,
            next_tick: 0,
            current: false,
            placing_shared: 0,
            retired: false,
            stood_down: false,
            outdated: false,
            successor: None,
            rate_secret: [0, 0],
            endpoint_value: String::new(),
        };
        vm.rate_secret = vm.load_secret(host);
        if let Ok((None, _)) = host.shared_get(BUDGET_KEY) {
            // Created once, so that every later write is a compare-and-swap.
            if let Err(e) = host.shared_set(BUDGET_KEY, &Budget::default().encode(), None) {
                vm.host_error(host, "set_shared_data (budget)", &e);
            }
        }
        vm.read_snapshot(host, now); // place at once, not after the first tick
        Ok(vm)
    }

    /// The rate memory's key: the one in shared data, else a new random one stored there (then
    /// read back, so that VMs starting at the same moment agree on the one that was kept).
    fn load_secret(&mut self, host: &dyn Host) -> Secret {
        let stored = || match host.shared_get(SECRET_KEY) {
            Ok((Some(b), _)) => rate_memory::decode_secret(&b),
            _ => None,
        };
        if let Some(s) = stored() {
            return s;
        }
        let fresh = rate_memory::new_secret();
        if let Err(e) = host.shared_set(SECRET_KEY, &rate_memory::encode_secret(&fresh), None) {
            // This VM keeps its own key: its devices' rates are not shared with the others.
            self.host_error(host, "set_shared_data (rate memory key)", &e);
        }
        stored().unwrap_or(fresh)
    }

    /// A newer configuration's root context started in this same VM: hand everything to it on
    /// the next tick.
    pub fn supersede(&mut self, successor: Rc<RefCell<Vm>>) {
        self.successor = Some(successor);
    }

    /// Envoy deleted this `Vm`'s root context: it is nobody's successor.
    pub fn retire(&mut self) {
        self.retired = true;
    }

    pub fn successor(&self) -> Option<&Rc<RefCell<Vm>>> {
        self.successor.as_ref()
    }

    /// The newest live `Vm` this one leads to: the last successor that has ticked and was not
    /// retired, else `vm` itself.
    pub fn newest(vm: Rc<RefCell<Vm>>) -> Rc<RefCell<Vm>> {
        let mut newest = vm.clone();
        let mut next = vm.try_borrow().ok().and_then(|v| v.successor.clone());
        while let Some(n) = next {
            let (live, after) = match n.try_borrow() {
                Ok(v) => (v.ticked && !v.retired, v.successor.clone()),
                Err(_) => (false, None),
            };
            if live {
                newest = n.clone();
            }
            next = after;
        }
        newest
    }

    /// A successor in this VM that has not been retired (live or about to be).
    fn has_successor(&self) -> bool {
        let mut next = self.successor.clone();
        while let Some(n) = next {
            match n.try_borrow() {
                Ok(v) if !v.retired => return true,
                Ok(v) => next = v.successor.clone(),
                Err(_) => return true, // busy: it is running
            }
        }
        false
    }

    /// Whether a newer configuration exists (in this VM or, per shared data, anywhere).
    fn superseded(&mut self, host: &dyn Host) -> bool {
        if self.has_successor() {
            return true;
        }
        if !self.outdated && self.generation > 0 {
            match host.shared_get(GENERATION_KEY) {
                Ok((bytes, _)) => {
                    let newest = bytes.as_deref().and_then(decode_generation);
                    self.outdated = newest.is_some_and(|(g, _)| g > self.generation);
                }
                Err(e) => self.host_error(host, "get_shared_data (generation)", &e),
            }
        }
        self.outdated
    }

    /// Whether a planned move may be carried out now: rebalancing is `on` and no newer
    /// configuration exists. Otherwise every planned move is dropped.
    pub fn may_move(&mut self, host: &dyn Host) -> bool {
        let on = self.config().rebalance.mode == RebalanceMode::On;
        if on && !self.superseded(host) {
            return true;
        }
        self.router.clear_moves();
        false
    }

    pub fn config(&self) -> &Config {
        self.router.config()
    }

    /// Log `message` the first time `kind` happens in this VM.
    pub fn log_once(&mut self, host: &dyn Host, kind: &'static str, message: &str) {
        if self.logged.insert(kind) {
            host.log(LogLevel::Warn, &format!("{message} (logged once)"));
        }
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
        let between_ticks = self.ticked
            && now.saturating_add(self.router.timer_period_ms() / 10 * MS) < self.next_tick;
        if !self.ticked {
            self.ticked = true;
            let claimed =
                claim_generation(host, self.config_hash, &mut self.stats.health.cas_retries);
            // 0 (shared data failed): never outdated.
            self.generation = claimed.unwrap_or_else(|e| {
                self.shared_failed(host, "configuration generation", e);
                0
            });
            host.log(
                LogLevel::Info,
                &format!(
                    "streamlb: configuration generation {} running (vm {})",
                    self.generation, self.id
                ),
            );
        }
        if let Some(successor) = self.successor.clone() {
            let newest = Vm::newest(successor);
            if newest.try_borrow().is_ok_and(|v| v.ticked && !v.retired) {
                return self.hand_over(host, now, &newest);
            }
        }
        if between_ticks {
            // Between ticks: probes only.
            return self.fleet_tick(host, now, self.current, false);
        }
        self.next_tick = now + self.router.config().tick_ms * MS;
        let current = !self.superseded(host);
        self.current = current;
        if current {
            self.stood_down = false;
            self.discovery_tick(host, now);
        } else if !self.stood_down {
            self.stand_down(host);
        }
        self.read_snapshot(host, now);
        self.router.tick(now);
        self.fleet_tick(host, now, current, true);
        self.reporter
            .tick(now, self.router.config().reporter_tau_secs());
        self.share_load(host, now);
        if current && self.router.config().rebalance.mode != RebalanceMode::Off {
            self.rebalance(host, now);
        }
        self.remember_rates(host, now);
        self.flush(host);
    }

    /// A newer configuration exists: no lease, no polls, no moves. (In this VM it is about to
    /// take the streams over; elsewhere this `Vm` keeps measuring its own streams.)
    fn stand_down(&mut self, host: &dyn Host) {
        self.stood_down = true;
        self.poll = None;
        self.release_lease(host);
        self.router.clear_moves();
        if !self.has_successor() {
            host.log(
                LogLevel::Info,
                &format!(
                    "streamlb: vm {} (generation {}) stands down: a newer configuration runs in another VM",
                    self.id, self.generation
                ),
            );
        }
    }

    /// Give every stream to `newest` (this VM's newest configuration), then stop: release the
    /// lease, flush, stop the timer.
    fn hand_over(&mut self, host: &dyn Host, now: Nanos, newest: &Rc<RefCell<Vm>>) {
        let Ok(mut new) = newest.try_borrow_mut() else {
            return; // busy: next tick
        };
        let handed = self.router.hand_over();
        let (mut kept, total) = (0, handed.len());
        for h in handed {
            let (cluster, route) = (h.stream.cluster, h.stream.route);
            self.stats.route(cluster, route).active_delta -= 1;
            if let Some((ci, ri)) = new.router.adopt(now, h) {
                new.stats.route(ci, ri).active_delta += 1;
                kept += 1;
            }
        }
        drop(new);
        self.poll = None;
        self.release_lease(host);
        self.flush(host);
        if let Err(e) = host.set_tick_period_ms(0) {
            self.host_error(host, "stop the timer", &e);
        }
        if self.logged.insert("handed over") {
            host.log(
                LogLevel::Info,
                &format!(
                    "streamlb: vm {} (generation {}) handed {kept} of {total} streams to a newer configuration and stopped",
                    self.id, self.generation
                ),
            );
        }
    }

    fn discovery_tick(&mut self, host: &dyn Host, now: Nanos) {
        if self.router.config().clusters.is_empty() {
            return; // reporter role only: nothing to place
        }
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
        let cfg = self.router.config();
        let d = &cfg.discovery;
        let path = discovery::admin_path(&d.path, &cfg.clusters);
        let headers = [
            (":method", "GET"),
            (":path", path.as_str()),
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
        let until = now + 3 * poll_ms * MS;
        let mut lease = self.id.to_le_bytes().to_vec();
        lease.extend_from_slice(&until.to_le_bytes());
        match host.shared_set(LEASE_KEY, &lease, cas) {
            Ok(()) => {
                self.lease_until = until;
                true
            }
            Err(HostError::CasMismatch) => false,
            Err(e) => {
                self.host_error(host, "set_shared_data (lease)", &e);
                false
            }
        }
    }

    fn release_lease(&mut self, host: &dyn Host) {
        self.lease_until = 0;
        if let Ok((Some(v), cas)) = host.shared_get(LEASE_KEY) {
            if decode_lease(&v).is_some_and(|(holder, _)| holder == self.id) {
                let _ = host.shared_set(LEASE_KEY, &[], cas);
            }
        }
    }

    /// The admin call answered. `status` and `body` are whatever the host gave (None when the
    /// call failed: no response, reset, timeout); anything but a 200 with a parsable body is a
    /// failed poll.
    pub fn on_http_call_response(
        &mut self,
        host: &dyn Host,
        token: u32,
        status: Option<&[u8]>,
        body: Option<&[u8]>,
    ) {
        if self.poll.map(|(t, _)| t) != Some(token) {
            let now = host.now().unwrap_or(0);
            let stats = &mut self.stats.fleet;
            self.prober
                .on_response(host, token, &mut self.router, stats, now);
            return;
        }
        self.poll = None;
        let now = host.now().unwrap_or(0);
        let parsed = match (status, body) {
            (Some(b"200"), Some(body)) => {
                let cfg = self.router.config();
                let parsed = discovery::parse_admin_clusters(body, |name| {
                    cfg.clusters.iter().any(|c| c == name)
                })
                .map_err(|e| e.to_string());
                let parse_ns = host.now().unwrap_or(now).saturating_sub(now);
                self.stats.health.discovery_body_bytes = Some(body.len() as u64);
                self.stats.health.discovery_parse_us = Some(parse_ns / 1_000);
                parsed
            }
            (Some(b"200"), None) => Err("admin answered 200 with no body".to_string()),
            (Some(status), _) => Err(format!(
                "admin answered status {:?}",
                String::from_utf8_lossy(status)
            )),
            (None, _) => Err("no response from the admin cluster (call failed)".to_string()),
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
            // The generation is the poll time: the snapshot's age counts from then, in this VM
            // too (a VM started after a reload must not take an old snapshot as fresh).
            Ok((generation, clusters)) => {
                let polled_at = generation.min(now);
                let stale_after =
                    (self.router.config().discovery.stale_after_ms).saturating_mul(MS);
                if now.saturating_sub(polled_at) <= stale_after {
                    self.router.apply_snapshot(polled_at, &clusters);
                }
            }
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
        let mut entries: Vec<shared_view::Entry> = self
            .router
            .local_loads()
            .into_iter()
            .map(|(cluster, address, load, active)| shared_view::Entry {
                cluster: cluster.to_string(),
                address: address.to_string(),
                load: load as f32,
                active,
            })
            .collect();
        if self.router.config().reporter.is_some() {
            entries.extend(self.reporter_entries(now));
        }
        let mine = Slot {
            vm: self.id,
            updated_at: now,
            entries,
        };
        let health = &mut self.stats.health;
        let written = shared::update(host, LOAD_KEY, &mut health.cas_retries, |current| {
            let (record, corrupt) = shared_view::merge(current, mine.clone(), now, expire);
            if corrupt.is_some() {
                health.host_errors += 1;
            }
            Step::Write(record.clone(), record)
        });
        match written {
            Err(e) => self.shared_failed(host, "load view", e),
            Ok(record) => {
                if let Ok(slots) = shared_view::decode(&record) {
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
                    (self.reporter_others, self.reporter_app_utilization) =
                        reporter_figures(shared_view::others(&slots, self.id, now, expire));
                }
            }
        }
    }

    /// A shared-data update failed: a lost compare-and-swap is counted, a host error logged.
    fn shared_failed(&mut self, host: &dyn Host, what: &'static str, e: UpdateError) {
        match e {
            UpdateError::Lost => self.stats.health.cas_lost += 1,
            UpdateError::Host(e) => self.host_error(host, what, &e),
        }
    }

    /// The fleet view: the lease holder probes and publishes, the others apply its reports; on
    /// each tick and (`tick` false) on the timer events between ticks.
    fn fleet_tick(&mut self, host: &dyn Host, now: Nanos, current: bool, tick: bool) {
        let enabled = self.router.config().probe.enabled;
        let prober = current && now < self.lease_until && enabled;
        if enabled {
            self.share_placing(host, prober);
        }
        if prober {
            self.stats.fleet.probed_at = Some(now);
            self.prober
                .send(host, &mut self.router, &mut self.stats.fleet, now);
        }
        self.prober.share(host, &mut self.router, prober, tick, now);
    }

    /// Whether this Envoy is placing streams sets the probe interval: each VM publishes its
    /// latest placement (shared data, at most once per timer event; the last writer wins, so an
    /// older time may stand for one event), and the prober reads the others'.
    fn share_placing(&mut self, host: &dyn Host, prober: bool) {
        if let Some(t) = self
            .router
            .last_placing()
            .filter(|&t| t > self.placing_shared)
        {
            self.placing_shared = t;
            if let Err(e) = host.shared_set(PLACING_KEY, &t.to_le_bytes(), None) {
                self.host_error(host, "set_shared_data (placing)", &e);
            }
        }
        if !prober {
            return;
        }
        match host.shared_get(PLACING_KEY) {
            Ok((Some(bytes), _)) => {
                if let Some(t) = shared::u64_at(&bytes, 0) {
                    self.placing_shared = self.placing_shared.max(t);
                    self.router.note_placing(t);
                }
            }
            Ok((None, _)) => {}
            Err(e) => self.host_error(host, "get_shared_data (placing)", &e),
        }
    }

    /// This VM's reporter figures as shared-view entries.
    fn reporter_entries(&self, now: Nanos) -> Vec<shared_view::Entry> {
        let m = self.reporter.measured();
        let max_age = self.router.config().probe.max_age_ms * MS;
        let entry = |address: &str, load: f64, active: u64| shared_view::Entry {
            cluster: reporter::SHARED_CLUSTER.into(),
            address: address.into(),
            load: load as f32,
            active: u32::try_from(active).unwrap_or(u32::MAX),
        };
        let mut out = vec![
            entry(reporter::MESSAGES_ENTRY, m.messages_per_second, m.streams),
            entry(reporter::BYTES_ENTRY, m.bytes_per_second, 0),
        ];
        if let Some(u) = self.reporter.app_utilization(now, max_age) {
            out.push(entry(reporter::APP_UTILIZATION_ENTRY, u, 0));
        }
        out
    }

    /// The answer to a load probe (reporter role): this Envoy's figures over every stream into
    /// the pod, all workers summed.
    pub fn load_report(&self, now: Nanos) -> String {
        let Some(cfg) = &self.router.config().reporter else {
            return String::new();
        };
        let own = self.reporter.measured();
        let others = &self.reporter_others;
        let total = MeasuredLoad {
            messages_per_second: own.messages_per_second + others.messages_per_second,
            bytes_per_second: own.bytes_per_second + others.bytes_per_second,
            streams: own.streams + others.streams,
        };
        let max_age = self.router.config().probe.max_age_ms * MS;
        let app = self
            .reporter
            .app_utilization(now, max_age)
            .or(self.reporter_app_utilization);
        streamlb_core::fleet::report_value(&total, cfg.capacity, app)
    }

    /// Write the rates of streams that ran long enough into the shared rate memory.
    fn remember_rates(&mut self, host: &dyn Host, now: Nanos) {
        let updates = self.router.take_rate_updates();
        if updates.is_empty() {
            return;
        }
        let cfg = &self.router.config().rate_memory;
        let buckets = rate_memory::bucket_count(cfg.capacity);
        let mut by_bucket: HashMap<usize, Vec<Remember>> = HashMap::new();
        for u in updates {
            let bucket = by_bucket.entry(rate_memory::bucket_of(u.key, buckets));
            bucket.or_default().push(u);
        }
        let seconds = rate_memory::seconds(now);
        // A moved device's reconnection follows its move while the move may still be carried
        // out, and a little after.
        let tick = self.router.config().tick_ms * MS;
        let move_until = rate_memory::seconds(now + rebalance::move_deadline(tick) + 2_000 * MS);
        for (bucket, entries) in by_bucket {
            let key = rate_memory::shared_key(bucket);
            let retries = &mut self.stats.health.cas_retries;
            let written = shared::update(host, &key, retries, |current| {
                let mut b = current.map(Bucket::decode).unwrap_or_default();
                for u in &entries {
                    b.put(u.key, u.rate, seconds);
                    if let Some(to) = u.to {
                        b.send_to(u.key, to, move_until);
                    }
                }
                Step::Write(b.encode(), ())
            });
            if let Err(e) = written {
                self.shared_failed(host, "rate memory", e);
            }
        }
    }

    /// Plan moves off hot endpoints within the proxy's churn budget (claimed in shared data
    /// with compare-and-swap, so all workers together stay within it). In `on` mode the streams
    /// end at their next request frame on a message boundary (see `stream.rs`); in `shadow`
    /// mode they are only reported (and planned afresh on the next tick).
    fn rebalance(&mut self, host: &dyn Host, now: Nanos) {
        let cfg = self.router.config().rebalance.clone();
        let tick = self.router.config().tick_ms * MS;
        let expired = self
            .router
            .expire_moves(now, rebalance::move_deadline(tick));
        for (ci, n) in expired.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            *self
                .stats
                .rebalance
                .skipped
                .entry((ClusterIdx(ci), SkipReason::Expired))
                .or_default() += n;
        }
        let streams = self.router.proxy_streams();
        let router = &mut self.router;
        let retries = &mut self.stats.health.cas_retries;
        let planned = shared::update(host, BUDGET_KEY, retries, |current| {
            let mut budget = current.map(Budget::decode).unwrap_or_default();
            let plan = router.plan_moves(now, budget.allowance(&cfg, now, tick, streams));
            if plan.moves.is_empty() {
                return Step::Keep(plan);
            }
            budget.spend(now, plan.moves.len());
            Step::Write(budget.encode(), plan)
        });
        let plan = match planned {
            Ok(plan) => plan,
            Err(e) => return self.shared_failed(host, "rebalance budget", e), // no moves now
        };
        // What the planner saw, before the commit sets the moved streams aside (moves come
        // cluster by cluster).
        let mut planned_in: Vec<ClusterIdx> = plan.moves.iter().map(|m| m.cluster).collect();
        planned_in.dedup();
        for c in planned_in.iter().filter_map(|&ci| self.router.cluster(ci)) {
            host.log(LogLevel::Debug, &planner_view(c));
        }
        let shadow = cfg.mode == RebalanceMode::Shadow;
        if !shadow {
            self.router.commit_moves(now, &plan);
        }
        let r = &mut self.stats.rebalance;
        for (ci, (before, after)) in plan
            .excess_before
            .iter()
            .zip(&plan.excess_after)
            .enumerate()
        {
            r.excess.insert(ClusterIdx(ci), (*before, *after));
        }
        for m in &plan.moves {
            *r.planned.entry(m.cluster).or_default() += 1;
            if matches!(m.why, MoveWhy::Home | MoveWhy::Spread) {
                *r.zone_moves.entry((m.cluster, m.why)).or_default() += 1;
            }
            let c = self.router.cluster(m.cluster);
            let address = |j: usize| {
                c.and_then(|c| c.endpoint(j))
                    .map_or("-", |e| e.address.as_str())
            };
            host.log(
                LogLevel::Info,
                &format!(
                    "streamlb: rebalance{}: stream {} at {:.1}/s off {} ({}; room on {})",
                    if shadow { " (shadow)" } else { "" },
                    m.stream,
                    m.rate,
                    address(m.from),
                    m.why.as_str(),
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
            *r.skipped
                .entry((ClusterIdx(ci), SkipReason::Budget))
                .or_default() += budget;
            *r.skipped
                .entry((ClusterIdx(ci), SkipReason::NoRoom))
                .or_default() += no_room;
        }
    }

    /// Write accumulated stats to Envoy.
    pub fn flush(&mut self, host: &dyn Host) {
        if let Err(e) = self.stats.flush(host, &mut self.router) {
            self.host_error(host, "metrics", &e);
        }
    }
}

fn decode_generation(v: &[u8]) -> Option<(u64, u64)> {
    Some((shared::u64_at(v, 0)?, shared::u64_at(v, 8)?))
}

/// The generation of the configuration whose text hashes to `hash`: the current one if the
/// newest configuration has the same text, else the next number (written with
/// compare-and-swap). 0 if shared data fails.
fn claim_generation(host: &dyn Host, hash: u64, conflicts: &mut u64) -> Result<u64, UpdateError> {
    shared::update(host, GENERATION_KEY, conflicts, |current| {
        let next = match current.and_then(decode_generation) {
            Some((g, h)) if h == hash && g > 0 => return Step::Keep(g),
            Some((g, _)) => g + 1,
            None => 1,
        };
        let mut record = next.to_le_bytes().to_vec();
        record.extend_from_slice(&hash.to_le_bytes());
        Step::Write(record, next)
    })
}

fn decode_lease(v: &[u8]) -> Option<(u64, Nanos)> {
    Some((shared::u64_at(v, 0)?, shared::u64_at(v, 8)?))
}

/// A VM id unique within this Envoy: a counter in shared data, incremented with CAS (falls back
/// to the time if shared data fails).
fn allocate_vm_id(host: &dyn Host, now: Nanos) -> u64 {
    let next = shared::update(host, VM_SEQ_KEY, &mut 0, |current| {
        let next = current.and_then(|b| shared::u64_at(b, 0)).unwrap_or(0) + 1;
        Step::Write(next.to_le_bytes().to_vec(), next)
    });
    next.unwrap_or(now | (1 << 63))
}

/// The reporter figures in the other VMs' shared-view entries (summed; the app's utilisation is
/// the largest seen).
fn reporter_figures<'a>(
    entries: impl Iterator<Item = &'a shared_view::Entry>,
) -> (MeasuredLoad, Option<f64>) {
    let mut m = MeasuredLoad::default();
    let mut app: Option<f64> = None;
    for e in entries.filter(|e| e.cluster == reporter::SHARED_CLUSTER) {
        let v = f64::from(e.load);
        match e.address.as_str() {
            reporter::MESSAGES_ENTRY => {
                m.messages_per_second += v;
                m.streams += u64::from(e.active);
            }
            reporter::BYTES_ENTRY => m.bytes_per_second += v,
            reporter::APP_UTILIZATION_ENTRY => app = Some(app.map_or(v, |a| a.max(v))),
            _ => {}
        }
    }
    (m, app)
}

/// What the planner saw on a cluster, one `address load/capacity (own, report, own at report)`
/// per healthy endpoint: logged at debug level with each round of moves.
fn planner_view(c: &streamlb_core::endpoints::Cluster) -> String {
    let mut line = format!("streamlb: rebalance view of {}:", c.name);
    for e in c.endpoints.iter().filter(|e| e.eligible()) {
        line.push_str(&format!(
            " {} {:.1}/{:.1} (own {:.1}, this vm {:.1}, report {}, own at report {:.1});",
            e.address,
            e.load(),
            e.capacity,
            e.own_load(),
            e.local_rate + e.local_pending,
            e.fleet_load.map_or("-".to_string(), |f| format!("{f:.1}")),
            e.own_at_report
        ));
    }
    line
}
