//! `deploy/compose.yaml` against what it runs: each profile (`single`, `ha`) starts
//! what its services depend on, a dependency waited for as healthy has a healthcheck,
//! every `tessera` command line parses with the real CLI, healthchecks ask the ports the
//! processes listen on, the names given as registry and store resolve to services of the
//! profile, mounted files exist, volumes are declared, and stop grace periods outlast the
//! drains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // each test crate uses a part of it
mod common;

use common::{flag, seconds};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|a| a.iter().map(|x| s(x).to_owned()).collect())
        .unwrap_or_default()
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The port a `tessera health --url http://host:port/path` healthcheck asks.
fn health_port(test: &[String]) -> u16 {
    let url = flag(test, "--url").unwrap_or("http://127.0.0.1:8081/readyz");
    let authority = url.trim_start_matches("http://").split('/').next().unwrap();
    port(authority)
}

#[test]
fn the_compose_file_hangs_together() {
    let text = std::fs::read_to_string(deploy().join("compose.yaml")).unwrap();
    let mut doc: Value = serde_yaml::from_str(&text).unwrap();
    // Merges inside merged mappings (`<<: *shop`, which itself has `<<: *tessera`) come
    // out one level per pass.
    for _ in 0..4 {
        doc.apply_merge().unwrap();
    }
    assert!(
        !serde_yaml::to_string(&doc).unwrap().contains("<<"),
        "every merge applied"
    );
    let services = doc["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().map(s).collect();
    let volumes: BTreeSet<&str> = doc["volumes"].as_mapping().unwrap().keys().map(s).collect();
    let profiles_of = |svc: &Value| strings(&svc["profiles"]);
    let is_tessera = |svc: &Value| s(&svc["image"]).contains("tessera");
    let aliases = |svc: &Value| strings(&svc["networks"]["default"]["aliases"]);

    for profile in ["single", "ha"] {
        // What runs under this profile: services without profiles, and the profile's.
        let active: Vec<(&str, &Value)> = services
            .iter()
            .map(|(k, v)| (s(k), v))
            .filter(|(_, v)| {
                let p = profiles_of(v);
                p.is_empty() || p.iter().any(|x| x == profile)
            })
            .collect();
        let reachable: BTreeSet<String> = active
            .iter()
            .flat_map(|(n, v)| std::iter::once((*n).to_owned()).chain(aliases(v)))
            .collect();
        let is_active = |n: &str| active.iter().any(|(a, _)| *a == n);
        let servers = active
            .iter()
            .filter(|(_, v)| strings(&v["command"]).first().map(String::as_str) == Some("server"))
            .count();
        assert_eq!(servers, if profile == "ha" { 3 } else { 1 }, "{profile}");
        let checked = active.iter().filter(|(_, v)| is_tessera(v)).count();
        assert_eq!(
            checked,
            servers + 6,
            "{profile}: the servers, the gateway, 5 services"
        );
        for (name, svc) in &active {
            let deps = svc["depends_on"].as_mapping().cloned().unwrap_or_default();
            let mut alternatives = 0;
            let mut alternatives_up = 0;
            for (dep, how) in &deps {
                let dep = s(dep);
                assert!(
                    names.contains(dep),
                    "{name} depends on {dep}, which is no service"
                );
                let required = how["required"].as_bool().unwrap_or(true);
                if required {
                    assert!(
                        is_active(dep),
                        "{profile}: {name} needs {dep}, which does not run"
                    );
                } else {
                    alternatives += 1;
                    alternatives_up += usize::from(is_active(dep));
                }
                if how["condition"] == "service_healthy" && is_active(dep) {
                    let target = &services[dep];
                    assert!(
                        target["healthcheck"].is_mapping() || is_tessera(target),
                        "{name} waits for {dep} to be healthy, which has no healthcheck"
                    );
                }
            }
            assert!(
                alternatives == 0 || alternatives_up > 0,
                "{profile}: none of {name}'s optional dependencies runs"
            );
            for v in strings(&svc["volumes"]) {
                let source = v.split(':').next().unwrap();
                if source.starts_with('.') {
                    assert!(
                        deploy().join(source).exists(),
                        "{name} mounts {source}, which is missing"
                    );
                } else {
                    assert!(
                        volumes.contains(source),
                        "{name}: volume {source} is not declared"
                    );
                }
            }
            if !is_tessera(svc) {
                continue;
            }
            let command = strings(&svc["command"]);
            let mut with_help = command.clone();
            with_help.push("--help".into());
            let out = Command::new(common::BIN).args(&with_help).output().unwrap();
            assert!(
                out.status.success(),
                "{name}: tessera {command:?} is refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let health = strings(&svc["healthcheck"]["test"]);
            let grace = seconds(s(&svc["stop_grace_period"]));
            let drain = seconds(s(&svc["environment"]["TESSERA_DRAIN_DELAY"]));
            let registry_host = |addr: &str| {
                let host = addr.split(':').next().unwrap().to_owned();
                assert!(
                    reachable.contains(&host),
                    "{profile}: {name} is given {addr}, which does not run"
                );
            };
            match command[0].as_str() {
                "server" => {
                    let bind = flag(&command, "--bind").unwrap();
                    assert_eq!(health_port(&health), port(bind), "{name}'s healthcheck");
                    assert!(grace > drain, "{name}: grace {grace} s ≤ drain {drain} s");
                    if let Some(store) = flag(&command, "--store") {
                        for member in store.trim_start_matches("etcd://").split(',') {
                            registry_host(member);
                        }
                    }
                }
                "shop" => {
                    let listen = flag(&command, "--listen").unwrap();
                    assert_eq!(health_port(&health), port(listen), "{name}'s healthcheck");
                    registry_host(flag(&command, "--registry").unwrap());
                    assert!(grace > drain, "{name}: grace {grace} s ≤ drain {drain} s");
                }
                "gateway" => {
                    let config = flag(&command, "--config").unwrap();
                    let mount = strings(&svc["volumes"])
                        .into_iter()
                        .find(|v| v.split(':').nth(1) == Some(config))
                        .expect("the gateway's config is mounted");
                    let file = deploy().join(mount.split(':').next().unwrap());
                    let cfg = tessera_gateway::Config::load(&file).unwrap();
                    // No healthcheck of its own: the image's asks 127.0.0.1:8081/readyz.
                    assert!(
                        health.is_empty(),
                        "the gateway uses the image's healthcheck"
                    );
                    assert_eq!(cfg.admin.port(), health_port(&health));
                    let published = strings(&svc["ports"]);
                    assert!(
                        published.iter().any(|p| port(p) == cfg.listen.port()),
                        "the gateway's port {} is published: {published:?}",
                        cfg.listen.port()
                    );
                    registry_host(&cfg.registry.address);
                    let needed = cfg.drain_delay.as_secs_f64() + cfg.drain_timeout.as_secs_f64();
                    assert!(
                        grace > needed,
                        "gateway: grace {grace} s ≤ drain delay + timeout {needed} s"
                    );
                }
                other => panic!("{name}: unexpected tessera {other}"),
            }
        }
        // etcd's members name each other by service.
        if profile == "ha" {
            for (name, svc) in active.iter().filter(|(n, _)| n.starts_with("etcd")) {
                let command = strings(&svc["command"]);
                let cluster = command
                    .iter()
                    .find_map(|a| a.strip_prefix("--initial-cluster="))
                    .unwrap();
                for member in cluster.split(',') {
                    let (member, url) = member.split_once('=').unwrap();
                    assert!(is_active(member), "{name}: member {member} is no service");
                    assert!(url.contains(&format!("//{member}:2380")), "{url}");
                }
                assert!(command.contains(&format!("--name={name}")), "{name}");
            }
        }
    }
    // Prometheus finds the servers through their alias, and the gateway's admin port.
    let prom = std::fs::read_to_string(deploy().join("prometheus/prometheus.yml")).unwrap();
    assert!(prom.contains("http://tessera-server:8500/v1/tessera/prometheus-sd"));
    assert!(prom.contains("\"gateway:8081\""));
}
