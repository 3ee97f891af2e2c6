//! The pause between retries: exponential, capped, and jittered, so callers that failed
//! together do not retry together and a struggling upstream is not hit in lockstep.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The pause before the first retry, at most; doubles with each further retry.
    pub base: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl Backoff {
    /// Envoy's defaults for a proxy's retries: 25 ms, growing to 250 ms.
    pub const PROXY: Backoff = Backoff {
        base: Duration::from_millis(25),
        max: Duration::from_millis(250),
    };

    /// The pause before retry `attempt` (1 for the first): uniform in
    /// [0, min(max, base × 2^(attempt-1))] ("full jitter"). `random` is uniform in [0, 1].
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        self.ceiling(attempt).mul_f64(random.clamp(0.0, 1.0))
    }

    /// The largest pause before retry `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(30))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(b.delay(4, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(5, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(60, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
    }
}
