//! The event store's part of a server's `/metrics` (see `tessera_metrics` for the
//! scheme): appends by result and their latency, events appended, live subscribers, the
//! head position, and how far each consumer group is behind.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tessera_metrics::Kind::{Counter, Gauge, Histogram};
use tessera_metrics::Text;

use crate::Backend;
use crate::store::{Selection, StoreError};

/// A group further behind than this shows as this: counting it costs a read per 1000
/// events, and "very far behind" is the answer that matters.
const LAG_CAP: i64 = 10_000;

#[derive(Default)]
pub(crate) struct Metrics {
    appends_ok: AtomicU64,
    /// Refused: a wrong expected version or an event id taken by another event.
    appends_conflict: AtomicU64,
    /// The store did not keep them.
    appends_failed: AtomicU64,
    appended_events: AtomicU64,
    append_duration: tessera_metrics::Histogram,
    subscribers: AtomicI64,
    /// Consumer groups this server has seen (acks, group subscriptions), by (group,
    /// selection as written), with their selection.
    groups: Mutex<BTreeMap<(String, String), Selection>>,
}

/// How an append ended, for [`Metrics::appended`].
pub(crate) enum AppendResult {
    Ok { events: usize },
    Conflict,
    Failed,
}

impl Metrics {
    pub(crate) fn appended(&self, r: AppendResult, took: Duration) {
        match r {
            AppendResult::Ok { events } => {
                self.appends_ok.fetch_add(1, Relaxed);
                self.appended_events.fetch_add(events as u64, Relaxed);
            }
            AppendResult::Conflict => {
                self.appends_conflict.fetch_add(1, Relaxed);
            }
            AppendResult::Failed => {
                self.appends_failed.fetch_add(1, Relaxed);
            }
        }
        self.append_duration.observe(took);
    }

    pub(crate) fn group_seen(&self, group: &str, written: &str, sel: &Selection) {
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        g.entry((group.to_owned(), written.to_owned()))
            .or_insert_with(|| sel.clone());
    }

    /// A live subscription, counted until dropped.
    pub(crate) fn subscribed(self: &std::sync::Arc<Self>) -> Subscribed {
        self.subscribers.fetch_add(1, Relaxed);
        Subscribed(self.clone())
    }

    pub(crate) async fn render(&self, store: &Backend, out: &mut Text) -> Result<(), StoreError> {
        out.by(
            "tessera_events_appends_total",
            Counter,
            "Appends, by result: ok, conflict (wrong expected version or a taken event id), failed (the store did not keep them).",
            "result",
            [
                ("ok", &self.appends_ok),
                ("conflict", &self.appends_conflict),
                ("failed", &self.appends_failed),
            ]
            .map(|(r, n)| (r, n.load(Relaxed))),
        );
        out.single(
            "tessera_events_appended_total",
            Counter,
            "Events appended through this server.",
            self.appended_events.load(Relaxed),
        );
        out.family(
            "tessera_events_append_duration_seconds",
            Histogram,
            "Time an append took to be durable.",
        );
        out.histogram(
            "tessera_events_append_duration_seconds",
            &[],
            &self.append_duration,
        );
        out.single(
            "tessera_events_subscribers",
            Gauge,
            "Live subscriptions on this server.",
            self.subscribers.load(Relaxed),
        );
        out.single(
            "tessera_events_head_position",
            Gauge,
            "The global position of the latest event.",
            *store.head().borrow(),
        );
        let groups: Vec<((String, String), Selection)> = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.family(
            "tessera_events_consumer_group_lag",
            Gauge,
            "Events a consumer group has not acknowledged yet, by group and selection (counted up to 10000).",
        );
        for ((group, written), sel) in groups {
            let from = match store.acked(&group, &written).await? {
                Some(acked) => acked + 1,
                None => sel.first(),
            };
            let lag = lag(store, &sel, from).await?;
            out.sample(
                "tessera_events_consumer_group_lag",
                &[("group", &group), ("selection", &written)],
                lag,
            );
        }
        Ok(())
    }
}

/// Events of `sel` from `from` on, up to [`LAG_CAP`].
async fn lag(store: &Backend, sel: &Selection, mut from: i64) -> Result<i64, StoreError> {
    let mut n = 0;
    while n < LAG_CAP {
        let page = store.read(sel, from, 1000).await?;
        let Some(last) = page.last() else { break };
        n += page.len() as i64;
        from = sel.id_of(last) + 1;
    }
    Ok(n.min(LAG_CAP))
}

/// Counts one live subscription while it lives.
pub(crate) struct Subscribed(std::sync::Arc<Metrics>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Relaxed);
    }
}
