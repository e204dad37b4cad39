//! Newtypes for values that cross layers ("parse, don't validate").

use std::fmt;

/// A validated, normalised (lower-case) account name such as `alice` or
/// `alice@example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserName(String);

/// Longest accepted account name (an e-mail address fits).
pub const MAX_USER_NAME_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid user name: use 1-255 characters from a-z 0-9 . _ - + @, starting with a letter or digit")]
pub struct InvalidUserName;

impl UserName {
    pub fn parse(s: &str) -> Result<Self, InvalidUserName> {
        let lower = s.to_ascii_lowercase();
        let ok = !lower.is_empty()
            && lower.len() <= MAX_USER_NAME_LEN
            && lower.starts_with(|c: char| c.is_ascii_alphanumeric())
            && lower.chars().all(|c| c.is_ascii_alphanumeric() || "._-+@".contains(c));
        if ok {
            Ok(UserName(lower))
        } else {
            Err(InvalidUserName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so width and alignment (`{:<20}`) apply like for `str`.
        f.pad(&self.0)
    }
}

/// Seconds since the Unix epoch.
/// A Unix time as RFC 3339 UTC (`2026-11-29T12:00:00Z`) for people.
pub fn format_unix(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        assert_eq!(UserName::parse("Alice@Example.ORG").unwrap().as_str(), "alice@example.org");
        for bad in ["", ".alice", "al ice", "al\u{e9}", "a/b", "a\0", &"a".repeat(256)] {
            assert!(UserName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
