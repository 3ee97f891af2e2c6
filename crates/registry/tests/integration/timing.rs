//! Time-dependent registry logic on tokio's paused clock: TTL expiry, the mass-expiry
//! guard, DeregisterCriticalServiceAfter and blocking-query timing. The registry keeps
//! its state in memory here so that no disk wait lets the paused clock run ahead.

use std::sync::Arc;
use std::time::Duration;

use tessera_core::Health;
use tessera_registry::acl::Authz;
use tessera_registry::defs::{ServiceDef, parse_json};
use tessera_registry::{Config, Registry};
use tokio::time::{advance, sleep};

/// A registry on node `n1` that keeps its state in memory (no disk wait lets the paused
/// clock run ahead), with its background tasks running.
pub(crate) async fn registry() -> Arc<Registry> {
    let reg = Registry::in_memory(
        Config {
            node_name: "n1".into(),
            ..Config::default()
        },
        false,
    )
    .unwrap();
    reg.start_background();
    reg.ensure_local_node().await.unwrap();
    reg
}

async fn register(reg: &Registry, json: &str) {
    let def: ServiceDef = parse_json(json.as_bytes()).unwrap();
    reg.register_service(def, false, &Authz::Management)
        .await
        .unwrap();
}

/// Instances `w0`.. of service `web`, each with a 10 s TTL check, passing if `pass`.
async fn ttl_instances(reg: &Registry, n: usize, passing: bool) {
    for i in 0..n {
        register(
            reg,
            &format!(r#"{{"Name":"web","ID":"w{i}","Check":{{"TTL":"10s"}}}}"#),
        )
        .await;
        if passing {
            pass(reg, &format!("service:w{i}"));
        }
    }
}

fn pass(reg: &Registry, id: &str) {
    reg.update_ttl(id, Health::Passing, String::new(), &Authz::Management)
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn ttl_expires_on_time() {
    let reg = registry().await;
    register(&reg, r#"{"Name":"web","ID":"w1","Check":{"TTL":"10s"}}"#).await;
    assert_eq!(reg.check_status("service:w1"), Some(Health::Critical));
    pass(&reg, "service:w1");
    assert_eq!(reg.check_status("service:w1"), Some(Health::Passing));
    sleep(Duration::from_millis(9_900)).await;
    assert_eq!(reg.check_status("service:w1"), Some(Health::Passing));
    // A heartbeat restarts the TTL.
    pass(&reg, "service:w1");
    sleep(Duration::from_millis(9_900)).await;
    assert_eq!(reg.check_status("service:w1"), Some(Health::Passing));
    sleep(Duration::from_millis(200)).await;
    assert_eq!(reg.check_status("service:w1"), Some(Health::Critical));
}

#[tokio::test(start_paused = true)]
async fn stalled_server_does_not_mass_expire() {
    let reg = registry().await;
    ttl_instances(&reg, 200, true).await;
    sleep(Duration::from_secs(5)).await;
    // The process is frozen for a minute (SIGSTOP, VM pause): no task runs meanwhile.
    advance(Duration::from_secs(60)).await;
    sleep(Duration::from_millis(50)).await;
    let expired = (0..200)
        .filter(|i| reg.check_status(&format!("service:w{i}")) == Some(Health::Critical))
        .count();
    assert_eq!(expired, 0, "no TTL expires on wake-up from a stall");
    // Most services heartbeat within the grace TTL, and on; the rest (fewer than the
    // mass-expiry guard's threshold) expire one TTL after the stall.
    for _ in 0..4 {
        for i in 0..180 {
            pass(&reg, &format!("service:w{i}"));
        }
        sleep(Duration::from_secs(3)).await;
    }
    let critical = (180..200)
        .filter(|i| reg.check_status(&format!("service:w{i}")) == Some(Health::Critical))
        .count();
    assert_eq!(
        critical, 20,
        "without heartbeats they expire one TTL after the stall"
    );
}

/// Heartbeats stop reaching the registry from every instance at once (a partition): after
/// the first quarter expire, protection starts, puts them back and holds the rest, so the
/// passing set does not empty. When most heartbeats return, protection ends and the
/// instances that stayed silent expire.
#[tokio::test(start_paused = true)]
async fn a_partition_does_not_empty_the_passing_set() {
    let reg = registry().await;
    let passing = |reg: &Registry| {
        (0..20)
            .filter(|i| reg.check_status(&format!("service:w{i}")) == Some(Health::Passing))
            .count()
    };
    ttl_instances(&reg, 20, true).await;
    // Silence for 30 s: three TTLs.
    for _ in 0..30 {
        sleep(Duration::from_secs(1)).await;
        assert_eq!(
            passing(&reg),
            20,
            "the passing set shrank during the partition"
        );
    }
    let p = reg.mass_expiry_protection();
    assert!(p.active);
    assert_eq!(p.held, 20);
    // Fifteen come back and keep heartbeating; five stay silent.
    for _ in 0..10 {
        for i in 0..15 {
            pass(&reg, &format!("service:w{i}"));
        }
        sleep(Duration::from_secs(3)).await;
    }
    assert!(!reg.mass_expiry_protection().active);
    assert_eq!(passing(&reg), 15);
    for i in 15..20 {
        assert_eq!(
            reg.check_status(&format!("service:w{i}")),
            Some(Health::Critical)
        );
    }
}

/// Instances that die one by one expire on time: no protection.
#[tokio::test(start_paused = true)]
async fn scattered_deaths_expire_on_time() {
    let reg = registry().await;
    ttl_instances(&reg, 20, false).await;
    // w0..w2 die 2 minutes apart (steps are 3 s); the rest keep heartbeating.
    for step in 0..120 {
        for i in 0..20 {
            if i >= 3 || step < 20 + 40 * i {
                pass(&reg, &format!("service:w{i}"));
            }
        }
        sleep(Duration::from_secs(3)).await;
    }
    assert!(!reg.mass_expiry_protection().active);
    for i in 0..3 {
        assert_eq!(
            reg.check_status(&format!("service:w{i}")),
            Some(Health::Critical),
            "w{i}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn grace_after_stall_keeps_heartbeating_instances() {
    let reg = registry().await;
    register(&reg, r#"{"Name":"web","ID":"w1","Check":{"TTL":"10s"}}"#).await;
    pass(&reg, "service:w1");
    advance(Duration::from_secs(30)).await;
    sleep(Duration::from_millis(10)).await;
    assert_eq!(reg.check_status("service:w1"), Some(Health::Passing));
    // The queued heartbeat arrives after the stall.
    pass(&reg, "service:w1");
    sleep(Duration::from_secs(9)).await;
    assert_eq!(reg.check_status("service:w1"), Some(Health::Passing));
    sleep(Duration::from_secs(2)).await;
    assert_eq!(
        reg.check_status("service:w1"),
        Some(Health::Critical),
        "normal expiry resumes"
    );
}

#[tokio::test(start_paused = true)]
async fn deregister_critical_service_after_seconds() {
    let reg = registry().await;
    register(
        &reg,
        r#"{"Name":"web","ID":"w1","Check":{"TTL":"1s","DeregisterCriticalServiceAfter":"3s","Status":"passing"}}"#,
    )
    .await;
    register(&reg, r#"{"Name":"web","ID":"w2","Check":{"TTL":"1s","DeregisterCriticalServiceAfter":"3s","Status":"passing"}}"#).await;
    // w2 keeps heartbeating; w1 stops.
    for _ in 0..8 {
        pass(&reg, "service:w2");
        sleep(Duration::from_millis(500)).await;
    }
    // t = 4 s: w1 went critical at 1 s, so it is deregistered at ~4 s (+ reaper tick).
    sleep(Duration::from_millis(400)).await;
    assert!(!reg.has_service("w1"), "critical for 3 s: deregistered");
    assert!(reg.has_service("w2"));
    assert_eq!(
        reg.check_status("service:w1"),
        None,
        "its checks went with it"
    );

    // Critical for less than the limit: still there.
    register(&reg, r#"{"Name":"web","ID":"w3","Check":{"TTL":"1s","DeregisterCriticalServiceAfter":"3s","Status":"passing"}}"#).await;
    sleep(Duration::from_millis(3_500)).await;
    assert!(reg.has_service("w3"), "critical for 2.5 s only");
    sleep(Duration::from_millis(1_000)).await;
    assert!(!reg.has_service("w3"));
}

#[tokio::test(start_paused = true)]
async fn blocking_query_waits_and_times_out() {
    let reg = registry().await;
    register(&reg, r#"{"Name":"a","ID":"a1"}"#).await;
    register(&reg, r#"{"Name":"b","ID":"b1"}"#).await;
    let idx_b = reg.service_index("b");
    let r2 = reg.clone();
    let watcher = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let idx = r2
            .blocking_service("b", idx_b, Duration::from_secs(30))
            .await;
        (idx, start.elapsed())
    });
    for i in 0..5 {
        register(&reg, &format!(r#"{{"Name":"a","ID":"a{i}x"}}"#)).await;
        sleep(Duration::from_secs(1)).await;
    }
    assert!(
        !watcher.is_finished(),
        "changes to a do not answer a watcher of b"
    );
    register(&reg, r#"{"Name":"b","ID":"b2"}"#).await;
    let (idx, waited) = watcher.await.unwrap();
    assert!(idx > idx_b);
    assert_eq!(
        waited,
        Duration::from_secs(5),
        "answered at the change, not at the timeout"
    );

    // Nothing changes: the wait ends at the timeout with the same index.
    let start = tokio::time::Instant::now();
    let idx2 = reg
        .blocking_service("b", idx, Duration::from_secs(30))
        .await;
    assert_eq!(idx2, idx);
    assert_eq!(start.elapsed(), Duration::from_secs(30));
}
