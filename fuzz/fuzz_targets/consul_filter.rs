//! Consul filter expressions (`?filter=`): any expression parses or is refused; a parsed
//! one evaluates against any JSON without a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (expr, doc) = s.split_once('\n').unwrap_or((s, "{}"));
    if let Ok(f) = tessera_registry::filter::Filter::parse(expr) {
        let v = serde_json::from_str(doc).unwrap_or(serde_json::json!({
            "Service": "web", "Tags": ["a", "b"], "Meta": {"k": "v"}, "Port": 80,
            "Weights": {"Passing": 1}, "Checks": [{"Status": "passing"}]
        }));
        let _ = f.matches(&v);
    }
});
