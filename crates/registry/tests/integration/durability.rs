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
    // Checks restart from their definition's Status, else critical (as Consul does);
    // the maintenance mark persists.
    assert_eq!(
        check_status(h, "service:w1").await.as_deref(),
        Some("warning")
    );
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
