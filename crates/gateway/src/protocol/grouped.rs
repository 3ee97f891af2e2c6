//! Writes grouped by upstream within one turn of the event loop, and sent together.
//!
//! An upstream on the same host (a sidecar's app, the services on a gateway's node)
//! sleeps between requests, and the write that wakes it pays for the scheduler's
//! wake-up inside the writer's system call: on the 2-core bench VM that was the largest
//! single item of the proxy's kernel time (`bench/README.md`, session 7). Round-robin
//! over three upstreams sends each turn's requests u1 u2 u3 u1 u2 u3, waking each
//! upstream again for every request it gets. Here the tasks that reach their write in
//! the same turn write in upstream order instead, u1 u1 u2 u2 u3 u3. Which upstream
//! serves which request does not change, only the order of writes inside one turn.
//!
//! Order alone is not enough when the upstream shares the writer's CPU: the wake-up
//! preempts the writer on its way out of `send(2)`, the upstream handles its one request
//! and sleeps, and the next write wakes it again (`bench/README.md`, session 8). So where
//! the kernel has io_uring, the leader makes the turn's plain-TCP sends itself, in that
//! order, in one system call ([`tessera_uring`]): each upstream is woken once and finds
//! all of its requests. Responses to clients join the same turns ([`CLIENTS`]).
//!
//! The first task to arrive leads the turn: it wakes itself, so it runs again after the
//! tasks already queued in this turn, which meanwhile register; then it sends for all of
//! them (or, without a ring, wakes them in that order to write themselves). The others
//! wait at most that one pass through the run queue. A task gets its buffer back with
//! what the kernel took and writes any rest itself. A leader dropped before it released
//! the others releases them to write themselves; a waiting task dropped takes its send
//! out of the turn, so its socket is never written after it is gone.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tessera_uring::{Ring, Send};
use tokio::io::{AsyncWrite, AsyncWriteExt};

thread_local! {
    /// This thread's latest turn: open to new arrivals until its leader releases it,
    /// then kept to be reused once none of its tasks holds it.
    static OPEN: RefCell<Option<Arc<Mutex<Turn>>>> = const { RefCell::new(None) };
    /// This thread's ring for the turns its leaders release.
    static RING: RefCell<Rings> = const { RefCell::new(Rings::Untried) };
}

/// Whether this thread has a ring, made on the first turn that has sends.
enum Rings {
    Untried,
    Ready(Box<Ring>),
    Unavailable,
}

impl Rings {
    /// `TESSERA_IO_URING=off` keeps every write one system call, for comparing the two
    /// or working around a kernel's io_uring.
    fn new() -> Rings {
        if std::env::var_os("TESSERA_IO_URING").is_some_and(|v| v == "off") {
            return Rings::Unavailable;
        }
        match Ring::new() {
            Ok(r) => Rings::Ready(Box::new(r)),
            Err(e) => {
                tracing::info!(error = %e, "io_uring unavailable; writes go one system call each");
                Rings::Unavailable
            }
        }
    }
}

/// The tasks that reached their write in one turn.
struct Turn {
    /// Set by the leader's release; a task arriving later opens a new turn.
    released: bool,
    /// In arrival order; the leader's is the first.
    entries: Vec<Entry>,
    /// Scratch for the release, kept with the turn for its allocations: the entries'
    /// indices in release order, and the sends made in one batch with their entries.
    order: Vec<usize>,
    batch: Vec<Send>,
    owners: Vec<usize>,
}

struct Entry {
    key: usize,
    waker: Option<Waker>,
    /// The send the leader may make for this task; after the release, what came of it.
    send: Option<Send>,
}

impl Turn {
    /// Ends the turn: makes its sends through this thread's ring (`ring`), then wakes the
    /// waiting tasks, both grouped by key, `first`'s group first, arrival order kept
    /// within a group.
    fn release(&mut self, first: usize, ring: bool) {
        self.released = true;
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(0..self.entries.len());
        order.sort_unstable_by_key(|&i| (self.entries[i].key != first, self.entries[i].key, i));
        if ring {
            self.send_all(&order);
        }
        for &i in &order {
            if let Some(waker) = self.entries[i].waker.take() {
                waker.wake();
            }
        }
        self.order = order;
    }

    /// Makes the turn's sends, in `order`, in one system call where the ring allows.
    fn send_all(&mut self, order: &[usize]) {
        let (mut batch, mut owners) = (
            std::mem::take(&mut self.batch),
            std::mem::take(&mut self.owners),
        );
        for &i in order {
            if let Some(s) = self.entries[i].send.take() {
                batch.push(s);
                owners.push(i);
            }
        }
        if !batch.is_empty() {
            RING.with(|ring| {
                let mut ring = ring.borrow_mut();
                if let Rings::Untried = *ring {
                    *ring = Rings::new();
                }
                if let Rings::Ready(r) = &mut *ring
                    && let Err(e) = r.send(&mut batch)
                {
                    tracing::warn!(error = %e, "io_uring failed; writes go one system call each from now on");
                    *ring = Rings::Unavailable;
                }
            });
        }
        // Sends without a result were not made: their tasks write them.
        for (s, &i) in batch.drain(..).zip(&owners) {
            self.entries[i].send = Some(s);
        }
        owners.clear();
        (self.batch, self.owners) = (batch, owners);
    }
}

fn lock(turn: &Mutex<Turn>) -> MutexGuard<'_, Turn> {
    // A panic while holding the lock leaves the turn consistent: every step is a plain
    // field update, a send, or a wake.
    turn.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key under which client connections' responses join the turn. Pool keys are
/// addresses, never 0, so after the leader's own group the responses go first.
pub const CLIENTS: usize = 0;

/// A connection's transport, asked for the plain TCP socket under it: the leader can send
/// on that directly, while TLS has records to seal first.
pub trait PlainSocket {
    fn plain_fd(&self) -> Option<RawFd>;
}

impl PlainSocket for tokio::net::TcpStream {
    fn plain_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl<IO> PlainSocket for tokio_rustls::server::TlsStream<IO> {
    fn plain_fd(&self) -> Option<RawFd> {
        None
    }
}

impl PlainSocket for crate::protocol::transport::Io {
    fn plain_fd(&self) -> Option<RawFd> {
        match self {
            crate::protocol::transport::Io::Plain(s) => s.plain_fd(),
            crate::protocol::transport::Io::Tls(_) => None,
        }
    }
}

/// Writes `buf` to `io` in this turn's order of writes for `key`, through the leader's
/// batch when `io` is plain TCP. `buf` is the caller's again afterwards (its allocation
/// is reused).
pub async fn write_all<W: AsyncWrite + PlainSocket + Unpin>(
    io: &mut W,
    key: usize,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let send = io.plain_fd().map(|fd| Send::new(fd, std::mem::take(buf)));
    let mut from = 0;
    if let Some(sent) = wait(key, send).await {
        *buf = sent.buf;
        match sent.result {
            Some(Ok(n)) => from = n,
            Some(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            // Not sent, or the socket's buffer was full: all of it the ordinary way.
            Some(Err(_)) | None => {}
        }
    }
    if from < buf.len() {
        io.write_all(&buf[from..]).await?;
    }
    Ok(())
}

/// Completes when it is this task's turn to write to the upstream `key`. A `send` given
/// here comes back: with a result when the turn's leader made it (all of it or a part;
/// the task writes the rest), without one when the task is to write it itself.
fn wait(key: usize, send: Option<Send>) -> Wait {
    Wait {
        key,
        state: State::New(send),
    }
}

struct Wait {
    key: usize,
    state: State,
}

/// Each joined state holds the turn it joined: on a multi-threaded runtime the task may
/// be polled next on another thread.
enum State {
    New(Option<Send>),
    /// Leads the turn (its entry is the first); has woken itself to run after the turn's
    /// other tasks.
    Leading(Arc<Mutex<Turn>>),
    /// Waits at index `i` of the turn's entries.
    Waiting(Arc<Mutex<Turn>>, usize),
    Done,
}

impl Future for Wait {
    type Output = Option<Send>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Send>> {
        let key = self.key;
        match std::mem::replace(&mut self.state, State::Done) {
            State::New(send) => {
                self.state = OPEN.with(|open| {
                    let mut open = open.borrow_mut();
                    if let Some(turn) = open.as_ref() {
                        let mut t = lock(turn);
                        if !t.released {
                            t.entries.push(Entry {
                                key,
                                waker: Some(cx.waker().clone()),
                                send,
                            });
                            let i = t.entries.len() - 1;
                            drop(t);
                            return State::Waiting(turn.clone(), i);
                        }
                        // Released, and no task of it left holding it: this task opens
                        // the next turn in it, allocations and all.
                        if Arc::strong_count(turn) == 1 {
                            t.released = false;
                            t.entries.clear();
                            t.entries.push(Entry {
                                key,
                                waker: None,
                                send,
                            });
                            drop(t);
                            cx.waker().wake_by_ref();
                            return State::Leading(turn.clone());
                        }
                    }
                    let turn = Arc::new(Mutex::new(Turn {
                        released: false,
                        entries: vec![Entry {
                            key,
                            waker: None,
                            send,
                        }],
                        order: Vec::new(),
                        batch: Vec::new(),
                        owners: Vec::new(),
                    }));
                    *open = Some(turn.clone());
                    cx.waker().wake_by_ref();
                    State::Leading(turn)
                });
                Poll::Pending
            }
            // Only the leader ends its turn.
            State::Leading(turn) => {
                let mut t = lock(&turn);
                t.release(key, true);
                Poll::Ready(t.entries[0].send.take())
            }
            State::Waiting(turn, i) => {
                let mut t = lock(&turn);
                if t.released {
                    return Poll::Ready(t.entries[i].send.take());
                }
                // Polled before its turn ended (woken by something else): keep the
                // newest waker.
                match &mut t.entries[i].waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                drop(t);
                self.state = State::Waiting(turn, i);
                Poll::Pending
            }
            State::Done => Poll::Ready(None),
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        match &self.state {
            // A leader that goes away must release the others; they make their own
            // sends.
            State::Leading(turn) => {
                let mut t = lock(turn);
                t.entries[0].send = None;
                t.release(self.key, false);
            }
            // A waiting task that goes away takes its send with it: its socket may be
            // closed, and the descriptor reused, before the turn ends.
            State::Waiting(turn, i) => {
                let mut t = lock(turn);
                if !t.released {
                    let e = &mut t.entries[*i];
                    (e.waker, e.send) = (None, None);
                }
            }
            State::New(_) | State::Done => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;

    use super::*;

    /// Tasks spawned in one turn write (record) grouped by key, the leader's key first,
    /// arrival order kept within each key.
    #[tokio::test]
    async fn one_turns_writes_are_grouped_by_upstream() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let keys = [1usize, 2, 3, 1, 2, 3, 2];
        let tasks: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let order = order.clone();
                tokio::spawn(async move {
                    wait(k, None).await;
                    order.lock().unwrap().push((k, i));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            [(1, 0), (1, 3), (2, 1), (2, 4), (2, 6), (3, 2), (3, 5)]
        );
    }

    /// On a multi-threaded runtime tasks join turns on either worker and may be polled
    /// next on the other; every one of them still gets its turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_task_gets_its_turn_across_threads() {
        let done = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..2000usize)
            .map(|i| {
                let done = done.clone();
                tokio::spawn(async move {
                    wait(i % 3, None).await;
                    tokio::task::yield_now().await;
                    wait(i % 5, None).await;
                    done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        // Generous: a lost wake-up hangs forever, a slow machine takes milliseconds.
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("every task finishes");
        assert_eq!(done.load(Ordering::Relaxed), 2000);
    }

    /// Connected loopback pairs: (ours, the peer's).
    async fn pairs(n: usize) -> Vec<(tokio::net::TcpStream, tokio::net::TcpStream)> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let ours = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            out.push((ours, l.accept().await.unwrap().0));
        }
        out
    }

    /// Tasks writing in one turn, three per socket: every peer reads its bytes in each
    /// task's order, and each task has its buffer back.
    async fn one_turn_of_writes() {
        let mut peers = Vec::new();
        let mut tasks = Vec::new();
        for (i, (mut ours, peer)) in pairs(4).await.into_iter().enumerate() {
            peers.push(peer);
            tasks.push(tokio::spawn(async move {
                let mut bufs = Vec::new();
                for part in 0..3 {
                    let mut buf = format!("socket {i} part {part};").into_bytes();
                    write_all(&mut ours, i % 2, &mut buf).await.unwrap();
                    bufs.push(buf);
                }
                (ours, bufs)
            }));
        }
        for (i, (t, mut peer)) in tasks.into_iter().zip(peers).enumerate() {
            let (_ours, bufs) = t.await.unwrap();
            let want = format!("socket {i} part 0;socket {i} part 1;socket {i} part 2;");
            assert_eq!(bufs[2], format!("socket {i} part 2;").as_bytes());
            let mut got = vec![0; want.len()];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(String::from_utf8(got).unwrap(), want);
        }
    }

    #[tokio::test]
    async fn the_leader_sends_the_turns_writes() {
        one_turn_of_writes().await;
        assert!(
            RING.with(|r| matches!(*r.borrow(), Rings::Ready(_))),
            "the writes went through this thread's ring"
        );
    }

    #[tokio::test]
    async fn without_a_ring_each_task_writes_its_own() {
        RING.with(|r| *r.borrow_mut() = Rings::Unavailable);
        one_turn_of_writes().await;
    }

    /// Tasks on two workers, polled on either, all send through whichever leader's ring:
    /// every byte arrives, in each task's order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_across_threads_all_arrive() {
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for (i, (mut ours, mut peer)) in pairs(100).await.into_iter().enumerate() {
            writers.push(tokio::spawn(async move {
                for n in 0..20u32 {
                    let mut buf = n.to_be_bytes().to_vec();
                    write_all(&mut ours, i % 3, &mut buf).await.unwrap();
                    tokio::task::yield_now().await;
                }
                ours
            }));
            readers.push(tokio::spawn(async move {
                let mut got = vec![0; 80];
                peer.read_exact(&mut got).await.unwrap();
                got
            }));
        }
        let want: Vec<u8> = (0..20u32).flat_map(|n| n.to_be_bytes()).collect();
        let all = async {
            for (w, r) in writers.into_iter().zip(readers) {
                let _ours = w.await.unwrap();
                assert_eq!(r.await.unwrap(), want);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("every write finishes");
    }

    /// A task that goes away while waiting for its turn takes its send with it: nothing
    /// it had queued reaches its socket.
    #[tokio::test]
    async fn a_dropped_waiter_sends_nothing() {
        let mut p = pairs(2).await;
        let (mut a, mut a_peer) = p.remove(0);
        let (mut b, mut b_peer) = p.remove(0);
        let (mut abuf, mut bbuf) = (b"from a".to_vec(), b"dropped".to_vec());
        let mut leader = Box::pin(write_all(&mut a, 1, &mut abuf));
        let mut waiter = Box::pin(write_all(&mut b, 1, &mut bbuf));
        std::future::poll_fn(|cx| {
            assert!(leader.as_mut().poll(cx).is_pending());
            assert!(waiter.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        drop(waiter);
        leader.await.unwrap();
        b.write_all(b"marker").await.unwrap();
        let mut got = [0u8; 6];
        a_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"from a");
        b_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"marker", "the dropped task's bytes were not sent");
    }

    /// A leader dropped before its turn ended releases the tasks waiting in it.
    #[tokio::test]
    async fn a_dropped_leader_releases_the_others() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut leader = Box::pin(wait(7, None));
        std::future::poll_fn(|cx| {
            assert!(leader.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        let others: Vec<_> = (0..3)
            .map(|k| {
                let done = done.clone();
                tokio::spawn(async move {
                    wait(k, None).await;
                    done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        tokio::task::yield_now().await; // the others register behind the leader
        drop(leader);
        for t in others {
            t.await.unwrap();
        }
        assert_eq!(done.load(Ordering::Relaxed), 3);
    }
}
