//! The registry's part of a server's `/metrics` (see `tessera_metrics` for the scheme):
//! what is registered and in what health, the blocking queries parked, and the writes
//! with the time each took to become durable and visible.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_core::Health;
use tessera_metrics::Kind::{Counter, Gauge, Histogram};
use tessera_metrics::Text;

use super::Registry;
use crate::error::Error;
use crate::state::State;

/// Writes by outcome, and the durable-write latency of those that reached the store.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    ok: AtomicU64,
    /// Refused before the store: invalid, not found, not allowed, too large.
    refused: AtomicU64,
    /// The store did not keep them (a full disk, etcd away).
    failed: AtomicU64,
    durable: tessera_metrics::Histogram,
}

impl Writes {
    pub(crate) fn record<R>(&self, r: &Result<R, Error>, took: Duration) {
        let counter = match r {
            Ok(_) => &self.ok,
            Err(Error::Storage(_) | Error::Unavailable(_)) => &self.failed,
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.durable.observe(took);
    }
}

const STATUSES: [Health; 3] = [Health::Passing, Health::Warning, Health::Critical];

impl Registry {
    pub fn render_metrics(&self, out: &mut Text) {
        let (instances, checks, names) = self.read(|st: &State| {
            let mut instances = [0u64; 3];
            for (node, id) in st.services.keys() {
                let health = State::aggregate(&st.instance_checks(node, id));
                instances[STATUSES.iter().position(|h| *h == health).unwrap_or(2)] += 1;
            }
            let mut checks = [0u64; 3];
            for c in st.checks.values() {
                checks[STATUSES.iter().position(|h| *h == c.status).unwrap_or(2)] += 1;
            }
            (instances, checks, st.by_name.len())
        });
        let s = self.stats();
        let health = |counts: [u64; 3]| STATUSES.map(Health::as_str).into_iter().zip(counts);
        out.by(
            "tessera_registry_instances",
            Gauge,
            "Service instances registered, by health (the worst of their own and their node's checks).",
            "status",
            health(instances),
        );
        out.by(
            "tessera_registry_checks",
            Gauge,
            "Health checks registered, by status.",
            "status",
            health(checks),
        );
        out.single(
            "tessera_registry_services",
            Gauge,
            "Service names with at least one instance.",
            names,
        );
        out.single(
            "tessera_registry_nodes",
            Gauge,
            "Nodes registered.",
            s.nodes,
        );
        out.single(
            "tessera_registry_kv_entries",
            Gauge,
            "KV entries.",
            s.kv_entries,
        );
        out.single(
            "tessera_registry_index",
            Gauge,
            "The latest write index this server has applied.",
            s.index,
        );
        out.single(
            "tessera_registry_blocking_queries",
            Gauge,
            "Blocking queries parked now.",
            s.blocking_queries,
        );
        let w = &self.writes;
        out.by(
            "tessera_registry_writes_total",
            Counter,
            "Writes asked of this server: ok (durable and visible), refused (invalid or not allowed), failed (the store did not keep them).",
            "result",
            [("ok", &w.ok), ("refused", &w.refused), ("failed", &w.failed)]
                .map(|(r, n)| (r, n.load(Ordering::Relaxed))),
        );
        out.family(
            "tessera_registry_write_duration_seconds",
            Histogram,
            "Time from a write's arrival to its being durable and visible to readers (ok and failed writes).",
        );
        out.histogram("tessera_registry_write_duration_seconds", &[], &w.durable);
        out.single(
            "tessera_registry_refused_total",
            Counter,
            "Requests and connections answered 429 by admission control.",
            s.refused,
        );
        let protection = self.mass_expiry_protection();
        out.single(
            "tessera_registry_mass_expiry_protection",
            Gauge,
            "1 while TTL expiry is held because too many checks expired at once.",
            u8::from(protection.active),
        );
        out.single(
            "tessera_registry_held_checks",
            Gauge,
            "TTL checks whose expiry mass-expiry protection holds.",
            protection.held,
        );
        out.single(
            "tessera_registry_leader",
            Gauge,
            "1 when this server runs the jobs one server runs (TTL expiry, reaps, sessions).",
            u8::from(self.is_leader()),
        );
    }
}
