//! `?filter=` expressions, the subset of Consul's filter language that clients use:
//!
//! ```text
//! Service.Tags contains "v1" and Service.Meta.version != "1.0"
//! "primary" in Service.Tags or not (Node.Meta.rack == r2)
//! Service.Meta is not empty
//! ```
//!
//! Operators: `==`, `!=`, `contains`, `not contains`, `in`, `not in`, `is empty`,
//! `is not empty`, combined with `and`, `or`, `not` and parentheses. Selectors walk the
//! JSON object the endpoint returns (`Service.Port`, `Node.Meta.rack`, `Meta["a.b"]`); a
//! selector that passes through a list (`Checks.Status`) matches when any element does.
//! Values are quoted (`"..."` or `` `...` ``) or bare words.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failed to create boolean expression evaluator: {0}")]
pub struct FilterError(String);

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Eq(Vec<String>, String),
    Ne(Vec<String>, String),
    Contains(Vec<String>, String),
    In(String, Vec<String>),
    Empty(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Open,
    Close,
    Eq,
    Ne,
}

fn lex(src: &str) -> Result<Vec<Tok>, FilterError> {
    let mut out = Vec::new();
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            '=' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::Eq);
                i += 2;
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::Ne);
                i += 2;
            }
            '"' | '`' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(FilterError(format!("unterminated string in {src:?}"))),
                        Some(&q) if q == quote => {
                            i += 1;
                            break;
                        }
                        Some('\\') if quote == '"' => {
                            if let Some(&e) = chars.get(i + 1) {
                                s.push(e);
                            }
                            i += 2;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            _ => {
                let mut s = String::new();
                while let Some(&ch) = chars.get(i) {
                    if ch.is_whitespace() || ch == '(' || ch == ')' || ch == '=' || ch == '!' {
                        break;
                    }
                    // Map indexing `Meta["a.b"]` stays part of the selector word.
                    if ch == '[' {
                        let end = chars[i..]
                            .iter()
                            .position(|&x| x == ']')
                            .ok_or_else(|| FilterError(format!("unclosed '[' in {src:?}")))?;
                        s.extend(&chars[i..i + end + 1]);
                        i += end + 1;
                        continue;
                    }
                    s.push(ch);
                    i += 1;
                }
                if s.is_empty() {
                    return Err(FilterError(format!(
                        "unexpected character {c:?} in {src:?}"
                    )));
                }
                out.push(Tok::Word(s));
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn peek_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x == w)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect_word(&mut self, w: &str) -> Result<(), FilterError> {
        match self.next() {
            Some(Tok::Word(x)) if x == w => Ok(()),
            other => Err(FilterError(format!("expected {w:?}, found {other:?}"))),
        }
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.not()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Filter::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Filter, FilterError> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Filter::Not(Box::new(self.not()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Filter, FilterError> {
        match self.next() {
            Some(Tok::Open) => {
                let inner = self.or()?;
                match self.next() {
                    Some(Tok::Close) => Ok(inner),
                    other => Err(FilterError(format!("expected ')', found {other:?}"))),
                }
            }
            Some(Tok::Str(value)) => self.value_first(value),
            Some(Tok::Word(word)) => {
                // `value in Selector` with a bare value, or a selector-first match.
                if self.peek_word("in")
                    || (self.peek_word("not")
                        && matches!(self.toks.get(self.pos + 1), Some(Tok::Word(w)) if w == "in"))
                {
                    return self.value_first(word);
                }
                self.selector_first(selector(&word)?)
            }
            other => Err(FilterError(format!(
                "expected a selector or value, found {other:?}"
            ))),
        }
    }

    fn value_first(&mut self, value: String) -> Result<Filter, FilterError> {
        let negate = self.peek_word("not");
        if negate {
            self.pos += 1;
        }
        self.expect_word("in")?;
        let sel = match self.next() {
            Some(Tok::Word(w)) => selector(&w)?,
            other => Err(FilterError(format!(
                "expected a selector after 'in', found {other:?}"
            )))?,
        };
        let f = Filter::In(value, sel);
        Ok(if negate { Filter::Not(Box::new(f)) } else { f })
    }

    fn value(&mut self) -> Result<String, FilterError> {
        match self.next() {
            Some(Tok::Str(s)) | Some(Tok::Word(s)) => Ok(s),
            other => Err(FilterError(format!("expected a value, found {other:?}"))),
        }
    }

    fn selector_first(&mut self, sel: Vec<String>) -> Result<Filter, FilterError> {
        match self.next() {
            Some(Tok::Eq) => Ok(Filter::Eq(sel, self.value()?)),
            Some(Tok::Ne) => Ok(Filter::Ne(sel, self.value()?)),
            Some(Tok::Word(w)) if w == "contains" => Ok(Filter::Contains(sel, self.value()?)),
            Some(Tok::Word(w)) if w == "not" => {
                self.expect_word("contains")?;
                Ok(Filter::Not(Box::new(Filter::Contains(sel, self.value()?))))
            }
            Some(Tok::Word(w)) if w == "is" => {
                let negate = self.peek_word("not");
                if negate {
                    self.pos += 1;
                }
                self.expect_word("empty")?;
                let f = Filter::Empty(sel);
                Ok(if negate { Filter::Not(Box::new(f)) } else { f })
            }
            Some(Tok::Word(w)) if w == "matches" => Err(FilterError(
                "the 'matches' operator is not supported yet".into(),
            )),
            other => Err(FilterError(format!(
                "expected ==, !=, contains, in or is empty after {}, found {other:?}",
                sel.join(".")
            ))),
        }
    }
}

/// Splits `Service.Meta["a.b"].x` into path segments.
fn selector(word: &str) -> Result<Vec<String>, FilterError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            '[' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                let mut key = String::new();
                for k in chars.by_ref() {
                    if k == ']' {
                        break;
                    }
                    key.push(k);
                }
                out.push(key.trim_matches(|q| q == '"' || q == '`').to_owned());
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' => cur.push(c),
            other => {
                return Err(FilterError(format!(
                    "invalid character {other:?} in selector {word:?}"
                )));
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    if out.is_empty() {
        return Err(FilterError(format!("empty selector {word:?}")));
    }
    Ok(out)
}

impl Filter {
    pub fn parse(src: &str) -> Result<Filter, FilterError> {
        let toks = lex(src)?;
        if toks.is_empty() {
            return Err(FilterError("empty filter expression".into()));
        }
        let mut p = Parser { toks, pos: 0 };
        let f = p.or()?;
        if p.pos < p.toks.len() {
            return Err(FilterError(format!(
                "unexpected {:?} after a complete expression",
                p.toks[p.pos]
            )));
        }
        Ok(f)
    }

    pub fn matches(&self, v: &Value) -> bool {
        match self {
            Filter::And(a, b) => a.matches(v) && b.matches(v),
            Filter::Or(a, b) => a.matches(v) || b.matches(v),
            Filter::Not(a) => !a.matches(v),
            Filter::Eq(sel, want) => resolve(v, sel).iter().any(|x| scalar_eq(x, want)),
            Filter::Ne(sel, want) => !resolve(v, sel).iter().any(|x| scalar_eq(x, want)),
            Filter::Contains(sel, want) => resolve(v, sel).iter().any(|x| contains(x, want)),
            Filter::In(want, sel) => resolve(v, sel).iter().any(|x| contains(x, want)),
            Filter::Empty(sel) => resolve(v, sel).iter().all(|x| is_empty(x)),
        }
    }
}

/// Every value `sel` reaches, fanning out over arrays on the way.
fn resolve<'a>(v: &'a Value, sel: &[String]) -> Vec<&'a Value> {
    let Some((first, rest)) = sel.split_first() else {
        return vec![v];
    };
    match v {
        Value::Object(m) => {
            // Field names match case-insensitively, as in Consul.
            let found = m.get(first).or_else(|| {
                m.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(first))
                    .map(|(_, v)| v)
            });
            found.map(|x| resolve(x, rest)).unwrap_or_default()
        }
        Value::Array(items) => items.iter().flat_map(|x| resolve(x, sel)).collect(),
        _ => Vec::new(),
    }
}

fn scalar_eq(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s == want,
        Value::Number(n) => n.to_string() == want,
        Value::Bool(b) => b.to_string() == want,
        Value::Null => want.is_empty() || want == "null",
        Value::Array(items) => items.iter().any(|x| scalar_eq(x, want)),
        Value::Object(_) => false,
    }
}

fn contains(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s.contains(want),
        Value::Array(items) => items.iter().any(|x| scalar_eq(x, want)),
        Value::Object(m) => m.contains_key(want),
        _ => false,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Null => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({
            "Node": {"Node": "n1", "Meta": {"rack": "r1"}},
            "Service": {"ID": "web1", "Service": "web", "Tags": ["v1", "primary"], "Port": 8080,
                        "Meta": {"version": "1.2", "a.b": "dotted"}},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "c", "Status": "warning"}]
        })
    }

    #[test]
    fn evaluates_consul_style_expressions() {
        let e = entry();
        for (expr, want) in [
            (r#"Service.Tags contains "v1""#, true),
            (r#""primary" in Service.Tags"#, true),
            ("v2 in Service.Tags", false),
            (r#""v2" not in Service.Tags"#, true),
            ("Service.Tags not contains v1", false),
            ("Service.Port == 8080", true),
            (r#"Service.Meta.version != "1.0""#, true),
            (r#"Service.Meta["a.b"] == dotted"#, true),
            ("Node.Meta.rack == r1 and Service.Service == web", true),
            ("Node.Meta.rack == r2 or Service.ID == web1", true),
            ("not (Node.Meta.rack == r1)", false),
            ("Checks.Status == warning", true),
            ("Checks.Status == critical", false),
            ("Service.Meta is not empty", true),
            ("Service.Meta.missing is empty", true),
            ("service.tags contains v1", true),
            (
                "(Service.Port == 1 or Service.Port == 8080) and not Checks.Status == critical",
                true,
            ),
        ] {
            let f = Filter::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            assert_eq!(f.matches(&e), want, "{expr}");
        }
    }

    #[test]
    fn bad_expressions_say_why() {
        for (expr, needle) in [
            ("", "empty"),
            ("Service.Tags", "expected =="),
            ("Service.Port ==", "expected a value"),
            (r#"Service.ID == "open"#, "unterminated"),
            ("(Service.ID == a", "expected ')'"),
            ("Service.ID == a b", "unexpected"),
            ("Service.ID matches x", "not supported"),
        ] {
            let err = Filter::parse(expr).unwrap_err().to_string();
            assert!(err.contains(needle), "{expr}: {err}");
        }
    }
}
