//! The durable log under the registry: every acknowledged write is in `wal.log` and
//! fsynced first. One writer thread drains whatever writes queued up while the previous
//! fsync ran and commits them with a single fsync (group commit), so throughput grows with
//! concurrency instead of being capped at one write per disk flush.
//!
//! Frames are `[len: u32 LE][crc32: u32 LE][payload]`. On open, a torn or corrupt tail (the
//! write a crash interrupted, never acknowledged) is cut off. Compaction writes the whole
//! state as one snapshot frame, renames it into place, then empties the log; records carry
//! their index, so after a crash between those two steps replay skips what the snapshot
//! already holds.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::oneshot;

const WAL: &str = "wal.log";
const SNAPSHOT: &str = "snapshot.bin";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
/// Largest frame accepted on read; anything bigger is corruption.
const MAX_FRAME: u32 = 256 * 1024 * 1024;
/// Most writes folded into one fsync.
const MAX_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O error in {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("storage is unavailable after an earlier write failure")]
    Failed,
}

enum Msg {
    Append(Vec<u8>, oneshot::Sender<Result<(), StoreError>>),
    Snapshot(Vec<u8>),
}

/// What was on disk at open: the latest snapshot (if any) and the log frames after it.
pub struct Recovered {
    pub snapshot: Option<Vec<u8>>,
    pub records: Vec<Vec<u8>>,
}

/// Handle to the writer thread. Cloning is cheap; dropping the last handle stops the thread
/// once the queue is drained.
#[derive(Clone)]
pub struct Store {
    /// `None` for a memory-only store (tests of time-dependent logic, where a disk wait
    /// would let a paused clock run ahead).
    tx: Option<mpsc::Sender<Msg>>,
    failed: Arc<AtomicBool>,
}

impl Store {
    /// Opens (creating if needed) the log in `dir` and returns what it held.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let snap_path = dir.join(SNAPSHOT);
        let snapshot = match File::open(&snap_path) {
            Ok(f) => {
                let mut frames = read_frames(BufReader::new(f)).map_err(io_err(&snap_path))?;
                if frames.frames.len() != 1 || frames.valid_len != frames.total_len {
                    return Err(StoreError::Io {
                        path: snap_path,
                        source: io::Error::new(io::ErrorKind::InvalidData, "corrupt snapshot"),
                    });
                }
                frames.frames.pop()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&snap_path)(e)),
        };
        let wal_path = dir.join(WAL);
        let mut wal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&wal_path)
            .map_err(io_err(&wal_path))?;
        let frames = read_frames(BufReader::new(&mut wal)).map_err(io_err(&wal_path))?;
        if frames.valid_len < frames.total_len {
            tracing::warn!(
                path = %wal_path.display(),
                kept = frames.valid_len,
                dropped = frames.total_len - frames.valid_len,
                "cutting a torn tail off the log (an unacknowledged write interrupted by a crash)"
            );
            wal.set_len(frames.valid_len).map_err(io_err(&wal_path))?;
            wal.sync_all().map_err(io_err(&wal_path))?;
        }
        wal.seek(SeekFrom::End(0)).map_err(io_err(&wal_path))?;
        sync_dir(dir).map_err(io_err(dir))?;

        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            dir: dir.to_path_buf(),
            wal,
            failed: failed.clone(),
        };
        std::thread::Builder::new()
            .name("tessera-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        Ok((
            Store {
                tx: Some(tx),
                failed,
            },
            Recovered {
                snapshot,
                records: frames.frames,
            },
        ))
    }

    /// A store that keeps nothing: every append is acknowledged at once.
    pub fn memory() -> Store {
        Store {
            tx: None,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn is_memory(&self) -> bool {
        self.tx.is_none()
    }

    /// Queues `payload` for the log. The returned receiver resolves once it is on disk.
    /// Callers enqueue under their state lock, so log order is apply order.
    pub fn append(&self, payload: Vec<u8>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (ack, rx) = oneshot::channel();
        let Some(tx) = &self.tx else {
            let _ = ack.send(Ok(()));
            return rx;
        };
        if self.failed.load(Ordering::Acquire) {
            let _ = ack.send(Err(StoreError::Failed));
            return rx;
        }
        if let Err(mpsc::SendError(Msg::Append(_, ack))) = tx.send(Msg::Append(payload, ack)) {
            let _ = ack.send(Err(StoreError::Failed));
        }
        rx
    }

    /// Queues a snapshot of the full state as of the last appended record; the log is
    /// emptied once the snapshot is durable.
    pub fn snapshot(&self, payload: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Snapshot(payload));
        }
    }
}

struct Writer {
    dir: PathBuf,
    wal: File,
    failed: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut acks = Vec::with_capacity(MAX_BATCH);
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Append(payload, ack) => {
                        frame(&mut buf, &payload);
                        acks.push(ack);
                        if acks.len() < MAX_BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    Msg::Snapshot(payload) => {
                        // Everything queued before the snapshot must hit the log first.
                        self.flush(&mut buf, &mut acks);
                        if let Err(e) = self.write_snapshot(&payload) {
                            tracing::error!(error = %e, "snapshot failed; keeping the full log");
                        }
                        next = rx.try_recv().ok();
                    }
                }
            }
            self.flush(&mut buf, &mut acks);
        }
    }

    fn flush(
        &mut self,
        buf: &mut Vec<u8>,
        acks: &mut Vec<oneshot::Sender<Result<(), StoreError>>>,
    ) {
        if acks.is_empty() {
            return;
        }
        let result = if self.failed.load(Ordering::Acquire) {
            Err(StoreError::Failed)
        } else {
            self.wal
                .write_all(buf)
                .and_then(|()| self.wal.sync_data())
                .map_err(|source| StoreError::Io {
                    path: self.dir.join(WAL),
                    source,
                })
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "log write failed; refusing further writes");
            self.failed.store(true, Ordering::Release);
        }
        buf.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(match &result {
                Ok(()) => Ok(()),
                Err(_) => Err(StoreError::Failed),
            });
        }
    }

    fn write_snapshot(&mut self, payload: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let mut buf = Vec::with_capacity(payload.len() + 8);
        frame(&mut buf, payload);
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(SNAPSHOT))?;
        sync_dir(&self.dir)?;
        self.wal.set_len(0)?;
        self.wal.seek(SeekFrom::Start(0))?;
        self.wal.sync_all()?;
        Ok(())
    }
}

fn frame(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

struct Frames {
    frames: Vec<Vec<u8>>,
    valid_len: u64,
    total_len: u64,
}

fn read_frames(mut r: impl Read) -> io::Result<Frames> {
    let mut all = Vec::new();
    r.read_to_end(&mut all)?;
    let mut frames = Vec::new();
    let mut pos = 0usize;
    while all.len() - pos >= 8 {
        let len = u32::from_le_bytes([all[pos], all[pos + 1], all[pos + 2], all[pos + 3]]);
        let crc = u32::from_le_bytes([all[pos + 4], all[pos + 5], all[pos + 6], all[pos + 7]]);
        if len > MAX_FRAME || all.len() - pos - 8 < len as usize {
            break;
        }
        let payload = &all[pos + 8..pos + 8 + len as usize];
        if crc32fast::hash(payload) != crc {
            break;
        }
        frames.push(payload.to_vec());
        pos += 8 + len as usize;
    }
    Ok(Frames {
        frames,
        valid_len: pos as u64,
        total_len: all.len() as u64,
    })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_survive_reopen_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, rec) = Store::open(dir.path()).unwrap();
            assert!(rec.snapshot.is_none() && rec.records.is_empty());
            let acks: Vec<_> = (0..100)
                .map(|i| store.append(format!("rec{i}").into_bytes()))
                .collect();
            for a in acks {
                a.await.unwrap().unwrap();
            }
        }
        // A crash mid-write leaves half a frame behind.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(WAL))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records.len(), 100);
        assert_eq!(rec.records[99], b"rec99");
        store.append(b"after".to_vec()).await.unwrap().unwrap();
        drop(store);
        let (_store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records.len(), 101);
        assert_eq!(rec.records[100], b"after");
    }

    #[tokio::test]
    async fn snapshot_replaces_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.append(b"a".to_vec()).await.unwrap().unwrap();
            store.snapshot(b"state".to_vec());
            store.append(b"b".to_vec()).await.unwrap().unwrap();
        }
        let (_store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot.as_deref(), Some(&b"state"[..]));
        assert_eq!(rec.records, vec![b"b".to_vec()]);
    }
}
