//! Mass-expiry protection, what Eureka calls self-preservation and Nacos a protect
//! threshold: when an unusual share of the TTL checks expire at about the same time, the
//! likelier cause is between the instances and the registry (a partition, a stalled
//! network, a registry that cannot be reached) rather than all of them dying at once. The
//! registry then stops expiring TTL checks instead of emptying the passing set, and says
//! so (a log line, `/v1/agent/self`, `/v1/agent/metrics`).
//!
//! The rule: protection starts when the TTL checks that expired within `window`, plus
//! the one expiring now, exceed `threshold` of all local TTL checks (and there are at least
//! `min_checks`). The checks that expired within the window are put back to the status
//! they had, and every further expiry is held. A held check that renews leaves the held
//! set; protection ends once the held checks are `threshold` of the TTL checks or fewer
//! (renewals recovered), and the checks still held then expire one by one, below the
//! threshold, so genuinely dead instances do leave. Protection also ends after `max_hold`,
//! so a fleet that really lost most of its instances is not shown passing forever.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::Deserialize;
use tessera_core::Health;
use tokio::time::Instant;

/// `[mass_expiry]` in the server config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MassExpiryConfig {
    pub enabled: bool,
    /// Share of the TTL checks that may expire within `window` (default 0.25).
    pub threshold: f64,
    /// How close together expiries count as "at once" (default 60s).
    #[serde(with = "tessera_core::serde_opt")]
    pub window: Option<Duration>,
    /// Fewer TTL checks than this are never protected (default 4).
    pub min_checks: usize,
    /// Longest protection before held checks expire anyway (default 15m).
    #[serde(with = "tessera_core::serde_opt")]
    pub max_hold: Option<Duration>,
}

impl Default for MassExpiryConfig {
    fn default() -> Self {
        MassExpiryConfig {
            enabled: true,
            threshold: 0.25,
            window: Some(Duration::from_secs(60)),
            min_checks: 4,
            max_hold: Some(Duration::from_secs(15 * 60)),
        }
    }
}

impl MassExpiryConfig {
    fn window(&self) -> Duration {
        self.window.unwrap_or(Duration::from_secs(60))
    }
    fn max_hold(&self) -> Duration {
        self.max_hold.unwrap_or(Duration::from_secs(15 * 60))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Expire,
    Hold,
}

/// What `/v1/agent/self` and the metrics show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Protection {
    pub active: bool,
    pub held: usize,
    pub threshold: f64,
}

pub(crate) struct Guard {
    cfg: MassExpiryConfig,
    /// Expiries within the window: when, which check, and its status before.
    recent: VecDeque<(Instant, String, Health)>,
    /// Checks whose expiry is held, with their status before.
    held: HashMap<String, Health>,
    since: Option<Instant>,
    /// Protection ran out (`max_hold`): held checks expire, and it does not start again
    /// until they are gone.
    gave_up: bool,
}

/// What the caller must do besides the verdict: checks to put back to a status.
pub(crate) type Restore = Vec<(String, Health)>;

impl Guard {
    pub fn new(cfg: MassExpiryConfig) -> Guard {
        Guard {
            cfg,
            recent: VecDeque::new(),
            held: HashMap::new(),
            since: None,
            gave_up: false,
        }
    }

    pub fn status(&self) -> Protection {
        Protection {
            active: self.since.is_some(),
            held: self.held.len(),
            threshold: self.cfg.threshold,
        }
    }

    /// TTL check `id` (now `status`) reached its deadline; `total` TTL checks are local.
    pub fn on_expiry(
        &mut self,
        id: &str,
        status: Health,
        total: usize,
        now: Instant,
    ) -> (Verdict, Restore) {
        if !self.cfg.enabled {
            return (Verdict::Expire, Vec::new());
        }
        let window = self.cfg.window();
        while self
            .recent
            .front()
            .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > window)
        {
            self.recent.pop_front();
        }
        let before = self.held.remove(id).unwrap_or(status);
        let limit = self.cfg.threshold * total as f64;
        if let Some(since) = self.since {
            if now.saturating_duration_since(since) > self.cfg.max_hold() {
                tracing::warn!(
                    held = self.held.len() + 1,
                    "mass-expiry protection held longer than max_hold; letting held TTL checks expire"
                );
                self.since = None;
                self.gave_up = true;
            } else if (self.held.len() + 1) as f64 > limit {
                self.held.insert(id.to_owned(), before);
                return (Verdict::Hold, Vec::new());
            } else {
                tracing::info!(
                    held = self.held.len(),
                    "renewals recovered; mass-expiry protection ends and checks still held expire"
                );
                self.since = None;
            }
        }
        if self.gave_up {
            // The held checks expire now without counting towards a new protection,
            // which may start again only once they are all gone.
            if self.held.is_empty() {
                self.gave_up = false;
            }
            return (Verdict::Expire, Vec::new());
        }
        let expiring = self.recent.len() + self.held.len() + 1;
        if total >= self.cfg.min_checks && expiring as f64 > limit {
            tracing::warn!(
                expiring,
                total,
                threshold = self.cfg.threshold,
                window = %tessera_core::GoDuration(window),
                "mass-expiry protection: too many TTL checks expiring at once; holding expiry until renewals recover"
            );
            self.since = Some(now);
            self.held.insert(id.to_owned(), before);
            let restore: Restore = self
                .recent
                .drain(..)
                .map(|(_, id, before)| (id, before))
                .collect();
            for (id, before) in &restore {
                self.held.insert(id.clone(), *before);
            }
            return (Verdict::Hold, restore);
        }
        self.recent.push_back((now, id.to_owned(), before));
        (Verdict::Expire, Vec::new())
    }

    /// A check renewed (or went away): it is no longer held, and once few enough are,
    /// protection ends; `total` TTL checks are local.
    pub fn renewed(&mut self, id: &str, total: usize) {
        let was_held = self.held.remove(id).is_some();
        self.recent.retain(|(_, r, _)| r != id);
        if was_held
            && self.since.is_some()
            && self.held.len() as f64 <= self.cfg.threshold * total as f64
        {
            tracing::info!(
                held = self.held.len(),
                "renewals recovered; mass-expiry protection ends and checks still held expire"
            );
            self.since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(MassExpiryConfig::default())
    }

    #[test]
    fn scattered_expiries_go_through() {
        let mut g = guard();
        let t0 = Instant::now();
        // One of 20 every two minutes: never two inside a window.
        for i in 0..10 {
            let now = t0 + Duration::from_secs(120 * i);
            let (v, _) = g.on_expiry(&format!("c{i}"), Health::Passing, 20, now);
            assert_eq!(v, Verdict::Expire);
        }
        assert!(!g.status().active);
    }

    #[test]
    fn a_burst_is_held_restored_and_released_after_renewals() {
        let mut g = guard();
        let t0 = Instant::now();
        let mut verdicts = Vec::new();
        let mut restored = Vec::new();
        for i in 0..20 {
            let (v, r) = g.on_expiry(&format!("c{i}"), Health::Passing, 20, t0);
            verdicts.push(v);
            restored.extend(r);
        }
        // 5 of 20 is the threshold: the sixth starts protection and the five before it
        // are put back.
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Expire).count(),
            5
        );
        assert_eq!(restored.len(), 5);
        assert!(g.status().active);
        assert_eq!(g.status().held, 20);
        // 17 renew; 3 stay silent: at most the threshold, so they expire.
        for i in 0..17 {
            g.renewed(&format!("c{i}"), 20);
        }
        assert!(
            !g.status().active,
            "ends once held checks are under the threshold"
        );
        let t1 = t0 + Duration::from_secs(1);
        for i in 17..20 {
            let (v, _) = g.on_expiry(&format!("c{i}"), Health::Passing, 20, t1);
            assert_eq!(v, Verdict::Expire, "c{i}");
        }
        assert!(!g.status().active);
        assert_eq!(g.status().held, 0);
    }

    #[test]
    fn protection_ends_after_max_hold() {
        let mut g = guard();
        let t0 = Instant::now();
        for i in 0..10 {
            g.on_expiry(&format!("c{i}"), Health::Passing, 10, t0);
        }
        assert!(g.status().active);
        let later = t0 + Duration::from_secs(16 * 60);
        for i in 0..10 {
            let (v, _) = g.on_expiry(&format!("c{i}"), Health::Passing, 10, later);
            assert_eq!(v, Verdict::Expire);
        }
        assert!(!g.status().active);
    }

    #[test]
    fn small_registries_and_disabled_guards_expire() {
        let mut g = guard();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(
                g.on_expiry(&format!("c{i}"), Health::Passing, 3, t0).0,
                Verdict::Expire
            );
        }
        let mut g = Guard::new(MassExpiryConfig {
            enabled: false,
            ..MassExpiryConfig::default()
        });
        for i in 0..10 {
            assert_eq!(
                g.on_expiry(&format!("c{i}"), Health::Passing, 10, t0).0,
                Verdict::Expire
            );
        }
    }
}
