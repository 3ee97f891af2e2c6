//! The route table: config routes compiled into matchers, sorted into one documented
//! precedence order, swapped atomically on reload.
//!
//! Precedence (first match wins):
//! 1. routes with an exact `host`, then with a wildcard host (`*.example.com`), then
//!    routes without a host;
//! 2. within that, exact paths, then regex paths (in file order), then prefix paths,
//!    longest prefix first, then routes without a path;
//! 3. remaining ties go to the route that comes first in the file.
//!
//! Methods and headers narrow a route; they do not change its rank.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use crate::floor::config::{self, Config, ConfigError, RedisConfig, RouteConfig};
use crate::policy::ratelimit::{RateKey, RateLimit};
use crate::policy::upstream::{Discovery, Upstream};
use crate::protocol::redis::Redis;
use tessera_metrics::Red;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_RETRIES: u32 = 2;

#[derive(Debug, Clone)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` → ".example.com"
    Suffix(String),
}

#[derive(Debug, Clone)]
enum PathKind {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum Rewrite {
    None,
    Strip(String),
    Replace(String, String),
}

pub struct Fallback {
    pub status: StatusCode,
    pub body: Bytes,
    pub content_type: HeaderValue,
}

pub struct Route {
    pub name: String,
    host: HostMatch,
    path: PathKind,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    pub upstream: Option<Arc<Upstream>>,
    pub rewrite: Rewrite,
    pub timeout: Duration,
    pub per_try_timeout: Duration,
    pub retries: u32,
    pub retry_non_idempotent: bool,
    /// The gRPC statuses retried (trailers-only answers).
    pub grpc_retry_on: Vec<tessera_core::grpc::Code>,
    /// gRPC-Web calls are translated.
    pub grpc_web: bool,
    /// The pause before each retry.
    pub retry_backoff: tessera_resilience::Backoff,
    pub add_request: Vec<(HeaderName, HeaderValue)>,
    pub remove_request: Vec<HeaderName>,
    pub add_response: Vec<(HeaderName, HeaderValue)>,
    pub remove_response: Vec<HeaderName>,
    pub fallback: Option<Fallback>,
    pub auth: Option<crate::floor::config::RouteAuth>,
    pub rate_limit: Option<RateLimit>,
    /// What a path with `;` parameters that matched this route becomes.
    pub path_params: crate::floor::path::PathParams,
    /// Nothing on this route reads or edits the request's fields (no auth, no limit or
    /// hash keyed on a field, no request header edits): they can go upstream raw.
    pub plain: bool,
    pub metrics: Red,
    /// What `/admin/routes` shows.
    pub describe: serde_json::Value,
}

impl Route {
    fn rank(&self, index: usize) -> (u8, u8, std::cmp::Reverse<usize>, usize) {
        let host = match self.host {
            HostMatch::Exact(_) => 0,
            HostMatch::Suffix(_) => 1,
            HostMatch::Any => 2,
        };
        let (path, len) = match &self.path {
            PathKind::Exact(_) => (0, 0),
            PathKind::Regex(_) => (1, 0),
            PathKind::Prefix(p) => (2, p.len()),
            PathKind::Any => (3, 0),
        };
        (host, path, std::cmp::Reverse(len), index)
    }

    fn matches(&self, method: &Method, host: &str, path: &str, headers: &http::HeaderMap) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        };
        if !host_ok {
            return false;
        }
        let path_ok = match &self.path {
            PathKind::Any => true,
            PathKind::Exact(p) => path == p,
            PathKind::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (p.ends_with('/')
                        || path.len() == p.len()
                        || path.as_bytes()[p.len()] == b'/')
            }
            PathKind::Regex(r) => r.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        self.headers
            .iter()
            .all(|(k, v)| headers.get_all(k).iter().any(|have| have == v))
    }

    /// The path the upstream receives.
    pub fn rewrite_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.rewrite {
            Rewrite::None => path.into(),
            Rewrite::Strip(prefix) => {
                let rest = path.strip_prefix(prefix.as_str()).unwrap_or(path);
                if rest.starts_with('/') {
                    rest.into()
                } else {
                    format!("/{rest}").into()
                }
            }
            Rewrite::Replace(prefix, with) => {
                let rest = path.strip_prefix(prefix.as_str()).unwrap_or(path);
                let joined = match (with.ends_with('/'), rest.starts_with('/')) {
                    (true, true) => format!("{with}{}", &rest[1..]),
                    (false, false) if !rest.is_empty() => format!("{with}/{rest}"),
                    _ => format!("{with}{rest}"),
                };
                joined.into()
            }
        }
    }
}

pub struct Table {
    pub routes: Vec<Route>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub issuers: crate::policy::auth::Issuers,
    /// Some route matches on header fields, so every request needs its header map.
    pub header_rules: bool,
    /// Some route matches on the host, so every request needs its host looked up.
    pub host_rules: bool,
    /// How paths with `;` parameters are read for matching: `Reject` at once when every
    /// route refuses them, else `Strip` (as Tomcat reads them) and the route decides.
    pub params: crate::floor::path::PathParams,
    /// The Redis client for shared limits, kept across reloads while `[redis]` is unchanged.
    pub redis: Option<(RedisConfig, Arc<Redis>)>,
}

impl Table {
    /// Compiles a validated config. Upstreams for registry services share discovery feeds
    /// with the previous generation, so a reload never empties an endpoint set.
    /// Fails when an upstream's TLS files do not load. `previous` is the table being
    /// replaced: rate-limit state and the Redis connection carry over from it.
    pub fn build(
        cfg: &Config,
        discovery: &Discovery,
        previous: Option<&Table>,
    ) -> Result<Table, ConfigError> {
        let upstreams: HashMap<String, Arc<Upstream>> = cfg
            .upstreams
            .iter()
            .map(|(name, u)| Ok((name.clone(), Arc::new(Upstream::build(name, u, discovery)?))))
            .collect::<Result<_, ConfigError>>()?;
        let services: Vec<String> = cfg
            .upstreams
            .values()
            .filter_map(|u| u.service.clone())
            .collect();
        discovery.retain(&services);
        let redis = cfg.redis.as_ref().map(|rc| {
            match previous
                .and_then(|p| p.redis.as_ref())
                .filter(|(c, _)| c == rc)
            {
                Some(kept) => kept.clone(),
                None => (rc.clone(), Arc::new(start_redis(rc))),
            }
        });
        let mut ranked: Vec<(usize, Route)> = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((i, compile(i, r, cfg, &upstreams, previous, redis.as_ref())?)))
            .collect::<Result<_, ConfigError>>()?;
        ranked.sort_by_key(|(i, r)| r.rank(*i));
        let params = if ranked
            .iter()
            .all(|(_, r)| r.path_params == crate::floor::path::PathParams::Reject)
        {
            crate::floor::path::PathParams::Reject
        } else {
            crate::floor::path::PathParams::Strip
        };
        Ok(Table {
            params,
            header_rules: ranked.iter().any(|(_, r)| !r.headers.is_empty()),
            host_rules: ranked
                .iter()
                .any(|(_, r)| !matches!(r.host, HostMatch::Any)),
            routes: ranked.into_iter().map(|(_, r)| r).collect(),
            upstreams,
            issuers: crate::policy::auth::Issuers::build(&cfg.jwt, &cfg.api_keys)?,
            redis,
        })
    }

    pub fn find(
        &self,
        method: &Method,
        host: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches(method, host, path, headers))
    }
}

fn header_pairs(
    key: &str,
    map: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
    map.iter()
        .map(|(k, v)| {
            Ok((
                config::header_name(key, k)?,
                config::header_value(key, k, v)?,
            ))
        })
        .collect()
}

fn header_names(key: &str, list: &[String]) -> Result<Vec<HeaderName>, ConfigError> {
    list.iter().map(|k| config::header_name(key, k)).collect()
}

fn start_redis(rc: &RedisConfig) -> Redis {
    let password = std::env::var("TESSERA_REDIS_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .or_else(|| rc.password.clone());
    Redis::start(
        rc.address.clone(),
        rc.timeout,
        crate::policy::ratelimit::on_connect(rc.username.as_deref(), password.as_deref()),
    )
}

fn compile(
    i: usize,
    r: &RouteConfig,
    cfg: &Config,
    upstreams: &HashMap<String, Arc<Upstream>>,
    previous: Option<&Table>,
    redis: Option<&(RedisConfig, Arc<Redis>)>,
) -> Result<Route, ConfigError> {
    let key = r.key(i);
    let host = match r.host.as_deref() {
        None | Some("") | Some("*") => HostMatch::Any,
        Some(h) => match h.strip_prefix('*') {
            Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
            None => HostMatch::Exact(h.to_ascii_lowercase()),
        },
    };
    let path = match (&r.path.exact, &r.path.prefix, &r.path.regex) {
        (Some(e), _, _) => PathKind::Exact(e.clone()),
        (_, Some(p), _) if p == "/" => PathKind::Any,
        (_, Some(p), _) => PathKind::Prefix(p.clone()),
        (_, _, Some(re)) => PathKind::Regex(config::path_regex(&key, re)?),
        _ => PathKind::Any,
    };
    let rewrite = match (&r.path.prefix, r.strip_prefix, &r.rewrite_prefix) {
        (Some(p), true, _) => Rewrite::Strip(p.trim_end_matches('/').to_owned()),
        (Some(p), false, Some(with)) => {
            Rewrite::Replace(p.trim_end_matches('/').to_owned(), with.clone())
        }
        _ => Rewrite::None,
    };
    let timeout = r.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let name = r.name.clone().unwrap_or_else(|| format!("route{i}"));
    let proxy = tessera_resilience::Backoff::PROXY;
    let retry_backoff = tessera_resilience::Backoff {
        base: r
            .retries
            .as_ref()
            .and_then(|x| x.backoff)
            .unwrap_or(proxy.base),
        max: r
            .retries
            .as_ref()
            .and_then(|x| x.max_backoff)
            .unwrap_or(proxy.max),
    };
    let grpc_retry_on = match r.retries.as_ref().and_then(|x| x.grpc_retry_on.as_ref()) {
        None => vec![tessera_core::grpc::Code::Unavailable],
        Some(names) => names
            .iter()
            .map(|n| {
                tessera_core::grpc::Code::from_name(n)
                    .filter(|c| *c != tessera_core::grpc::Code::Ok)
                    .ok_or_else(|| {
                        config::invalid(
                            format!("{key}.retries.grpc_retry_on"),
                            format!(
                                "{n:?} is not a gRPC error status name (such as \"unavailable\")"
                            ),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let describe = serde_json::json!({
        "name": name,
        "host": r.host,
        "path": {"exact": r.path.exact, "prefix": r.path.prefix, "regex": r.path.regex},
        "methods": r.methods,
        "headers": r.headers,
        "upstream": r.upstream,
        "timeout": tessera_core::format_duration(timeout),
        "retries": r.retries.as_ref().map(|x| x.attempts).unwrap_or(DEFAULT_RETRIES),
        "retry_backoff": tessera_core::format_duration(retry_backoff.base),
        "retry_max_backoff": tessera_core::format_duration(retry_backoff.max),
        "grpc_retry_on": grpc_retry_on.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "grpc_web": r.grpc_web,
    });
    let rate_limit = r.rate_limit.as_ref().map(|l| RateLimit {
        key: match l.key.as_str() {
            "jwt_sub" => RateKey::JwtSub,
            k => match k
                .strip_prefix("header:")
                .map(|n| HeaderName::from_bytes(n.as_bytes()))
            {
                Some(Ok(h)) => RateKey::Header(h),
                _ => RateKey::Ip,
            },
        },
        limiter: {
            let config = tessera_resilience::RateLimitConfig {
                rate: l.rate,
                burst: l.burst,
                max_keys: l.max_keys,
            };
            previous
                .and_then(|p| p.routes.iter().find(|old| old.name == name))
                .and_then(|old| old.rate_limit.as_ref())
                .filter(|old| *old.limiter.config() == config)
                .map(|old| old.limiter.clone())
                .unwrap_or_else(|| Arc::new(tessera_resilience::RateLimiter::new(config)))
        },
        cluster: match (l.shared, redis) {
            (true, Some((rc, client))) => Some(crate::policy::ratelimit::ClusterLimit::new(
                client.clone(),
                &rc.prefix,
                &name,
                l.rate,
                l.burst,
            )),
            _ => None,
        },
    });
    let upstream = r.upstream.as_ref().and_then(|u| upstreams.get(u).cloned());
    let add_request = header_pairs(&key, &r.request_headers.add)?;
    let remove_request = header_names(&key, &r.request_headers.remove)?;
    let plain = r.auth.is_none()
        && !r.grpc_web
        && add_request.is_empty()
        && remove_request.is_empty()
        && !rate_limit
            .as_ref()
            .is_some_and(|l| matches!(l.key, RateKey::Header(_)))
        && !upstream.as_ref().is_some_and(|u| {
            matches!(
                u.hash,
                Some(
                    crate::floor::config::HashOn::Header(_)
                        | crate::floor::config::HashOn::Cookie(_)
                )
            )
        });
    let methods = r
        .methods
        .iter()
        .map(|m| config::method(&format!("{key}.methods"), m))
        .collect::<Result<_, _>>()?;
    let fallback = match &r.fallback {
        None => None,
        Some(f) => Some(Fallback {
            status: config::status(&format!("{key}.fallback.status"), f.status)?,
            body: Bytes::from(f.body.clone()),
            content_type: config::header_value(
                &format!("{key}.fallback.content_type"),
                "content-type",
                &f.content_type,
            )?,
        }),
    };
    Ok(Route {
        name,
        host,
        path,
        methods,
        headers: header_pairs(&key, &r.headers)?,
        upstream,
        rewrite,
        timeout,
        per_try_timeout: r.per_try_timeout.unwrap_or(timeout).min(timeout),
        retries: r
            .retries
            .as_ref()
            .map(|x| x.attempts)
            .unwrap_or(DEFAULT_RETRIES),
        retry_non_idempotent: r.retries.as_ref().is_some_and(|x| x.retry_non_idempotent),
        grpc_retry_on,
        grpc_web: r.grpc_web,
        retry_backoff,
        add_request,
        remove_request,
        add_response: header_pairs(&key, &r.response_headers.add)?,
        remove_response: header_names(&key, &r.response_headers.remove)?,
        fallback,
        auth: r.auth.clone(),
        rate_limit,
        path_params: r.path_params.unwrap_or(cfg.path_params),
        plain,
        metrics: Red::default(),
        describe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config as it reads, before `Config::validate`.
    fn unchecked(text: &str) -> Config {
        toml::from_str(text).unwrap()
    }

    fn build(cfg: &Config) -> Result<Table, ConfigError> {
        Table::build(cfg, &Discovery::new(cfg.registry.clone()), None)
    }

    #[tokio::test]
    async fn what_cannot_compile_is_refused_with_its_key_never_made_a_route() {
        let route = |extra: &str| {
            format!(
                "[[routes]]\nname = \"api\"\nupstream = \"u\"\n{extra}\n\
                 [upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n"
            )
        };
        for (extra, key) in [
            ("path = { regex = \"^/(a\" }", "routes[0] (api).path.regex"),
            ("methods = [\"G T\"]", "routes[0] (api).methods"),
            (
                "response_headers = { remove = [\"bad name\"] }",
                "routes[0] (api)",
            ),
            (
                "fallback = { status = 1000, body = \"\" }",
                "routes[0] (api).fallback.status",
            ),
        ] {
            match build(&unchecked(&route(extra))) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                Err(e) => panic!("{extra}: {e}"),
                Ok(_) => panic!("{extra}: compiled"),
            }
        }
        let ok = build(&unchecked(&route("path = { regex = \"^/a/[0-9]+$\" }"))).unwrap();
        let get = Method::GET;
        let none = http::HeaderMap::new();
        assert!(ok.find(&get, "h", "/a/12", &none).is_some());
        assert!(ok.find(&get, "h", "/a/x", &none).is_none());
    }
}
