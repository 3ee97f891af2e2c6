//! The catalog API: registrations and deregistrations for any node, as Consul's
//! `/v1/catalog/register` and `/v1/catalog/deregister` take them.

use super::*;

impl Registry {
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
}
