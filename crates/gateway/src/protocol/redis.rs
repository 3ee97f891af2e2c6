//! Just enough of a Redis client for cluster-wide rate limits: one connection, commands
//! pipelined over it (RESP answers in order, so replies are matched to callers FIFO), a
//! deadline per call, and reconnection in the background. While Redis is unreachable,
//! calls fail at once instead of each waiting out its deadline; the rate limiter then
//! falls back to its local state.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A decoded RESP2 value. Null bulk strings and null arrays are `Nil`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
    Nil,
}

struct Call {
    cmd: Vec<u8>,
    reply: oneshot::Sender<Reply>,
}

pub struct Redis {
    calls: mpsc::Sender<Call>,
    /// False after a failed connection, until a new one succeeds.
    up: Arc<AtomicBool>,
    timeout: Duration,
    /// Calls that failed (down, timed out, broken connection).
    pub failures: AtomicU64,
}

impl Redis {
    /// Starts the connection task. It ends when the client is dropped. `on_connect` runs
    /// first on every new connection (AUTH, SCRIPT LOAD): each must not be an error.
    pub fn start(address: String, timeout: Duration, on_connect: Vec<Vec<Vec<u8>>>) -> Redis {
        let (tx, rx) = mpsc::channel(4096);
        let up = Arc::new(AtomicBool::new(true));
        tokio::spawn(run(address, rx, up.clone(), on_connect));
        Redis {
            calls: tx,
            up,
            timeout,
            failures: AtomicU64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Sends one command and waits for its reply, at most the configured deadline.
    pub async fn call(&self, args: &[&[u8]]) -> Result<Reply, &'static str> {
        let result = self.call_inner(args).await;
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn call_inner(&self, args: &[&[u8]]) -> Result<Reply, &'static str> {
        if !self.is_up() {
            return Err("redis is unreachable");
        }
        let (tx, rx) = oneshot::channel();
        self.calls
            .try_send(Call {
                cmd: encode(args),
                reply: tx,
            })
            .map_err(|_| "redis queue full")?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err("redis connection lost"),
            Err(_) => Err("redis did not answer in time"),
        }
    }
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One reply from the front of `buf` and its length; `Ok(None)` if it is not all there.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
        let end = buf[from..].windows(2).position(|w| w == b"\r\n")?;
        Some((&buf[from..from + end], from + end + 2))
    }
    fn int(b: &[u8]) -> Result<i64, String> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad integer {:?}", String::from_utf8_lossy(b)))
    }
    fn at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Reply, usize)>, String> {
        if depth > 8 {
            return Err("reply nested too deeply".into());
        }
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        let Some((body, next)) = line(buf, pos + 1) else {
            return Ok(None);
        };
        let text = || String::from_utf8_lossy(body).into_owned();
        Ok(Some(match kind {
            b'+' => (Reply::Simple(text()), next),
            b'-' => (Reply::Error(text()), next),
            b':' => (Reply::Int(int(body)?), next),
            b'$' => {
                let n = int(body)?;
                if n < 0 {
                    return Ok(Some((Reply::Nil, next)));
                }
                let end = next + n as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                (Reply::Bulk(buf[next..end].to_vec()), end + 2)
            }
            b'*' => {
                let n = int(body)?;
                if n < 0 {
                    return Ok(Some((Reply::Nil, next)));
                }
                let mut items = Vec::with_capacity(n.min(64) as usize);
                let mut pos = next;
                for _ in 0..n {
                    match at(buf, pos, depth + 1)? {
                        Some((item, after)) => {
                            items.push(item);
                            pos = after;
                        }
                        None => return Ok(None),
                    }
                }
                (Reply::Array(items), pos)
            }
            other => return Err(format!("unexpected reply type byte {other:#04x}")),
        }))
    }
    at(buf, 0, 0)
}

async fn run(
    address: String,
    mut rx: mpsc::Receiver<Call>,
    up: Arc<AtomicBool>,
    on_connect: Vec<Vec<Vec<u8>>>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match connect(&address, &on_connect).await {
            Ok(stream) => {
                up.store(true, Ordering::Relaxed);
                if logged {
                    tracing::info!(address = %address, "redis reachable again; cluster-wide rate limits resume");
                }
                backoff = Duration::from_millis(100);
                match serve(stream, &mut rx).await {
                    Ended::Dropped => return,
                    Ended::Broken(e) => {
                        tracing::warn!(address = %address, error = %e, "redis connection lost; rate limits fall back to local");
                        logged = true;
                    }
                }
            }
            Err(e) => {
                if !logged {
                    tracing::warn!(address = %address, error = %e, "cannot reach redis; rate limits fall back to local");
                    logged = true;
                }
            }
        }
        up.store(false, Ordering::Relaxed);
        // Calls queued for the lost connection fail now (their senders are dropped).
        while rx.try_recv().is_ok() {}
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                call = rx.recv() => match call {
                    Some(_) => continue,
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn connect(address: &str, on_connect: &[Vec<Vec<u8>>]) -> Result<TcpStream, String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(address))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(1024);
    for args in on_connect {
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        stream
            .write_all(&encode(&refs))
            .await
            .map_err(|e| e.to_string())?;
        let reply = loop {
            if let Some((reply, used)) = parse(&buf)? {
                buf.advance(used);
                break reply;
            }
            let read = tokio::time::timeout(Duration::from_secs(1), stream.read_buf(&mut buf))
                .await
                .map_err(|_| "no answer during setup".to_owned())?
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("closed during setup".into());
            }
        };
        if let Reply::Error(e) = reply {
            // The command name only: AUTH's arguments are secrets.
            let name = String::from_utf8_lossy(args.first().map_or(&[][..], |a| a));
            return Err(format!("{name}: {e}"));
        }
    }
    Ok(stream)
}

enum Ended {
    Dropped,
    Broken(String),
}

async fn serve(stream: TcpStream, rx: &mut mpsc::Receiver<Call>) -> Ended {
    let (mut read, mut write) = stream.into_split();
    let mut waiting: VecDeque<oneshot::Sender<Reply>> = VecDeque::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = Vec::with_capacity(16 * 1024);
    loop {
        tokio::select! {
            call = rx.recv() => {
                let Some(call) = call else { return Ended::Dropped };
                out.clear();
                out.extend_from_slice(&call.cmd);
                waiting.push_back(call.reply);
                // Everything queued meanwhile goes in the same write.
                while out.len() < 64 * 1024 {
                    let Ok(call) = rx.try_recv() else { break };
                    out.extend_from_slice(&call.cmd);
                    waiting.push_back(call.reply);
                }
                if let Err(e) = write.write_all(&out).await {
                    return Ended::Broken(e.to_string());
                }
            }
            n = read.read_buf(&mut buf) => {
                match n {
                    Ok(0) => return Ended::Broken("closed by redis".into()),
                    Err(e) => return Ended::Broken(e.to_string()),
                    Ok(_) => {}
                }
                loop {
                    match parse(&buf) {
                        Ok(Some((reply, used))) => {
                            buf.advance(used);
                            match waiting.pop_front() {
                                // The caller may have given up; that is fine.
                                Some(tx) => { let _ = tx.send(reply); }
                                None => return Ended::Broken("a reply nobody asked for".into()),
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Ended::Broken(e),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_whole_or_not_at_all() {
        let wire = b"*3\r\n:1\r\n$3\r\nabc\r\n$-1\r\n+OK\r\n-ERR x\r\n";
        let (r, n) = parse(wire).unwrap().unwrap();
        assert_eq!(
            r,
            Reply::Array(vec![
                Reply::Int(1),
                Reply::Bulk(b"abc".to_vec()),
                Reply::Nil
            ])
        );
        let (r, m) = parse(&wire[n..]).unwrap().unwrap();
        assert_eq!(r, Reply::Simple("OK".into()));
        assert_eq!(
            parse(&wire[n + m..]).unwrap().unwrap().0,
            Reply::Error("ERR x".into())
        );
        for cut in 0..n {
            assert_eq!(parse(&wire[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b":x\r\n").is_err());
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            encode(&[b"GET", b"k\r\n"]),
            b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n".to_vec()
        );
    }
}
