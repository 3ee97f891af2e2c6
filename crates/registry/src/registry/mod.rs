//! The registry handle: the state readers see, in memory, and a [`Backend`] that keeps
//! it: the local log on one server ([`LogStore`], `log.rs`), or etcd shared by N servers
//! (`etcd_store.rs`), which feeds every server's copy from one watch.
//!
//! On the local log there are two copies of the state and one durable log between them.
//! A write validates against the *head* (every write made so far), turns into ops, is
//! applied to the head and queued to the log under the head's lock, so log order is index
//! order and the next write validates against this one without waiting for the disk.
//! Readers, blocking queries and check runners see only the *durable* state: a record is
//! applied there, in index order, once the log's writer reports its frame fsynced, and
//! only then is the write acknowledged. When the disk refuses a write, the writer cuts the
//! log back and the head is rebuilt from the durable state, so a refused write (and every
//! write validated against it) was never visible to anyone and the next write starts
//! clean. The price is a second copy of the state in memory.

mod acl;
mod agent;
mod catalog;
mod kv;
mod log;
mod metrics;

pub(crate) use log::LogStore;
use log::{Pending, Shown};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::time::Duration;

use serde::Deserialize;
use tessera_core::Health;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::acl::{AclOp, Authz, Level, MANAGEMENT_POLICY_ID, Policy, PolicyLink, Token};
use crate::checks::Runners;
use crate::defs::{CatalogDeregistration, CatalogRegistration, CheckDef, ServiceDef};
use crate::error::Error;
use crate::etcd_store::Authority;
use crate::model::{CheckRecord, CheckSpec, KvEntry, NodeRecord, Probe, ServiceRecord};
use crate::state::{Op, Record, State, Topic};
use crate::store::{Applier, DiskError, Store, StoreError};
use crate::ttl_state::{Mark, TtlState};

/// Server settings, as they appear in `--config` (TOML) and on the command line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub node_name: String,
    pub datacenter: String,
    /// Address reported for the local node.
    pub advertise_addr: String,
    /// Largest KV value accepted, in bytes (Consul's default: 512 KiB).
    pub kv_max_value_bytes: usize,
    /// Log bytes after which the state is snapshotted and the log emptied.
    pub snapshot_after_bytes: u64,
    pub acl: AclConfig,
    /// When many TTL checks expire at once, stop expiring (see `guard`).
    pub mass_expiry: crate::guard::MassExpiryConfig,
    /// Admission control (see `admission`).
    pub limits: crate::admission::Limits,
    /// Where the state lives: empty for the log in `data_dir` (one server), or
    /// `etcd://host:port,host:port,...` for servers sharing one catalog in etcd.
    pub store: String,
    /// The etcd key prefix; servers with the same prefix share a catalog.
    pub etcd_prefix: String,
    /// For `etcd+https://`: the CA that signed the members' certificates, and this
    /// server's client certificate and key when the members demand one (etcdctl's
    /// `--cacert`, `--cert`, `--key`).
    pub etcd_ca_file: Option<PathBuf>,
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// `None`: on exactly when the server listens on a non-loopback address.
    pub enabled: Option<bool>,
    pub default_policy: Level,
    /// A management token secret created at start (Consul's `initial_management`).
    pub initial_management: Option<String>,
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            enabled: None,
            default_policy: Level::Deny,
            initial_management: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("tessera-data"),
            node_name: "tessera".into(),
            datacenter: "dc1".into(),
            advertise_addr: "127.0.0.1".into(),
            kv_max_value_bytes: 512 * 1024,
            snapshot_after_bytes: 64 * 1024 * 1024,
            acl: AclConfig::default(),
            mass_expiry: crate::guard::MassExpiryConfig::default(),
            limits: crate::admission::Limits::default(),
            store: String::new(),
            etcd_prefix: "tessera/".into(),
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
        }
    }
}

pub struct Registry {
    /// The durable state, all that readers see. Reads share it (they run in parallel);
    /// only `show` changes it.
    state: RwLock<State>,
    /// Where the state is kept, and how writes reach it.
    pub(crate) backing: Backing,
    /// Set when the log can no longer be trusted; the server exits on it.
    pub(crate) broken: CancellationToken,
    pub config: Config,
    pub node_id: String,
    pub acl_enabled: bool,
    pub(crate) runners: Runners,
    pub(crate) shutdown: CancellationToken,
    /// When the process last woke from a stall (see `checks::StallDetector`).
    pub(crate) last_stall_end: Mutex<Option<Instant>>,
    /// Blocking queries parked right now (reported by `/v1/agent/metrics`).
    pub(crate) parked: std::sync::atomic::AtomicI64,
    /// Registry API requests in progress, parked ones included (admission control).
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
    /// Requests and connections answered 429 since start.
    pub(crate) refused: std::sync::atomic::AtomicU64,
    /// Writes committed (or refused) and how long each took to be durable and visible.
    pub(crate) writes: metrics::Writes,
    /// Set when the server is asked to stop: `/readyz` answers 503 while it serves on.
    draining: std::sync::atomic::AtomicBool,
    /// Checks that are critical, and since when; drives `DeregisterCriticalServiceAfter`.
    pub(crate) critical_since: Mutex<HashMap<(String, String), Instant>>,
    /// TTL checks' last statuses, saved beside the log.
    pub(crate) ttl_state: Arc<TtlState>,
    /// Restored TTL statuses whose runners have not started yet: each starts with the
    /// time its TTL had left instead of a full one.
    pub(crate) ttl_resume: Mutex<HashMap<String, Mark>>,
    pub(crate) guard: Mutex<crate::guard::Guard>,
    /// Session TTL clocks and lock delays (see `sessions`).
    pub(crate) sessions: crate::sessions::Timers,
    /// Itself, for the tasks it spawns (check runners), which must not keep it alive.
    pub(crate) me: Weak<Registry>,
}

/// What keeping the state in the local log (one server) and in etcd (N servers sharing
/// it) do differently: the rest of the registry calls these and does not know which it
/// has. Reads never come here: both keep the state in memory, fed by their own writes
/// (the log) or by a watch (etcd).
pub(crate) trait Backend {
    /// Validates with `f` against the latest state this server knows, and makes the ops
    /// it returns durable and visible before answering. `authority` says whether a client
    /// asked for the write or this server makes it for a role it holds (fenced on etcd).
    async fn commit<R>(
        &self,
        reg: &Registry,
        authority: Authority,
        f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error>;
    /// Sets the status of a check this server runs.
    fn set_status(&self, reg: &Registry, key: (String, String), status: Health, output: String);
    /// Whether this server runs check `id` of `node`.
    fn runs_check(&self, reg: &Registry, node: &str, id: &str, spec: &CheckSpec) -> bool;
    /// Whether this server runs the jobs one server must run (TTL expiry, reaps,
    /// session ends).
    fn is_leader(&self, reg: &Registry) -> bool;
    /// The servers' HTTP addresses, the leader first.
    fn peers(&self, reg: &Registry) -> Vec<String>;
    /// Returns once the check statuses set so far are visible to readers.
    async fn statuses_written(&self);
}

/// The two places the state can be kept.
pub(crate) enum Backing {
    Log(Box<LogStore>),
    Etcd(Arc<crate::etcd_store::EtcdStore>),
}

/// Runs `$e` with `$b` bound to the registry's backend, whichever it is.
macro_rules! backend {
    ($reg:expr, $b:ident => $e:expr) => {
        match &$reg.backing {
            Backing::Log($b) => {
                let $b: &LogStore = $b;
                $e
            }
            Backing::Etcd($b) => {
                let $b: &crate::etcd_store::EtcdStore = $b;
                $e
            }
        }
    };
}
pub(crate) use backend;

pub const SERF_CHECK: &str = "serfHealth";
pub const MAINT_PREFIX: &str = "_service_maintenance:";

impl Registry {
    /// Opens the data dir, replays the log and returns the registry. Check runners start
    /// with `start_checks` once a runtime is available.
    pub fn open(config: Config, acl_enabled: bool) -> Result<Arc<Registry>, Error> {
        let dir = config.data_dir.join("registry");
        let (store, recovered) = Store::open(&dir)?;
        Self::from_parts(config, acl_enabled, store, recovered)
    }

    /// A registry whose state lives in etcd under `prefix`, shared with every server
    /// pointed at the same prefix. Check runners start with `start_background`.
    pub async fn open_etcd(
        config: Config,
        acl_enabled: bool,
        endpoints: &[String],
        tls: Option<&tessera_etcd::TlsFiles>,
        prefix: &str,
    ) -> Result<Arc<Registry>, Error> {
        let (etcd, state) = crate::etcd_store::EtcdStore::open(endpoints, tls, prefix).await?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| {
            Error::Storage(crate::store::StoreError::Io {
                path: config.data_dir.clone(),
                source,
            })
        })?;
        Self::from_state(config, acl_enabled, Backing::Etcd(etcd), state, false)
    }

    /// A registry that keeps nothing on disk; for tests of time-dependent logic.
    pub fn in_memory(config: Config, acl_enabled: bool) -> Result<Arc<Registry>, Error> {
        let recovered = crate::store::Recovered {
            snapshot: None,
            records: Vec::new(),
        };
        Self::from_parts(config, acl_enabled, Store::memory(), recovered)
    }

    fn from_parts(
        config: Config,
        acl_enabled: bool,
        store: Store,
        recovered: crate::store::Recovered,
    ) -> Result<Arc<Registry>, Error> {
        let dir = config.data_dir.join("registry");
        let mut state = State::default();
        let decode = |bytes: &[u8], what: &str| -> Result<Record, Error> {
            serde_json::from_slice(bytes).map_err(|e| {
                Error::Storage(crate::store::StoreError::Io {
                    path: dir.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("undecodable {what}: {e}"),
                    ),
                })
            })
        };
        let mut snapshot_index = 0;
        let mut log_bytes = 0;
        if let Some(snap) = recovered.snapshot {
            let rec = decode(&snap, "snapshot")?;
            snapshot_index = rec.index;
            for op in rec.ops {
                state.apply(rec.index, op);
            }
        }
        for bytes in &recovered.records {
            let rec = decode(bytes, "log record")?;
            if rec.index <= snapshot_index {
                continue;
            }
            log_bytes += bytes.len() as u64;
            for op in rec.ops {
                state.apply(rec.index, op);
            }
        }
        let on_disk = !store.is_memory();
        let log = LogStore::new(store, state.clone(), log_bytes);
        let reg = Self::from_state(
            config,
            acl_enabled,
            Backing::Log(Box::new(log)),
            state,
            on_disk,
        )?;
        if let Backing::Log(log) = &reg.backing {
            log.store.start(Arc::new(Shown(Arc::downgrade(&reg))))?;
        }
        Ok(reg)
    }

    /// The registry around a recovered state. On the local log the checks this server
    /// runs start over (a restart of the only copy); on etcd their statuses are kept as
    /// found (the shared store's, which other servers see too). `on_disk`: the log is
    /// kept in the data dir (not a test's memory).
    fn from_state(
        config: Config,
        acl_enabled: bool,
        backing: Backing,
        mut state: State,
        on_disk: bool,
    ) -> Result<Arc<Registry>, Error> {
        let dir = config.data_dir.join("registry");
        let local_restart = matches!(backing, Backing::Log(_));
        let node_id = if local_restart && !on_disk {
            uuid()
        } else {
            load_node_id(&config.data_dir)?
        };
        // Checks the server runs restart from their configured initial state, except a
        // TTL check whose last update has not run out yet: it keeps that status.
        let (ttl_state, mut restored) = TtlState::load(on_disk.then(|| dir.clone()));
        let local = config.node_name.clone();
        let mut ttl_resume = HashMap::new();
        for check in state.checks.values_mut() {
            if local_restart && check.node == local && check.spec.is_some() {
                let is_ttl = matches!(
                    check.spec.as_ref().map(|s| &s.probe),
                    Some(Probe::Ttl { .. })
                );
                match restored.remove(&check.check_id).filter(|_| is_ttl) {
                    Some(mark) => {
                        check.status = mark.status;
                        check.output.clone_from(&mark.output);
                        ttl_resume.insert(check.check_id.clone(), mark);
                    }
                    None => {
                        check.status = initial_status(check.spec.as_ref());
                        check.output.clear();
                    }
                }
            }
        }
        if let Backing::Log(log) = &backing {
            // The head starts as the recovered state with the checks' restart applied.
            log.reset_head(state.clone());
        }
        let guard = crate::guard::Guard::new(config.mass_expiry.clone());
        let reg = Arc::new_cyclic(|me| Registry {
            me: me.clone(),
            state: RwLock::new(state),
            backing,
            broken: CancellationToken::new(),
            config,
            node_id,
            acl_enabled,
            runners: Runners::default(),
            shutdown: CancellationToken::new(),
            last_stall_end: Mutex::new(None),
            parked: std::sync::atomic::AtomicI64::new(0),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            refused: std::sync::atomic::AtomicU64::new(0),
            writes: metrics::Writes::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            critical_since: Mutex::new(HashMap::new()),
            ttl_state: Arc::new(ttl_state),
            ttl_resume: Mutex::new(ttl_resume),
            guard: Mutex::new(guard),
            sessions: crate::sessions::Timers::default(),
        });
        Ok(reg)
    }

    pub(crate) fn lock(&self) -> RwLockWriteGuard<'_, State> {
        // A poisoned lock means a panic mid-apply; the state may be half-changed, and the
        // log (which is complete) is the only safe source: stop serving.
        self.state.write().unwrap_or_else(|_| poisoned())
    }

    pub(crate) fn read_lock(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|_| poisoned())
    }

    /// The etcd store, when the state is kept there: for what only a cluster has
    /// (membership, the watch, `?consistent` barriers, contact with etcd).
    pub(crate) fn etcd(&self) -> Option<&Arc<crate::etcd_store::EtcdStore>> {
        match &self.backing {
            Backing::Etcd(e) => Some(e),
            Backing::Log(_) => None,
        }
    }

    /// `commit` for a write this server makes because of a role it holds (the leader's
    /// reaps and session ends): on etcd, fenced on its membership, so a server that lost
    /// its place writes nothing.
    pub(crate) async fn commit_as_member<R>(
        &self,
        f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        let started = std::time::Instant::now();
        let r = backend!(self, b => Backend::commit(b, self, Authority::Member, f).await);
        self.writes.record(&r, started.elapsed());
        r
    }

    /// Runs `f` against the head and commits the ops it returns as one record; returns
    /// once the record is durable and visible.
    pub(crate) async fn commit<R>(
        &self,
        f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        let started = std::time::Instant::now();
        let r = backend!(self, b => Backend::commit(b, self, Authority::Client, f).await);
        self.writes.record(&r, started.elapsed());
        r
    }

    /// Shows readers a record another server (or this one) wrote to the shared store.
    pub(crate) fn show_remote(&self, rec: Record) {
        let mut st = self.lock();
        self.show(&mut st, Pending::Record(rec));
    }

    /// Applies one change to the durable state, with the check runners and the
    /// critical-since clock kept in step.
    fn show(&self, st: &mut State, p: Pending) {
        let local = self.config.node_name.as_str();
        match p {
            Pending::Record(rec) => {
                for op in rec.ops {
                    self.before_apply(st, &op);
                    st.apply(rec.index, op);
                }
            }
            Pending::Status {
                id,
                status,
                output,
                index,
            } => {
                let key = (local.to_owned(), id);
                let Some(check) = st.checks.get_mut(&key) else {
                    return;
                };
                check.output = output;
                let Some(index) = index else { return };
                check.status = status;
                check.modify_index = index;
                let service_id = check.service_id.clone();
                let reapable = check
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.deregister_critical_after.is_some());
                st.index = st.index.max(index);
                st.touch_check_owner(local, &service_id, index);
                self.note_status(&key.0, &key.1, status, reapable);
            }
        }
    }

    /// Whether mass-expiry protection holds TTL expiries now, and how many.
    pub fn mass_expiry_protection(&self) -> crate::guard::Protection {
        self.guard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status()
    }

    /// Why the store broke, once it has.
    pub fn storage_broken(&self) -> Option<&DiskError> {
        match &self.backing {
            Backing::Log(log) => log.broken_by.get(),
            Backing::Etcd(_) => None,
        }
    }

    /// Keeps check runners and the critical-since clock in step with the ops.
    fn before_apply(&self, st: &State, op: &Op) {
        match op {
            Op::PutSession(s) => self.session_clock(s),
            Op::DeleteSession(id) => self.session_ended(id),
            // The critical-since clock covers every node's checks: on etcd the leader
            // reaps for all of them.
            Op::PutCheck(c) => {
                let reapable = c
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.deregister_critical_after.is_some());
                self.note_status(&c.node, &c.check_id, c.status, reapable);
                match &c.spec {
                    Some(spec) if self.runs_check(&c.node, &c.check_id, spec) => {
                        self.runners.ensure(&self.me, &c.node, &c.check_id, spec)
                    }
                    _ => self.runners.stop(&c.node, &c.check_id),
                }
            }
            Op::DeleteCheck { node, id } => {
                self.runners.stop(node, id);
                self.forget_status(node, id);
            }
            Op::DeleteService { node, id } => {
                if let Some(ids) = st.checks_by_owner.get(&(node.clone(), id.clone())) {
                    for cid in ids {
                        self.runners.stop(node, cid);
                        self.forget_status(node, cid);
                    }
                }
            }
            _ => {}
        }
    }

    /// Tracks since when a check is critical, for checks that deregister their service
    /// after a critical spell (`reapable`); others cost the reaper nothing.
    fn note_status(&self, node: &str, check_id: &str, status: Health, reapable: bool) {
        let mut cs = self
            .critical_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (node.to_owned(), check_id.to_owned());
        if status == Health::Critical && reapable {
            cs.entry(key).or_insert_with(Instant::now);
        } else {
            cs.remove(&key);
        }
    }

    fn forget_status(&self, node: &str, check_id: &str) {
        if node == self.config.node_name {
            self.ttl_state.forget(check_id);
            self.guard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .renewed(check_id, self.runners.ttl_checks());
        }
        let mut cs = self
            .critical_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cs.remove(&(node.to_owned(), check_id.to_owned()));
    }

    /// Reads the state under the lock.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.read_lock())
    }

    /// Consul's blocking query: returns `read`'s result as soon as its index exceeds
    /// `min_index`, or after `wait`. `read` returns (result index, value).
    pub async fn blocking<T>(
        &self,
        topic: Topic,
        min_index: u64,
        wait: Duration,
        read: impl Fn(&State) -> (u64, T),
    ) -> (u64, T) {
        let deadline = Instant::now() + wait;
        loop {
            let (mut rx, (index, value)) = {
                let st = self.read_lock();
                let rx = st.subscribe(topic.clone());
                let res = read(&st);
                // An index from the future (e.g. from before a restart) cannot be waited
                // on meaningfully; answer at once so the client resets.
                if min_index == 0 || res.0 > min_index || min_index > st.index {
                    return res;
                }
                (rx, res)
            };
            let _parked = Parked::new(&self.parked);
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return (index, value);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return read(&self.read_lock());
                }
                _ = self.shutdown.cancelled() => return (index, value),
            }
        }
    }

    /// Result index of a read about one service: the service's own topic, or (for a
    /// service never seen) the services table, so its first registration wakes watchers.
    pub fn service_index(&self, name: &str) -> u64 {
        self.read(|st| service_index(st, name))
    }

    /// Passing instances of `service` as (`host:port`, passing weight): what in-process
    /// callers such as the saga coordinator balance over.
    pub fn healthy_instances(&self, service: &str) -> Vec<(String, u32)> {
        self.read(|st| {
            let Some(keys) = st.by_name.get(service) else {
                return Vec::new();
            };
            keys.iter()
                .filter_map(|k| {
                    let s = st.services.get(k)?;
                    if State::aggregate(&st.instance_checks(&s.node, &s.id)) != Health::Passing {
                        return None;
                    }
                    let host = if s.address.is_empty() {
                        st.nodes.get(&s.node)?.address.clone()
                    } else {
                        s.address.clone()
                    };
                    let host = if host.contains(':') && !host.starts_with('[') {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    Some((format!("{host}:{}", s.port), s.weights.passing))
                })
                .collect()
        })
    }

    /// A blocking query on one service; returns its index when it changes past
    /// `min_index` or when `wait` ends.
    pub async fn blocking_service(&self, name: &str, min_index: u64, wait: Duration) -> u64 {
        self.blocking(Topic::Service(name.to_owned()), min_index, wait, |st| {
            (service_index(st, name), ())
        })
        .await
        .0
    }

    /// Status of a check on this server's node.
    pub fn check_status(&self, check_id: &str) -> Option<Health> {
        let key = (self.config.node_name.clone(), check_id.to_owned());
        self.read(|st| st.checks.get(&key).map(|c| c.status))
    }

    /// Whether a service instance is registered on this server's node.
    pub fn has_service(&self, service_id: &str) -> bool {
        let key = (self.config.node_name.clone(), service_id.to_owned());
        self.read(|st| st.services.contains_key(&key))
    }

    pub fn local_node(&self) -> &str {
        &self.config.node_name
    }

    pub fn current_index(&self) -> u64 {
        self.read_lock().index
    }

    /// Registers the local node and its `serfHealth` check if they are missing or stale.
    pub async fn ensure_local_node(&self) -> Result<(), Error> {
        let node = self.config.node_name.clone();
        let id = self.node_id.clone();
        let addr = self.config.advertise_addr.clone();
        let dc = self.config.datacenter.clone();
        self.commit(|st, index| {
            let mut ops = Vec::new();
            let existing = st.nodes.get(&node);
            if existing.is_none_or(|n| n.id != id || n.address != addr || n.datacenter != dc) {
                ops.push(Op::PutNode(NodeRecord {
                    id: id.clone(),
                    node: node.clone(),
                    address: addr.clone(),
                    datacenter: dc.clone(),
                    tagged_addresses: BTreeMap::from([
                        ("lan".into(), addr.clone()),
                        ("wan".into(), addr.clone()),
                    ]),
                    meta: BTreeMap::new(),
                    create_index: existing.map(|n| n.create_index).unwrap_or(index),
                    modify_index: index,
                }));
            }
            if !st.checks.contains_key(&(node.clone(), SERF_CHECK.into())) {
                ops.push(Op::PutCheck(CheckRecord {
                    node: node.clone(),
                    check_id: SERF_CHECK.into(),
                    name: "Serf Health Status".into(),
                    status: Health::Passing,
                    notes: String::new(),
                    output: "Agent alive and reachable".into(),
                    service_id: String::new(),
                    service_name: String::new(),
                    spec: None,
                    maintenance: false,
                    create_index: index,
                    modify_index: index,
                }));
            }
            Ok((ops, ()))
        })
        .await
    }

    /// Stops background tasks and wakes every blocking query.
    /// The server is stopping: `/readyz` answers 503 from now on, so load balancers and
    /// Kubernetes stop sending to it, while it serves on until told to stop.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Why this server should not be sent requests, if it should not.
    pub fn not_ready(&self) -> Option<String> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Some("draining: stopping after its drain delay".into());
        }
        self.storage_broken()
            .map(|e| format!("its store cannot be written: {e}"))
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
        self.runners.stop_all();
        self.ttl_state.flush();
    }
}

/// Counts a parked blocking query for as long as it lives (also when its client goes away
/// and the future is dropped).
struct Parked<'a>(&'a std::sync::atomic::AtomicI64);

impl<'a> Parked<'a> {
    fn new(c: &'a std::sync::atomic::AtomicI64) -> Self {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Parked(c)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Point-in-time figures for `/v1/agent/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub index: u64,
    pub nodes: usize,
    pub services: usize,
    pub checks: usize,
    pub checks_critical: usize,
    pub kv_entries: usize,
    pub blocking_queries: i64,
    /// Requests and connections refused with 429 since start (admission control).
    pub refused: u64,
}

impl Registry {
    pub fn stats(&self) -> Stats {
        let parked = self.parked.load(std::sync::atomic::Ordering::Relaxed);
        let refused = self.refused.load(std::sync::atomic::Ordering::Relaxed);
        self.read(|st| Stats {
            index: st.index,
            nodes: st.nodes.len(),
            services: st.services.len(),
            checks: st.checks.len(),
            checks_critical: st
                .checks
                .values()
                .filter(|c| c.status == Health::Critical)
                .count(),
            kv_entries: st.kv.len(),
            blocking_queries: parked,
            refused,
        })
    }
}

fn poisoned() -> ! {
    tracing::error!("registry state lock poisoned by a panic; aborting (the log is intact)");
    std::process::abort()
}

/// The state a server-run check starts in after a restart: its definition's `Status`,
/// else critical, as Consul does.
fn initial_status(spec: Option<&CheckSpec>) -> Health {
    spec.and_then(|s| s.initial).unwrap_or(Health::Critical)
}

pub(crate) fn service_index(st: &State, name: &str) -> u64 {
    let own = st.topic_index(&Topic::Service(name.to_owned()));
    if own > 0 {
        own
    } else {
        st.topic_index(&Topic::Services).max(1)
    }
}

/// A random UUID v4 in its canonical text form.
pub fn uuid() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let bytes: [u8; 16] = {
        let mut x = [0u8; 16];
        x[..8].copy_from_slice(&a.to_be_bytes());
        x[8..].copy_from_slice(&b.to_be_bytes());
        x[6] = (x[6] & 0x0f) | 0x40;
        x[8] = (x[8] & 0x3f) | 0x80;
        x
    };
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn load_node_id(data_dir: &std::path::Path) -> Result<String, Error> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let id = uuid();
            let io = |source| {
                Error::Storage(crate::store::StoreError::Io {
                    path: path.clone(),
                    source,
                })
            };
            let tmp = data_dir.join("node-id.tmp");
            std::fs::write(&tmp, &id).map_err(io)?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(id)
        }
    }
}
