//! Bounded quoting of client input in error messages.
//!
//! A gRPC status message travels in an HTTP/2 header: clients refuse headers above 8 KiB,
//! and an oversized one between the controller and a denoiser is a protocol error that tears
//! down the shared connection (and every other session's call on it). Every message that
//! quotes a client's string or name quotes it through [`quote`].

/// Characters of client input a message quotes before cutting.
pub const QUOTE_CHARS: usize = 200;
/// Bytes a quote may take once escaped (escapes of odd characters are up to 10 bytes each).
pub const QUOTE_BYTES: usize = 400;

/// `s` as an error message quotes it: whole when short, else its first [`QUOTE_CHARS`]
/// characters (at most [`QUOTE_BYTES`] bytes once escaped) then `... (N bytes)`. Control
/// and other unprintable characters are escaped, so a quote stays on one line.
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        let escaped: String = c.escape_debug().collect();
        if i >= QUOTE_CHARS || out.len() + escaped.len() > QUOTE_BYTES {
            out.push_str(&format!("... ({} bytes)", s.len()));
            return out;
        }
        out.push_str(&escaped);
    }
    out
}

/// A status message cut to at most `max` bytes (on a character boundary), for messages
/// built from parts that may themselves be long (a denoiser's error relayed by the
/// controller, several endpoints' failures).
pub fn bounded(msg: &str, max: usize) -> String {
    if msg.len() <= max {
        return msg.to_string();
    }
    let suffix = format!("... ({} bytes)", msg.len());
    let mut cut = max.saturating_sub(suffix.len());
    while cut > 0 && !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &msg[..cut])
}

/// The most bytes a status message of either service carries.
pub const MAX_STATUS_BYTES: usize = 2048;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole_and_long_input_by_a_prefix() {
        assert_eq!(quote("NoSuchPipeline"), "NoSuchPipeline");
        let long = "x".repeat(1 << 20);
        let q = quote(&long);
        assert!(q.starts_with(&"x".repeat(200)));
        assert!(q.ends_with("... (1048576 bytes)"), "{q}");
        assert!(q.len() < 260);
        assert_eq!(quote("a\nb"), "a\\nb");
        let wide = "é".repeat(300);
        assert!(quote(&wide).ends_with("... (600 bytes)"));
    }

    #[test]
    fn bounded_messages_fit_and_stay_valid_utf8() {
        let m = "é".repeat(5000);
        let b = bounded(&m, MAX_STATUS_BYTES);
        assert!(b.len() <= MAX_STATUS_BYTES, "{}", b.len());
        assert!(b.ends_with("... (10000 bytes)"));
        assert_eq!(bounded("short", 10), "short");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn quotes_and_bounded_messages_stay_short(s in any::<String>(), n in 0usize..5000) {
            let long = s.repeat(n % 50 + 1);
            let q = quote(&long);
            prop_assert!(q.len() <= QUOTE_BYTES + 32, "{}", q.len());
            prop_assert!(!q.contains('\n'));
            let b = bounded(&long, MAX_STATUS_BYTES);
            prop_assert!(b.len() <= MAX_STATUS_BYTES);
        }
    }
}
