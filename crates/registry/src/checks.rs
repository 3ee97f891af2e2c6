//! Health checks the server runs: one task per check, started when the check is registered
//! and stopped when it goes away, so probes never run on the API's path. Each probe task
//! starts at a random point of its interval, so checks registered together spread out.
//!
//! Three background guards live here too:
//! - the TTL watchdog of each TTL check, with the mass-expiry guard: if the server itself
//!   stalled (SIGSTOP, a VM pause) past a check's deadline, the check gets one more TTL
//!   instead of expiring, because its heartbeats may be queued behind the stall;
//! - the stall detector that notices such stalls from a 100 ms tick;
//! - the reaper that deregisters services critical for longer than their check's
//!   `DeregisterCriticalServiceAfter` (checked every 250 ms: seconds, not Consul's minute).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tessera_core::{GoDuration, Health};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::defs::DEFAULT_TIMEOUT;
use crate::model::{CheckSpec, Probe};
use crate::registry::Registry;
use crate::registry::{Backend, Backing, LogStore, backend};
use crate::state::Op;

/// A timer firing this much later than asked means the process was not running.
pub const STALL_SLACK: Duration = Duration::from_secs(1);
const STALL_TICK: Duration = Duration::from_millis(100);
const REAP_TICK: Duration = Duration::from_millis(250);
/// How often a TTL check held by the mass-expiry guard is decided again.
const HOLD_RECHECK: Duration = Duration::from_secs(1);
/// Most bytes of a probe's response kept as the check's output.
const MAX_OUTPUT: usize = 4096;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Handle {
    spec: CheckSpec,
    cancel: CancellationToken,
    ttl_reset: Option<watch::Sender<()>>,
}

/// A check: its node and check ID.
type CheckKey = (String, String);

/// The running check tasks: this node's TTL checks on one server, and the probes this
/// server owns (of any node, on etcd).
#[derive(Default)]
pub struct Runners {
    tasks: Mutex<HashMap<CheckKey, Handle>>,
    /// TTL checks among the tasks: the mass-expiry guard's denominator.
    ttl_count: std::sync::atomic::AtomicUsize,
    /// Checks start when their registration becomes durable, which the log's writer
    /// thread reports: it spawns them here.
    rt: OnceLock<tokio::runtime::Handle>,
    http: OnceLock<HttpClient>,
    grpc: OnceLock<HttpClient>,
}

impl Runners {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<CheckKey, Handle>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the task for check `id` of `node` (run for `reg`) unless one with the same
    /// spec already runs.
    pub fn ensure(&self, reg: &Weak<Registry>, node: &str, id: &str, spec: &CheckSpec) {
        let Some(rt) = self.rt.get() else {
            return; // not started yet; `start_background` picks every check up
        };
        let reg = reg.clone();
        let key = (node.to_owned(), id.to_owned());
        let mut tasks = self.tasks();
        if let Some(h) = tasks.get(&key) {
            if h.spec == *spec {
                return;
            }
            h.cancel.cancel();
            if h.ttl_reset.is_some() {
                self.ttl_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let cancel = CancellationToken::new();
        let mut ttl_reset = None;
        match &spec.probe {
            Probe::Ttl { ttl } => {
                let (tx, rx) = watch::channel(());
                ttl_reset = Some(tx);
                // A status restored after a restart holds for what its TTL had left.
                let first = reg
                    .upgrade()
                    .and_then(|r| {
                        r.ttl_resume
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(id)
                    })
                    .and_then(|m| m.remaining())
                    .map_or(*ttl, |left| left.min(*ttl));
                rt.spawn(run_ttl(reg, id.to_owned(), *ttl, first, rx, cancel.clone()));
            }
            _ => {
                let http = self.http.get_or_init(|| {
                    Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(Duration::from_secs(30))
                        .pool_max_idle_per_host(1)
                        .build_http()
                });
                let grpc = self.grpc.get_or_init(|| {
                    Client::builder(TokioExecutor::new())
                        .http2_only(true)
                        .pool_idle_timeout(Duration::from_secs(30))
                        .build_http()
                });
                let client = if matches!(spec.probe, Probe::Grpc { .. }) {
                    grpc.clone()
                } else {
                    http.clone()
                };
                rt.spawn(run_probe(
                    reg,
                    key.clone(),
                    spec.clone(),
                    client,
                    cancel.clone(),
                ));
            }
        }
        if ttl_reset.is_some() {
            self.ttl_count.fetch_add(1, Ordering::Relaxed);
        }
        tasks.insert(
            key,
            Handle {
                spec: spec.clone(),
                cancel,
                ttl_reset,
            },
        );
    }

    pub fn stop(&self, node: &str, id: &str) {
        if let Some(h) = self.tasks().remove(&(node.to_owned(), id.to_owned())) {
            h.cancel.cancel();
            if h.ttl_reset.is_some() {
                self.ttl_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stop_all(&self) {
        for (_, h) in self.tasks().drain() {
            h.cancel.cancel();
            if h.ttl_reset.is_some() {
                self.ttl_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// TTL checks running now.
    pub fn ttl_checks(&self) -> usize {
        self.ttl_count.load(Ordering::Relaxed)
    }

    /// The checks running now.
    fn running(&self) -> Vec<CheckKey> {
        self.tasks().keys().cloned().collect()
    }

    /// A TTL check was updated: its deadline restarts.
    pub fn reset_ttl(&self, node: &str, id: &str) {
        if let Some(Handle {
            ttl_reset: Some(tx),
            ..
        }) = self.tasks().get(&(node.to_owned(), id.to_owned()))
        {
            tx.send_replace(());
        }
    }
}

impl Registry {
    /// Starts the check runners for every local check, the stall detector and the reaper.
    /// Call once, inside a Tokio runtime.
    pub fn start_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        if self
            .runners
            .rt
            .set(tokio::runtime::Handle::current())
            .is_err()
        {
            return;
        }
        let statuses: Vec<((String, String), Health)> = self.read(|st| {
            st.checks
                .values()
                .filter(|c| {
                    c.spec
                        .as_ref()
                        .is_some_and(|s| s.deregister_critical_after.is_some())
                })
                .map(|c| ((c.node.clone(), c.check_id.clone()), c.status))
                .collect()
        });
        {
            let now = Instant::now();
            let mut cs = self
                .critical_since
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (id, status) in statuses {
                if status == Health::Critical {
                    cs.insert(id, now);
                }
            }
        }
        self.place_checks();
        tokio::spawn(self.ttl_state.clone().run(self.shutdown.clone()));
        tokio::spawn(stall_detector(weak.clone(), self.shutdown.clone()));
        tokio::spawn(reaper(weak.clone(), self.shutdown.clone()));
        self.start_session_clocks();
        tokio::spawn(crate::sessions::reaper(weak.clone(), self.shutdown.clone()));
        if let Some(etcd) = self.etcd() {
            tokio::spawn(etcd.clone().follow(weak.clone(), self.shutdown.clone()));
            tokio::spawn(
                etcd.clone()
                    .write_statuses(weak.clone(), self.shutdown.clone()),
            );
            tokio::spawn(etcd.clone().expire_ttls(weak, self.shutdown.clone()));
        }
    }

    /// Whether this server runs check `id` of `node`: on one server, every check of its
    /// node; on etcd, the probes the rendezvous hash gives it. TTL checks run nowhere on
    /// etcd: any server takes their heartbeats and the leader expires them.
    pub(crate) fn runs_check(&self, node: &str, id: &str, spec: &CheckSpec) -> bool {
        backend!(self, b => Backend::runs_check(b, self, node, id, spec))
    }

    /// Starts the checks this server runs and stops the ones it no longer does: at
    /// start, and on etcd whenever a member joins or leaves, so a dead server's checks
    /// move to the others (and only those: the hash keeps everyone else's in place).
    pub(crate) fn place_checks(&self) {
        let want: HashMap<CheckKey, CheckSpec> = self.read(|st| {
            st.checks
                .values()
                .filter_map(|c| {
                    let spec = c.spec.as_ref()?;
                    self.runs_check(&c.node, &c.check_id, spec)
                        .then(|| ((c.node.clone(), c.check_id.clone()), spec.clone()))
                })
                .collect()
        });
        for (node, id) in self.runners.running() {
            if !want.contains_key(&(node.clone(), id.clone())) {
                self.runners.stop(&node, &id);
            }
        }
        for ((node, id), spec) in want {
            self.runners.ensure(&self.me, &node, &id, &spec);
        }
    }

    /// Asks the mass-expiry guard about TTL check `id` reaching its deadline: `true` to
    /// hold it. A check already critical is not an expiry to count. Checks that expired
    /// just before protection started get their status back and a new TTL.
    fn hold_expiry(&self, id: &str, now: Instant) -> bool {
        let current = self.check_status(id).unwrap_or(Health::Critical);
        if current == Health::Critical {
            return false;
        }
        let total = self.runners.ttl_checks();
        let (verdict, restore) = self
            .guard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_expiry(id, current, total, now);
        let local = self.local_node();
        for (rid, before) in restore {
            self.set_status(
                local,
                &rid,
                before,
                "TTL expired with many others at once; held by mass-expiry protection".into(),
            );
            self.runners.reset_ttl(local, &rid);
        }
        verdict == crate::guard::Verdict::Hold
    }

    fn stalled_since(&self, t: Instant) -> bool {
        let last = self
            .last_stall_end
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last.is_some_and(|end| end >= t)
    }
}

async fn run_ttl(
    reg: Weak<Registry>,
    id: String,
    ttl: Duration,
    first: Duration,
    mut reset: watch::Receiver<()>,
    cancel: CancellationToken,
) {
    let mut deadline = Some(Instant::now() + first);
    let mut extended = false;
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = reset.changed() => {
                if changed.is_err() {
                    return;
                }
                deadline = Some(Instant::now() + ttl);
                extended = false;
            }
            _ = sleep => {
                let Some(reg) = reg.upgrade() else { return };
                let Some(due) = deadline else { continue };
                let now = Instant::now();
                let late = now.saturating_duration_since(due);
                let stalled = late > STALL_SLACK || reg.stalled_since(due.checked_sub(ttl).unwrap_or(due));
                if stalled && !extended {
                    tracing::warn!(check = %id, late = %GoDuration(late),
                        "server stalled past this TTL deadline; granting one more TTL instead of expiring");
                    extended = true;
                    deadline = Some(now + ttl);
                    continue;
                }
                if reg.hold_expiry(&id, now) {
                    // Held by the mass-expiry guard: decided again shortly.
                    deadline = Some(now + ttl.min(HOLD_RECHECK));
                    continue;
                }
                reg.ttl_state.forget(&id);
                reg.set_status(reg.local_node(), &id, Health::Critical, format!("TTL expired (no update for {})", GoDuration(ttl)));
                deadline = None;
            }
        }
    }
}

async fn run_probe(
    reg: Weak<Registry>,
    (node, id): CheckKey,
    spec: CheckSpec,
    client: HttpClient,
    cancel: CancellationToken,
) {
    let interval = spec.interval.unwrap_or(Duration::from_secs(10));
    let timeout = spec.timeout.unwrap_or(DEFAULT_TIMEOUT);
    // Spread checks over their interval (capped so a long interval does not delay the
    // first result by minutes).
    let spread = interval.min(Duration::from_secs(5));
    let jitter = Duration::from_nanos(fastrand::u64(..spread.as_nanos().max(1) as u64));
    let mut successes: u32 = 0;
    let mut failures: u32 = 0;
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(jitter) => {}
    }
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(timeout, probe(&spec.probe, &client)) => match r {
                Ok(o) => o,
                Err(_) => (Health::Critical, format!("{}: timed out after {}", describe(&spec.probe), GoDuration(timeout))),
            },
        };
        let Some(reg) = reg.upgrade() else { return };
        let (status, output) = outcome;
        let current = reg.read(|st| st.checks.get(&(node.clone(), id.clone())).map(|c| c.status));
        let Some(current) = current else { return };
        // Consecutive-result hysteresis, as Consul's SuccessBeforePassing and
        // FailuresBeforeWarning/Critical define it.
        let next = match status {
            Health::Passing => {
                successes = successes.saturating_add(1);
                failures = 0;
                (successes >= spec.success_before_passing.max(1)).then_some(Health::Passing)
            }
            Health::Warning => {
                failures = failures.saturating_add(1);
                successes = 0;
                (failures >= spec.failures_before_warning.max(1)).then_some(Health::Warning)
            }
            Health::Critical => {
                failures = failures.saturating_add(1);
                successes = 0;
                if failures >= spec.failures_before_critical.max(1) {
                    Some(Health::Critical)
                } else if failures >= spec.failures_before_warning.max(1) {
                    Some(Health::Warning)
                } else {
                    None
                }
            }
        };
        reg.set_status(&node, &id, next.unwrap_or(current), output);
        drop(reg);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Http { url, method, .. } => format!("HTTP {method} {url}"),
        Probe::Tcp { addr } => format!("TCP connect {addr}"),
        Probe::Grpc { target, .. } => format!("gRPC check {target}"),
        Probe::Ttl { .. } => "TTL".into(),
    }
}

async fn probe(p: &Probe, client: &HttpClient) -> (Health, String) {
    let what = describe(p);
    match p {
        Probe::Tcp { addr } => match tokio::net::TcpStream::connect(addr.as_str()).await {
            Ok(_) => (Health::Passing, format!("{what}: Success")),
            Err(e) => (Health::Critical, format!("{what}: {e}")),
        },
        Probe::Http {
            url,
            method,
            header,
            body,
            ..
        } => {
            let mut req = http::Request::builder()
                .method(method.as_str())
                .uri(url.as_str())
                .header(http::header::USER_AGENT, "Tessera Health Check")
                .header(http::header::ACCEPT, "text/plain, text/*, */*");
            for (k, vs) in header {
                for v in vs {
                    req = req.header(k.as_str(), v.as_str());
                }
            }
            let req = match req.body(Full::new(Bytes::from(body.clone()))) {
                Ok(r) => r,
                Err(e) => return (Health::Critical, format!("{what}: invalid request: {e}")),
            };
            match client.request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = read_capped(resp.into_body()).await;
                    let health = if status.is_success() {
                        Health::Passing
                    } else if status == http::StatusCode::TOO_MANY_REQUESTS {
                        Health::Warning
                    } else {
                        Health::Critical
                    };
                    (health, format!("{what}: {status} Output: {body}"))
                }
                Err(e) => (
                    Health::Critical,
                    format!("{what}: {}", tessera_core::error_chain(&e)),
                ),
            }
        }
        Probe::Grpc { target, .. } => grpc_probe(target, client).await,
        Probe::Ttl { .. } => (Health::Critical, "TTL checks are not probed".into()),
    }
}

async fn read_capped(body: hyper::body::Incoming) -> String {
    let mut body = body;
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            let room = MAX_OUTPUT.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= MAX_OUTPUT {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `grpc.health.v1.Health/Check` over h2c, encoded by hand: the request is one string
/// field and the answer one enum, so a protobuf toolchain would be all cost.
async fn grpc_probe(target: &str, client: &HttpClient) -> (Health, String) {
    let what = format!("gRPC check {target}");
    let (hostport, service) = target.split_once('/').unwrap_or((target, ""));
    let mut msg = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        encode_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(msg.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{hostport}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(Bytes::from(frame)));
    let req = match req {
        Ok(r) => r,
        Err(e) => return (Health::Critical, format!("{what}: invalid target: {e}")),
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            return (
                Health::Critical,
                format!("{what}: {}", tessera_core::error_chain(&e)),
            );
        }
    };
    if resp.status() != http::StatusCode::OK {
        return (
            Health::Critical,
            format!("{what}: HTTP status {}", resp.status()),
        );
    }
    let header_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let collected = match resp.into_body().collect().await {
        Ok(c) => c,
        Err(e) => {
            return (
                Health::Critical,
                format!("{what}: {}", tessera_core::error_chain(&e)),
            );
        }
    };
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let data = collected.to_bytes();
    let code = trailer_status.or(header_status).unwrap_or_default();
    if code != "0" {
        return (Health::Critical, format!("{what}: grpc-status {code:?}"));
    }
    if data.len() < 5 {
        return (Health::Critical, format!("{what}: empty response"));
    }
    let status = decode_status(&data[5..]);
    match status {
        1 => (Health::Passing, format!("{what}: status: SERVING")),
        0 => (Health::Critical, format!("{what}: status: UNKNOWN")),
        2 => (Health::Critical, format!("{what}: status: NOT_SERVING")),
        3 => (Health::Critical, format!("{what}: status: SERVICE_UNKNOWN")),
        n => (Health::Critical, format!("{what}: status: {n}")),
    }
}

fn encode_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field 1 (varint) of `HealthCheckResponse`; 0 (UNKNOWN) when absent.
fn decode_status(msg: &[u8]) -> u64 {
    let mut i = 0;
    let varint = |i: &mut usize| -> Option<u64> {
        let mut v = 0u64;
        let mut shift = 0;
        while *i < msg.len() && shift < 64 {
            let b = msg[*i];
            *i += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
            shift += 7;
        }
        None
    };
    while i < msg.len() {
        let Some(tag) = varint(&mut i) else { return 0 };
        match (tag >> 3, tag & 7) {
            (1, 0) => return varint(&mut i).unwrap_or(0),
            (_, 0) => {
                if varint(&mut i).is_none() {
                    return 0;
                }
            }
            (_, 2) => {
                let Some(len) = varint(&mut i) else { return 0 };
                i = i.saturating_add(len as usize);
            }
            (_, 1) => i += 8,
            (_, 5) => i += 4,
            _ => return 0,
        }
    }
    0
}

async fn stall_detector(reg: Weak<Registry>, cancel: CancellationToken) {
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(STALL_TICK) => {}
        }
        let now = Instant::now();
        let gap = now.saturating_duration_since(last);
        if gap > STALL_TICK + STALL_SLACK {
            let Some(reg) = reg.upgrade() else { return };
            tracing::warn!(gap = %GoDuration(gap), "server was stalled; TTL checks due during the stall get one more TTL");
            *reg.last_stall_end.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        }
        last = now;
    }
}

async fn reaper(reg: Weak<Registry>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(REAP_TICK) => {}
        }
        let Some(reg) = reg.upgrade() else { return };
        // With N servers, one reaps, for every node: the leader.
        if !reg.is_leader() {
            continue;
        }
        let now = Instant::now();
        let critical: Vec<((String, String), Instant)> = reg
            .critical_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if critical.is_empty() {
            continue;
        }
        let due: Vec<(String, String, String)> = reg.read(|st| {
            critical
                .iter()
                .filter_map(|(key, since)| {
                    let c = st.checks.get(key)?;
                    let after = c.spec.as_ref()?.deregister_critical_after?;
                    (!c.service_id.is_empty() && now.saturating_duration_since(*since) >= after)
                        .then(|| (key.0.clone(), c.service_id.clone(), key.1.clone()))
                })
                .collect()
        });
        for (node, service_id, check_id) in due {
            tracing::info!(node = %node, service = %service_id, check = %check_id,
                "deregistering service: check critical for longer than DeregisterCriticalServiceAfter");
            let result = reg
                .commit_as_member(|st, _| {
                    let ops = if st
                        .services
                        .contains_key(&(node.clone(), service_id.clone()))
                    {
                        vec![Op::DeleteService {
                            node: node.clone(),
                            id: service_id.clone(),
                        }]
                    } else {
                        vec![]
                    };
                    Ok((ops, ()))
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, service = %service_id, "reaper could not deregister");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_decoding() {
        assert_eq!(decode_status(&[0x08, 0x01]), 1);
        assert_eq!(decode_status(&[0x08, 0x02]), 2);
        assert_eq!(decode_status(&[]), 0);
        // An unknown length-delimited field before the status is skipped.
        assert_eq!(decode_status(&[0x12, 0x02, b'h', b'i', 0x08, 0x01]), 1);
        assert_eq!(decode_status(&[0x08]), 0);
    }
}
