//! The gateway's source directories are layers, and a module may name only modules of
//! its own layer or of those below it. A module that reaches up makes the lower layer
//! depend on the whole stack above it, so it can no longer be read, tested or reused on
//! its own (the HTTP/1.1 server naming the proxy is the example this test exists for).
//! Within a layer, directories must not import each other in a cycle either: a
//! subdirectory is a unit that is read on its own.
//! Imports between layers are read from the source: every `crate::…` path, including
//! those inside `use crate::{…}` groups. `super::` is not followed: it names a parent,
//! which is in the same directory, except from a top-level file, whose parent is the
//! crate root, where `lib.rs` only declares the layers and re-exports.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom first. The crate root (`lib.rs`) sits above them all.
const LAYERS: [&str; 5] = ["floor", "protocol", "policy", "proxy", "server"];

/// Imports that still reach up, each to be removed (none today). The test fails on any
/// import up that is not listed here, and on any listed one that no longer exists, so
/// the list can only shrink.
const NOT_YET: &[(&str, &str)] = &[];

/// Directory cycles still to break, as in `NOT_YET` (none today).
const CYCLES_NOT_YET: &[&[&str]] = &[];

fn layer(first: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| *l == first)
        .unwrap_or(LAYERS.len())
}

/// Every `crate::a::b…` path named in `src`, as `a::b` (at most two segments), with
/// comments left out.
fn named_paths(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let item = item.trim();
                    if !item.is_empty() {
                        out.insert(two_segments(item));
                    }
                }
            } else {
                out.insert(two_segments(rest));
            }
        }
    }
    out
}

fn two_segments(path: &str) -> String {
    let end = path
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(path.len());
    path[..end]
        .split("::")
        .filter(|s| !s.is_empty())
        .take(2)
        .collect::<Vec<_>>()
        .join("::")
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The unit a file belongs to for cycles: its directory, or itself at the top level.
fn unit_of_file(rel: &str) -> String {
    match rel.rsplit_once('/') {
        Some((dir, _)) => dir.to_owned(),
        None => rel.trim_end_matches(".rs").to_owned(),
    }
}

/// The unit a `a::b` path names: the deepest directory it reaches.
fn unit_of_path(src: &Path, path: &str) -> String {
    let segments: Vec<&str> = path.split("::").collect();
    let nested = segments.join("/");
    if src.join(&nested).is_dir() {
        nested
    } else {
        segments[0].to_owned()
    }
}

/// Groups of units that reach each other, smallest name first.
fn cycles(edges: &BTreeSet<(String, String)>) -> BTreeSet<Vec<String>> {
    let units: Vec<&String> = edges
        .iter()
        .flat_map(|(a, b)| [a, b])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let n = units.len();
    let at = |u: &String| units.iter().position(|x| *x == u).unwrap();
    let mut reach = vec![vec![false; n]; n];
    for (a, b) in edges {
        reach[at(a)][at(b)] = true;
    }
    for k in 0..n {
        for i in 0..n {
            for j in 0..n {
                reach[i][j] |= reach[i][k] && reach[k][j];
            }
        }
    }
    (0..n)
        .filter_map(|i| {
            let group: Vec<String> = (0..n)
                .filter(|&j| i == j || (reach[i][j] && reach[j][i]))
                .map(|j| units[j].clone())
                .collect();
            (group.len() > 1).then_some(group)
        })
        .collect()
}

#[test]
fn modules_import_only_their_own_layer_and_those_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut up = BTreeSet::new();
    let mut edges = BTreeSet::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "lib.rs" {
            continue;
        }
        let own = layer(rel.split(['/', '.']).next().unwrap());
        assert!(
            own < LAYERS.len(),
            "{rel} is in no layer: put it in one of {LAYERS:?}"
        );
        for path in named_paths(&std::fs::read_to_string(file).unwrap()) {
            let first = path.split("::").next().unwrap();
            if layer(first) > own {
                let allowed = NOT_YET.iter().find(|(f, p)| {
                    *f == rel && (path == *p || path.starts_with(&format!("{p}::")))
                });
                match allowed {
                    // A known import up is already reported; it would make every
                    // directory on its way one cycle.
                    Some((_, p)) => up.insert((rel.clone(), p.to_string())),
                    None => up.insert((rel.clone(), path.clone())),
                };
                continue;
            }
            let (from, to) = (unit_of_file(&rel), unit_of_path(&src, &path));
            if from != to {
                edges.insert((from, to));
            }
        }
    }
    let listed: BTreeSet<(String, String)> = NOT_YET
        .iter()
        .map(|(f, p)| (f.to_string(), p.to_string()))
        .collect();
    let new: Vec<_> = up.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&up).collect();
    assert!(
        new.is_empty(),
        "imports from a higher layer (layers, bottom first: {LAYERS:?}): {new:?}"
    );
    assert!(
        gone.is_empty(),
        "no longer imported from a higher layer; take them off NOT_YET: {gone:?}"
    );
    let found = cycles(&edges);
    let known: BTreeSet<Vec<String>> = CYCLES_NOT_YET
        .iter()
        .map(|c| c.iter().map(|u| u.to_string()).collect())
        .collect();
    assert_eq!(
        found, known,
        "directories that import each other (left: found, right: CYCLES_NOT_YET)"
    );
}

#[test]
fn a_cycle_between_directories_is_found() {
    let edge = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    let edges = BTreeSet::from([
        edge("a", "b"),
        edge("b", "c"),
        edge("c", "a"),
        edge("c", "d"),
    ]);
    assert_eq!(
        cycles(&edges),
        BTreeSet::from([vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]])
    );
}

#[test]
fn the_reader_sees_every_kind_of_crate_path() {
    let src = "use crate::floor::net::{Cidr, strip_port};\n\
               use crate::{proxy, server::Shared};\n\
               let x = crate::protocol::h1::server::parse(b); // crate::policy in a comment\n";
    let paths: Vec<String> = named_paths(src).into_iter().collect();
    assert_eq!(
        paths,
        ["floor::net", "protocol::h1", "proxy", "server::Shared"]
    );
}
