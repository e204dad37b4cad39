//! The one sanitiser for peer-supplied text that goes into errors, events
//! and logs.
//!
//! Upstream POP3 servers, downstream SMTP/LMTP servers and OAuth token
//! endpoints all send text we quote back to operators. None of it may carry
//! a line break (a forged log line), a terminal escape, or unbounded length.
//! [`sanitize`] keeps printable ASCII (0x20 to 0x7E), turns every other octet
//! into `?` and cuts the result at [`MAX_LOG_TEXT`] octets, marking the cut
//! with `...`.
//!
//! It works on octets for `&[u8]` and `&str` alike: a non-ASCII character
//! becomes one `?` per UTF-8 octet. That is the stricter of the two rules
//! the connector used to have (the SMTP client counted characters), so a
//! quoted text is never longer than [`MAX_LOG_TEXT`] + 3 octets whatever it
//! holds.

/// Longest peer text quoted in an error, an event or a log line.
pub const MAX_LOG_TEXT: usize = 200;

/// Printable-ASCII, length-capped form of peer text for errors and logs.
pub fn sanitize<T: AsRef<[u8]> + ?Sized>(text: &T) -> String {
    let text = text.as_ref();
    let mut out: String =
        text.iter().take(MAX_LOG_TEXT).map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '?' }).collect();
    if text.len() > MAX_LOG_TEXT {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_non_ascii_become_question_marks() {
        assert_eq!(sanitize(b"ok\r\n\x00\xff"), "ok????");
        assert_eq!(sanitize("a\u{1b}[31mb"), "a?[31mb");
        assert_eq!(sanitize("caf\u{e9}"), "caf??");
        assert_eq!(sanitize(&String::from("tab\there")), "tab?here");
        assert_eq!(sanitize(""), "");
    }

    #[test]
    fn length_is_capped_in_octets() {
        assert_eq!(sanitize(&[b'a'; 300]).len(), MAX_LOG_TEXT + 3);
        assert!(sanitize(&[b'a'; 300]).ends_with("..."));
        assert_eq!(sanitize(&[b'a'; MAX_LOG_TEXT]).len(), MAX_LOG_TEXT);
        assert_eq!(sanitize(&"\u{e9}".repeat(150)), format!("{}...", "?".repeat(MAX_LOG_TEXT)));
    }
}
