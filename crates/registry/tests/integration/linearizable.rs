//! Jepsen-style: concurrent clients put, read (`?consistent`) and compare-and-swap a few
//! keys through three registry servers on a 3-member etcd while the etcd leader is
//! killed; the recorded history of each key must be linearizable. A request that timed
//! out or was refused for want of etcd is recorded as unknown (it may have happened),
//! never as failed, as etcd's own robustness tests record them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tessera_testkit::EtcdCluster;

use crate::support::{Http, TestServer};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Put(String),
    /// What a read returned (`None`: no such key).
    Get(Option<String>),
    /// Compare the value with `expected` (`None`: the key is absent), then set `new`.
    Cas {
        expected: Option<String>,
        new: String,
        ok: bool,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    key: usize,
    op: Op,
    call: Instant,
    /// `None`: no answer (timed out, or refused with 503): it may or may not have happened.
    ret: Option<Instant>,
}

/// The register's rule for one op: the state after it, or `None` if it cannot happen.
fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    match op {
        Op::Put(v) => Some(Some(v.clone())),
        Op::Get(seen) => (seen == state).then(|| state.clone()),
        Op::Cas {
            expected,
            new,
            ok: true,
        } => (expected == state).then(|| Some(new.clone())),
        Op::Cas {
            expected,
            ok: false,
            ..
        } => (expected != state).then(|| state.clone()),
    }
}

/// Wing and Gong's search: linearize, one at a time, an op that could come first (called
/// before every unlinearized completed op returned), keeping the states already tried.
/// Unknown ops may take effect at any point after their call, or never.
fn linearizable(history: &[Entry]) -> bool {
    fn search(
        h: &[Entry],
        done: &mut Vec<bool>,
        state: Option<String>,
        seen: &mut HashSet<(Vec<bool>, Option<String>)>,
    ) -> bool {
        if h.iter()
            .zip(done.iter())
            .all(|(e, d)| *d || e.ret.is_none())
        {
            return true;
        }
        if !seen.insert((done.clone(), state.clone())) {
            return false;
        }
        let horizon = h
            .iter()
            .zip(done.iter())
            .filter(|(e, d)| !**d && e.ret.is_some())
            .filter_map(|(e, _)| e.ret)
            .min();
        for i in 0..h.len() {
            if done[i] || horizon.is_some_and(|t| h[i].call > t) {
                continue;
            }
            if let Some(next) = step(&state, &h[i].op) {
                done[i] = true;
                if search(h, done, next, seen) {
                    return true;
                }
                done[i] = false;
            }
        }
        false
    }
    let mut done = vec![false; history.len()];
    search(history, &mut done, None, &mut HashSet::new())
}

#[test]
fn the_checker_tells_linearizable_from_not() {
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let e = |op, call, ret| Entry {
        key: 0,
        op,
        call: at(call),
        ret,
    };
    let put = |v: &str| Op::Put(v.into());
    let get = |v: Option<&str>| Op::Get(v.map(str::to_owned));
    // A read after a completed put must see it.
    assert!(!linearizable(&[
        e(put("a"), 0, Some(at(1))),
        e(get(None), 2, Some(at(3)))
    ]));
    assert!(linearizable(&[
        e(put("a"), 0, Some(at(1))),
        e(get(Some("a")), 2, Some(at(3)))
    ]));
    // Overlapping: either order.
    assert!(linearizable(&[
        e(put("a"), 0, Some(at(5))),
        e(get(None), 1, Some(at(2)))
    ]));
    // An unknown put may have happened, later, or never.
    assert!(linearizable(&[
        e(put("a"), 0, None),
        e(get(None), 2, Some(at(3))),
        e(get(Some("a")), 4, Some(at(5)))
    ]));
    // But not un-happen.
    assert!(!linearizable(&[
        e(put("a"), 0, None),
        e(get(Some("a")), 2, Some(at(3))),
        e(get(None), 4, Some(at(5)))
    ]));
    // A failed CAS must have seen another value.
    let cas = |exp: Option<&str>, new: &str, ok| Op::Cas {
        expected: exp.map(str::to_owned),
        new: new.into(),
        ok,
    };
    assert!(!linearizable(&[
        e(put("a"), 0, Some(at(1))),
        e(cas(Some("a"), "b", false), 2, Some(at(3)))
    ]));
    assert!(linearizable(&[
        e(put("a"), 0, Some(at(1))),
        e(cas(Some("a"), "b", true), 2, Some(at(3))),
        e(get(Some("b")), 4, Some(at(5)))
    ]));
}

const KEYS: usize = 2;
const CLIENTS: usize = 4;
const OPS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_history_is_linearizable_through_an_etcd_leader_kill() {
    let Some(mut etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let endpoints = etcd.client_addrs();
    let mut servers = Vec::new();
    for node in ["a", "b", "c"] {
        servers.push(TestServer::start_etcd(&endpoints, node).await);
    }
    let https: Vec<Http> = servers.iter().map(|s| s.http.clone()).collect();
    let history = Arc::new(Mutex::new(Vec::<Entry>::new()));
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (https, history, progress) = (https.clone(), history.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..OPS {
                let h = &https[fastrand::usize(..https.len())];
                let key = fastrand::usize(..KEYS);
                let path = format!("/v1/kv/lin/{key}");
                let value = format!("c{c}-{n}");
                let limit = Duration::from_secs(5);
                let entry = match fastrand::u8(..3) {
                    0 => {
                        let call = Instant::now();
                        let r = tokio::time::timeout(limit, h.put(&path, value.clone())).await;
                        let ret = matches!(r, Ok((StatusCode::OK, _))).then(Instant::now);
                        Some(Entry {
                            key,
                            op: Op::Put(value),
                            call,
                            ret,
                        })
                    }
                    1 => {
                        let call = Instant::now();
                        match tokio::time::timeout(limit, h.get(&format!("{path}?consistent&raw")))
                            .await
                        {
                            Ok((StatusCode::OK, _, v)) => {
                                let seen = v
                                    .as_str()
                                    .map(str::to_owned)
                                    .unwrap_or_else(|| v.to_string());
                                Some(Entry {
                                    key,
                                    op: Op::Get(Some(seen)),
                                    call,
                                    ret: Some(Instant::now()),
                                })
                            }
                            Ok((StatusCode::NOT_FOUND, _, _)) => Some(Entry {
                                key,
                                op: Op::Get(None),
                                call,
                                ret: Some(Instant::now()),
                            }),
                            // A read that did not answer tells nothing.
                            _ => None,
                        }
                    }
                    _ => {
                        // Read the current version, then swap on it.
                        let read =
                            tokio::time::timeout(limit, h.get(&format!("{path}?consistent"))).await;
                        let (expected, index) = match read {
                            Ok((StatusCode::OK, _, v)) => {
                                let raw = base64::Engine::decode(
                                    &base64::engine::general_purpose::STANDARD,
                                    v[0]["Value"].as_str().unwrap_or_default(),
                                )
                                .unwrap();
                                (
                                    Some(String::from_utf8(raw).unwrap()),
                                    v[0]["ModifyIndex"].as_u64().unwrap(),
                                )
                            }
                            Ok((StatusCode::NOT_FOUND, _, _)) => (None, 0),
                            _ => continue,
                        };
                        let call = Instant::now();
                        let r = tokio::time::timeout(
                            limit,
                            h.put(&format!("{path}?cas={index}"), value.clone()),
                        )
                        .await;
                        match r {
                            Ok((StatusCode::OK, ok)) => Some(Entry {
                                key,
                                op: Op::Cas {
                                    expected,
                                    new: value,
                                    ok: ok == serde_json::json!(true),
                                },
                                call,
                                ret: Some(Instant::now()),
                            }),
                            // Unknown: recorded as a CAS that may have succeeded.
                            _ => Some(Entry {
                                key,
                                op: Op::Cas {
                                    expected,
                                    new: value,
                                    ok: true,
                                },
                                call,
                                ret: None,
                            }),
                        }
                    }
                };
                if let Some(e) = entry {
                    history.lock().unwrap().push(e);
                }
                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // A third of the way in, the etcd leader dies.
    tessera_testkit::wait_until(
        "a third of the operations",
        Duration::from_secs(120),
        || async { progress.load(std::sync::atomic::Ordering::Relaxed) >= CLIENTS * OPS / 3 },
    )
    .await;
    let leader = etcd.wait_leader().await;
    etcd.kill(leader);
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let answered = history.iter().filter(|e| e.ret.is_some()).count();
    assert!(
        answered > CLIENTS * OPS / 2,
        "too few answers ({answered}) to judge"
    );
    for key in 0..KEYS {
        let mut h: Vec<Entry> = history.iter().filter(|e| e.key == key).cloned().collect();
        h.sort_by_key(|e| e.call);
        assert!(linearizable(&h), "key {key}: not linearizable: {h:#?}");
    }
}
