//! Password policy (seed practice 2), enforced by every path that sets a
//! password: minimum length, a zxcvbn strength estimate, a local list of
//! breached passwords, reuse of recent passwords, and a maximum age checked
//! at login.
//!
//! The breached list is a file of SHA-1 or NTLM hashes in upper- or
//! lower-case hex, one per line, optionally followed by `:count`, sorted by
//! hash — the format breach corpora are distributed in ("ordered by hash").
//! It is searched by binary search on the file, so a list of hundreds of
//! millions of entries costs a few dozen reads and no memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha1::Digest as _;

/// `[auth.password_policy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordPolicy {
    /// Minimum length in characters.
    pub min_length: usize,
    /// Minimum zxcvbn score, 0 (anything) to 4 (strongest).
    pub min_strength: u8,
    /// Sorted SHA-1 or NTLM hash list of breached passwords.
    pub breached_hashes_file: Option<PathBuf>,
    /// How many previous passwords may not be reused.
    pub history: usize,
    /// Days after which a password expires and logins are refused until it
    /// is changed; 0 disables expiry.
    pub max_age_days: u64,
    /// Per account class (`pop3connex user set-class`), overriding
    /// `max_age_days`, e.g. `{ staff = 90, service = 365 }`.
    pub max_age_days_by_class: std::collections::BTreeMap<String, u64>,
}

impl PasswordPolicy {
    /// The maximum password age in days for an account class (0: none).
    pub fn max_age_for(&self, class: Option<&str>) -> u64 {
        class.and_then(|c| self.max_age_days_by_class.get(c)).copied().unwrap_or(self.max_age_days)
    }
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            min_length: 12,
            min_strength: 3,
            breached_hashes_file: None,
            history: 5,
            max_age_days: 0,
            max_age_days_by_class: Default::default(),
        }
    }
}

/// Why a password was refused. Never contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    #[error("password is too short: at least {0} characters")]
    TooShort(usize),
    #[error("password is too easy to guess (strength {score} of 4, at least {min} required){hint}")]
    TooWeak { score: u8, min: u8, hint: String },
    #[error("password appears in a list of breached passwords; choose another")]
    Breached,
    #[error("password was used recently; choose another")]
    Reused,
    #[error("breached-password list {0} cannot be searched: {1}")]
    ListUnreadable(PathBuf, String),
}

impl PasswordPolicy {
    /// Checks everything but history (which needs the stored hashes).
    pub fn check(&self, password: &str, user: &str) -> Result<(), PolicyViolation> {
        if password.chars().count() < self.min_length {
            return Err(PolicyViolation::TooShort(self.min_length));
        }
        if self.min_strength > 0 {
            let estimate = zxcvbn::zxcvbn(password, &[user]);
            let score = u8::from(estimate.score());
            if score < self.min_strength {
                let hint = estimate.feedback().and_then(|f| f.warning()).map(|w| format!(": {w}")).unwrap_or_default();
                return Err(PolicyViolation::TooWeak { score, min: self.min_strength, hint });
            }
        }
        if let Some(path) = &self.breached_hashes_file {
            if is_breached(path, password).map_err(|e| PolicyViolation::ListUnreadable(path.clone(), e.to_string()))? {
                return Err(PolicyViolation::Breached);
            }
        }
        Ok(())
    }
}

/// Upper-case hex SHA-1 of the password.
pub fn sha1_hex(password: &str) -> String {
    hex_upper(&sha1::Sha1::digest(password.as_bytes()))
}

/// Upper-case hex NTLM hash (MD4 of UTF-16LE) of the password.
pub fn ntlm_hex(password: &str) -> String {
    let utf16: Vec<u8> = password.encode_utf16().flat_map(u16::to_le_bytes).collect();
    hex_upper(&md4::Md4::digest(&utf16))
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Searches a sorted hash list for the password's SHA-1 (40 hex digits)
/// or NTLM (32 hex digits) hash, whichever the file holds.
pub fn is_breached(path: &Path, password: &str) -> std::io::Result<bool> {
    let mut file = BufReader::new(File::open(path)?);
    let mut first = String::new();
    file.read_line(&mut first)?;
    let width = first.trim().split(':').next().unwrap_or("").len();
    let target = match width {
        40 => sha1_hex(password),
        32 => ntlm_hex(password),
        0 => return Ok(false),
        _ => {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "lines are neither SHA-1 nor NTLM hashes"))
        }
    };
    let len = file.seek(SeekFrom::End(0))?;
    let (mut lo, mut hi) = (0u64, len);
    let mut line = String::new();
    // Invariant: a line equal to the target, if any, starts in [lo, hi).
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let start = if mid == 0 {
            file.seek(SeekFrom::Start(0))?;
            0
        } else {
            // Move to the first line starting at or after `mid`.
            file.seek(SeekFrom::Start(mid - 1))?;
            line.clear();
            mid - 1 + file.read_line(&mut line)? as u64
        };
        line.clear();
        let n = file.read_line(&mut line)?;
        if n == 0 || start >= hi {
            hi = mid;
            continue;
        }
        let hash = line.trim().split(':').next().unwrap_or("").to_ascii_uppercase();
        match hash.as_str().cmp(target.as_str()) {
            std::cmp::Ordering::Equal => return Ok(true),
            std::cmp::Ordering::Less => lo = start + n as u64,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PasswordPolicy {
        PasswordPolicy::default()
    }

    #[test]
    fn accept_reject_table() {
        let p = policy();
        let table: &[(&str, bool)] = &[
            ("short", false),
            ("password1234", false),
            ("aaaaaaaaaaaaaaaa", false),
            ("alice-alice-alice", false),
            ("qwertyuiopasdf", false),
            ("correct horse battery staple", true),
            ("Tr0ub4dor&3-extra-length", true),
            ("v9#Lq2!xZ7@mWp", true),
        ];
        for (pw, ok) in table {
            assert_eq!(p.check(pw, "alice").is_ok(), *ok, "{pw}: {:?}", p.check(pw, "alice"));
        }
        let e = p.check("short", "alice").unwrap_err().to_string();
        assert!(!e.contains("short") || e.contains("too short"), "{e}");
    }

    #[test]
    fn hashes_match_known_values() {
        // SHA-1("password") and NTLM("password"), as published everywhere.
        assert_eq!(sha1_hex("password"), "5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8");
        assert_eq!(ntlm_hex("password"), "8846F7EAEE8FB117AD06BDD830B7586C");
    }

    #[test]
    fn breached_list_binary_search_in_both_formats() {
        let dir = std::env::temp_dir().join(format!("p3x-breach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let words: Vec<String> = (0..5000).map(|i| format!("leaked-password-{i}")).collect();
        for (name, f) in [("sha1.txt", sha1_hex as fn(&str) -> String), ("ntlm.txt", ntlm_hex)] {
            let mut lines: Vec<String> = words.iter().enumerate().map(|(i, w)| format!("{}:{}", f(w), i + 1)).collect();
            lines.sort();
            let path = dir.join(name);
            std::fs::write(&path, lines.join("\r\n") + "\r\n").unwrap();
            for w in words.iter().step_by(97).chain([&words[0], &words[4999]]) {
                assert!(is_breached(&path, w).unwrap(), "{name}: {w}");
            }
            for w in ["not-leaked", "leaked-password-5000", ""] {
                assert!(!is_breached(&path, w).unwrap(), "{name}: {w}");
            }
            let p = PasswordPolicy { breached_hashes_file: Some(path), min_strength: 0, min_length: 1, ..policy() };
            assert_eq!(p.check("leaked-password-42", "x"), Err(PolicyViolation::Breached));
            assert!(p.check("not-leaked-at-all", "x").is_ok());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
