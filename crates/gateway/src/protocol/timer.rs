//! A timer that a connection keeps for all its requests. Arming a fresh Tokio timer per
//! request (insert into the wheel, remove on drop) costs more than parsing the request;
//! deadlines on one connection only move forward, so this one is left armed and, when it
//! fires before the current deadline, moved on to it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Both users (a connection's head deadline and its per-try timeouts) poll it from the
/// connection's own task only, whose waker never changes: that is what lets a poll that
/// finds the timer still pending skip re-registering the waker.
#[derive(Default)]
pub struct LazyTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The last poll of `sleep` was pending: it holds the task's waker and will wake it.
    waiting: bool,
}

impl LazyTimer {
    /// Ready once `deadline` has passed.
    pub fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Armed for later than this deadline (a route with a shorter timeout): the rare
        // case that pays for a move in the wheel.
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
            self.waiting = false;
        } else if self.waiting && !sleep.is_elapsed() {
            // Armed, in the wheel, with this task's waker: polling it again would only
            // compare wakers (callgrind: about 140 instructions a request).
            return Poll::Pending;
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                self.waiting = true;
                return Poll::Pending;
            }
            self.waiting = false;
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }

    /// Runs `fut` until `deadline`; `None` if the deadline came first.
    /// `fut` comes pinned by the caller: taken by value and pinned here, it would be
    /// stored twice in this future (argument and pinned local), and a proxied request's
    /// exchange future is kilobytes.
    pub async fn timeout_at<F: Future>(
        &mut self,
        deadline: Instant,
        mut fut: Pin<&mut F>,
    ) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.poll_until(cx, deadline).map(|()| None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::pin::pin;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_move_forward_and_back() {
        let mut timer = LazyTimer::default();
        let start = Instant::now();
        let never = std::future::pending::<()>();
        // First deadline: fires on time.
        assert!(
            timer
                .timeout_at(start + Duration::from_secs(10), pin!(never))
                .await
                .is_none()
        );
        assert_eq!(Instant::now(), start + Duration::from_secs(10));
        // A later deadline after the timer fired: re-armed, fires at the new one.
        let t = Instant::now();
        assert!(
            timer
                .timeout_at(
                    t + Duration::from_secs(5),
                    pin!(std::future::pending::<()>())
                )
                .await
                .is_none()
        );
        assert_eq!(Instant::now(), t + Duration::from_secs(5));
        // A work item done in time returns its value, leaving the timer armed.
        let t = Instant::now();
        let quick = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            timer
                .timeout_at(
                    t + Duration::from_secs(30),
                    pin!(async {
                        quick.await;
                        7
                    })
                )
                .await,
            Some(7)
        );
        // The next deadline is later than the armed one: the timer fires early, is moved
        // on, and the timeout still happens exactly at the deadline.
        let t = Instant::now();
        assert!(
            timer
                .timeout_at(
                    t + Duration::from_secs(45),
                    pin!(std::future::pending::<()>())
                )
                .await
                .is_none()
        );
        assert_eq!(Instant::now(), t + Duration::from_secs(45));
        // A shorter deadline than the armed one is honoured.
        let t = Instant::now();
        let armed_far = timer
            .timeout_at(t + Duration::from_secs(100), pin!(async {}))
            .await;
        assert_eq!(armed_far, Some(()));
        assert!(
            timer
                .timeout_at(
                    t + Duration::from_secs(2),
                    pin!(std::future::pending::<()>())
                )
                .await
                .is_none()
        );
        assert_eq!(Instant::now(), t + Duration::from_secs(2));
    }
}
