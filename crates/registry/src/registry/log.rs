//! The embedded store's write path: the head (every write made so far), the pending
//! changes between it and what readers see, and the log writer's reports that move them
//! across (see the module above for why there are two copies).

use super::*;

/// The state kept in the local log: one server, nothing shared.
pub(crate) struct LogStore {
    /// The write side: validated against, ahead of the durable state by the writes
    /// waiting for their fsync.
    head: Mutex<Head>,
    /// Writes made on the head and not yet shown, in index order.
    pending: Mutex<VecDeque<Pending>>,
    /// Highest record index whose log frame is durable.
    durable: AtomicU64,
    pub(super) store: Store,
    /// Why the log broke, once it has.
    pub(super) broken_by: OnceLock<DiskError>,
}

struct Head {
    state: State,
    /// Appends carry it; it moves on when the log loses writes, so writes validated
    /// against lost ones are refused too.
    generation: u64,
    /// Bytes appended to the log since the last snapshot.
    log_bytes: u64,
}

/// A change made on the head, waiting to be shown to readers.
pub(super) enum Pending {
    /// A logged write: shown once its frame is durable.
    Record(Record),
    /// A check's status or output, which is not logged: shown as soon as every record
    /// before it is. `index` is `None` when only the output changed.
    Status {
        id: String,
        status: Health,
        output: String,
        index: Option<u64>,
    },
}

/// The log writer's reports, turned into visibility.
pub(super) struct Shown(pub(super) Weak<Registry>);

impl Applier for Shown {
    fn durable(&self, index: u64) {
        if let Some(reg) = self.0.upgrade()
            && let Backing::Log(log) = &reg.backing
        {
            log.durable.fetch_max(index, Ordering::AcqRel);
            log.drain(&reg);
        }
    }

    fn lost(&self, durable: u64) -> u64 {
        match self.0.upgrade() {
            Some(reg) => match &reg.backing {
                Backing::Log(log) => log.lost(&reg, durable),
                Backing::Etcd(_) => 0,
            },
            None => 0,
        }
    }

    fn broken(&self, error: &DiskError) {
        if let Some(reg) = self.0.upgrade() {
            if let Backing::Log(log) = &reg.backing {
                let _ = log.broken_by.set(error.clone());
            }
            reg.broken.cancel();
        }
    }
}

impl Backend for LogStore {
    /// Validated against the head, applied there and queued to the log under the head's
    /// lock; answered once durable and shown. Every write is the server's own to make.
    async fn commit<R>(
        &self,
        reg: &Registry,
        _authority: Authority,
        mut f: impl FnMut(&State, u64) -> Result<(Vec<Op>, R), Error>,
    ) -> Result<R, Error> {
        let (ack, out) = {
            let mut head = self.head();
            let index = head.state.index + 1;
            let (ops, out) = f(&head.state, index)?;
            if ops.is_empty() {
                return Ok(out);
            }
            let record = Record { index, ops };
            let payload = match serde_json::to_vec(&record) {
                Ok(p) => p,
                Err(e) => return Err(Error::bad(format!("cannot encode record: {e}"))),
            };
            head.log_bytes += payload.len() as u64;
            for op in record.ops.iter().cloned() {
                head.state.apply(index, op);
            }
            self.pending().push_back(Pending::Record(record));
            let ack = self.store.append(head.generation, index, payload);
            if head.log_bytes > reg.config.snapshot_after_bytes {
                Self::snapshot_head(&self.store, &mut head);
            }
            (ack, out)
        };
        match ack.await {
            Ok(Ok(())) => Ok(out),
            Ok(Err(e)) => Err(Error::Storage(e)),
            Err(_) => Err(Error::Storage(StoreError::Closed)),
        }
    }

    /// Status is not logged, but shown in index order after the writes before it; the
    /// index moves only when the status does.
    fn set_status(&self, reg: &Registry, key: (String, String), status: Health, output: String) {
        let id = key.1.clone();
        {
            let mut head = self.head();
            let next = head.state.index + 1;
            let Some(check) = head.state.checks.get_mut(&key) else {
                return;
            };
            let index = if check.status == status {
                if check.output == output {
                    return;
                }
                None
            } else {
                check.status = status;
                check.modify_index = next;
                Some(next)
            };
            check.output.clone_from(&output);
            if let Some(index) = index {
                head.state.index = index;
            }
            self.pending().push_back(Pending::Status {
                id,
                status,
                output,
                index,
            });
        }
        self.drain(reg);
    }

    /// Every check of this server's node.
    fn runs_check(&self, reg: &Registry, node: &str, _id: &str, _spec: &CheckSpec) -> bool {
        node == reg.local_node()
    }

    fn is_leader(&self, _reg: &Registry) -> bool {
        true
    }

    fn peers(&self, reg: &Registry) -> Vec<String> {
        vec![format!("{}:8300", reg.config.advertise_addr)]
    }

    /// Shown as soon as set.
    async fn statuses_written(&self) {}
}

impl LogStore {
    pub(super) fn new(store: Store, state: State, log_bytes: u64) -> LogStore {
        LogStore {
            durable: AtomicU64::new(state.index),
            head: Mutex::new(Head {
                state,
                generation: 0,
                log_bytes,
            }),
            pending: Mutex::new(VecDeque::new()),
            store,
            broken_by: OnceLock::new(),
        }
    }

    /// Starts the head (and the durable index) at `state`: the recovered state, as the
    /// registry adjusted it before serving.
    pub(super) fn reset_head(&self, state: State) {
        self.durable.store(state.index, Ordering::Release);
        self.head().state = state;
    }

    fn head(&self) -> MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(|_| poisoned())
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot_head(store: &Store, head: &mut Head) {
        let rec = Record {
            index: head.state.index,
            ops: head.state.snapshot_ops(),
        };
        match serde_json::to_vec(&rec) {
            Ok(bytes) => {
                store.snapshot(head.generation, bytes);
                head.log_bytes = 0;
            }
            Err(e) => tracing::error!(error = %e, "cannot encode snapshot"),
        }
    }

    /// Shows readers every pending change whose turn has come: records up to the durable
    /// index and the status changes after them.
    fn drain(&self, reg: &Registry) {
        let durable = self.durable.load(Ordering::Acquire);
        let ready = |p: &Pending| match p {
            Pending::Record(r) => r.index <= durable,
            Pending::Status { .. } => true,
        };
        let mut pending = self.pending();
        if !pending.front().is_some_and(ready) {
            return;
        }
        let mut st = reg.lock();
        while let Some(p) = pending.pop_front() {
            if !ready(&p) {
                pending.push_front(p);
                break;
            }
            reg.show(&mut st, p);
        }
    }

    /// The log lost every record after `durable`: the durable ones are shown, the lost
    /// ones dropped, and the head rebuilt from what readers see. Returns the generation
    /// that appends carry from now on.
    fn lost(&self, reg: &Registry, durable: u64) -> u64 {
        let mut head = self.head();
        let mut pending = self.pending();
        let mut st = reg.lock();
        let mut dropped = 0;
        for p in pending.drain(..) {
            match p {
                Pending::Record(r) if r.index > durable => dropped += 1,
                p => reg.show(&mut st, p),
            }
        }
        head.state = st.clone();
        head.generation += 1;
        tracing::warn!(
            dropped,
            index = st.index,
            "writes not kept by the log were dropped; the registry is as of its last durable write"
        );
        head.generation
    }
}
