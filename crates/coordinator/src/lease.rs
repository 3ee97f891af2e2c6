//! This server's hold on the sagas and TCC transactions it runs. The database has the
//! truth (each record's owner, lease and fence); this is what the server may assume
//! locally: it acts on a participant only while its last lease renewal is recent
//! enough that the database cannot have let anyone else claim its records.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::store::Owner;

/// A transition was refused or a call not made: the record is no longer this server's.
#[derive(Debug)]
pub(crate) struct Lost;

pub(crate) struct Lease {
    pub owner: Arc<Owner>,
    /// Until when this server's leases surely hold: a renewal's send time plus 4/5 of
    /// the lease (the database starts the lease later than the send, never earlier).
    held_until: Mutex<Instant>,
    /// Transitions refused because another server had claimed the record.
    pub fenced: AtomicU64,
    /// Records this server took over after their lease ran out.
    pub claimed: AtomicU64,
}

impl Lease {
    pub fn new(owner: Owner) -> Lease {
        let held = Instant::now() + owner.lease * 4 / 5;
        Lease {
            owner: Arc::new(owner),
            held_until: Mutex::new(held),
            fenced: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
        }
    }

    /// Whether this server may still call participants for what it owns.
    pub fn held(&self) -> Result<(), Lost> {
        let until = *self.held_until.lock().unwrap_or_else(|p| p.into_inner());
        if Instant::now() < until {
            Ok(())
        } else {
            Err(Lost)
        }
    }

    /// A renewal sent at `sent` succeeded.
    pub fn renewed(&self, sent: Instant) {
        let mut until = self.held_until.lock().unwrap_or_else(|p| p.into_inner());
        *until = (*until).max(sent + self.owner.lease * 4 / 5);
    }

    /// A write under a fence changed nothing: someone claimed the record.
    pub fn fenced_out(&self, what: &str, id: &str) -> Lost {
        self.fenced.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%what, %id, "another server has taken this over (its lease ran out here); stopping");
        Lost
    }
}
