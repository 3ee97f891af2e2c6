//! The client against a real 3-member etcd cluster on loopback ports.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tessera_etcd::{
    Client, Compare, CompareResult, DeleteRangeRequest, Error, EventType, Op, OpResponse,
    PutRequest, RangeRequest, TxnRequest, WatchCreate, prefix_end,
};
use tessera_testkit::EtcdCluster;

fn put(key: &[u8], value: &[u8]) -> Op {
    Op::Put(PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_transactions_and_revisions() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let c = Client::new(&etcd.client_addrs()).unwrap();
    let first = c.put(b"app/a", b"1", 0).await.unwrap().revision();
    let second = c.put(b"app/b", b"2", 0).await.unwrap().revision();
    assert!(second > first);
    let a = c.get(b"app/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.mod_revision, a.create_revision),
        (&b"1"[..], first, first)
    );
    assert_eq!(c.get(b"app/none").await.unwrap(), None);

    // Compare-and-swap on the revision: the stale writer loses and learns the current one.
    let cas = |rev: i64, value: &'static [u8]| TxnRequest {
        compare: vec![Compare::mod_revision("app/a", CompareResult::Equal, rev)],
        success: vec![put(b"app/a", value)],
        failure: vec![Op::Range(RangeRequest {
            key: b"app/a".to_vec(),
            ..Default::default()
        })],
    };
    let won = c.txn(&cas(first, b"won")).await.unwrap();
    assert!(won.succeeded);
    let lost = c.txn(&cas(first, b"lost")).await.unwrap();
    assert!(!lost.succeeded);
    let Some(OpResponse::Range(now)) = lost.responses.first() else {
        panic!("{lost:?}");
    };
    assert_eq!(now.kvs[0].value, b"won");
    assert_eq!(now.kvs[0].mod_revision, won.revision());
    // Create-only: a create revision of 0 means the key does not exist.
    let create = TxnRequest {
        compare: vec![Compare::create_revision("app/c", CompareResult::Equal, 0)],
        success: vec![put(b"app/c", b"new")],
        failure: vec![],
    };
    assert!(c.txn(&create).await.unwrap().succeeded);
    assert!(!c.txn(&create).await.unwrap().succeeded);

    // A prefix: listed in key order, then deleted in one request.
    let all = c
        .range(RangeRequest {
            key: b"app/".to_vec(),
            range_end: prefix_end(b"app/"),
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(
        keys,
        vec![b"app/a".to_vec(), b"app/b".to_vec(), b"app/c".to_vec()]
    );
    let gone = c
        .delete(DeleteRangeRequest {
            key: b"app/".to_vec(),
            range_end: prefix_end(b"app/"),
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(gone.deleted, 3);
    assert_eq!(gone.prev_kvs.len(), 3);
    // An invalid request is etcd's refusal, not an unknown outcome.
    let bad = TxnRequest {
        compare: vec![],
        success: vec![put(b"", b"x")],
        failure: vec![],
    };
    assert!(
        matches!(c.txn(&bad).await, Err(Error::Status { .. })),
        "empty key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_every_change_in_order_until_compaction() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let c = Client::new(&etcd.client_addrs()).unwrap();
    let start = c.put(b"w/0", b"x", 0).await.unwrap().revision();
    let mut w = c
        .watch(WatchCreate {
            key: b"w/".to_vec(),
            range_end: prefix_end(b"w/"),
            start_revision: start,
            prev_kv: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut revs = vec![start];
    for i in 1..20 {
        revs.push(
            c.put(format!("w/{i}").as_bytes(), b"x", 0)
                .await
                .unwrap()
                .revision(),
        );
    }
    let deleted = c
        .delete(DeleteRangeRequest {
            key: b"w/0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .revision();
    let mut seen = Vec::new();
    while seen.len() < 21 {
        let batch = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("events arrive")
            .unwrap();
        for e in batch.events {
            seen.push((e.kind, e.kv.mod_revision, e.prev_kv.is_some()));
        }
    }
    let puts: Vec<i64> = seen[..20].iter().map(|(_, r, _)| *r).collect();
    assert_eq!(puts, revs, "every put, in revision order");
    assert!(seen[..20].iter().all(|(k, _, _)| *k == EventType::Put));
    assert_eq!(seen[20], (EventType::Delete, deleted, true));

    // Compaction: a watch from before it is refused, naming where history starts.
    c.compact(deleted).await.unwrap();
    let old = c
        .watch(WatchCreate {
            key: b"w/".to_vec(),
            range_end: prefix_end(b"w/"),
            start_revision: start,
            ..Default::default()
        })
        .await;
    let first = match old {
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("the cancellation arrives"),
        Err(e) => Err(e),
    };
    match first {
        Err(Error::Compacted(rev)) => assert_eq!(rev, deleted),
        Err(e) => panic!("{e}"),
        Ok(b) => panic!("a watch from a compacted revision delivered {b:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_keep_keys_until_revoked() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let c = Client::new(&etcd.client_addrs()).unwrap();
    let (lease, ttl) = c.lease_grant(30).await.unwrap();
    assert_eq!(ttl, 30);
    c.put(b"members/me", b"here", lease).await.unwrap();
    assert_eq!(c.get(b"members/me").await.unwrap().unwrap().lease, lease);
    assert!(c.lease_keepalive(lease).await.unwrap().is_some());
    c.lease_revoke(lease).await.unwrap();
    assert_eq!(
        c.get(b"members/me").await.unwrap(),
        None,
        "revoking deletes its keys"
    );
    assert_eq!(
        c.lease_keepalive(lease).await.unwrap(),
        None,
        "a revoked lease is gone"
    );
}

/// Killing members: requests move to the others, and a write whose fate cannot be known
/// says so instead of claiming failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_when_members_die() {
    let Some(mut etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let c = Client::new(&etcd.client_addrs())
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    c.put(b"k", b"v0", 0).await.unwrap();
    // The member the client is using goes away.
    etcd.kill(0);
    assert_eq!(c.get(b"k").await.unwrap().unwrap().value, b"v0");
    c.put(b"k", b"v1", 0).await.unwrap();
    // Then the leader, whichever it is: a new one is elected among the two left...
    // but two of three cannot lose another, so bring the first back first.
    etcd.restart(0).await.unwrap();
    let leader = etcd.wait_leader().await;
    etcd.kill(leader);
    // Writes go on: each either succeeds, or is unknown and then checked by a read.
    let mut confirmed = 0;
    for i in 0..20 {
        let value = format!("after-{i}");
        match c.put(b"k", value.as_bytes(), 0).await {
            Ok(_) => confirmed += 1,
            Err(Error::Unknown(_) | Error::Unreachable(_)) => continue,
            Err(e) => panic!("{e}"),
        }
        assert_eq!(c.get(b"k").await.unwrap().unwrap().value, value.as_bytes());
    }
    assert!(confirmed > 0, "no write succeeded after the leader died");
}

/// Members serving TLS and demanding client certificates (`--client-cert-auth`): a
/// client with the CA and its certificate reads, writes and watches; one without a
/// client certificate, or speaking plain HTTP, is refused and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_a_client_certificate() {
    let Some(etcd) = EtcdCluster::start_tls_or_skip(1).await else {
        return;
    };
    let t = etcd.tls().unwrap();
    let files = tessera_etcd::TlsFiles {
        ca: t.ca.clone(),
        cert: Some(t.cert.clone()),
        key: Some(t.key.clone()),
    };
    let c = Client::with_tls(&etcd.client_addrs(), Some(&files)).unwrap();
    let rev = c.put(b"tls/a", b"1", 0).await.unwrap().revision();
    let mut w = c
        .watch(WatchCreate {
            key: b"tls/".to_vec(),
            range_end: prefix_end(b"tls/"),
            start_revision: rev,
            ..Default::default()
        })
        .await
        .unwrap();
    let batch = w.next().await.unwrap();
    assert_eq!(batch.events[0].kv.key, b"tls/a");

    let anonymous = tessera_etcd::TlsFiles {
        ca: t.ca.clone(),
        cert: None,
        key: None,
    };
    let no_cert = Client::with_tls(&etcd.client_addrs(), Some(&anonymous)).unwrap();
    // TLS 1.3 refuses the certificate after the client's half of the handshake: the
    // client may already have sent the request, so it cannot call the write failed.
    let err = no_cert.put(b"tls/b", b"2", 0).await.unwrap_err();
    assert!(
        matches!(err, Error::Unreachable(_) | Error::Unknown(_)),
        "{err:?}"
    );
    let plain = Client::new(&etcd.client_addrs()).unwrap();
    assert!(plain.put(b"tls/b", b"2", 0).await.is_err());
    assert_eq!(
        c.get(b"tls/b").await.unwrap(),
        None,
        "a refused client wrote"
    );
    // A client certificate needs its key.
    let half = tessera_etcd::TlsFiles {
        key: None,
        ..files.clone()
    };
    assert!(matches!(
        Client::with_tls(&etcd.client_addrs(), Some(&half)),
        Err(Error::Tls(_))
    ));
}

/// A member frozen with SIGSTOP (a VM pause, a stuck disk) still accepts connections but
/// answers nothing: a read is passed on to another member instead of waiting out its
/// deadline, and a write sent to it is reported unknown (it may be applied on SIGCONT),
/// never as failed and never left hanging for the whole deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_is_passed_over() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let leader = etcd.wait_leader().await;
    let frozen = (leader + 1) % 3;
    let mut addrs = etcd.client_addrs();
    addrs.rotate_left(frozen);
    let client = || {
        Client::new(&addrs)
            .unwrap()
            .with_timeout(Duration::from_secs(30))
    };
    let c = client();
    c.put(b"k", b"v0", 0).await.unwrap();
    let pid = etcd.pid(frozen).unwrap();
    tessera_testkit::signal(pid, "STOP");
    let read = c.get(b"k").await;
    let fresh = client();
    let write = fresh.put(b"k", b"v1", 0).await;
    tessera_testkit::signal(pid, "CONT");
    assert_eq!(read.unwrap().unwrap().value, b"v0");
    assert!(
        matches!(write, Err(Error::Unknown(_))),
        "a write to a frozen member is unknown: {write:?}"
    );
    let after = fresh.get(b"k").await.unwrap().unwrap().value;
    assert!(after == b"v0" || after == b"v1", "{after:?}");
}

/// A watch on a member frozen with SIGSTOP ends with an error (HTTP/2 pings go
/// unanswered), instead of waiting forever for events that will never come, so the
/// watcher can move to another member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_frozen_member_ends() {
    let Some(etcd) = EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let mut addrs = etcd.client_addrs();
    addrs.rotate_left(1);
    let c = Client::new(&addrs).unwrap();
    let mut w = c
        .watch(WatchCreate {
            key: b"w/".to_vec(),
            range_end: prefix_end(b"w/"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(w.endpoint(), 0, "the watch is on the first endpoint");
    let pid = etcd.pid(1).unwrap();
    tessera_testkit::signal(pid, "STOP");
    let ended = tokio::time::timeout(Duration::from_secs(60), w.next()).await;
    tessera_testkit::signal(pid, "CONT");
    assert!(
        matches!(ended, Ok(Err(_))),
        "the watch ends with an error: {ended:?}"
    );
}
