//! The sliding window the circuit breaker (calls, errors) and the retry budget (requests,
//! retries) count in: ten buckets, the oldest cleared as time moves past it.

use std::time::Duration;

use tokio::time::Instant;

const BUCKETS: usize = 10;

#[derive(Debug)]
pub(crate) struct Window {
    /// Per-bucket pairs of counts, a ring; `head` is the current bucket.
    buckets: [(u64, u64); BUCKETS],
    head: usize,
    width: Duration,
    /// When the head bucket ends; `None` for a zero-length window, which never moves.
    /// Most calls only compare the clock with it.
    end: Option<Instant>,
}

impl Window {
    pub(crate) fn new(length: Duration, now: Instant) -> Window {
        let width = length / BUCKETS as u32;
        Window {
            buckets: [(0, 0); BUCKETS],
            head: 0,
            width,
            end: (width > Duration::ZERO).then(|| now + width),
        }
    }

    /// Moves the head to the bucket `now` falls in, clearing the buckets passed.
    pub(crate) fn advance(&mut self, now: Instant) {
        let Some(mut end) = self.end else { return };
        if now < end {
            return;
        }
        let mut steps = 0;
        while now >= end && steps <= BUCKETS {
            self.head = (self.head + 1) % BUCKETS;
            self.buckets[self.head] = (0, 0);
            end += self.width;
            steps += 1;
        }
        if steps > BUCKETS {
            // Idle for longer than the window: every bucket is clear; restart from now.
            end = now + self.width;
        }
        self.end = Some(end);
    }

    /// Adds to the current bucket's counts.
    pub(crate) fn add(&mut self, first: u64, second: u64) {
        let b = &mut self.buckets[self.head];
        b.0 += first;
        b.1 += second;
    }

    /// Both counts summed over the window.
    pub(crate) fn totals(&self) -> (u64, u64) {
        self.buckets
            .iter()
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }

    pub(crate) fn clear(&mut self) {
        self.buckets = [(0, 0); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn buckets_leave_one_at_a_time_and_a_long_idle_clears_all() {
        let mut w = Window::new(Duration::from_secs(10), Instant::now());
        w.add(5, 1);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        w.advance(Instant::now());
        w.add(1, 0);
        assert_eq!(w.totals(), (6, 1));
        tokio::time::advance(Duration::from_millis(1)).await;
        w.advance(Instant::now());
        assert_eq!(w.totals(), (1, 0), "the first bucket left at 10 s");
        // Idle far past the window: everything left, and buckets restart from now.
        tokio::time::advance(Duration::from_secs(95)).await;
        w.advance(Instant::now());
        assert_eq!(w.totals(), (0, 0));
        w.add(2, 2);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        w.advance(Instant::now());
        assert_eq!(w.totals(), (2, 2));
        tokio::time::advance(Duration::from_millis(1)).await;
        w.advance(Instant::now());
        assert_eq!(w.totals(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_length_window_keeps_its_counts() {
        let mut w = Window::new(Duration::ZERO, Instant::now());
        w.add(3, 1);
        tokio::time::advance(Duration::from_secs(60)).await;
        w.advance(Instant::now());
        assert_eq!(w.totals(), (3, 1));
    }
}
