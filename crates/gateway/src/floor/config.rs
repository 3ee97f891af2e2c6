//! The gateway's TOML config. Every struct denies unknown keys, so a typo fails at load
//! with the key's name; `validate` checks what types cannot (references between sections,
//! regexes, ranges) and names the key in each message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tessera_balance::Policy;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {key}: {problem}")]
    Invalid { key: String, problem: String },
}

pub(crate) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    tessera_core::parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| tessera_core::parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Threads that accept and serve connections, each with its own listener
    /// (`SO_REUSEPORT`) and upstream connections: `"auto"` (one per available core) or a
    /// number. Routes, discovery and every limit and breaker are shared by all of them.
    #[serde(default)]
    pub workers: Workers,
    #[serde(default)]
    pub registry: RegistryConfig,
    /// After SIGTERM, how long the gateway goes on serving while its `/readyz` answers
    /// 503, so load balancers and Kubernetes stop sending to it before it stops
    /// accepting (a rolling restart loses no request). Default 0: stop accepting at once.
    #[serde(default, deserialize_with = "duration")]
    pub drain_delay: Duration,
    /// How long SIGTERM waits for in-flight requests, once the gateway stops accepting.
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// How long a client has to send a complete request head, counted from the end of
    /// the previous response on a keep-alive connection (so it is also the keep-alive
    /// idle timeout): the slow-client defence.
    #[serde(default = "default_header_read", deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// Largest request body buffered so the request can be retried.
    #[serde(default = "default_replay_cap")]
    pub max_replay_body_bytes: usize,
    /// Requests being proxied at once, over all routes; more get 503 at once instead of
    /// queueing without bound (0: no limit).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Open client connections per client address; more are answered 503 and closed
    /// (0: no limit).
    #[serde(default = "default_conns_per_ip")]
    pub max_connections_per_ip: u32,
    /// Clients (CIDRs, `10.0.0.0/8`, `::1/128`) whose `X-Forwarded-For` is extended;
    /// from anyone else `X-Forwarded-*` and `Forwarded` are replaced, so a client cannot
    /// pose as another address to the upstream.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// `reject` (default): a path with `%2F` or `%5C` gets 400; `keep`: they pass but stay
    /// encoded, never decoded into a separator.
    #[serde(default)]
    pub encoded_slashes: EncodedSlashes,
    /// What routes without their own `path_params` do with `;` path parameters.
    /// `reject` (default): 400 (Tomcat, Jetty and Spring drop them, so `/admin;x` would
    /// reach `/admin` behind a route for `/`); `strip`: removed from every segment and
    /// forwarded without them; `keep`: forwarded as received (for backends that use
    /// them). Routes are always found by the path without them, as those backends read
    /// it, so no choice lets `/public/..;/admin` past the route for `/admin`.
    #[serde(default)]
    pub path_params: crate::floor::path::PathParams,
    /// Largest request body accepted: a larger `Content-Length` gets 413 before anything
    /// is forwarded.
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: u64,
    #[serde(default)]
    pub access_log: AccessLog,
    /// Reload when the config file changes (checked every second). SIGHUP and
    /// `POST /admin/reload` work either way.
    #[serde(default = "yes")]
    pub watch_config: bool,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// JWT issuers routes can require (`auth = { jwt = "NAME" }`), by name.
    #[serde(default)]
    pub jwt: BTreeMap<String, JwtConfig>,
    /// API keys for machine clients (`auth = { api_keys = true }`), by name; only their
    /// SHA-256 is kept in the config.
    #[serde(default)]
    pub api_keys: BTreeMap<String, ApiKeyConfig>,
    /// TLS termination on a second listener (`listen` keeps serving plain HTTP).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Where rate limits with `shared = true` keep their state.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
}

/// Most worker threads a config may ask for.
pub const MAX_WORKERS: usize = 1024;

/// `workers`: `"auto"` or a count from 1 to `MAX_WORKERS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "WorkersValue")]
pub enum Workers {
    #[default]
    Auto,
    Count(usize),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WorkersValue {
    Name(String),
    Count(i64),
}

impl TryFrom<WorkersValue> for Workers {
    type Error = String;

    fn try_from(v: WorkersValue) -> Result<Workers, String> {
        match v {
            WorkersValue::Name(n) if n == "auto" => Ok(Workers::Auto),
            WorkersValue::Count(n) if (1..=MAX_WORKERS as i64).contains(&n) => {
                Ok(Workers::Count(n as usize))
            }
            WorkersValue::Name(n) => Err(format!("workers: \"auto\" or a number, not {n:?}")),
            WorkersValue::Count(n) => Err(format!("workers: 1 to {MAX_WORKERS}, not {n}")),
        }
    }
}

impl std::str::FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Workers, String> {
        match s.trim().parse::<i64>() {
            Ok(n) => Workers::try_from(WorkersValue::Count(n)),
            Err(_) => Workers::try_from(WorkersValue::Name(s.trim().to_owned())),
        }
    }
}

impl Workers {
    /// How many threads: `Auto` is the cores this process may run on.
    pub fn count(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(MAX_WORKERS),
        }
    }
}

/// `[redis]`: one pipelined connection per gateway, re-established in the background.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `host:port`.
    pub address: String,
    /// How long a rate-limit decision may wait for Redis before the local limiter
    /// decides instead.
    #[serde(default = "default_redis_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Prepended to every key (`{prefix}{route}:{SHA-256 of the client key}`: a client key
    /// may be a secret, such as an API key).
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    /// ACL user for `AUTH` (Redis 6+); the password alone uses the default user.
    pub username: Option<String>,
    /// `TESSERA_REDIS_PASSWORD` in the environment wins. Never logged.
    pub password: Option<String>,
}

// Secrets stay out of debug output (and so out of any log line that prints a config).
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(redacted)"))
            .finish()
    }
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "(redacted)"))
            .field("wait", &self.wait)
            .finish()
    }
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(50)
}

fn default_redis_prefix() -> String {
    "tessera:rl:".into()
}

/// `[tls]`: certificates are chosen by SNI and re-read when their files change; a reload
/// may name other files. `listen` and `min_version` take a restart to change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default = "default_tls_listen")]
    pub listen: SocketAddr,
    /// `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// PEM files: `cert` holds the chain, leaf first; `key` its PKCS#8, PKCS#1 or SEC1
    /// private key. The first is served to clients whose SNI matches none.
    pub certificates: Vec<CertFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

fn default_tls_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_header_read() -> Duration {
    Duration::from_secs(30)
}
fn default_replay_cap() -> usize {
    64 * 1024
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `host:port` of tessera server or Consul; or several, comma-separated, of servers
    /// sharing one catalog (discovery moves to the next when one fails).
    #[serde(default = "default_registry")]
    pub address: String,
    /// ACL token; `TESSERA_REGISTRY_TOKEN` in the environment wins. Never logged.
    #[serde(default)]
    pub token: Option<String>,
    /// Blocking-query wait.
    #[serde(default = "default_wait", deserialize_with = "duration")]
    pub wait: Duration,
}

fn default_max_in_flight() -> usize {
    10_000
}
fn default_conns_per_ip() -> u32 {
    1024
}
fn default_max_body() -> u64 {
    64 * 1024 * 1024
}

fn default_registry() -> String {
    "127.0.0.1:8500".into()
}
fn default_wait() -> Duration {
    Duration::from_secs(300)
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            address: default_registry(),
            token: None,
            wait: default_wait(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// Share of requests logged (0 = off, 1 = all), as events on the `tracing` target
    /// `tessera_gateway::access` (a JSON line each with `--log-format json`).
    #[serde(default)]
    pub sample: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Option<String>,
    /// Exact host, or `*.example.com` for any subdomain.
    pub host: Option<String>,
    #[serde(default)]
    pub path: PathMatch,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header name → exact value that must be present.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Name of an entry in `[upstreams]`.
    pub upstream: Option<String>,
    /// Remove the matched prefix before forwarding (prefix routes only).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the matched prefix with this one (prefix routes only).
    pub rewrite_prefix: Option<String>,
    /// Route deadline over all tries (default 15 s).
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Per-try timeout (default: the route deadline).
    #[serde(default, deserialize_with = "opt_duration")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<RetryConfig>,
    #[serde(default)]
    pub request_headers: HeaderEdits,
    #[serde(default)]
    pub response_headers: HeaderEdits,
    /// A static answer when no upstream answer can be had.
    pub fallback: Option<Fallback>,
    /// Who may use the route: checked before anything is forwarded.
    #[serde(default)]
    pub auth: Option<RouteAuth>,
    /// Requests per client allowed through (429 beyond), checked after `auth`.
    #[serde(default)]
    pub rate_limit: Option<RateLimitRoute>,
    /// `;` path parameters on this route (the gateway's `path_params` when unset):
    /// `reject`, `strip` or `keep`. Whatever is chosen, the route was found by the path
    /// without them, as Tomcat reads it.
    #[serde(default)]
    pub path_params: Option<crate::floor::path::PathParams>,
    /// Translate gRPC-Web (`application/grpc-web`, `application/grpc-web-text`) calls,
    /// such as a browser's, to gRPC for the upstream and the answers back, as Envoy's
    /// grpc_web filter does. The upstream must speak gRPC (`protocol = "h2c"`).
    #[serde(default)]
    pub grpc_web: bool,
}

/// A route's rate limit: `burst` requests at once, then `rate` per second, per key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRoute {
    pub rate: f64,
    pub burst: u32,
    /// Whose budget a request spends: `ip` (the client address, the default),
    /// `header:NAME` (e.g. an API key; the address when absent) or `jwt_sub` (the
    /// verified token's subject; needs `auth`).
    #[serde(default = "default_rate_key")]
    pub key: String,
    /// Keys tracked at most (memory stays bounded; expired keys are pruned).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Spend one budget across every gateway using the same `[redis]` (exact while Redis
    /// answers; each gateway limits on its own while it does not).
    #[serde(default)]
    pub shared: bool,
}

fn default_rate_key() -> String {
    "ip".into()
}
fn default_max_keys() -> usize {
    1_000_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlashes {
    #[default]
    Reject,
    Keep,
}

/// A route's access rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuth {
    /// Name of a `[jwt.NAME]` issuer whose valid bearer token the request must carry
    /// (401 otherwise).
    #[serde(default)]
    pub jwt: Option<String>,
    /// Also (or only) accept a configured API key in `X-Api-Key`; its name goes upstream
    /// in `X-Api-Key-Name` (and is the subject for `rate_limit` key `jwt_sub`), the key
    /// itself does not.
    #[serde(default)]
    pub api_keys: bool,
    /// The token's `roles` claim must hold one of these (403 otherwise); empty: any
    /// valid token.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Claims the token must carry, all of them (403 otherwise): a string claim must
    /// equal the value; an array claim, or a space-separated string such as `scope`,
    /// must contain it (`claims = { scope = "orders:write", tenant = "acme" }`).
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
}

/// One API key: `sha256` is the hex SHA-256 of the key (`printf %s KEY | sha256sum`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub sha256: String,
    /// Roles the key holds, for routes with `roles`.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// A JWT issuer: where its keys come from and what its tokens must say.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// JWKS over HTTP or HTTPS (`https://host/.well-known/jwks.json`), refreshed every
    /// `refresh` and when a token names an unknown key id; the last good set is kept
    /// when a fetch fails.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM CA certificates that verify an `https://` `jwks_url` (the system roots when
    /// absent).
    #[serde(default)]
    pub jwks_ca: Option<std::path::PathBuf>,
    /// Or a JWKS file, read again every `refresh`.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// Or one static public key: a PEM `PUBLIC KEY` file (Ed25519, P-256 or RSA ≥ 2048
    /// bits; the key type decides its algorithm, which must be in `algorithms`). A static
    /// key (this or a secret) has no key id: tokens for it must not name one.
    #[serde(default)]
    pub public_key_file: Option<String>,
    /// Or a shared HS256 secret (at least 32 bytes) in this environment variable, so it
    /// is never in the config file; needs `algorithms = ["HS256"]`.
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// Or the HS256 secret in a file (its bytes, trailing newline removed).
    #[serde(default)]
    pub hs256_secret_file: Option<String>,
    /// Accepted algorithms, pinned here and never taken from the token: RS256, ES256,
    /// EdDSA, HS256 (default EdDSA, RS256, ES256).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_skew", deserialize_with = "duration")]
    pub clock_skew: Duration,
    #[serde(default = "default_refresh", deserialize_with = "duration")]
    pub refresh: Duration,
    /// Request header → claim: the verified identity passed to the upstream. Any copy the
    /// client sent of these headers is removed first, on every route.
    #[serde(default)]
    pub forward: BTreeMap<String, String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["EdDSA".into(), "RS256".into(), "ES256".into()]
}
fn default_skew() -> Duration {
    Duration::from_secs(60)
}
fn default_refresh() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first try (default 2).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Retry 502/503/504 and resets for non-idempotent methods too.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Longest pause before the first retry (default 25ms, as Envoy); the pause before
    /// retry n is uniform in [0, backoff × 2^(n-1)], at most `max_backoff`, and never past
    /// the route's deadline.
    #[serde(default, deserialize_with = "opt_duration")]
    pub backoff: Option<Duration>,
    /// Longest pause between two tries (default 250ms).
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_backoff: Option<Duration>,
    /// The gRPC statuses a gRPC call is retried on, whatever its method (default
    /// `["unavailable"]`: the callee did not act on it). Seen only when the upstream
    /// answers with the status alone (trailers-only), before any message went to the
    /// client.
    #[serde(default)]
    pub grpc_retry_on: Option<Vec<String>>,
}

fn default_attempts() -> u32 {
    2
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_fallback_type")]
    pub content_type: String,
}

fn default_fallback_status() -> u16 {
    200
}
fn default_fallback_type() -> String {
    "application/json".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Registry service to discover.
    pub service: Option<String>,
    /// Static endpoints: `"host:port"` or `"host:port weight"`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    /// Hash key for `policy = "maglev"`.
    pub hash: Option<HashOn>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default = "default_connect", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Idle upstream connections older than this are closed instead of reused.
    #[serde(default = "default_idle", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Below this share of usable endpoints (percent), balance over all of them.
    #[serde(default = "default_panic")]
    pub panic_threshold: u32,
    #[serde(default)]
    pub breaker: BreakerSettings,
    #[serde(default)]
    pub outlier: OutlierSettings,
    #[serde(default)]
    pub retry_budget: BudgetSettings,
    /// Connect to the endpoints over TLS.
    pub tls: Option<UpstreamTls>,
}

/// `tls = { ca, server_name, cert, key }` on an upstream: certificates are verified
/// against `ca` (PEM; the system roots when absent) for `server_name` (each endpoint's
/// host when absent, an IP address included); `cert` and `key` (PEM) are the client
/// certificate for mutual TLS. With `protocol = "h2c"` HTTP/2 is asked for by ALPN.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub ca: Option<std::path::PathBuf>,
    pub server_name: Option<String>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

fn default_connect() -> Duration {
    Duration::from_secs(1)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_in_flight() -> usize {
    1024
}
fn default_panic() -> u32 {
    50
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2: prior knowledge on plain TCP, ALPN `h2` over TLS (`"h2"` means the same).
    #[serde(alias = "h2")]
    H2c,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp(bool),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "half")]
    pub error_rate: f64,
    #[serde(default = "ten_s", deserialize_with = "duration")]
    pub window: Duration,
    #[serde(default = "twenty")]
    pub min_calls: u32,
    #[serde(default = "five_s", deserialize_with = "duration")]
    pub open_for: Duration,
    #[serde(default = "three")]
    pub half_open_probes: u32,
}

fn yes() -> bool {
    true
}
fn half() -> f64 {
    0.5
}
fn ten_s() -> Duration {
    Duration::from_secs(10)
}
fn five_s() -> Duration {
    Duration::from_secs(5)
}
fn twenty() -> u32 {
    20
}
fn three() -> u32 {
    3
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            enabled: true,
            error_rate: half(),
            window: ten_s(),
            min_calls: twenty(),
            open_for: five_s(),
            half_open_probes: three(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "five")]
    pub consecutive_errors: u32,
    #[serde(default = "ten_s", deserialize_with = "duration")]
    pub base_ejection: Duration,
    #[serde(default = "fifty")]
    pub max_ejected_percent: u32,
}

fn five() -> u32 {
    5
}
fn fifty() -> u32 {
    50
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            enabled: true,
            consecutive_errors: five(),
            base_ejection: ten_s(),
            max_ejected_percent: fifty(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    #[serde(default = "fifth")]
    pub ratio: f64,
    #[serde(default = "ten")]
    pub min_per_sec: u32,
}

fn fifth() -> f64 {
    0.2
}
fn ten() -> u32 {
    10
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            ratio: fifth(),
            min_per_sec: ten(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses what the gateway could not run, naming the key: one check per section,
    /// each with the context it needs.
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.tls
            && tls.certificates.is_empty()
        {
            return Err(invalid(
                "tls.certificates",
                "at least one certificate is needed",
            ));
        }
        for (name, k) in &self.api_keys {
            k.validate(name)?;
        }
        for c in &self.trusted_proxies {
            crate::floor::net::Cidr::parse(c).map_err(|e| invalid("trusted_proxies", e))?;
        }
        for (name, j) in &self.jwt {
            j.validate(&format!("jwt.{name}"))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            r.validate(&r.key(i), self)?;
        }
        for (name, u) in &self.upstreams {
            u.validate(&format!("upstreams.{name}"))?;
        }
        if !(0.0..=1.0).contains(&self.access_log.sample) {
            return Err(invalid("access_log.sample", "a ratio: 0.0-1.0"));
        }
        Ok(())
    }
}

/// The value parsers a check and the route compiler share, so a value is accepted by
/// both or by neither, with the same message.
pub(crate) fn header_name(key: &str, name: &str) -> Result<http::HeaderName, ConfigError> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(key, format!("{name:?} is not a valid header name")))
}

pub(crate) fn header_value(
    key: &str,
    name: &str,
    value: &str,
) -> Result<http::HeaderValue, ConfigError> {
    http::HeaderValue::from_str(value).map_err(|_| {
        invalid(
            key,
            format!("header {name}: {value:?} is not a valid value"),
        )
    })
}

pub(crate) fn method(key: &str, m: &str) -> Result<http::Method, ConfigError> {
    http::Method::from_bytes(m.as_bytes())
        .map_err(|_| invalid(key, format!("{m:?} is not an HTTP method")))
}

pub(crate) fn path_regex(key: &str, re: &str) -> Result<regex::Regex, ConfigError> {
    regex::Regex::new(re).map_err(|e| invalid(format!("{key}.path.regex"), e.to_string()))
}

pub(crate) fn status(key: &str, code: u16) -> Result<http::StatusCode, ConfigError> {
    http::StatusCode::from_u16(code)
        .map_err(|_| invalid(key, format!("{code} is not an HTTP status")))
}

impl ApiKeyConfig {
    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                format!("api_keys.{name}.sha256"),
                "64 hex digits: the SHA-256 of the key, never the key itself",
            ));
        }
        Ok(())
    }
}

impl JwtConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let sources = [
            self.jwks_url.is_some(),
            self.jwks_file.is_some(),
            self.public_key_file.is_some(),
            self.hs256_secret_env.is_some(),
            self.hs256_secret_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(invalid(
                key,
                "set one of jwks_url, jwks_file, public_key_file, hs256_secret_env, hs256_secret_file",
            ));
        }
        if let Some(u) = &self.jwks_url {
            let parsed = u.parse::<http::Uri>().ok().filter(|p| {
                matches!(p.scheme_str(), Some("http" | "https")) && p.authority().is_some()
            });
            if parsed.is_none() {
                return Err(invalid(
                    format!("{key}.jwks_url"),
                    format!("{u:?}: an http:// or https:// URL with a host"),
                ));
            }
        }
        if self.jwks_ca.is_some()
            && !self
                .jwks_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        {
            return Err(invalid(
                format!("{key}.jwks_ca"),
                "only verifies an https:// jwks_url",
            ));
        }
        if self.algorithms.is_empty() {
            return Err(invalid(format!("{key}.algorithms"), "name at least one"));
        }
        for a in &self.algorithms {
            a.parse::<tessera_jwt::Alg>().map_err(|_| {
                invalid(
                    format!("{key}.algorithms"),
                    format!("{a:?}: one of RS256, ES256, EdDSA, HS256"),
                )
            })?;
        }
        let secret = self.hs256_secret_env.is_some() || self.hs256_secret_file.is_some();
        if secret && self.algorithms != ["HS256"] {
            return Err(invalid(
                format!("{key}.algorithms"),
                "a shared secret checks HS256 only: set algorithms = [\"HS256\"]",
            ));
        }
        if !secret && self.algorithms.iter().any(|a| a == "HS256") {
            return Err(invalid(
                format!("{key}.algorithms"),
                "HS256 needs a shared secret (hs256_secret_env or hs256_secret_file); a JWKS or public key does not carry one",
            ));
        }
        if self.refresh < Duration::from_secs(1) {
            return Err(invalid(format!("{key}.refresh"), "at least 1s"));
        }
        for h in self.forward.keys() {
            header_name(&format!("{key}.forward"), h)?;
        }
        Ok(())
    }
}

impl RouteConfig {
    /// The route's key in messages: its index, and its name when it has one.
    pub(crate) fn key(&self, i: usize) -> String {
        match &self.name {
            Some(n) => format!("routes[{i}] ({n})"),
            None => format!("routes[{i}]"),
        }
    }

    fn validate(&self, key: &str, cfg: &Config) -> Result<(), ConfigError> {
        let kinds = [&self.path.exact, &self.path.prefix, &self.path.regex]
            .iter()
            .filter(|p| p.is_some())
            .count();
        if kinds > 1 {
            return Err(invalid(
                format!("{key}.path"),
                "set only one of exact, prefix, regex",
            ));
        }
        for p in [&self.path.exact, &self.path.prefix].into_iter().flatten() {
            if !p.starts_with('/') {
                return Err(invalid(
                    format!("{key}.path"),
                    format!("{p:?} must start with '/'"),
                ));
            }
        }
        if let Some(re) = &self.path.regex {
            path_regex(key, re)?;
        }
        if (self.strip_prefix || self.rewrite_prefix.is_some()) && self.path.prefix.is_none() {
            return Err(invalid(key, "strip_prefix/rewrite_prefix need path.prefix"));
        }
        if self.strip_prefix && self.rewrite_prefix.is_some() {
            return Err(invalid(key, "set strip_prefix or rewrite_prefix, not both"));
        }
        for m in &self.methods {
            method(&format!("{key}.methods"), m)?;
        }
        for (name, value) in self
            .headers
            .iter()
            .chain(self.request_headers.add.iter())
            .chain(self.response_headers.add.iter())
        {
            header_name(key, name)?;
            header_value(key, name, value)?;
        }
        for name in self
            .request_headers
            .remove
            .iter()
            .chain(self.response_headers.remove.iter())
        {
            header_name(key, name)?;
        }
        if let Some(l) = &self.rate_limit {
            l.validate(&format!("{key}.rate_limit"), self.auth.is_some(), cfg)?;
        }
        if let Some(a) = &self.auth {
            a.validate(&format!("{key}.auth"), cfg)?;
        }
        match (&self.upstream, &self.fallback) {
            (None, None) => {
                return Err(invalid(key, "needs an upstream or a fallback"));
            }
            (Some(u), _) if !cfg.upstreams.contains_key(u) => {
                return Err(invalid(
                    format!("{key}.upstream"),
                    format!("no [upstreams.{u}] section"),
                ));
            }
            _ => {}
        }
        if let Some(f) = &self.fallback {
            status(&format!("{key}.fallback.status"), f.status)?;
            header_value(
                &format!("{key}.fallback.content_type"),
                "content-type",
                &f.content_type,
            )?;
        }
        if let Some(rt) = &self.retries {
            if rt.attempts > 10 {
                return Err(invalid(format!("{key}.retries.attempts"), "at most 10"));
            }
            if let (Some(b), Some(m)) = (rt.backoff, rt.max_backoff)
                && m < b
            {
                return Err(invalid(
                    format!("{key}.retries.max_backoff"),
                    "must not be shorter than backoff",
                ));
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(invalid(format!("{key}.timeout"), "must be greater than 0"));
        }
        Ok(())
    }
}

impl RateLimitRoute {
    fn validate(&self, k: &str, has_auth: bool, cfg: &Config) -> Result<(), ConfigError> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(invalid(
                format!("{k}.rate"),
                "must be a positive number of requests per second",
            ));
        }
        if self.burst == 0 {
            return Err(invalid(format!("{k}.burst"), "at least 1"));
        }
        if self.max_keys == 0 {
            return Err(invalid(format!("{k}.max_keys"), "at least 1"));
        }
        if self.shared && cfg.redis.is_none() {
            return Err(invalid(
                format!("{k}.shared"),
                "needs a [redis] section to share the limit through",
            ));
        }
        match self.key.as_str() {
            "ip" => {}
            "jwt_sub" if !has_auth => {
                return Err(invalid(
                    format!("{k}.key"),
                    "jwt_sub needs the route's auth",
                ));
            }
            "jwt_sub" => {}
            h if h
                .strip_prefix("header:")
                .is_some_and(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok()) => {}
            other => {
                return Err(invalid(
                    format!("{k}.key"),
                    format!("{other:?}: one of ip, header:NAME, jwt_sub"),
                ));
            }
        }
        Ok(())
    }
}

impl RouteAuth {
    fn validate(&self, key: &str, cfg: &Config) -> Result<(), ConfigError> {
        match &self.jwt {
            Some(j) if !cfg.jwt.contains_key(j) => {
                return Err(invalid(
                    format!("{key}.jwt"),
                    format!("no [jwt.{j}] section"),
                ));
            }
            None if !self.api_keys => {
                return Err(invalid(
                    key,
                    "name a jwt issuer, set api_keys = true, or both",
                ));
            }
            _ => {}
        }
        if self.api_keys && cfg.api_keys.is_empty() {
            return Err(invalid(
                format!("{key}.api_keys"),
                "no [api_keys.NAME] section",
            ));
        }
        Ok(())
    }
}

impl UpstreamConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        match (&self.service, self.endpoints.is_empty()) {
            (Some(_), false) => return Err(invalid(key, "set service or endpoints, not both")),
            (None, true) => return Err(invalid(key, "needs service or endpoints")),
            _ => {}
        }
        for e in &self.endpoints {
            parse_endpoint(e).map_err(|p| invalid(format!("{key}.endpoints"), p))?;
        }
        if self.policy == Policy::Maglev && self.hash.is_none() {
            return Err(invalid(
                format!("{key}.hash"),
                "policy maglev needs hash = { header = .. } / { cookie = .. } / { client_ip = true }",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(invalid(
                format!("{key}.max_in_flight"),
                "must be at least 1",
            ));
        }
        if self.panic_threshold > 100 {
            return Err(invalid(
                format!("{key}.panic_threshold"),
                "a percentage: 0-100",
            ));
        }
        if !(0.0..=1.0).contains(&self.breaker.error_rate) {
            return Err(invalid(
                format!("{key}.breaker.error_rate"),
                "a ratio: 0.0-1.0",
            ));
        }
        if self.outlier.max_ejected_percent > 100 {
            return Err(invalid(
                format!("{key}.outlier.max_ejected_percent"),
                "a percentage: 0-100",
            ));
        }
        if !(0.0..=10.0).contains(&self.retry_budget.ratio) {
            return Err(invalid(
                format!("{key}.retry_budget.ratio"),
                "a ratio: 0.0-10.0",
            ));
        }
        Ok(())
    }
}

/// `"host:port"` or `"host:port weight"` → (authority, weight).
pub fn parse_endpoint(s: &str) -> Result<(String, u32), String> {
    let mut parts = s.split_whitespace();
    let addr = parts
        .next()
        .ok_or_else(|| format!("{s:?}: empty endpoint"))?;
    let weight = match parts.next() {
        None => 1,
        Some(w) => w
            .parse::<u32>()
            .ok()
            .filter(|w| *w > 0)
            .ok_or_else(|| format!("{s:?}: weight must be a positive integer"))?,
    };
    if parts.next().is_some() {
        return Err(format!(
            "{s:?}: expected \"host:port\" or \"host:port weight\""
        ));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected host:port"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{s:?}: expected host:port with a port 1-65535"));
    }
    Ok((addr.to_owned(), weight))
}
