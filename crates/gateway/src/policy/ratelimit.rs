//! Cluster-wide rate limits: the same GCRA as the local limiter
//! (`tessera_resilience::RateLimiter`), kept in Redis so every gateway replica spends the
//! same budget. Each decision is one atomic script run on Redis's own clock, so the limit
//! is exact across replicas (no local share, no sync interval). When Redis does not
//! answer within its deadline the request is decided by the replica's local limiter, so
//! during an outage each replica allows up to the full limit on its own.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tessera_resilience::Decision;
use tokio::time::Instant;

use crate::floor::error::GatewayError;
use crate::protocol::redis::{Redis, Reply};

/// KEYS[1]: the key. ARGV[1]: emission interval, µs. ARGV[2]: tolerance (burst - 1
/// intervals), µs. Returns {1, remaining} or {0, retry after µs}. Times are whole
/// microseconds written with `%.0f`: Redis would format a Lua number with 14 digits.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, math.ceil(tat - now - tolerance)}
end
local nxt = math.floor(tat + interval + 0.5)
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1)
return {1, math.floor((tolerance + interval - (nxt - now)) / interval)}
";

/// Whose budget a request spends.
pub enum RateKey {
    Ip,
    Header(HeaderName),
    JwtSub,
}

pub struct RateLimit {
    pub key: RateKey,
    /// Kept across reloads while the route's name and limit stay the same, so a reload
    /// does not hand every client a fresh burst.
    pub limiter: Arc<tessera_resilience::RateLimiter<Vec<u8>>>,
    /// The shared budget (`shared = true`); `limiter` decides when Redis cannot.
    pub cluster: Option<ClusterLimit>,
}

/// What a request admitted by a route's limit leaves of it, for the `RateLimit-*` fields.
#[derive(Clone, Copy)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
}

impl RateLimit {
    /// Spends one request of the client's budget, or refuses it. `subject` is the
    /// verified identity, for limits keyed on it; clients without the key the limit is
    /// set on share their address's budget.
    pub async fn check(
        &self,
        headers: &HeaderMap,
        subject: Option<String>,
        ip: &HeaderValue,
        now: Instant,
    ) -> Result<Quota, GatewayError> {
        let key: Vec<u8> = match &self.key {
            RateKey::Header(name) => headers.get(name).map(|v| v.as_bytes().to_vec()),
            RateKey::JwtSub => subject.map(String::into_bytes),
            RateKey::Ip => None,
        }
        .unwrap_or_else(|| ip.as_bytes().to_vec());
        let limit = self.limiter.config().burst;
        let shared = match &self.cluster {
            // Boxed: a Redis round trip, paid for only by shared limits.
            Some(cluster) => Box::pin(cluster.check(&key)).await,
            None => None,
        };
        match shared.unwrap_or_else(|| self.limiter.check_at(&key, now)) {
            Decision::Allow { remaining } => Ok(Quota { limit, remaining }),
            Decision::Deny { retry_after } => Err(GatewayError::RateLimited { limit, retry_after }),
        }
    }
}

pub struct ClusterLimit {
    redis: Arc<Redis>,
    /// `{prefix}{route}:`, then the client key's hash.
    prefix: Vec<u8>,
    interval_us: String,
    tolerance_us: String,
    sha: String,
}

/// The script's SHA-1, as `EVALSHA` wants it.
fn script_sha() -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, SCRIPT.as_bytes());
    crate::floor::hex(d.as_ref())
}

/// Commands each new Redis connection runs before serving: `AUTH` when configured, then
/// loading the script so `EVALSHA` finds it.
pub fn on_connect(username: Option<&str>, password: Option<&str>) -> Vec<Vec<Vec<u8>>> {
    let mut cmds = Vec::new();
    match (username, password) {
        (Some(u), Some(p)) => cmds.push(vec![b"AUTH".to_vec(), u.into(), p.into()]),
        (None, Some(p)) => cmds.push(vec![b"AUTH".to_vec(), p.into()]),
        _ => {}
    }
    cmds.push(vec![b"SCRIPT".to_vec(), b"LOAD".to_vec(), SCRIPT.into()]);
    cmds
}

impl ClusterLimit {
    pub fn new(redis: Arc<Redis>, prefix: &str, route: &str, rate: f64, burst: u32) -> Self {
        let interval = 1e6 / rate;
        ClusterLimit {
            redis,
            prefix: format!("{prefix}{route}:").into_bytes(),
            interval_us: format!("{interval:.3}"),
            tolerance_us: format!("{:.3}", interval * f64::from(burst.max(1) - 1)),
            sha: script_sha(),
        }
    }

    /// The shared decision, or `None` when Redis cannot give one (the caller decides
    /// locally).
    pub async fn check(&self, key: &[u8]) -> Option<Decision> {
        // Stored hashed: a key can be a secret (an API key in a header), and whoever
        // can list Redis keys must not learn it. 128 bits of SHA-256 keep collisions out
        // of reach.
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        let mut full = self.prefix.clone();
        full.extend_from_slice(crate::floor::hex(&digest.as_ref()[..16]).as_bytes());
        let (interval, tolerance) = (self.interval_us.as_bytes(), self.tolerance_us.as_bytes());
        let mut reply = self
            .redis
            .call(&[
                b"EVALSHA",
                self.sha.as_bytes(),
                b"1",
                &full,
                interval,
                tolerance,
            ])
            .await
            .ok()?;
        if matches!(&reply, Reply::Error(e) if e.starts_with("NOSCRIPT")) {
            // Redis lost its script cache (SCRIPT FLUSH): send the text, which reloads it.
            reply = self
                .redis
                .call(&[b"EVAL", SCRIPT.as_bytes(), b"1", &full, interval, tolerance])
                .await
                .ok()?;
        }
        match reply {
            Reply::Array(v) => match v.as_slice() {
                [Reply::Int(1), Reply::Int(remaining)] => Some(Decision::Allow {
                    remaining: (*remaining).clamp(0, i64::from(u32::MAX)) as u32,
                }),
                [Reply::Int(0), Reply::Int(us)] => Some(Decision::Deny {
                    retry_after: Duration::from_micros((*us).max(0) as u64),
                }),
                _ => None,
            },
            Reply::Error(e) => {
                tracing::warn!(error = %e, "redis refused the rate-limit script; deciding locally");
                None
            }
            _ => None,
        }
    }
}
