//! What survives a restart: registrations, check definitions, KV, the node's identity;
//! and the log compaction that keeps restarts fast.

use http::StatusCode;
use serde_json::json;

use crate::support::{TestServer, check_status, index_of, wait_for};

#[tokio::test]
async fn restart_keeps_everything() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    h.register(json!({"Name": "web", "ID": "w1", "Port": 80, "Tags": ["a"],
        "Check": {"TTL": "30s", "Status": "warning"}}))
        .await;
    h.register(json!({"Name": "web", "ID": "w2", "Port": 81, "Check": {"TTL": "30s"}}))
        .await;
    h.register(json!({"Name": "gone", "ID": "g1"})).await;
    h.put("/v1/agent/service/deregister/g1", "").await;
    h.put("/v1/agent/check/pass/service:w2", "").await;
    h.put("/v1/agent/service/maintenance/w1?enable=true&reason=r", "")
        .await;
    h.put("/v1/kv/cfg/a?flags=7", "alpha").await;
    h.put("/v1/kv/cfg/b", "beta").await;
    h.delete("/v1/kv/cfg/b").await;
    let (_, _, node_before) = h.get("/v1/catalog/nodes").await;
    let (_, hd, _) = h.get("/v1/kv/cfg/a").await;
    let kv_index = index_of(&hd);

    let srv = srv.restart().await;
    let h = &srv.http;
    let (_, _, v) = h.get("/v1/agent/services").await;
    let mut ids: Vec<&String> = v.as_object().unwrap().keys().collect();
    ids.sort();
    assert_eq!(ids, vec!["w1", "w2"]);
    assert_eq!(v["w1"]["Tags"], json!(["a"]));
    let (_, _, v) = h.get("/v1/kv/cfg/a").await;
    assert_eq!(v[0]["Flags"], 7);
    assert_eq!(v[0]["ModifyIndex"].as_u64().unwrap(), kv_index);
    assert_eq!(h.get("/v1/kv/cfg/b").await.0, StatusCode::NOT_FOUND);
    let (_, _, node_after) = h.get("/v1/catalog/nodes").await;
    assert_eq!(
        node_before[0]["ID"], node_after[0]["ID"],
        "node ID is stable"
    );
    // Checks restart from their definition's Status, else critical, but a TTL check
    // keeps its last status until its TTL runs out (as Consul does); the maintenance mark
    // persists.
    assert_eq!(
        check_status(h, "service:w1").await.as_deref(),
        Some("warning")
    );
    assert_eq!(
        check_status(h, "service:w2").await.as_deref(),
        Some("passing")
    );
    h.put("/v1/agent/check/fail/service:w2", "").await;
    assert_eq!(
        check_status(h, "service:w2").await.as_deref(),
        Some("critical")
    );
    assert_eq!(
        check_status(h, "_service_maintenance:w1").await.as_deref(),
        Some("critical")
    );
    // And they run again: a TTL pass works.
    h.put("/v1/agent/check/pass/service:w2", "").await;
    assert_eq!(
        check_status(h, "service:w2").await.as_deref(),
        Some("passing")
    );
    // The index keeps growing across restarts.
    h.put("/v1/kv/cfg/c", "gamma").await;
    let (_, hd, _) = h.get("/v1/kv/cfg/c").await;
    assert!(index_of(&hd) > kv_index);
}

/// A TTL status is kept only until its TTL would have run out: one that ended while the
/// registry was down comes back critical.
#[tokio::test]
async fn a_ttl_status_that_ran_out_while_down_is_not_restored() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    h.register(json!({"Name": "web", "ID": "short", "Check": {"TTL": "2s"}}))
        .await;
    h.register(json!({"Name": "web", "ID": "long", "Check": {"TTL": "5m"}}))
        .await;
    h.put("/v1/agent/check/pass/service:short", "").await;
    h.put("/v1/agent/check/warn/service:long", "").await;
    let mut srv = srv;
    srv.stop().await;
    // Until the short TTL has ended by the wall clock, as saved at shutdown.
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(srv.data_dir.join("registry/check-state.json")).unwrap(),
    )
    .unwrap();
    let expires_ms = saved["service:short"]["expires_ms"].as_u64().unwrap();
    crate::support::wait_for("the short TTL to end", || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        now > u128::from(expires_ms)
    })
    .await;
    let srv = srv.restart().await;
    let h = &srv.http;
    assert_eq!(
        check_status(h, "service:short").await.as_deref(),
        Some("critical")
    );
    assert_eq!(
        check_status(h, "service:long").await.as_deref(),
        Some("warning")
    );
}

#[tokio::test]
async fn compaction_keeps_state_and_shrinks_the_log() {
    let srv = TestServer::start_with(|c| c.snapshot_after_bytes = 16 * 1024).await;
    let h = &srv.http;
    for i in 0..300 {
        h.put(&format!("/v1/kv/k{}", i % 50), format!("value-{i}"))
            .await;
    }
    h.register(json!({"Name": "web", "ID": "w1"})).await;
    let wal = srv.data_dir.join("registry/wal.log");
    let snap = srv.data_dir.join("registry/snapshot.bin");
    wait_for("snapshot written", || async { snap.exists() }).await;
    let wal_len = std::fs::metadata(&wal).unwrap().len();
    assert!(wal_len < 32 * 1024, "log was compacted: {wal_len} bytes");

    let srv = srv.restart().await;
    let h = &srv.http;
    for k in 0..50 {
        let (s, _, v) = h.get(&format!("/v1/kv/k{k}")).await;
        assert_eq!(s, StatusCode::OK);
        let last = (0..300).filter(|i| i % 50 == k).max().unwrap();
        let want = base64_of(&format!("value-{last}"));
        assert_eq!(v[0]["Value"], want, "k{k}");
    }
    let (_, _, v) = h.get("/v1/agent/services").await;
    assert!(v.get("w1").is_some());
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The data dir on a real 3 MiB tmpfs, filled with 20 KB KV values: a refused write
/// answers 507 naming ENOSPC, is never visible (reads, blocking queries, indexes), and is
/// absent after a restart; once room returns, writes go on without a restart.
#[tokio::test]
async fn a_full_disk_shows_nothing_it_did_not_keep() {
    let Some(disk) = tessera_testkit::Tmpfs::mount_or_skip(3 << 20) else {
        return;
    };
    // Ballast, removed later to give the disk room again.
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 512 * 1024]).unwrap();
    let srv = TestServer::start_in(disk.path().join("data"), |_| {}).await;
    let h = &srv.http;
    let value = |i: usize| format!("{i:05}-{}", "v".repeat(20_000));
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    let mut watch = None;
    for i in 0..400 {
        let (s, body) = h.put(&format!("/v1/kv/fill/{i}"), value(i)).await;
        match s {
            StatusCode::OK => {
                assert!(refused.is_empty(), "write {i} kept after a refusal");
                kept.push(i);
            }
            StatusCode::INSUFFICIENT_STORAGE => {
                assert_eq!(body["code"], "storage_full", "{body}");
                let msg = body["error"].as_str().unwrap();
                assert!(msg.contains("ENOSPC"), "{msg}");
                if refused.is_empty() {
                    // A blocking query from the last kept index must not be woken by
                    // the writes refused from here on.
                    let (_, hd, _) = h.get("/v1/kv/fill/?recurse").await;
                    let index = index_of(&hd);
                    let w = h.clone();
                    watch = Some((
                        index,
                        tokio::spawn(async move {
                            let (_, hd, v) = w
                                .get(&format!("/v1/kv/fill/?recurse&index={index}&wait=2s"))
                                .await;
                            (index_of(&hd), v.as_array().map_or(0, Vec::len))
                        }),
                    ));
                }
                refused.push(i);
                if refused.len() == 10 {
                    break;
                }
            }
            other => panic!("write {i}: {other} {body}"),
        }
    }
    assert!(kept.len() > 20, "kept only {}", kept.len());
    assert_eq!(refused.len(), 10, "the disk never filled");
    let (index, watch) = watch.unwrap();
    assert_eq!(watch.await.unwrap(), (index, kept.len()));
    for &i in &refused {
        let (s, _, _) = h.get(&format!("/v1/kv/fill/{i}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "refused key {i} is visible");
    }
    let (s, _, v) = h.get("/v1/kv/fill/?keys").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), kept.len());
    // Registrations are writes too (bigger than the slack in the log's last page);
    // reads go on serving.
    let filler = disk.fill();
    let meta: serde_json::Map<String, serde_json::Value> = (0..20)
        .map(|i| (format!("k{i}"), json!("m".repeat(500))))
        .collect();
    let (s, body) = h
        .put_json(
            "/v1/agent/service/register",
            json!({"Name": "web", "ID": "w1", "Meta": meta}),
        )
        .await;
    assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    let (s, _, v) = h.get("/v1/agent/services").await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.get("w1").is_none());

    // Room again: writes resume without a restart.
    std::fs::remove_file(&ballast).unwrap();
    disk.free(&filler);
    let (s, body) = h.put("/v1/kv/after", "room again").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    h.register(json!({"Name": "web", "ID": "w1"})).await;

    let srv = srv.restart().await;
    let h = &srv.http;
    let (_, _, v) = h.get("/v1/kv/fill/?keys").await;
    let want: Vec<String> = {
        let mut k: Vec<String> = kept.iter().map(|i| format!("fill/{i}")).collect();
        k.sort();
        k
    };
    assert_eq!(v, json!(want));
    for &i in kept.iter().step_by(7) {
        let (_, _, v) = h.get(&format!("/v1/kv/fill/{i}?raw")).await;
        assert_eq!(v, json!(value(i)));
    }
    assert_eq!(h.get("/v1/kv/after?raw").await.2, json!("room again"));
    assert!(h.get("/v1/agent/services").await.2.get("w1").is_some());
}
