//! A keyed rate limiter (GCRA): per key, one number — the time at which the key's
//! bucket would be empty again ("theoretical arrival time") — so a million keys cost a
//! few tens of megabytes, and a key whose time has passed is the same as no key at all
//! and is dropped when the table is pruned.
//!
//! `burst` requests may come at once; after that, one every `1 / rate` seconds. Over any
//! span `d` starting from an idle key, at most `burst + floor(d × rate)` are allowed.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Limiter settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// Sustained requests per second.
    pub rate: f64,
    /// Requests allowed at once (at least 1).
    pub burst: u32,
    /// Keys tracked at most; past it, expired keys are pruned, and if none are, new keys
    /// pass untracked (fail open) rather than growing without bound.
    pub max_keys: usize,
}

/// The decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `remaining` more would be allowed right now.
    Allow { remaining: u32 },
    /// Refused; a request after `retry_after` would be allowed.
    Deny { retry_after: Duration },
}

pub struct RateLimiter<K> {
    config: RateLimitConfig,
    interval: Duration,
    tolerance: Duration,
    epoch: Instant,
    /// Key → theoretical arrival time, as nanoseconds since `epoch`.
    state: Mutex<HashMap<K, u64>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(config: RateLimitConfig) -> RateLimiter<K> {
        let rate = if config.rate.is_finite() && config.rate > 0.0 {
            config.rate
        } else {
            1e-9
        };
        let interval = Duration::from_secs_f64((1.0 / rate).min(1e9));
        let burst = config.burst.max(1);
        RateLimiter {
            interval,
            tolerance: interval.saturating_mul(burst - 1),
            config: RateLimitConfig { burst, ..config },
            epoch: Instant::now(),
            state: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn check(&self, key: &K) -> Decision {
        self.check_at(key, Instant::now())
    }

    pub fn check_at(&self, key: &K, now: Instant) -> Decision {
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let interval = self.interval.as_nanos() as u64;
        let tolerance = self.tolerance.as_nanos() as u64;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let tat = state.get(key).copied().unwrap_or(now).max(now);
        if tat - now > tolerance {
            return Decision::Deny {
                retry_after: Duration::from_nanos(tat - now - tolerance),
            };
        }
        let next = tat + interval;
        if !state.contains_key(key) && state.len() >= self.config.max_keys {
            state.retain(|_, t| *t > now);
            if state.len() >= self.config.max_keys {
                return Decision::Allow { remaining: 0 };
            }
        }
        state.insert(key.clone(), next);
        // How many more fit before the next one would exceed the tolerance.
        let used = next - now;
        let remaining = (tolerance + interval).saturating_sub(used) / interval.max(1);
        Decision::Allow {
            remaining: remaining.min(u64::from(u32::MAX)) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32) -> RateLimiter<&'static str> {
        RateLimiter::new(RateLimitConfig {
            rate,
            burst,
            max_keys: 1000,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let l = limiter(2.0, 5);
        let allowed = (0..20)
            .filter(|_| matches!(l.check(&"a"), Decision::Allow { .. }))
            .count();
        assert_eq!(allowed, 5, "the burst");
        match l.check(&"a") {
            Decision::Deny { retry_after } => assert_eq!(retry_after, Duration::from_millis(500)),
            d => panic!("{d:?}"),
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let allowed = (0..20)
            .filter(|_| matches!(l.check(&"a"), Decision::Allow { .. }))
            .count();
        assert_eq!(allowed, 2, "1 s at 2/s");
        tokio::time::advance(Duration::from_secs(60)).await;
        let allowed = (0..20)
            .filter(|_| matches!(l.check(&"a"), Decision::Allow { .. }))
            .count();
        assert_eq!(allowed, 5, "an idle key refills up to the burst, no more");
        // Another key has its own bucket.
        assert!(matches!(l.check(&"b"), Decision::Allow { remaining: 4 }));
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_counts_down() {
        let l = limiter(1.0, 3);
        let r: Vec<Decision> = (0..4).map(|_| l.check(&"k")).collect();
        assert_eq!(
            &r[..3],
            &[
                Decision::Allow { remaining: 2 },
                Decision::Allow { remaining: 1 },
                Decision::Allow { remaining: 0 }
            ]
        );
        assert!(matches!(r[3], Decision::Deny { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_under_many_keys() {
        let l: RateLimiter<u64> = RateLimiter::new(RateLimitConfig {
            rate: 100.0,
            burst: 1,
            max_keys: 1000,
        });
        for k in 0..5000u64 {
            l.check(&k);
            if k % 500 == 0 {
                tokio::time::advance(Duration::from_millis(20)).await;
            }
        }
        assert!(l.len() <= 1000, "{}", l.len());
        // Full of live keys: a new key passes untracked instead of growing the table.
        for k in 10_000..11_000u64 {
            l.check(&k);
        }
        assert_eq!(l.len(), 1000);
        assert_eq!(l.check(&99_999), Decision::Allow { remaining: 0 });
        assert_eq!(l.len(), 1000);
        // Once they have expired they are pruned to make room.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(l.check(&99_999), Decision::Allow { remaining: 0 });
        assert_eq!(l.len(), 1);
    }
}
