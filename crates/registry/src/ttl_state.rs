//! The last status of each TTL check, kept across restarts as Consul keeps it: a service
//! that heartbeats stays passing through a registry restart until its TTL runs out,
//! instead of turning critical the moment the registry comes back.
//!
//! Heartbeats are too frequent to log and fsync one by one, and none of them changes the
//! catalog, so they live beside the log in `check-state.json`: rewritten (temporary file,
//! fsync, rename) at most once a second while heartbeats arrive, and on shutdown. After a
//! kill -9 a check therefore expires up to a second early, never late. An entry whose
//! TTL has ended is not restored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tessera_core::Health;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const FILE: &str = "check-state.json";
const TMP: &str = "check-state.tmp";
/// Least time between two rewrites of the file.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Mark {
    pub status: Health,
    pub output: String,
    /// When the TTL ends, in milliseconds since the Unix epoch (wall clock, so it means
    /// the same after a restart).
    pub expires_ms: u64,
}

impl Mark {
    /// Time left before the TTL ends, if any.
    pub fn remaining(&self) -> Option<Duration> {
        let left = self.expires_ms.checked_sub(now_ms())?;
        (left > 0).then(|| Duration::from_millis(left))
    }
}

pub(crate) struct TtlState {
    /// `None` for a registry without a data dir.
    dir: Option<PathBuf>,
    marks: Mutex<HashMap<String, Mark>>,
    dirty: Notify,
}

impl TtlState {
    /// Reads what the last run left; a missing or unreadable file restores nothing.
    pub fn load(dir: Option<PathBuf>) -> (TtlState, HashMap<String, Mark>) {
        let mut marks: HashMap<String, Mark> = HashMap::new();
        if let Some(dir) = &dir {
            match std::fs::read(dir.join(FILE)) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(m) => marks = m,
                    Err(e) => tracing::warn!(error = %e, "ignoring an unreadable {FILE}"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(error = %e, "cannot read {FILE}"),
            }
        }
        marks.retain(|_, m| m.remaining().is_some());
        let state = TtlState {
            dir,
            marks: Mutex::new(marks.clone()),
            dirty: Notify::new(),
        };
        (state, marks)
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mark>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A TTL update: `status` holds until `ttl` from now.
    pub fn record(&self, id: &str, status: Health, output: &str, ttl: Duration) {
        if self.dir.is_none() {
            return;
        }
        let expires_ms =
            now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.marks().insert(
            id.to_owned(),
            Mark {
                status,
                output: output.to_owned(),
                expires_ms,
            },
        );
        self.dirty.notify_one();
    }

    /// The check expired or is gone.
    pub fn forget(&self, id: &str) {
        if self.marks().remove(id).is_some() {
            self.dirty.notify_one();
        }
    }

    /// Rewrites the file after each change, at most once per `FLUSH_EVERY`, until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if self.dir.is_none() {
            return;
        }
        loop {
            tokio::select! {
                () = self.dirty.notified() => {}
                () = shutdown.cancelled() => return,
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.flush()).await;
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Writes the file now. A failure (a full disk) is logged; the next change retries.
    pub fn flush(&self) {
        let Some(dir) = &self.dir else { return };
        let bytes = match serde_json::to_vec(&*self.marks()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode {FILE}");
                return;
            }
        };
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let tmp = dir.join(TMP);
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, dir.join(FILE))
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(dir.join(TMP));
            tracing::warn!(error = %e, "cannot save TTL check states; a restart now would restore older ones");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
