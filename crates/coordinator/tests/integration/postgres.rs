//! The same scenarios on PostgreSQL (a fresh database per test on the machine's server):
//! the store's SQL, group commit and recovery queries differ per backend.

use crate::support::Backend;
use crate::{sagas, tcc};

#[tokio::test]
async fn sagas_run_and_compensate_on_postgres() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    sagas::runs_its_steps_once(&backend).await;
    sagas::refused_steps_compensate_in_reverse(|| Backend::postgres().unwrap()).await;
}

#[test]
fn sagas_resume_on_postgres() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    sagas::resumes_after_a_restart(&backend);
}

#[tokio::test]
async fn tcc_commits_and_aborts_on_postgres() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    tcc::commits(&backend).await;
    let Some(backend) = Backend::postgres() else {
        return;
    };
    tcc::refused_try_cancels_everyone(&backend).await;
}

#[test]
fn tcc_recovers_on_postgres() {
    let Some(first) = Backend::postgres() else {
        return;
    };
    let second = Backend::postgres().unwrap();
    tcc::recovers(&first, &second);
}

/// Servers started together on a new database all open it: their schema statements
/// take turns (concurrent CREATE TABLE IF NOT EXISTS fails one of them in PostgreSQL's
/// catalog otherwise; `bench/coordinator.sh` hit it with two servers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_starting_together_on_a_new_database_all_open_it() {
    let Some(db) = tessera_testkit::PgDatabase::create_or_skip() else {
        return;
    };
    let opens = (0..6).map(|i| {
        let url = db.url.clone();
        tokio::spawn(async move {
            let options = tessera_coordinator::Options {
                owner: format!("server-{i}"),
                ..Default::default()
            };
            tessera_coordinator::Coordinator::open_postgres(&url, None, options)
                .await
                .map(drop)
        })
    });
    for open in opens.collect::<Vec<_>>() {
        open.await.unwrap().unwrap();
    }
}
