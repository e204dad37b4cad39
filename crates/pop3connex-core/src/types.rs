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
        let lower = normalise_user_name(s);
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

/// The one normalisation of account names: ASCII lower case. Every layer
/// and every store backend compares names in this form (a lockout of
/// `Alice` is a lockout of `alice`), so none applies its own.
pub fn normalise_user_name(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// Defines an id newtype over a backend row id: ids of different kinds
/// cannot be mixed up, and only the store makes them.
macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(i64);

        impl $name {
            /// Wraps a row id read from (or about to be written to) a store.
            pub const fn from_raw(id: i64) -> Self {
                Self(id)
            }

            /// The backend row id, for queries.
            pub const fn raw(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

row_id!(
    /// A mailbox (one per user) in a store.
    MailboxId
);
row_id!(
    /// A stored message, unique across mailboxes.
    MessageId
);

/// A Unix time as RFC 3339 UTC (`2026-11-29T12:00:00Z`) for people.
pub fn format_unix(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

/// Seconds since the Unix epoch.
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

    #[test]
    fn one_normalisation_for_names() {
        assert_eq!(normalise_user_name("ALICE@Example.org"), "alice@example.org");
        assert_eq!(UserName::parse("ALICE").unwrap().as_str(), normalise_user_name("ALICE"));
    }

    #[test]
    fn ids_print_like_numbers() {
        assert_eq!(format!("{:>4}", MessageId::from_raw(7)), "   7");
        assert_eq!(MailboxId::from_raw(3).raw(), 3);
    }
}
