//! Many small socket sends in one system call.
//!
//! A proxy that writes a turn's requests with one `send(2)` each lets every woken
//! upstream run between two of its writes when both share a CPU: the wake-up preempts the
//! writer as the system call returns, the upstream handles its one request and sleeps,
//! and the next write wakes it again (`bench/README.md`, session 8). Submitted together
//! through io_uring, the sends all happen inside one system call; each upstream is woken
//! once and finds all of its requests waiting.
//!
//! Only non-blocking sends are submitted (`MSG_DONTWAIT`): they complete, or fail with
//! `EAGAIN`, inside the submitting call, so [`Ring::send`] returns with every buffer
//! released by the kernel. The caller writes what a send did not take the ordinary way.

use std::io;
use std::os::fd::RawFd;

/// One send: `buf` on socket `fd`; after [`Ring::send`], `result` holds the bytes the
/// kernel took or the error. The buffer is owned so that nothing can free it while the
/// kernel may read it.
#[derive(Debug)]
pub struct Send {
    pub fd: RawFd,
    pub buf: Vec<u8>,
    pub result: Option<io::Result<usize>>,
}

impl Send {
    pub fn new(fd: RawFd, buf: Vec<u8>) -> Send {
        Send {
            fd,
            buf,
            result: None,
        }
    }
}

#[cfg(target_os = "linux")]
pub use linux::Ring;

#[cfg(not(target_os = "linux"))]
pub use other::Ring;

#[cfg(target_os = "linux")]
mod linux {
    use std::io;

    use io_uring::{IoUring, opcode, types};

    use super::Send;

    /// Submission queue size: a longer batch goes in several system calls.
    const ENTRIES: u32 = 256;

    /// An io_uring used only for batches of sends. Not shared between threads: each
    /// thread that batches makes its own.
    pub struct Ring {
        ring: IoUring,
        /// A failed submission could leave the kernel holding buffers; the ring is not
        /// used after that.
        pub(crate) broken: bool,
    }

    impl std::fmt::Debug for Ring {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Ring")
                .field("broken", &self.broken)
                .finish()
        }
    }

    impl Ring {
        /// Fails where io_uring is not available: kernels before 5.6, a seccomp filter
        /// (Docker's default profile blocks it), `kernel.io_uring_disabled`.
        pub fn new() -> io::Result<Ring> {
            let ring = IoUring::builder()
                .setup_cqsize(2 * ENTRIES)
                .setup_submit_all()
                .build(ENTRIES)
                .or_else(|_| IoUring::builder().setup_cqsize(2 * ENTRIES).build(ENTRIES))?;
            if !ring.params().is_feature_nodrop() {
                // Without NODROP a completion could be lost, and with it the knowledge
                // that the kernel is done with a buffer.
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring without IORING_FEAT_NODROP",
                ));
            }
            Ok(Ring {
                ring,
                broken: false,
            })
        }

        /// Sends each buffer on its socket, in order, `ENTRIES` per system call, and
        /// fills in every `result`. An error return means the ring failed and refuses
        /// further batches. Then a send without a result was not made (the caller may
        /// make it); one the kernel took but never reported on has an error result and
        /// an empty buffer: it may or may not have gone out, and its buffer was leaked
        /// rather than freed while the kernel might still read it.
        pub fn send(&mut self, sends: &mut [Send]) -> io::Result<()> {
            if self.broken {
                return Err(io::Error::other(
                    "io_uring ring unusable after an earlier failure",
                ));
            }
            // A result is filled in once, by the send's completion.
            for s in sends.iter_mut() {
                s.result = None;
            }
            for chunk in sends.chunks_mut(ENTRIES as usize) {
                if let Err(e) = self.send_chunk(chunk) {
                    self.broken = true;
                    return Err(e);
                }
            }
            Ok(())
        }

        fn send_chunk(&mut self, chunk: &mut [Send]) -> io::Result<()> {
            self.push(chunk)?;
            let mut left = chunk.len();
            while left > 0 {
                let failed = match self.ring.submit_and_wait(left) {
                    Ok(_) => None,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) =>
                    {
                        None
                    }
                    Err(e) => Some(e),
                };
                left -= self.reap(chunk);
                if let Some(e) = failed {
                    self.abandon(chunk);
                    return Err(e);
                }
            }
            Ok(())
        }

        /// Queues one entry per send (`user_data` = its index in `chunk`), not yet
        /// submitted. The entries point into `chunk`'s buffers: before that borrow ends
        /// the caller must see every entry the kernel takes completed, or leak its buffer
        /// ([`Ring::abandon`]), and must not enter the ring again while entries it gave
        /// up on are queued (a failed ring is marked broken).
        pub(crate) fn push(&mut self, chunk: &[Send]) -> io::Result<()> {
            let mut sq = self.ring.submission();
            for (i, s) in chunk.iter().enumerate() {
                // Longer buffers are sent in part; the caller writes the rest.
                let len = u32::try_from(s.buf.len()).unwrap_or(u32::MAX);
                let entry = opcode::Send::new(types::Fd(s.fd), s.buf.as_ptr(), len)
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the entry points at `s.buf`, alive and unmoved for as long as
                // the caller keeps its promise above (`send_chunk` waits for every
                // completion, or abandons). The queue has room: it holds ENTRIES, a
                // chunk is at most that, and it is empty here (every earlier chunk was
                // submitted whole, or the ring is broken and not used).
                #[allow(unsafe_code)]
                let pushed = unsafe { sq.push(&entry) };
                if pushed.is_err() {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
            }
            Ok(())
        }

        /// Records the completions waiting in the queue; returns how many.
        fn reap(&mut self, chunk: &mut [Send]) -> usize {
            let mut n = 0;
            for cqe in self.ring.completion() {
                let Some(s) = chunk.get_mut(cqe.user_data() as usize) else {
                    continue;
                };
                if s.result.is_some() {
                    continue;
                }
                let r = cqe.result();
                s.result = Some(if r >= 0 {
                    Ok(r as usize)
                } else {
                    Err(io::Error::from_raw_os_error(-r))
                });
                n += 1;
            }
            n
        }

        /// After a failed submission, sends without a completion may be in the kernel's
        /// hands, or still in the submission queue where the kernel will never look
        /// (the ring is not entered again). Which, the queue's head says.
        pub(crate) fn abandon(&mut self, chunk: &mut [Send]) {
            let unsubmitted = self.ring.submission().len();
            let taken = chunk.len().saturating_sub(unsubmitted);
            for s in chunk[..taken].iter_mut().filter(|s| s.result.is_none()) {
                std::mem::forget(std::mem::take(&mut s.buf));
                s.result = Some(Err(io::Error::other(
                    "io_uring failed before reporting this send; it may have gone out",
                )));
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use std::io;

    use super::Send;

    /// io_uring is Linux's; elsewhere there is no ring and callers send one by one.
    #[derive(Debug)]
    pub struct Ring(());

    impl Ring {
        pub fn new() -> io::Result<Ring> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring is only on Linux",
            ))
        }

        pub fn send(&mut self, _: &mut [Send]) -> io::Result<()> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring is only on Linux",
            ))
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{ErrorKind, Read};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// A connected pair on loopback: (ours, the peer's).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (peer, _) = l.accept().expect("accept");
        (ours, peer)
    }

    fn ring() -> Ring {
        Ring::new().expect("io_uring on the test machine (kernel.io_uring_disabled = 0)")
    }

    /// Runs `f` on its own thread: a send that blocked would hang the test instead of
    /// failing it.
    fn within_a_minute<T: std::marker::Send + 'static>(
        f: impl FnOnce() -> T + std::marker::Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the sends return without blocking")
    }

    fn read_exactly(peer: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        peer.read_exact(&mut got).expect("read");
        got
    }

    #[test]
    fn one_batch_reaches_every_socket_in_order() {
        let mut ring = ring();
        let pairs: Vec<_> = (0..3).map(|_| pair()).collect();
        // Two sends on the first socket: they must arrive in submission order.
        let mut sends = vec![
            Send::new(pairs[0].0.as_raw_fd(), b"first ".to_vec()),
            Send::new(pairs[1].0.as_raw_fd(), b"to one".to_vec()),
            Send::new(pairs[0].0.as_raw_fd(), b"second".to_vec()),
            Send::new(pairs[2].0.as_raw_fd(), b"to two".to_vec()),
        ];
        ring.send(&mut sends).expect("batch");
        for s in &sends {
            assert_eq!(
                *s.result.as_ref().expect("a result").as_ref().expect("sent"),
                6
            );
        }
        let mut pairs = pairs;
        assert_eq!(read_exactly(&mut pairs[0].1, 12), b"first second");
        assert_eq!(read_exactly(&mut pairs[1].1, 6), b"to one");
        assert_eq!(read_exactly(&mut pairs[2].1, 6), b"to two");
        // The buffers come back whole, for reuse.
        assert_eq!(sends[2].buf, b"second");
    }

    #[test]
    fn a_batch_longer_than_the_queue_goes_in_several_calls() {
        let mut ring = ring();
        let (ours, mut peer) = pair();
        let mut sends: Vec<_> = (0..700u32)
            .map(|i| Send::new(ours.as_raw_fd(), i.to_be_bytes().to_vec()))
            .collect();
        ring.send(&mut sends).expect("batch");
        assert!(sends.iter().all(|s| matches!(s.result, Some(Ok(4)))));
        let got = read_exactly(&mut peer, 700 * 4);
        let want: Vec<u8> = (0..700u32).flat_map(|i| i.to_be_bytes()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_bad_descriptor_fails_its_send_alone() {
        let mut ring = ring();
        let (ours, mut peer) = pair();
        let mut sends = vec![
            Send::new(-1, b"nowhere".to_vec()),
            Send::new(ours.as_raw_fd(), b"still sent".to_vec()),
        ];
        ring.send(&mut sends).expect("batch");
        let err = sends[0]
            .result
            .take()
            .expect("a result")
            .expect_err("bad fd");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert!(matches!(sends[1].result, Some(Ok(10))));
        assert_eq!(read_exactly(&mut peer, 10), b"still sent");
        // The ring keeps working after a failed send.
        let mut again = vec![Send::new(ours.as_raw_fd(), b"!".to_vec())];
        ring.send(&mut again).expect("batch");
        assert_eq!(read_exactly(&mut peer, 1), b"!");
    }

    /// A socket whose buffers are full takes part of a send, then nothing (`EAGAIN`);
    /// neither blocks the batch.
    #[test]
    fn a_full_socket_takes_part_then_would_block() {
        let (partial, blocked) = within_a_minute(|| {
            let mut ring = ring();
            let (ours, peer) = pair();
            let big = vec![7u8; 64 << 20];
            let mut first = vec![Send::new(ours.as_raw_fd(), big.clone())];
            ring.send(&mut first).expect("batch");
            let mut second = vec![Send::new(ours.as_raw_fd(), big)];
            ring.send(&mut second).expect("batch");
            drop(peer);
            (first.remove(0).result, second.remove(0).result)
        });
        let n = partial.expect("a result").expect("part of it sent");
        assert!(n > 0 && n < 64 << 20, "sent {n}");
        let err = blocked.expect("a result").expect_err("nothing more fits");
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
    }

    /// Entries the kernel never took are the caller's to send: abandoning them leaks
    /// nothing and leaves their results empty; the ring is not used again.
    #[test]
    fn abandoned_unsubmitted_sends_stay_the_callers() {
        let mut ring = ring();
        let (ours, _peer) = pair();
        let mut sends = vec![
            Send::new(ours.as_raw_fd(), b"one".to_vec()),
            Send::new(ours.as_raw_fd(), b"two".to_vec()),
        ];
        ring.push(&sends).expect("queued");
        ring.abandon(&mut sends);
        ring.broken = true;
        assert!(sends.iter().all(|s| s.result.is_none()));
        assert_eq!(sends[1].buf, b"two");
        let err = ring
            .send(&mut sends)
            .expect_err("a broken ring refuses batches");
        assert!(err.to_string().contains("unusable"), "{err}");
    }

    #[test]
    fn a_closed_peer_is_an_error_result() {
        let mut ring = ring();
        let (ours, peer) = pair();
        drop(peer);
        // The first send after the close draws the peer's reset; a later one fails.
        let mut last = None;
        for _ in 0..100 {
            let mut sends = vec![Send::new(ours.as_raw_fd(), b"x".to_vec())];
            ring.send(&mut sends).expect("batch");
            last = sends.remove(0).result;
            if matches!(last, Some(Err(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = last.expect("a result").expect_err("the peer is gone");
        assert!(
            matches!(err.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)),
            "{err}"
        );
    }
}
