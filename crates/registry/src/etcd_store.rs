//! The registry on etcd, for N servers sharing one catalog: every object is one etcd key
//! under a prefix, each server keeps the whole state in memory, fed by one watch, and
//! answers reads and blocking queries from it (waiters cost etcd nothing).
//!
//! - Indexes are etcd revisions: an object's `ModifyIndex`/`CreateIndex` are its key's
//!   `mod_revision`/`create_revision`, and the events of one revision are applied as one
//!   record at that index, so they only move forward while the etcd cluster lives.
//! - A write is validated against the view, as on the embedded store, and sent as one
//!   etcd transaction that compares every key it writes with the revision the view had
//!   for it. If another server wrote one of them first, the view catches up and the write
//!   is validated again, so a `?cas` or a lock is exact across servers. It returns once
//!   this server's view shows it (read-your-writes).
//! - Every transaction also writes one marker key, whose revision is the latest registry
//!   write's: a linearizable read of it tells how far the view must catch up (`?consistent`,
//!   barriers). The marker sorts after every other key and the watch stops short of it,
//!   so it costs etcd no watch event: the other keys of its transaction carry the
//!   revision to the view.
//! - After a compaction cancels the watch, the server lists the prefix again and applies
//!   the difference at the listing's revision: spurious wake-ups, never missed changes.
//!
//! Key layout under the prefix: `n/<node>`, `s/<node>/<service id>`,
//! `c/<node>/<check id>`, `k/<key>`, `ss/<session>`, `ap/<policy>`, `at/<accessor>`,
//! `ab` (bootstrapped), `~rev` (the marker, unwatched), and `m/<server>` (a live server's HTTP
//! address, on its own lease: one lease per server, never per instance or check). Node
//! names and ids have `%` and `/` escaped.
//!
//! HTTP, TCP and gRPC checks run on one live server each: the rendezvous hash of the
//! check over the member keys picks it, so when a member key goes (a crash lets its
//! lease run out within `MEMBER_TTL`) only that server's checks move. Writes a server
//! makes because of a role it holds (a check's status, the leader's expiries and reaps)
//! are fenced: the transaction also compares this server's member key with the create
//! revision it got when it joined, so a server that lost its place (paused or cut off
//! past its lease) cannot write, whatever it still believes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tessera_etcd::{
    Client, Compare, CompareResult, DeleteRangeRequest, KeyValue, Op as EOp, PutRequest,
    RangeRequest, TxnRequest, WatchCreate, prefix_end,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use tessera_core::Health;

use crate::acl::{AclOp, Policy, Token};
use crate::error::Error;
use crate::model::{
    CheckRecord, CheckSpec, KvEntry, NodeRecord, Probe, ServiceRecord, SessionRecord,
};
use crate::registry::Registry;
use crate::state::{Op, Record, State};

/// The marker key (under the prefix): `~` sorts after every other key of the layout, so
/// the watch's range ends just before it.
const MARKER: &str = "~rev";

/// Attempts at a write whose keys other servers keep changing under it.
const MAX_ATTEMPTS: usize = 32;
/// How long a write waits for this server's view to show it.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);

pub struct EtcdStore {
    client: Arc<Client>,
    /// Groups the catalog writes that arrive while one is in flight (see `etcd_batch`).
    batch: Arc<crate::etcd_batch::Batcher>,
    prefix: Vec<u8>,
    /// The revision the view has applied.
    applied: watch::Sender<i64>,
    /// Status changes of the checks this server runs, written in order by one task.
    statuses: tokio::sync::mpsc::UnboundedSender<Status>,
    status_rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Status>>>,
    /// The live servers: name → (HTTP address, create revision of its member key).
    members: std::sync::Mutex<std::collections::BTreeMap<String, (String, i64)>>,
    /// When etcd last answered this server (a lease renewal or a watch event).
    last_contact: std::sync::Mutex<Option<std::time::Instant>>,
    /// When this server last saw a heartbeat (or a status write) of each TTL check, from
    /// any server: the leader expires TTL checks by it.
    heartbeats: std::sync::Mutex<std::collections::HashMap<(String, String), tokio::time::Instant>>,
    /// This server's member key and its create revision while it holds it (0: not a
    /// member): the fencing token of its role writes.
    member_key: std::sync::OnceLock<Vec<u8>>,
    fence: AtomicI64,
}

/// A server's membership lease: it is a member while it renews within this, and its
/// checks move to the others within this after it dies.
pub const MEMBER_TTL: Duration = Duration::from_secs(5);
/// How often the leader looks for expired TTL checks.
const EXPIRY_TICK: Duration = Duration::from_millis(500);

/// Why a write is made, which decides whether it is fenced.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Authority {
    /// A client asked for it: made by any server, as long as etcd takes it.
    Client,
    /// This server holds a role (a check's owner, the leader): only while it is still
    /// the member it was when it took the role.
    Member,
}

enum Status {
    /// A check's new status and output, and the fence of the membership under which
    /// the probe ran (`None`: a TTL heartbeat, which any server takes for a client).
    /// A heartbeat is written even when the status does not change (to its own key,
    /// outside the catalog, so it wakes no blocking query) so the leader sees it.
    Set((String, String), Health, String, Option<i64>),
    /// Answered once every status queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

fn esc(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

fn unesc(s: &str) -> String {
    s.replace("%2F", "/").replace("%25", "%")
}

impl EtcdStore {
    /// Connects and lists the prefix: the store, and the state as of the listing.
    pub async fn open(
        endpoints: &[String],
        tls: Option<&tessera_etcd::TlsFiles>,
        prefix: &str,
    ) -> Result<(Arc<EtcdStore>, State), Error> {
        let client = Arc::new(
            Client::with_tls(endpoints, tls).map_err(|e| Error::bad(format!("etcd: {e}")))?,
        );
        let (statuses, status_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut marker = prefix.as_bytes().to_vec();
        marker.extend_from_slice(MARKER.as_bytes());
        let store = EtcdStore {
            batch: crate::etcd_batch::Batcher::new(client.clone(), marker),
            client,
            prefix: prefix.as_bytes().to_vec(),
            applied: watch::channel(0).0,
            statuses,
            status_rx: std::sync::Mutex::new(Some(status_rx)),
            members: Default::default(),
            last_contact: std::sync::Mutex::new(Some(std::time::Instant::now())),
            heartbeats: Default::default(),
            member_key: std::sync::OnceLock::new(),
            fence: AtomicI64::new(0),
        };
        let (rev, ops) = store.list().await?;
        let mut st = State::default();
        for (index, op) in ops {
            st.apply(index, op);
        }
        st.index = st.index.max(rev as u64);
        store.applied.send_replace(rev);
        Ok((Arc::new(store), st))
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(rest.as_bytes());
        k
    }

    /// Every object under the prefix as put ops at its mod revision, oldest first, and
    /// the revision of the listing.
    async fn list(&self) -> Result<(i64, Vec<(u64, Op)>), Error> {
        let r = self
            .client
            .range(RangeRequest {
                key: self.prefix.clone(),
                range_end: prefix_end(&self.prefix),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut ops: Vec<(u64, Op)> = r
            .kvs
            .iter()
            .filter_map(|kv| self.op_of(kv, false).map(|op| (kv.mod_revision as u64, op)))
            .collect();
        {
            let mut members = self.members();
            members.clear();
            for kv in &r.kvs {
                self.note_member(&mut members, kv, false);
            }
        }
        self.contact();
        ops.sort_by_key(|(rev, _)| *rev);
        Ok((r.revision(), ops))
    }

    /// The registry op a key's put (or delete) stands for; `None` for the marker and for
    /// what cannot be read (logged: another writer's bug must not stop the view).
    fn op_of(&self, kv: &KeyValue, deleted: bool) -> Option<Op> {
        let rest = std::str::from_utf8(kv.key.strip_prefix(self.prefix.as_slice())?).ok()?;
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        let (c, m) = (kv.create_revision as u64, kv.mod_revision as u64);
        let two = || name.split_once('/').map(|(a, b)| (unesc(a), unesc(b)));
        macro_rules! decode {
            ($t:ty) => {
                match serde_json::from_slice::<$t>(&kv.value) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(key = rest, error = %e, "undecodable registry object in etcd");
                        return None;
                    }
                }
            };
        }
        Some(match (kind, deleted) {
            ("n", false) => Op::PutNode(NodeRecord {
                create_index: c,
                modify_index: m,
                ..decode!(NodeRecord)
            }),
            ("n", true) => Op::DeleteNode(unesc(name)),
            ("s", false) => Op::PutService(ServiceRecord {
                create_index: c,
                modify_index: m,
                ..decode!(ServiceRecord)
            }),
            ("s", true) => {
                let (node, id) = two()?;
                Op::DeleteService { node, id }
            }
            ("c", false) => Op::PutCheck(CheckRecord {
                create_index: c,
                modify_index: m,
                ..decode!(CheckRecord)
            }),
            ("c", true) => {
                let (node, id) = two()?;
                Op::DeleteCheck { node, id }
            }
            ("k", false) => Op::PutKv(KvEntry {
                create_index: c,
                modify_index: m,
                ..decode!(KvEntry)
            }),
            ("k", true) => Op::DeleteKv(name.to_owned()),
            ("ss", false) => Op::PutSession(SessionRecord {
                create_index: c,
                modify_index: m,
                ..decode!(SessionRecord)
            }),
            ("ss", true) => Op::DeleteSession(unesc(name)),
            ("ap", false) => Op::Acl(AclOp::PutPolicy(Policy {
                create_index: c,
                modify_index: m,
                ..decode!(Policy)
            })),
            ("ap", true) => Op::Acl(AclOp::DeletePolicy(unesc(name))),
            ("at", false) => Op::Acl(AclOp::PutToken(Token {
                create_index: c,
                modify_index: m,
                ..decode!(Token)
            })),
            ("at", true) => Op::Acl(AclOp::DeleteToken(unesc(name))),
            ("ab", false) => Op::Acl(AclOp::Bootstrapped),
            _ => return None,
        })
    }

    /// The etcd operations and compares for `ops`, validated against `st`.
    fn txn_of(&self, st: &State, ops: &[Op]) -> Result<TxnRequest, Error> {
        let mut t = TxnRequest::default();
        let put = |t: &mut TxnRequest, key: Vec<u8>, seen: u64, value: Vec<u8>| {
            t.compare.push(Compare::mod_revision(
                key.clone(),
                CompareResult::Equal,
                seen as i64,
            ));
            t.success.push(EOp::Put(PutRequest {
                key,
                value,
                ..Default::default()
            }));
        };
        let del = |t: &mut TxnRequest, key: Vec<u8>, seen: u64| {
            t.compare.push(Compare::mod_revision(
                key.clone(),
                CompareResult::Equal,
                seen as i64,
            ));
            t.success.push(EOp::Delete(DeleteRangeRequest {
                key,
                ..Default::default()
            }));
        };
        // No key in the range changed since the view's revision.
        let del_range = |t: &mut TxnRequest, key: Vec<u8>| {
            let end = prefix_end(&key);
            t.compare.push(
                Compare::mod_revision(key.clone(), CompareResult::Less, st.index as i64 + 1)
                    .over(end.clone()),
            );
            t.success.push(EOp::Delete(DeleteRangeRequest {
                key,
                range_end: end,
                prev_kv: false,
            }));
        };
        for op in ops {
            match op {
                Op::PutNode(n) => {
                    let seen = st.nodes.get(&n.node).map_or(0, |x| x.modify_index);
                    put(
                        &mut t,
                        self.key(&format!("n/{}", esc(&n.node))),
                        seen,
                        json(n)?,
                    );
                }
                Op::DeleteNode(name) => {
                    let seen = st.nodes.get(name).map_or(0, |x| x.modify_index);
                    del(&mut t, self.key(&format!("n/{}", esc(name))), seen);
                    del_range(&mut t, self.key(&format!("s/{}/", esc(name))));
                    del_range(&mut t, self.key(&format!("c/{}/", esc(name))));
                }
                Op::PutService(s) => {
                    let seen = st
                        .services
                        .get(&(s.node.clone(), s.id.clone()))
                        .map_or(0, |x| x.modify_index);
                    put(
                        &mut t,
                        self.key(&format!("s/{}/{}", esc(&s.node), esc(&s.id))),
                        seen,
                        json(s)?,
                    );
                }
                Op::DeleteService { node, id } => {
                    let seen = st
                        .services
                        .get(&(node.clone(), id.clone()))
                        .map_or(0, |x| x.modify_index);
                    del(
                        &mut t,
                        self.key(&format!("s/{}/{}", esc(node), esc(id))),
                        seen,
                    );
                    // Its checks go with it, as `State::apply` removes them.
                    if let Some(checks) = st.checks_by_owner.get(&(node.clone(), id.clone())) {
                        for c in checks {
                            let seen = st
                                .checks
                                .get(&(node.clone(), c.clone()))
                                .map_or(0, |x| x.modify_index);
                            del(
                                &mut t,
                                self.key(&format!("c/{}/{}", esc(node), esc(c))),
                                seen,
                            );
                        }
                    }
                }
                Op::PutCheck(c) => {
                    let seen = st
                        .checks
                        .get(&(c.node.clone(), c.check_id.clone()))
                        .map_or(0, |x| x.modify_index);
                    put(
                        &mut t,
                        self.key(&format!("c/{}/{}", esc(&c.node), esc(&c.check_id))),
                        seen,
                        json(c)?,
                    );
                }
                Op::DeleteCheck { node, id } => {
                    let seen = st
                        .checks
                        .get(&(node.clone(), id.clone()))
                        .map_or(0, |x| x.modify_index);
                    del(
                        &mut t,
                        self.key(&format!("c/{}/{}", esc(node), esc(id))),
                        seen,
                    );
                }
                Op::PutKv(e) => {
                    let seen = st.kv.get(&e.key).map_or(0, |x| x.modify_index);
                    put(&mut t, self.key(&format!("k/{}", e.key)), seen, json(e)?);
                }
                Op::DeleteKv(key) => {
                    let seen = st.kv.get(key).map_or(0, |x| x.modify_index);
                    del(&mut t, self.key(&format!("k/{key}")), seen);
                }
                Op::DeleteKvTree(p) => del_range(&mut t, self.key(&format!("k/{p}"))),
                Op::PutSession(s) => {
                    let seen = st.sessions.get(&s.id).map_or(0, |x| x.modify_index);
                    put(
                        &mut t,
                        self.key(&format!("ss/{}", esc(&s.id))),
                        seen,
                        json(s)?,
                    );
                }
                Op::DeleteSession(id) => {
                    let seen = st.sessions.get(id).map_or(0, |x| x.modify_index);
                    del(&mut t, self.key(&format!("ss/{}", esc(id))), seen);
                }
                Op::Acl(AclOp::Bootstrapped) => {
                    put(&mut t, self.key("ab"), 0, b"true".to_vec());
                }
                Op::Acl(AclOp::PutPolicy(p)) => {
                    let seen = st.acl.policies.get(&p.id).map_or(0, |x| x.modify_index);
                    put(
                        &mut t,
                        self.key(&format!("ap/{}", esc(&p.id))),
                        seen,
                        json(p)?,
                    );
                }
                Op::Acl(AclOp::DeletePolicy(id)) => {
                    let seen = st.acl.policies.get(id).map_or(0, |x| x.modify_index);
                    del(&mut t, self.key(&format!("ap/{}", esc(id))), seen);
                }
                Op::Acl(AclOp::PutToken(tk)) => {
                    let seen = st
                        .acl
                        .tokens
                        .get(&tk.accessor_id)
                        .map_or(0, |x| x.modify_index);
                    put(
                        &mut t,
                        self.key(&format!("at/{}", esc(&tk.accessor_id))),
                        seen,
                        json(tk)?,
                    );
                }
                Op::Acl(AclOp::DeleteToken(id)) => {
                    let seen = st.acl.tokens.get(id).map_or(0, |x| x.modify_index);
                    del(&mut t, self.key(&format!("at/{}", esc(id))), seen);
                }
            }
        }
        // The marker: every registry write is an event at its revision.
        t.success.push(EOp::Put(PutRequest {
            key: self.key(MARKER),
            value: Vec::new(),
            ..Default::default()
        }));
        t.failure.push(EOp::Range(RangeRequest {
            key: self.key(MARKER),
            ..Default::default()
        }));
        Ok(t)
    }

    /// Validates with `f` against the view and writes the result in one transaction,
    /// again after catching up when another server wrote a key first.
    pub(crate) async fn commit<R>(
        &self,
        reg: &Registry,
        authority: Authority,
        f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        let fence = match authority {
            Authority::Client => None,
            Authority::Member => Some(self.fence()?),
        };
        self.commit_fenced(reg, fence, f).await
    }

    /// This server's membership token, while it is a member.
    fn fence(&self) -> Result<i64, Error> {
        match self.fence.load(Ordering::Acquire) {
            0 => Err(lost_place()),
            f => Ok(f),
        }
    }

    /// `commit`, with the transaction also comparing this server's member key with
    /// `fence` when given.
    async fn commit_fenced<R>(
        &self,
        reg: &Registry,
        fence: Option<i64>,
        mut f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        // Whether the view was brought up to date before validating: a write that
        // changes nothing or is refused (a `?cas` that does not match, a missing node)
        // may only look so because this server has not seen a write made elsewhere yet,
        // so that answer is given only from an up-to-date view.
        let mut synced = false;
        for _ in 0..MAX_ATTEMPTS {
            let decided = {
                let st = reg.read_lock();
                f(&st, st.index + 1).and_then(|(ops, out)| {
                    if ops.is_empty() {
                        Ok((None, out))
                    } else {
                        Ok((Some(self.txn_of(&st, &ops)?), out))
                    }
                })
            };
            let (mut txn, out) = match decided {
                Ok((Some(txn), out)) => (txn, out),
                Ok((None, _)) | Err(_) if !synced => {
                    self.barrier().await?;
                    synced = true;
                    continue;
                }
                Ok((None, out)) => return Ok(out),
                Err(e) => return Err(e),
            };
            if let (Some(fence), Some(key)) = (fence, self.member_key.get()) {
                txn.compare.push(Compare::create_revision(
                    key.clone(),
                    CompareResult::Equal,
                    fence,
                ));
                txn.failure.push(EOp::Range(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                }));
            }
            let resp = self.batch.txn(txn).await.map_err(unavailable)?;
            if resp.succeeded {
                self.wait_applied(resp.revision()).await?;
                return Ok(out);
            }
            if let Some(fence) = fence {
                let held = resp.responses.get(1).is_some_and(|r| match r {
                    tessera_etcd::OpResponse::Range(r) => {
                        r.kvs.first().is_some_and(|kv| kv.create_revision == fence)
                    }
                    _ => false,
                });
                if !held {
                    return Err(lost_place());
                }
            }
            // Someone else's write: catch up to the latest registry write, then retry.
            let latest = resp
                .responses
                .iter()
                .find_map(|r| match r {
                    tessera_etcd::OpResponse::Range(r) => r.kvs.first().map(|kv| kv.mod_revision),
                    _ => None,
                })
                .unwrap_or(resp.revision());
            self.wait_applied(latest).await?;
        }
        Err(Error::Unavailable(
            "the registry's keys kept changing under this write; try again".into(),
        ))
    }

    fn members(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, (String, i64)>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_member(
        &self,
        members: &mut std::collections::BTreeMap<String, (String, i64)>,
        kv: &KeyValue,
        deleted: bool,
    ) -> bool {
        let Some(rest) = kv.key.strip_prefix(self.prefix.as_slice()) else {
            return false;
        };
        let Some(name) = rest.strip_prefix(b"m/") else {
            return false;
        };
        let name = unesc(&String::from_utf8_lossy(name));
        if deleted {
            members.remove(&name).is_some()
        } else {
            let addr = String::from_utf8_lossy(&kv.value).into_owned();
            members
                .insert(name, (addr, kv.create_revision))
                .is_none_or(|(_, rev)| rev != kv.create_revision)
        }
    }

    fn contact(&self) {
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
    }

    /// Time since etcd last answered, and whether that is recent enough for this server
    /// to count as connected (within one membership TTL).
    pub(crate) fn last_contact(&self) -> (Duration, bool) {
        let since = self
            .last_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Duration::MAX, |t| t.elapsed());
        (since, since < MEMBER_TTL)
    }

    /// The servers' HTTP addresses, oldest member first.
    pub(crate) fn peers(&self) -> Vec<String> {
        let mut m: Vec<(i64, String)> = self
            .members()
            .values()
            .map(|(a, rev)| (*rev, a.clone()))
            .collect();
        m.sort();
        m.into_iter().map(|(_, a)| a).collect()
    }

    /// The leader's node name.
    pub(crate) fn leader_name(&self) -> Option<String> {
        self.members()
            .iter()
            .min_by_key(|(_, (_, rev))| *rev)
            .map(|(name, _)| name.clone())
    }

    /// Waits until the view has every registry write made before this call: a
    /// linearizable read of the marker key, then the view catching up to it.
    pub(crate) async fn barrier(&self) -> Result<(), Error> {
        let latest = self
            .client
            .get(&self.key(MARKER))
            .await
            .map_err(unavailable)?
            .map_or(0, |kv| kv.mod_revision);
        self.contact();
        self.wait_applied(latest).await
    }

    /// Holds this server's member key on its own lease until `cancel`, then revokes it.
    /// A lost lease (a pause or partition longer than its TTL) is replaced by a new one,
    /// with a new key: the fence of role writes is the key's create revision, so it must
    /// be this incarnation's own (a key left by an earlier process of the same name is
    /// deleted first).
    pub(crate) async fn join(
        self: Arc<Self>,
        name: String,
        addr: String,
        cancel: CancellationToken,
    ) {
        let key = self
            .member_key
            .get_or_init(|| self.key(&format!("m/{}", esc(&name))));
        let mut lease = 0;
        loop {
            if lease == 0 {
                match self.client.lease_grant(MEMBER_TTL.as_secs() as i64).await {
                    Ok((id, _)) => match self.create_member(key, &addr, id).await {
                        Ok(rev) => {
                            lease = id;
                            self.fence.store(rev, Ordering::Release);
                            self.contact();
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot register this server in etcd"),
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot get an etcd lease"),
                }
            } else {
                match self.client.lease_keepalive(lease).await {
                    Ok(Some(_)) if self.key_gone(&name) => {
                        tracing::warn!(
                            "this server's member key was deleted under its live lease; joining again"
                        );
                        self.fence.store(0, Ordering::Release);
                        let _ = self.client.lease_revoke(lease).await;
                        lease = 0;
                        continue;
                    }
                    Ok(Some(_)) => self.contact(),
                    Ok(None) => {
                        tracing::warn!("this server's etcd membership lapsed; joining again");
                        self.fence.store(0, Ordering::Release);
                        lease = 0;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot renew this server's etcd lease"),
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(MEMBER_TTL / 4) => {}
            }
        }
        self.fence.store(0, Ordering::Release);
        if lease != 0 {
            let _ = self.client.lease_revoke(lease).await;
        }
    }

    /// Whether the view, past the revision this server joined at, no longer has its
    /// member key (deleted by hand, or by a process misnamed as this server).
    fn key_gone(&self, name: &str) -> bool {
        let fence = self.fence.load(Ordering::Acquire);
        fence != 0 && *self.applied.borrow() >= fence && !self.members().contains_key(name)
    }

    /// Creates the member key on `lease`: its create revision.
    async fn create_member(&self, key: &[u8], addr: &str, lease: i64) -> Result<i64, Error> {
        for _ in 0..2 {
            let txn = TxnRequest {
                compare: vec![Compare::create_revision(
                    key.to_vec(),
                    CompareResult::Equal,
                    0,
                )],
                success: vec![EOp::Put(PutRequest {
                    key: key.to_vec(),
                    value: addr.as_bytes().to_vec(),
                    lease,
                    ..Default::default()
                })],
                failure: vec![EOp::Delete(DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                })],
            };
            let resp = self.client.txn(&txn).await.map_err(unavailable)?;
            if resp.succeeded {
                return Ok(resp.revision());
            }
            tracing::warn!(
                "this server's member key was held (by an earlier process of the same name, or another server misnamed as this one); taking it"
            );
        }
        Err(Error::Unavailable(
            "another process keeps taking this server's member key: are two servers running with the same node name?".into(),
        ))
    }

    /// The live server that runs check `id` of `node`: the highest rendezvous score
    /// over the members, so a member joining or leaving moves only its share.
    pub(crate) fn owner(&self, node: &str, id: &str) -> Option<String> {
        owner_of(self.members().keys(), node, id).cloned()
    }

    /// A check this server runs changed status: written by `write_statuses`, in order,
    /// fenced on the membership the probe ran under (none: the result is dropped).
    pub(crate) fn queue_status(&self, key: (String, String), status: Health, output: String) {
        match self.fence() {
            Ok(fence) => {
                let _ = self
                    .statuses
                    .send(Status::Set(key, status, output, Some(fence)));
            }
            Err(_) => tracing::debug!(check = %key.1, "not a member: probe result dropped"),
        }
    }

    /// A TTL heartbeat for a check on any node: its status if it changed, else a mark
    /// the leader's expiry sees.
    pub(crate) fn queue_heartbeat(&self, key: (String, String), status: Health, output: String) {
        let _ = self.statuses.send(Status::Set(key, status, output, None));
    }

    /// Returns once every status change queued so far is written (or failed to be).
    pub(crate) async fn statuses_written(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.statuses.send(Status::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Writes status changes to etcd, in the order they happened. Only a change of
    /// status is written (with its output): an output that changes on every probe would
    /// otherwise be a write per probe for every server's watch.
    pub(crate) async fn write_statuses(
        self: Arc<Self>,
        reg: Weak<Registry>,
        cancel: CancellationToken,
    ) {
        let Some(mut rx) = self
            .status_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                s = rx.recv() => match s { Some(s) => s, None => return },
            };
            let ((node, id), status, output, fence) = match next {
                Status::Set(key, status, output, fence) => (key, status, output, fence),
                Status::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            let Some(reg) = reg.upgrade() else { return };
            let written = self
                .commit_fenced(&reg, fence, |st, _| {
                    let Some(check) = st.checks.get(&(node.clone(), id.clone())) else {
                        return Ok((vec![], false));
                    };
                    if check.status == status {
                        return Ok((vec![], false));
                    }
                    let mut c = check.clone();
                    c.status = status;
                    c.output.clone_from(&output);
                    Ok((vec![Op::PutCheck(c)], true))
                })
                .await;
            let written = match written {
                Ok(false) if fence.is_none() => {
                    // With the marker, so the leader's barrier before an expiry covers it.
                    let txn = TxnRequest {
                        success: [format!("hb/{}/{}", esc(&node), esc(&id)), MARKER.into()]
                            .map(|k| {
                                EOp::Put(PutRequest {
                                    key: self.key(&k),
                                    ..Default::default()
                                })
                            })
                            .into(),
                        ..Default::default()
                    };
                    self.client.txn(&txn).await.map(drop).map_err(unavailable)
                }
                other => other.map(drop),
            };
            if let Err(e) = written {
                tracing::warn!(check = %id, error = %e, "cannot write a check status to etcd");
            }
        }
    }

    /// On the leader: TTL checks of every node whose last heartbeat (seen from any
    /// server) is older than their TTL go critical. Expiry trusts only what it has
    /// seen, so it guards against not having seen:
    /// - a server that becomes leader, or that was itself stalled (a pause, an
    ///   overloaded host), gives every check a full TTL from then;
    /// - before expiring, the view is brought up to etcd's latest write (heartbeats
    ///   write the marker too), so a lagging watch cannot expire a live check;
    /// - the expiry is fenced: a leader that lost its place writes nothing.
    pub(crate) async fn expire_ttls(
        self: Arc<Self>,
        reg: Weak<Registry>,
        cancel: CancellationToken,
    ) {
        let mut leading = false;
        let mut last_tick = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(EXPIRY_TICK) => {}
            }
            let Some(reg) = reg.upgrade() else { return };
            let now = tokio::time::Instant::now();
            let stalled =
                now.saturating_duration_since(last_tick) > EXPIRY_TICK + crate::checks::STALL_SLACK;
            last_tick = now;
            let leader = reg.is_leader();
            if leader && (!leading || stalled) {
                if stalled {
                    tracing::warn!(
                        "this server was stalled; every TTL check gets a full TTL from now"
                    );
                }
                let mut hb = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
                for t in hb.values_mut() {
                    *t = now;
                }
            }
            leading = leader;
            if !leader {
                continue;
            }
            if self.ttl_expired(&reg, now).is_empty() {
                continue;
            }
            if let Err(e) = self.barrier().await {
                tracing::warn!(error = %e, "cannot catch up with etcd; no TTL check expires now");
                continue;
            }
            for ((node, id), ttl) in self.ttl_expired(&reg, now) {
                let output = format!(
                    "TTL expired (no heartbeat for {})",
                    tessera_core::format_duration(ttl)
                );
                let r = self
                    .commit(&reg, Authority::Member, |st, _| {
                        match st.checks.get(&(node.clone(), id.clone())) {
                            Some(c) if c.status != Health::Critical => {
                                let mut c = c.clone();
                                c.status = Health::Critical;
                                c.output.clone_from(&output);
                                Ok((vec![Op::PutCheck(c)], ()))
                            }
                            _ => Ok((vec![], ())),
                        }
                    })
                    .await;
                match r {
                    Ok(()) => tracing::info!(node = %node, check = %id, "TTL check expired"),
                    Err(e) => tracing::warn!(check = %id, error = %e, "cannot expire a TTL check"),
                }
            }
        }
    }

    /// TTL checks not critical whose last seen heartbeat is a TTL older than `now`.
    fn ttl_expired(
        &self,
        reg: &Registry,
        now: tokio::time::Instant,
    ) -> Vec<((String, String), Duration)> {
        let mut hb = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        reg.read(|st| {
            st.checks
                .values()
                .filter(|c| c.status != Health::Critical)
                .filter_map(|c| match c.spec.as_ref().map(|s| &s.probe) {
                    Some(crate::model::Probe::Ttl { ttl }) => Some((c, *ttl)),
                    _ => None,
                })
                .filter_map(|(c, ttl)| {
                    let key = (c.node.clone(), c.check_id.clone());
                    let seen = *hb.entry(key.clone()).or_insert(now);
                    (now.saturating_duration_since(seen) >= ttl).then_some((key, ttl))
                })
                .collect()
        })
    }

    async fn wait_applied(&self, rev: i64) -> Result<(), Error> {
        let mut rx = self.applied.subscribe();
        match tokio::time::timeout(VISIBLE_WITHIN, rx.wait_for(|r| *r >= rev)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "the write was made (revision {rev}) but this server has not seen it yet; its etcd watch is behind"
            ))),
        }
    }

    /// Feeds the view from one watch until `cancel`: each revision's events as one
    /// record; after a compaction, a new listing applied as a difference.
    pub(crate) async fn follow(self: Arc<Self>, reg: Weak<Registry>, cancel: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        loop {
            let from = *self.applied.borrow() + 1;
            let create = WatchCreate {
                key: self.prefix.clone(),
                // Everything but the marker (see MARKER).
                range_end: self.key(MARKER),
                start_revision: from,
                ..Default::default()
            };
            let watch = tokio::select! {
                () = cancel.cancelled() => return,
                w = self.client.watch(create) => w,
            };
            let mut w = match watch {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch etcd; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            pause = Duration::from_millis(100);
            loop {
                let batch = tokio::select! {
                    () = cancel.cancelled() => return,
                    b = w.next() => b,
                };
                let Some(reg) = reg.upgrade() else { return };
                match batch {
                    Ok(b) => self.apply(&reg, b.events),
                    Err(e) if e.is_compacted() => {
                        tracing::warn!(error = %e, "etcd compacted past this server's watch; listing again");
                        if let Err(e) = self.relist(&reg).await {
                            tracing::warn!(error = %e, "cannot list etcd");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the etcd watch ended; watching again");
                        break;
                    }
                }
            }
        }
    }

    fn apply(&self, reg: &Registry, events: Vec<tessera_etcd::Event>) {
        self.contact();
        let joined_or_left = {
            let mut members = self.members();
            let mut changed = false;
            for e in &events {
                changed |= self.note_member(
                    &mut members,
                    &e.kv,
                    e.kind == tessera_etcd::EventType::Delete,
                );
            }
            changed
        };
        {
            let now = tokio::time::Instant::now();
            let mut hb = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
            for e in &events {
                let Some(rest) = e.kv.key.strip_prefix(self.prefix.as_slice()) else {
                    continue;
                };
                let rest = String::from_utf8_lossy(rest);
                let (kind, name) = rest.split_once('/').unwrap_or((&rest, ""));
                if (kind == "hb" || kind == "c")
                    && e.kind == tessera_etcd::EventType::Put
                    && let Some((node, id)) = name.split_once('/')
                {
                    hb.insert((unesc(node), unesc(id)), now);
                }
            }
        }
        let mut i = 0;
        while i < events.len() {
            let rev = events[i].kv.mod_revision;
            let mut ops = Vec::new();
            while i < events.len() && events[i].kv.mod_revision == rev {
                let e = &events[i];
                if let Some(op) = self.op_of(&e.kv, e.kind == tessera_etcd::EventType::Delete) {
                    ops.push(op);
                }
                i += 1;
            }
            reg.show_remote(Record {
                index: rev as u64,
                ops,
            });
            self.applied.send_if_modified(|r| {
                let moved = rev > *r;
                *r = (*r).max(rev);
                moved
            });
        }
        if joined_or_left {
            reg.place_checks();
        }
    }

    /// Lists the prefix again and applies what differs from the view, at the listing's
    /// revision, so every topic that changed wakes its waiters.
    async fn relist(&self, reg: &Registry) -> Result<(), Error> {
        let (rev, listed) = self.list().await?;
        let mut fresh = State::default();
        for (index, op) in listed {
            fresh.apply(index, op);
        }
        let ops = {
            let st = reg.read_lock();
            diff(&st, &fresh)
        };
        reg.show_remote(Record {
            index: rev as u64,
            ops,
        });
        // One lock: a borrow inside send_replace's argument would hold the read lock
        // while the send waits for the write lock, and freeze this thread.
        self.applied.send_modify(|a| *a = (*a).max(rev));
        reg.place_checks();
        Ok(())
    }
}

/// The ops that turn `old` into `new`.
fn diff(old: &State, new: &State) -> Vec<Op> {
    let mut ops = Vec::new();
    for k in old.nodes.keys().filter(|k| !new.nodes.contains_key(*k)) {
        ops.push(Op::DeleteNode(k.clone()));
    }
    for (k, s) in old
        .services
        .iter()
        .filter(|(k, _)| !new.services.contains_key(*k))
    {
        ops.push(Op::DeleteService {
            node: k.0.clone(),
            id: s.id.clone(),
        });
    }
    for k in old.checks.keys().filter(|k| !new.checks.contains_key(*k)) {
        ops.push(Op::DeleteCheck {
            node: k.0.clone(),
            id: k.1.clone(),
        });
    }
    for k in old.kv.keys().filter(|k| !new.kv.contains_key(*k)) {
        ops.push(Op::DeleteKv(k.clone()));
    }
    for k in old
        .sessions
        .keys()
        .filter(|k| !new.sessions.contains_key(*k))
    {
        ops.push(Op::DeleteSession(k.clone()));
    }
    for k in old
        .acl
        .policies
        .keys()
        .filter(|k| !new.acl.policies.contains_key(*k))
    {
        ops.push(Op::Acl(AclOp::DeletePolicy(k.clone())));
    }
    for k in old
        .acl
        .tokens
        .keys()
        .filter(|k| !new.acl.tokens.contains_key(*k))
    {
        ops.push(Op::Acl(AclOp::DeleteToken(k.clone())));
    }
    // Puts: whatever is new or changed (compared by the revision that wrote it).
    for op in new.snapshot_ops() {
        let same = match &op {
            Op::PutNode(n) => old
                .nodes
                .get(&n.node)
                .is_some_and(|o| o.modify_index == n.modify_index),
            Op::PutService(s) => old
                .services
                .get(&(s.node.clone(), s.id.clone()))
                .is_some_and(|o| o.modify_index == s.modify_index),
            Op::PutCheck(c) => old
                .checks
                .get(&(c.node.clone(), c.check_id.clone()))
                .is_some_and(|o| o.modify_index == c.modify_index),
            Op::PutKv(e) => old
                .kv
                .get(&e.key)
                .is_some_and(|o| o.modify_index == e.modify_index),
            Op::PutSession(s) => old
                .sessions
                .get(&s.id)
                .is_some_and(|o| o.modify_index == s.modify_index),
            _ => false,
        };
        if !same {
            ops.push(op);
        }
    }
    ops
}

impl crate::registry::Backend for EtcdStore {
    /// An etcd transaction, compared on the revision of every key the write read (and,
    /// for a role write, on this server's membership); answered once this server's view
    /// shows it.
    async fn commit<R>(
        &self,
        reg: &Registry,
        authority: Authority,
        f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        EtcdStore::commit(self, reg, authority, f).await
    }

    /// A change is written, fenced on this server's membership; none when the view
    /// already says so (a change made elsewhere that this server has not seen yet is
    /// written by the next probe).
    fn set_status(&self, reg: &Registry, key: (String, String), status: Health, output: String) {
        if reg.read(|st| st.checks.get(&key).map(|c| c.status)) != Some(status) {
            self.queue_status(key, status, output);
        }
    }

    /// The probes the rendezvous hash gives this server. TTL checks run nowhere: any
    /// server takes their heartbeats and the leader expires them.
    fn runs_check(&self, reg: &Registry, node: &str, id: &str, spec: &CheckSpec) -> bool {
        !matches!(spec.probe, Probe::Ttl { .. })
            && self.owner(node, id).as_deref() == Some(reg.local_node())
    }

    /// The oldest live member.
    fn is_leader(&self, reg: &Registry) -> bool {
        self.leader_name().as_deref() == Some(reg.config.node_name.as_str())
    }

    /// Every live server, oldest first.
    fn peers(&self, _reg: &Registry) -> Vec<String> {
        EtcdStore::peers(self)
    }

    /// Once the statuses queued so far are written.
    async fn statuses_written(&self) {
        EtcdStore::statuses_written(self).await;
    }
}

fn lost_place() -> Error {
    Error::Unavailable(
        "this server is not a live cluster member now (its etcd lease lapsed or it is cut off); it makes no role writes until it joins again".into(),
    )
}

fn unavailable(e: tessera_etcd::Error) -> Error {
    Error::Unavailable(format!("etcd: {e}"))
}

/// The member with the highest rendezvous score for check `id` of `node`.
fn owner_of<'a>(
    members: impl IntoIterator<Item = &'a String>,
    node: &str,
    id: &str,
) -> Option<&'a String> {
    members.into_iter().max_by_key(|m| rendezvous(m, node, id))
}

/// The rendezvous score of `member` for check `id` of `node`: FNV-1a over the three
/// names, then a 64-bit finaliser to spread it. Fixed here rather than std's hasher, so
/// servers of different builds agree on every owner during a rolling upgrade.
fn rendezvous(member: &str, node: &str, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [member, node, id] {
        for b in part.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A registry object as the JSON value of its key.
fn json(v: &impl serde::Serialize) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|e| Error::bad(format!("cannot encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::SERF_CHECK as SERF;

    fn kv(key: &str, rev: u64) -> Op {
        Op::PutKv(KvEntry {
            key: key.into(),
            flags: 0,
            value: b"v".to_vec(),
            lock_index: 0,
            create_index: rev,
            modify_index: rev,
            session: None,
        })
    }

    fn state(ops: Vec<(u64, Op)>) -> State {
        let mut st = State::default();
        for (i, op) in ops {
            st.apply(i, op);
        }
        st
    }

    /// Checks spread over the members, and a member leaving moves its checks only.
    #[test]
    fn rendezvous_moves_only_the_leavers_checks() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let two = &three[..2];
        let mut per = std::collections::HashMap::<&String, usize>::new();
        for i in 0..600 {
            let id = format!("service:web-{i}");
            let before = owner_of(&three, "node-1", &id).unwrap();
            *per.entry(before).or_default() += 1;
            let after = owner_of(two, "node-1", &id).unwrap();
            if before != &three[2] {
                assert_eq!(before, after, "{id} moved although its owner stayed");
            }
        }
        for (m, n) in per {
            assert!((140..=260).contains(&n), "{m} owns {n} of 600");
        }
        assert_eq!(owner_of(&[] as &[String], "n", "c"), None);
    }

    /// A server whose lease ran out while it was not looking (a pause: it still holds
    /// its fence and its old view) cannot write a status as the check's owner, and
    /// nothing reaches etcd; the same write for a client goes through, and so does the
    /// owner's write once it has joined again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_lost_its_place_writes_nothing_as_owner() {
        let Some(etcd) = tessera_testkit::EtcdCluster::start_or_skip(1).await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let config = crate::Config {
            data_dir: dir.path().into(),
            node_name: "a".into(),
            ..Default::default()
        };
        let reg = Registry::open_etcd(config, false, &etcd.client_addrs(), None, "t/")
            .await
            .unwrap();
        let store = reg.etcd().cloned().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(store.clone().follow(Arc::downgrade(&reg), cancel.clone()));
        reg.ensure_local_node().await.unwrap();
        let raw = Client::new(&etcd.client_addrs()).unwrap();
        let join = async || {
            let (lease, _) = raw.lease_grant(5).await.unwrap();
            let key = store.member_key.get_or_init(|| store.key("m/a"));
            let rev = store
                .create_member(key, "127.0.0.1:1", lease)
                .await
                .unwrap();
            store.fence.store(rev, Ordering::Release);
            lease
        };
        let set = |status: Health| {
            move |st: &State, _: u64| {
                let mut c = st.checks[&("a".to_owned(), SERF.to_owned())].clone();
                c.status = status;
                Ok((vec![Op::PutCheck(c)], ()))
            }
        };
        let lease = join().await;
        store
            .commit(&reg, Authority::Member, set(Health::Warning))
            .await
            .unwrap();
        let check_key = b"t/c/a/serfHealth";
        let before = raw.get(check_key).await.unwrap().unwrap().mod_revision;

        // The lease goes (as it runs out during a pause): the member key with it.
        raw.lease_revoke(lease).await.unwrap();
        let err = store
            .commit(&reg, Authority::Member, set(Health::Critical))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("not a live cluster member"),
            "{err}"
        );
        let now = raw.get(check_key).await.unwrap().unwrap();
        assert_eq!(now.mod_revision, before, "a fenced write reached etcd");

        // A client's write is not about a role: it goes through.
        store
            .commit(&reg, Authority::Client, set(Health::Passing))
            .await
            .unwrap();
        // Joined again, with a new fence: the owner writes again.
        join().await;
        store
            .commit(&reg, Authority::Member, set(Health::Critical))
            .await
            .unwrap();
        let v = raw.get(check_key).await.unwrap().unwrap().value;
        assert!(String::from_utf8_lossy(&v).contains("critical"));
        cancel.cancel();
    }

    /// After a compaction the view is rebuilt from a listing: what is gone is deleted,
    /// what changed or is new is put, what is the same is left alone (no wake-up).
    #[test]
    fn a_relisting_applies_only_the_difference() {
        let old = state(vec![
            (2, kv("same", 2)),
            (3, kv("changed", 3)),
            (4, kv("gone", 4)),
        ]);
        let new = state(vec![
            (2, kv("same", 2)),
            (9, kv("changed", 9)),
            (10, kv("added", 10)),
        ]);
        let ops = diff(&old, &new);
        let mut names: Vec<String> = ops
            .iter()
            .map(|op| match op {
                Op::PutKv(e) => format!("put {}", e.key),
                Op::DeleteKv(k) => format!("delete {k}"),
                other => format!("{other:?}"),
            })
            .collect();
        names.sort();
        assert_eq!(names, ["delete gone", "put added", "put changed"]);
        // Applied at the listing's revision, the KV topic moves past every earlier index.
        let mut st = old.clone();
        for op in ops {
            st.apply(11, op);
        }
        assert_eq!(st.topic_index(&crate::state::Topic::Kv), 11);
        assert_eq!(
            st.kv.keys().collect::<Vec<_>>(),
            ["added", "changed", "same"]
        );
    }

    #[test]
    fn names_with_slashes_survive_the_key_layout() {
        for s in ["a/b", "100%", "%2F", "plain"] {
            assert_eq!(unesc(&esc(s)), s);
            assert!(!esc(s).contains('/'));
        }
    }
}
