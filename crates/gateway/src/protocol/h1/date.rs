//! The `Date` header for answers the gateway makes itself, formatted once per second.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

/// Appends the current time in IMF-fixdate form (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn append(w: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        w.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_imf_fixdate() {
        let mut w = Vec::new();
        super::append(&mut w);
        let text = String::from_utf8(w).unwrap();
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
        assert!(text.ends_with(" GMT"), "{text}");
    }
}
