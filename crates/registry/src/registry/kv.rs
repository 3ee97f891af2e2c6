//! KV writes: puts with `?cas`, `?flags` and session locks (`?acquire`/`?release`), and
//! deletes of a key or a tree.

use super::*;

impl Registry {
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
}
