use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::window::Window;

/// Retry budget settings (DESIGN.md: 20% of requests + 10 retries/s, over 10 s).
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    pub ratio: f64,
    pub min_per_sec: u32,
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_sec: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Every request deposits; every retry withdraws. A retry is allowed while
/// `retries < ratio × requests + min_per_sec × window` over the window.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    /// (requests, retries) over the window.
    inner: Mutex<Window>,
}

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> RetryBudget {
        RetryBudget {
            inner: Mutex::new(Window::new(config.window, Instant::now())),
            config,
        }
    }

    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut Window) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.advance(now);
        f(&mut g)
    }

    /// Records an original request (not a retry).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// `deposit` with the caller's reading of the clock.
    pub fn deposit_at(&self, now: Instant) {
        self.with(now, |w| w.add(1, 0));
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let floor = f64::from(self.config.min_per_sec) * self.config.window.as_secs_f64();
        let ratio = self.config.ratio;
        self.with(Instant::now(), |w| {
            let (reqs, retries) = w.totals();
            if (retries as f64) + 1.0 > ratio * reqs as f64 + floor {
                return false;
            }
            w.add(0, 1);
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn caps_retries_at_ratio_plus_floor() {
        let b = RetryBudget::new(BudgetConfig::default());
        // 1,000 requests in the window, each wanting 2 retries.
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            for _ in 0..2 {
                if b.try_withdraw() {
                    retries += 1;
                }
            }
        }
        // 20% of 1000 + 10/s × 10 s = 300.
        assert_eq!(retries, 300);
        assert!(!b.try_withdraw());
        // The window moves on: budget comes back.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_and_retries_leave_the_window_bucket_by_bucket() {
        let b = RetryBudget::new(BudgetConfig::default());
        let drain = |b: &RetryBudget| (0..10_000).take_while(|_| b.try_withdraw()).count();
        for _ in 0..1000 {
            b.deposit();
        }
        assert_eq!(drain(&b), 300); // 20% of 1000 + the 100 floor
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..500 {
            b.deposit();
        }
        assert_eq!(drain(&b), 100); // 20% of 1500 + 100, minus the 300 taken
        // Still inside the first bucket's window: nothing has left it.
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert_eq!(drain(&b), 0);
        // The first one-second bucket (1000 requests, 300 retries) has left; the second
        // (500 requests, 100 retries) remains: 20% of 500 + 100 - 100.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(drain(&b), 100);
    }
}
