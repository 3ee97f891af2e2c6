//! Every example config parses; typos and bad values are refused with the key named.

use tessera_gateway::Config;

fn examples() -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("gateway"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no gateway examples in {}", dir.display());
    out
}

#[test]
fn every_example_parses_and_rejects_injected_unknown_keys() {
    for path in examples() {
        let text = std::fs::read_to_string(&path).unwrap();
        Config::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // An unknown key at the top, in a route and in an upstream is refused by name.
        let top = format!("listn = \"0.0.0.0:1\"\n{text}");
        let err = Config::parse(&top).unwrap_err().to_string();
        assert!(err.contains("listn"), "{}: {err}", path.display());
        let route = text.replacen("[[routes]]\n", "[[routes]]\nupsteam = \"x\"\n", 1);
        let err = Config::parse(&route).unwrap_err().to_string();
        assert!(err.contains("upsteam"), "{}: {err}", path.display());
    }
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        ("[[routes]]\nupstream = \"nope\"\n", "no [upstreams.nope]"),
        (
            "[[routes]]\npath = { prefix = \"api\" }\nupstream = \"a\"\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n",
            "must start with '/'",
        ),
        (
            "[[routes]]\npath = { regex = \"(\" }\nupstream = \"a\"\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n",
            "path.regex",
        ),
        (
            "[[routes]]\nupstream = \"a\"\ntimeout = \"10 parsecs\"\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n",
            "parsecs",
        ),
        (
            "[[routes]]\nmethods = [\"GE T\"]\nupstream = \"a\"\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n",
            "methods",
        ),
        (
            "[upstreams.a]\nendpoints = [\"localhost\"]\n",
            "upstreams.a.endpoints",
        ),
        (
            "[upstreams.a]\nendpoints = [\"127.0.0.1:80 zero\"]\n",
            "weight",
        ),
        (
            "[upstreams.a]\nservice = \"s\"\nendpoints = [\"127.0.0.1:80\"]\n",
            "not both",
        ),
        (
            "[upstreams.a]\nservice = \"s\"\npolicy = \"fastest\"\n",
            "fastest",
        ),
        (
            "[upstreams.a]\nservice = \"s\"\npolicy = \"maglev\"\n",
            "upstreams.a.hash",
        ),
        (
            "[upstreams.a]\nservice = \"s\"\nbreaker = { error_rate = 2.0 }\n",
            "upstreams.a.breaker.error_rate",
        ),
        (
            "[upstreams.a]\nservice = \"s\"\nbreaker = { eror_rate = 0.5 }\n",
            "eror_rate",
        ),
        ("listen = \"nowhere\"\n", "listen"),
        ("workers = 0\n", "workers: 1 to 1024, not 0"),
        (
            "workers = \"many\"\n",
            "workers: \"auto\" or a number, not \"many\"",
        ),
        ("workers = 2000\n", "workers: 1 to 1024"),
        (
            "[[routes]]\nfallback = { status = 1000 }\n",
            "fallback.status",
        ),
        ("[[routes]]\n", "needs an upstream or a fallback"),
        (
            "[[routes]]\nupstream = \"a\"\nretries = { backoff = \"1s\", max_backoff = \"100ms\" }\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n",
            "routes[0].retries.max_backoff",
        ),
    ];
    for (text, needle) in cases {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    use tessera_gateway::config::Workers;
    assert_eq!(Config::parse("").unwrap().workers, Workers::Auto);
    assert_eq!(
        Config::parse("workers = 3").unwrap().workers,
        Workers::Count(3)
    );
    assert_eq!("auto".parse::<Workers>(), Ok(Workers::Auto));
    assert_eq!(
        "0".parse::<Workers>(),
        Err("workers: 1 to 1024, not 0".to_string())
    );
}
