//! ACLs in Consul's shape: policies hold rules (`service_prefix "web" { policy = "write" }`,
//! `key_prefix "app/" { policy = "read" }`), tokens link policies, and a request's token
//! decides what it may read and write. Rules are accepted in Consul's HCL subset or as
//! JSON. An exact rule beats a prefix rule, and the longest prefix wins; with no match the
//! configured default policy applies (deny unless configured otherwise).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// How much a rule grants. Ordered so that a grant covers every lesser one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Deny,
    Read,
    List,
    Write,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        match s {
            "deny" => Some(Level::Deny),
            "read" => Some(Level::Read),
            "list" => Some(Level::List),
            "write" => Some(Level::Write),
            _ => None,
        }
    }
}

/// The kinds of things rules name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Resource {
    Service,
    Key,
    Node,
    Agent,
    Session,
    Query,
    Event,
}

impl Resource {
    fn from_word(word: &str) -> Option<(Resource, bool)> {
        let (base, prefix) = match word.strip_suffix("_prefix") {
            Some(b) => (b, true),
            None => (word, false),
        };
        let r = match base {
            "service" => Resource::Service,
            "key" => Resource::Key,
            "node" => Resource::Node,
            "agent" => Resource::Agent,
            "session" => Resource::Session,
            "query" => Resource::Query,
            "event" => Resource::Event,
            _ => return None,
        };
        Some((r, prefix))
    }
}

/// Parsed rules of one policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    /// (resource, name, is_prefix) → level.
    pub grants: Vec<(Resource, String, bool, Level)>,
    pub acl: Option<Level>,
    pub operator: Option<Level>,
    pub keyring: Option<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rules: {0}")]
pub struct RulesError(pub String);

impl Rules {
    /// Parses Consul's HCL rule syntax or its JSON equivalent.
    pub fn parse(src: &str) -> Result<Rules, RulesError> {
        let trimmed = src.trim_start();
        if trimmed.starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(src).map_err(|e| RulesError(format!("JSON: {e}")))?;
            return Self::from_json(&v);
        }
        Self::from_hcl(src)
    }

    fn set_scalar(&mut self, word: &str, level: &str) -> Result<(), RulesError> {
        let lvl = Level::parse(level)
            .ok_or_else(|| RulesError(format!("{word}: unknown policy {level:?}")))?;
        match word {
            "acl" => self.acl = Some(lvl),
            "operator" => self.operator = Some(lvl),
            "keyring" => self.keyring = Some(lvl),
            "mesh" | "peering" => {}
            _ => return Err(RulesError(format!("unknown rule {word:?}"))),
        }
        Ok(())
    }

    fn from_json(v: &serde_json::Value) -> Result<Rules, RulesError> {
        let obj = v
            .as_object()
            .ok_or_else(|| RulesError("expected a JSON object".into()))?;
        let mut rules = Rules::default();
        for (word, body) in obj {
            if let Some(level) = body.as_str() {
                rules.set_scalar(word, level)?;
                continue;
            }
            let (res, prefix) = Resource::from_word(word)
                .ok_or_else(|| RulesError(format!("unknown rule {word:?}")))?;
            let names = body
                .as_object()
                .ok_or_else(|| RulesError(format!("{word}: expected an object of names")))?;
            for (name, attrs) in names {
                let level = attrs
                    .get("policy")
                    .and_then(|p| p.as_str())
                    .ok_or_else(|| RulesError(format!("{word} {name:?}: missing policy")))?;
                let lvl = Level::parse(level).ok_or_else(|| {
                    RulesError(format!("{word} {name:?}: unknown policy {level:?}"))
                })?;
                rules.grants.push((res, name.clone(), prefix, lvl));
            }
        }
        Ok(rules)
    }

    fn from_hcl(src: &str) -> Result<Rules, RulesError> {
        let toks = tokenize(src)?;
        let mut rules = Rules::default();
        let mut i = 0;
        let at = |i: usize| toks.get(i);
        while i < toks.len() {
            let Tok::Ident(word) = &toks[i] else {
                return Err(RulesError(format!(
                    "expected a rule name, found {:?}",
                    toks[i]
                )));
            };
            i += 1;
            match at(i) {
                Some(Tok::Eq) => {
                    let Some(Tok::Str(level)) = at(i + 1) else {
                        return Err(RulesError(format!("{word}: expected a quoted policy")));
                    };
                    rules.set_scalar(word, level)?;
                    i += 2;
                }
                Some(Tok::Str(name)) => {
                    let (res, prefix) = Resource::from_word(word)
                        .ok_or_else(|| RulesError(format!("unknown rule {word:?}")))?;
                    if at(i + 1) != Some(&Tok::Open) {
                        return Err(RulesError(format!("{word} {name:?}: expected '{{'")));
                    }
                    i += 2;
                    let mut level = None;
                    loop {
                        match (at(i), at(i + 1), at(i + 2)) {
                            (Some(Tok::Close), _, _) => {
                                i += 1;
                                break;
                            }
                            (Some(Tok::Ident(attr)), Some(Tok::Eq), Some(Tok::Str(v))) => {
                                if attr == "policy" {
                                    level = Some(Level::parse(v).ok_or_else(|| {
                                        RulesError(format!("{word} {name:?}: unknown policy {v:?}"))
                                    })?);
                                } else if attr != "intentions" {
                                    return Err(RulesError(format!(
                                        "{word} {name:?}: unknown attribute {attr:?}"
                                    )));
                                }
                                i += 3;
                            }
                            _ => {
                                return Err(RulesError(format!(
                                    "{word} {name:?}: expected policy = \"...\" or '}}'"
                                )));
                            }
                        }
                    }
                    let level = level
                        .ok_or_else(|| RulesError(format!("{word} {name:?}: missing policy")))?;
                    rules.grants.push((res, name.clone(), prefix, level));
                }
                _ => return Err(RulesError(format!("{word}: expected a name or '='"))),
            }
        }
        Ok(rules)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Open,
    Close,
    Eq,
}

fn tokenize(src: &str) -> Result<Vec<Tok>, RulesError> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() || c == ',' => {
                chars.next();
            }
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '/' => {
                chars.next();
                if chars.next() != Some('/') {
                    return Err(RulesError("stray '/'".into()));
                }
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '{' => {
                chars.next();
                out.push(Tok::Open);
            }
            '}' => {
                chars.next();
                out.push(Tok::Close);
            }
            '=' | ':' => {
                chars.next();
                out.push(Tok::Eq);
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e) => s.push(e),
                            None => return Err(RulesError("unterminated string".into())),
                        },
                        Some(c) => s.push(c),
                        None => return Err(RulesError("unterminated string".into())),
                    }
                }
                out.push(Tok::Str(s));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(s));
            }
            other => return Err(RulesError(format!("unexpected character {other:?}"))),
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Policy {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub description: String,
    pub rules: String,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyLink {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Token {
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    pub description: String,
    pub policies: Vec<PolicyLink>,
    pub local: bool,
    /// Consul's bootstrap token carries the built-in management policy. Stored in the
    /// log; the API renders tokens field by field.
    pub management: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AclOp {
    Bootstrapped,
    PutPolicy(Policy),
    DeletePolicy(String),
    PutToken(Token),
    DeleteToken(String),
}

/// The built-in policy every management token links to.
pub const MANAGEMENT_POLICY_ID: &str = "00000000-0000-0000-0000-000000000001";

#[derive(Default, Clone)]
pub struct AclState {
    pub bootstrapped: bool,
    pub policies: BTreeMap<String, Policy>,
    parsed: HashMap<String, Rules>,
    pub tokens: BTreeMap<String, Token>,
    by_secret: HashMap<String, String>,
}

impl AclState {
    pub fn apply(&mut self, op: AclOp) {
        match op {
            AclOp::Bootstrapped => self.bootstrapped = true,
            AclOp::PutPolicy(p) => {
                // Rules were validated before the op was logged; a parse failure here can
                // only come from a hand-edited log, and is treated as no grants.
                let rules = Rules::parse(&p.rules).unwrap_or_default();
                self.parsed.insert(p.id.clone(), rules);
                self.policies.insert(p.id.clone(), p);
            }
            AclOp::DeletePolicy(id) => {
                self.policies.remove(&id);
                self.parsed.remove(&id);
            }
            AclOp::PutToken(t) => {
                if let Some(old) = self.tokens.get(&t.accessor_id) {
                    self.by_secret.remove(&old.secret_id);
                }
                self.by_secret
                    .insert(t.secret_id.clone(), t.accessor_id.clone());
                self.tokens.insert(t.accessor_id.clone(), t);
            }
            AclOp::DeleteToken(acc) => {
                if let Some(t) = self.tokens.remove(&acc) {
                    self.by_secret.remove(&t.secret_id);
                }
            }
        }
    }

    pub fn snapshot_ops(&self) -> Vec<AclOp> {
        let mut ops = Vec::new();
        if self.bootstrapped {
            ops.push(AclOp::Bootstrapped);
        }
        ops.extend(self.policies.values().cloned().map(AclOp::PutPolicy));
        ops.extend(self.tokens.values().cloned().map(AclOp::PutToken));
        ops
    }

    pub fn token_by_secret(&self, secret: &str) -> Option<&Token> {
        self.by_secret.get(secret).and_then(|a| self.tokens.get(a))
    }

    pub fn policy_by_name(&self, name: &str) -> Option<&Policy> {
        self.policies.values().find(|p| p.name == name)
    }

    /// What `secret` may do. `None` secret means the anonymous token.
    pub fn authorizer(&self, secret: Option<&str>, default: Level) -> Result<Authz, UnknownToken> {
        let Some(secret) = secret else {
            return Ok(Authz::Rules {
                rules: Vec::new(),
                default,
            });
        };
        let token = self.token_by_secret(secret).ok_or(UnknownToken)?;
        if token.management || token.policies.iter().any(|p| p.id == MANAGEMENT_POLICY_ID) {
            return Ok(Authz::Management);
        }
        let rules = token
            .policies
            .iter()
            .filter_map(|p| self.parsed.get(&p.id).cloned())
            .collect();
        Ok(Authz::Rules { rules, default })
    }
}

/// A token secret the server does not know: Consul answers 403 "ACL not found".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ACL not found")]
pub struct UnknownToken;

/// The resolved permissions of one request.
#[derive(Debug, Clone)]
pub enum Authz {
    /// ACLs are off, or a management token: everything allowed.
    Management,
    Rules {
        rules: Vec<Rules>,
        default: Level,
    },
}

impl Authz {
    /// The level `name` of kind `res` is granted. Across policies, an exact rule beats a
    /// prefix rule and a longer prefix beats a shorter one; on a tie, deny wins.
    pub fn level(&self, res: Resource, name: &str) -> Level {
        let (rules, default) = match self {
            Authz::Management => return Level::Write,
            Authz::Rules { rules, default } => (rules, *default),
        };
        let mut best: Option<(bool, usize, Level)> = None;
        for r in rules {
            for (gres, gname, prefix, lvl) in &r.grants {
                if *gres != res {
                    continue;
                }
                let matches = if *prefix {
                    name.starts_with(gname.as_str())
                } else {
                    name == gname
                };
                if !matches {
                    continue;
                }
                let rank = (!*prefix, gname.len());
                best = match best {
                    None => Some((rank.0, rank.1, *lvl)),
                    Some((e, l, cur)) => {
                        if (rank.0, rank.1) > (e, l) {
                            Some((rank.0, rank.1, *lvl))
                        } else if (rank.0, rank.1) == (e, l) {
                            // Deny is the minimum, so `min` makes a deny win a tie.
                            Some((e, l, cur.min(*lvl)))
                        } else {
                            Some((e, l, cur))
                        }
                    }
                };
            }
        }
        best.map(|b| b.2).unwrap_or(default)
    }

    pub fn allows(&self, res: Resource, name: &str, need: Level) -> bool {
        let got = self.level(res, name);
        got != Level::Deny && got >= need
    }

    /// Whether every key under `prefix` is writable: no deny or read-only rule nested
    /// inside it. Needed for recursive deletes.
    pub fn allows_key_tree_write(&self, prefix: &str) -> bool {
        if !self.allows(Resource::Key, prefix, Level::Write) {
            return false;
        }
        match self {
            Authz::Management => true,
            Authz::Rules { rules, .. } => rules.iter().all(|r| {
                r.grants.iter().all(|(res, name, _, lvl)| {
                    *res != Resource::Key || !name.starts_with(prefix) || *lvl == Level::Write
                })
            }),
        }
    }

    fn scalar(&self, pick: impl Fn(&Rules) -> Option<Level>) -> Level {
        match self {
            Authz::Management => Level::Write,
            Authz::Rules { rules, default } => {
                let levels: Vec<Level> = rules.iter().filter_map(&pick).collect();
                if levels.contains(&Level::Deny) {
                    Level::Deny
                } else {
                    levels.into_iter().max().unwrap_or(*default)
                }
            }
        }
    }

    pub fn acl_level(&self) -> Level {
        self.scalar(|r| r.acl)
    }

    pub fn operator_level(&self) -> Level {
        self.scalar(|r| r.operator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hcl_and_json() {
        let hcl = r#"
            # web team
            service_prefix "" { policy = "read" }
            service "web" { policy = "write" }
            key_prefix "app/" {
              policy = "write"
            }
            key "app/secret" { policy = "deny" }
            operator = "read"
        "#;
        let r = Rules::parse(hcl).unwrap();
        assert_eq!(r.grants.len(), 4);
        assert_eq!(r.operator, Some(Level::Read));
        let json = r#"{"service_prefix": {"": {"policy": "read"}}, "service": {"web": {"policy": "write"}},
            "key_prefix": {"app/": {"policy": "write"}}, "key": {"app/secret": {"policy": "deny"}}, "operator": "read"}"#;
        let j = Rules::parse(json).unwrap();
        assert_eq!(j.grants.len(), 4);

        for rules in [r, j] {
            let a = Authz::Rules {
                rules: vec![rules],
                default: Level::Deny,
            };
            assert!(a.allows(Resource::Service, "web", Level::Write));
            assert!(a.allows(Resource::Service, "db", Level::Read));
            assert!(!a.allows(Resource::Service, "db", Level::Write));
            assert!(a.allows(Resource::Key, "app/x", Level::Write));
            assert!(!a.allows(Resource::Key, "app/secret", Level::Read));
            assert!(!a.allows(Resource::Key, "other", Level::Read));
            assert!(!a.allows_key_tree_write("app/"));
            assert!(!a.allows(Resource::Node, "n1", Level::Read));
        }
    }

    #[test]
    fn rejects_bad_rules_with_a_reason() {
        for (src, needle) in [
            (r#"service "web" { policy = "admin" }"#, "unknown policy"),
            (r#"servise "web" { policy = "read" }"#, "unknown rule"),
            (r#"service "web" { policy = "read" "#, "expected"),
            (r#"service "web" { }"#, "missing policy"),
            (r#"key "x" { policy = "read }"#, "unterminated"),
        ] {
            let err = Rules::parse(src).unwrap_err().to_string();
            assert!(err.contains(needle), "{src}: {err}");
        }
    }

    #[test]
    fn longest_prefix_and_exact_win() {
        let r = Rules::parse(
            r#"key_prefix "" { policy = "deny" }
               key_prefix "a/" { policy = "read" }
               key_prefix "a/b/" { policy = "write" }
               key "a/b/c" { policy = "deny" }"#,
        )
        .unwrap();
        let a = Authz::Rules {
            rules: vec![r],
            default: Level::Write,
        };
        assert_eq!(a.level(Resource::Key, "z"), Level::Deny);
        assert_eq!(a.level(Resource::Key, "a/x"), Level::Read);
        assert_eq!(a.level(Resource::Key, "a/b/x"), Level::Write);
        assert_eq!(a.level(Resource::Key, "a/b/c"), Level::Deny);
    }
}
