//! Commands that talk to a running server over the Consul HTTP API, so they work against a
//! real Consul too.

use std::path::PathBuf;

use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::server::{self, ServerArgs};

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: registry, gateway and coordination in one binary"
)]
pub struct Cli {
    /// Server to talk to (default: $TESSERA_HTTP_ADDR, else $CONSUL_HTTP_ADDR, else
    /// 127.0.0.1:8500); several, comma-separated, for servers sharing one catalog: the next
    /// is tried when one cannot be reached.
    #[arg(long, global = true)]
    http_addr: Option<String>,
    /// ACL token (default: $TESSERA_HTTP_TOKEN, else $CONSUL_HTTP_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Log lines as text (coloured only on a terminal) or as JSON objects, one per line.
    /// Which lines: $TESSERA_LOG, e.g. `info`, `warn,tessera_gateway::access=info`.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TESSERA_LOG_FORMAT",
        default_value_t
    )]
    pub log_format: crate::log::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the registry server (Consul HTTP API).
    Server(ServerArgs),
    /// Run the L7 gateway.
    Gateway(crate::gateway::GatewayArgs),
    /// Run the demo shop on the whole platform: server, gateway, two replicas of each
    /// shop service; `--load` drives traffic, `--chaos` kills replicas, `--verify`
    /// checks the data.
    Demo(Box<crate::demo::DemoArgs>),
    /// Run one demo-shop service (what `tessera demo` starts).
    Shop {
        #[arg(value_enum)]
        service: tessera_shop::Service,
        #[command(flatten)]
        args: tessera_shop::ShopArgs,
    },
    /// Exit 0 when a Tessera process answers ready, else 1 with the reason (the images'
    /// HEALTHCHECK: they have no curl).
    Health(crate::health::HealthArgs),
    /// Run a tiny HTTP upstream (for benchmarks and demos).
    #[command(hide = true)]
    Upstream(crate::upstream::UpstreamArgs),
    /// Load a gRPC server with unary calls (for bench/grpc.sh).
    #[command(hide = true)]
    GrpcLoad(crate::grpc_load::GrpcLoadArgs),
    /// List services, or the instances of one service with their health.
    Services { name: Option<String> },
    /// Read and write the KV store.
    Kv {
        #[command(subcommand)]
        op: KvOp,
    },
    /// Register a service from a JSON file (the body of /v1/agent/service/register).
    Register { file: PathBuf },
    /// Deregister a service instance by ID.
    Deregister { id: String },
    /// Start, inspect and list sagas on the coordinator.
    Saga {
        #[command(subcommand)]
        op: SagaOp,
    },
}

#[derive(Debug, Subcommand)]
enum SagaOp {
    /// Start a saga from a JSON definition file (the body of POST /v1/sagas).
    Start {
        file: PathBuf,
        /// Starting twice with the same key returns the first saga.
        #[arg(long)]
        key: Option<String>,
        /// Wait until it ends; exit 1 unless it completed.
        #[arg(long)]
        wait: bool,
    },
    /// Print a saga: status, each step's attempts and outcomes.
    Get { id: String },
    /// List sagas, newest first.
    List {
        /// running, compensating, completed, compensated or stuck.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
enum KvOp {
    /// Print a key's value.
    Get { key: String },
    /// Set a key (VALUE, or stdin when VALUE is "-").
    Put {
        key: String,
        value: String,
        /// Only write if the key's ModifyIndex is this (0: only if absent).
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Delete a key, or everything under it with --recurse.
    Delete {
        key: String,
        #[arg(long)]
        recurse: bool,
    },
    /// List keys under a prefix.
    Ls { prefix: Option<String> },
}

impl Cli {
    pub async fn run(self) -> Result<(), String> {
        let api = Api::new(self.http_addr, self.token);
        match self.command {
            Command::Server(args) => server::run(args).await,
            Command::Gateway(args) => crate::gateway::run(args).await,
            Command::Upstream(args) => crate::upstream::run(args).await,
            Command::GrpcLoad(args) => crate::grpc_load::run(args).await,
            Command::Health(args) => crate::health::run(args).await,
            Command::Demo(args) => crate::demo::run(*args).await,
            Command::Shop { service, args } => {
                tessera_shop::run(service, args, tokio_util::sync::CancellationToken::new()).await
            }
            Command::Services { name: None } => {
                let v = api
                    .get_json("/v1/catalog/services")
                    .await?
                    .ok_or("no services")?;
                let obj = v.as_object().ok_or("unexpected response")?;
                println!("{:<32} TAGS", "SERVICE");
                for (name, tags) in obj {
                    let tags: Vec<&str> = tags
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    println!("{name:<32} {}", tags.join(","));
                }
                Ok(())
            }
            Command::Services { name: Some(name) } => {
                let path = format!("/v1/health/service/{}", encode_path(&name));
                let v = api.get_json(&path).await?.unwrap_or(Value::Array(vec![]));
                let entries = v.as_array().ok_or("unexpected response")?;
                println!(
                    "{:<24} {:<16} {:<22} {:<9} {:<7} CHECKS",
                    "ID", "NODE", "ADDRESS", "HEALTH", "WEIGHT"
                );
                for e in entries {
                    let svc = &e["Service"];
                    let node = &e["Node"];
                    let addr = svc["Address"]
                        .as_str()
                        .filter(|a| !a.is_empty())
                        .or(node["Address"].as_str())
                        .unwrap_or("");
                    let checks = e["Checks"].as_array().cloned().unwrap_or_default();
                    let worst = checks
                        .iter()
                        .filter_map(|c| c["Status"].as_str())
                        .max_by_key(|s| match *s {
                            "passing" => 0,
                            "warning" => 1,
                            _ => 2,
                        })
                        .unwrap_or("passing");
                    let names: Vec<String> = checks
                        .iter()
                        .map(|c| {
                            format!(
                                "{}={}",
                                c["CheckID"].as_str().unwrap_or(""),
                                c["Status"].as_str().unwrap_or("")
                            )
                        })
                        .collect();
                    println!(
                        "{:<24} {:<16} {:<22} {:<9} {:<7} {}",
                        svc["ID"].as_str().unwrap_or(""),
                        node["Node"].as_str().unwrap_or(""),
                        format!("{addr}:{}", svc["Port"]),
                        worst,
                        svc["Weights"]["Passing"],
                        names.join(" ")
                    );
                }
                Ok(())
            }
            Command::Kv { op } => kv(&api, op).await,
            Command::Register { file } => {
                let body = std::fs::read(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                serde_json::from_slice::<Value>(&body)
                    .map_err(|e| format!("{} is not valid JSON: {e}", file.display()))?;
                api.send("PUT", "/v1/agent/service/register", body).await?;
                println!("registered service from {}", file.display());
                Ok(())
            }
            Command::Deregister { id } => {
                let path = format!("/v1/agent/service/deregister/{}", encode_path(&id));
                api.send("PUT", &path, Vec::new()).await?;
                println!("deregistered {id}");
                Ok(())
            }
            Command::Saga { op } => saga(&api, op).await,
        }
    }
}

async fn saga(api: &Api, op: SagaOp) -> Result<(), String> {
    match op {
        SagaOp::Start { file, key, wait } => {
            let body =
                std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            serde_json::from_slice::<Value>(&body)
                .map_err(|e| format!("{} is not valid JSON: {e}", file.display()))?;
            let headers: Vec<(&str, &str)> = key
                .as_deref()
                .map(|k| ("idempotency-key", k))
                .into_iter()
                .collect();
            let (status, text) = api.call_with("POST", "/v1/sagas", body, &headers).await?;
            if status != 201 && status != 200 {
                return Err(format!("server answered {status}: {}", text.trim()));
            }
            let saga: Value =
                serde_json::from_str(&text).map_err(|e| format!("bad JSON from server: {e}"))?;
            let id = saga["id"].as_str().unwrap_or_default().to_owned();
            println!(
                "saga {id} {}",
                if status == 201 {
                    "started"
                } else {
                    "already started with this key"
                }
            );
            if !wait {
                return Ok(());
            }
            let path = format!("/v1/sagas/{}", encode_path(&id));
            loop {
                let Some(s) = api.get_json(&path).await? else {
                    return Err(format!("saga {id} disappeared"));
                };
                let st = s["status"].as_str().unwrap_or_default();
                if matches!(st, "completed" | "compensated" | "stuck") {
                    println!("saga {id} {st}");
                    if let Some(e) = s["error"].as_str() {
                        println!("  {e}");
                    }
                    return if st == "completed" {
                        Ok(())
                    } else {
                        Err(format!("saga {id} ended {st}"))
                    };
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        SagaOp::Get { id } => {
            let path = format!("/v1/sagas/{}", encode_path(&id));
            match api.get_json(&path).await? {
                Some(s) => {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                    Ok(())
                }
                None => Err(format!("no saga {id}")),
            }
        }
        SagaOp::List { status, limit } => {
            let mut path = format!("/v1/sagas?limit={limit}");
            if let Some(s) = &status {
                path.push_str(&format!("&status={}", encode_path(s)));
            }
            let list = api.get_json(&path).await?.unwrap_or(Value::Null);
            for s in list.as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<12}  {}",
                    s["id"].as_str().unwrap_or_default(),
                    s["status"].as_str().unwrap_or_default(),
                    s["name"].as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

async fn kv(api: &Api, op: KvOp) -> Result<(), String> {
    match op {
        KvOp::Get { key } => {
            let path = format!("/v1/kv/{}", encode_path(&key));
            let v = api
                .get_json(&path)
                .await?
                .ok_or_else(|| format!("key {key:?} not found"))?;
            let value = v[0]["Value"].as_str().unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|e| format!("server sent bad base64: {e}"))?;
            use std::io::Write;
            std::io::stdout()
                .write_all(&bytes)
                .and_then(|()| std::io::stdout().write_all(b"\n"))
                .map_err(|e| e.to_string())
        }
        KvOp::Put { key, value, cas } => {
            let body = if value == "-" {
                use std::io::Read;
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .map_err(|e| format!("reading stdin: {e}"))?;
                buf
            } else {
                value.into_bytes()
            };
            let mut path = format!("/v1/kv/{}", encode_path(&key));
            if let Some(c) = cas {
                path.push_str(&format!("?cas={c}"));
            }
            let resp = api.send("PUT", &path, body).await?;
            if resp.trim() == "false" {
                return Err(format!("CAS failed: {key:?} changed since index {cas:?}"));
            }
            println!("ok");
            Ok(())
        }
        KvOp::Delete { key, recurse } => {
            let mut path = format!("/v1/kv/{}", encode_path(&key));
            if recurse {
                path.push_str("?recurse");
            }
            api.send("DELETE", &path, Vec::new()).await?;
            println!("ok");
            Ok(())
        }
        KvOp::Ls { prefix } => {
            let prefix = prefix.unwrap_or_default();
            let path = format!("/v1/kv/{}?keys", encode_path(&prefix));
            if let Some(v) = api.get_json(&path).await? {
                for k in v.as_array().into_iter().flatten() {
                    println!("{}", k.as_str().unwrap_or(""));
                }
            }
            Ok(())
        }
    }
}

/// Percent-encodes a key for a URL path, keeping `/` so prefixes read naturally.
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct Api {
    /// The servers, in the order they are tried.
    bases: Vec<String>,
    token: Option<String>,
    client: crate::http::Http,
}

impl Api {
    fn new(addr: Option<String>, token: Option<String>) -> Api {
        let addr = addr
            .or_else(|| std::env::var("TESSERA_HTTP_ADDR").ok())
            .or_else(|| std::env::var("CONSUL_HTTP_ADDR").ok())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "127.0.0.1:8500".into());
        let bases = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                if a.starts_with("http://") {
                    a.trim_end_matches('/').to_owned()
                } else {
                    format!("http://{}", a.trim_end_matches('/'))
                }
            })
            .collect();
        let token = token
            .or_else(|| std::env::var("TESSERA_HTTP_TOKEN").ok())
            .or_else(|| std::env::var("CONSUL_HTTP_TOKEN").ok())
            .filter(|t| !t.is_empty());
        Api {
            bases,
            token,
            client: crate::http::Http::new(),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, String), String> {
        self.call_with(method, path, body, &[]).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String), String> {
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(t) = &self.token {
            all.push(("X-Consul-Token", t));
        }
        let body = Bytes::from(body);
        let mut last = String::from("no server given");
        for base in &self.bases {
            let url = format!("{base}{path}");
            match self
                .client
                .raw_request(method, &url, &all, body.clone())
                .await
            {
                Ok((status, body)) => {
                    return Ok((status, String::from_utf8_lossy(&body).into_owned()));
                }
                // Nothing was sent: the next server may take it.
                Err((true, e)) => last = format!("cannot reach {base}: {e}"),
                Err((false, e)) => return Err(format!("cannot reach {base}: {e}")),
            }
        }
        Err(last)
    }

    async fn get_json(&self, path: &str) -> Result<Option<Value>, String> {
        let (status, body) = self.call("GET", path, Vec::new()).await?;
        match status {
            200 => serde_json::from_str(&body)
                .map(Some)
                .map_err(|e| format!("bad JSON from server: {e}")),
            404 => Ok(None),
            s => Err(format!("server answered {s}: {}", body.trim())),
        }
    }

    async fn send(&self, method: &str, path: &str, body: Vec<u8>) -> Result<String, String> {
        let (status, body) = self.call(method, path, body).await?;
        if status == 200 {
            Ok(body)
        } else {
            Err(format!("server answered {status}: {}", body.trim()))
        }
    }
}
