//! The HTTP/1.1 fast path: our own codec for the common proxy exchange on both sides,
//! with hyper kept for everything else (HTTP/2, upgrades on the client side, unusual or
//! malformed requests). See `server` and `client` for where the line is drawn.

pub mod client;
pub mod date;
pub mod fields;
pub mod server;
pub use server::{MAX_HEAD, MAX_HEADERS};

/// Where the line whose content ends at `i` in `head` ends, if it ends in CRLF (blanks
/// may come before it): just past the LF. Parsers disagree on bare LF, so the gateway
/// checks line ends itself wherever it trusts or copies a head's lines.
pub(crate) fn crlf_after(head: &[u8], mut i: usize) -> Option<usize> {
    while head.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
        i += 1;
    }
    (head.get(i..i + 2) == Some(b"\r\n")).then_some(i + 2)
}
