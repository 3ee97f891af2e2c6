//! Request writes grouped by upstream within one turn of the event loop.
//!
//! An upstream on the same host (a sidecar's app, the services on a gateway's node)
//! sleeps between requests, and the write that wakes it pays for the scheduler's
//! wake-up inside the writer's system call: on the 2-core bench VM that was the largest
//! single item of the proxy's kernel time (`bench/README.md`, session 7). Round-robin over three
//! upstreams sends each turn's requests u1 u2 u3 u1 u2 u3, waking each upstream again
//! for every request it gets. Here the tasks that reach their write in the same turn
//! write in upstream order instead, u1 u1 u2 u2 u3 u3: the second write to an upstream
//! finds it awake. Which upstream serves which request does not change, only the order
//! of writes inside one turn.
//!
//! The first task to arrive leads the turn: it wakes itself, so it runs again after the
//! tasks already queued in this turn, which meanwhile register; then it wakes them in
//! upstream order (its own first) and writes. The others wait at most that one pass
//! through the run queue. A leader dropped before it released the others releases them
//! as it goes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

thread_local! {
    /// The tasks waiting in this thread's current turn.
    static TURN: Arc<Mutex<Turn>> = Arc::new(Mutex::new(Turn {
        number: 0,
        waiting: Vec::new(),
        led: false,
    }));
}

struct Turn {
    /// Counts released turns: a task registered in turn `n` may go once it is past `n`.
    number: u64,
    /// (upstream key, waker), in arrival order.
    waiting: Vec<(usize, Waker)>,
    /// Whether some task leads the open turn.
    led: bool,
}

impl Turn {
    /// Ends the open turn: wakes the waiting tasks grouped by key, `first`'s group first,
    /// arrival order kept within a group.
    fn release(&mut self, first: usize) {
        self.number += 1;
        self.led = false;
        let mut waiting = std::mem::take(&mut self.waiting);
        waiting.sort_by_key(|&(key, _)| (key != first, key));
        for (_, waker) in waiting.drain(..) {
            waker.wake();
        }
        // Keep the allocation for the next turn.
        self.waiting = waiting;
    }
}

fn lock(turn: &Mutex<Turn>) -> MutexGuard<'_, Turn> {
    // A panic while holding the lock leaves the turn consistent: every step is a plain
    // field update or a wake.
    turn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Completes when it is this task's turn to write to the upstream `key`.
pub fn wait(key: usize) -> Wait {
    Wait {
        key,
        state: State::New,
    }
}

pub struct Wait {
    key: usize,
    state: State,
}

/// Each joined state holds the turn it joined: on a multi-threaded runtime the task may
/// be polled next on another thread.
enum State {
    New,
    /// Leads the open turn; has woken itself to run after the turn's other tasks.
    Leading(Arc<Mutex<Turn>>),
    /// Waits in turn `n` at index `i` of the waiting list.
    Waiting(Arc<Mutex<Turn>>, u64, usize),
    Done,
}

impl Future for Wait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let key = self.key;
        match std::mem::replace(&mut self.state, State::Done) {
            State::New => {
                let turn = TURN.with(Arc::clone);
                let mut t = lock(&turn);
                let next = if t.led {
                    let i = t.waiting.len();
                    t.waiting.push((key, cx.waker().clone()));
                    State::Waiting(turn.clone(), t.number, i)
                } else {
                    t.led = true;
                    cx.waker().wake_by_ref();
                    State::Leading(turn.clone())
                };
                drop(t);
                self.state = next;
                Poll::Pending
            }
            // Only the leader ends its turn.
            State::Leading(turn) => {
                lock(&turn).release(key);
                Poll::Ready(())
            }
            State::Waiting(turn, n, i) => {
                let mut t = lock(&turn);
                if t.number > n {
                    return Poll::Ready(());
                }
                // Polled before its turn ended (woken by something else): keep the
                // newest waker.
                if let Some((_, w)) = t.waiting.get_mut(i)
                    && !w.will_wake(cx.waker())
                {
                    w.clone_from(cx.waker());
                }
                drop(t);
                self.state = State::Waiting(turn, n, i);
                Poll::Pending
            }
            State::Done => Poll::Ready(()),
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        // A waiting task that goes away leaves a waker behind; waking it later is a
        // harmless spurious wake. A leader that goes away must release the others.
        if let State::Leading(turn) = &self.state {
            lock(turn).release(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
                    wait(k).await;
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
                    wait(i % 3).await;
                    tokio::task::yield_now().await;
                    wait(i % 5).await;
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

    /// A leader dropped before its turn ended releases the tasks waiting in it.
    #[tokio::test]
    async fn a_dropped_leader_releases_the_others() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut leader = Box::pin(wait(7));
        std::future::poll_fn(|cx| {
            assert!(leader.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        let others: Vec<_> = (0..3)
            .map(|k| {
                let done = done.clone();
                tokio::spawn(async move {
                    wait(k).await;
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
