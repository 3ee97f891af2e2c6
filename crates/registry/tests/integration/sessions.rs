//! Sessions and KV locks: over HTTP on a real server, and their clocks (TTL, lock delay,
//! a critical check) on tokio's paused clock.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use tessera_core::Health;
use tessera_registry::Registry;
use tessera_registry::acl::Authz;
use tessera_registry::defs::{ServiceDef, parse_json};
use tessera_registry::sessions::{Lock, SessionCreate};
use tokio::time::sleep;

use crate::support::{TestServer, index_of};
use crate::timing::registry;

async fn session(http: &crate::support::Http, body: serde_json::Value) -> String {
    let (s, v) = http.put_json("/v1/session/create", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["ID"].as_str().unwrap().to_owned()
}

/// Two contenders for one key: only one holds it; the holder's session ending hands it
/// over (after the lock delay), and a `delete` session takes its keys with it.
#[tokio::test]
async fn one_holder_at_a_time_and_sessions_end_cleanly() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    let a = session(h, json!({"Name": "a", "LockDelay": "0s"})).await;
    let b = session(h, json!({"Name": "b", "LockDelay": "0s"})).await;
    assert_eq!(
        h.put(&format!("/v1/kv/leader?acquire={a}"), "a").await.1,
        true
    );
    assert_eq!(
        h.put(&format!("/v1/kv/leader?acquire={b}"), "b").await.1,
        false
    );
    assert_eq!(
        h.put(&format!("/v1/kv/leader?release={b}"), "b").await.1,
        false,
        "not b's"
    );
    let (_, _, v) = h.get("/v1/kv/leader").await;
    assert_eq!(
        (v[0]["Session"].as_str(), v[0]["LockIndex"].as_u64()),
        (Some(a.as_str()), Some(1))
    );
    // Acquiring again while holding: the value changes, the lock index does not.
    assert_eq!(
        h.put(&format!("/v1/kv/leader?acquire={a}"), "a2").await.1,
        true
    );
    let (_, _, v) = h.get("/v1/kv/leader").await;
    assert_eq!(v[0]["LockIndex"], 1);
    assert_eq!(
        h.put(&format!("/v1/kv/leader?release={a}"), "").await.1,
        true
    );
    assert_eq!(
        h.put(&format!("/v1/kv/leader?acquire={b}"), "b").await.1,
        true
    );
    let (_, _, v) = h.get("/v1/kv/leader").await;
    assert_eq!(
        (v[0]["Session"].as_str(), v[0]["LockIndex"].as_u64()),
        (Some(b.as_str()), Some(2))
    );

    // b's session ends: the key is released, not deleted, and a can take it.
    let (_, _, before) = h.get("/v1/session/list").await;
    assert_eq!(before.as_array().unwrap().len(), 2);
    assert_eq!(h.put(&format!("/v1/session/destroy/{b}"), "").await.1, true);
    let (_, _, v) = h.get("/v1/kv/leader").await;
    assert!(v[0].get("Session").is_none(), "{v}");
    assert_eq!(
        h.put(&format!("/v1/kv/leader?acquire={a}"), "a").await.1,
        true
    );
    let (s, _, info) = h.get(&format!("/v1/session/info/{b}")).await;
    assert_eq!((s, info), (StatusCode::OK, json!([])));

    // A `delete` session's keys go with it.
    let d = session(h, json!({"Behavior": "delete", "LockDelay": "0s"})).await;
    assert_eq!(
        h.put(&format!("/v1/kv/ephemeral?acquire={d}"), "x").await.1,
        true
    );
    h.put(&format!("/v1/session/destroy/{d}"), "").await;
    let (s, _, _) = h.get("/v1/kv/ephemeral").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The default lock delay (15 s) keeps a released key from a new holder at once.
    let slow = session(h, json!({})).await;
    assert_eq!(
        h.put(&format!("/v1/kv/delayed?acquire={slow}"), "x")
            .await
            .1,
        true
    );
    h.put(&format!("/v1/session/destroy/{slow}"), "").await;
    assert_eq!(
        h.put(&format!("/v1/kv/delayed?acquire={a}"), "x").await.1,
        false
    );

    // Bad input is named.
    let (s, v) = h.put("/v1/kv/x?acquire=no-such-session", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = h.put_json("/v1/session/create", json!({"TTL": "1s"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = h
        .put_json("/v1/session/create", json!({"NodeChecks": ["nope"]}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = h.put("/v1/session/renew/no-such-session", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A blocking query on the session list wakes when a session is made.
#[tokio::test]
async fn session_listings_block_until_a_change() {
    let srv = TestServer::start().await;
    let (_, hd, _) = srv.http.get("/v1/session/list").await;
    let index = index_of(&hd);
    let h = srv.http.clone();
    let waiter = tokio::spawn(async move {
        h.get(&format!("/v1/session/list?index={index}&wait=60s"))
            .await
    });
    let id = session(&srv.http, json!({"Name": "w"})).await;
    let (_, hd, v) = waiter.await.unwrap();
    assert!(index_of(&hd) > index);
    assert_eq!(v[0]["ID"], id.as_str());
    let (_, _, node) = srv
        .http
        .get(&format!(
            "/v1/session/node/{}",
            v[0]["Node"].as_str().unwrap()
        ))
        .await;
    assert_eq!(node.as_array().unwrap().len(), 1);
}

async fn create(reg: &Registry, body: &str) -> String {
    let req: SessionCreate = parse_json(body.as_bytes()).unwrap();
    reg.session_create(req, &Authz::Management).await.unwrap()
}

async fn acquire(reg: &Registry, key: &str, id: &str) -> bool {
    reg.kv_put(
        key.into(),
        b"v".to_vec(),
        None,
        None,
        Some(Lock::Acquire(id.into())),
        &Authz::Management,
    )
    .await
    .unwrap()
}

fn holder(reg: &Registry, key: &str) -> Option<String> {
    reg.read(|st| st.kv.get(key).and_then(|e| e.session.clone()))
}

fn exists(reg: &Registry, id: &str) -> bool {
    reg.read(|st| st.sessions.contains_key(id))
}

/// A TTL session lives while renewed, and ends (releasing its key) within twice its TTL
/// of the last renewal, as Consul's contract allows; the lock delay then holds the key.
#[tokio::test(start_paused = true)]
async fn an_unrenewed_session_ends_and_its_lock_delay_holds_the_key() {
    let reg = registry().await;
    let id = create(&reg, r#"{"TTL":"10s","LockDelay":"5s"}"#).await;
    assert!(acquire(&reg, "lead", &id).await);
    for _ in 0..5 {
        sleep(Duration::from_secs(15)).await;
        assert!(
            reg.session_renew(&id, &Authz::Management)
                .await
                .unwrap()
                .is_some()
        );
    }
    assert!(exists(&reg, &id), "renewed every 15 s, within 2 × TTL");
    sleep(Duration::from_secs(21)).await;
    assert!(!exists(&reg, &id), "ended after 2 × TTL without a renewal");
    assert_eq!(holder(&reg, "lead"), None);
    let next = create(&reg, r#"{"LockDelay":"0s"}"#).await;
    assert!(
        !acquire(&reg, "lead", &next).await,
        "in the ended session's lock delay"
    );
    sleep(Duration::from_secs(5)).await;
    assert!(acquire(&reg, "lead", &next).await);
    assert!(
        reg.session_renew(&id, &Authz::Management)
            .await
            .unwrap()
            .is_none()
    );
}

/// A session bound to a check ends when the check goes critical.
#[tokio::test(start_paused = true)]
async fn a_critical_check_ends_its_sessions() {
    let reg = registry().await;
    let def: ServiceDef = parse_json(br#"{"Name":"web","ID":"w1","Check":{"TTL":"10s"}}"#).unwrap();
    reg.register_service(def, false, &Authz::Management)
        .await
        .unwrap();
    reg.update_ttl(
        "service:w1",
        Health::Passing,
        String::new(),
        &Authz::Management,
    )
    .unwrap();
    let id = create(
        &reg,
        r#"{"ServiceChecks":[{"ID":"service:w1"}],"LockDelay":"0s"}"#,
    )
    .await;
    assert!(acquire(&reg, "lead", &id).await);
    sleep(Duration::from_secs(5)).await;
    assert!(exists(&reg, &id));
    // The service stops heartbeating: its check expires, and the session with it.
    sleep(Duration::from_secs(7)).await;
    assert_eq!(reg.check_status("service:w1"), Some(Health::Critical));
    assert!(!exists(&reg, &id));
    assert_eq!(holder(&reg, "lead"), None);
    // A session cannot be made on a critical check.
    let req: SessionCreate = parse_json(br#"{"ServiceChecks":[{"ID":"service:w1"}]}"#).unwrap();
    assert!(reg.session_create(req, &Authz::Management).await.is_err());
}
