//! Upstream connections, pooled per endpoint. The endpoint's own idle list replaces a
//! shared pool map: no per-request hashing of (scheme, authority) keys, no pool-wide lock.
//! An HTTP/1.1 connection goes back to its endpoint when the response body has been read
//! to the end; an h2c connection is shared by concurrent requests while it stays open.
//! Each worker thread has its own slot in every endpoint's pool: a connection is opened,
//! used and pooled by one thread's event loop, and a request never waits on another's.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::floor::config::Protocol;
use crate::protocol::h1::body::Body;
use crate::protocol::h1::client::H1Conn;
use crate::protocol::transport::{ConnectError, Connector};

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 256;

thread_local! {
    /// This thread's worker number (0 outside the gateway's worker threads): which slot
    /// of each pool it uses.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Slots each new pool gets: the most workers any gateway in this process runs.
static SLOTS: AtomicUsize = AtomicUsize::new(1);

/// Makes every pool created from now on hold a slot for each of `workers` threads.
pub fn reserve_workers(workers: usize) {
    SLOTS.fetch_max(workers, Ordering::Relaxed);
}

/// Marks the calling thread as worker `i`.
pub fn enter_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The calling thread's worker number.
pub fn worker() -> usize {
    WORKER.with(Cell::get)
}

pub struct Conns {
    slots: Box<[Slot]>,
}

/// One worker's connections to the endpoint; aligned so two workers' slots never share
/// a cache line.
#[derive(Default)]
#[repr(align(128))]
struct Slot {
    /// Idle HTTP/1.1 connections and when each went idle (most recent last).
    idle: Mutex<Vec<(H1Conn, Instant)>>,
    /// The shared HTTP/2 connections, each with the connector (`Connector::id`) that
    /// opened it, and which the next request takes.
    h2: Mutex<H2Conns>,
}

/// HTTP/2 connections to one endpoint, shared by concurrent requests in turn. More than
/// one: an upstream serves each connection's frames on one task (hyper, tonic, grpc-go
/// alike), so streams spread over a few connections use more of its cores.
#[derive(Default)]
struct H2Conns {
    open: [Option<(u64, http2::SendRequest<Body>)>; H2_CONNS],
    next: usize,
}

/// HTTP/2 connections per endpoint and worker.
const H2_CONNS: usize = 4;

impl Default for Conns {
    fn default() -> Conns {
        let slots = SLOTS.load(Ordering::Relaxed);
        Conns {
            slots: (0..slots).map(|_| Slot::default()).collect(),
        }
    }
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conns")
    }
}

/// A connection checked out for one request.
pub enum Conn {
    H1(H1Conn),
    H2(http2::SendRequest<Body>),
}

impl Conns {
    fn slot(&self) -> &Slot {
        &self.slots[worker() % self.slots.len()]
    }

    /// An open connection to `addr`: a pooled one `connector` opened when available,
    /// else a new one.
    pub async fn checkout(
        &self,
        addr: &str,
        protocol: Protocol,
        connector: &Connector,
        connect_timeout: Duration,
        idle_timeout: Duration,
        now: Instant,
    ) -> Result<Conn, ConnectError> {
        match protocol {
            Protocol::Http1 => {
                loop {
                    let next = self.slot().idle.lock().ok().and_then(|mut v| {
                        // Connections idle past the timeout are closed (dropped), oldest
                        // first; they sit at the front.
                        let stale =
                            |at: &Instant| now.saturating_duration_since(*at) > idle_timeout;
                        if v.first().is_some_and(|(_, at)| stale(at)) {
                            let stale = v.partition_point(|(_, at)| stale(at));
                            v.drain(..stale);
                        }
                        v.pop()
                    });
                    match next {
                        Some((mut c, _)) => {
                            // Else closed while idle, or opened under other settings.
                            if c.transport == connector.id() && c.io.is_reusable() {
                                return Ok(Conn::H1(c));
                            }
                        }
                        None => break,
                    }
                }
                // Boxed: the connect path is rare, and unboxed it would make every
                // request's future (which is moved around) as large as itself.
                Box::pin(async move {
                    let io = connector.connect(addr, connect_timeout).await?;
                    Ok(Conn::H1(H1Conn::new(io, connector.id())))
                })
                .await
            }
            Protocol::H2c => {
                let (turn, open) = match self.slot().h2.lock() {
                    Ok(mut g) => {
                        let turn = g.next % H2_CONNS;
                        g.next = g.next.wrapping_add(1);
                        (turn, g.open[turn].clone())
                    }
                    Err(_) => (0, None),
                };
                if let Some((id, s)) = open
                    && id == connector.id()
                    && !s.is_closed()
                {
                    return Ok(Conn::H2(s));
                }
                let (sender, conn) = Box::pin(async move {
                    let io = connector.connect(addr, connect_timeout).await?;
                    http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Some(Duration::from_secs(30)))
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|e| ConnectError(format!("HTTP/2 handshake: {e}")))
                })
                .await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                if let Ok(mut g) = self.slot().h2.lock() {
                    g.open[turn] = Some((connector.id(), sender.clone()));
                }
                Ok(Conn::H2(sender))
            }
        }
    }

    /// Returns an HTTP/1.1 connection whose exchange is complete. `since` is when that
    /// exchange started: idle time counts from there, erring on the side of closing
    /// before the upstream's own keep-alive timeout does.
    pub fn checkin(&self, conn: H1Conn, since: Instant) {
        if let Ok(mut idle) = self.slot().idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push((conn, since));
        }
    }
}
