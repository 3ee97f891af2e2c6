use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::window::Window;

/// The three breaker states (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The value of a breaker-state gauge, the same in every Tessera `/metrics`: 0 closed,
    /// 1 half-open, 2 open (so `max` over instances is the worst).
    pub fn gauge(self) -> u8 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// Breaker settings; defaults are DESIGN.md's: ≥ 50% errors over 10 s with ≥ 20 calls
/// opens it for 5 s, then 3 probes.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub error_rate: f64,
    pub window: Duration,
    pub min_calls: u32,
    pub open_for: Duration,
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            error_rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 20,
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
        }
    }
}

/// The call was rejected because the breaker is open (or its probes are all out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker is open")]
pub struct BreakerOpen {
    /// How long until the breaker lets a probe through.
    pub retry_after: Duration,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// (calls, errors) over the window.
    window: Window,
    opened_at: Instant,
    probes_out: u32,
    probes_ok: u32,
    /// Bumped on every state change, so permits from an old state are ignored.
    generation: u64,
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Arc<Mutex<Inner>>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        let now = Instant::now();
        CircuitBreaker {
            inner: Arc::new(Mutex::new(Inner {
                state: State::Closed,
                window: Window::new(config.window, now),
                opened_at: now,
                probes_out: 0,
                probes_ok: 0,
                generation: 0,
            })),
            config,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> State {
        let mut g = self.lock();
        self.advance(&mut g, Instant::now());
        g.state
    }

    /// Rotates buckets and moves Open → HalfOpen when the open period is over.
    fn advance(&self, g: &mut Inner, now: Instant) {
        g.window.advance(now);
        if g.state == State::Open
            && now.saturating_duration_since(g.opened_at) >= self.config.open_for
        {
            g.state = State::HalfOpen;
            g.probes_out = 0;
            g.probes_ok = 0;
            g.generation += 1;
        }
    }

    /// Asks to make a call. The permit must be resolved with `success` or `failure`;
    /// dropping it unresolved (a cancelled call) counts for nothing.
    pub fn try_acquire(&self) -> Result<Permit, BreakerOpen> {
        self.try_acquire_at(Instant::now())
    }

    /// `try_acquire` with the caller's reading of the clock (a proxy reads it once per
    /// request and shares it).
    pub fn try_acquire_at(&self, now: Instant) -> Result<Permit, BreakerOpen> {
        let mut g = self.lock();
        self.advance(&mut g, now);
        match g.state {
            State::Closed => {}
            State::Open => {
                return Err(BreakerOpen {
                    retry_after: self
                        .config
                        .open_for
                        .saturating_sub(now.saturating_duration_since(g.opened_at)),
                });
            }
            State::HalfOpen => {
                if g.probes_out + g.probes_ok >= self.config.half_open_probes {
                    return Err(BreakerOpen {
                        retry_after: Duration::from_secs(1),
                    });
                }
                g.probes_out += 1;
            }
        }
        Ok(Permit {
            breaker: self.clone(),
            generation: g.generation,
            probe: g.state == State::HalfOpen,
            done: false,
        })
    }

    /// Returns whether this outcome opened the breaker.
    fn record(&self, generation: u64, probe: bool, ok: bool, now: Instant) -> bool {
        let mut g = self.lock();
        self.advance(&mut g, now);
        if generation != g.generation {
            return false; // the state moved on since this call started
        }
        if probe {
            g.probes_out = g.probes_out.saturating_sub(1);
            if !ok {
                self.open(&mut g, now);
                return true;
            }
            g.probes_ok += 1;
            if g.probes_ok >= self.config.half_open_probes {
                g.state = State::Closed;
                g.window.clear();
                g.generation += 1;
            }
            return false;
        }
        g.window.add(1, u64::from(!ok));
        let (calls, errors) = g.window.totals();
        if calls >= u64::from(self.config.min_calls)
            && errors as f64 >= self.config.error_rate * calls as f64
        {
            self.open(&mut g, now);
            return true;
        }
        false
    }

    fn release(&self, generation: u64, probe: bool) {
        if !probe {
            return;
        }
        let mut g = self.lock();
        if generation == g.generation {
            g.probes_out = g.probes_out.saturating_sub(1);
        }
    }

    fn open(&self, g: &mut Inner, now: Instant) {
        g.state = State::Open;
        g.opened_at = now;
        g.generation += 1;
        g.window.clear();
    }
}

/// Permission for one call; resolve it with the call's outcome.
#[derive(Debug)]
pub struct Permit {
    breaker: CircuitBreaker,
    generation: u64,
    probe: bool,
    done: bool,
}

impl Permit {
    pub fn success(self) {
        self.success_at(Instant::now());
    }

    /// Returns whether this failure opened the breaker (for a trace's span event).
    pub fn failure(self) -> bool {
        self.failure_at(Instant::now())
    }

    /// `success` with the caller's reading of the clock.
    pub fn success_at(mut self, now: Instant) {
        self.done = true;
        self.breaker.record(self.generation, self.probe, true, now);
    }

    /// `failure` with the caller's reading of the clock.
    pub fn failure_at(mut self, now: Instant) -> bool {
        self.done = true;
        self.breaker.record(self.generation, self.probe, false, now)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.release(self.generation, self.probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig::default())
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_error_rate_with_enough_calls() {
        let b = breaker();
        // 19 failures: below min_calls, stays closed.
        for _ in 0..19 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state(), State::Closed);
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), State::Open);
        let err = b.try_acquire().unwrap_err();
        assert_eq!(err.retry_after, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_below_the_rate() {
        let b = breaker();
        for i in 0..100 {
            let p = b.try_acquire().unwrap();
            if i % 3 == 0 {
                p.failure();
            } else {
                p.success();
            }
        }
        assert_eq!(b.state(), State::Closed, "33% errors < 50%");
    }

    #[tokio::test(start_paused = true)]
    async fn old_errors_leave_the_window() {
        let b = breaker();
        for _ in 0..15 {
            b.try_acquire().unwrap().failure();
        }
        advance(Duration::from_secs(11)).await;
        for _ in 0..10 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(
            b.state(),
            State::Closed,
            "only 10 calls in the current window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probes_close_or_reopen() {
        let b = breaker();
        for _ in 0..20 {
            b.try_acquire().unwrap().failure();
        }
        advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), State::HalfOpen);
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert!(b.try_acquire().is_err(), "only 3 probes at a time");
        let mut probes = probes.into_iter();
        probes.next().unwrap().success();
        probes.next().unwrap().failure();
        assert_eq!(b.state(), State::Open, "a failed probe reopens");
        drop(probes);
        advance(Duration::from_secs(5)).await;
        for _ in 0..3 {
            b.try_acquire().unwrap().success();
        }
        assert_eq!(b.state(), State::Closed);
        // A dropped (cancelled) probe frees its slot.
        for _ in 0..20 {
            b.try_acquire().unwrap().failure();
        }
        advance(Duration::from_secs(5)).await;
        drop(b.try_acquire().unwrap());
        for _ in 0..3 {
            b.try_acquire().unwrap().success();
        }
        assert_eq!(b.state(), State::Closed);
    }
}
