//! The registry handle: two copies of the state and one durable log between them.
//!
//! A write validates against the *head* (every write made so far), turns into ops, is
//! applied to the head and queued to the log under the head's lock, so log order is index
//! order and the next write validates against this one without waiting for the disk.
//! Readers, blocking queries and check runners see only the *durable* state: a record is
//! applied there, in index order, once the log's writer reports its frame fsynced, and
//! only then is the write acknowledged. When the disk refuses a write, the writer cuts the
//! log back and the head is rebuilt from the durable state, so a refused write (and every
//! write validated against it) was never visible to anyone and the next write starts
//! clean. The price is a second copy of the state in memory.

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
    /// The write side: validated against, ahead of the durable state by the writes
    /// waiting for their fsync.
    head: Mutex<Head>,
    /// Writes made on the head and not yet shown, in index order.
    pending: Mutex<VecDeque<Pending>>,
    /// Highest record index whose log frame is durable.
    durable: AtomicU64,
    store: Store,
    /// Set when the log can no longer be trusted; the server exits on it.
    pub(crate) broken: CancellationToken,
    broken_by: OnceLock<DiskError>,
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
    /// Set when the state lives in etcd (shared by N servers) instead of the local log.
    pub(crate) etcd: Option<Arc<crate::etcd_store::EtcdStore>>,
}

struct Head {
    state: State,
    /// Appends carry it; it moves on when the log loses writes, so writes validated
    /// against lost ones are refused too.
    generation: u64,
    /// Bytes appended to the log since the last snapshot.
    log_bytes: u64,
}

/// A change made on the head, waiting to be shown to readers.
enum Pending {
    /// A logged write: shown once its frame is durable.
    Record(Record),
    /// A check's status or output, which is not logged: shown as soon as every record
    /// before it is. `index` is `None` when only the output changed.
    Status {
        id: String,
        status: Health,
        output: String,
        index: Option<u64>,
    },
}

/// The log writer's reports, turned into visibility.
struct Shown(Weak<Registry>);

impl Applier for Shown {
    fn durable(&self, index: u64) {
        if let Some(reg) = self.0.upgrade() {
            reg.durable.fetch_max(index, Ordering::AcqRel);
            reg.drain();
        }
    }

    fn lost(&self, durable: u64) -> u64 {
        match self.0.upgrade() {
            Some(reg) => reg.lost(durable),
            None => 0,
        }
    }

    fn broken(&self, error: &DiskError) {
        if let Some(reg) = self.0.upgrade() {
            let _ = reg.broken_by.set(error.clone());
            reg.broken.cancel();
        }
    }
}

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
        let reg = Self::from_state(config, acl_enabled, Store::memory(), state, 0, Some(etcd))?;
        reg.store.start(Arc::new(Shown(Arc::downgrade(&reg))))?;
        Ok(reg)
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
        let reg = Self::from_state(config, acl_enabled, store, state, log_bytes, None)?;
        reg.store.start(Arc::new(Shown(Arc::downgrade(&reg))))?;
        Ok(reg)
    }

    /// The registry around a recovered state. On the local log the checks this server
    /// runs start over (a restart of the only copy); on etcd their statuses are kept as
    /// found (the shared store's, which other servers see too).
    fn from_state(
        config: Config,
        acl_enabled: bool,
        store: Store,
        mut state: State,
        log_bytes: u64,
        etcd: Option<Arc<crate::etcd_store::EtcdStore>>,
    ) -> Result<Arc<Registry>, Error> {
        let dir = config.data_dir.join("registry");
        let local_restart = etcd.is_none();
        let node_id = if store.is_memory() && etcd.is_none() {
            uuid()
        } else {
            load_node_id(&config.data_dir)?
        };
        // Checks the server runs restart from their configured initial state, except a
        // TTL check whose last update has not run out yet: it keeps that status.
        let (ttl_state, mut restored) = TtlState::load((!store.is_memory()).then(|| dir.clone()));
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
        let durable = state.index;
        let guard = crate::guard::Guard::new(config.mass_expiry.clone());
        let reg = Arc::new(Registry {
            head: Mutex::new(Head {
                state: state.clone(),
                generation: 0,
                log_bytes,
            }),
            state: RwLock::new(state),
            pending: Mutex::new(VecDeque::new()),
            durable: AtomicU64::new(durable),
            broken: CancellationToken::new(),
            broken_by: OnceLock::new(),
            store,
            config,
            node_id,
            acl_enabled,
            runners: Runners::default(),
            shutdown: CancellationToken::new(),
            last_stall_end: Mutex::new(None),
            parked: std::sync::atomic::AtomicI64::new(0),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            refused: std::sync::atomic::AtomicU64::new(0),
            critical_since: Mutex::new(HashMap::new()),
            ttl_state: Arc::new(ttl_state),
            ttl_resume: Mutex::new(ttl_resume),
            guard: Mutex::new(guard),
            sessions: crate::sessions::Timers::default(),
            etcd,
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

    fn head(&self) -> MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(|_| poisoned())
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `commit` for a write this server makes because of a role it holds (the leader's
    /// reaps and session ends): on etcd, fenced on its membership, so a server that lost
    /// its place writes nothing.
    pub(crate) async fn commit_as_member<R>(
        &self,
        f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        match &self.etcd {
            Some(etcd) => etcd.commit(self, Authority::Member, f).await,
            None => self.commit(f).await,
        }
    }

    /// Runs `f` against the head and commits the ops it returns as one record; returns
    /// once the record is durable and visible.
    pub(crate) async fn commit<R>(
        &self,
        mut f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        if let Some(etcd) = &self.etcd {
            return etcd.commit(self, Authority::Client, f).await;
        }
        let (ack, out) = {
            let mut head = self.head();
            let index = head.state.index + 1;
            let (ops, out) = f(&head.state, index)?;
            if ops.is_empty() {
                return Ok(out);
            }
            let record = Record { index, ops };
            let payload = match serde_json::to_vec(&record) {
                Ok(p) => p,
                Err(e) => return Err(Error::bad(format!("cannot encode record: {e}"))),
            };
            head.log_bytes += payload.len() as u64;
            for op in record.ops.iter().cloned() {
                head.state.apply(index, op);
            }
            self.pending().push_back(Pending::Record(record));
            let ack = self.store.append(head.generation, index, payload);
            if head.log_bytes > self.config.snapshot_after_bytes {
                Self::snapshot_head(&self.store, &mut head);
            }
            (ack, out)
        };
        match ack.await {
            Ok(Ok(())) => Ok(out),
            Ok(Err(e)) => Err(Error::Storage(e)),
            Err(_) => Err(Error::Storage(StoreError::Closed)),
        }
    }

    fn snapshot_head(store: &Store, head: &mut Head) {
        let rec = Record {
            index: head.state.index,
            ops: head.state.snapshot_ops(),
        };
        match serde_json::to_vec(&rec) {
            Ok(bytes) => {
                store.snapshot(head.generation, bytes);
                head.log_bytes = 0;
            }
            Err(e) => tracing::error!(error = %e, "cannot encode snapshot"),
        }
    }

    /// Shows readers every pending change whose turn has come: records up to the durable
    /// index and the status changes after them.
    fn drain(&self) {
        let durable = self.durable.load(Ordering::Acquire);
        let ready = |p: &Pending| match p {
            Pending::Record(r) => r.index <= durable,
            Pending::Status { .. } => true,
        };
        let mut pending = self.pending();
        if !pending.front().is_some_and(ready) {
            return;
        }
        let mut st = self.lock();
        while let Some(p) = pending.pop_front() {
            if !ready(&p) {
                pending.push_front(p);
                break;
            }
            self.show(&mut st, p);
        }
    }

    /// The log lost every record after `durable`: the durable ones are shown, the lost
    /// ones dropped, and the head rebuilt from what readers see. Returns the generation
    /// that appends carry from now on.
    fn lost(&self, durable: u64) -> u64 {
        let mut head = self.head();
        let mut pending = self.pending();
        let mut st = self.lock();
        let mut dropped = 0;
        for p in pending.drain(..) {
            match p {
                Pending::Record(r) if r.index > durable => dropped += 1,
                p => self.show(&mut st, p),
            }
        }
        head.state = st.clone();
        head.generation += 1;
        tracing::warn!(
            dropped,
            index = st.index,
            "writes not kept by the log were dropped; the registry is as of its last durable write"
        );
        head.generation
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
        self.broken_by.get()
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
                        self.runners.ensure(&c.node, &c.check_id, spec)
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

    // ---- agent API ----------------------------------------------------------------

    /// `PUT /v1/agent/service/register`.
    pub async fn register_service(
        &self,
        def: ServiceDef,
        replace_existing_checks: bool,
        authz: &Authz,
    ) -> Result<(), Error> {
        let weights = def.validate()?;
        if !authz.allows(crate::acl::Resource::Service, &def.name, Level::Write) {
            return Err(Error::denied(format!(
                "token lacks service:write on {:?}",
                def.name
            )));
        }
        let node = self.config.node_name.clone();
        let sid = def.service_id().to_owned();
        let mut check_defs: Vec<CheckDef> = Vec::new();
        check_defs.extend(def.check.clone());
        check_defs.extend(def.checks.clone().unwrap_or_default());
        let many = check_defs.len() > 1;
        let mut prepared = Vec::new();
        for (i, cdef) in check_defs.iter().enumerate() {
            let spec = cdef
                .spec(true)
                .map_err(|e| Error::bad(format!("Check {}: {e}", i + 1)))?;
            let initial = cdef.initial_status()?;
            let id = match cdef.check_id.as_deref() {
                Some(id) if !id.is_empty() => id.to_owned(),
                _ if many => format!("service:{sid}:{}", i + 1),
                _ => format!("service:{sid}"),
            };
            tessera_core::validate_service_name("check ID (CheckID)", &id)?;
            let name = cdef
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("Service '{}' check", def.name));
            prepared.push((id, name, cdef.notes.clone(), initial, spec));
        }
        self.commit(|st, index| {
            let key = (node.clone(), sid.clone());
            let existing = st.services.get(&key);
            let mut ops = vec![Op::PutService(ServiceRecord {
                node: node.clone(),
                id: sid.clone(),
                service: def.name.clone(),
                tags: def.tags.clone().unwrap_or_default(),
                address: def.address.clone(),
                port: def.port.unwrap_or(0),
                meta: def.meta.clone().unwrap_or_default(),
                weights,
                enable_tag_override: def.enable_tag_override,
                kind: def.kind.clone(),
                tagged_addresses: def.tagged_addresses.clone().unwrap_or_default(),
                create_index: existing.map(|s| s.create_index).unwrap_or(index),
                modify_index: index,
            })];
            let mut keep = Vec::new();
            for (id, name, notes, initial, spec) in &prepared {
                let old = st.checks.get(&(node.clone(), id.clone()));
                // Re-registering keeps a check's current state unless a Status is given,
                // so a redeploy does not flap its instances to critical.
                let (status, output) = match (initial, old) {
                    (Some(s), _) => (*s, String::new()),
                    (None, Some(o)) if o.spec == *spec => (o.status, o.output.clone()),
                    (None, _) => (Health::Critical, String::new()),
                };
                keep.push(id.clone());
                ops.push(Op::PutCheck(CheckRecord {
                    node: node.clone(),
                    check_id: id.clone(),
                    name: name.clone(),
                    status,
                    notes: notes.clone(),
                    output,
                    service_id: sid.clone(),
                    service_name: def.name.clone(),
                    spec: spec.clone(),
                    maintenance: false,
                    create_index: old.map(|o| o.create_index).unwrap_or(index),
                    modify_index: index,
                }));
            }
            if replace_existing_checks && let Some(ids) = st.checks_by_owner.get(&key) {
                for id in ids {
                    if !keep.contains(id) && !id.starts_with(MAINT_PREFIX) {
                        ops.push(Op::DeleteCheck {
                            node: node.clone(),
                            id: id.clone(),
                        });
                    }
                }
            }
            Ok((ops, ()))
        })
        .await
    }

    /// `PUT /v1/agent/service/deregister/:id`.
    pub async fn deregister_service(&self, id: &str, authz: &Authz) -> Result<(), Error> {
        let node = self.config.node_name.clone();
        self.commit(|st, _| {
            let Some(svc) = st.services.get(&(node.clone(), id.to_owned())) else {
                return Err(Error::NotFound(format!("Unknown service ID {id:?}")));
            };
            if !authz.allows(crate::acl::Resource::Service, &svc.service, Level::Write) {
                return Err(Error::denied(format!(
                    "token lacks service:write on {:?}",
                    svc.service
                )));
            }
            Ok((
                vec![Op::DeleteService {
                    node: node.clone(),
                    id: id.to_owned(),
                }],
                (),
            ))
        })
        .await
    }

    /// `PUT /v1/agent/check/register`.
    pub async fn register_check(&self, def: CheckDef, authz: &Authz) -> Result<(), Error> {
        let spec = def.spec(true)?;
        let initial = def.initial_status()?;
        let name = def
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::bad("Missing check name (Name)"))?;
        let id = def
            .check_id
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| name.clone());
        tessera_core::validate_service_name("check ID (CheckID)", &id)?;
        let node = self.config.node_name.clone();
        self.commit(|st, index| {
            let service_id = def.service_id.clone().unwrap_or_default();
            let service_name = if service_id.is_empty() {
                if !authz.allows(crate::acl::Resource::Node, &node, Level::Write) {
                    return Err(Error::denied(format!("token lacks node:write on {node:?}")));
                }
                String::new()
            } else {
                let svc = st
                    .services
                    .get(&(node.clone(), service_id.clone()))
                    .ok_or_else(|| {
                        Error::bad(format!("ServiceID {service_id:?} does not exist"))
                    })?;
                if !authz.allows(crate::acl::Resource::Service, &svc.service, Level::Write) {
                    return Err(Error::denied(format!(
                        "token lacks service:write on {:?}",
                        svc.service
                    )));
                }
                svc.service.clone()
            };
            let old = st.checks.get(&(node.clone(), id.clone()));
            let (status, output) = match (initial, old) {
                (Some(s), _) => (s, String::new()),
                (None, Some(o)) if o.spec == spec => (o.status, o.output.clone()),
                (None, _) => (Health::Critical, String::new()),
            };
            Ok((
                vec![Op::PutCheck(CheckRecord {
                    node: node.clone(),
                    check_id: id.clone(),
                    name: name.clone(),
                    status,
                    notes: def.notes.clone(),
                    output,
                    service_id,
                    service_name,
                    spec: spec.clone(),
                    maintenance: false,
                    create_index: old.map(|o| o.create_index).unwrap_or(index),
                    modify_index: index,
                })],
                (),
            ))
        })
        .await
    }

    fn check_write_allowed(
        &self,
        st: &State,
        check: &CheckRecord,
        authz: &Authz,
    ) -> Result<(), Error> {
        if check.service_id.is_empty() {
            if !authz.allows(crate::acl::Resource::Node, &check.node, Level::Write) {
                return Err(Error::denied(format!(
                    "token lacks node:write on {:?}",
                    check.node
                )));
            }
        } else {
            let name = st
                .services
                .get(&(check.node.clone(), check.service_id.clone()))
                .map(|s| s.service.as_str())
                .unwrap_or(check.service_name.as_str());
            if !authz.allows(crate::acl::Resource::Service, name, Level::Write) {
                return Err(Error::denied(format!(
                    "token lacks service:write on {name:?}"
                )));
            }
        }
        Ok(())
    }

    /// `PUT /v1/agent/check/deregister/:id`.
    pub async fn deregister_check(&self, id: &str, authz: &Authz) -> Result<(), Error> {
        let node = self.config.node_name.clone();
        self.commit(|st, _| {
            let check = st
                .checks
                .get(&(node.clone(), id.to_owned()))
                .ok_or_else(|| Error::NotFound(format!("Unknown check ID {id:?}")))?;
            self.check_write_allowed(st, check, authz)?;
            Ok((
                vec![Op::DeleteCheck {
                    node: node.clone(),
                    id: id.to_owned(),
                }],
                (),
            ))
        })
        .await
    }

    /// `PUT /v1/agent/check/{pass,warn,fail}/:id` and `/update/:id`: only for TTL checks.
    /// Check status is runtime state: it is not logged, and restarts from the initial one.
    pub fn update_ttl(
        &self,
        id: &str,
        status: Health,
        output: String,
        authz: &Authz,
    ) -> Result<(), Error> {
        let mut node = self.config.node_name.clone();
        // On etcd any server takes a heartbeat, for a check on any node (its own first).
        if self.etcd.is_some() {
            let found = self.read(|st| {
                if st.checks.contains_key(&(node.clone(), id.to_owned())) {
                    return None;
                }
                st.checks
                    .values()
                    .find(|c| c.check_id == id)
                    .map(|c| c.node.clone())
            });
            if let Some(other) = found {
                node = other;
            }
        }
        let ttl = {
            let st = self.read_lock();
            let check = st
                .checks
                .get(&(node.clone(), id.to_owned()))
                .ok_or_else(|| Error::NotFound(format!("Unknown check ID {id:?}")))?;
            self.check_write_allowed(&st, check, authz)?;
            let Some(Probe::Ttl { ttl }) = check.spec.as_ref().map(|s| &s.probe) else {
                return Err(Error::bad(format!(
                    "CheckID {id:?} does not have associated TTL"
                )));
            };
            *ttl
        };
        if let Some(etcd) = &self.etcd {
            etcd.queue_heartbeat((node, id.to_owned()), status, output);
            return Ok(());
        }
        self.runners.reset_ttl(&node, id);
        self.guard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .renewed(id, self.runners.ttl_checks());
        self.ttl_state.record(id, status, &output, ttl);
        self.set_status(&node, id, status, output);
        Ok(())
    }

    /// Whether this server runs the jobs one server must run (ending sessions): always
    /// on one server; on etcd, the leader (the oldest live member).
    pub fn is_leader(&self) -> bool {
        match &self.etcd {
            Some(etcd) => etcd.leader_name().as_deref() == Some(self.config.node_name.as_str()),
            None => true,
        }
    }

    /// Returns once the check statuses set so far are visible to readers: at once on
    /// one server; on etcd, once they are written (a TTL update answers after that, so
    /// the client's next read shows it).
    pub async fn statuses_written(&self) {
        if let Some(etcd) = &self.etcd {
            etcd.statuses_written().await;
        }
    }

    /// Sets the status of a check this server runs. The index moves only when the
    /// status does, so an HTTP check whose body changes every time does not wake every
    /// watcher. On one server, status is not logged, but it is shown in index order after
    /// the writes before it; on etcd, a change is written, fenced on this server's
    /// membership.
    pub(crate) fn set_status(&self, node: &str, id: &str, status: Health, output: String) {
        let key = (node.to_owned(), id.to_owned());
        if let Some(etcd) = &self.etcd {
            // The view already says so: nothing to write (a change made elsewhere that
            // this server has not seen yet is written by the next probe).
            if self.read(|st| st.checks.get(&key).map(|c| c.status)) != Some(status) {
                etcd.queue_status(key, status, output);
            }
            return;
        }
        {
            let mut head = self.head();
            let next = head.state.index + 1;
            let Some(check) = head.state.checks.get_mut(&key) else {
                return;
            };
            let index = if check.status == status {
                if check.output == output {
                    return;
                }
                None
            } else {
                check.status = status;
                check.modify_index = next;
                Some(next)
            };
            check.output.clone_from(&output);
            if let Some(index) = index {
                head.state.index = index;
            }
            self.pending().push_back(Pending::Status {
                id: id.to_owned(),
                status,
                output,
                index,
            });
        }
        self.drain();
    }

    /// `PUT /v1/agent/service/maintenance/:id?enable=...&reason=...`.
    pub async fn maintenance(
        &self,
        service_id: &str,
        enable: bool,
        reason: Option<String>,
        authz: &Authz,
    ) -> Result<(), Error> {
        let node = self.config.node_name.clone();
        self.commit(|st, index| {
            let svc = st
                .services
                .get(&(node.clone(), service_id.to_owned()))
                .ok_or_else(|| Error::NotFound(format!("Unknown service ID {service_id:?}")))?;
            if !authz.allows(crate::acl::Resource::Service, &svc.service, Level::Write) {
                return Err(Error::denied(format!(
                    "token lacks service:write on {:?}",
                    svc.service
                )));
            }
            let check_id = format!("{MAINT_PREFIX}{service_id}");
            let exists = st.checks.contains_key(&(node.clone(), check_id.clone()));
            let ops = match (enable, exists) {
                (true, _) => vec![Op::PutCheck(CheckRecord {
                    node: node.clone(),
                    check_id,
                    name: "Service Maintenance Mode".into(),
                    status: Health::Critical,
                    notes: reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| {
                        "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.".into()
                    }),
                    output: String::new(),
                    service_id: service_id.to_owned(),
                    service_name: svc.service.clone(),
                    spec: None,
                    maintenance: true,
                    create_index: index,
                    modify_index: index,
                })],
                (false, true) => vec![Op::DeleteCheck {
                    node: node.clone(),
                    id: check_id,
                }],
                (false, false) => vec![],
            };
            Ok((ops, ()))
        })
        .await
    }

    // ---- catalog API --------------------------------------------------------------

    /// `PUT /v1/catalog/register`.
    pub async fn catalog_register(
        &self,
        reg: CatalogRegistration,
        authz: &Authz,
    ) -> Result<(), Error> {
        reg.validate()?;
        if let Some(dc) = &reg.datacenter
            && !dc.is_empty()
            && *dc != self.config.datacenter
        {
            return Err(Error::bad(format!("No path to datacenter {dc:?}")));
        }
        if !authz.allows(crate::acl::Resource::Node, &reg.node, Level::Write) {
            return Err(Error::denied(format!(
                "token lacks node:write on {:?}",
                reg.node
            )));
        }
        let weights = match &reg.service {
            Some(s) => {
                if !authz.allows(crate::acl::Resource::Service, &s.name, Level::Write) {
                    return Err(Error::denied(format!(
                        "token lacks service:write on {:?}",
                        s.name
                    )));
                }
                Some(s.validate()?)
            }
            None => None,
        };
        let mut checks: Vec<CheckDef> = Vec::new();
        checks.extend(reg.check.clone());
        checks.extend(reg.checks.clone().unwrap_or_default());
        let mut prepared = Vec::new();
        for c in &checks {
            let status = c.initial_status()?.unwrap_or(Health::Critical);
            let id = c
                .check_id
                .clone()
                .filter(|i| !i.is_empty())
                .or_else(|| c.name.clone())
                .filter(|i| !i.is_empty())
                .ok_or_else(|| Error::bad("Check: missing CheckID and Name"))?;
            prepared.push((id, status, c));
        }
        let local = self.config.node_name.clone();
        self.commit(|st, index| {
            let mut ops = Vec::new();
            let existing = st.nodes.get(&reg.node);
            if reg.node == local && existing.is_some() && reg.skip_node_update {
                // Leave the local node as the server manages it.
            } else if !reg.skip_node_update || existing.is_none() {
                ops.push(Op::PutNode(NodeRecord {
                    id: reg
                        .id
                        .clone()
                        .or_else(|| existing.map(|n| n.id.clone()))
                        .unwrap_or_default(),
                    node: reg.node.clone(),
                    address: reg.address.clone(),
                    datacenter: self.config.datacenter.clone(),
                    tagged_addresses: reg.tagged_addresses.clone().unwrap_or_default(),
                    meta: reg.node_meta.clone().unwrap_or_default(),
                    create_index: existing.map(|n| n.create_index).unwrap_or(index),
                    modify_index: index,
                }));
            }
            let mut service_id = String::new();
            let mut service_name = String::new();
            if let (Some(s), Some(weights)) = (&reg.service, weights) {
                service_id = s.service_id().to_owned();
                service_name = s.name.clone();
                let old = st.services.get(&(reg.node.clone(), service_id.clone()));
                ops.push(Op::PutService(ServiceRecord {
                    node: reg.node.clone(),
                    id: service_id.clone(),
                    service: s.name.clone(),
                    tags: s.tags.clone().unwrap_or_default(),
                    address: s.address.clone(),
                    port: s.port.unwrap_or(0),
                    meta: s.meta.clone().unwrap_or_default(),
                    weights,
                    enable_tag_override: s.enable_tag_override,
                    kind: s.kind.clone(),
                    tagged_addresses: s.tagged_addresses.clone().unwrap_or_default(),
                    create_index: old.map(|o| o.create_index).unwrap_or(index),
                    modify_index: index,
                }));
            }
            for (id, status, c) in &prepared {
                let sid = c
                    .service_id
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| service_id.clone());
                let sname = if sid == service_id {
                    service_name.clone()
                } else {
                    st.services
                        .get(&(reg.node.clone(), sid.clone()))
                        .map(|s| s.service.clone())
                        .ok_or_else(|| {
                            Error::bad(format!("Check {id:?}: unknown ServiceID {sid:?}"))
                        })?
                };
                let old = st.checks.get(&(reg.node.clone(), id.clone()));
                ops.push(Op::PutCheck(CheckRecord {
                    node: reg.node.clone(),
                    check_id: id.clone(),
                    name: c.name.clone().unwrap_or_else(|| id.clone()),
                    status: *status,
                    notes: c.notes.clone(),
                    output: c.output.clone().unwrap_or_default(),
                    service_id: sid,
                    service_name: sname,
                    spec: None,
                    maintenance: false,
                    create_index: old.map(|o| o.create_index).unwrap_or(index),
                    modify_index: index,
                }));
            }
            Ok((ops, ()))
        })
        .await
    }

    /// `PUT /v1/catalog/deregister`.
    pub async fn catalog_deregister(
        &self,
        d: CatalogDeregistration,
        authz: &Authz,
    ) -> Result<(), Error> {
        tessera_core::validate_service_name("node name (Node)", &d.node)?;
        if d.node == self.config.node_name
            && d.service_id.as_deref().unwrap_or("").is_empty()
            && d.check_id.as_deref().unwrap_or("").is_empty()
        {
            return Err(Error::bad(
                "Cannot deregister the server's own node; deregister its services instead",
            ));
        }
        self.commit(|st, _| {
            let mut ops = Vec::new();
            // Checked before anything is looked up, so a token without rights cannot tell
            // what exists by the answer: deregistering something absent needs node:write.
            let node_write = || {
                if authz.allows(crate::acl::Resource::Node, &d.node, Level::Write) {
                    Ok(())
                } else {
                    Err(Error::denied(format!(
                        "token lacks node:write on {:?}",
                        d.node
                    )))
                }
            };
            if !st.nodes.contains_key(&d.node) {
                node_write()?;
                return Ok((ops, ()));
            }
            match (
                d.service_id.as_deref().filter(|s| !s.is_empty()),
                d.check_id.as_deref().filter(|s| !s.is_empty()),
            ) {
                (Some(sid), _) => match st.services.get(&(d.node.clone(), sid.to_owned())) {
                    Some(svc) => {
                        if !authz.allows(crate::acl::Resource::Service, &svc.service, Level::Write)
                        {
                            return Err(Error::denied(format!(
                                "token lacks service:write on {:?}",
                                svc.service
                            )));
                        }
                        ops.push(Op::DeleteService {
                            node: d.node.clone(),
                            id: sid.to_owned(),
                        });
                    }
                    None => node_write()?,
                },
                (None, Some(cid)) => match st.checks.get(&(d.node.clone(), cid.to_owned())) {
                    Some(check) => {
                        self.check_write_allowed(st, check, authz)?;
                        ops.push(Op::DeleteCheck {
                            node: d.node.clone(),
                            id: cid.to_owned(),
                        });
                    }
                    None => node_write()?,
                },
                (None, None) => {
                    node_write()?;
                    ops.push(Op::DeleteNode(d.node.clone()));
                }
            }
            Ok((ops, ()))
        })
        .await
    }

    // ---- KV -----------------------------------------------------------------------

    /// `PUT /v1/kv/:key`; returns whether the write happened (false on a CAS mismatch).
    pub async fn kv_put(
        &self,
        key: String,
        value: Vec<u8>,
        flags: Option<u64>,
        cas: Option<u64>,
        lock: Option<crate::sessions::Lock>,
        authz: &Authz,
    ) -> Result<bool, Error> {
        use crate::sessions::Lock;
        tessera_core::validate_key(&key)?;
        if value.len() > self.config.kv_max_value_bytes {
            return Err(Error::TooLarge(format!(
                "Value exceeds {} byte limit ({} bytes); raise kv_max_value_bytes to store larger values",
                self.config.kv_max_value_bytes,
                value.len()
            )));
        }
        if !authz.allows(crate::acl::Resource::Key, &key, Level::Write) {
            return Err(Error::denied(format!("token lacks key:write on {key:?}")));
        }
        let delayed = matches!(lock, Some(Lock::Acquire(_))) && self.sessions.delayed(&key);
        self.commit(|st, index| {
            let old = st.kv.get(&key);
            if let Some(cas) = cas {
                let current = old.map(|e| e.modify_index).unwrap_or(0);
                if cas != current {
                    return Ok((vec![], false));
                }
            }
            let holder = old.and_then(|e| e.session.clone());
            let lock_index = old.map(|e| e.lock_index).unwrap_or(0);
            // Who holds the key after this write, and its lock index.
            let (session, lock_index) = match &lock {
                None => (holder, lock_index),
                Some(Lock::Acquire(id)) => {
                    if !st.sessions.contains_key(id) {
                        return Err(Error::bad(format!("invalid session {id:?}")));
                    }
                    match holder {
                        // Held already: the value changes, the lock index does not.
                        Some(h) if h == *id => (Some(h), lock_index),
                        Some(_) => return Ok((vec![], false)),
                        None if delayed => return Ok((vec![], false)),
                        None => (Some(id.clone()), lock_index + 1),
                    }
                }
                Some(Lock::Release(id)) => match holder {
                    Some(h) if h == *id => (None, lock_index),
                    _ => return Ok((vec![], false)),
                },
            };
            Ok((
                vec![Op::PutKv(KvEntry {
                    key: key.clone(),
                    flags: flags.or(old.map(|e| e.flags)).unwrap_or(0),
                    value: value.clone(),
                    lock_index,
                    create_index: old.map(|e| e.create_index).unwrap_or(index),
                    modify_index: index,
                    session,
                })],
                true,
            ))
        })
        .await
    }

    /// `DELETE /v1/kv/:key`; with `recurse`, everything under the prefix.
    pub async fn kv_delete(
        &self,
        key: String,
        recurse: bool,
        cas: Option<u64>,
        authz: &Authz,
    ) -> Result<bool, Error> {
        if recurse {
            if !authz.allows_key_tree_write(&key) {
                return Err(Error::denied(format!(
                    "token lacks key:write on every key under {key:?}"
                )));
            }
        } else {
            tessera_core::validate_key(&key)?;
            if !authz.allows(crate::acl::Resource::Key, &key, Level::Write) {
                return Err(Error::denied(format!("token lacks key:write on {key:?}")));
            }
        }
        self.commit(|st, _| {
            if recurse {
                let any = st
                    .kv
                    .range(key.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&key));
                let ops = if any {
                    vec![Op::DeleteKvTree(key.clone())]
                } else {
                    vec![]
                };
                return Ok((ops, true));
            }
            let old = st.kv.get(&key);
            if let Some(cas) = cas
                && old.map(|e| e.modify_index).unwrap_or(0) != cas
            {
                return Ok((vec![], false));
            }
            let ops = if old.is_some() {
                vec![Op::DeleteKv(key.clone())]
            } else {
                vec![]
            };
            Ok((ops, true))
        })
        .await
    }

    // ---- ACL ----------------------------------------------------------------------

    /// Resolves the token secret of a request into what it may do.
    pub fn authorize(&self, secret: Option<&str>) -> Result<Authz, Error> {
        if !self.acl_enabled {
            return Ok(Authz::Management);
        }
        let st = self.read_lock();
        st.acl
            .authorizer(
                secret.filter(|s| !s.is_empty()),
                self.config.acl.default_policy,
            )
            .map_err(|_| Error::AclNotFound)
    }

    pub(crate) fn new_token(
        index: u64,
        secret: Option<String>,
        description: &str,
        management: bool,
    ) -> Token {
        Token {
            accessor_id: uuid(),
            secret_id: secret.unwrap_or_else(uuid),
            description: description.into(),
            policies: if management {
                vec![PolicyLink {
                    id: MANAGEMENT_POLICY_ID.into(),
                    name: "global-management".into(),
                }]
            } else {
                vec![]
            },
            local: false,
            management,
            create_index: index,
            modify_index: index,
        }
    }

    /// Creates the configured initial management token if it does not exist yet.
    pub async fn ensure_initial_management(&self) -> Result<(), Error> {
        let Some(secret) = self.config.acl.initial_management.clone() else {
            return Ok(());
        };
        self.commit(|st, index| {
            if st.acl.token_by_secret(&secret).is_some() {
                return Ok((vec![], ()));
            }
            let token = Self::new_token(
                index,
                Some(secret.clone()),
                "Initial Management Token",
                true,
            );
            Ok((
                vec![
                    Op::Acl(AclOp::Bootstrapped),
                    Op::Acl(AclOp::PutToken(token)),
                ],
                (),
            ))
        })
        .await
    }

    /// `PUT /v1/acl/bootstrap`: once only.
    pub async fn acl_bootstrap(&self) -> Result<Token, Error> {
        if !self.acl_enabled {
            return Err(Error::bad("ACL support disabled"));
        }
        self.commit(|st, index| {
            if st.acl.bootstrapped {
                return Err(Error::denied(format!(
                    "ACL bootstrap no longer allowed (reset index: {})",
                    st.index
                )));
            }
            let token = Self::new_token(index, None, "Bootstrap Token (Global Management)", true);
            Ok((
                vec![
                    Op::Acl(AclOp::Bootstrapped),
                    Op::Acl(AclOp::PutToken(token.clone())),
                ],
                token,
            ))
        })
        .await
    }

    fn require_acl(&self, authz: &Authz, need: Level) -> Result<(), Error> {
        if !self.acl_enabled {
            return Err(Error::bad("ACL support disabled"));
        }
        let got = authz.acl_level();
        if got == Level::Deny || got < need {
            return Err(Error::denied(
                format!("token lacks acl:{need:?}").to_lowercase(),
            ));
        }
        Ok(())
    }

    pub async fn acl_put_policy(
        &self,
        id: Option<String>,
        name: String,
        description: String,
        rules: String,
        authz: &Authz,
    ) -> Result<Policy, Error> {
        self.require_acl(authz, Level::Write)?;
        tessera_core::validate_service_name("policy name (Name)", &name)?;
        crate::acl::Rules::parse(&rules).map_err(|e| Error::bad(format!("Rules: {e}")))?;
        self.commit(|st, index| {
            let existing = match &id {
                Some(id) => Some(
                    st.acl
                        .policies
                        .get(id)
                        .ok_or_else(|| Error::NotFound(format!("Unknown policy ID {id:?}")))?,
                ),
                None => None,
            };
            if let Some(other) = st.acl.policy_by_name(&name)
                && Some(&other.id) != id.as_ref()
            {
                return Err(Error::bad(format!(
                    "Invalid Policy: A Policy with Name {name:?} already exists"
                )));
            }
            let policy = Policy {
                id: existing.map(|p| p.id.clone()).unwrap_or_else(uuid),
                name: name.clone(),
                description: description.clone(),
                rules: rules.clone(),
                create_index: existing.map(|p| p.create_index).unwrap_or(index),
                modify_index: index,
            };
            Ok((vec![Op::Acl(AclOp::PutPolicy(policy.clone()))], policy))
        })
        .await
    }

    pub async fn acl_delete_policy(&self, id: &str, authz: &Authz) -> Result<(), Error> {
        self.require_acl(authz, Level::Write)?;
        self.commit(|st, _| {
            let ops = if st.acl.policies.contains_key(id) {
                vec![Op::Acl(AclOp::DeletePolicy(id.to_owned()))]
            } else {
                vec![]
            };
            Ok((ops, ()))
        })
        .await
    }

    pub async fn acl_put_token(
        &self,
        accessor: Option<String>,
        secret: Option<String>,
        description: String,
        policies: Vec<PolicyLink>,
        authz: &Authz,
    ) -> Result<Token, Error> {
        self.require_acl(authz, Level::Write)?;
        self.commit(|st, index| {
            let mut links = Vec::new();
            for p in &policies {
                let found = if !p.id.is_empty() {
                    if p.id == MANAGEMENT_POLICY_ID {
                        links.push(PolicyLink {
                            id: p.id.clone(),
                            name: "global-management".into(),
                        });
                        continue;
                    }
                    st.acl.policies.get(&p.id)
                } else {
                    st.acl.policy_by_name(&p.name)
                };
                let found = found.ok_or_else(|| {
                    Error::bad(format!(
                        "Invalid Policy: no policy with ID {:?} or Name {:?}",
                        p.id, p.name
                    ))
                })?;
                links.push(PolicyLink {
                    id: found.id.clone(),
                    name: found.name.clone(),
                });
            }
            let existing = match &accessor {
                Some(a) => st.acl.tokens.get(a),
                None => None,
            };
            if let Some(s) = &secret
                && st
                    .acl
                    .token_by_secret(s)
                    .is_some_and(|t| Some(&t.accessor_id) != accessor.as_ref())
            {
                return Err(Error::bad("Invalid Token: SecretID is already in use"));
            }
            let mut token = Self::new_token(index, secret.clone(), &description, false);
            if let Some(a) = &accessor {
                token.accessor_id = a.clone();
            }
            if let Some(e) = existing {
                token.secret_id = secret.clone().unwrap_or_else(|| e.secret_id.clone());
                token.create_index = e.create_index;
                token.management = e.management && links.is_empty();
            }
            token.policies = links;
            Ok((vec![Op::Acl(AclOp::PutToken(token.clone()))], token))
        })
        .await
    }

    pub async fn acl_delete_token(&self, accessor: &str, authz: &Authz) -> Result<(), Error> {
        self.require_acl(authz, Level::Write)?;
        self.commit(|st, _| {
            let ops = if st.acl.tokens.contains_key(accessor) {
                vec![Op::Acl(AclOp::DeleteToken(accessor.to_owned()))]
            } else {
                vec![]
            };
            Ok((ops, ()))
        })
        .await
    }

    pub fn acl_read_check(&self, authz: &Authz) -> Result<(), Error> {
        self.require_acl(authz, Level::Read)
    }

    /// Stops background tasks and wakes every blocking query.
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
