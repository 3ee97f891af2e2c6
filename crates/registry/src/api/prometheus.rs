//! `GET /v1/tessera/prometheus-sd`: Prometheus's HTTP service discovery
//! (`http_sd_configs`), for the Prometheus builds without `consul_sd_configs` (Debian's).
//!
//! An instance is a target when it passes its checks and says where its metrics are:
//! meta `metrics_path` (`/metrics`), and `metrics_port` when they are served on another
//! port than the service's (the gateway's admin port). The servers themselves are
//! targets too, as service `tessera-server`. Each target group is labelled with
//! `service`, `instance_id`, `node`, `tags` (`,a,b,`, as Prometheus's Consul discovery
//! writes them) and `meta_<key>` per meta key; `?service=` (repeatable) narrows it.
//! Instances the token may not read are left out, as from every health read.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use tessera_core::Health;

use super::{ApiResult, AppState, Ctx};
use crate::acl::{Level, Resource};
use crate::registry::{Backend, Backing};
use crate::state::State as Reg;

/// The service name the servers are listed under.
const SERVER_SERVICE: &str = "tessera-server";

#[derive(Serialize)]
struct Group {
    targets: Vec<String>,
    labels: BTreeMap<String, String>,
}

pub async fn targets(State(reg): State<AppState>, ctx: Ctx, headers: HeaderMap) -> ApiResult {
    let only: Vec<&str> = ctx.q.all("service").collect();
    let wanted = |name: &str| only.is_empty() || only.contains(&name);
    let mut groups: Vec<Group> = reg.read(|st| {
        let mut out = Vec::new();
        for (name, keys) in &st.by_name {
            if !wanted(name) || !ctx.authz.allows(Resource::Service, name, Level::Read) {
                continue;
            }
            for k in keys {
                let Some(s) = st.services.get(k) else {
                    continue;
                };
                let Some(path) = s.meta.get("metrics_path").filter(|p| p.starts_with('/')) else {
                    continue;
                };
                if Reg::aggregate(&st.instance_checks(&s.node, &s.id)) != Health::Passing {
                    continue;
                }
                let host = if s.address.is_empty() {
                    st.nodes.get(&s.node).map(|n| n.address.clone())
                } else {
                    Some(s.address.clone())
                };
                let Some(host) = host.filter(|h| !h.is_empty()) else {
                    continue;
                };
                let port = s
                    .meta
                    .get("metrics_port")
                    .and_then(|p| p.parse::<u16>().ok())
                    .unwrap_or(s.port);
                let mut labels = BTreeMap::from([
                    ("__metrics_path__".to_owned(), path.clone()),
                    ("service".to_owned(), s.service.clone()),
                    ("instance_id".to_owned(), s.id.clone()),
                    ("node".to_owned(), s.node.clone()),
                ]);
                if !s.tags.is_empty() {
                    labels.insert("tags".into(), format!(",{},", s.tags.join(",")));
                }
                for (k, v) in &s.meta {
                    if k != "metrics_path" && k != "metrics_port" {
                        labels.insert(format!("meta_{}", label_name(k)), v.clone());
                    }
                }
                out.push(Group {
                    targets: vec![authority(&host, port)],
                    labels,
                });
            }
        }
        out
    });
    if wanted(SERVER_SERVICE)
        && ctx
            .authz
            .allows(Resource::Agent, reg.local_node(), Level::Read)
    {
        let servers = match &reg.backing {
            // One server: the one asked, by the address it was asked on.
            Backing::Log(_) => headers
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| vec![h.to_owned()])
                .unwrap_or_default(),
            Backing::Etcd(etcd) => Backend::peers(etcd.as_ref(), &reg),
        };
        for server in servers {
            groups.push(Group {
                targets: vec![server],
                labels: BTreeMap::from([
                    ("__metrics_path__".to_owned(), "/metrics".to_owned()),
                    ("service".to_owned(), SERVER_SERVICE.to_owned()),
                ]),
            });
        }
    }
    Ok(super::json(StatusCode::OK, &groups))
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A meta key as a Prometheus label name: `[a-zA-Z0-9_]`, anything else `_`.
fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}
