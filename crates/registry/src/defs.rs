//! Request bodies as Consul clients send them, and their validation into records. Unknown
//! fields are ignored, as Consul does, so clients that send newer fields keep working; but
//! every field we read is type-checked, and an error names the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tessera_core::{Health, serde_opt, validate_service_name};

use crate::error::Error;
use crate::model::{CheckSpec, Meta, Probe, Weights};

/// Parses a JSON body into `T`; a failure names the JSON path of the bad field.
///
/// Field names are matched as Consul matches them: case-insensitively and with or without
/// underscores (`"ttl"`, `"TTL"`, `"deregister_critical_service_after"`), because common
/// clients (py-consul among them) send lowercase or snake_case keys. Keys inside
/// user-defined maps (`Meta`, `Header`, ...) are left exactly as sent.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::bad("Request decode failed: empty body"));
    }
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::bad(format!("Request decode failed: {e}")))?;
    canonicalize_keys(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            Error::bad(format!("Request decode failed: {inner}"))
        } else {
            Error::bad(format!("Request decode failed: field {path}: {inner}"))
        }
    })
}

/// Every field name the registry reads, in its canonical (Consul) spelling.
const FIELDS: &[&str] = &[
    "AccessorID",
    "Address",
    "AliasNode",
    "AliasService",
    "Args",
    "Behavior",
    "Body",
    "Check",
    "CheckID",
    "Checks",
    "Datacenter",
    "DeregisterCriticalServiceAfter",
    "Definition",
    "Description",
    "DockerContainerID",
    "EnableTagOverride",
    "FailuresBeforeCritical",
    "FailuresBeforeWarning",
    "Flags",
    "GRPC",
    "GRPCUseTLS",
    "H2PING",
    "HTTP",
    "Header",
    "ID",
    "Index",
    "Interval",
    "KV",
    "Key",
    "Kind",
    "Local",
    "LockDelay",
    "Meta",
    "Method",
    "Name",
    "Node",
    "NodeChecks",
    "NodeMeta",
    "Notes",
    "OSService",
    "Output",
    "Passing",
    "Policies",
    "Port",
    "Rules",
    "Script",
    "ScriptArgs",
    "SecretID",
    "Service",
    "ServiceChecks",
    "Session",
    "ServiceID",
    "Shell",
    "SkipNodeUpdate",
    "Status",
    "SuccessBeforePassing",
    "TCP",
    "TLSServerName",
    "TLSSkipVerify",
    "TTL",
    "Tags",
    "TaggedAddresses",
    "Timeout",
    "UDP",
    "Value",
    "Verb",
    "Warning",
    "Weights",
];

/// Fields whose values are user data: their keys are never rewritten.
const OPAQUE: &[&str] = &["Meta", "NodeMeta", "Header", "TaggedAddresses"];

/// `field` (canonical, ASCII) equals `key` ignoring case, `_` and `-`.
fn same_field(field: &str, key: &str) -> bool {
    let mut k = key.bytes().filter(|b| *b != b'_' && *b != b'-');
    for f in field.bytes() {
        match k.next() {
            Some(c) if c.eq_ignore_ascii_case(&f) => {}
            _ => return false,
        }
    }
    k.next().is_none()
}

fn canonicalize_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let old = std::mem::take(map);
            for (k, mut val) in old {
                let canon = FIELDS
                    .iter()
                    .find(|f| same_field(f, &k))
                    .map(|f| (*f).to_owned())
                    .unwrap_or(k);
                if !OPAQUE.contains(&canon.as_str()) {
                    canonicalize_keys(&mut val);
                }
                // On a collision (`"ttl"` and `"TTL"` both sent) the first one wins.
                map.entry(canon).or_insert(val);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(canonicalize_keys),
        _ => {}
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct WeightsDef {
    pub passing: Option<u32>,
    pub warning: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceDef {
    #[serde(rename = "ID")]
    pub id: Option<String>,
    /// The catalog API names this field `Service`; the agent API `Name`.
    #[serde(alias = "Service")]
    pub name: String,
    pub tags: Option<Vec<String>>,
    pub address: String,
    pub port: Option<u16>,
    pub meta: Option<Meta>,
    pub weights: Option<WeightsDef>,
    pub enable_tag_override: bool,
    pub kind: String,
    pub tagged_addresses: Option<BTreeMap<String, serde_json::Value>>,
    pub check: Option<CheckDef>,
    pub checks: Option<Vec<CheckDef>>,
}

impl ServiceDef {
    pub fn service_id(&self) -> &str {
        match &self.id {
            Some(id) if !id.is_empty() => id,
            _ => &self.name,
        }
    }

    /// Validates the fields that make up the instance itself.
    pub fn validate(&self) -> Result<Weights, Error> {
        validate_service_name("service name (Name)", &self.name)?;
        validate_service_name("service ID (ID)", self.service_id())?;
        if let Some(tags) = &self.tags {
            for t in tags {
                if t.chars().any(char::is_control) {
                    return Err(Error::bad(format!(
                        "Invalid service tag {t:?}: contains a control character"
                    )));
                }
            }
        }
        if let Some(meta) = &self.meta {
            validate_meta(meta)?;
        }
        if !self.address.is_empty() && self.address.chars().any(|c| c.is_whitespace()) {
            return Err(Error::bad(format!(
                "Invalid service Address {:?}: contains whitespace",
                self.address
            )));
        }
        let w = self.weights.as_ref();
        let weights = Weights {
            passing: w.and_then(|w| w.passing).unwrap_or(1),
            warning: w.and_then(|w| w.warning).unwrap_or(1),
        };
        if weights.passing == 0 {
            return Err(Error::bad(
                "Invalid Weights.Passing: must be greater than 0",
            ));
        }
        Ok(weights)
    }
}

fn validate_meta(meta: &Meta) -> Result<(), Error> {
    if meta.len() > 64 {
        return Err(Error::bad("Invalid Meta: more than 64 keys"));
    }
    for (k, v) in meta {
        if k.is_empty()
            || k.len() > 128
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::bad(format!(
                "Invalid Meta key {k:?}: use 1-128 characters of [A-Za-z0-9_-]"
            )));
        }
        if v.len() > 512 {
            return Err(Error::bad(format!(
                "Invalid Meta value for {k:?}: longer than 512 bytes"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckDef {
    #[serde(rename = "CheckID", alias = "ID")]
    pub check_id: Option<String>,
    pub name: Option<String>,
    pub notes: String,
    pub status: Option<String>,
    pub output: Option<String>,
    pub node: Option<String>,
    #[serde(rename = "ServiceID")]
    pub service_id: Option<String>,
    #[serde(rename = "HTTP")]
    pub http: Option<String>,
    pub method: Option<String>,
    pub header: Option<BTreeMap<String, Vec<String>>>,
    pub body: Option<String>,
    #[serde(rename = "TCP")]
    pub tcp: Option<String>,
    #[serde(rename = "GRPC")]
    pub grpc: Option<String>,
    #[serde(rename = "GRPCUseTLS")]
    pub grpc_use_tls: bool,
    #[serde(rename = "TTL", with = "serde_opt")]
    pub ttl: Option<Duration>,
    #[serde(with = "serde_opt")]
    pub interval: Option<Duration>,
    #[serde(with = "serde_opt")]
    pub timeout: Option<Duration>,
    #[serde(with = "serde_opt")]
    pub deregister_critical_service_after: Option<Duration>,
    pub success_before_passing: u32,
    pub failures_before_critical: u32,
    pub failures_before_warning: Option<u32>,
    #[serde(rename = "TLSSkipVerify")]
    pub tls_skip_verify: bool,
    /// Catalog registrations describe the probe here instead of at the top level.
    pub definition: Option<serde_json::Value>,
    // Check kinds Tessera does not run; named so we can refuse them by name.
    pub script_args: Option<serde_json::Value>,
    pub script: Option<serde_json::Value>,
    pub shell: Option<serde_json::Value>,
    pub args: Option<serde_json::Value>,
    #[serde(rename = "DockerContainerID")]
    pub docker_container_id: Option<serde_json::Value>,
    #[serde(rename = "H2PING")]
    pub h2ping: Option<serde_json::Value>,
    #[serde(rename = "UDP")]
    pub udp: Option<serde_json::Value>,
    #[serde(rename = "OSService")]
    pub os_service: Option<serde_json::Value>,
    pub alias_service: Option<serde_json::Value>,
    pub alias_node: Option<serde_json::Value>,
}

/// Shortest interval a probe may run at.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Probe timeout when the definition gives none (Consul's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl CheckDef {
    pub fn initial_status(&self) -> Result<Option<Health>, Error> {
        match self.status.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|e| Error::bad(format!("Status: {e}"))),
        }
    }

    /// The runnable spec, or `None` for a check with no probe (a catalog check whose
    /// status is set by whoever registers it). `need_probe` is true for agent checks.
    pub fn spec(&self, need_probe: bool) -> Result<Option<CheckSpec>, Error> {
        for (field, present) in [
            ("ScriptArgs", self.script_args.is_some()),
            ("Script", self.script.is_some()),
            ("Shell", self.shell.is_some()),
            ("Args", self.args.is_some()),
            ("DockerContainerID", self.docker_container_id.is_some()),
            ("H2PING", self.h2ping.is_some()),
            ("UDP", self.udp.is_some()),
            ("OSService", self.os_service.is_some()),
            ("AliasService", self.alias_service.is_some()),
            ("AliasNode", self.alias_node.is_some()),
        ] {
            if present {
                return Err(Error::bad(format!(
                    "Invalid check: {field} checks are not supported; use HTTP, TCP, GRPC or TTL"
                )));
            }
        }
        let mut probes = Vec::new();
        if let Some(url) = self.http.as_deref().filter(|s| !s.is_empty()) {
            let parsed: http::Uri = url
                .parse()
                .map_err(|e| Error::bad(format!("Invalid check HTTP {url:?}: {e}")))?;
            match parsed.scheme_str() {
                Some("http") => {}
                Some("https") => {
                    return Err(Error::bad(format!(
                        "Invalid check HTTP {url:?}: https checks are not supported yet; use http"
                    )));
                }
                _ => {
                    return Err(Error::bad(format!(
                        "Invalid check HTTP {url:?}: must be an absolute http:// URL"
                    )));
                }
            }
            if parsed.host().is_none() {
                return Err(Error::bad(format!(
                    "Invalid check HTTP {url:?}: missing host"
                )));
            }
            let method = self.method.clone().unwrap_or_else(|| "GET".into());
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                return Err(Error::bad(format!("Invalid check Method {method:?}")));
            }
            probes.push(Probe::Http {
                url: url.to_owned(),
                method,
                header: self.header.clone().unwrap_or_default(),
                body: self.body.clone().unwrap_or_default(),
                tls_skip_verify: self.tls_skip_verify,
            });
        }
        if let Some(addr) = self.tcp.as_deref().filter(|s| !s.is_empty()) {
            validate_host_port("TCP", addr)?;
            probes.push(Probe::Tcp {
                addr: addr.to_owned(),
            });
        }
        if let Some(target) = self.grpc.as_deref().filter(|s| !s.is_empty()) {
            let hostport = target.split_once('/').map(|(h, _)| h).unwrap_or(target);
            validate_host_port("GRPC", hostport)?;
            if self.grpc_use_tls {
                return Err(Error::bad(
                    "Invalid check: GRPCUseTLS is not supported yet; use a plaintext (h2c) health endpoint",
                ));
            }
            probes.push(Probe::Grpc {
                target: target.to_owned(),
                use_tls: self.grpc_use_tls,
            });
        }
        if let Some(ttl) = self.ttl {
            if ttl.is_zero() {
                return Err(Error::bad("Invalid check TTL: must be greater than 0"));
            }
            probes.push(Probe::Ttl { ttl });
        }
        let probe = match probes.len() {
            0 if need_probe => {
                return Err(Error::bad(
                    "Invalid check: must define one of HTTP, TCP, GRPC or TTL",
                ));
            }
            0 => return Ok(None),
            1 => probes.remove(0),
            _ => {
                return Err(Error::bad(
                    "Invalid check: define only one of HTTP, TCP, GRPC or TTL",
                ));
            }
        };
        let interval = match (&probe, self.interval) {
            (Probe::Ttl { .. }, _) => None,
            (_, None) | (_, Some(Duration::ZERO)) => {
                return Err(Error::bad(format!(
                    "Invalid check: Interval is required for {} checks",
                    probe.type_name().to_uppercase()
                )));
            }
            (_, Some(i)) => Some(i.max(MIN_INTERVAL)),
        };
        Ok(Some(CheckSpec {
            probe,
            interval,
            timeout: self.timeout.filter(|t| !t.is_zero()),
            deregister_critical_after: self.deregister_critical_service_after,
            success_before_passing: self.success_before_passing,
            failures_before_critical: self.failures_before_critical,
            failures_before_warning: self
                .failures_before_warning
                .unwrap_or(self.failures_before_critical),
            initial: self.initial_status()?,
        }))
    }
}

fn validate_host_port(field: &str, addr: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::bad(format!("Invalid check {field} {addr:?}: {why}")));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("expected host:port");
    };
    if host.is_empty() {
        return bad("missing host");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad("port must be 1-65535"),
        Ok(_) => Ok(()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckUpdate {
    pub status: String,
    pub output: String,
}

/// `PUT /v1/catalog/register`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CatalogRegistration {
    #[serde(rename = "ID")]
    pub id: Option<String>,
    pub node: String,
    pub address: String,
    pub datacenter: Option<String>,
    pub tagged_addresses: Option<BTreeMap<String, String>>,
    pub node_meta: Option<Meta>,
    pub service: Option<ServiceDef>,
    pub check: Option<CheckDef>,
    pub checks: Option<Vec<CheckDef>>,
    pub skip_node_update: bool,
}

impl CatalogRegistration {
    pub fn validate(&self) -> Result<(), Error> {
        validate_service_name("node name (Node)", &self.node)?;
        if self.address.is_empty() {
            return Err(Error::bad("Must provide address"));
        }
        if let Some(meta) = &self.node_meta {
            validate_meta(meta)?;
        }
        Ok(())
    }
}

/// `PUT /v1/catalog/deregister`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CatalogDeregistration {
    pub node: String,
    pub datacenter: Option<String>,
    #[serde(rename = "ServiceID")]
    pub service_id: Option<String>,
    #[serde(rename = "CheckID")]
    pub check_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<Option<CheckSpec>, Error> {
        let def: CheckDef = parse_json(json.as_bytes())?;
        def.spec(true)
    }

    #[test]
    fn check_kinds() {
        let spec = check(r#"{"HTTP":"http://127.0.0.1:1/h","Interval":"5s"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(spec.interval, Some(Duration::from_secs(5)));
        assert!(matches!(spec.probe, Probe::Http { .. }));
        let spec = check(r#"{"TTL":"15s"}"#).unwrap().unwrap();
        assert_eq!(
            spec.probe,
            Probe::Ttl {
                ttl: Duration::from_secs(15)
            }
        );
    }

    #[test]
    fn bad_checks_name_the_problem() {
        for (json, needle) in [
            (r#"{"Interval":"10s"}"#, "must define one of"),
            (
                r#"{"ScriptArgs":["/bin/true"],"Interval":"10s"}"#,
                "ScriptArgs checks are not supported",
            ),
            (r#"{"TTL":"10 parsecs"}"#, "field TTL"),
            (r#"{"TTL":"10 parsecs"}"#, "parsecs"),
            (
                r#"{"HTTP":"http://x/","TTL":"1s","Interval":"1s"}"#,
                "only one of",
            ),
            (
                r#"{"TCP":"localhost:99999","Interval":"1s"}"#,
                "port must be",
            ),
            (r#"{"HTTP":"http://x/"}"#, "Interval is required"),
            (r#"{"HTTP":"ftp://x/","Interval":"1s"}"#, "absolute http"),
            (
                r#"{"SuccessBeforePassing":"three","TTL":"1s"}"#,
                "SuccessBeforePassing",
            ),
            ("", "empty body"),
            (r#"{"ttl":"10s","interval":"soon"}"#, "field Interval"),
            ("{", "decode failed"),
        ] {
            let err = check(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn keys_match_like_consul() {
        let def: ServiceDef = parse_json(
            br#"{"name":"web","id":"w1","enabletagoverride":true,"meta":{"Build_ID":"7"},
                "checks":[{"ttl":"5s","deregister_critical_service_after":"1m","check_id":"c"}],
                "check":{"http":"http://h/","interval":"1s","tls_skip_verify":true,
                         "header":{"x-Token":["a"]}}}"#,
        )
        .unwrap();
        assert_eq!(def.name, "web");
        assert_eq!(def.id.as_deref(), Some("w1"));
        assert!(def.enable_tag_override);
        assert_eq!(
            def.meta.unwrap()["Build_ID"],
            "7",
            "user map keys kept as sent"
        );
        let c = &def.checks.unwrap()[0];
        assert_eq!(c.ttl, Some(Duration::from_secs(5)));
        assert_eq!(
            c.deregister_critical_service_after,
            Some(Duration::from_secs(60))
        );
        assert_eq!(c.check_id.as_deref(), Some("c"));
        let h = def.check.unwrap();
        assert!(h.tls_skip_verify);
        assert!(h.header.unwrap().contains_key("x-Token"));
    }

    #[test]
    fn service_validation() {
        let bad_port: Result<ServiceDef, _> = parse_json(br#"{"Name":"web","Port":70000}"#);
        let err = bad_port.unwrap_err().to_string();
        assert!(err.contains("Port"), "{err}");
        let neg: Result<ServiceDef, _> = parse_json(br#"{"Name":"web","Port":-1}"#);
        assert!(neg.unwrap_err().to_string().contains("Port"));
        let def: ServiceDef = parse_json(br#"{"Name":""}"#).unwrap();
        assert!(def.validate().unwrap_err().to_string().contains("Name"));
        let def: ServiceDef = parse_json(br#"{"Name":"web","Meta":{"bad key":"x"}}"#).unwrap();
        assert!(def.validate().unwrap_err().to_string().contains("Meta key"));
    }
}
