//! The container image, built and run here: Debian's podman builds `deploy/Dockerfile`'s
//! `runtime` stage (the build stage's output made by `deploy/rootfs.sh` from this build's
//! binary), then runs `tessera server`, the gateway and a shop service from it, gets an
//! answer through the gateway, and the image's own HEALTHCHECK passes in the gateway's
//! container. Skipped outside CI when podman cannot run; under `CI=true` it must.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // each test crate uses a part of it
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::BIN;

/// The flags this machine's podman needs: runc (crun fails here), vfs storage, cgroupfs.
const PODMAN: [&str; 6] = [
    "--runtime",
    "runc",
    "--storage-driver",
    "vfs",
    "--cgroup-manager",
    "cgroupfs",
];

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(PODMAN)
        .args(args)
        .output()
        .expect("podman runs")
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether podman can run containers here; outside CI a printed reason and `false`.
fn podman_runs() -> bool {
    let works = Command::new("podman")
        .args(PODMAN)
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        assert!(
            std::env::var_os("CI").is_none(),
            "podman (with runc) is required in CI: apt-get install podman runc; .ci/run installs them"
        );
        eprintln!("skipped: podman cannot run here (apt-get install podman runc)");
    }
    works
}

/// Removes the containers and the image however the test ends.
struct Cleanup {
    containers: Vec<String>,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
        let _ = podman(&["rmi", "-f", &self.image]);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(url: &str) -> Option<(u16, String)> {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = http.request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?
        .to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_server_gateway_and_a_service_and_turns_healthy() {
    if !podman_runs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // What the Dockerfile's build stage leaves in /out, made from this build's binary.
    let stage = dir.path().join("build");
    let made = Command::new(workspace().join("deploy/rootfs.sh"))
        .arg(BIN)
        .arg(stage.join("out"))
        .output()
        .unwrap();
    ok("deploy/rootfs.sh", made);
    let empty = dir.path().join("context");
    std::fs::create_dir_all(&empty).unwrap();
    let tag = format!("localhost/tessera-test:{}", std::process::id());
    let mut cleanup = Cleanup {
        containers: Vec::new(),
        image: tag.clone(),
    };
    let dockerfile = workspace().join("deploy/Dockerfile");
    ok(
        "podman build",
        podman(&[
            "build",
            "--format",
            "docker",
            "--target",
            "runtime",
            "-f",
            dockerfile.to_str().unwrap(),
            "--build-context",
            &format!("build={}", stage.display()),
            "-t",
            &tag,
            empty.to_str().unwrap(),
        ]),
    );
    let user = ok(
        "podman inspect",
        podman(&["image", "inspect", "--format", "{{.Config.User}}", &tag]),
    );
    assert_eq!(user.trim(), "65532:65532", "the image does not run as root");

    let run = |name: &str, extra: &[&str], args: &[&str]| {
        let mut a = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ];
        a.extend_from_slice(extra);
        a.push(&tag);
        a.extend_from_slice(args);
        ok(&format!("podman run {name}"), podman(&a));
    };
    let id = std::process::id();
    let (server, service, gateway) = (
        format!("t-server-{id}"),
        format!("t-catalog-{id}"),
        format!("t-gateway-{id}"),
    );
    cleanup.containers = vec![server.clone(), service.clone(), gateway.clone()];
    let (sp, cp, gp) = (free_port(), free_port(), free_port());
    let registry = format!("127.0.0.1:{sp}");
    run(
        &server,
        &[],
        &["server", "--bind", &registry, "--node", "image-test"],
    );
    tessera_testkit::wait_until("the server is ready", Duration::from_secs(60), || async {
        get(&format!("http://{registry}/readyz"))
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    run(
        &service,
        &[],
        &[
            "shop",
            "catalog",
            "--registry",
            &registry,
            "--listen",
            &format!("127.0.0.1:{cp}"),
        ],
    );
    // The gateway's admin port is the image's default (8081): its HEALTHCHECK asks there.
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("gateway.toml"),
        format!("listen = \"127.0.0.1:{gp}\"\nadmin = \"127.0.0.1:8081\"\n[registry]\naddress = \"{registry}\"\n[[routes]]\nname = \"catalog\"\npath = {{ prefix = \"/api/catalog\" }}\nupstream = \"catalog\"\nrewrite_prefix = \"/catalog\"\n[upstreams.catalog]\nservice = \"catalog\"\n"),
    )
    .unwrap();
    let mount = format!("{}:/config:ro", config.display());
    run(
        &gateway,
        &["-v", &mount],
        &["gateway", "--config", "/config/gateway.toml"],
    );
    let products = format!("http://127.0.0.1:{gp}/api/catalog/products");
    tessera_testkit::wait_until(
        "an answer from catalog through the gateway",
        Duration::from_secs(120),
        || async { get(&products).await.is_some_and(|(s, _)| s == 200) },
    )
    .await;
    let (_, body) = get(&products).await.unwrap();
    assert!(body.starts_with('['), "a product list: {body}");
    // The image's own HEALTHCHECK (`tessera health`), run the way podman runs it.
    tessera_testkit::wait_until(
        "the gateway's healthcheck passes",
        Duration::from_secs(60),
        || async { podman(&["healthcheck", "run", &gateway]).status.success() },
    )
    .await;
    let status = ok(
        "podman inspect",
        podman(&["inspect", "--format", "{{.State.Health.Status}}", &gateway]),
    );
    assert_eq!(status.trim(), "healthy");
    drop(cleanup);
}
