//! The agent, catalog, health and status endpoints, with Consul's shapes and headers.

use http::{Method, StatusCode};
use serde_json::json;

use crate::support::{TestServer, check_status, index_of, wait_for};

#[tokio::test]
async fn register_discover_deregister() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    h.register(json!({
        "Name": "web", "ID": "web1", "Address": "10.0.0.1", "Port": 8080,
        "Tags": ["v1", "blue"], "Meta": {"version": "1.2"},
        "Weights": {"Passing": 10, "Warning": 1},
        "Check": {"TTL": "30s", "Status": "passing"}
    }))
    .await;
    h.register(
        json!({"Name": "web", "ID": "web2", "Port": 8081, "Tags": ["v2"],
        "Check": {"TTL": "30s"}}),
    )
    .await;
    h.register(json!({"Name": "db", "Port": 5432})).await;

    // Catalog: services with their tags.
    let (s, hd, v) = h.get("/v1/catalog/services").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hd["x-consul-knownleader"], "true");
    assert!(hd.contains_key("x-consul-lastcontact"));
    assert_eq!(v["web"], json!(["blue", "v1", "v2"]));
    assert_eq!(v["db"], json!([]));

    let (_, _, v) = h.get("/v1/catalog/service/web?tag=v1").await;
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["ServiceID"], "web1");
    assert_eq!(list[0]["ServiceAddress"], "10.0.0.1");
    assert_eq!(list[0]["ServicePort"], 8080);
    assert_eq!(list[0]["Node"], "test-node");
    assert_eq!(
        list[0]["ServiceWeights"],
        json!({"Passing": 10, "Warning": 1})
    );
    assert_eq!(list[0]["ServiceMeta"]["version"], "1.2");

    // Health: web2's TTL check starts critical, web1's passing (Status given).
    let (_, _, v) = h.get("/v1/health/service/web").await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    let (_, _, v) = h.get("/v1/health/service/web?passing").await;
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["Service"]["ID"], "web1");
    assert_eq!(list[0]["Service"]["Weights"]["Passing"], 10);
    assert_eq!(list[0]["Node"]["Node"], "test-node");
    let checks: Vec<&str> = list[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(checks, vec!["serfHealth", "service:web1"]);

    // A TTL pass brings web2 in.
    let (s, _) = h.put("/v1/agent/check/pass/service:web2?note=ok", "").await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/health/service/web?passing=true").await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    // warn leaves it out of ?passing but keeps it in the list.
    let (s, _) = h.put("/v1/agent/check/warn/service:web2", "").await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/health/service/web?passing").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, _, v) = h.get("/v1/health/state/warning").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["CheckID"], "service:web2");
    // update with a body.
    let (s, _) = h
        .put_json(
            "/v1/agent/check/update/service:web2",
            json!({"Status": "passing", "Output": "all good"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/health/checks/web").await;
    let c2 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == "service:web2")
        .unwrap();
    assert_eq!(c2["Status"], "passing");
    assert_eq!(c2["Output"], "all good");
    assert_eq!(c2["Type"], "ttl");
    assert_eq!(c2["ServiceTags"], json!(["v2"]));

    // Agent views.
    let (_, _, v) = h.get("/v1/agent/services").await;
    assert_eq!(v["web1"]["Service"], "web");
    assert_eq!(v["web1"]["Port"], 8080);
    assert_eq!(v["db"]["Service"], "db");
    let (_, _, v) = h.get("/v1/agent/checks").await;
    assert_eq!(v["service:web1"]["ServiceID"], "web1");
    let (_, _, v) = h.get("/v1/agent/self").await;
    assert_eq!(v["Config"]["Datacenter"], "dc1");
    assert_eq!(v["Config"]["NodeName"], "test-node");
    let (_, _, v) = h.get("/v1/agent/service/web1").await;
    assert_eq!(v["ID"], "web1");

    // Metrics: Consul's JSON shape and Prometheus text.
    let (_, _, v) = h.get("/v1/agent/metrics").await;
    let gauge = |name: &str| {
        v["Gauges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["Name"] == name)
            .unwrap()["Value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(gauge("tessera.catalog.services"), 3.0);
    assert_eq!(gauge("tessera.http.blocking_queries"), 0.0);
    let (s, hd, text) = h
        .raw(Method::GET, "/v1/agent/metrics?format=prometheus", "", &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        hd["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("\ntessera_registry_blocking_queries 0\n"),
        "{text}"
    );
    let ok_writes = text
        .lines()
        .find_map(|l| l.strip_prefix("tessera_registry_writes_total{result=\"ok\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(ok_writes.is_some_and(|n| n >= 3), "{text}");
    let instances: u64 = text
        .lines()
        .filter(|l| l.starts_with("tessera_registry_instances{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(instances, 3, "web1, web2 and db: {text}");
    assert!(
        text.contains("tessera_registry_checks{status=\"warning\"} 0\n"),
        "web2's warning is over: {text}"
    );
    assert!(
        text.contains("\ntessera_registry_write_duration_seconds_count "),
        "{text}"
    );
    tessera_testkit::prometheus::check_metrics(&text);

    // Nodes, status.
    let (_, _, v) = h.get("/v1/catalog/nodes").await;
    assert_eq!(v[0]["Node"], "test-node");
    // One server: it leads, and is the only peer.
    let (_, _, leader) = h.get("/v1/status/leader").await;
    let (_, _, v) = h.get("/v1/status/peers").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0], leader);
    assert!(!leader.as_str().unwrap().is_empty());

    // Deregister.
    let (s, _) = h.put("/v1/agent/service/deregister/web1", "").await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/health/service/web").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, _, v) = h.get("/v1/agent/checks").await;
    assert!(
        v.get("service:web1").is_none(),
        "checks go with their service"
    );
    let (s, _) = h.put("/v1/agent/service/deregister/web1", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn multiple_checks_and_replace_existing() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    h.register(
        json!({"Name": "api", "Checks": [{"TTL": "10s"}, {"TTL": "20s", "Name": "second"}]}),
    )
    .await;
    let (_, _, v) = h.get("/v1/agent/checks").await;
    assert_eq!(v["service:api:1"]["Name"], "Service 'api' check");
    assert_eq!(v["service:api:2"]["Name"], "second");
    // Without replace-existing-checks, old checks stay; with it, they go.
    h.register(json!({"Name": "api", "Check": {"TTL": "10s", "CheckID": "only"}}))
        .await;
    let (_, _, v) = h.get("/v1/agent/checks").await;
    assert!(v.get("service:api:1").is_some() && v.get("only").is_some());
    let (s, b) = h
        .put_json(
            "/v1/agent/service/register?replace-existing-checks",
            json!({"Name": "api", "Check": {"TTL": "10s", "CheckID": "only"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, _, v) = h.get("/v1/agent/checks").await;
    assert!(v.get("service:api:1").is_none() && v.get("only").is_some());

    // Standalone check registration bound to the service; then deregistration.
    let (s, b) = h
        .put_json(
            "/v1/agent/check/register",
            json!({"Name": "extra", "ServiceID": "api", "TTL": "5s", "Status": "warning"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(check_status(h, "extra").await.as_deref(), Some("warning"));
    let (s, _) = h.put("/v1/agent/check/deregister/extra", "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(check_status(h, "extra").await, None);
    let (s, b) = h
        .put_json(
            "/v1/agent/check/register",
            json!({"Name": "x", "ServiceID": "nope", "TTL": "5s"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b.as_str().unwrap().contains("nope"), "{b}");
}

#[tokio::test]
async fn maintenance_mode() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    h.register(json!({"Name": "web", "ID": "w1"})).await;
    let (_, _, v) = h.get("/v1/health/service/web?passing").await;
    assert_eq!(v.as_array().unwrap().len(), 1, "no checks: passing");
    let (s, _) = h
        .put(
            "/v1/agent/service/maintenance/w1?enable=true&reason=upgrading",
            "",
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/health/service/web?passing").await;
    assert_eq!(v.as_array().unwrap().len(), 0);
    let (_, _, v) = h.get("/v1/agent/checks").await;
    let m = &v["_service_maintenance:w1"];
    assert_eq!(m["Status"], "critical");
    assert_eq!(m["Notes"], "upgrading");
    assert_eq!(m["Type"], "maintenance");
    let (s, _) = h
        .put("/v1/agent/service/maintenance/w1?enable=false", "")
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/health/service/web?passing").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (s, b) = h.put("/v1/agent/service/maintenance/w1", "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, _) = h
        .put("/v1/agent/service/maintenance/nope?enable=true", "")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn catalog_register_external_node() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    let (s, v) = h
        .put_json(
            "/v1/catalog/register",
            json!({
                "Node": "ext1", "Address": "192.168.1.5", "NodeMeta": {"rack": "r1"},
                "Service": {"Service": "legacy", "ID": "legacy1", "Port": 9000, "Tags": ["old"]},
                "Check": {"CheckID": "legacy-alive", "Name": "alive", "Status": "passing", "ServiceID": "legacy1"}
            }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!(true));
    let (_, _, v) = h.get("/v1/catalog/nodes").await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    let (_, _, v) = h.get("/v1/health/service/legacy?passing").await;
    assert_eq!(v[0]["Node"]["Address"], "192.168.1.5");
    assert_eq!(v[0]["Node"]["Meta"]["rack"], "r1");
    assert_eq!(v[0]["Checks"][0]["CheckID"], "legacy-alive");
    let (_, _, v) = h.get("/v1/catalog/node/ext1").await;
    assert_eq!(v["Services"]["legacy1"]["Service"], "legacy");
    let (_, _, v) = h.get("/v1/health/node/ext1").await;
    assert_eq!(v.as_array().unwrap().len(), 1);

    let (s, _) = h
        .put_json(
            "/v1/catalog/deregister",
            json!({"Node": "ext1", "ServiceID": "legacy1"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/catalog/service/legacy").await;
    assert_eq!(v, json!([]));
    let (s, _) = h
        .put_json("/v1/catalog/deregister", json!({"Node": "ext1"}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = h.get("/v1/catalog/nodes").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (s, b) = h
        .put_json("/v1/catalog/deregister", json!({"Node": "test-node"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
}

#[tokio::test]
async fn blocking_queries_wake_on_their_topic_only() {
    let srv = TestServer::start().await;
    let h = srv.http.clone();
    h.register(json!({"Name": "a", "ID": "a1"})).await;
    h.register(json!({"Name": "b", "ID": "b1"})).await;
    let (_, hd, _) = h.get("/v1/health/service/a").await;
    let a_index = index_of(&hd);
    let (_, hd, _) = h.get("/v1/health/service/b").await;
    let b_index = index_of(&hd);

    // A watcher of `a` with a long wait.
    let h2 = h.clone();
    let watch_a = tokio::spawn(async move {
        h2.get(&format!("/v1/health/service/a?index={a_index}&wait=60s"))
            .await
    });
    // A short watcher of `b` that must time out although `a` changes meanwhile.
    let h3 = h.clone();
    let watch_b = tokio::spawn(async move {
        h3.get(&format!("/v1/health/service/b?index={b_index}&wait=300ms"))
            .await
    });
    let (s, hd, v) = watch_b.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        index_of(&hd),
        b_index,
        "b unchanged: same index after the wait"
    );
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert!(!watch_a.is_finished(), "nothing changed a yet");

    h.register(json!({"Name": "a", "ID": "a2"})).await;
    let (s, hd, v) = watch_a.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert!(index_of(&hd) > a_index);
    assert_eq!(
        v.as_array().unwrap().len(),
        2,
        "the answer holds the change"
    );

    // A check status change also wakes the service's watchers.
    h.register(json!({"Name": "c", "ID": "c1", "Check": {"TTL": "60s"}}))
        .await;
    let (_, hd, _) = h.get("/v1/health/service/c?passing").await;
    let c_index = index_of(&hd);
    let h4 = h.clone();
    let watch_c = tokio::spawn(async move {
        h4.get(&format!(
            "/v1/health/service/c?passing&index={c_index}&wait=60s"
        ))
        .await
    });
    h.put("/v1/agent/check/pass/service:c1", "").await;
    let (_, _, v) = watch_c.await.unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);

    // Index 0 and a stale index answer at once; a future index (from before a restart)
    // too.
    for q in [
        "index=0&wait=60s",
        "index=1&wait=60s",
        "index=999999999&wait=60s",
    ] {
        let (s, _, _) = h.get(&format!("/v1/catalog/services?{q}")).await;
        assert_eq!(s, StatusCode::OK);
    }

    // Catalog services list watchers wake on a new service.
    let (_, hd, _) = h.get("/v1/catalog/services").await;
    let idx = index_of(&hd);
    let h5 = h.clone();
    let watch = tokio::spawn(async move {
        h5.get(&format!("/v1/catalog/services?index={idx}&wait=60s"))
            .await
    });
    h.register(json!({"Name": "new-one"})).await;
    let (_, _, v) = watch.await.unwrap();
    assert!(v.get("new-one").is_some());
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    let cases: Vec<(Method, &str, String, StatusCode, &str)> = vec![
        (
            Method::PUT,
            "/v1/agent/service/register",
            "{not json".into(),
            StatusCode::BAD_REQUEST,
            "decode",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            "".into(),
            StatusCode::BAD_REQUEST,
            "empty body",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Port":"80"}"#.into(),
            StatusCode::BAD_REQUEST,
            "Port",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Port":70000}"#.into(),
            StatusCode::BAD_REQUEST,
            "Port",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Tags":"a"}"#.into(),
            StatusCode::BAD_REQUEST,
            "Tags",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Port":80}"#.into(),
            StatusCode::BAD_REQUEST,
            "Name",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"a/b"}"#.into(),
            StatusCode::BAD_REQUEST,
            "'/'",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Check":{"TTL":"10 parsecs"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "parsecs",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Check":{"Interval":"10s"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "one of HTTP, TCP, GRPC or TTL",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Check":{"Args":["/bin/true"],"Interval":"10s"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "Args checks are not supported",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Check":{"TCP":"host","Interval":"1s"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "host:port",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Check":{"TTL":"1s","Status":"great"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "great",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            r#"{"Name":"w","Weights":{"Passing":0}}"#.into(),
            StatusCode::BAD_REQUEST,
            "Weights.Passing",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            format!(
                r#"{{"Name":"w","Meta":{{"k":"{}"}}}}"#,
                "x".repeat(2_000_000)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large",
        ),
        (
            Method::PUT,
            "/v1/agent/check/update/nope",
            r#"{"Status":"passing"}"#.into(),
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            Method::GET,
            "/v1/catalog/services?index=abc",
            String::new(),
            StatusCode::BAD_REQUEST,
            "index",
        ),
        (
            Method::GET,
            "/v1/catalog/services?wait=10parsecs",
            String::new(),
            StatusCode::BAD_REQUEST,
            "wait",
        ),
        (
            Method::GET,
            "/v1/health/state/sleepy",
            String::new(),
            StatusCode::BAD_REQUEST,
            "sleepy",
        ),
        (
            Method::GET,
            "/v1/health/service/web?passing=maybe",
            String::new(),
            StatusCode::BAD_REQUEST,
            "passing",
        ),
        (
            Method::GET,
            "/v1/catalog/services?dc=mars",
            String::new(),
            StatusCode::BAD_REQUEST,
            "mars",
        ),
        (
            Method::GET,
            "/v1/nope",
            String::new(),
            StatusCode::NOT_FOUND,
            "/v1/nope",
        ),
        (
            Method::PUT,
            "/v1/catalog/register",
            r#"{"Node":"n"}"#.into(),
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (
            Method::DELETE,
            "/v1/agent/service/register",
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "",
        ),
    ];
    for (method, path, body, want, needle) in cases {
        let (s, _, b) = h.raw(method.clone(), path, body.clone(), &[]).await;
        let text = String::from_utf8_lossy(&b);
        assert_eq!(
            s,
            want,
            "{method} {path} {}: {text}",
            &body[..body.len().min(80)]
        );
        assert!(
            text.contains(needle),
            "{method} {path}: {text:?} should mention {needle:?}"
        );
    }
    // Nothing was half-written.
    let (_, _, v) = h.get("/v1/catalog/services").await;
    assert_eq!(v.as_object().unwrap().len(), 0, "{v}");
    // A TTL update on a non-TTL check is refused.
    h.register(json!({"Name": "w", "Check": {"TCP": "127.0.0.1:1", "Interval": "10s"}}))
        .await;
    let (s, b) = h.put("/v1/agent/check/pass/service:w", "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    // The server is still fine.
    wait_for("server still answers", || async {
        h.get("/v1/status/leader").await.0 == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn filter_expressions() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    h.register(json!({"Name": "web", "ID": "w1", "Port": 80, "Tags": ["v1", "primary"], "Meta": {"zone": "a"}}))
        .await;
    h.register(
        json!({"Name": "web", "ID": "w2", "Port": 81, "Tags": ["v2"], "Meta": {"zone": "b"},
        "Check": {"TTL": "30s"}}),
    )
    .await;
    h.register(json!({"Name": "db", "ID": "d1", "Port": 5432, "Tags": ["v1"]}))
        .await;
    let ids = |v: &serde_json::Value, pick: &dyn Fn(&serde_json::Value) -> String| -> Vec<String> {
        v.as_array().unwrap().iter().map(pick).collect()
    };
    let (s, _, v) = h
        .get("/v1/health/service/web?filter=Service.Meta.zone%20%3D%3D%20a")
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        ids(&v, &|e| e["Service"]["ID"].as_str().unwrap().into()),
        vec!["w1"]
    );
    let q = "Checks.Status%20%3D%3D%20critical%20or%20%22primary%22%20in%20Service.Tags";
    let (_, _, v) = h.get(&format!("/v1/health/service/web?filter={q}")).await;
    assert_eq!(
        ids(&v, &|e| e["Service"]["ID"].as_str().unwrap().into()),
        vec!["w1", "w2"]
    );
    let (_, _, v) = h
        .get("/v1/catalog/service/web?filter=ServicePort%20%3D%3D%2081")
        .await;
    assert_eq!(
        ids(&v, &|e| e["ServiceID"].as_str().unwrap().into()),
        vec!["w2"]
    );
    let (_, _, v) = h
        .get("/v1/catalog/services?filter=ServiceTags%20contains%20v1")
        .await;
    let mut names: Vec<&String> = v.as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, vec!["db", "web"]);
    assert_eq!(
        v["web"],
        json!(["primary", "v1"]),
        "tags of the matching instances only"
    );
    let (_, _, v) = h
        .get("/v1/agent/services?filter=Service%20%3D%3D%20db")
        .await;
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["d1"]
    );
    let (_, _, v) = h
        .get("/v1/agent/checks?filter=Status%20%3D%3D%20critical")
        .await;
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["service:w2"]
    );
    let (s, _, v) = h
        .get("/v1/health/service/web?filter=Service.ID%20%3D%3D")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v.as_str().unwrap().contains("boolean expression"), "{v}");
}

/// Unknown routes and wrong methods answer Tessera's JSON shape; Consul's own errors
/// stay the plain text Consul's clients show.
#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json() {
    let srv = crate::support::TestServer::start().await;
    let h = &srv.http;
    let (s, hd, b) = h
        .raw(http::Method::GET, "/v1/nope", bytes::Bytes::new(), &[])
        .await;
    assert_eq!(s, http::StatusCode::NOT_FOUND);
    assert_eq!(hd["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["code"], "not_found");
    assert_eq!(v["error"], "no such endpoint: /v1/nope");
    let (s, hd, b) = h
        .raw(
            http::Method::DELETE,
            "/v1/agent/services",
            bytes::Bytes::new(),
            &[],
        )
        .await;
    assert_eq!(s, http::StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(hd["allow"], "GET,HEAD");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["code"], "method_not_allowed");
    let (s, hd, b) = h
        .raw(http::Method::PUT, "/v1/agent/service/register", "{bad", &[])
        .await;
    assert_eq!(s, http::StatusCode::BAD_REQUEST);
    assert!(
        hd["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(!b.is_empty());
}

/// Prometheus's HTTP service discovery: passing instances that say where their metrics
/// are, labelled; the server itself; nothing the token may not read.
#[tokio::test]
async fn prometheus_discovery_lists_passing_instances_that_expose_metrics() {
    let srv = TestServer::start_with(|c| {
        c.acl.enabled = Some(true);
        c.acl.initial_management = Some("root-secret".into());
    })
    .await;
    let root = srv.http.with_token("root-secret");
    root.register(json!({
        "Name": "web", "ID": "web1", "Address": "127.0.0.1", "Port": 8080,
        "Tags": ["v1", "blue"], "Meta": {"metrics_path": "/metrics", "team": "shop-web"},
        "Check": {"TTL": "30s", "Status": "passing"}
    }))
    .await;
    // Metrics on another port than the service's (a gateway's admin port).
    root.register(json!({
        "Name": "gateway", "ID": "gw1", "Address": "127.0.0.1", "Port": 8000,
        "Meta": {"metrics_path": "/metrics", "metrics_port": "8081"}
    }))
    .await;
    // Failing: not a target until it passes.
    root.register(json!({
        "Name": "web", "ID": "web2", "Address": "127.0.0.1", "Port": 8082,
        "Meta": {"metrics_path": "/metrics"}, "Check": {"TTL": "30s", "Status": "critical"}
    }))
    .await;
    // No metrics: never a target.
    root.register(json!({"Name": "db", "ID": "db1", "Address": "127.0.0.1", "Port": 5432}))
        .await;
    let (s, hd, v) = root.get("/v1/tessera/prometheus-sd").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hd["content-type"], "application/json");
    let groups = v.as_array().unwrap();
    let by_target = |t: &str| {
        groups
            .iter()
            .find(|g| g["targets"] == json!([t]))
            .unwrap_or_else(|| panic!("no {t} in {v}"))
    };
    assert_eq!(
        by_target("127.0.0.1:8080")["labels"],
        json!({
            "__metrics_path__": "/metrics", "service": "web", "instance_id": "web1",
            "node": "test-node", "tags": ",v1,blue,", "meta_team": "shop-web"
        })
    );
    assert_eq!(by_target("127.0.0.1:8081")["labels"]["service"], "gateway");
    assert_eq!(
        by_target(&srv.addr.to_string())["labels"],
        json!({"__metrics_path__": "/metrics", "service": "tessera-server"})
    );
    assert_eq!(groups.len(), 3, "web2 fails, db has no metrics: {v}");
    let (s, _) = root.put("/v1/agent/check/pass/service:web2", "").await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, v) = root.get("/v1/tessera/prometheus-sd?service=web").await;
    assert_eq!(v.as_array().unwrap().len(), 2, "both web instances: {v}");

    // A token that reads only `web` sees only web; an anonymous one sees nothing.
    let (_, policy) = root
        .put_json(
            "/v1/acl/policy",
            json!({"Name": "web-read", "Rules": "service \"web\" { policy = \"read\" }"}),
        )
        .await;
    let (_, token) = root
        .put_json("/v1/acl/token", json!({"Policies": [{"ID": policy["ID"]}]}))
        .await;
    let web = srv.http.with_token(token["SecretID"].as_str().unwrap());
    let (_, _, v) = web.get("/v1/tessera/prometheus-sd").await;
    let services: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["labels"]["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["web", "web"], "{v}");
    let (_, _, v) = srv.http.get("/v1/tessera/prometheus-sd").await;
    assert_eq!(v, json!([]));
}
