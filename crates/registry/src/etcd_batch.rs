//! Group commit for the registry's etcd transactions. etcd charges per transaction
//! (one request, one raft entry, one pass of its store, one event batch per watcher), so
//! while one transaction of this server is in flight, the writes that arrive queue, and
//! go next as one transaction: every write's compares, every write's puts and deletes, and
//! one marker put. They commit together at one revision, or, when any compare fails, each
//! is sent again alone, so each gets its own answer as if it had never been grouped.
//!
//! Grouping is only sound for writes that do not touch each other: two writes are kept
//! apart when one puts or deletes a key the other compares or writes (a serial order must
//! exist that gives every compare the answer the group gave it, and etcd refuses a
//! transaction that writes one key twice). Writes over a key range are never grouped.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tessera_etcd::{Client, Error, Op, PutRequest, TxnRequest, TxnResponse};
use tokio::sync::oneshot;

/// etcd's default `--max-txn-ops` is 128; one op is the marker.
const MAX_OPS: usize = 120;
/// etcd's default `--max-request-bytes` is 1.5 MiB.
const MAX_BYTES: usize = 1024 * 1024;

pub(crate) struct Batcher {
    client: Arc<Client>,
    /// The marker key every registry write puts (see `etcd_store::MARKER`).
    marker: Vec<u8>,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Queued>,
    /// Whether a task is sending batches now; the next write to arrive otherwise starts
    /// one.
    sending: bool,
}

struct Queued {
    txn: TxnRequest,
    done: oneshot::Sender<Result<TxnResponse, Error>>,
}

impl Batcher {
    pub(crate) fn new(client: Arc<Client>, marker: Vec<u8>) -> Arc<Batcher> {
        Arc::new(Batcher {
            client,
            marker,
            queue: Mutex::default(),
        })
    }

    /// Commits `txn`, grouped with the writes that queue beside it.
    pub(crate) async fn txn(self: &Arc<Self>, txn: TxnRequest) -> Result<TxnResponse, Error> {
        if !groupable(&txn) {
            return self.client.txn(&txn).await;
        }
        let (done, answer) = oneshot::channel();
        let start = {
            let mut q = self.queue();
            q.waiting.push_back(Queued { txn, done });
            !std::mem::replace(&mut q.sending, true)
        };
        if start {
            // A task of its own: a caller that gives up (its client went away) must not
            // strand the writes queued behind its own.
            tokio::spawn(self.clone().send_all());
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::Unknown(
                "the server stopped while the write was in flight".into(),
            ))
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends batches until none is waiting.
    async fn send_all(self: Arc<Self>) {
        loop {
            let batch = {
                let mut q = self.queue();
                if q.waiting.is_empty() {
                    q.sending = false;
                    return;
                }
                self.take(&mut q.waiting)
            };
            self.send(batch).await;
        }
    }

    /// The writes at the front of the queue that can go together.
    fn take(&self, waiting: &mut VecDeque<Queued>) -> Vec<Queued> {
        let mut batch = Vec::new();
        let (mut writes, mut reads) = (HashSet::<Vec<u8>>::new(), HashSet::<Vec<u8>>::new());
        let (mut ops, mut bytes) = (0, 0);
        while let Some(next) = waiting.front() {
            let t = &next.txn;
            let own: Vec<&[u8]> = self.written(t).collect();
            let size: usize = t.success.iter().map(Op::encoded_len).sum();
            let clash = own
                .iter()
                .any(|k| writes.contains(*k) || reads.contains(*k))
                || t.compare.iter().any(|c| writes.contains(c.key()));
            if !batch.is_empty() && (clash || ops + own.len() > MAX_OPS || bytes + size > MAX_BYTES)
            {
                break;
            }
            ops += own.len();
            bytes += size;
            writes.extend(own.into_iter().map(<[u8]>::to_vec));
            reads.extend(t.compare.iter().map(|c| c.key().to_vec()));
            if let Some(q) = waiting.pop_front() {
                batch.push(q);
            }
        }
        batch
    }

    /// The keys `t` puts or deletes, the marker aside.
    fn written<'a>(&'a self, t: &'a TxnRequest) -> impl Iterator<Item = &'a [u8]> {
        t.success
            .iter()
            .map(Op::key)
            .filter(move |k| *k != self.marker.as_slice())
    }

    async fn send(self: &Arc<Self>, mut batch: Vec<Queued>) {
        if batch.len() == 1 {
            let q = batch.remove(0);
            let _ = q.done.send(self.client.txn(&q.txn).await);
            return;
        }
        let mut group = TxnRequest::default();
        for q in &batch {
            group.compare.extend(q.txn.compare.iter().cloned());
            group.success.extend(
                q.txn
                    .success
                    .iter()
                    .filter(|op| op.key() != self.marker.as_slice())
                    .cloned(),
            );
        }
        group.success.push(Op::Put(PutRequest {
            key: self.marker.clone(),
            ..Default::default()
        }));
        match self.client.txn(&group).await {
            Ok(resp) if resp.succeeded => {
                for q in batch {
                    let _ = q.done.send(Ok(TxnResponse {
                        header: resp.header.clone(),
                        succeeded: true,
                        responses: Vec::new(),
                    }));
                }
            }
            // A compare failed (or etcd refused the group as a whole, nothing done):
            // each alone, so each gets its own verdict and its own failure answers.
            Ok(_) | Err(Error::Status { .. }) => {
                let alone = batch.into_iter().map(|q| {
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let _ = q.done.send(client.txn(&q.txn).await);
                    })
                });
                for task in alone.collect::<Vec<_>>() {
                    let _ = task.await;
                }
            }
            // Unknown or unreachable: the same for every write of the group.
            Err(e) => {
                for q in batch {
                    let _ = q.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Whether `t` may share a transaction: it writes single keys, compares single keys, and
/// reads nothing when it succeeds.
fn groupable(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .all(|op| !op.is_range() && !matches!(op, Op::Range(_)))
        && t.compare.iter().all(|c| !c.is_range())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tessera_etcd::{Compare, CompareResult, RangeRequest};

    const MARK: &[u8] = b"t/~rev";

    /// A registry-shaped write: compare `seen` on each key it reads, put each key it
    /// writes, and the marker; the marker read back when it fails.
    fn write(reads: &[(&str, i64)], puts: &[&str]) -> TxnRequest {
        let mut t = TxnRequest::default();
        for (k, seen) in reads {
            t.compare.push(Compare::mod_revision(
                k.as_bytes().to_vec(),
                CompareResult::Equal,
                *seen,
            ));
        }
        for k in puts {
            t.success.push(Op::Put(PutRequest {
                key: k.as_bytes().to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            }));
        }
        t.success.push(Op::Put(PutRequest {
            key: MARK.to_vec(),
            ..Default::default()
        }));
        t.failure.push(Op::Range(RangeRequest {
            key: MARK.to_vec(),
            ..Default::default()
        }));
        t
    }

    async fn batcher() -> Option<(tessera_testkit::EtcdCluster, Arc<Batcher>)> {
        let etcd = tessera_testkit::EtcdCluster::start_or_skip(1).await?;
        let client = Arc::new(Client::new(&etcd.client_addrs()).unwrap());
        Some((etcd, Batcher::new(client, MARK.to_vec())))
    }

    /// Writes to different keys that arrive together commit together (fewer revisions
    /// than writes), and each is answered as committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_to_different_keys_share_transactions() {
        let Some((_etcd, b)) = batcher().await else {
            return;
        };
        let writes = (0..20).map(|i| {
            let b = b.clone();
            let k = format!("t/k{i}");
            tokio::spawn(async move { b.txn(write(&[(&k, 0)], &[&k])).await })
        });
        let mut revisions = HashSet::new();
        for w in writes.collect::<Vec<_>>() {
            let r = w.await.unwrap().unwrap();
            assert!(r.succeeded);
            revisions.insert(r.revision());
        }
        assert!(
            revisions.len() < 20,
            "no two writes were grouped: {revisions:?}"
        );
    }

    /// Grouping never changes a verdict: a write whose compare fails is refused, with
    /// its own failure answers, and the others of its group still commit; two writes that
    /// each compare what the other writes are never grouped (both would pass their
    /// compares on the state before either), so exactly one of them commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouping_keeps_every_verdict() {
        let Some((_etcd, b)) = batcher().await else {
            return;
        };
        let first = b.txn(write(&[("t/x", 0)], &["t/x"])).await.unwrap();
        assert!(first.succeeded);
        let stale = write(&[("t/x", 0)], &["t/x"]);
        let fresh = write(&[("t/y", 0)], &["t/y"]);
        let (stale, fresh) = tokio::join!(b.txn(stale), b.txn(fresh));
        let (stale, fresh) = (stale.unwrap(), fresh.unwrap());
        assert!(!stale.succeeded, "a stale compare is refused");
        assert!(
            matches!(stale.responses.first(), Some(tessera_etcd::OpResponse::Range(r)) if r.kvs.len() == 1),
            "with its own failure answers: {stale:?}"
        );
        assert!(fresh.succeeded);

        let a = write(&[("t/a", 0), ("t/b", 0)], &["t/a"]);
        let c = write(&[("t/b", 0), ("t/a", 0)], &["t/b"]);
        let (a, c) = tokio::join!(b.txn(a), b.txn(c));
        let won = [a.unwrap().succeeded, c.unwrap().succeeded];
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    }
}
