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
//!
//! A write the disk refuses (ENOSPC, EIO, a failed fsync) is never half-kept: the writer
//! cuts the log back to the end of the last durable frame, fsyncs that, tells the
//! [`Applier`] so the registry drops every write that was validated against the lost one,
//! and goes on accepting writes, so they resume by themselves once the disk has room.
//! Everything before the cut had been fsynced by an earlier successful call, so the cut is
//! sound. Only if the cut itself fails is soundness unknown: the store is then broken,
//! refuses every write and says so, and the server exits for a supervisor to restart it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use tokio::sync::oneshot;

const WAL: &str = "wal.log";
const SNAPSHOT: &str = "snapshot.bin";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
/// Largest frame accepted on read; anything bigger is corruption.
const MAX_FRAME: u32 = 256 * 1024 * 1024;
/// Most writes folded into one fsync.
const MAX_BATCH: usize = 4096;

/// Why the disk did not keep a write, in a form every waiting writer can be given.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} ({}) writing {}", self.errno_name(), path.display())]
pub struct DiskError {
    pub path: PathBuf,
    pub kind: io::ErrorKind,
    pub errno: Option<i32>,
    pub message: String,
}

impl DiskError {
    fn new(path: PathBuf, e: &io::Error) -> DiskError {
        // The OS's text without Rust's " (os error N)": the errno is named separately.
        let text = e.to_string();
        let message = match text.rfind(" (os error ") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        DiskError {
            path,
            kind: e.kind(),
            errno: e.raw_os_error(),
            message,
        }
    }

    /// The disk or the quota is full: more room fixes it.
    pub fn is_full(&self) -> bool {
        matches!(
            self.kind,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
    }

    /// The errno's symbolic name where it is one a disk gives, else its number.
    pub fn errno_name(&self) -> String {
        match self.errno {
            Some(28) => "ENOSPC".into(),
            Some(122) => "EDQUOT".into(),
            Some(5) => "EIO".into(),
            Some(30) => "EROFS".into(),
            Some(27) => "EFBIG".into(),
            Some(n) => format!("errno {n}"),
            None => format!("{:?}", self.kind),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or reading the data dir failed.
    #[error("storage I/O error in {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// This write, or one it was validated against, was refused by the disk; nothing of
    /// it is visible or kept, and later writes are accepted again.
    #[error("write not kept, the registry is unchanged: {0}")]
    NotKept(DiskError),
    /// The log could not be cut back after a failed write, so what is on disk is unknown;
    /// every write is refused until the process restarts.
    #[error("storage is broken, restart needed: {0}")]
    Broken(DiskError),
    /// The writer has stopped (the server is shutting down).
    #[error("storage is closed")]
    Closed,
}

/// What the store tells its owner, from the writer thread, before any waiter is answered.
/// Calls come in log order.
pub trait Applier: Send + Sync + 'static {
    /// Every record up to and including `index` is durable.
    fn durable(&self, index: u64);
    /// Records after `durable` were not kept. Returns the generation appends must carry
    /// from now on: appends of older generations were validated against lost writes and
    /// are refused.
    fn lost(&self, durable: u64) -> u64;
    /// The store is broken (see [`StoreError::Broken`]).
    fn broken(&self, error: &DiskError);
}

enum Msg {
    Append {
        generation: u64,
        index: u64,
        payload: Vec<u8>,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
    Snapshot {
        generation: u64,
        payload: Vec<u8>,
    },
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
    /// The writer, until `start` gives it its applier and runs it.
    idle: Arc<Mutex<Option<Idle>>>,
    applier: Arc<OnceLock<Arc<dyn Applier>>>,
}

impl Store {
    /// Opens (creating if needed) the log in `dir` and returns what it held. Appends wait
    /// until `start`.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        // A snapshot that failed half-way (a full disk) left its temporary file behind.
        let _ = fs::remove_file(dir.join(SNAPSHOT_TMP));
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
        let writer = Writer {
            dir: dir.to_path_buf(),
            wal,
            wal_len: frames.valid_len,
            durable: 0,
            generation: 0,
            lost_by: None,
            broken: None,
        };
        Ok((
            Store {
                tx: Some(tx),
                idle: Arc::new(Mutex::new(Some((writer, rx)))),
                applier: Arc::new(OnceLock::new()),
            },
            Recovered {
                snapshot,
                records: frames.frames,
            },
        ))
    }

    /// A store that keeps nothing: every append is durable at once.
    pub fn memory() -> Store {
        Store {
            tx: None,
            idle: Arc::new(Mutex::new(None)),
            applier: Arc::new(OnceLock::new()),
        }
    }

    pub fn is_memory(&self) -> bool {
        self.tx.is_none()
    }

    /// Gives the store its applier and starts the writer thread. Call once.
    pub fn start(&self, applier: Arc<dyn Applier>) -> Result<(), StoreError> {
        let _ = self.applier.set(applier.clone());
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((writer, rx)) = idle {
            std::thread::Builder::new()
                .name("tessera-wal".into())
                .spawn(move || writer.run(rx, applier))
                .map_err(|source| StoreError::Io {
                    path: "tessera-wal thread".into(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Queues record `index` of `generation` for the log. The applier hears of it (durable
    /// or lost) before the returned receiver resolves. Callers enqueue under their write
    /// lock, so log order is index order.
    pub fn append(
        &self,
        generation: u64,
        index: u64,
        payload: Vec<u8>,
    ) -> oneshot::Receiver<Result<(), StoreError>> {
        let (ack, rx) = oneshot::channel();
        let Some(tx) = &self.tx else {
            if let Some(applier) = self.applier.get() {
                applier.durable(index);
            }
            let _ = ack.send(Ok(()));
            return rx;
        };
        let msg = Msg::Append {
            generation,
            index,
            payload,
            ack,
        };
        if let Err(mpsc::SendError(Msg::Append { ack, .. })) = tx.send(msg) {
            let _ = ack.send(Err(StoreError::Closed));
        }
        rx
    }

    /// Queues a snapshot of the full state as of the last appended record; the log is
    /// emptied once the snapshot is durable. Skipped if a write before it is lost.
    pub fn snapshot(&self, generation: u64, payload: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Snapshot {
                generation,
                payload,
            });
        }
    }
}

/// A writer opened but not yet running, with its queue.
type Idle = (Writer, mpsc::Receiver<Msg>);

struct Writer {
    dir: PathBuf,
    wal: File,
    /// Bytes of the log known durable: where a failed write is cut back to.
    wal_len: u64,
    /// Highest durable record index.
    durable: u64,
    /// Appends of older generations are refused.
    generation: u64,
    /// Why the last generation ended, told to the appends it refuses.
    lost_by: Option<DiskError>,
    broken: Option<DiskError>,
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>, applier: Arc<dyn Applier>) {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut acks: Vec<(u64, Ack)> = Vec::with_capacity(MAX_BATCH);
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Append {
                        generation,
                        index,
                        payload,
                        ack,
                    } => {
                        if let Some(e) = &self.broken {
                            let _ = ack.send(Err(StoreError::Broken(e.clone())));
                        } else if generation < self.generation {
                            let cause = self.lost_by.clone().unwrap_or_else(|| {
                                DiskError::new(self.dir.join(WAL), &io::Error::other("lost"))
                            });
                            let _ = ack.send(Err(StoreError::NotKept(cause)));
                        } else {
                            frame(&mut buf, &payload);
                            acks.push((index, ack));
                        }
                        if acks.len() < MAX_BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    Msg::Snapshot {
                        generation,
                        payload,
                    } => {
                        // Everything queued before the snapshot must hit the log first.
                        self.flush(&mut buf, &mut acks, &*applier);
                        if generation == self.generation && self.broken.is_none() {
                            self.snapshot(&payload, &*applier);
                        }
                        next = rx.try_recv().ok();
                    }
                }
            }
            self.flush(&mut buf, &mut acks, &*applier);
        }
    }

    fn flush(&mut self, buf: &mut Vec<u8>, acks: &mut Vec<(u64, Ack)>, applier: &dyn Applier) {
        if acks.is_empty() {
            return;
        }
        let written = self.wal.write_all(buf).and_then(|()| self.wal.sync_data());
        let result = match written {
            Ok(()) => {
                self.wal_len += buf.len() as u64;
                self.durable = acks.last().map_or(self.durable, |(i, _)| *i);
                applier.durable(self.durable);
                Ok(())
            }
            Err(e) => Err(self.cut_back(DiskError::new(self.dir.join(WAL), &e), applier)),
        };
        buf.clear();
        for (_, ack) in acks.drain(..) {
            let _ = ack.send(match &result {
                Ok(()) => Ok(()),
                Err(StoreError::NotKept(e)) => Err(StoreError::NotKept(e.clone())),
                Err(StoreError::Broken(e)) => Err(StoreError::Broken(e.clone())),
                Err(_) => Err(StoreError::Closed),
            });
        }
    }

    /// After a failed write: the log back to its last durable frame, and the owner told.
    fn cut_back(&mut self, cause: DiskError, applier: &dyn Applier) -> StoreError {
        let cut = self
            .wal
            .set_len(self.wal_len)
            .and_then(|()| self.wal.sync_all());
        match cut {
            Ok(()) => {
                tracing::warn!(error = %cause, durable = self.durable,
                    "log write failed; cut back to the last durable record, refusing the writes that depended on it");
                self.generation = applier.lost(self.durable);
                self.lost_by = Some(cause.clone());
                StoreError::NotKept(cause)
            }
            Err(e) => {
                let broken = DiskError::new(self.dir.join(WAL), &e);
                tracing::error!(error = %cause, cut_error = %broken,
                    "log write failed and the log could not be cut back; refusing every write until restart");
                applier.broken(&broken);
                self.broken = Some(broken.clone());
                StoreError::Broken(broken)
            }
        }
    }

    fn snapshot(&mut self, payload: &[u8], applier: &dyn Applier) {
        let tmp = self.dir.join(SNAPSHOT_TMP);
        if let Err(e) = write_snapshot(&self.dir, &tmp, payload) {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(error = %e, "snapshot failed; keeping the full log");
            return;
        }
        // The snapshot is durable and replay skips what it holds, so the log may be
        // emptied; if that fails the old frames stay, harmless, and the length is re-read.
        let emptied = self
            .wal
            .set_len(0)
            .and_then(|()| self.wal.sync_all())
            .and_then(|()| self.wal.metadata());
        match emptied {
            Ok(meta) => self.wal_len = meta.len(),
            Err(e) => match self.wal.metadata() {
                Ok(meta) => {
                    tracing::warn!(error = %e, "emptying the log after a snapshot failed");
                    self.wal_len = meta.len();
                }
                Err(e) => {
                    let broken = DiskError::new(self.dir.join(WAL), &e);
                    applier.broken(&broken);
                    self.broken = Some(broken);
                }
            },
        }
    }
}

fn write_snapshot(dir: &Path, tmp: &Path, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(payload.len() + 8);
    frame(&mut buf, payload);
    let mut f = File::create(tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    fs::rename(tmp, dir.join(SNAPSHOT))?;
    sync_dir(dir)
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

    /// Records what the writer told it; each loss starts the next generation.
    #[derive(Default)]
    struct Log {
        events: Mutex<Vec<String>>,
        generation: Mutex<u64>,
    }

    impl Applier for Log {
        fn durable(&self, index: u64) {
            self.events.lock().unwrap().push(format!("durable {index}"));
        }
        fn lost(&self, durable: u64) -> u64 {
            self.events
                .lock()
                .unwrap()
                .push(format!("lost after {durable}"));
            let mut g = self.generation.lock().unwrap();
            *g += 1;
            *g
        }
        fn broken(&self, error: &DiskError) {
            self.events.lock().unwrap().push(format!("broken {error}"));
        }
    }

    fn open(dir: &Path) -> (Store, Recovered, Arc<Log>) {
        let (store, rec) = Store::open(dir).unwrap();
        let log = Arc::new(Log::default());
        store.start(log.clone()).unwrap();
        (store, rec, log)
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, rec, log) = open(dir.path());
            assert!(rec.snapshot.is_none() && rec.records.is_empty());
            let acks: Vec<_> = (1..=100)
                .map(|i| store.append(0, i, format!("rec{i}").into_bytes()))
                .collect();
            for a in acks {
                a.await.unwrap().unwrap();
            }
            assert_eq!(log.events.lock().unwrap().last().unwrap(), "durable 100");
        }
        // A crash mid-write leaves half a frame behind.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(WAL))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (store, rec, _log) = open(dir.path());
        assert_eq!(rec.records.len(), 100);
        assert_eq!(rec.records[99], b"rec100");
        store
            .append(0, 101, b"after".to_vec())
            .await
            .unwrap()
            .unwrap();
        drop(store);
        let (_store, rec, _log) = open(dir.path());
        assert_eq!(rec.records.len(), 101);
        assert_eq!(rec.records[100], b"after");
    }

    #[tokio::test]
    async fn snapshot_replaces_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _, _log) = open(dir.path());
            store.append(0, 1, b"a".to_vec()).await.unwrap().unwrap();
            store.snapshot(0, b"state".to_vec());
            store.append(0, 2, b"b".to_vec()).await.unwrap().unwrap();
        }
        let (_store, rec, _log) = open(dir.path());
        assert_eq!(rec.snapshot.as_deref(), Some(&b"state"[..]));
        assert_eq!(rec.records, vec![b"b".to_vec()]);
    }

    /// On a real full disk: the refused write and the ones queued behind it are not kept,
    /// the log is cut back to what was acknowledged, and writes resume once there is
    /// room, without reopening.
    #[tokio::test]
    async fn a_full_disk_keeps_nothing_and_writes_resume() {
        let Some(disk) = tessera_testkit::Tmpfs::mount_or_skip(1 << 20) else {
            return;
        };
        let dir = disk.path().join("registry");
        let (store, _, log) = open(&dir);
        let value = vec![7u8; 20_000];
        for i in 1..=3 {
            store.append(0, i, value.clone()).await.unwrap().unwrap();
        }
        let kept_len = fs::metadata(dir.join(WAL)).unwrap().len();
        let filler = disk.fill();
        // One batch that fails, and (queued before the owner hears of the loss) a write
        // validated against it, still in the old generation.
        let refused = store.append(0, 4, value.clone());
        let dependent = store.append(0, 5, value.clone());
        let err = refused.await.unwrap().unwrap_err();
        let StoreError::NotKept(cause) = &err else {
            panic!("{err}")
        };
        assert!(cause.is_full(), "{cause:?}");
        assert!(err.to_string().contains("ENOSPC"), "{err}");
        assert!(matches!(
            dependent.await.unwrap(),
            Err(StoreError::NotKept(_))
        ));
        assert_eq!(fs::metadata(dir.join(WAL)).unwrap().len(), kept_len);
        assert!(
            log.events
                .lock()
                .unwrap()
                .contains(&"lost after 3".to_owned())
        );
        // Still full: refused again, in the new generation.
        assert!(matches!(
            store.append(1, 4, value.clone()).await.unwrap(),
            Err(StoreError::NotKept(_))
        ));
        disk.free(&filler);
        store
            .append(2, 4, b"after".to_vec())
            .await
            .unwrap()
            .unwrap();
        drop(store);
        let (_store, rec, _log) = open(&dir);
        assert_eq!(rec.records.len(), 4);
        assert_eq!(rec.records[3], b"after");
    }

    /// A snapshot that does not fit leaves no temporary file and keeps the full log.
    #[tokio::test]
    async fn a_snapshot_on_a_full_disk_keeps_the_log() {
        let Some(disk) = tessera_testkit::Tmpfs::mount_or_skip(1 << 20) else {
            return;
        };
        let dir = disk.path().join("registry");
        let (store, _, _log) = open(&dir);
        store.append(0, 1, b"a".to_vec()).await.unwrap().unwrap();
        let filler = disk.fill();
        store.snapshot(0, vec![1u8; 100_000]);
        // The snapshot is done once a later append (queued behind it) is answered.
        let _ = store.append(0, 2, b"b".to_vec()).await.unwrap();
        assert!(!dir.join(SNAPSHOT_TMP).exists());
        assert!(!dir.join(SNAPSHOT).exists());
        disk.free(&filler);
        drop(store);
        let (_store, rec, _log) = open(&dir);
        assert!(rec.snapshot.is_none());
        assert_eq!(rec.records[0], b"a");
    }
}
