//! The KV store: values, prefixes, CAS, flags, limits and blocking reads.

use base64::Engine;
use http::{Method, StatusCode};
use serde_json::json;

use crate::support::{TestServer, index_of};

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn put_get_list_delete() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    assert_eq!(
        h.put("/v1/kv/app/db/url", "postgres://x").await,
        (StatusCode::OK, json!(true))
    );
    assert_eq!(
        h.put("/v1/kv/app/db/pool?flags=42", "10").await.1,
        json!(true)
    );
    assert_eq!(h.put("/v1/kv/app/name", "shop").await.1, json!(true));
    assert_eq!(
        h.put("/v1/kv/other", [0u8, 159, 255].to_vec()).await.1,
        json!(true)
    );
    h.put("/v1/kv/empty", "").await;

    let (s, hd, v) = h.get("/v1/kv/app/db/pool").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["Key"], "app/db/pool");
    assert_eq!(v[0]["Flags"], 42);
    assert_eq!(v[0]["Value"], b64(b"10"));
    assert_eq!(index_of(&hd), v[0]["ModifyIndex"].as_u64().unwrap());
    let (_, _, v) = h.get("/v1/kv/empty").await;
    assert_eq!(v[0]["Value"], serde_json::Value::Null);

    // Binary values round-trip, raw and base64.
    let (_, _, raw) = h.raw(Method::GET, "/v1/kv/other?raw", "", &[]).await;
    assert_eq!(&raw[..], &[0u8, 159, 255]);
    let (_, _, v) = h.get("/v1/kv/other").await;
    assert_eq!(v[0]["Value"], b64(&[0, 159, 255]));

    let (_, _, v) = h.get("/v1/kv/app/?recurse").await;
    let keys: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["app/db/pool", "app/db/url", "app/name"]);
    let (_, _, v) = h.get("/v1/kv/app/?keys&separator=/").await;
    assert_eq!(v, json!(["app/db/", "app/name"]));
    let (_, _, v) = h.get("/v1/kv/?keys").await;
    assert_eq!(v.as_array().unwrap().len(), 5);
    let (s, hd, _) = h.get("/v1/kv/missing").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(index_of(&hd) > 0);

    // No leading slash is stored: `//app/name` is `app/name`.
    let (_, _, v) = h.get("/v1/kv//app/name").await;
    assert_eq!(v[0]["Key"], "app/name");
    assert_eq!(h.put("/v1/kv///lead", "x").await.1, json!(true));
    let (_, _, v) = h.get("/v1/kv/lead").await;
    assert_eq!(v[0]["Key"], "lead");
    h.delete("/v1/kv/lead").await;

    assert_eq!(
        h.delete("/v1/kv/app/name").await,
        (StatusCode::OK, json!(true))
    );
    assert_eq!(h.get("/v1/kv/app/name").await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.delete("/v1/kv/app?recurse").await.1, json!(true));
    assert_eq!(h.get("/v1/kv/app/?recurse").await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/v1/kv/other").await.0, StatusCode::OK);
}

#[tokio::test]
async fn cas_semantics() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    // cas=0: create only if absent.
    assert_eq!(h.put("/v1/kv/lock?cas=0", "a").await.1, json!(true));
    assert_eq!(h.put("/v1/kv/lock?cas=0", "b").await.1, json!(false));
    let (_, _, v) = h.get("/v1/kv/lock").await;
    let idx = v[0]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(
        h.put(&format!("/v1/kv/lock?cas={}", idx + 1), "c").await.1,
        json!(false)
    );
    assert_eq!(
        h.put(&format!("/v1/kv/lock?cas={idx}"), "d").await.1,
        json!(true)
    );
    assert_eq!(
        h.put(&format!("/v1/kv/lock?cas={idx}"), "e").await.1,
        json!(false)
    );
    let (_, _, v) = h.get("/v1/kv/lock").await;
    assert_eq!(v[0]["Value"], b64(b"d"));
    assert_eq!(v[0]["CreateIndex"].as_u64().unwrap(), idx);
    let idx2 = v[0]["ModifyIndex"].as_u64().unwrap();
    assert!(idx2 > idx);
    assert_eq!(
        h.delete(&format!("/v1/kv/lock?cas={idx}")).await.1,
        json!(false)
    );
    assert_eq!(
        h.delete(&format!("/v1/kv/lock?cas={idx2}")).await.1,
        json!(true)
    );
    assert_eq!(h.get("/v1/kv/lock").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn limits_and_bad_keys() {
    let srv = TestServer::start_with(|c| c.kv_max_value_bytes = 1024).await;
    let h = &srv.http;
    assert_eq!(h.put("/v1/kv/ok", vec![b'x'; 1024]).await.0, StatusCode::OK);
    let (s, v) = h.put("/v1/kv/big", vec![b'x'; 1025]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(v.as_str().unwrap().contains("1024 byte limit"), "{v}");
    assert_eq!(h.get("/v1/kv/big").await.0, StatusCode::NOT_FOUND);
    let (s, v) = h.put("/v1/kv/a%00b", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.as_str().unwrap().contains("control character"));
    let (s, _) = h.put("/v1/kv/", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = h.put("/v1/kv/k?flags=-1", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v.as_str().unwrap().contains("flags"));
    let (s, v) = h.put("/v1/kv/k?acquire=abc", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v.as_str().unwrap().contains("invalid session"), "{v}");
    let (s, v) = h.put("/v1/kv/k?acquire=abc&release=abc", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v.as_str().unwrap().contains("Conflicting"), "{v}");
    let (s, _, _) = h.get("/v1/kv/").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn blocking_kv_reads() {
    let srv = TestServer::start().await;
    let h = srv.http.clone();
    h.put("/v1/kv/cfg/a", "1").await;
    h.put("/v1/kv/unrelated", "1").await;
    let (_, hd, _) = h.get("/v1/kv/cfg/a").await;
    let idx = index_of(&hd);

    // A write elsewhere does not answer the watcher; a write to the key does.
    let h2 = h.clone();
    let watch =
        tokio::spawn(async move { h2.get(&format!("/v1/kv/cfg/a?index={idx}&wait=60s")).await });
    h.put("/v1/kv/unrelated", "2").await;
    h.put("/v1/kv/cfg/b", "2").await;
    h.put("/v1/kv/cfg/a", "3").await;
    let (s, hd, v) = watch.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["Value"], b64(b"3"));
    assert!(index_of(&hd) > idx);

    // A prefix watch sees deletes.
    let (_, hd, _) = h.get("/v1/kv/cfg/?recurse").await;
    let idx = index_of(&hd);
    let h3 = h.clone();
    let watch = tokio::spawn(async move {
        h3.get(&format!("/v1/kv/cfg/?recurse&index={idx}&wait=60s"))
            .await
    });
    h.delete("/v1/kv/cfg/b").await;
    let (_, hd, v) = watch.await.unwrap();
    assert!(index_of(&hd) > idx);
    assert_eq!(v.as_array().unwrap().len(), 1);

    // The wait ends with the same index when nothing changes.
    let (_, hd, _) = h.get("/v1/kv/cfg/a").await;
    let idx = index_of(&hd);
    let (s, hd, _) = h.get(&format!("/v1/kv/cfg/a?index={idx}&wait=200ms")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(index_of(&hd), idx);
}

/// `/v1/txn`: all or nothing, each operation seeing the ones before it.
#[tokio::test]
async fn transactions_apply_all_or_nothing() {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let srv = TestServer::start().await;
    let h = &srv.http;
    h.put("/v1/kv/app/a", "1").await;
    let (_, _, v) = h.get("/v1/kv/app/a").await;
    let a_index = v[0]["ModifyIndex"].as_u64().unwrap();
    // Every operation passes: written together, reads see the writes before them.
    let (s, v) = h
        .put_json(
            "/v1/txn",
            json!([
                {"KV": {"Verb": "cas", "Key": "app/a", "Value": b64("2"), "Index": a_index}},
                {"KV": {"Verb": "check-not-exists", "Key": "app/b"}},
                {"KV": {"Verb": "set", "Key": "app/b", "Value": b64("3"), "Flags": 7}},
                {"KV": {"Verb": "get-tree", "Key": "app/"}},
            ]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let results = v["Results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "{v}");
    assert!(
        results[0]["KV"]["Value"].is_null(),
        "writes answer without the value"
    );
    assert_eq!(
        results[2]["KV"]["Value"],
        b64("2"),
        "the tree sees the cas before it: {v}"
    );
    assert_eq!(results[3]["KV"]["Value"], b64("3"));
    assert_eq!(results[3]["KV"]["Flags"], 7);
    let (_, _, a) = h.get("/v1/kv/app/a").await;
    let written = a[0]["ModifyIndex"].as_u64().unwrap();
    let (_, _, b) = h.get("/v1/kv/app/b").await;
    assert_eq!(
        b[0]["ModifyIndex"].as_u64().unwrap(),
        written,
        "one write, one index"
    );

    // One stale check fails the whole transaction: nothing of it is written.
    let (s, v) = h
        .put_json(
            "/v1/txn",
            json!([
                {"KV": {"Verb": "delete", "Key": "app/b"}},
                {"KV": {"Verb": "cas", "Key": "app/a", "Value": b64("x"), "Index": a_index}},
                {"KV": {"Verb": "get", "Key": "app/none"}},
            ]),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let errors = v["Errors"].as_array().unwrap();
    assert_eq!(
        errors
            .iter()
            .map(|e| e["OpIndex"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2],
        "{v}"
    );
    let (s, _, _) = h.get("/v1/kv/app/b").await;
    assert_eq!(s, StatusCode::OK, "the delete was not applied");
    // Bad input is named.
    let (s, _) = h
        .put_json("/v1/txn", json!([{"Node": {"Verb": "set"}}]))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = h
        .put_json("/v1/txn", json!([{"KV": {"Verb": "explode", "Key": "k"}}]))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["Errors"][0]["What"].as_str().unwrap().contains("explode"));
}
