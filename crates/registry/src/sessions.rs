//! Sessions and KV locks, as Consul has them: the coordination primitive behind
//! `consul lock`, leader election and python-consul's lock recipes.
//!
//! A session is created bound to a node (by default the server's), to checks on it, and
//! optionally to a TTL. `?acquire=<session>` takes a key's lock if no session holds it
//! (the key's `LockIndex` counts acquisitions); `?release=` gives it back. A session ends
//! when it is destroyed, when its TTL runs out without a renewal, or when one of its checks
//! goes critical. Its keys are then released (`Behavior: release`, the default) or
//! deleted (`delete`), in the same write that ends it, and a released key cannot be
//! acquired again for the session's `LockDelay` (15 s by default), so a holder that was
//! merely slow notices before someone else acts as the new holder.
//!
//! Like Consul, the server may wait up to twice the TTL before ending a session that was
//! not renewed. TTL clocks and lock delays are runtime state: after a restart every
//! session's TTL starts over, as on a Consul leader change.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::Deserialize;
use tessera_core::{Health, serde_opt};
use tokio::time::Instant;

use crate::acl::{Authz, Level, Resource};
use crate::error::Error;
use crate::etcd_store::Authority;
use crate::model::{Behavior, KvEntry, SessionRecord};
use crate::registry::{Registry, SERF_CHECK, uuid};
use crate::state::{Op, State};

/// A lock operation on a KV write.
#[derive(Debug, Clone)]
pub enum Lock {
    Acquire(String),
    Release(String),
}

const MIN_TTL: Duration = Duration::from_secs(10);
const MAX_TTL: Duration = Duration::from_secs(86_400);
const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// How often sessions are checked for a TTL run out or a critical check.
const SWEEP: Duration = Duration::from_millis(500);

/// The runtime side of sessions.
#[derive(Default)]
pub(crate) struct Timers {
    /// Session id → when it ends unless renewed first.
    deadlines: Mutex<HashMap<String, Instant>>,
    /// Key → until when nobody may acquire it.
    lock_delays: Mutex<HashMap<String, Instant>>,
}

impl Timers {
    fn deadlines(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.deadlines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_delays(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.lock_delays.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key` is in a lock delay now.
    pub(crate) fn delayed(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut d = self.lock_delays();
        d.retain(|_, until| *until > now);
        d.contains_key(key)
    }
}

/// `PUT /v1/session/create`'s body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SessionCreate {
    pub name: String,
    pub node: Option<String>,
    #[serde(with = "serde_opt")]
    pub lock_delay: Option<Duration>,
    pub behavior: Option<Behavior>,
    #[serde(rename = "TTL", with = "serde_opt")]
    pub ttl: Option<Duration>,
    /// Node checks, under their pre-1.7 name.
    pub checks: Option<Vec<String>>,
    pub node_checks: Option<Vec<String>>,
    pub service_checks: Option<Vec<ServiceCheckRef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceCheckRef {
    #[serde(rename = "ID")]
    pub id: String,
}

impl Registry {
    /// Creates a session; returns its id.
    pub async fn session_create(&self, req: SessionCreate, authz: &Authz) -> Result<String, Error> {
        let node = req.node.unwrap_or_else(|| self.config.node_name.clone());
        if !authz.allows(Resource::Session, &node, Level::Write) {
            return Err(Error::denied(format!(
                "token lacks session:write on {node:?}"
            )));
        }
        if let Some(ttl) = req.ttl
            && !ttl.is_zero()
            && !(MIN_TTL..=MAX_TTL).contains(&ttl)
        {
            return Err(Error::bad(format!(
                "Invalid Session TTL '{}', must be between [10s=24h0m0s]",
                tessera_core::format_duration(ttl)
            )));
        }
        let lock_delay = req.lock_delay.unwrap_or(DEFAULT_LOCK_DELAY);
        if lock_delay > MAX_LOCK_DELAY {
            return Err(Error::bad("LockDelay must be at most 60s"));
        }
        // Consul's default: bound to the node's health, unless checks are named.
        let node_checks = match (req.node_checks, req.checks, &req.service_checks) {
            (Some(c), _, _) | (None, Some(c), _) => c,
            (None, None, Some(_)) => Vec::new(),
            (None, None, None) => vec![SERF_CHECK.to_owned()],
        };
        let service_checks: Vec<String> = req
            .service_checks
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let id = uuid();
        let ttl = req.ttl.filter(|t| !t.is_zero());
        let session = SessionRecord {
            id: id.clone(),
            name: req.name,
            node: node.clone(),
            lock_delay_ms: lock_delay.as_millis() as u64,
            behavior: req.behavior.unwrap_or_default(),
            ttl_ms: ttl.map(|t| t.as_millis() as u64),
            node_checks,
            service_checks,
            create_index: 0,
            modify_index: 0,
        };
        self.commit(|st, index| {
            if !st.nodes.contains_key(&node) {
                return Err(Error::NotFound(format!(
                    "Missing node registration {node:?}"
                )));
            }
            for check in session.node_checks.iter().chain(&session.service_checks) {
                match st.checks.get(&(node.clone(), check.clone())) {
                    None => {
                        return Err(Error::bad(format!("Missing check {check:?} registration")));
                    }
                    Some(c) if c.status == Health::Critical => {
                        return Err(Error::bad(format!("Check {check:?} is in critical state")));
                    }
                    Some(_) => {}
                }
            }
            let s = SessionRecord {
                create_index: index,
                modify_index: index,
                ..session.clone()
            };
            Ok((vec![Op::PutSession(s)], ()))
        })
        .await?;
        if let Some(ttl) = ttl {
            self.sessions
                .deadlines()
                .insert(id.clone(), Instant::now() + ttl * 2);
        }
        Ok(id)
    }

    /// Ends a session now: its keys are released or deleted. `Ok(false)` if there was no
    /// such session.
    pub async fn session_destroy(&self, id: &str, authz: &Authz) -> Result<bool, Error> {
        if let Some(node) = self.read(|st| st.sessions.get(id).map(|s| s.node.clone()))
            && !authz.allows(Resource::Session, &node, Level::Write)
        {
            return Err(Error::denied(format!(
                "token lacks session:write on {node:?}"
            )));
        }
        self.end_session(id, Authority::Client).await
    }

    /// Restarts a session's TTL; the session, or `None` when it is gone. On etcd the
    /// renewal is written (the session's key is put again), so every server, the leader
    /// that ends sessions among them, restarts the clock.
    pub async fn session_renew(
        &self,
        id: &str,
        authz: &Authz,
    ) -> Result<Option<SessionRecord>, Error> {
        let Some(s) = self.read(|st| st.sessions.get(id).cloned()) else {
            return Ok(None);
        };
        if !authz.allows(Resource::Session, &s.node, Level::Write) {
            return Err(Error::denied(format!(
                "token lacks session:write on {:?}",
                s.node
            )));
        }
        if self.etcd().is_some() {
            return self
                .commit(|st, _| match st.sessions.get(id) {
                    Some(s) => Ok((vec![Op::PutSession(s.clone())], Some(s.clone()))),
                    None => Ok((vec![], None)),
                })
                .await;
        }
        self.session_clock(&s);
        Ok(Some(s))
    }

    /// (Re)starts a session's TTL clock: on creation and renewal, and on etcd whenever
    /// its key is put (by any server).
    pub(crate) fn session_clock(&self, s: &SessionRecord) {
        if let Some(ttl) = s.ttl_ms {
            let ttl = Duration::from_millis(ttl);
            self.sessions
                .deadlines()
                .insert(s.id.clone(), Instant::now() + ttl * 2);
        }
    }

    pub(crate) fn session_ended(&self, id: &str) {
        self.sessions.deadlines().remove(id);
    }

    /// Ends session `id`, for a client (`destroy`) or as the leader (its TTL or a
    /// check ran out), which is fenced on etcd.
    async fn end_session(&self, id: &str, by: Authority) -> Result<bool, Error> {
        let mut released = Vec::new();
        let decide = |st: &State, index: u64| {
            let Some(session) = st.sessions.get(id) else {
                return Ok((vec![], None));
            };
            released.clear();
            let mut ops = vec![Op::DeleteSession(id.to_owned())];
            ops.extend(held_keys(st, id).map(|e| match session.behavior {
                Behavior::Delete => Op::DeleteKv(e.key.clone()),
                Behavior::Release => {
                    released.push(e.key.clone());
                    Op::PutKv(KvEntry {
                        session: None,
                        modify_index: index,
                        ..e.clone()
                    })
                }
            }));
            Ok((ops, Some(Duration::from_millis(session.lock_delay_ms))))
        };
        let ended = match by {
            Authority::Client => self.commit(decide).await?,
            Authority::Member => self.commit_as_member(decide).await?,
        };
        self.sessions.deadlines().remove(id);
        let Some(delay) = ended else {
            return Ok(false);
        };
        if !delay.is_zero() {
            let until = Instant::now() + delay;
            let mut d = self.sessions.lock_delays();
            for key in released {
                d.insert(key, until);
            }
        }
        Ok(true)
    }

    /// Sessions whose TTL ran out or whose checks went critical.
    fn sessions_to_end(&self) -> Vec<String> {
        let now = Instant::now();
        let mut out: Vec<String> = self
            .sessions
            .deadlines()
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| id.clone())
            .collect();
        self.read(|st| {
            for s in st.sessions.values() {
                let critical = s.node_checks.iter().chain(&s.service_checks).any(|c| {
                    st.checks
                        .get(&(s.node.clone(), c.clone()))
                        .is_none_or(|c| c.status == Health::Critical)
                });
                if critical || !st.nodes.contains_key(&s.node) {
                    out.push(s.id.clone());
                }
            }
        });
        out.sort();
        out.dedup();
        out
    }

    /// Sessions restored from the log get a full TTL from now.
    pub(crate) fn start_session_clocks(&self) {
        let now = Instant::now();
        let restored: Vec<(String, u64)> = self.read(|st| {
            st.sessions
                .values()
                .filter_map(|s| s.ttl_ms.map(|t| (s.id.clone(), t)))
                .collect()
        });
        let mut d = self.sessions.deadlines();
        for (id, ttl) in restored {
            d.entry(id).or_insert(now + Duration::from_millis(ttl) * 2);
        }
    }
}

fn held_keys<'a>(st: &'a State, id: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
    st.kv
        .values()
        .filter(move |e| e.session.as_deref() == Some(id))
}

/// Ends sessions whose TTL ran out or whose checks went critical, until shutdown.
pub(crate) async fn reaper(reg: Weak<Registry>, cancel: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(SWEEP) => {}
        }
        let Some(reg) = reg.upgrade() else { return };
        // With N servers, one ends sessions: the leader.
        if !reg.is_leader() {
            continue;
        }
        for id in reg.sessions_to_end() {
            match reg.end_session(&id, Authority::Member).await {
                Ok(_) => tracing::info!(session = %id, "session ended (TTL or check)"),
                Err(e) => tracing::warn!(session = %id, error = %e, "cannot end session"),
            }
        }
    }
}
