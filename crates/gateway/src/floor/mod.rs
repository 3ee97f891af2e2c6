//! The bottom layer: configuration as data, errors as data, and small helpers every
//! layer above may use. Imports nothing from the gateway's other layers.

pub mod config;
pub(crate) mod error;
pub(crate) mod net;
pub(crate) mod path;

use std::time::SystemTime;

/// A file's modification time and size: what tells the watchers (config, certificates)
/// that it changed.
pub(crate) fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Lower-case hex, for digests shown or used as keys.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
