//! etcd's messages as its JSON gateway writes them: protobuf's JSON mapping, so 64-bit
//! integers are strings, bytes are base64, and fields at their zero value are left out.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub(crate) fn b64<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(v))
}

fn unb64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    STANDARD.decode(s).map_err(serde::de::Error::custom)
}

/// An int64 written as a string (or, from some gateways, a number).
fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match N::deserialize(d)? {
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
        N::I(i) => Ok(i),
    }
}

pub(crate) fn int_str<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

pub(crate) fn is_zero(v: &i64) -> bool {
    *v == 0
}

pub(crate) fn is_empty(v: &[u8]) -> bool {
    v.is_empty()
}

/// What every answer carries: the store's revision when it was made.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Header {
    #[serde(default, deserialize_with = "int")]
    pub revision: i64,
    #[serde(default, deserialize_with = "int")]
    pub raft_term: i64,
    #[serde(default)]
    pub member_id: String,
}

/// A key and its value, with the revisions that made it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct KeyValue {
    #[serde(default, deserialize_with = "unb64")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "unb64")]
    pub value: Vec<u8>,
    #[serde(default, deserialize_with = "int")]
    pub create_revision: i64,
    #[serde(default, deserialize_with = "int")]
    pub mod_revision: i64,
    #[serde(default, deserialize_with = "int")]
    pub version: i64,
    #[serde(default, deserialize_with = "int")]
    pub lease: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RangeRequest {
    #[serde(serialize_with = "b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "b64", skip_serializing_if = "is_empty")]
    pub range_end: Vec<u8>,
    #[serde(serialize_with = "int_str", skip_serializing_if = "is_zero")]
    pub limit: i64,
    /// Read as of this revision (0: the latest).
    #[serde(serialize_with = "int_str", skip_serializing_if = "is_zero")]
    pub revision: i64,
    /// Served by the member asked, without a quorum round: may be behind.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub serializable: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keys_only: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub count_only: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RangeResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
    #[serde(default)]
    pub more: bool,
    #[serde(default, deserialize_with = "int")]
    pub count: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PutRequest {
    #[serde(serialize_with = "b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "b64")]
    pub value: Vec<u8>,
    #[serde(serialize_with = "int_str", skip_serializing_if = "is_zero")]
    pub lease: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub prev_kv: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PutResponse {
    #[serde(default)]
    pub header: Header,
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DeleteRangeRequest {
    #[serde(serialize_with = "b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "b64", skip_serializing_if = "is_empty")]
    pub range_end: Vec<u8>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub prev_kv: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeleteRangeResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default, deserialize_with = "int")]
    pub deleted: i64,
    #[serde(default)]
    pub prev_kvs: Vec<KeyValue>,
}

/// What a comparison looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Target {
    Version,
    Create,
    Mod,
    Value,
    Lease,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

/// One condition of a transaction. Build it with the constructors on [`crate::Compare`].
#[derive(Debug, Clone, Serialize)]
pub struct Compare {
    pub(crate) result: CompareResult,
    pub(crate) target: Target,
    #[serde(serialize_with = "b64")]
    pub(crate) key: Vec<u8>,
    #[serde(serialize_with = "b64", skip_serializing_if = "is_empty")]
    pub(crate) range_end: Vec<u8>,
    #[serde(
        serialize_with = "opt_int_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) version: Option<i64>,
    #[serde(
        serialize_with = "opt_int_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) create_revision: Option<i64>,
    #[serde(
        serialize_with = "opt_int_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) mod_revision: Option<i64>,
    #[serde(serialize_with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub(crate) value: Option<Vec<u8>>,
    #[serde(
        serialize_with = "opt_int_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) lease: Option<i64>,
}

fn opt_int_str<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.unwrap_or(0).to_string())
}

fn opt_b64<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(v.as_deref().unwrap_or_default()))
}

/// One operation inside a transaction.
#[derive(Debug, Clone, Serialize)]
pub enum Op {
    #[serde(rename = "request_range")]
    Range(RangeRequest),
    #[serde(rename = "request_put")]
    Put(PutRequest),
    #[serde(rename = "request_delete_range")]
    Delete(DeleteRangeRequest),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

#[derive(Debug, Clone, Deserialize)]
pub enum OpResponse {
    #[serde(rename = "response_range")]
    Range(RangeResponse),
    #[serde(rename = "response_put")]
    Put(PutResponse),
    #[serde(rename = "response_delete_range")]
    Delete(DeleteRangeResponse),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TxnResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default)]
    pub responses: Vec<OpResponse>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct LeaseGrantResponse {
    #[serde(rename = "ID", deserialize_with = "int")]
    pub id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "int")]
    pub ttl: i64,
    #[serde(default)]
    pub error: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct LeaseKeepAliveResult {
    pub result: LeaseKeepAlive,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct LeaseKeepAlive {
    #[serde(rename = "TTL", default, deserialize_with = "int")]
    pub ttl: i64,
}

/// A member's view of the cluster.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub version: String,
    /// The leader's member id, as a decimal string; empty while there is none.
    #[serde(default)]
    pub leader: String,
    #[serde(default, rename = "raftIndex", deserialize_with = "int")]
    pub raft_index: i64,
    #[serde(default, rename = "dbSize", deserialize_with = "int")]
    pub db_size: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchCreate {
    #[serde(serialize_with = "b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "b64", skip_serializing_if = "is_empty")]
    pub range_end: Vec<u8>,
    #[serde(serialize_with = "int_str", skip_serializing_if = "is_zero")]
    pub start_revision: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub prev_kv: bool,
    /// Empty event batches carrying the current revision, every few minutes while idle.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub progress_notify: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WatchMessage {
    pub result: Option<WatchResult>,
    pub error: Option<GatewayError>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct WatchResult {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub created: bool,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default, deserialize_with = "int")]
    pub compact_revision: i64,
    #[serde(default)]
    pub cancel_reason: String,
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum EventType {
    #[default]
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "DELETE")]
    Delete,
}

/// One change seen by a watch. A delete's `kv` has the key and the deleting revision as
/// its `mod_revision`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Event {
    #[serde(default, rename = "type")]
    pub kind: EventType,
    #[serde(default)]
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

/// An error answer from the gateway: a gRPC status code and its message.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct GatewayError {
    #[serde(default)]
    pub code: i32,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub error: String,
}
