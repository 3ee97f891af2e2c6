//! Endpoints found through a real tessera registry with blocking queries.

use http::StatusCode;
use serde_json::json;

use crate::support::{Http, TestGateway, Upstream, wait_for};

struct Registry {
    addr: std::net::SocketAddr,
    http: Http,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Registry {
    async fn start() -> Registry {
        Self::start_with(Default::default()).await
    }

    async fn start_with(acl: tessera_registry::AclConfig) -> Registry {
        Self::start_config(tessera_registry::Config {
            node_name: "gw-test".into(),
            acl,
            ..Default::default()
        })
        .await
    }

    async fn start_config(mut config: tessera_registry::Config) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        config.data_dir = dir.path().into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tessera_registry::Server::open(config, &listener)
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = server
                .run(listener, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        let http = Http::new(addr);
        wait_for("registry up", || async {
            http.get("/v1/status/leader").await.0 == StatusCode::OK
        })
        .await;
        Registry {
            addr,
            http,
            stop: Some(stop),
            _dir: dir,
        }
    }

    async fn register(&self, id: &str, up: &Upstream, weight: u32) {
        let body = json!({"Name": "web", "ID": id, "Address": "127.0.0.1", "Port": up.addr.port(),
            "Weights": {"Passing": weight, "Warning": 1}});
        let (s, _, _) = self
            .http
            .send(
                http::Method::PUT,
                "/v1/agent/service/register",
                &[],
                body.to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_the_registry() {
    let reg = Registry::start().await;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    reg.register("a", &a, 3).await;
    let gw = TestGateway::start(&format!(
        r#"
[registry]
address = "{}"
[[routes]]
upstream = "web"
[upstreams.web]
service = "web"
policy = "round_robin"
"#,
        reg.addr
    ))
    .await;
    let admin = gw.admin_http();
    wait_for("ready after first discovery", || async {
        admin.get("/readyz").await.0 == StatusCode::OK
    })
    .await;
    assert_eq!(gw.http.get("/").await.2["id"], "a");

    // A new instance is used within moments of its registration, with its weight.
    reg.register("b", &b, 1).await;
    wait_for("b discovered", || async {
        gw.upstreams().await["web"]["endpoints"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let ups = gw.upstreams().await;
    let weights: Vec<u64> = ups["web"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, vec![3, 1]);
    let mut from_b = 0;
    for _ in 0..40 {
        if gw.http.get("/").await.2["id"] == "b" {
            from_b += 1;
        }
    }
    assert_eq!(from_b, 10, "weights 3:1 honoured");

    // Deregistration takes it out.
    reg.http
        .send(http::Method::PUT, "/v1/agent/service/deregister/a", &[], "")
        .await;
    wait_for("a gone", || async {
        gw.upstreams().await["web"]["endpoints"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    for _ in 0..10 {
        assert_eq!(gw.http.get("/").await.2["id"], "b");
    }

    // The registry goes away: the last endpoints keep serving, and the gateway says so.
    let mut reg = reg;
    if let Some(s) = reg.stop.take() {
        let _ = s.send(());
    }
    wait_for("registry marked down", || async {
        let (_, _, m) = admin.get("/metrics").await;
        m.as_str()
            .unwrap()
            .contains("tessera_gateway_registry_up{upstream=\"web\"} 0")
    })
    .await;
    for _ in 0..10 {
        assert_eq!(gw.http.get("/").await.0, StatusCode::OK);
    }
}

/// `registry.address` with two servers sharing one catalog on etcd: when the one the
/// gateway was watching through stops, discovery goes on through the other, and a
/// registration made there reaches the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_fails_over_between_registry_servers() {
    let Some(etcd) = tessera_testkit::EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let on_etcd = |node: &str| tessera_registry::Config {
        node_name: node.into(),
        store: format!("etcd://{}", etcd.client_addrs().join(",")),
        ..Default::default()
    };
    let mut first = Registry::start_config(on_etcd("r1")).await;
    let second = Registry::start_config(on_etcd("r2")).await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    first.register("a", &a, 1).await;
    let gw = TestGateway::start(&format!(
        "[registry]\naddress = \"{},{}\"\n[[routes]]\nupstream = \"web\"\n[upstreams.web]\nservice = \"web\"\n",
        first.addr, second.addr
    ))
    .await;
    wait_for("a discovered", || async {
        gw.http.get("/").await.2["id"] == "a"
    })
    .await;
    if let Some(s) = first.stop.take() {
        let _ = s.send(());
    }
    second.register("b", &b, 1).await;
    wait_for("b discovered through the second server", || async {
        gw.upstreams().await["web"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
    })
    .await;
}

#[tokio::test]
async fn no_instances_is_a_503_with_retry_after() {
    let reg = Registry::start().await;
    let gw = TestGateway::start(&format!(
        "[registry]\naddress = \"{}\"\n[[routes]]\nupstream = \"web\"\n[upstreams.web]\nservice = \"nothing-here\"\n",
        reg.addr
    ))
    .await;
    wait_for("discovery answered", || async {
        gw.admin_http().get("/readyz").await.0 == StatusCode::OK
    })
    .await;
    let (s, hd, v) = gw.http.get("/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["code"], "no_endpoint");
    assert_eq!(hd["retry-after"], "1");
}

/// With the registry's ACLs on, the gateway discovers only with the token from its config
/// (or `TESSERA_REGISTRY_TOKEN`), and the token is not in the config's debug output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_uses_the_configured_registry_token() {
    let reg = Registry::start_with(tessera_registry::AclConfig {
        enabled: Some(true),
        initial_management: Some("root-secret".into()),
        ..Default::default()
    })
    .await;
    let up = Upstream::start("a").await;
    let body = json!({"Name": "web", "ID": "w1", "Address": "127.0.0.1", "Port": up.addr.port()});
    let (s, _, _) = reg
        .http
        .send(
            http::Method::PUT,
            "/v1/agent/service/register",
            &[("x-consul-token", "root-secret")],
            body.to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let config = |token: &str| {
        format!(
            "[registry]\naddress = \"{}\"\nwait = \"1s\"\n{token}\n[[routes]]\nupstream = \"web\"\n[upstreams.web]\nservice = \"web\"\n",
            reg.addr
        )
    };
    let with = config("token = \"root-secret\"");
    assert!(
        !format!("{:?}", tessera_gateway::Config::parse(&with).unwrap()).contains("root-secret")
    );
    let gw = TestGateway::start(&with).await;
    wait_for("discovery with the token", || async {
        gw.http.get("/").await.0 == StatusCode::OK
    })
    .await;
    // Without a token the registry shows nothing: no endpoints, 503.
    let anon = TestGateway::start(&config("")).await;
    let (s, _, body) = anon.http.get("/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}
