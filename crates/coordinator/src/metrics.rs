//! The coordinator's part of a server's `/metrics` (see `tessera_metrics` for the
//! scheme): sagas and TCC transactions by state (stuck ones among them), what this
//! server started and finished, each participant's calls and their latency (a saga
//! step, a compensation, a try, confirm or cancel), and the store's writer.

use std::sync::atomic::Ordering::Relaxed;

use tessera_metrics::Kind::{Counter, Gauge, Histogram};
use tessera_metrics::Text;

use crate::engine::Engine;
use crate::saga::SagaStatus;
use crate::store::StoreError;
use crate::tcc::{TccEngine, TccStatus};

pub(crate) async fn render(
    engine: &Engine,
    tcc: &TccEngine,
    out: &mut Text,
) -> Result<(), StoreError> {
    let counts = engine.store.counts().await?;
    let tcc_counts = tcc.store.counts().await?;
    by_status(
        out,
        "tessera_sagas",
        "Sagas stored, by status (stuck: a compensation kept failing; an operator must act).",
        &counts,
        &SagaStatus::ALL.map(SagaStatus::as_str),
    );
    by_status(
        out,
        "tessera_tcc_transactions",
        "TCC transactions stored, by status.",
        &tcc_counts,
        &TccStatus::ALL.map(TccStatus::as_str),
    );
    let s = &engine.stats;
    for (name, help, v) in [
        (
            "tessera_sagas_started_total",
            "Sagas started by this server.",
            &s.started,
        ),
        (
            "tessera_sagas_completed_total",
            "Sagas this server completed.",
            &s.completed,
        ),
        (
            "tessera_sagas_compensated_total",
            "Sagas this server compensated.",
            &s.compensated,
        ),
        (
            "tessera_sagas_stuck_total",
            "Sagas this server left stuck.",
            &s.stuck,
        ),
        (
            "tessera_coordinator_claimed_total",
            "Sagas and TCC transactions this server took over after their owner's lease ran out.",
            &engine.lease.claimed,
        ),
        (
            "tessera_coordinator_fenced_total",
            "Transitions this server was refused because another server had taken the saga or TCC transaction over.",
            &engine.lease.fenced,
        ),
    ] {
        out.single(name, Counter, help, v.load(Relaxed));
    }
    let calls = &engine.caller.stats;
    out.family(
        "tessera_coordinator_calls_total",
        Counter,
        "Participant calls (saga steps and compensations, TCC tries, confirms and cancels), by participant service (url: called by URL) and result: ok, refused (a 4xx: not done), failed (not applied, timeout, reset, 5xx), rejected (its breaker was open).",
    );
    calls.each(|l, c| {
        for (result, n) in [
            ("ok", &c.ok),
            ("refused", &c.refused),
            ("failed", &c.failed),
            ("rejected", &c.rejected),
        ] {
            let mut labels = l.to_vec();
            labels.push(("result", result));
            out.sample("tessera_coordinator_calls_total", &labels, n.load(Relaxed));
        }
    });
    out.family(
        "tessera_coordinator_call_duration_seconds",
        Histogram,
        "Participant calls' latency (a saga step's, a compensation's), by participant service.",
    );
    calls.each(|l, c| out.histogram("tessera_coordinator_call_duration_seconds", l, &c.duration));
    let w = engine.store.writer_stats();
    out.single(
        "tessera_coordinator_store_commits_total",
        Counter,
        "Transactions the store's writer committed (or tried to); each groups the writes queued meanwhile.",
        w.commits.load(Relaxed),
    );
    out.single(
        "tessera_coordinator_store_writes_total",
        Counter,
        "Writes (inserts and transitions) the store's writer committed (or tried to).",
        w.writes.load(Relaxed),
    );
    out.family(
        "tessera_coordinator_store_commit_duration_seconds",
        Histogram,
        "Time each of the store writer's transactions took.",
    );
    out.histogram(
        "tessera_coordinator_store_commit_duration_seconds",
        &[],
        &w.commit,
    );
    Ok(())
}

/// One gauge per status, from a store's counts.
fn by_status(out: &mut Text, name: &str, help: &str, counts: &[(String, i64)], statuses: &[&str]) {
    out.family(name, Gauge, help);
    for status in statuses {
        let n = counts
            .iter()
            .find(|(k, _)| k == status)
            .map_or(0, |(_, n)| *n);
        out.sample(name, &[("status", status)], n);
    }
}
