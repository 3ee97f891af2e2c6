//! Starting the `tessera` binary the way a user does, shared by the process tests.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedReceiver;

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// Starts `tessera server` on an ephemeral port with `extra` flags; returns it and its
/// address (from the line it prints when listening).
pub async fn spawn_server(data_dir: &Path, extra: &[&str]) -> (Child, String) {
    spawn_server_with(Command::new(BIN), "127.0.0.1:0", data_dir, extra).await
}

/// [`spawn_server`] through `cmd` (this binary, or it wrapped, as in `ip netns exec`),
/// listening on `bind`.
pub async fn spawn_server_with(
    mut cmd: Command,
    bind: &str,
    data_dir: &Path,
    extra: &[&str],
) -> (Child, String) {
    let mut child = cmd
        .args(["server", "--bind", bind, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env_remove("TESSERA_DATABASE_URL")
        .env_remove("TESSERA_EVENTS")
        .stdout(Stdio::piped())
        .stderr(server_log())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tessera server");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("server printed its address in time")
            .unwrap()
            .expect("server output");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// Where a spawned server's log goes: appended to `TESSERA_TEST_SERVER_LOG` when set
/// (to see what servers did in a failing test), else nowhere.
fn server_log() -> Stdio {
    std::env::var_os("TESSERA_TEST_SERVER_LOG")
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map_or_else(Stdio::null, Stdio::from)
}

/// Runs a client command against `addr`: (success, stdout, stderr).
pub async fn run_cli(addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("TESSERA_HTTP_ADDR", addr)
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `tessera gateway` started by [`spawn_gateway`].
pub struct Gateway {
    pub child: Child,
    pub addr: String,
    pub admin: String,
    /// Its log lines (`--log-format json`), parsed; read all the time, so a test that
    /// ignores them never blocks the gateway on a full pipe.
    pub logs: UnboundedReceiver<serde_json::Value>,
}

/// Starts `tessera gateway --config cfg` on ephemeral ports, logging JSON.
pub async fn spawn_gateway(cfg: &Path) -> Gateway {
    spawn_gateway_with(cfg, &[]).await
}

/// [`spawn_gateway`] with `env` added to its environment.
pub async fn spawn_gateway_with(cfg: &Path, env: &[(&str, &str)]) -> Gateway {
    let mut child = Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(cfg)
        .args(["--log-format", "json"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tessera gateway");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let url_after = |marker: &str| {
        line.split(marker)
            .nth(1)
            .unwrap()
            .split(|c: char| c.is_whitespace() || c == ',')
            .next()
            .unwrap()
            .to_owned()
    };
    let (addr, admin) = (
        url_after("listening on http://"),
        url_after("admin http://"),
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, logs) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            let parsed = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            let _ = tx.send(parsed);
        }
    });
    Gateway {
        child,
        addr,
        admin,
        logs,
    }
}

/// Starts `tessera upstream` (an echo server answering `hello from ID`) on an ephemeral
/// port: the process and its address.
pub async fn spawn_upstream(id: &str) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["upstream", "--bind", "127.0.0.1:0", "--id", id])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tessera upstream");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let addr = line.split("http://").nth(1).unwrap().trim().to_owned();
    (child, addr)
}

/// The next access-log line among a gateway's JSON logs (its other lines are skipped).
pub async fn next_access_line(
    logs: &mut UnboundedReceiver<serde_json::Value>,
) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let line = logs.recv().await.expect("the gateway's stderr closed");
            if line["target"] == "tessera_gateway::access" {
                return line;
            }
        }
    })
    .await
    .expect("no access log line")
}

/// The value after `name` in a command line.
pub fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// A duration as the CLI and the configs write it (`5s`, `300ms`), in seconds.
pub fn seconds(d: &str) -> f64 {
    tessera_core::parse_duration(d)
        .unwrap_or_else(|e| panic!("{d}: {e}"))
        .as_secs_f64()
}

/// `tessera shop <service>` against `registry`, on a free port; returns once it is
/// registered (it prints where it listens then).
pub async fn spawn_shop(service: &str, registry: &str, data_dir: &Path) -> Child {
    let mut child = Command::new(BIN)
        .args([
            "shop",
            service,
            "--listen",
            "127.0.0.1:0",
            "--registry",
            registry,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("TESSERA_DRAIN_DELAY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tessera shop");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the service came up in time")
            .unwrap()
            .expect("the service printed where it listens");
        if line.contains("registered as") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}
