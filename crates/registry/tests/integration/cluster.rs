//! Three registry servers sharing one catalog in a real 3-member etcd cluster: what is
//! written through one is read through the others, blocking queries wake across servers,
//! CAS and locks hold across them, and indexes are etcd revisions.

use axum::http::StatusCode;
use serde_json::json;
use tessera_testkit::EtcdCluster;

use crate::support::{TestServer, index_of, wait_for};

async fn three(etcd: &EtcdCluster) -> Vec<TestServer> {
    let endpoints = etcd.client_addrs();
    let mut out = Vec::new();
    for node in ["a", "b", "c"] {
        out.push(TestServer::start_etcd(&endpoints, node).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_catalog() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let s = three(&etcd).await;
    let (a, b, c) = (&s[0].http, &s[1].http, &s[2].http);

    // Every server's node is in the one catalog.
    let (_, _, nodes) = c.get("/v1/catalog/nodes").await;
    let mut names: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["Node"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);

    // Registered through a, seen through b and c at once (a returns after its own view
    // has it; b and c follow the same watch stream).
    a.register(json!({"Name": "web", "ID": "web-1", "Port": 8080}))
        .await;
    for h in [b, c] {
        wait_for("web on the other servers", || async {
            let (_, _, v) = h.get("/v1/catalog/service/web").await;
            v.as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    }
    let (_, _, v) = b.get("/v1/catalog/service/web").await;
    assert_eq!(
        (v[0]["ServiceID"].as_str(), v[0]["Node"].as_str()),
        (Some("web-1"), Some("a"))
    );

    // A blocking query on c wakes on a write through a.
    let (_, hd, _) = c.get("/v1/health/service/web").await;
    let index = index_of(&hd);
    let cc = c.clone();
    let waiter = tokio::spawn(async move {
        cc.get(&format!("/v1/health/service/web?index={index}&wait=60s"))
            .await
    });
    a.register(json!({"Name": "web", "ID": "web-2", "Port": 8081}))
        .await;
    let (_, hd, v) = waiter.await.unwrap();
    assert!(index_of(&hd) > index);
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");

    // KV: the index is etcd's revision; CAS holds across servers.
    let (st, ok) = a.put("/v1/kv/config/x", "1").await;
    assert_eq!((st, ok), (StatusCode::OK, json!(true)));
    // b may not have seen a's write yet: `?consistent` waits until it has.
    let (_, hd, v) = b.get("/v1/kv/config/x?consistent").await;
    let modify = v[0]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(index_of(&hd), modify);
    let raw = tessera_etcd::Client::new(&etcd.client_addrs()).unwrap();
    let kv = raw.get(b"tessera/k/config/x").await.unwrap().unwrap();
    assert_eq!(
        kv.mod_revision as u64, modify,
        "ModifyIndex is the etcd revision"
    );
    assert_eq!(
        c.put(&format!("/v1/kv/config/x?cas={modify}"), "2").await.1,
        json!(true)
    );
    assert_eq!(
        a.put(&format!("/v1/kv/config/x?cas={modify}"), "3").await.1,
        json!(false),
        "stale"
    );
    let (_, _, v) = a.get("/v1/kv/config/x?raw").await;
    assert_eq!(v, json!(2));

    // Locks across servers: one holder.
    let (_, sa) = a
        .put_json("/v1/session/create", json!({"LockDelay": "0s"}))
        .await;
    let (_, sb) = b
        .put_json("/v1/session/create", json!({"LockDelay": "0s"}))
        .await;
    let (sa, sb) = (sa["ID"].as_str().unwrap(), sb["ID"].as_str().unwrap());
    assert_eq!(
        a.put(&format!("/v1/kv/leader?acquire={sa}"), "a").await.1,
        json!(true)
    );
    assert_eq!(
        b.put(&format!("/v1/kv/leader?acquire={sb}"), "b").await.1,
        json!(false)
    );
    a.put(&format!("/v1/session/destroy/{sa}"), "").await;
    assert_eq!(
        b.put(&format!("/v1/kv/leader?acquire={sb}"), "b").await.1,
        json!(true)
    );

    // A TTL check runs on the server it was registered through; its status is written
    // to etcd, so every server answers the same health.
    a.register(json!({"Name": "api", "ID": "api-1", "Check": {"TTL": "30s"}}))
        .await;
    let (_, _, v) = c.get("/v1/health/service/api?passing").await;
    assert_eq!(v, json!([]), "a TTL check starts critical");
    let (st, _) = a.put("/v1/agent/check/pass/service:api-1", "").await;
    assert_eq!(st, StatusCode::OK);
    wait_for("api passing on c", || async {
        let (_, _, v) = c.get("/v1/health/service/api?passing").await;
        v.as_array().is_some_and(|v| v.len() == 1)
    })
    .await;

    // Deregistered through c, gone everywhere.
    let (st, _) = c
        .put(
            "/v1/catalog/deregister",
            json!({"Node": "a", "ServiceID": "web-1"}).to_string(),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    wait_for("web-1 gone from a", || async {
        let (_, _, v) = a.get("/v1/catalog/service/web").await;
        v.as_array().is_some_and(|v| v.len() == 1)
    })
    .await;
}

/// Concurrent writers on three servers to one key through CAS loops: every increment
/// lands exactly once, because each server's write compares the revision it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_counters_across_servers_lose_no_increment() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let s = three(&etcd).await;
    s[0].http.put("/v1/kv/counter", "0").await;
    let mut tasks = Vec::new();
    for (i, srv) in s.iter().enumerate() {
        for _ in 0..2 {
            let h = srv.http.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0;
                while done < 10 {
                    // `consistent`: this server may not have seen the first put yet.
                    let (_, _, v) = h.get("/v1/kv/counter?consistent").await;
                    let index = v[0]["ModifyIndex"].as_u64().unwrap();
                    let n: u64 = serde_json::from_str(
                        &String::from_utf8(
                            base64::Engine::decode(
                                &base64::engine::general_purpose::STANDARD,
                                v[0]["Value"].as_str().unwrap(),
                            )
                            .unwrap(),
                        )
                        .unwrap(),
                    )
                    .unwrap();
                    let (st, ok) = h
                        .put(&format!("/v1/kv/counter?cas={index}"), (n + 1).to_string())
                        .await;
                    assert_eq!(st, StatusCode::OK, "server {i}: {ok}");
                    if ok == json!(true) {
                        done += 1;
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, _, v) = s[1].http.get("/v1/kv/counter?raw").await;
    assert_eq!(v, json!(60), "6 writers × 10 increments");
}

/// A server that restarts lists the catalog from etcd: nothing is kept locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_lists_the_catalog_again() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let mut s = three(&etcd).await;
    s[0].http
        .register(json!({"Name": "api", "ID": "api-1"}))
        .await;
    s[0].http.put("/v1/kv/app/setting", "on").await;
    let b = s.remove(1).restart().await;
    let (_, _, v) = b.http.get("/v1/catalog/service/api").await;
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    let (_, _, v) = b.http.get("/v1/kv/app/setting?raw").await;
    assert_eq!(v, json!("on"));
}

/// `/v1/status/peers` lists the live servers and `/v1/status/leader` the oldest; a server
/// that stops leaves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_and_leader_are_the_live_servers() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let mut s = three(&etcd).await;
    let addrs: Vec<String> = s.iter().map(|x| x.addr.to_string()).collect();
    wait_for("three peers", || async {
        let (_, _, v) = s[2].http.get("/v1/status/peers").await;
        v.as_array().is_some_and(|p| p.len() == 3)
    })
    .await;
    let (_, _, peers) = s[2].http.get("/v1/status/peers").await;
    let mut got: Vec<String> = peers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let mut want = addrs.clone();
    want.sort();
    assert_eq!(got, want);
    let (_, _, leader) = s[1].http.get("/v1/status/leader").await;
    assert_eq!(leader, json!(addrs[0]), "the oldest member leads");
    s[0].stop().await;
    wait_for("the next oldest to lead", || async {
        let (_, _, leader) = s[2].http.get("/v1/status/leader").await;
        leader == json!(addrs[1])
    })
    .await;
    let (_, _, peers) = s[2].http.get("/v1/status/peers").await;
    assert_eq!(peers.as_array().map(Vec::len), Some(2));
}

/// With every etcd member down, a server keeps answering `?stale` (and default) reads
/// from its view, says it has lost contact (`X-Consul-KnownLeader: false`), and refuses
/// `?consistent` reads and writes with 503; once etcd is back, all of it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_stale_reads_go_on_and_say_so() {
    let Some(mut etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let s = three(&etcd).await;
    let b = &s[1].http;
    s[0].http.put("/v1/kv/app/mode", "blue").await;
    wait_for("b sees the key", || async {
        b.get("/v1/kv/app/mode").await.0 == StatusCode::OK
    })
    .await;
    let (_, hd, _) = b.get("/v1/kv/app/mode?consistent").await;
    assert_eq!(hd["x-consul-knownleader"], "true");
    for i in 0..3 {
        etcd.kill(i);
    }
    wait_for("b to notice it lost etcd", || async {
        let (_, hd, _) = b.get("/v1/kv/app/mode?stale").await;
        hd["x-consul-knownleader"] == "false"
    })
    .await;
    let (st, hd, v) = b.get("/v1/kv/app/mode?stale&raw").await;
    assert_eq!((st, v), (StatusCode::OK, json!("blue")));
    assert!(
        hd["x-consul-lastcontact"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 5_000
    );
    let (st, _, _) = b.get("/v1/kv/app/mode?consistent").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    let (st, _) = b.put("/v1/kv/app/mode", "green").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);

    etcd.restart_all(&[0, 1, 2]).await.unwrap();
    wait_for("writes to work again", || async {
        b.put("/v1/kv/app/mode", "green").await.0 == StatusCode::OK
    })
    .await;
    wait_for("b to know etcd again", || async {
        let (_, hd, _) = b.get("/v1/kv/app/mode").await;
        hd["x-consul-knownleader"] == "true"
    })
    .await;
    let (_, _, v) = s[2].http.get("/v1/kv/app/mode?consistent&raw").await;
    assert_eq!(v, json!("green"));
}

/// A TTL session is ended by the leader only, and renewals through any server reach it:
/// created on c, renewed through b, it outlives its creation-time deadline (2 × TTL),
/// then ends once renewals stop, with its lock released everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_renewals_through_any_server_keep_it_alive() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let s = three(&etcd).await;
    let (b, c) = (&s[1].http, &s[2].http);
    let (_, v) = c
        .put_json(
            "/v1/session/create",
            json!({"TTL": "10s", "LockDelay": "0s"}),
        )
        .await;
    let id = v["ID"].as_str().unwrap().to_owned();
    assert_eq!(
        c.put(&format!("/v1/kv/lead?acquire={id}"), "c").await.1,
        json!(true)
    );
    let start = tokio::time::Instant::now();
    for at in [5, 15] {
        tokio::time::sleep_until(start + std::time::Duration::from_secs(at)).await;
        let (st, _) = b.put(&format!("/v1/session/renew/{id}"), "").await;
        assert_eq!(st, StatusCode::OK, "renewed at {at} s");
    }
    // Past the deadline the creation alone set (20 s), before the renewed one (35 s).
    tokio::time::sleep_until(start + std::time::Duration::from_secs(25)).await;
    let (_, _, v) = s[0].http.get(&format!("/v1/session/info/{id}")).await;
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(1),
        "ended despite renewals: {v}"
    );
    wait_for("the leader to end the session", || async {
        let (_, _, v) = b.get(&format!("/v1/session/info/{id}")).await;
        v == json!([])
    })
    .await;
    let (_, _, v) = c.get("/v1/kv/lead").await;
    assert!(v[0].get("Session").is_none(), "{v}");
}

/// TTL checks on N servers: any server takes a heartbeat, for a check registered through
/// any other, and the leader expires checks whose heartbeats stop, also when the server
/// they were registered through is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_heartbeats_go_to_any_server_and_the_leader_expires() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let mut s = three(&etcd).await;
    s[2].http
        .register(json!({"Name": "api", "ID": "api-1", "Check": {"TTL": "10s"}}))
        .await;
    let passing = |h: crate::support::Http| async move {
        let (_, _, v) = h.get("/v1/health/service/api?passing").await;
        v.as_array().map_or(0, Vec::len)
    };
    // Registered through c (node c), heartbeats through b, c then stopped.
    let (st, _) = s[1]
        .http
        .put("/v1/agent/check/pass/service:api-1", "")
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(passing(s[1].http.clone()).await, 1);
    s[2].stop().await;
    let start = tokio::time::Instant::now();
    // A client heartbeating every 2 s for 14 s: longer than the 10 s TTL, each beat well
    // within it. The pause is the client's heartbeat cadence, not a wait for a result.
    while start.elapsed() < std::time::Duration::from_secs(14) {
        let (st, _) = s[1]
            .http
            .put("/v1/agent/check/pass/service:api-1", "")
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            passing(s[0].http.clone()).await,
            1,
            "expired despite heartbeats through b"
        );
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    // Heartbeats stop: the leader (a) expires it.
    wait_for("the TTL check to expire", || async {
        passing(s[0].http.clone()).await == 0
    })
    .await;
    let (_, _, v) = s[1].http.get("/v1/health/checks/api").await;
    assert_eq!(v[0]["Status"], "critical", "{v}");
    assert!(
        v[0]["Output"].as_str().unwrap().contains("TTL expired"),
        "{v}"
    );
}

/// `DeregisterCriticalServiceAfter` on N servers: the leader reaps a service registered
/// through another server once its check has been critical long enough, also after that
/// server is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_reaps_services_critical_too_long() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let mut s = three(&etcd).await;
    s[2].http
        .register(json!({"Name": "gone", "ID": "gone-1",
            "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "2s"}}))
        .await;
    s[2].stop().await;
    // A TTL check starts critical and this one is never heartbeated: 2 s later the leader
    // (a) reaps it; c, the only server that used to, is gone.
    wait_for("the service to be reaped", || async {
        let (_, _, v) = s[0].http.get("/v1/catalog/service/gone").await;
        v == json!([])
    })
    .await;
    let (_, _, v) = s[1].http.get("/v1/catalog/service/gone?consistent").await;
    assert_eq!(v, json!([]));
}

/// `etcd+https://`: two servers on etcd members that serve TLS and demand client
/// certificates share one catalog; a server without the CA file is refused at start
/// with a message naming what it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_reach_etcd_over_tls_with_client_certificates() {
    let Some(etcd) = EtcdCluster::start_tls_or_skip(1).await else {
        return;
    };
    let t = etcd.tls().unwrap().clone();
    let store = format!("etcd+https://{}", etcd.client_addrs().join(","));
    let start = |node: &'static str| {
        let (t, store) = (t.clone(), store.clone());
        TestServer::start_with(move |c| {
            c.node_name = node.into();
            c.store = store;
            c.etcd_ca_file = Some(t.ca.clone());
            c.etcd_cert_file = Some(t.cert.clone());
            c.etcd_key_file = Some(t.key.clone());
        })
    };
    let a = start("a").await;
    let b = start("b").await;
    a.http
        .register(json!({"Name": "web", "ID": "web-1", "Port": 8080}))
        .await;
    let (_, _, v) = b.http.get("/v1/catalog/service/web?consistent").await;
    assert_eq!(v[0]["ServiceID"], "web-1", "{v}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = tessera_registry::Config {
        data_dir: dir.path().into(),
        store: store.clone(),
        ..Default::default()
    };
    let Err(e) = tessera_registry::Server::open(config, &listener).await else {
        panic!("a server without the CA file started");
    };
    assert!(e.to_string().contains("etcd_ca_file"), "{e}");
}
