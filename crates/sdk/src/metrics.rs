//! The calling side of the one metrics scheme (see `tessera_metrics`): per called
//! service, the calls a [`ServiceClient`](crate::ServiceClient) made as its caller saw
//! them (after retries) and their duration, retries, budget refusals, breaker
//! refusals, ejections, the breaker's state and the endpoints known. The called service
//! is the `upstream` label, as the gateway's upstreams are (`service` is the calling
//! service's own, from Prometheus's discovery).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, Weak};

use tessera_metrics::Kind::{Counter, Gauge};
use tessera_metrics::{Family, Red, Text};

type Counted = fn(&ServiceStats) -> &AtomicU64;

/// The clients of one process (shared by every clone of a [`crate::Registry`]).
pub(crate) struct ClientMetrics(Family<ServiceStats>);

impl Default for ClientMetrics {
    fn default() -> Self {
        ClientMetrics(Family::new(&["upstream"]))
    }
}

/// One called service's figures, shared by every client of it.
#[derive(Default)]
pub(crate) struct ServiceStats {
    pub(crate) calls: Red,
    pub(crate) retries: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
    pub(crate) breaker_rejections: AtomicU64,
    pub(crate) ejections: AtomicU64,
    /// The live clients, for their breaker state and endpoints.
    clients: Mutex<Vec<Weak<dyn Live>>>,
}

/// What a live client reports when rendered.
pub(crate) trait Live: Send + Sync {
    fn breaker(&self) -> tessera_resilience::State;
    /// Endpoints known, and how many of them are ejected.
    fn endpoints(&self) -> (usize, usize);
}

impl ServiceStats {
    pub(crate) fn attach(&self, client: Weak<dyn Live>) {
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|w| w.strong_count() > 0);
        c.push(client);
    }

    fn live(&self) -> Vec<std::sync::Arc<dyn Live>> {
        let c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().filter_map(Weak::upgrade).collect()
    }
}

impl ClientMetrics {
    pub(crate) fn service(&self, name: &str) -> std::sync::Arc<ServiceStats> {
        self.0.get(&[name])
    }

    pub(crate) fn render(&self, out: &mut Text) {
        out.family(
            "tessera_client_requests_total",
            Counter,
            "Calls to a service (upstream) as the caller saw them (after retries), by status class (error: no answer).",
        );
        self.0
            .each(|l, s| s.calls.samples(out, "tessera_client_requests_total", l));
        out.family(
            "tessera_client_request_duration_seconds",
            tessera_metrics::Kind::Histogram,
            "Calls to a service: time to answer, retries included.",
        );
        self.0.each(|l, s| {
            out.histogram(
                "tessera_client_request_duration_seconds",
                l,
                &s.calls.duration,
            )
        });
        let counters: [(&str, &str, Counted); 4] = [
            ("tessera_client_retries_total", "Retries made.", |s| {
                &s.retries
            }),
            (
                "tessera_client_retry_budget_exhausted_total",
                "Retries refused by the retry budget.",
                |s| &s.budget_exhausted,
            ),
            (
                "tessera_client_breaker_rejections_total",
                "Calls refused by an open breaker.",
                |s| &s.breaker_rejections,
            ),
            (
                "tessera_client_ejections_total",
                "Instances ejected by outlier detection.",
                |s| &s.ejections,
            ),
        ];
        for (name, help, get) in counters {
            out.family(name, Counter, help);
            self.0.each(|l, s| {
                out.sample(name, l, get(s).load(Relaxed));
            });
        }
        out.family(
            "tessera_client_breaker_state",
            Gauge,
            "Breaker state: 0 closed, 1 half-open, 2 open (the worst over this process's clients of the service).",
        );
        self.0.each(|l, s| {
            if let Some(worst) = s.live().iter().map(|c| c.breaker().gauge()).max() {
                out.sample("tessera_client_breaker_state", l, worst);
            }
        });
        out.family(
            "tessera_client_endpoints",
            Gauge,
            "Instances known, and how many are ejected.",
        );
        self.0.each(|l, s| {
            if let Some((known, ejected)) = s.live().first().map(|c| c.endpoints()) {
                let mut k = l.to_vec();
                k.push(("state", "known"));
                out.sample("tessera_client_endpoints", &k, known);
                let mut e = l.to_vec();
                e.push(("state", "ejected"));
                out.sample("tessera_client_endpoints", &e, ejected);
            }
        });
    }
}
