use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Outlier ejection settings (DESIGN.md: 5 consecutive gateway errors eject for 10 s × n,
/// at most 50% of endpoints at once).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_errors: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_errors: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Passive outlier state of one endpoint.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: AtomicU32,
    ejections: AtomicU32,
    until: Mutex<Option<Instant>>,
    /// Set while an ejection may be running: the common case (never ejected) answers
    /// `is_ejected` without a lock or a clock read, and it is asked on every request.
    flagged: AtomicBool,
}

impl Outlier {
    pub fn is_ejected(&self) -> bool {
        if !self.flagged.load(Ordering::Acquire) {
            return false;
        }
        let mut g = self.until.lock().unwrap_or_else(|p| p.into_inner());
        match *g {
            Some(u) if Instant::now() < u => true,
            _ => {
                *g = None;
                self.flagged.store(false, Ordering::Release);
                false
            }
        }
    }

    /// Times this endpoint has been ejected.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// Records a gateway error (connect failure, reset, 5xx from the endpoint). Returns the
    /// ejection time when this error ejects the endpoint; `ejected_now` and `total` let the
    /// caller's max-ejected share hold (`ejected_now` endpoints are already out).
    pub fn failure(
        &self,
        cfg: &OutlierConfig,
        ejected_now: usize,
        total: usize,
    ) -> Option<Duration> {
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n < cfg.consecutive_errors {
            return None;
        }
        if (ejected_now + 1) * 100 > total * cfg.max_ejected_percent as usize {
            return None;
        }
        let mut g = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if g.is_some_and(|u| now < u) {
            return None;
        }
        let times = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let d = (cfg.base_ejection * times).min(cfg.max_ejection);
        *g = Some(now + d);
        self.flagged.store(true, Ordering::Release);
        self.consecutive.store(0, Ordering::Relaxed);
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_errors_for_growing_times() {
        let cfg = OutlierConfig::default();
        let o = Outlier::default();
        for _ in 0..4 {
            assert_eq!(o.failure(&cfg, 0, 4), None);
        }
        o.success();
        for _ in 0..4 {
            assert_eq!(o.failure(&cfg, 0, 4), None, "success resets the count");
        }
        assert_eq!(o.failure(&cfg, 0, 4), Some(Duration::from_secs(10)));
        assert!(o.is_ejected());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!o.is_ejected(), "back after 10 s");
        for _ in 0..4 {
            o.failure(&cfg, 0, 4);
        }
        assert_eq!(
            o.failure(&cfg, 0, 4),
            Some(Duration::from_secs(20)),
            "10 s × 2"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_more_than_the_max_share() {
        let cfg = OutlierConfig::default();
        let o = Outlier::default();
        for _ in 0..10 {
            assert_eq!(o.failure(&cfg, 2, 4), None, "2 of 4 already out: 50%");
        }
        assert!(!o.is_ejected());
        assert!(o.failure(&cfg, 1, 4).is_some());
    }
}
