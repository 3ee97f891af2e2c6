//! The Kubernetes manifests in `deploy/kubernetes`, rendered by `kubectl kustomize` for
//! each overlay and checked against what they run: every `tessera` command line parses
//! with the real CLI, the gateway's config loads and its ports are the container's,
//! probes name ports the container has, selectors find their pods, grace periods outlast
//! the drains, disruption budgets keep etcd's quorum, and every Secret and ConfigMap a pod
//! needs is rendered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // each test crate uses a part of it
mod common;

use common::{flag, seconds};

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn render(overlay: &str) -> Option<Vec<Value>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/overlays");
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(dir.join(overlay))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "kubectl is required in CI: {e}"
            );
            eprintln!("skipped: kubectl is not installed ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect(),
    )
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn named<'a>(docs: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> {
    docs.iter().filter(move |d| d["kind"] == kind)
}

/// A container's args with `$(VAR)` replaced the way the kubelet does, by sample values.
fn expanded(c: &Value) -> Vec<String> {
    let sample = |var: &str| match var {
        "POD_IP" => "10.1.2.3".to_owned(),
        "POD_NAME" => "pod-0".to_owned(),
        other => panic!("args use $({other}), which the test does not know"),
    };
    c["args"]
        .as_sequence()
        .map(|a| a.iter().map(|v| s(v).to_owned()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|arg| {
            let mut out = arg.clone();
            while let Some(start) = out.find("$(") {
                let end = out[start..].find(')').unwrap() + start;
                let var = out[start + 2..end].to_owned();
                out.replace_range(start..=end, &sample(&var));
            }
            out
        })
        .collect()
}

fn port_of(container: &Value, name_or_number: &Value) -> u64 {
    if let Some(n) = name_or_number.as_u64() {
        return n;
    }
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == *name_or_number)
        .unwrap_or_else(|| panic!("no port {name_or_number:?} in {container:?}"))["containerPort"]
        .as_u64()
        .unwrap()
}

fn matches(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k] == *v))
}

fn check(overlay: &str, docs: &[Value]) {
    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        .collect();
    assert!(
        workloads.len() >= 7,
        "{overlay}: {} workloads",
        workloads.len()
    );
    let secrets: Vec<&str> = named(docs, "Secret")
        .map(|d| s(&d["metadata"]["name"]))
        .collect();
    let config_maps: BTreeMap<&str, &Value> = named(docs, "ConfigMap")
        .map(|d| (s(&d["metadata"]["name"]), d))
        .collect();
    for w in &workloads {
        let name = s(&w["metadata"]["name"]);
        let spec = &w["spec"];
        let pod = &spec["template"]["spec"];
        assert!(
            matches(
                &spec["selector"]["matchLabels"],
                &spec["template"]["metadata"]["labels"]
            ),
            "{overlay}/{name}: its selector does not select its own pods"
        );
        let grace = pod["terminationGracePeriodSeconds"]
            .as_f64()
            .unwrap_or(30.0);
        for c in pod["containers"].as_sequence().unwrap() {
            // Probes name ports the container has.
            for probe in ["readinessProbe", "livenessProbe"] {
                let p = &c[probe];
                let port = if p["httpGet"].is_mapping() {
                    &p["httpGet"]["port"]
                } else {
                    &p["tcpSocket"]["port"]
                };
                assert!(!port.is_null(), "{overlay}/{name}: no {probe}");
                port_of(c, port);
            }
            // Every Secret the pod reads is rendered.
            for env in c["env"].as_sequence().into_iter().flatten() {
                let r = &env["valueFrom"]["secretKeyRef"]["name"];
                if !r.is_null() {
                    assert!(
                        secrets.contains(&s(r)),
                        "{overlay}/{name}: Secret {r:?} is not rendered"
                    );
                }
            }
            if !s(&c["image"]).starts_with("tessera") {
                continue;
            }
            let args = expanded(c);
            // The real CLI accepts the command line (clap parses every flag and value
            // before it answers --help).
            let mut with_help = args.clone();
            with_help.push("--help".into());
            let out = Command::new(common::BIN).args(&with_help).output().unwrap();
            assert!(
                out.status.success(),
                "{overlay}/{name}: tessera {args:?} is refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let drain = flag(&args, "--drain-delay").map_or(0.0, seconds);
            match args[0].as_str() {
                "server" => {
                    let bind = flag(&args, "--bind").unwrap();
                    assert!(bind.ends_with(":8500"), "{bind}");
                    assert_eq!(port_of(c, &Value::from("http")), 8500);
                    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
                    assert!(
                        grace > drain,
                        "{overlay}/{name}: grace {grace} s ≤ drain {drain} s"
                    );
                }
                "shop" => {
                    let listen = flag(&args, "--listen").unwrap();
                    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
                    assert_eq!(port_of(c, &Value::from("http")), port, "{overlay}/{name}");
                    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health");
                    assert!(
                        grace > drain,
                        "{overlay}/{name}: grace {grace} s ≤ drain {drain} s"
                    );
                }
                "gateway" => {
                    let path = flag(&args, "--config").unwrap();
                    let file = Path::new(path).file_name().unwrap().to_str().unwrap();
                    let mount = c["volumeMounts"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .find(|m| path.starts_with(s(&m["mountPath"])))
                        .expect("the config is mounted");
                    let volume = pod["volumes"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .find(|v| v["name"] == mount["name"])
                        .unwrap();
                    let cm = config_maps
                        .get(s(&volume["configMap"]["name"]))
                        .expect("the gateway's ConfigMap is rendered");
                    let dir = tempfile::tempdir().unwrap();
                    let toml = dir.path().join(file);
                    std::fs::write(&toml, s(&cm["data"][file])).unwrap();
                    let config = tessera_gateway::Config::load(&toml)
                        .unwrap_or_else(|e| panic!("{overlay}: the gateway's config: {e}"));
                    assert_eq!(
                        port_of(c, &Value::from("http")),
                        u64::from(config.listen.port())
                    );
                    assert_eq!(
                        port_of(c, &Value::from("admin")),
                        u64::from(config.admin.port())
                    );
                    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
                    assert_eq!(
                        port_of(c, &c["readinessProbe"]["httpGet"]["port"]),
                        u64::from(config.admin.port()),
                        "readiness is the admin port's"
                    );
                    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
                        .as_f64()
                        .expect("a preStop pause");
                    let needed = pre_stop
                        + config.drain_delay.as_secs_f64()
                        + config.drain_timeout.as_secs_f64();
                    assert!(
                        config.drain_delay.as_secs_f64() > 0.0 && grace > needed,
                        "{overlay}: grace {grace} s ≤ preStop + drain delay + drain timeout ({needed} s)"
                    );
                }
                other => panic!("{overlay}/{name}: unexpected tessera {other}"),
            }
        }
    }
    // Services and disruption budgets select pods that exist.
    for svc in named(docs, "Service") {
        let sel = &svc["spec"]["selector"];
        let target = workloads
            .iter()
            .find(|w| matches(sel, &w["spec"]["template"]["metadata"]["labels"]))
            .unwrap_or_else(|| {
                panic!(
                    "{overlay}: Service {:?} selects no pod",
                    svc["metadata"]["name"]
                )
            });
        for p in svc["spec"]["ports"].as_sequence().unwrap() {
            let c = &target["spec"]["template"]["spec"]["containers"][0];
            port_of(c, &p["targetPort"]);
        }
    }
    for pdb in named(docs, "PodDisruptionBudget") {
        let name = s(&pdb["metadata"]["name"]);
        let w = workloads
            .iter()
            .find(|w| {
                matches(
                    &pdb["spec"]["selector"]["matchLabels"],
                    &w["spec"]["template"]["metadata"]["labels"],
                )
            })
            .unwrap_or_else(|| panic!("{overlay}: PodDisruptionBudget {name} selects no pod"));
        let replicas = w["spec"]["replicas"].as_u64().unwrap_or(1);
        let may_go = match (
            pdb["spec"]["minAvailable"].as_u64(),
            pdb["spec"]["maxUnavailable"].as_u64(),
        ) {
            (Some(min), None) => replicas.saturating_sub(min),
            (None, Some(max)) => max,
            _ => panic!("{overlay}/{name}: one of minAvailable or maxUnavailable, as a number"),
        };
        assert!(
            may_go >= 1,
            "{overlay}/{name}: blocks every voluntary disruption"
        );
        let quorum = replicas / 2 + 1;
        if w["kind"] == "StatefulSet" || name == "tessera-server" && replicas > 1 {
            assert!(
                replicas - may_go >= quorum,
                "{overlay}/{name}: lets {may_go} of {replicas} go, below a quorum of {quorum}"
            );
        }
    }
}

#[test]
fn the_single_node_manifests_hang_together() {
    let Some(docs) = render("single") else { return };
    check("single", &docs);
    let server = named(&docs, "Deployment")
        .find(|d| d["metadata"]["name"] == "tessera-server")
        .unwrap();
    assert_eq!(server["spec"]["replicas"], 1);
    assert_eq!(server["spec"]["strategy"]["type"], "Recreate");
    assert!(
        !expanded(&server["spec"]["template"]["spec"]["containers"][0]).contains(&"--store".into()),
        "the embedded store"
    );
}

#[test]
fn the_ha_manifests_hang_together() {
    let Some(docs) = render("ha") else { return };
    check("ha", &docs);
    let etcd = named(&docs, "StatefulSet")
        .find(|d| d["metadata"]["name"] == "etcd")
        .unwrap();
    assert_eq!(etcd["spec"]["replicas"], 3);
    assert!(
        !etcd["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"].is_null(),
        "members on different nodes"
    );
    let server = named(&docs, "Deployment")
        .find(|d| d["metadata"]["name"] == "tessera-server")
        .unwrap();
    assert_eq!(server["spec"]["replicas"], 3);
    let args = expanded(&server["spec"]["template"]["spec"]["containers"][0]);
    let store = flag(&args, "--store").unwrap();
    // Every etcd member, by the name its StatefulSet gives it.
    for i in 0..3 {
        assert!(store.contains(&format!("etcd-{i}.etcd:2379")), "{store}");
    }
}
