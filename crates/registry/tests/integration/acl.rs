//! ACLs: bootstrap, policies, tokens from each place a client may put them, allow/deny.

use http::{Method, StatusCode};
use serde_json::json;

use crate::support::TestServer;

#[tokio::test]
async fn acl_allow_and_deny() {
    let srv = TestServer::start_with(|c| c.acl.enabled = Some(true)).await;
    let anon = &srv.http;

    // Anonymous: default deny.
    let (s, v) = anon.put("/v1/kv/app/x", "1").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(v.as_str().unwrap().starts_with("Permission denied"), "{v}");
    let (s, _) = anon
        .put_json("/v1/agent/service/register", json!({"Name": "web"}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, v) = anon.get("/v1/catalog/services").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({}), "reads are filtered, not refused");

    // Bootstrap once.
    let (s, boot) = anon.put("/v1/acl/bootstrap", "").await;
    assert_eq!(s, StatusCode::OK, "{boot}");
    let root = boot["SecretID"].as_str().unwrap().to_owned();
    assert!(!boot["AccessorID"].as_str().unwrap().is_empty());
    let (s, v) = anon.put("/v1/acl/bootstrap", "").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(v.as_str().unwrap().contains("no longer allowed"), "{v}");

    let admin = anon.with_token(&root);
    let (s, pol) = admin
        .put_json(
            "/v1/acl/policy",
            json!({"Name": "web-team", "Rules": r#"
                service "web" { policy = "write" }
                service_prefix "" { policy = "read" }
                key_prefix "app/" { policy = "read" }
                key_prefix "app/web/" { policy = "write" }
                node_prefix "" { policy = "read" }
            "#}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{pol}");
    let (s, v) = admin
        .put_json(
            "/v1/acl/policy",
            json!({"Name": "broken", "Rules": r#"service "x" { policy = "owner" }"#}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v.as_str().unwrap().contains("owner"), "{v}");
    let (s, tok) = admin
        .put_json(
            "/v1/acl/token",
            json!({"Description": "web deployer", "Policies": [{"Name": "web-team"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    let secret = tok["SecretID"].as_str().unwrap().to_owned();
    assert_eq!(tok["Policies"][0]["ID"], pol["ID"]);

    let web = anon.with_token(&secret);
    assert_eq!(
        web.put_json(
            "/v1/agent/service/register",
            json!({"Name": "web", "ID": "w1"})
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        web.put_json("/v1/agent/service/register", json!({"Name": "db"}))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        admin
            .put_json("/v1/agent/service/register", json!({"Name": "db"}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(web.put("/v1/kv/app/web/conf", "1").await.0, StatusCode::OK);
    assert_eq!(
        web.put("/v1/kv/app/db/conf", "1").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(admin.put("/v1/kv/app/db/conf", "2").await.0, StatusCode::OK);
    assert_eq!(admin.put("/v1/kv/secret", "s").await.0, StatusCode::OK);
    assert_eq!(web.get("/v1/kv/app/db/conf").await.0, StatusCode::OK);
    assert_eq!(web.get("/v1/kv/secret").await.0, StatusCode::FORBIDDEN);
    let (_, _, v) = web.get("/v1/kv/?recurse").await;
    let keys: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        vec!["app/db/conf", "app/web/conf"],
        "unreadable keys filtered out"
    );
    assert_eq!(
        web.delete("/v1/kv/app?recurse").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        web.delete("/v1/kv/app/web/?recurse").await.0,
        StatusCode::OK
    );
    let (_, _, v) = web.get("/v1/catalog/services").await;
    assert!(v.get("web").is_some() && v.get("db").is_some());

    // The token is accepted from each place Consul clients put it.
    let (s, _, _) = anon
        .raw(
            Method::PUT,
            "/v1/kv/app/web/a",
            "1",
            &[("Authorization", &format!("Bearer {secret}"))],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = anon
        .put(&format!("/v1/kv/app/web/b?token={secret}"), "1")
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = web.get("/v1/acl/token/self").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["Description"], "web deployer");

    // Unknown tokens are refused outright.
    let bogus = anon.with_token("00000000-dead-beef-0000-000000000000");
    let (s, _, v) = bogus.get("/v1/catalog/services").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v, json!("ACL not found"));

    // Only acl:write may manage ACLs; listing hides secrets.
    assert_eq!(
        web.put_json("/v1/acl/token", json!({"Policies": []}))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (s, _, v) = admin.get("/v1/acl/tokens").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|t| t["SecretID"] == "<hidden>")
    );

    // Deleting the token revokes it.
    let acc = tok["AccessorID"].as_str().unwrap();
    assert_eq!(
        admin.delete(&format!("/v1/acl/token/{acc}")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        web.put("/v1/kv/app/web/conf", "1").await.0,
        StatusCode::FORBIDDEN
    );

    // ACL state survives a restart.
    let srv = srv.restart().await;
    let admin = srv.http.with_token(&root);
    assert_eq!(
        admin.put("/v1/kv/after-restart", "1").await.0,
        StatusCode::OK
    );
    assert_eq!(
        srv.http.put("/v1/acl/bootstrap", "").await.0,
        StatusCode::FORBIDDEN
    );
    let (_, _, v) = admin.get("/v1/acl/policies").await;
    assert_eq!(v[0]["Name"], "web-team");
}

#[tokio::test]
async fn acl_defaults_follow_the_bind_address() {
    // Loopback: off unless configured.
    let srv = TestServer::start().await;
    assert!(srv.http.put("/v1/kv/x", "1").await.0 == StatusCode::OK);
    let (s, v) = srv.http.put("/v1/acl/bootstrap", "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v.as_str().unwrap().contains("disabled"));
    // Non-loopback listeners default to deny: checked on the Server builder directly,
    // since binding 0.0.0.0 in a test would expose the port.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_registry::Server::build(
        tessera_registry::Config {
            data_dir: dir.path().into(),
            ..Default::default()
        },
        &listener,
    )
    .unwrap();
    assert!(server.registry().acl_enabled);
}

#[tokio::test]
async fn initial_management_token_from_config() {
    let srv = TestServer::start_with(|c| {
        c.acl.enabled = Some(true);
        c.acl.initial_management = Some("root-secret".into());
    })
    .await;
    assert_eq!(
        srv.http
            .with_token("root-secret")
            .put("/v1/kv/a", "1")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(srv.http.put("/v1/kv/a", "1").await.0, StatusCode::FORBIDDEN);
}
