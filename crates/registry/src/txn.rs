//! `PUT /v1/txn` for KV operations, as Consul runs them: every operation is checked and
//! applied against the effect of the ones before it, and either all of them are written,
//! as one logged record, or none (409 with the index and reason of each failure).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::acl::{Authz, Level, Resource};
use crate::error::Error;
use crate::model::KvEntry;
use crate::registry::Registry;
use crate::state::{Op, State};

/// Consul's limit on operations per transaction.
pub const MAX_OPS: usize = 128;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TxnOp {
    #[serde(rename = "KV")]
    pub kv: Option<KvOp>,
    // Named so they can be refused by name.
    pub node: Option<serde_json::Value>,
    pub service: Option<serde_json::Value>,
    pub check: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct KvOp {
    pub verb: String,
    pub key: String,
    #[serde(with = "opt_b64")]
    pub value: Option<Vec<u8>>,
    pub flags: Option<u64>,
    pub index: u64,
    pub session: String,
}

mod opt_b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// What an operation answers: the entries it read or wrote (none for deletes and checks).
#[derive(Debug, Clone)]
pub struct TxnResult {
    pub entries: Vec<KvEntry>,
    /// Written entries are returned without their value, as Consul does.
    pub with_value: bool,
}

#[derive(Debug, Clone)]
pub struct TxnError {
    pub op_index: usize,
    pub what: String,
}

/// The KV table as the operations so far left it.
struct Overlay<'a> {
    st: &'a State,
    changed: BTreeMap<String, Option<KvEntry>>,
}

impl Overlay<'_> {
    fn get(&self, key: &str) -> Option<&KvEntry> {
        match self.changed.get(key) {
            Some(e) => e.as_ref(),
            None => self.st.kv.get(key),
        }
    }

    fn tree(&self, prefix: &str) -> Vec<KvEntry> {
        let mut out: BTreeMap<&str, &KvEntry> = self
            .st
            .kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.as_str(), e))
            .collect();
        for (k, e) in self.changed.range(prefix.to_owned()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match e {
                Some(e) => out.insert(k.as_str(), e),
                None => out.remove(k.as_str()),
            };
        }
        out.into_values().cloned().collect()
    }
}

impl Registry {
    /// Runs `ops` atomically: `Ok(Ok(results))` when all applied, `Ok(Err(errors))`
    /// when any failed (nothing was written).
    pub async fn txn(
        &self,
        ops: Vec<TxnOp>,
        authz: &Authz,
    ) -> Result<Result<Vec<TxnResult>, Vec<TxnError>>, Error> {
        if ops.len() > MAX_OPS {
            return Err(Error::TooLarge(format!(
                "Transaction contains too many operations ({} > {MAX_OPS})",
                ops.len()
            )));
        }
        let mut kv_ops = Vec::with_capacity(ops.len());
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                TxnOp {
                    kv: Some(kv),
                    node: None,
                    service: None,
                    check: None,
                } => {
                    let write = !matches!(
                        kv.verb.as_str(),
                        "get" | "get-tree" | "check-index" | "check-session" | "check-not-exists"
                    );
                    let level = if write { Level::Write } else { Level::Read };
                    let allowed = if kv.verb.ends_with("-tree") {
                        if write {
                            authz.allows_key_tree_write(&kv.key)
                        } else {
                            authz.allows(Resource::Key, &kv.key, level)
                        }
                    } else {
                        authz.allows(Resource::Key, &kv.key, level)
                    };
                    if !allowed {
                        return Err(Error::denied(format!(
                            "token lacks key access for operation {i} on {:?}",
                            kv.key
                        )));
                    }
                    if !kv.verb.ends_with("-tree") {
                        tessera_core::validate_key(&kv.key)?;
                    }
                    if kv
                        .value
                        .as_ref()
                        .is_some_and(|v| v.len() > self.config.kv_max_value_bytes)
                    {
                        return Err(Error::TooLarge(format!(
                            "operation {i}: value exceeds {} bytes",
                            self.config.kv_max_value_bytes
                        )));
                    }
                    kv_ops.push(kv);
                }
                _ => {
                    return Err(Error::bad(format!(
                        "operation {i}: only KV operations are supported in transactions"
                    )));
                }
            }
        }
        let timers = &self.sessions;
        self.commit(|st, index| {
            let mut view = Overlay {
                st,
                changed: BTreeMap::new(),
            };
            let mut results = Vec::new();
            let mut errors = Vec::new();
            for (i, op) in kv_ops.iter().enumerate() {
                match step(&mut view, op, index, timers) {
                    Ok(Some(r)) => results.push(r),
                    Ok(None) => {}
                    Err(what) => errors.push(TxnError { op_index: i, what }),
                }
            }
            if !errors.is_empty() {
                return Ok((vec![], Err(errors)));
            }
            let writes = view
                .changed
                .into_iter()
                .map(|(k, e)| match e {
                    Some(e) => Op::PutKv(e),
                    None => Op::DeleteKv(k),
                })
                .collect();
            Ok((writes, Ok(results)))
        })
        .await
    }
}

/// One operation against the overlay: its result, or why it failed.
fn step(
    view: &mut Overlay<'_>,
    op: &KvOp,
    index: u64,
    timers: &crate::sessions::Timers,
) -> Result<Option<TxnResult>, String> {
    let key = op.key.clone();
    let current = view.get(&key).cloned();
    let modify = current.as_ref().map_or(0, |e| e.modify_index);
    let put = |view: &mut Overlay<'_>, session: Option<String>, lock_index: u64| {
        let e = KvEntry {
            key: key.clone(),
            flags: op.flags.or(current.as_ref().map(|e| e.flags)).unwrap_or(0),
            value: op.value.clone().unwrap_or_default(),
            lock_index,
            create_index: current.as_ref().map_or(index, |e| e.create_index),
            modify_index: index,
            session,
        };
        view.changed.insert(key.clone(), Some(e.clone()));
        Some(TxnResult {
            entries: vec![e],
            with_value: false,
        })
    };
    let holder = current.as_ref().and_then(|e| e.session.clone());
    let lock_index = current.as_ref().map_or(0, |e| e.lock_index);
    Ok(match op.verb.as_str() {
        "set" => put(view, holder, lock_index),
        "cas" => {
            if op.index != modify {
                return Err(format!(
                    "current modify index {modify} does not match {}",
                    op.index
                ));
            }
            put(view, holder, lock_index)
        }
        "lock" => {
            if !view.st.sessions.contains_key(&op.session) {
                return Err(format!("invalid session {:?}", op.session));
            }
            match holder {
                Some(h) if h == op.session => put(view, Some(h), lock_index),
                Some(h) => return Err(format!("key {key:?} is locked by session {h:?}")),
                None if timers.delayed(&key) => {
                    return Err(format!("key {key:?} is in its lock delay"));
                }
                None => put(view, Some(op.session.clone()), lock_index + 1),
            }
        }
        "unlock" => match holder {
            Some(h) if h == op.session => put(view, None, lock_index),
            _ => {
                return Err(format!(
                    "key {key:?} is not locked by session {:?}",
                    op.session
                ));
            }
        },
        "get" => match current {
            Some(e) => Some(TxnResult {
                entries: vec![e],
                with_value: true,
            }),
            None => return Err(format!("key {key:?} doesn't exist")),
        },
        "get-tree" => Some(TxnResult {
            entries: view.tree(&key),
            with_value: true,
        }),
        "check-index" => {
            if current.is_none() {
                return Err(format!("key {key:?} doesn't exist"));
            }
            if op.index != modify {
                return Err(format!(
                    "current modify index {modify} does not match {}",
                    op.index
                ));
            }
            None
        }
        "check-session" => {
            if holder.as_deref() != Some(op.session.as_str()) {
                return Err(format!(
                    "key {key:?} is not locked by session {:?}",
                    op.session
                ));
            }
            None
        }
        "check-not-exists" => {
            if current.is_some() {
                return Err(format!("key {key:?} exists"));
            }
            None
        }
        "delete" => {
            view.changed.insert(key, None);
            None
        }
        "delete-cas" => {
            if op.index != modify {
                return Err(format!(
                    "current modify index {modify} does not match {}",
                    op.index
                ));
            }
            view.changed.insert(key, None);
            None
        }
        "delete-tree" => {
            for e in view.tree(&key) {
                view.changed.insert(e.key, None);
            }
            None
        }
        other => return Err(format!("unknown KV verb {other:?}")),
    })
}
