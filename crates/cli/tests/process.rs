//! The `tessera` binary as a user runs it: the server as a real process (killed with
//! SIGKILL mid-burst, stopped with SIGTERM) and the client commands against it.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use tokio::process::{Child, Command};

#[allow(dead_code)] // each test crate uses a part of it
mod common;

use common::{BIN, run_cli};

async fn spawn_server(data_dir: &Path) -> (Child, String) {
    common::spawn_server(data_dir, &["--node", "proc-node"]).await
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(
    c: &HttpClient,
    method: &str,
    url: String,
    body: Vec<u8>,
) -> Result<(u16, Bytes), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = c.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// The `X-Consul-Index` of a read.
async fn index_of(c: &HttpClient, url: String) -> u64 {
    let req = http::Request::builder()
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    resp.headers()["x-consul-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_write_burst_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(dir.path()).await;
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let c = client();
    let mut writers = Vec::new();
    for w in 0..16 {
        let (c, addr, acked) = (c.clone(), addr.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            // Bounded: at most 5,000 writes per writer; the kill ends it far sooner.
            for n in 0..5_000 {
                let key = format!("burst/w{w}/k{}", n % 50);
                let value = format!("w{w}-n{n}");
                match call(
                    &c,
                    "PUT",
                    format!("http://{addr}/v1/kv/{key}"),
                    value.clone().into_bytes(),
                )
                .await
                {
                    Ok((200, body)) if &body[..] == b"true" => {
                        acked.lock().unwrap().insert(key, value);
                    }
                    _ => return,
                }
                if n % 10 == 0 {
                    let svc = format!(r#"{{"Name":"burst","ID":"b{w}-{n}","Port":{}}}"#, 1000 + n);
                    match call(
                        &c,
                        "PUT",
                        format!("http://{addr}/v1/agent/service/register"),
                        svc.into_bytes(),
                    )
                    .await
                    {
                        Ok((200, _)) => {
                            acked
                                .lock()
                                .unwrap()
                                .insert(format!("svc:b{w}-{n}"), String::new());
                        }
                        _ => return,
                    }
                }
            }
        }));
    }
    // Kill once a good number of writes have been acknowledged (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 400 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 100,
        "the burst ran before the kill ({} acked)",
        acked.len()
    );

    let (mut child, addr) = spawn_server(dir.path()).await;
    let (s, body) = call(
        &c,
        "GET",
        format!("http://{addr}/v1/kv/burst/?recurse"),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    let stored: HashMap<String, String> = entries
        .iter()
        .map(|e| {
            use base64::Engine;
            let v = base64::engine::general_purpose::STANDARD
                .decode(e["Value"].as_str().unwrap())
                .unwrap();
            (
                e["Key"].as_str().unwrap().to_owned(),
                String::from_utf8(v).unwrap(),
            )
        })
        .collect();
    let (_, body) = call(
        &c,
        "GET",
        format!("http://{addr}/v1/agent/services"),
        vec![],
    )
    .await
    .unwrap();
    let services: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut lost = Vec::new();
    for (k, v) in &acked {
        if let Some(id) = k.strip_prefix("svc:") {
            if services.get(id).is_none() {
                lost.push(k.clone());
            }
            continue;
        }
        // The last acknowledged value of a key, or a later one whose ack was cut off by the
        // kill (same writer, higher sequence number).
        let Some(have) = stored.get(k) else {
            lost.push(k.clone());
            continue;
        };
        let seq = |s: &str| s.rsplit("-n").next().unwrap().parse::<u64>().unwrap();
        if have != v && seq(have) < seq(v) {
            lost.push(format!("{k}: have {have}, acked {v}"));
        }
    }
    assert!(
        lost.is_empty(),
        "acknowledged writes lost after kill -9: {lost:?}"
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// kill -9 at random points while writers fill a real 3 MiB tmpfs: after each restart
/// every acknowledged write is there with its value, and none that was refused (507) is.
/// A write whose answer the kill cut off may land either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_a_filling_disk_keeps_exactly_the_acknowledged_writes() {
    let Some(disk) = tessera_testkit::Tmpfs::mount_or_skip(3 << 20) else {
        return;
    };
    let data = disk.path().join("data");
    let c = client();
    let value = |key: &str| format!("{key}:{}", "x".repeat(8_000));
    let mut acked: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    for round in 0..4 {
        let (mut child, addr) = spawn_server(&data).await;
        verify_kept(&c, &addr, &acked, &refused, &value).await;
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let outcomes: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
        let mut writers = Vec::new();
        for w in 0..8 {
            let (c, addr) = (c.clone(), addr.clone());
            let (answered, outcomes) = (answered.clone(), outcomes.clone());
            writers.push(tokio::spawn(async move {
                // Bounded: 200 writes per writer; the kill ends it sooner.
                for n in 0..200 {
                    let key = format!("fill/r{round}/w{w}/n{n}");
                    let body = value(&key).into_bytes();
                    let kept =
                        match call(&c, "PUT", format!("http://{addr}/v1/kv/{key}"), body).await {
                            Ok((200, _)) => true,
                            Ok((507, _)) => false,
                            Ok((s, b)) => panic!("{key}: {s} {}", String::from_utf8_lossy(&b)),
                            Err(_) => return, // killed: the outcome is unknown
                        };
                    outcomes.lock().unwrap().push((key, kept));
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        let kill_after = fastrand::usize(40..250);
        tessera_testkit::wait_until("writes answered", Duration::from_secs(120), || {
            let n = answered.load(std::sync::atomic::Ordering::Relaxed);
            let done = writers.iter().all(|w| w.is_finished());
            async move { n >= kill_after || done }
        })
        .await;
        // Refused writes are not visible while the server runs either.
        let refused_now: Vec<String> = outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, kept)| !kept)
            .map(|(k, _)| k.clone())
            .take(20)
            .collect();
        verify_kept(&c, &addr, &[], &refused_now, &value).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        for w in writers {
            w.await.unwrap();
        }
        for (key, kept) in outcomes.lock().unwrap().drain(..) {
            if kept {
                acked.push(key);
            } else {
                refused.push(key);
            }
        }
    }
    assert!(acked.len() > 100, "{} acknowledged", acked.len());
    assert!(!refused.is_empty(), "the disk never filled");
    let (mut child, addr) = spawn_server(&data).await;
    verify_kept(&c, &addr, &acked, &refused, &value).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// kill -9 of the registry: a TTL check that was passing is still passing after the
/// restart (its TTL has not run out), so the instance never leaves the passing set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_ttl_checks_passing_through_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(dir.path()).await;
    let c = client();
    let reg = br#"{"Name":"web","ID":"web1","Port":8080,"Check":{"TTL":"5m"}}"#;
    let (s, _) = call(
        &c,
        "PUT",
        format!("http://{addr}/v1/agent/service/register"),
        reg.to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    let (s, _) = call(
        &c,
        "PUT",
        format!("http://{addr}/v1/agent/check/pass/service:web1"),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    // The status reaches disk within about a second of the update.
    let saved = dir.path().join("registry/check-state.json");
    tessera_testkit::wait_until("TTL state saved", Duration::from_secs(60), || {
        let saved = saved.clone();
        async move { std::fs::read_to_string(&saved).is_ok_and(|s| s.contains("passing")) }
    })
    .await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();

    let (mut child, addr) = spawn_server(dir.path()).await;
    let (s, body) = call(
        &c,
        "GET",
        format!("http://{addr}/v1/health/service/web?passing"),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(check_status(&c, &addr, "service:web1").await, "passing");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// Mass-expiry protection against real frozen heartbeats: 8 instances heartbeat from
/// their own processes; 6 of them are SIGSTOPped for several TTLs. The registry holds
/// their expiry (and says so in /v1/agent/self) instead of emptying the passing set; after
/// SIGCONT protection ends, and two instances killed for real then expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_heartbeats_do_not_empty_the_passing_set() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = spawn_server(dir.path()).await;
    let c = client();
    let mut beaters = Vec::new();
    for i in 0..8 {
        let body = format!(
            r#"{{"Name":"hb","ID":"h{i}","Port":{},"Check":{{"TTL":"6s"}}}}"#,
            9000 + i
        );
        let (s, _) = call(
            &c,
            "PUT",
            format!("http://{addr}/v1/agent/service/register"),
            body.into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(s, 200);
        let script = format!(
            "while :; do curl -s -o /dev/null -X PUT http://{addr}/v1/agent/check/pass/service:h{i}; sleep 1; done"
        );
        beaters.push(
            Command::new("bash")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    let passing = |c: HttpClient, addr: String| async move {
        let (_, body) = call(
            &c,
            "GET",
            format!("http://{addr}/v1/health/service/hb?passing"),
            vec![],
        )
        .await
        .unwrap();
        serde_json::from_slice::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .len()
    };
    let protection = |c: HttpClient, addr: String| async move {
        let (_, body) = call(&c, "GET", format!("http://{addr}/v1/agent/self"), vec![])
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (
            v["MassExpiryProtection"]["Active"] == true,
            v["MassExpiryProtection"]["HeldChecks"]
                .as_u64()
                .unwrap_or(0),
        )
    };
    let protected = |c: HttpClient, addr: String| {
        let p = protection(c, addr);
        async move { p.await.0 }
    };
    tessera_testkit::wait_until("all 8 passing", Duration::from_secs(60), || {
        let n = passing(c.clone(), addr.clone());
        async move { n.await == 8 }
    })
    .await;
    for b in &beaters[..6] {
        tessera_testkit::signal(b.id().unwrap(), "STOP");
    }
    tessera_testkit::wait_until("protection to start", Duration::from_secs(60), || {
        protected(c.clone(), addr.clone())
    })
    .await;
    // The few that expired before it started are put back; none expires while it holds.
    tessera_testkit::wait_until("all 8 passing again", Duration::from_secs(60), || {
        let n = passing(c.clone(), addr.clone());
        async move { n.await == 8 }
    })
    .await;
    // Every frozen instance has reached its deadline and is held, none expired.
    tessera_testkit::wait_until(
        "all six frozen checks held",
        Duration::from_secs(60),
        || {
            let p = protection(c.clone(), addr.clone());
            async move { p.await.1 >= 6 }
        },
    )
    .await;
    assert_eq!(
        passing(c.clone(), addr.clone()).await,
        8,
        "an instance expired under protection"
    );
    for b in &beaters[..6] {
        tessera_testkit::signal(b.id().unwrap(), "CONT");
    }
    tessera_testkit::wait_until("protection to end", Duration::from_secs(60), || {
        let p = protected(c.clone(), addr.clone());
        async move { !p.await }
    })
    .await;
    // Two die for real: a few are below the threshold, so they expire.
    for b in &mut beaters[6..] {
        b.start_kill().unwrap();
        b.wait().await.unwrap();
    }
    tessera_testkit::wait_until("the two dead to expire", Duration::from_secs(60), || {
        let n = passing(c.clone(), addr.clone());
        async move { n.await == 6 }
    })
    .await;
    assert_eq!(check_status(&c, &addr, "service:h7").await, "critical");
    assert_eq!(check_status(&c, &addr, "service:h0").await, "passing");
    server.start_kill().unwrap();
    server.wait().await.unwrap();
}

/// The registry restarts (kill -9, then on the same address) while a gateway routes to a
/// TTL-checked service it discovered there: every request through the gateway succeeds
/// meanwhile, and afterwards the gateway still has the endpoint, watched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_restart_loses_the_gateway_no_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reg_addr = format!("127.0.0.1:{port}");
    let start_registry = || {
        Command::new(BIN)
            .args([
                "server",
                "--bind",
                &reg_addr,
                "--node",
                "proc-node",
                "--data-dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let c = client();
    let registry_up = |c: HttpClient, a: String| async move {
        matches!(
            call(&c, "GET", format!("http://{a}/v1/status/leader"), vec![]).await,
            Ok((200, _))
        )
    };
    let mut registry = start_registry();
    tessera_testkit::wait_until("registry up", Duration::from_secs(60), || {
        registry_up(c.clone(), reg_addr.clone())
    })
    .await;

    let (mut up, up_addr) = common::spawn_upstream("one").await;
    let up_port = up_addr.rsplit(':').next().unwrap().to_owned();
    let reg = format!(
        r#"{{"Name":"web","ID":"web1","Address":"127.0.0.1","Port":{up_port},"Check":{{"TTL":"60s"}}}}"#
    );
    let (s, _) = call(
        &c,
        "PUT",
        format!("http://{reg_addr}/v1/agent/service/register"),
        reg.into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    // One heartbeat, none after: through the restart the instance stays passing only
    // if the registry keeps its TTL status (saved within about a second).
    let pass = format!("http://{reg_addr}/v1/agent/check/pass/service:web1");
    assert_eq!(call(&c, "PUT", pass, vec![]).await.unwrap().0, 200);
    let saved = dir.path().join("registry/check-state.json");
    tessera_testkit::wait_until("TTL state saved", Duration::from_secs(60), || {
        let saved = saved.clone();
        async move { std::fs::read_to_string(&saved).is_ok_and(|s| s.contains("passing")) }
    })
    .await;
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!("[registry]\naddress = \"{reg_addr}\"\nwait = \"5s\"\n[[routes]]\nupstream = \"web\"\n[upstreams.web]\nservice = \"web\"\n"),
    )
    .unwrap();
    let common::Gateway {
        child: mut gw,
        addr: gw_addr,
        admin: gw_admin,
        ..
    } = common::spawn_gateway(&cfg).await;
    // Whether the gateway's discovery of `web` reaches the registry (its metric).
    let discovery_up = |up: bool| {
        let (c, a) = (c.clone(), gw_admin.clone());
        async move {
            let Ok((200, body)) = call(&c, "GET", format!("http://{a}/metrics"), vec![]).await
            else {
                return false;
            };
            let want = format!(
                "tessera_gateway_registry_up{{upstream=\"web\"}} {}",
                u8::from(up)
            );
            String::from_utf8_lossy(&body).lines().any(|l| l == want)
        }
    };
    // Traffic through the gateway while the registry dies and comes back.
    let traffic = Traffic::start(&c, &gw_addr).await;
    tessera_testkit::wait_until(
        "traffic before the kill",
        Duration::from_secs(60),
        traffic.past(20),
    )
    .await;
    registry.start_kill().unwrap(); // SIGKILL
    registry.wait().await.unwrap();
    tessera_testkit::wait_until("the gateway to notice", Duration::from_secs(60), || {
        discovery_up(false)
    })
    .await;
    tessera_testkit::wait_until(
        "traffic while the registry is down",
        Duration::from_secs(60),
        traffic.past(traffic.served() + 50),
    )
    .await;
    let mut registry = start_registry();
    tessera_testkit::wait_until("registry back", Duration::from_secs(60), || {
        registry_up(c.clone(), reg_addr.clone())
    })
    .await;
    // The gateway's watch has an answer from the restarted registry: what it serves
    // from now on is what that registry says.
    tessera_testkit::wait_until("discovery to reconnect", Duration::from_secs(60), || {
        discovery_up(true)
    })
    .await;
    tessera_testkit::wait_until(
        "traffic after the restart",
        Duration::from_secs(60),
        traffic.past(traffic.served() + 50),
    )
    .await;
    let failures = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "requests failed through the restart: {failures:?}"
    );
    // The instance is still passing on the restarted registry, and the gateway serves it.
    let (_, body) = call(
        &c,
        "GET",
        format!("http://{reg_addr}/v1/health/service/web?passing"),
        vec![],
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    let (s, _) = call(&c, "GET", format!("http://{gw_addr}/"), vec![])
        .await
        .unwrap();
    assert_eq!(s, 200);
    for child in [&mut gw, &mut up, &mut registry] {
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
}

async fn verify_kept(
    c: &HttpClient,
    addr: &str,
    acked: &[String],
    refused: &[String],
    value: &impl Fn(&str) -> String,
) {
    for key in acked {
        let (s, body) = call(c, "GET", format!("http://{addr}/v1/kv/{key}?raw"), vec![])
            .await
            .unwrap();
        assert_eq!(s, 200, "acknowledged {key} lost");
        assert_eq!(body, value(key).as_bytes(), "{key}");
    }
    for key in refused {
        let (s, _) = call(c, "GET", format!("http://{addr}/v1/kv/{key}"), vec![])
            .await
            .unwrap();
        assert_eq!(s, 404, "refused {key} is present");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(dir.path()).await;

    let (ok, out, err) = run_cli(&addr, &["kv", "put", "app/name", "shop"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, _) = run_cli(&addr, &["kv", "get", "app/name"]).await;
    assert!(ok);
    assert_eq!(out, "shop\n");
    run_cli(&addr, &["kv", "put", "app/db/url", "pg://x"]).await;
    let (_, out, _) = run_cli(&addr, &["kv", "ls", "app/"]).await;
    assert_eq!(out, "app/db/url\napp/name\n");
    let (ok, _, err) = run_cli(&addr, &["kv", "put", "app/name", "other", "--cas", "1"]).await;
    assert!(!ok && err.contains("CAS failed"), "{err}");
    let (ok, _, _) = run_cli(&addr, &["kv", "delete", "app", "--recurse"]).await;
    assert!(ok);
    let (ok, _, err) = run_cli(&addr, &["kv", "get", "app/name"]).await;
    assert!(!ok && err.contains("not found"), "{err}");

    let file = dir.path().join("web.json");
    std::fs::write(&file, r#"{"Name":"web","ID":"web-1","Port":8080,"Address":"127.0.0.1","Tags":["v1"],"Check":{"TTL":"30s","Status":"passing"}}"#).unwrap();
    let (ok, out, err) = run_cli(&addr, &["register", file.to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");
    let (_, out, _) = run_cli(&addr, &["services"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains("v1")),
        "{out}"
    );
    let (_, out, _) = run_cli(&addr, &["services", "web"]).await;
    let row = out
        .lines()
        .find(|l| l.starts_with("web-1"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("127.0.0.1:8080") && row.contains("passing"),
        "{row}"
    );

    std::fs::write(&file, r#"{"Name":"web","Check":{"TTL":"soon"}}"#).unwrap();
    let (ok, _, err) = run_cli(&addr, &["register", file.to_str().unwrap()]).await;
    assert!(!ok && err.contains("400") && err.contains("soon"), "{err}");
    let (ok, _, err) = run_cli("127.0.0.1:1", &["services"]).await;
    assert!(!ok && err.contains("cannot reach"), "{err}");

    // SIGTERM stops the server cleanly, even with a blocking query parked on it.
    let c = client();
    let (_, body) = call(
        &c,
        "GET",
        format!("http://{addr}/v1/health/service/web"),
        vec![],
    )
    .await
    .unwrap();
    assert!(!body.is_empty());
    let idx = index_of(&c, format!("http://{addr}/v1/catalog/services")).await;
    let parked = {
        let (c, addr) = (c.clone(), addr.clone());
        tokio::spawn(async move {
            let url = format!("http://{addr}/v1/catalog/services?index={idx}&wait=10m");
            call(&c, "GET", url, vec![]).await
        })
    };
    // Signal only once the server has the query parked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let url = format!("http://{addr}/v1/agent/metrics?format=prometheus");
        let (_, body) = call(&c, "GET", url, vec![]).await.unwrap();
        let text = String::from_utf8_lossy(&body).into_owned();
        if text
            .lines()
            .any(|l| l == "tessera_registry_blocking_queries 1")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "query never parked: {text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!parked.is_finished());
    // And with a live event subscription open: it ends instead of holding the shutdown.
    let sse = {
        let req = http::Request::builder()
            .uri(format!("http://{addr}/v1/streams/*/subscribe"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        tokio::spawn(async move { resp.into_body().collect().await.is_ok() })
    };
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    assert!(sse.await.unwrap(), "the subscription ended cleanly");
    let answer = parked.await.unwrap();
    assert!(
        matches!(answer, Ok((200, _))),
        "the parked query is answered, not dropped: {answer:?}"
    );
}

/// SIGTERM, then the exit, which must be a clean one within a generous deadline.
async fn stop_cleanly(child: &mut Child) {
    signal(child, "-TERM");
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

async fn check_status(c: &HttpClient, addr: &str, id: &str) -> String {
    let (_, body) = call(c, "GET", format!("http://{addr}/v1/agent/checks"), vec![])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v[id]["Status"].as_str().unwrap_or("").to_owned()
}

/// A real SIGSTOP longer than every TTL: on SIGCONT nothing expires at once; instances
/// that keep heartbeating stay passing, the silent ones expire one TTL later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_longer_than_ttl_does_not_mass_expire() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(dir.path()).await;
    let c = client();
    for i in 0..20 {
        let body =
            format!(r#"{{"Name":"ttl","ID":"t{i}","Check":{{"TTL":"4s","Status":"passing"}}}}"#);
        let (s, _) = call(
            &c,
            "PUT",
            format!("http://{addr}/v1/agent/service/register"),
            body.into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(s, 200);
    }
    signal(&child, "-STOP");
    // The stall itself: 2.5 TTLs. The TTL is seconds, so the heartbeat loop below beats
    // it even on a loaded machine.
    tokio::time::sleep(Duration::from_secs(10)).await;
    signal(&child, "-CONT");
    // Heartbeats queued behind the stall arrive now, for most of the instances (the
    // silent ones stay under the mass-expiry guard's threshold, a quarter).
    for i in 0..16 {
        let (s, _) = call(
            &c,
            "PUT",
            format!("http://{addr}/v1/agent/check/pass/service:t{i}"),
            vec![],
        )
        .await
        .unwrap();
        assert_eq!(s, 200);
    }
    for i in 16..20 {
        let st = check_status(&c, &addr, &format!("service:t{i}")).await;
        assert_eq!(st, "passing", "t{i} must not expire on wake-up");
    }
    // The silent ones expire one TTL after the stall; keep the others alive meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for i in 0..16 {
            call(
                &c,
                "PUT",
                format!("http://{addr}/v1/agent/check/pass/service:t{i}"),
                vec![],
            )
            .await
            .unwrap();
        }
        let mut critical = 0;
        for i in 16..20 {
            if check_status(&c, &addr, &format!("service:t{i}")).await == "critical" {
                critical += 1;
            }
        }
        if critical == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "silent instances never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..16 {
        assert_eq!(
            check_status(&c, &addr, &format!("service:t{i}")).await,
            "passing"
        );
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test]
async fn bad_config_file_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "datacentre = \"dc2\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["server", "--bind", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("datacentre"), "{err}");
}

/// Logs as text (no escape codes when stderr is not a terminal) or as JSON lines, chosen by
/// `--log-format` or `TESSERA_LOG_FORMAT`; a `TESSERA_LOG` that is not a filter is named
/// in a warning, and a failure at start is itself a log line.
#[tokio::test]
async fn logs_are_text_or_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "datacentre = \"dc2\"\n").unwrap();
    let run = |format: Option<(&'static str, &'static str)>| {
        let mut cmd = Command::new(BIN);
        if let Some(("flag", f)) = format {
            cmd.args(["--log-format", f]);
        }
        if let Some(("env", f)) = format {
            cmd.env("TESSERA_LOG_FORMAT", f);
        } else {
            cmd.env_remove("TESSERA_LOG_FORMAT");
        }
        cmd.args(["server", "--bind", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .env("TESSERA_LOG", "info,[");
        async move {
            let out = cmd.output().await.unwrap();
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };

    let text = run(None).await;
    assert!(!text.contains('\x1b'), "escape codes in a pipe: {text}");
    assert!(text.contains("TESSERA_LOG is not a filter"), "{text}");
    assert!(
        text.contains("error: ") && text.contains("datacentre"),
        "{text}"
    );

    for how in [("flag", "json"), ("env", "json")] {
        let json = run(Some(how)).await;
        let lines: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{how:?}: {l}: {e}")))
            .collect();
        let warn = lines
            .iter()
            .find(|l| l["level"] == "WARN")
            .unwrap_or_else(|| panic!("{how:?}: no warning: {json}"));
        assert!(
            warn["message"]
                .as_str()
                .unwrap()
                .contains("TESSERA_LOG is not a filter")
        );
        assert_eq!(warn["target"], "tessera::log");
        assert!(warn["timestamp"].as_str().is_some(), "{warn}");
        let error = lines.last().unwrap();
        assert_eq!(error["level"], "ERROR", "{json}");
        assert!(
            error["message"].as_str().unwrap().contains("datacentre"),
            "{error}"
        );
    }

    let out = Command::new(BIN)
        .args(["server", "--bind", "127.0.0.1:0"])
        .env("TESSERA_LOG_FORMAT", "xml")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'xml'") && err.contains("text, json"), "{err}");
}

/// `tessera gateway` with OpenTelemetry's variables: a request that brings a trace is
/// exported to the collector as spans of that trace, and its access-log line names the
/// trace and the gateway's span. The batch delay is an hour: the spans reach the collector
/// because a stopping gateway flushes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_request_is_exported_and_logged_with_its_trace() {
    let dir = tempfile::tempdir().unwrap();
    let collector = tessera_testkit::otlp::Collector::start().await;
    let (mut up, upstream) = common::spawn_upstream("one").await;
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!("[access_log]\nsample = 1.0\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{upstream}\"]\n"),
    )
    .unwrap();
    let common::Gateway {
        child: mut gw,
        addr,
        mut logs,
        ..
    } = common::spawn_gateway_with(
        &cfg,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "edge"),
            ("OTEL_BSP_SCHEDULE_DELAY", "3600000"),
        ],
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = http::Request::get(format!("http://{addr}/x"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), 200);
    let line = common::next_access_line(&mut logs).await;
    assert!(
        collector.spans().is_empty(),
        "exported before the batch delay"
    );
    stop_cleanly(&mut gw).await;
    let spans = collector.spans();
    assert_eq!(spans.len(), 2, "{spans:?}");
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(
        (server.trace_id.as_str(), server.service.as_str()),
        (trace, "edge")
    );
    assert_eq!(line["trace_id"], trace, "{line}");
    assert_eq!(line["span_id"], server.span_id.as_str(), "{line}");
    up.start_kill().unwrap();
}

/// `tessera server`'s registry API joins its callers' traces and starts none of its own:
/// a request with a sampled `traceparent` is a server span under it (named by its route),
/// one without is not recorded (clients poll the registry on their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_api_joins_its_callers_traces_only() {
    let dir = tempfile::tempdir().unwrap();
    let collector = tessera_testkit::otlp::Collector::start().await;
    let mut cmd = Command::new(BIN);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000");
    let (mut server, addr) =
        common::spawn_server_with(cmd, "127.0.0.1:0", dir.path(), &["--node", "n1"]).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let get = |traced: bool| {
        let mut req = http::Request::get(format!("http://{addr}/v1/catalog/services"));
        if traced {
            req = req.header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"));
        }
        client().request(req.body(Full::new(Bytes::new())).unwrap())
    };
    assert_eq!(get(false).await.unwrap().status(), 200);
    assert_eq!(get(true).await.unwrap().status(), 200);
    stop_cleanly(&mut server).await;
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "only the traced request: {spans:?}");
    let s = &spans[0];
    assert_eq!(
        (s.trace_id.as_str(), s.parent_id.as_str(), s.kind),
        (trace, "00f067aa0ba902b7", 2)
    );
    assert_eq!(s.name, "GET /v1/catalog/services");
    assert_eq!(s.service, "tessera-server");
}

/// `tessera gateway` as a process: it writes JSON access-log lines, reloads on SIGHUP
/// (with file watching off, so the signal is the only trigger) and exits on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let mut ups = Vec::new();
    let mut addrs = Vec::new();
    for id in ["one", "two"] {
        let (child, addr) = common::spawn_upstream(id).await;
        addrs.push(addr);
        ups.push(child);
    }
    let cfg = dir.path().join("gw.toml");
    let write = |upstream: &str| {
        std::fs::write(
            &cfg,
            format!("watch_config = false\n[access_log]\nsample = 1.0\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{upstream}\"]\n"),
        )
        .unwrap();
    };
    write(&addrs[0]);
    let common::Gateway {
        child: mut gw,
        addr,
        mut logs,
        ..
    } = common::spawn_gateway(&cfg).await;
    let c = client();
    let body = |b: Bytes| String::from_utf8_lossy(&b).into_owned();
    let (s, b) = call(&c, "GET", format!("http://{addr}/first?x=1"), vec![])
        .await
        .unwrap();
    assert_eq!((s, body(b)), (200, "hello from one\n".to_owned()));
    // With `access_log.sample = 1.0` every request is an event on the access target: with
    // `--log-format json`, one JSON object with the request's fields at the top level.
    let log = common::next_access_line(&mut logs).await;
    assert_eq!(log["path"], "/first");
    assert_eq!(log["status"], 200);
    assert_eq!(log["route"], "all");
    assert_eq!(log["upstream"], "u");
    assert_eq!(log["method"], "GET");
    assert_eq!(log["client"], "127.0.0.1");
    assert_eq!(log["level"], "INFO");
    assert!(log["duration_ms"].as_f64().is_some(), "{log}");
    assert!(
        log["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{log}"
    );

    write(&addrs[1]);
    signal(&gw, "-HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, b) = call(&c, "GET", format!("http://{addr}/"), vec![])
            .await
            .unwrap();
        if body(b) == "hello from two\n" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_cleanly(&mut gw).await;
    for mut u in ups {
        u.start_kill().unwrap();
        u.wait().await.unwrap();
    }
}

/// `tessera server --store etcd://...` as processes: two servers share one catalog, and
/// when one is killed with SIGKILL the other still has everything and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_etcd_survive_one_killed() {
    let Some(etcd) = tessera_testkit::EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let store = format!("etcd://{}", etcd.client_addrs().join(","));
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut s1, a1) = common::spawn_server(d1.path(), &["--node", "n1", "--store", &store]).await;
    let (_s2, a2) = common::spawn_server(d2.path(), &["--node", "n2", "--store", &store]).await;
    let c = client();
    let (st, _) = call(
        &c,
        "PUT",
        format!("http://{a1}/v1/kv/shared"),
        b"from-n1".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(st, 200);
    let def = d1.path().join("web.json");
    std::fs::write(&def, r#"{"Name":"web","ID":"web-1","Port":8080}"#).unwrap();
    let (ok, out, err) = run_cli(&a1, &["register", def.to_str().unwrap()]).await;
    assert!(ok, "{out}\n{err}");
    s1.start_kill().unwrap();
    s1.wait().await.unwrap();
    let (st, body) = call(&c, "GET", format!("http://{a2}/v1/kv/shared?raw"), vec![])
        .await
        .unwrap();
    assert_eq!((st, &body[..]), (200, &b"from-n1"[..]));
    let (st, body) = call(
        &c,
        "GET",
        format!("http://{a2}/v1/catalog/service/web"),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&body).contains("web-1"));
    let (st, _) = call(&c, "PUT", format!("http://{a2}/v1/kv/after"), b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(st, 200, "the survivor takes writes");
    // The CLI given both servers moves past the dead one.
    let (ok, out, err) = run_cli(&format!("{a1},{a2}"), &["kv", "get", "shared"]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.trim(), "from-n1");
}

/// Sequential GETs through a gateway (once it routes), until stopped: how many were
/// answered, by whom (the answer's first line), and every failure.
struct Traffic {
    served: Arc<std::sync::atomic::AtomicUsize>,
    by: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    async fn start(c: &HttpClient, gateway: &str) -> Traffic {
        tessera_testkit::wait_until("the gateway to route", Duration::from_secs(60), || {
            let (c, a) = (c.clone(), gateway.to_owned());
            async move {
                matches!(
                    call(&c, "GET", format!("http://{a}/"), vec![]).await,
                    Ok((200, _))
                )
            }
        })
        .await;
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let by = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let (c, a) = (c.clone(), gateway.to_owned());
            let (served, by, stop) = (served.clone(), by.clone(), stop.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                // Bounded; the test stops it far sooner.
                for _ in 0..1_000_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    match call(&c, "GET", format!("http://{a}/"), vec![]).await {
                        Ok((200, body)) => {
                            let first = String::from_utf8_lossy(&body)
                                .lines()
                                .next()
                                .unwrap_or_default()
                                .to_owned();
                            *by.lock().unwrap().entry(first).or_default() += 1;
                        }
                        other => failures.push(format!("{other:?}")),
                    }
                    served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                failures
            })
        };
        Traffic {
            served,
            by,
            stop,
            task,
        }
    }

    fn served(&self) -> usize {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A condition for `wait_until`: `n` requests made.
    fn past(&self, n: usize) -> impl FnMut() -> std::future::Ready<bool> + use<> {
        let served = self.served.clone();
        move || std::future::ready(served.load(std::sync::atomic::Ordering::Relaxed) >= n)
    }

    fn answered_by(&self, first_line: &str) -> usize {
        self.by
            .lock()
            .unwrap()
            .get(first_line)
            .copied()
            .unwrap_or(0)
    }

    /// Stops the traffic: its failures.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// A server frozen with SIGSTOP while another writes, and etcd compacts everything it
/// had not seen, catches up after SIGCONT: its view ends equal to the writer's, and a
/// blocking query parked on it before the pause is woken with the change (nothing a
/// waiter waits for is missed across a compaction), and it goes on following etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_catches_up_after_compaction() {
    let Some(etcd) = tessera_testkit::EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let store = format!("etcd://{}", etcd.client_addrs().join(","));
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_s1, a1) = common::spawn_server(d1.path(), &["--node", "n1", "--store", &store]).await;
    let (s2, a2) = common::spawn_server(d2.path(), &["--node", "n2", "--store", &store]).await;
    let c = client();
    for i in 0..10 {
        call(
            &c,
            "PUT",
            format!("http://{a1}/v1/kv/app/old{i}"),
            b"x".to_vec(),
        )
        .await
        .unwrap();
    }
    // A waiter parked on a2 before the pause, for up to 5 minutes.
    let before = index_of(&c, format!("http://{a2}/v1/kv/app/?keys&consistent")).await;
    let waiter = {
        let (c, a2) = (c.clone(), a2.clone());
        tokio::spawn(async move {
            call(
                &c,
                "GET",
                format!("http://{a2}/v1/kv/app/?keys&index={before}&wait=5m"),
                vec![],
            )
            .await
        })
    };
    tessera_testkit::wait_until("the waiter to park", Duration::from_secs(60), || {
        let (c, a2) = (c.clone(), a2.clone());
        async move {
            get_json(&c, &a2, "/v1/agent/metrics").await["Gauges"]
                .as_array()
                .is_some_and(|g| {
                    g.iter()
                        .any(|m| m["Name"] == "tessera.http.blocking_queries" && m["Value"] == 1.0)
                })
        }
    })
    .await;
    let pid = s2.id().unwrap();
    tessera_testkit::signal(pid, "STOP");
    // While it is frozen: new keys (about 3 MB of them), changed and deleted ones.
    let big = vec![b'v'; 3000];
    for i in 0..1000 {
        let (st, _) = call(
            &c,
            "PUT",
            format!("http://{a1}/v1/kv/app/new{i}"),
            big.clone(),
        )
        .await
        .unwrap();
        assert_eq!(st, 200);
    }
    for i in 0..5 {
        call(
            &c,
            "DELETE",
            format!("http://{a1}/v1/kv/app/old{i}"),
            vec![],
        )
        .await
        .unwrap();
    }
    let raw = tessera_etcd::Client::new(&etcd.client_addrs()).unwrap();
    let rev = raw.put(b"unrelated", b"", 0).await.unwrap().revision();
    raw.compact(rev).await.unwrap();
    tessera_testkit::signal(pid, "CONT");
    let keys = |addr: String| {
        let c = c.clone();
        async move {
            let (st, body) = call(&c, "GET", format!("http://{addr}/v1/kv/app/?keys"), vec![])
                .await
                .unwrap();
            assert_eq!(st, 200);
            serde_json::from_slice::<Vec<String>>(&body).unwrap()
        }
    };
    let want = keys(a1.clone()).await;
    assert_eq!(want.len(), 1005);
    let (st, body) = tokio::time::timeout(Duration::from_secs(60), waiter)
        .await
        .expect("the parked waiter was woken")
        .unwrap()
        .unwrap();
    assert_eq!(st, 200);
    let woke_with: Vec<String> = serde_json::from_slice(&body).unwrap();
    assert!(
        woke_with.len() > 10,
        "woken without the change: {woke_with:?}"
    );
    tessera_testkit::wait_until(
        "the paused server to catch up",
        Duration::from_secs(60),
        || {
            let (keys, a2, want) = (&keys, a2.clone(), want.clone());
            async move { keys(a2).await == want }
        },
    )
    .await;
    // And it goes on following etcd after the relisting: a new write reaches it.
    call(
        &c,
        "PUT",
        format!("http://{a1}/v1/kv/app/later"),
        b"x".to_vec(),
    )
    .await
    .unwrap();
    tessera_testkit::wait_until(
        "the caught-up server to see a later write",
        Duration::from_secs(60),
        || {
            let (keys, a2) = (&keys, a2.clone());
            async move { keys(a2).await.len() == 1006 }
        },
    )
    .await;
}

/// Waits until server `addr` lists `n` live servers.
async fn wait_peers(c: &HttpClient, addr: &str, n: usize, what: &str) {
    tessera_testkit::wait_until(what, Duration::from_secs(60), || {
        let (c, a) = (c.clone(), addr.to_owned());
        async move {
            get_json(&c, &a, "/v1/status/peers")
                .await
                .as_array()
                .map(Vec::len)
                == Some(n)
        }
    })
    .await;
}

/// `GET http://{addr}{path}` as JSON.
async fn get_json(c: &HttpClient, addr: &str, path: &str) -> serde_json::Value {
    match call(c, "GET", format!("http://{addr}{path}"), vec![]).await {
        Ok((200, body)) => serde_json::from_slice(&body).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

/// Three `tessera server`s on etcd, a gateway given all three, and three instances with
/// HTTP checks, under steady GET traffic through the gateway. Two servers are killed
/// with SIGKILL, one after the other:
/// - every check moves to the survivor: an instance killed afterwards turns critical,
///   which only the survivor can have written;
/// - the gateway's discovery moves to the survivor: an instance registered there gets
///   traffic;
/// - no request through the gateway fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_servers_move_their_checks_and_the_gateway_drops_nothing() {
    let Some(etcd) = tessera_testkit::EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let store = format!("etcd://{}", etcd.client_addrs().join(","));
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let node = format!("n{}", i + 1);
        servers.push(common::spawn_server(d.path(), &["--node", &node, "--store", &store]).await);
    }
    let addrs: Vec<String> = servers.iter().map(|(_, a)| a.clone()).collect();
    let (n1, n3) = (addrs[0].clone(), addrs[2].clone());
    let c = client();
    let register = |via: String, id: &'static str, up: String| {
        let c = c.clone();
        async move {
            let port = up.rsplit(':').next().unwrap().to_owned();
            let def = format!(
                r#"{{"Name":"web","ID":"{id}","Address":"127.0.0.1","Port":{port},
                    "Check":{{"HTTP":"http://{up}/","Interval":"1s","Timeout":"2s"}}}}"#
            );
            let (st, body) = call(
                &c,
                "PUT",
                format!("http://{via}/v1/agent/service/register"),
                def.into_bytes(),
            )
            .await
            .unwrap();
            assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        }
    };
    let mut ups = Vec::new();
    for id in ["one", "two", "three"] {
        let (child, addr) = common::spawn_upstream(id).await;
        register(n1.clone(), id, addr).await;
        ups.push(child);
    }
    let passing = |addr: String| {
        let c = c.clone();
        async move {
            get_json(&c, &addr, "/v1/health/service/web?passing")
                .await
                .as_array()
                .map_or(0, Vec::len)
        }
    };
    tessera_testkit::wait_until("three instances passing", Duration::from_secs(60), || {
        let p = passing(n3.clone());
        async move { p.await == 3 }
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[registry]\naddress = \"{}\"\nwait = \"5s\"\n\
             [[routes]]\nupstream = \"web\"\n[routes.retries]\nattempts = 2\n\
             [upstreams.web]\nservice = \"web\"\n",
            addrs.join(",")
        ),
    )
    .unwrap();
    let common::Gateway {
        child: mut gw,
        addr: gw_addr,
        ..
    } = common::spawn_gateway(&cfg).await;
    let traffic = Traffic::start(&c, &gw_addr).await;
    tessera_testkit::wait_until("traffic", Duration::from_secs(60), traffic.past(20)).await;
    for (i, left) in [(0, 2), (1, 1)] {
        servers[i].0.start_kill().unwrap(); // SIGKILL
        servers[i].0.wait().await.unwrap();
        // Its lease runs out (5 s) and the survivors see it gone.
        wait_peers(&c, &n3, left, "the killed server to leave").await;
        tessera_testkit::wait_until(
            "traffic after the kill",
            Duration::from_secs(60),
            traffic.past(traffic.served() + 50),
        )
        .await;
    }
    assert_eq!(passing(n3.clone()).await, 3, "the instances stay passing");

    // n3 is the only server left: it runs every check now.
    ups[2].start_kill().unwrap();
    ups[2].wait().await.unwrap();
    tessera_testkit::wait_until(
        "the survivor to fail web three's check",
        Duration::from_secs(60),
        || {
            let (c, a) = (c.clone(), n3.clone());
            async move {
                let v = get_json(&c, &a, "/v1/health/checks/web").await;
                v.as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|ch| ch["ServiceID"] == "three" && ch["Status"] == "critical")
                })
            }
        },
    )
    .await;

    // The gateway's discovery answers from the survivor: a new instance gets traffic.
    let (four, four_addr) = common::spawn_upstream("four").await;
    ups.push(four);
    register(n3.clone(), "four", four_addr).await;
    tessera_testkit::wait_until(
        "traffic to the new instance",
        Duration::from_secs(60),
        || {
            let n = traffic.answered_by("hello from four");
            async move { n >= 5 }
        },
    )
    .await;
    let failures = traffic.stop().await;
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    gw.start_kill().unwrap();
    for u in &mut ups {
        let _ = u.start_kill();
    }
}

/// `GET url` from inside `ns` (python3's urllib): (status, X-Consul-KnownLeader, body).
fn get_in_ns(ns: &tessera_testkit::Netns, url: &str) -> Option<(u16, String, String)> {
    let script = "import sys, urllib.request\n\
        r = urllib.request.urlopen(sys.argv[1], timeout=10)\n\
        print(r.status); print(r.headers.get('X-Consul-KnownLeader')); print(r.read().decode())";
    let out = ns
        .command("python3")
        .args(["-c", script, url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.splitn(3, '\n');
    Some((
        lines.next()?.trim().parse().ok()?,
        lines.next()?.trim().to_owned(),
        lines.next().unwrap_or_default().trim().to_owned(),
    ))
}

/// A server cut from etcd (its network namespace's link down) while the checks it owns
/// fail (its probes cannot reach the instances either):
/// - it still answers `?stale` reads from its view, with `X-Consul-KnownLeader: false`;
/// - its lease runs out and the other server takes its checks, which stay passing: none
///   of the failures it saw is ever written, also not after the link is back (its queued
///   status writes carry a lapsed fence);
/// - once back, it catches up with what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cut_from_etcd_serves_stale_reads_and_writes_no_status() {
    let Some(ns) = tessera_testkit::Netns::create_or_skip() else {
        return;
    };
    let Some(etcd) = tessera_testkit::EtcdCluster::start_on_or_skip(3, ns.host_ip()).await else {
        return;
    };
    let c = client();
    // Instances on the host side of the link: reachable from both servers until the cut.
    let mut ups = Vec::new();
    let mut up_addrs = Vec::new();
    for i in 0..6 {
        let mut child = Command::new(BIN)
            .args([
                "upstream",
                "--bind",
                &format!("{}:0", ns.host_ip()),
                "--id",
                &format!("u{i}"),
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stdout.take().unwrap(),
        ));
        let line = lines.next_line().await.unwrap().unwrap();
        up_addrs.push(line.split("http://").nth(1).unwrap().trim().to_owned());
        ups.push(child);
    }
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let in_ns = format!("etcd://{}", etcd.client_addrs_on(ns.host_ip()).join(","));
    let mut wrapped = tokio::process::Command::from(ns.command(BIN));
    wrapped.kill_on_drop(true);
    // Not on loopback, so ACLs would default to on: this test is about the network.
    let config = da.path().join("server.toml");
    std::fs::write(&config, "[acl]\nenabled = false\n").unwrap();
    let (_a, a) = common::spawn_server_with(
        wrapped,
        &format!("{}:0", ns.ip()),
        da.path(),
        &[
            "--node",
            "a",
            "--store",
            &in_ns,
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .await;
    let on_host = format!("etcd://{}", etcd.client_addrs().join(","));
    let (_b, b) = common::spawn_server(db.path(), &["--node", "b", "--store", &on_host]).await;
    for (i, up) in up_addrs.iter().enumerate() {
        let port = up.rsplit(':').next().unwrap();
        let def = format!(
            r#"{{"Name":"web","ID":"w{i}","Port":{port},
                "Check":{{"HTTP":"http://{up}/","Interval":"1s","Timeout":"1s"}}}}"#
        );
        let (st, _) = call(
            &c,
            "PUT",
            format!("http://{b}/v1/agent/service/register"),
            def.into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(st, 200);
    }
    tessera_testkit::wait_until("all six passing", Duration::from_secs(60), || {
        let c = c.clone();
        let b = b.clone();
        async move {
            get_json(&c, &b, "/v1/health/service/web?passing")
                .await
                .as_array()
                .map(Vec::len)
                == Some(6)
        }
    })
    .await;
    // Every check status change b sees, from now to the end.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (c, b, seen, stop) = (c.clone(), b.clone(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut index = 0;
            // Bounded; stopped by the test long before.
            for _ in 0..10_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let url = format!("http://{b}/v1/health/checks/web?index={index}&wait=2s");
                let Ok((200, body)) = call(&c, "GET", url.clone(), vec![]).await else {
                    continue;
                };
                index = index_of(&c, url).await;
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                for ch in v.as_array().unwrap() {
                    seen.lock()
                        .unwrap()
                        .push(ch["Status"].as_str().unwrap().to_owned());
                }
            }
        })
    };
    let key_url = format!("http://{a}/v1/kv/during?stale");
    tessera_testkit::wait_until("a to see the six", Duration::from_secs(60), || {
        let r = get_in_ns(&ns, &format!("http://{a}/v1/catalog/service/web"));
        async move {
            r.is_some_and(|(s, _, body)| {
                s == 200
                    && serde_json::from_str::<serde_json::Value>(&body)
                        .is_ok_and(|v| v.as_array().map(Vec::len) == Some(6))
            })
        }
    })
    .await;
    ns.cut();
    // a answers from its view, and says it has lost etcd.
    tessera_testkit::wait_until("a to say it lost etcd", Duration::from_secs(60), || {
        let r = get_in_ns(&ns, &format!("http://{a}/v1/catalog/service/web?stale"));
        async move { r.is_some_and(|(s, leader, _)| s == 200 && leader == "false") }
    })
    .await;
    let (_, _, body) = get_in_ns(&ns, &format!("http://{a}/v1/catalog/service/web?stale")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .map(Vec::len),
        Some(6)
    );
    // b sees a leave (its lease runs out) and runs every check, still passing.
    wait_peers(&c, &b, 1, "b alone").await;
    let (st, _) = call(
        &c,
        "PUT",
        format!("http://{b}/v1/kv/during"),
        b"written while a was away".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(st, 200);
    ns.heal();
    tessera_testkit::wait_until("a to catch up", Duration::from_secs(60), || {
        let r = get_in_ns(&ns, &key_url);
        async move { r.is_some_and(|(s, _, _)| s == 200) }
    })
    .await;
    wait_peers(&c, &b, 2, "a to rejoin").await;
    // Past a's queued writes: they go out first thing after the heal, before its probes.
    tessera_testkit::wait_until("a to know etcd again", Duration::from_secs(60), || {
        let r = get_in_ns(&ns, &format!("http://{a}/v1/catalog/service/web?stale"));
        async move { r.is_some_and(|(s, leader, _)| s == 200 && leader == "true") }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|s| s == "passing"),
        "a cut-off server's failures reached the catalog: {seen:?}"
    );
    assert_eq!(
        get_json(&c, &b, "/v1/health/service/web?passing")
            .await
            .as_array()
            .map(Vec::len),
        Some(6)
    );
}

/// An upstream whose `/slow` answers only once released; everything else at once.
async fn gated_upstream() -> (String, Arc<tokio::sync::Notify>, Arc<AtomicUsize>) {
    let release = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(AtomicUsize::new(0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (rel, arr) = (release.clone(), arrived.clone());
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (rel, arr) = (rel.clone(), arr.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (rel, arr) = (rel.clone(), arr.clone());
                        async move {
                            if req.uri().path() == "/slow" {
                                let released = rel.notified();
                                arr.fetch_add(1, Ordering::SeqCst);
                                released.await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(b"done"),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, release, arrived)
}

/// SIGTERM with a drain delay: `/readyz` turns 503 (and `tessera health` says not
/// ready) while the gateway goes on serving new requests; then it stops accepting, and
/// the request that was in flight all along still gets its answer before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigtermed_gateway_drains_then_finishes_what_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, release, arrived) = gated_upstream().await;
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!("drain_delay = \"10s\"\n[[routes]]\nname = \"all\"\nupstream = \"u\"\ntimeout = \"120s\"\n[upstreams.u]\nendpoints = [\"{upstream}\"]\n"),
    )
    .unwrap();
    let common::Gateway {
        child: mut gw,
        addr,
        admin,
        ..
    } = common::spawn_gateway(&cfg).await;
    let readyz = format!("http://{admin}/readyz");
    let health_args = ["health", "--url", readyz.as_str()];
    let health = || run_cli("127.0.0.1:1", &health_args);
    let (ok, out, err) = health().await;
    assert!(ok && out.starts_with("ready: 200"), "{out}{err}");
    let get = |path: &str| {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        client().request(req)
    };
    let in_flight = tokio::spawn(get("/slow"));
    tessera_testkit::wait_until(
        "the slow request reaches the upstream",
        Duration::from_secs(60),
        || async { arrived.load(Ordering::SeqCst) == 1 },
    )
    .await;

    signal(&gw, "-TERM");
    tessera_testkit::wait_until("/readyz answers 503", Duration::from_secs(60), || async {
        let req = http::Request::get(format!("http://{admin}/readyz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        matches!(client().request(req).await, Ok(r) if r.status() == 503)
    })
    .await;
    let (ok, _, err) = health().await;
    assert!(!ok && err.contains("not ready: 503 draining"), "{err}");
    // Still serving during the delay.
    assert_eq!(get("/fast").await.unwrap().status(), 200);

    // Then it stops accepting; what was in flight is answered before it exits.
    tessera_testkit::wait_until(
        "the gateway stops accepting",
        Duration::from_secs(60),
        || async { tokio::net::TcpStream::connect(&addr).await.is_err() },
    )
    .await;
    assert!(
        gw.try_wait().unwrap().is_none(),
        "it waits for the request in flight"
    );
    release.notify_waiters();
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"done"
    );
    let exit = tokio::time::timeout(Duration::from_secs(60), gw.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let (ok, _, err) = health().await;
    assert!(
        !ok && err.contains("/readyz"),
        "a stopped gateway is not ready: {err}"
    );
}

/// `tessera server --drain-delay`: after SIGTERM its `/readyz` answers 503 (and `tessera
/// health` says why) while it goes on answering the API, then it stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigtermed_server_answers_not_ready_while_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) =
        common::spawn_server(dir.path(), &["--node", "n1", "--drain-delay", "10s"]).await;
    let readyz = format!("http://{addr}/readyz");
    let health_args = ["health", "--url", readyz.as_str()];
    let (ok, out, err) = run_cli("127.0.0.1:1", &health_args).await;
    assert!(ok && out.starts_with("ready: 200"), "{out}{err}");
    let c = client();
    signal(&server, "-TERM");
    tessera_testkit::wait_until("/readyz answers 503", Duration::from_secs(60), || async {
        matches!(call(&c, "GET", readyz.clone(), vec![]).await, Ok((503, _)))
    })
    .await;
    let (ok, _, err) = run_cli("127.0.0.1:1", &health_args).await;
    assert!(!ok && err.contains("not ready: 503 draining"), "{err}");
    let (status, _) = call(
        &c,
        "GET",
        format!("http://{addr}/v1/catalog/services"),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "still serving while it drains");
    let exit = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A rolling restart under load: each replica of a service behind the gateway is sent
/// SIGTERM, waited for and started again, one at a time, while clients keep calling it
/// through the gateway. A replica leaves the registry and turns not-ready, serves on for
/// its drain delay, then finishes what it has: no request fails. The calls are POSTs
/// (sign-ups), which the gateway does not retry once a replica may have taken them. (With
/// no drain delay it passes here too: the gateway resends a request whose pooled
/// connection the stopping replica closed unread. The delay is for callers that do not,
/// and for Kubernetes' endpoints.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, registry) = spawn_server(&dir.path().join("server")).await;
    let shop_dir = dir.path().join("shop");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(common::spawn_shop("users", &registry, &shop_dir).await);
    }
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!("[registry]\naddress = \"{registry}\"\n[[routes]]\nname = \"register\"\npath = {{ prefix = \"/api/users/register\" }}\nupstream = \"users\"\nrewrite_prefix = \"/users/register\"\n[upstreams.users]\nservice = \"users\"\n"),
    )
    .unwrap();
    let gw = common::spawn_gateway(&cfg).await;
    let c = client();
    let passing = |n: usize| {
        let (c, url) = (
            c.clone(),
            format!("http://{registry}/v1/health/service/users?passing"),
        );
        async move {
            matches!(call(&c, "GET", url, vec![]).await,
                Ok((200, body)) if serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == n)))
        }
    };
    tessera_testkit::wait_until("two passing replicas", Duration::from_secs(60), || {
        passing(2)
    })
    .await;
    let register = format!("http://{}/api/users/register", gw.addr);
    let sign_up = move |c: HttpClient, who: String| {
        let url = register.clone();
        async move {
            let body = format!(r#"{{"email": "{who}@shop.test", "password": "password-123456"}}"#);
            call(&c, "POST", url, body.into_bytes()).await
        }
    };
    tessera_testkit::wait_until(
        "the gateway routes to users",
        Duration::from_secs(60),
        || async {
            matches!(
                sign_up(client(), format!("first-{}", fastrand::u64(..))).await,
                Ok((201, _))
            )
        },
    )
    .await;

    // Four clients, each signing up in a loop until told to stop (bounded: 2 minutes).
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, sign_up) = (stop.clone(), sign_up.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            let mut n = 0;
            while !stop.is_cancelled() && tokio::time::Instant::now() < deadline {
                n += 1;
                match sign_up(c.clone(), format!("c{i}-{n}")).await {
                    Ok((201, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    for replica in &mut replicas {
        stop_cleanly(replica).await;
        *replica = common::spawn_shop("users", &registry, &shop_dir).await;
        tessera_testkit::wait_until(
            "both replicas passing again",
            Duration::from_secs(60),
            || passing(2),
        )
        .await;
    }
    stop.cancel();
    let (mut ok, mut failed) = (0, Vec::new());
    for t in clients {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "load ran through both restarts: {ok} sign-ups");
}
