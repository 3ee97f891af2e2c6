//! The in-memory state and the one function that changes it: `apply`. Writes from the API
//! and replay from the log both go through `apply`, so a restart rebuilds exactly the
//! state that was acknowledged. Every change records which *topics* it touched; blocking
//! queries wait on a topic, so a change to service `a` never wakes watchers of service `b`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use tessera_core::Health;
use tokio::sync::watch;

use crate::acl::AclState;
use crate::model::{CheckRecord, KvEntry, NodeRecord, ServiceRecord, SessionRecord};

/// One logged mutation. A write from the API becomes one `Record` of one or more ops,
/// applied and logged atomically.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    PutNode(NodeRecord),
    /// Removes the node with its services and checks.
    DeleteNode(String),
    PutService(ServiceRecord),
    /// Removes the instance and the checks bound to it.
    DeleteService {
        node: String,
        id: String,
    },
    PutCheck(CheckRecord),
    DeleteCheck {
        node: String,
        id: String,
    },
    PutKv(KvEntry),
    DeleteKv(String),
    DeleteKvTree(String),
    Acl(crate::acl::AclOp),
    PutSession(SessionRecord),
    /// Ends a session. The keys it held are released or deleted by ops of their own in
    /// the same record.
    DeleteSession(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub index: u64,
    pub ops: Vec<Op>,
}

/// What a blocking query can wait on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// The set of service names and their tags.
    Services,
    /// Everything about the instances of one service: registration, checks, node.
    Service(String),
    Nodes,
    /// Any check's definition or status.
    Checks,
    Kv,
    Acl,
    Sessions,
}

pub type NodeKey = (String, String);

#[derive(Default)]
pub struct State {
    /// The Raft-style index: bumped once per write, never reused.
    pub index: u64,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// (node, service id) → instance.
    pub services: BTreeMap<NodeKey, ServiceRecord>,
    /// service name → instances.
    pub by_name: BTreeMap<String, BTreeSet<NodeKey>>,
    /// (node, check id) → check.
    pub checks: BTreeMap<NodeKey, CheckRecord>,
    /// (node, service id or "" for node checks) → check ids.
    pub checks_by_owner: HashMap<NodeKey, BTreeSet<String>>,
    pub kv: BTreeMap<String, KvEntry>,
    /// Deleted key → index of its deletion, so a prefix watch sees deletes.
    pub tombstones: BTreeMap<String, u64>,
    /// Tombstones dropped to bound memory raise this floor for every KV result index.
    pub tombstone_floor: u64,
    pub acl: AclState,
    pub sessions: BTreeMap<String, SessionRecord>,
    topic_index: HashMap<Topic, u64>,
    /// Behind its own lock so that readers, who share the state lock, can subscribe.
    watchers: std::sync::Mutex<HashMap<Topic, watch::Sender<u64>>>,
}

/// A copy of the data for the registry's write side, without the watchers: nobody
/// waits on the write side, readers wait on the durable state.
impl Clone for State {
    fn clone(&self) -> State {
        State {
            index: self.index,
            nodes: self.nodes.clone(),
            services: self.services.clone(),
            by_name: self.by_name.clone(),
            checks: self.checks.clone(),
            checks_by_owner: self.checks_by_owner.clone(),
            kv: self.kv.clone(),
            tombstones: self.tombstones.clone(),
            tombstone_floor: self.tombstone_floor,
            acl: self.acl.clone(),
            sessions: self.sessions.clone(),
            topic_index: self.topic_index.clone(),
            watchers: Default::default(),
        }
    }
}

const MAX_TOMBSTONES: usize = 65_536;

impl State {
    pub fn topic_index(&self, topic: &Topic) -> u64 {
        self.topic_index.get(topic).copied().unwrap_or(0)
    }

    /// A receiver that changes on the next write to `topic`. Taken under the same lock as
    /// the read it guards, so no change can slip between the read and the wait.
    pub fn subscribe(&self, topic: Topic) -> watch::Receiver<u64> {
        let current = self.topic_index(&topic);
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(topic)
            .or_insert_with(|| watch::channel(current).0)
            .subscribe()
    }

    pub fn touch(&mut self, topic: Topic, index: u64) {
        let watchers = self.watchers.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = watchers.get(&topic) {
            if tx.receiver_count() == 0 {
                watchers.remove(&topic);
            } else {
                tx.send_replace(index);
            }
        }
        self.topic_index.insert(topic, index);
    }

    fn touch_service(&mut self, name: &str, index: u64) {
        self.touch(Topic::Service(name.to_owned()), index);
    }

    /// Every service name with an instance on `node`.
    fn service_names_on(&self, node: &str) -> BTreeSet<String> {
        self.services
            .range((node.to_owned(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .map(|(_, s)| s.service.clone())
            .collect()
    }

    pub fn apply(&mut self, index: u64, op: Op) {
        self.index = self.index.max(index);
        match op {
            Op::PutNode(node) => {
                let name = node.node.clone();
                self.nodes.insert(name.clone(), node);
                for svc in self.service_names_on(&name) {
                    self.touch_service(&svc, index);
                }
                self.touch(Topic::Nodes, index);
            }
            Op::DeleteNode(name) => {
                let ids: Vec<String> = self
                    .services
                    .range((name.clone(), String::new())..)
                    .take_while(|((n, _), _)| *n == name)
                    .map(|((_, id), _)| id.clone())
                    .collect();
                for id in ids {
                    self.remove_service(&name, &id, index);
                }
                if let Some(node_checks) =
                    self.checks_by_owner.remove(&(name.clone(), String::new()))
                {
                    for id in node_checks {
                        self.checks.remove(&(name.clone(), id));
                    }
                    self.touch(Topic::Checks, index);
                }
                self.nodes.remove(&name);
                self.touch(Topic::Nodes, index);
            }
            Op::PutService(svc) => {
                let key = (svc.node.clone(), svc.id.clone());
                if let Some(old) = self.services.get(&key)
                    && old.service != svc.service
                {
                    let old_name = old.service.clone();
                    self.unindex_name(&old_name, &key);
                    self.touch_service(&old_name, index);
                }
                self.by_name
                    .entry(svc.service.clone())
                    .or_default()
                    .insert(key.clone());
                self.touch_service(&svc.service, index);
                self.services.insert(key, svc);
                self.touch(Topic::Services, index);
            }
            Op::DeleteService { node, id } => self.remove_service(&node, &id, index),
            Op::PutCheck(check) => {
                let key = (check.node.clone(), check.check_id.clone());
                if let Some(old) = self.checks.get(&key)
                    && old.service_id != check.service_id
                {
                    let owner = (old.node.clone(), old.service_id.clone());
                    self.unindex_check(&owner, &key.1);
                    self.touch_check_owner(&owner.0, &owner.1, index);
                }
                let owner = (check.node.clone(), check.service_id.clone());
                self.checks_by_owner
                    .entry(owner.clone())
                    .or_default()
                    .insert(check.check_id.clone());
                self.checks.insert(key, check);
                self.touch_check_owner(&owner.0, &owner.1, index);
            }
            Op::DeleteCheck { node, id } => {
                if let Some(check) = self.checks.remove(&(node.clone(), id.clone())) {
                    let owner = (node, check.service_id);
                    self.unindex_check(&owner, &id);
                    self.touch_check_owner(&owner.0, &owner.1, index);
                }
            }
            Op::PutKv(entry) => {
                self.tombstones.remove(&entry.key);
                self.kv.insert(entry.key.clone(), entry);
                self.touch(Topic::Kv, index);
            }
            Op::DeleteKv(key) => {
                if self.kv.remove(&key).is_some() {
                    self.tombstone(key, index);
                }
                self.touch(Topic::Kv, index);
            }
            Op::DeleteKvTree(prefix) => {
                let keys: Vec<String> = self
                    .kv
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in keys {
                    self.kv.remove(&key);
                    self.tombstone(key, index);
                }
                self.touch(Topic::Kv, index);
            }
            Op::Acl(op) => {
                self.acl.apply(op);
                self.touch(Topic::Acl, index);
            }
            Op::PutSession(session) => {
                self.sessions.insert(session.id.clone(), session);
                self.touch(Topic::Sessions, index);
            }
            Op::DeleteSession(id) => {
                self.sessions.remove(&id);
                self.touch(Topic::Sessions, index);
            }
        }
    }

    fn tombstone(&mut self, key: String, index: u64) {
        if self.tombstones.len() >= MAX_TOMBSTONES {
            let max = self.tombstones.values().copied().max().unwrap_or(0);
            self.tombstone_floor = self.tombstone_floor.max(max);
            self.tombstones.clear();
        }
        self.tombstones.insert(key, index);
    }

    fn remove_service(&mut self, node: &str, id: &str, index: u64) {
        let key = (node.to_owned(), id.to_owned());
        if let Some(svc) = self.services.remove(&key) {
            self.unindex_name(&svc.service, &key);
            self.touch_service(&svc.service, index);
            self.touch(Topic::Services, index);
        }
        if let Some(ids) = self.checks_by_owner.remove(&key) {
            for cid in ids {
                self.checks.remove(&(node.to_owned(), cid));
            }
            self.touch(Topic::Checks, index);
        }
    }

    fn unindex_name(&mut self, name: &str, key: &NodeKey) {
        if let Some(set) = self.by_name.get_mut(name) {
            set.remove(key);
            if set.is_empty() {
                self.by_name.remove(name);
            }
        }
    }

    fn unindex_check(&mut self, owner: &NodeKey, check_id: &str) {
        if let Some(set) = self.checks_by_owner.get_mut(owner) {
            set.remove(check_id);
            if set.is_empty() {
                self.checks_by_owner.remove(owner);
            }
        }
    }

    /// A check change touches the checks topic and the services whose health it affects:
    /// one service for a service check, every service on the node for a node check.
    pub fn touch_check_owner(&mut self, node: &str, service_id: &str, index: u64) {
        self.touch(Topic::Checks, index);
        if service_id.is_empty() {
            for svc in self.service_names_on(node) {
                self.touch_service(&svc, index);
            }
        } else if let Some(svc) = self.services.get(&(node.to_owned(), service_id.to_owned())) {
            let name = svc.service.clone();
            self.touch_service(&name, index);
        }
    }

    /// Checks that decide the health of one instance: its own and its node's.
    pub fn instance_checks(&self, node: &str, service_id: &str) -> Vec<&CheckRecord> {
        let mut out = Vec::new();
        for owner in [
            (node.to_owned(), String::new()),
            (node.to_owned(), service_id.to_owned()),
        ] {
            if let Some(ids) = self.checks_by_owner.get(&owner) {
                for id in ids {
                    if let Some(c) = self.checks.get(&(node.to_owned(), id.clone())) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    pub fn aggregate(checks: &[&CheckRecord]) -> Health {
        checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Health::Passing)
    }

    /// Index of a KV read: the newest change among matching keys and their tombstones, or
    /// the KV table's index when nothing matches.
    pub fn kv_index(&self, prefix: &str, exact: bool) -> u64 {
        let mut idx = 0;
        if exact {
            if let Some(e) = self.kv.get(prefix) {
                idx = e.modify_index;
            }
            if let Some(t) = self.tombstones.get(prefix) {
                idx = idx.max(*t);
            }
        } else {
            for (_, e) in self
                .kv
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
            {
                idx = idx.max(e.modify_index);
            }
            for (_, t) in self
                .tombstones
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
            {
                idx = idx.max(*t);
            }
        }
        if idx == 0 {
            return self.topic_index(&Topic::Kv).max(1);
        }
        idx.max(self.tombstone_floor)
    }

    /// The whole durable state as puts, for a snapshot.
    pub fn snapshot_ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        ops.extend(self.nodes.values().cloned().map(Op::PutNode));
        ops.extend(self.services.values().cloned().map(Op::PutService));
        ops.extend(self.checks.values().cloned().map(Op::PutCheck));
        ops.extend(self.kv.values().cloned().map(Op::PutKv));
        ops.extend(self.acl.snapshot_ops().into_iter().map(Op::Acl));
        ops.extend(self.sessions.values().cloned().map(Op::PutSession));
        ops
    }
}
