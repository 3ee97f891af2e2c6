//! The parts of the Consul HTTP API that Tessera's clients (the gateway's discovery, the
//! SDK) read, so both parse a `/v1/health/service/NAME` answer the same way.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One entry of `GET /v1/health/service/NAME`; fields not needed are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct HealthEntry {
    #[serde(rename = "Node")]
    pub node: HealthNode,
    #[serde(rename = "Service")]
    pub service: HealthService,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HealthNode {
    #[serde(rename = "Address", default)]
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HealthService {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Port", default)]
    pub port: u16,
    #[serde(rename = "Tags", default)]
    pub tags: Option<Vec<String>>,
    #[serde(rename = "Meta", default)]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "Weights", default)]
    pub weights: Option<HealthWeights>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HealthWeights {
    #[serde(rename = "Passing", default)]
    pub passing: u32,
}

impl HealthEntry {
    /// The service's address, or its node's when the service registered none (Consul's
    /// rule).
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }

    /// `host:port`, with an IPv6 host bracketed.
    pub fn authority(&self) -> String {
        let host = self.address();
        if host.contains(':') {
            format!("[{host}]:{}", self.service.port)
        } else {
            format!("{host}:{}", self.service.port)
        }
    }

    /// `Weights.Passing`, at least 1.
    pub fn weight(&self) -> u32 {
        self.service
            .weights
            .as_ref()
            .map_or(1, |w| w.passing)
            .max(1)
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn entries_take_the_node_address_when_the_service_has_none() {
        let v: Vec<HealthEntry> = serde_json::from_str(
            r#"[{"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "a", "Port": 80}},
                {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "b", "Address": "::1", "Port": 81,
                 "Weights": {"Passing": 3, "Warning": 1}}}]"#,
        )
        .unwrap();
        assert_eq!((v[0].authority(), v[0].weight()), ("10.0.0.1:80".into(), 1));
        assert_eq!((v[1].authority(), v[1].weight()), ("[::1]:81".into(), 3));
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("order-*"), "order-%2A");
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }
}
