//! Load balancing over a set of endpoints. The endpoint set comes from discovery (the
//! registry's blocking queries) and changes at any time; the balancer only ever sees an
//! immutable snapshot (`EndpointSet`) plus per-endpoint live statistics (`Load`) shared by
//! every snapshot that contains the endpoint, so in-flight counts and latency survive
//! discovery updates.
//!
//! Policies: `P2cPeakEwma` (default: two random choices, the one with the lower
//! latency × load wins — reacts to a slow endpoint within a few requests), `RoundRobin`
//! (smooth weighted), `Random`, `WeightedRandom`, `LeastRequest` (P2C on in-flight per
//! weight) and `Maglev` (consistent hashing: when an endpoint leaves, only its keys move).
//!
//! ```
//! use std::sync::Arc;
//! use tessera_balance::{Balancer, Endpoint, EndpointSet, Policy};
//! let set = EndpointSet::new(vec![
//!     Endpoint::new("10.0.0.1:80", 1),
//!     Endpoint::new("10.0.0.2:80", 3),
//! ]);
//! let lb = Balancer::new(Policy::RoundRobin);
//! let picks: Vec<usize> = (0..4).map(|_| lb.pick(&set, &|_| true, None).unwrap()).collect();
//! assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 3);
//! ```

mod maglev;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use maglev::Maglev;

/// How long a latency observation keeps its weight in the peak-EWMA.
const DECAY: Duration = Duration::from_secs(10);
/// Assumed latency of an endpoint with no observations yet: optimistic enough that new
/// endpoints get traffic, pessimistic enough not to stampede them.
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;

/// Live statistics of one endpoint, shared across endpoint-set snapshots.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU32,
    /// Peak-EWMA of latency in nanoseconds, as f64 bits.
    ewma: AtomicU64,
    /// When `ewma` was last updated, in nanoseconds since `epoch`.
    stamp: AtomicU64,
    epoch: Instant,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            in_flight: AtomicU32::new(0),
            ewma: AtomicU64::new(DEFAULT_RTT_NANOS.to_bits()),
            stamp: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Load {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ewma_nanos(&self) -> f64 {
        f64::from_bits(self.ewma.load(Ordering::Relaxed))
    }

    /// Marks a request as started; the guard ends it (and records latency via `observe`).
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(Instant::now())
    }

    /// `start` with the caller's reading of the clock.
    pub fn start_at(self: &Arc<Self>, now: Instant) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            started: now,
        }
    }

    /// Folds one latency sample into the peak-EWMA: a slower sample is taken at once (the
    /// peak), a faster one decays in with weight by elapsed time.
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(rtt, Instant::now());
    }

    /// `observe` with the caller's reading of the clock.
    pub fn observe_at(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let last = self.stamp.swap(now, Ordering::Relaxed);
        let prev = self.ewma_nanos();
        let next = if rtt > prev {
            rtt
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Peak-EWMA cost: expected latency × (outstanding + 1).
    fn cost(&self) -> f64 {
        self.ewma_nanos() * f64::from(self.in_flight() + 1)
    }
}

/// Ends an in-flight request when dropped; `finish` also records its latency.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<Load>,
    started: Instant,
}

impl InFlight {
    pub fn finish(self) {
        self.finish_at(Instant::now());
    }

    /// `finish` with the caller's reading of the clock.
    pub fn finish_at(self, now: Instant) {
        self.load
            .observe_at(now.saturating_duration_since(self.started), now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint: its address (`host:port`), weight and live load.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: String,
    pub weight: u32,
    pub load: Arc<Load>,
}

impl Endpoint {
    pub fn new(addr: impl Into<String>, weight: u32) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            weight: weight.max(1),
            load: Arc::default(),
        }
    }
}

/// An immutable snapshot of endpoints, with what each policy precomputes.
#[derive(Debug)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    uniform: bool,
    maglev: Maglev,
    /// Smooth weighted round-robin state (current weights), per snapshot.
    swrr: Mutex<Vec<i64>>,
    rr: AtomicU64,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Endpoint>) -> EndpointSet {
        let uniform = endpoints.windows(2).all(|w| w[0].weight == w[1].weight);
        let maglev = Maglev::new(endpoints.iter().map(|e| e.addr.as_str()));
        let n = endpoints.len();
        EndpointSet {
            endpoints,
            uniform,
            maglev,
            swrr: Mutex::new(vec![0; n]),
            rr: AtomicU64::new(fastrand::u64(..)),
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Carries live load over from `old` for endpoints present in both, so a discovery
    /// update does not reset in-flight counts or latency.
    pub fn inherit(mut endpoints: Vec<Endpoint>, old: &EndpointSet) -> EndpointSet {
        for e in &mut endpoints {
            if let Some(prev) = old.endpoints.iter().find(|p| p.addr == e.addr) {
                e.load = prev.load.clone();
            }
        }
        EndpointSet::new(endpoints)
    }
}

/// Which endpoint a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    P2cPeakEwma,
    RoundRobin,
    Random,
    WeightedRandom,
    LeastRequest,
    Maglev,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Balancer {
    pub policy: Policy,
}

impl Balancer {
    pub fn new(policy: Policy) -> Balancer {
        Balancer { policy }
    }

    /// Picks an endpoint index among those `usable` accepts. `hash` is the request's key
    /// for `Maglev` (other policies ignore it; `Maglev` without a key picks at random).
    pub fn pick(
        &self,
        set: &EndpointSet,
        usable: &dyn Fn(usize) -> bool,
        hash: Option<u64>,
    ) -> Option<usize> {
        let n = set.len();
        if n == 0 {
            return None;
        }
        match self.policy {
            Policy::RoundRobin => round_robin(set, usable),
            Policy::Random => random(n, usable),
            Policy::WeightedRandom => weighted_random(set, usable),
            Policy::P2cPeakEwma => p2c(set, usable, |e| e.load.cost() / f64::from(e.weight)),
            Policy::LeastRequest => p2c(set, usable, |e| {
                f64::from(e.load.in_flight() + 1) / f64::from(e.weight)
            }),
            Policy::Maglev => match hash {
                Some(h) => set.maglev.lookup(h, usable),
                None => random(n, usable),
            },
        }
    }
}

/// The endpoint a try goes to (its index in the set), and how many of the set were
/// ejected when it was picked (an outlier's ejection share counts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub idx: usize,
    pub ejected: usize,
    /// Every endpoint the try could go to had been tried: this one is tried again.
    pub again: bool,
}

impl Balancer {
    /// Picks the endpoint for one try of a request: the one rule the gateway, the SDK's
    /// client and the coordinator share. An ejected endpoint is skipped unless fewer than
    /// `panic_threshold` percent of the set are healthy (then ejection is ignored rather
    /// than the rest overloaded); a tried one is skipped while an untried one is left.
    /// Tried endpoints are named by address, not index: discovery may swap the set
    /// between tries.
    pub fn pick_try(
        &self,
        set: &EndpointSet,
        is_ejected: impl Fn(usize) -> bool,
        tried: &[String],
        panic_threshold: u32,
        hash: Option<u64>,
    ) -> Option<Pick> {
        let total = set.len();
        let ejected = (0..total).filter(|&i| is_ejected(i)).count();
        let panic = (total - ejected) * 100 < total * panic_threshold as usize;
        let eligible = |i: usize| ejected == 0 || panic || !is_ejected(i);
        let was_tried = |i: usize| tried.iter().any(|t| *t == set.endpoints[i].addr);
        let fresh_left = tried.is_empty() || (0..total).any(|i| eligible(i) && !was_tried(i));
        let usable = |i: usize| eligible(i) && (!fresh_left || !was_tried(i));
        self.pick(set, &usable, hash).map(|idx| Pick {
            idx,
            ejected,
            again: !fresh_left,
        })
    }
}

fn random(n: usize, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
    let start = fastrand::usize(..n);
    (0..n).map(|i| (start + i) % n).find(|&i| usable(i))
}

fn round_robin(set: &EndpointSet, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
    let n = set.len();
    if set.uniform {
        // Equal weights: a counter is enough, and lock-free.
        let start = set.rr.fetch_add(1, Ordering::Relaxed) as usize;
        return (0..n).map(|i| (start + i) % n).find(|&i| usable(i));
    }
    // Smooth weighted round-robin: each pick adds every weight to its current value, the
    // largest current wins and pays the total back. Interleaves (a a b a) instead of
    // bursting (a a a b).
    let mut cur = set.swrr.lock().unwrap_or_else(|p| p.into_inner());
    let mut best: Option<usize> = None;
    let mut total = 0i64;
    for (i, e) in set.endpoints.iter().enumerate() {
        if !usable(i) {
            continue;
        }
        let w = i64::from(e.weight);
        cur[i] += w;
        total += w;
        if best.is_none_or(|b| cur[i] > cur[b]) {
            best = Some(i);
        }
    }
    if let Some(b) = best {
        cur[b] -= total;
    }
    best
}

fn weighted_random(set: &EndpointSet, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = set
        .endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| usable(*i))
        .map(|(_, e)| u64::from(e.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(..total);
    for (i, e) in set.endpoints.iter().enumerate() {
        if !usable(i) {
            continue;
        }
        let w = u64::from(e.weight);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// Power of two choices: two distinct random usable endpoints, the cheaper one wins.
fn p2c(
    set: &EndpointSet,
    usable: &dyn Fn(usize) -> bool,
    cost: impl Fn(&Endpoint) -> f64,
) -> Option<usize> {
    let n = set.len();
    let a = random(n, usable)?;
    if n == 1 {
        return Some(a);
    }
    // A second, different usable candidate; if none exists, `a` it is.
    let offset = 1 + fastrand::usize(..n - 1);
    let b = (0..n - 1)
        .map(|i| (a + offset + i) % n)
        .find(|&i| i != a && usable(i));
    match b {
        None => Some(a),
        Some(b) => {
            if cost(&set.endpoints[b]) < cost(&set.endpoints[a]) {
                Some(b)
            } else {
                Some(a)
            }
        }
    }
}

/// A 64-bit hash of request bytes (FNV-1a then a mixer), for Maglev keys.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    maglev::mix(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(weights: &[u32]) -> EndpointSet {
        EndpointSet::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| Endpoint::new(format!("10.0.0.{i}:80"), *w))
                .collect(),
        )
    }

    fn counts(lb: Balancer, set: &EndpointSet, n: usize) -> Vec<usize> {
        let mut c = vec![0; set.len()];
        for _ in 0..n {
            c[lb.pick(set, &|_| true, None).unwrap()] += 1;
        }
        c
    }

    fn addr_of(s: &EndpointSet, pick: Option<Pick>) -> &str {
        &s.endpoints[pick.unwrap().idx].addr
    }

    #[test]
    fn a_retry_avoids_the_endpoint_it_tried_even_in_a_new_set() {
        let first = set(&[1, 1, 1]);
        // Discovery answered between the tries: the same endpoints, in a new order.
        let mut reordered = first.endpoints.clone();
        reordered.reverse();
        let second = EndpointSet::inherit(reordered, &first);
        let lb = Balancer::new(Policy::RoundRobin);
        let tried = vec!["10.0.0.0:80".to_string()];
        for _ in 0..6 {
            let pick = lb.pick_try(&second, |_| false, &tried, 0, None);
            assert_ne!(addr_of(&second, pick), "10.0.0.0:80");
            assert!(!pick.unwrap().again);
        }
        // Once every endpoint has been tried, any may be tried again, and says so.
        let all: Vec<String> = first.endpoints.iter().map(|e| e.addr.clone()).collect();
        let pick = lb.pick_try(&second, |_| false, &all, 0, None).unwrap();
        assert!(pick.again);
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_too_few_are_healthy() {
        let s = set(&[1, 1, 1]);
        let lb = Balancer::new(Policy::RoundRobin);
        for _ in 0..6 {
            let pick = lb.pick_try(&s, |i| i == 0, &[], 50, None);
            assert_ne!(pick.unwrap().idx, 0);
            assert_eq!(pick.unwrap().ejected, 1);
        }
        // One healthy of three is under the 50% panic threshold: ejection is ignored.
        let seen: std::collections::BTreeSet<usize> = (0..6)
            .map(|_| lb.pick_try(&s, |i| i < 2, &[], 50, None).unwrap().idx)
            .collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        // Without a panic threshold the healthy one takes everything.
        assert_eq!(lb.pick_try(&s, |i| i < 2, &[], 0, None).unwrap().idx, 2);
        // The healthy one was tried: the retry goes back to it, not to an ejected one.
        let tried = vec!["10.0.0.2:80".to_string()];
        let pick = lb.pick_try(&s, |i| i < 2, &tried, 0, None).unwrap();
        assert_eq!((pick.idx, pick.again), (2, true));
        // Every one ejected, and no panic threshold: nothing to pick.
        assert_eq!(lb.pick_try(&s, |_| true, &[], 0, None), None);
        assert_eq!(lb.pick_try(&set(&[]), |_| false, &[], 50, None), None);
    }

    #[test]
    fn smooth_weighted_round_robin_is_exact_and_interleaved() {
        let s = set(&[5, 1, 1]);
        let lb = Balancer::new(Policy::RoundRobin);
        let seq: Vec<usize> = (0..7)
            .map(|_| lb.pick(&s, &|_| true, None).unwrap())
            .collect();
        assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 5);
        // Never three of the heavy one without a light one in between at the start.
        assert_ne!(&seq[..3], &[0, 0, 0]);
        assert_eq!(counts(lb, &s, 700), vec![500, 100, 100]);
        let uniform = set(&[1, 1, 1]);
        assert_eq!(counts(lb, &uniform, 300), vec![100, 100, 100]);
    }

    #[test]
    fn weighted_random_follows_weights() {
        let s = set(&[1, 3]);
        let c = counts(Balancer::new(Policy::WeightedRandom), &s, 40_000);
        let share = c[1] as f64 / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{c:?}");
        let c = counts(Balancer::new(Policy::Random), &s, 40_000);
        let share = c[1] as f64 / 40_000.0;
        assert!((0.47..0.53).contains(&share), "{c:?}");
    }

    #[test]
    fn unusable_endpoints_are_skipped() {
        let s = set(&[1, 1, 1]);
        for policy in [
            Policy::RoundRobin,
            Policy::Random,
            Policy::WeightedRandom,
            Policy::P2cPeakEwma,
            Policy::LeastRequest,
            Policy::Maglev,
        ] {
            let lb = Balancer::new(policy);
            for i in 0..200 {
                let pick = lb.pick(&s, &|i| i != 1, Some(i)).unwrap();
                assert_ne!(pick, 1, "{policy:?}");
            }
            assert_eq!(lb.pick(&s, &|_| false, Some(1)), None, "{policy:?}");
        }
    }

    #[test]
    fn p2c_avoids_slow_and_busy_endpoints() {
        let s = set(&[1, 1, 1]);
        s.endpoints[0].load.observe(Duration::from_millis(200));
        s.endpoints[1].load.observe(Duration::from_millis(1));
        s.endpoints[2].load.observe(Duration::from_millis(1));
        let c = counts(Balancer::new(Policy::P2cPeakEwma), &s, 3000);
        assert!(c[0] < 100, "the slow endpoint is avoided: {c:?}");

        let s = set(&[1, 1]);
        let _busy: Vec<InFlight> = (0..10).map(|_| s.endpoints[0].load.start()).collect();
        let c = counts(Balancer::new(Policy::LeastRequest), &s, 1000);
        assert_eq!(
            c[0], 0,
            "with two endpoints P2C always compares both: {c:?}"
        );
    }

    #[test]
    fn peak_ewma_takes_peaks_and_decays() {
        let l = Load::default();
        l.observe(Duration::from_millis(50));
        assert_eq!(l.ewma_nanos(), 50_000_000.0);
        l.observe(Duration::from_millis(1));
        assert!(
            l.ewma_nanos() > 40_000_000.0,
            "a fast sample decays in slowly"
        );
    }

    #[test]
    fn inherit_keeps_load() {
        let old = set(&[1, 1]);
        let _g = old.endpoints[1].load.start();
        let new = EndpointSet::inherit(
            vec![
                Endpoint::new("10.0.0.1:80", 1),
                Endpoint::new("10.0.0.9:80", 1),
            ],
            &old,
        );
        assert_eq!(new.endpoints[0].load.in_flight(), 1);
        assert_eq!(new.endpoints[1].load.in_flight(), 0);
    }
}
