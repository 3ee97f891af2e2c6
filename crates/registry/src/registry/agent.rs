//! The agent API: services, checks and TTL updates on this server's node (any node's TTL
//! heartbeats on etcd), and maintenance mode.

use super::*;

impl Registry {
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

    pub(super) fn check_write_allowed(
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

    /// [`Registry::update_ttl`], answered once readers see it. On etcd, a check that was
    /// registered through another server a moment ago may not be in this server's view
    /// yet: the server catches up with etcd once before saying the check is unknown.
    pub async fn heartbeat(
        &self,
        id: &str,
        status: Health,
        output: String,
        authz: &Authz,
    ) -> Result<(), Error> {
        match (
            self.update_ttl(id, status, output.clone(), authz),
            self.etcd(),
        ) {
            (Err(Error::NotFound(_)), Some(etcd)) => {
                etcd.barrier().await?;
                self.update_ttl(id, status, output, authz)?;
            }
            (done, _) => done?,
        }
        self.statuses_written().await;
        Ok(())
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
        if self.etcd().is_some() {
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
        if let Some(etcd) = self.etcd() {
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
        backend!(self, b => Backend::is_leader(b, self))
    }

    /// Returns once the check statuses set so far are visible to readers: at once on
    /// one server; on etcd, once they are written (a TTL update answers after that, so
    /// the client's next read shows it).
    pub async fn statuses_written(&self) {
        backend!(self, b => Backend::statuses_written(b).await)
    }

    /// Sets the status of a check this server runs. The index moves only when the
    /// status does, so an HTTP check whose body changes every time does not wake every
    /// watcher. On one server, status is not logged, but it is shown in index order after
    /// the writes before it; on etcd, a change is written, fenced on this server's
    /// membership.
    pub(crate) fn set_status(&self, node: &str, id: &str, status: Health, output: String) {
        let key = (node.to_owned(), id.to_owned());
        backend!(self, b => Backend::set_status(b, self, key, status, output));
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
}
