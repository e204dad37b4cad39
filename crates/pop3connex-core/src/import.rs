//! Import from Maildir and mbox (migrations from Dovecot, Courier, ...).
//!
//! Messages are converted to CRLF line ends, sealed and committed in
//! batches; each message's source identity is recorded in the same
//! transaction, so an interrupted import resumes exactly where the last
//! durable batch ended and never imports a message twice. mbox files are
//! streamed, never loaded whole.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::mailstore::{MailStore, MailStoreError};
use crate::store::UserRecord;

/// Messages per transaction.
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} is not a Maildir (no cur/ or new/ folder)")]
    NotMaildir(PathBuf),
    #[error(transparent)]
    Store(#[from] MailStoreError),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: u64,
    pub already_present: u64,
}

/// Progress callback: (messages handled so far, total if known).
pub type Progress<'a> = &'a mut dyn FnMut(u64, Option<u64>);

/// Converts bare LF line ends to CRLF and makes sure the message ends with
/// CRLF, as POP3 transmits it.
pub fn to_crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40 + 2);
    let mut prev = 0u8;
    for &b in raw {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct Batcher<'a> {
    mail: &'a MailStore,
    user: &'a UserRecord,
    pending: Vec<(String, Vec<u8>)>,
    report: ImportReport,
}

impl Batcher<'_> {
    async fn add(&mut self, key: String, body: Vec<u8>) -> Result<(), ImportError> {
        self.pending.push((key, body));
        if self.pending.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ImportError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = self.pending.iter().map(|(k, _)| k.clone()).collect();
        let done = self.mail.store().imported(self.user.mailbox.id, keys).await.map_err(MailStoreError::from)?;
        let mut sealed = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (key, body) in self.pending.drain(..) {
            if done.contains(&key) || !seen.insert(key.clone()) {
                self.report.already_present += 1;
                continue;
            }
            sealed.push(self.mail.seal(self.user, &to_crlf(&body), Some(key)).map_err(MailStoreError::from)?);
        }
        let n = sealed.len() as u64;
        self.mail.commit(sealed).await?;
        self.report.imported += n;
        Ok(())
    }
}

/// Imports the INBOX of a Maildir (`cur/` and `new/`), oldest first.
pub async fn import_maildir(
    mail: &MailStore,
    user: &UserRecord,
    dir: &Path,
    progress: Progress<'_>,
) -> Result<ImportReport, ImportError> {
    let mut files = Vec::new();
    let mut found = false;
    for sub in ["cur", "new"] {
        let d = dir.join(sub);
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ImportError::Io { path: d, source }),
        };
        found = true;
        for entry in entries {
            let entry = entry.map_err(|source| ImportError::Io { path: d.clone(), source })?;
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                files.push(entry.path());
            }
        }
    }
    if !found {
        return Err(ImportError::NotMaildir(dir.to_owned()));
    }
    // Arrival order: Dovecot's uidlist when present, else the delivery time
    // encoded in the name (seconds, then microseconds as a number: Dovecot
    // does not zero-pad "M<usecs>", so plain name order is wrong).
    let uids = read_dovecot_uidlist(&dir.join("dovecot-uidlist"));
    files.sort_by_cached_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let base = name.split(':').next().unwrap_or(&name).to_owned();
        let uid = uids.get(&base).copied().unwrap_or(u64::MAX);
        let (secs, usecs) = maildir_time(&base);
        (uid, secs, usecs, base)
    });
    let total = files.len() as u64;
    let mut b = Batcher { mail, user, pending: Vec::new(), report: ImportReport::default() };
    for (i, path) in files.into_iter().enumerate() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // The part before ":2," is the message's stable unique name; the
        // flags after it change when a client reads the message.
        let key = format!("maildir:{}", name.split(':').next().unwrap_or(&name));
        let body = std::fs::read(&path).map_err(|source| ImportError::Io { path: path.clone(), source })?;
        b.add(key, body).await?;
        progress(i as u64 + 1, Some(total));
    }
    b.flush().await?;
    Ok(b.report)
}

/// Imports an mbox file (mboxrd quoting: one `>` is removed from lines
/// matching `^>+From `).
pub async fn import_mbox(
    mail: &MailStore,
    user: &UserRecord,
    path: &Path,
    progress: Progress<'_>,
) -> Result<ImportReport, ImportError> {
    let io = |source| ImportError::Io { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = BufReader::new(file);
    let mut b = Batcher { mail, user, pending: Vec::new(), report: ImportReport::default() };
    let mut current: Option<Vec<u8>> = None;
    let mut index = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        let at_separator = n == 0 || line.starts_with(b"From ");
        if at_separator {
            if let Some(mut msg) = current.take() {
                // The blank line before a separator belongs to the mbox format.
                if msg.ends_with(b"\n\n") {
                    msg.pop();
                } else if msg.ends_with(b"\r\n\r\n") {
                    msg.truncate(msg.len() - 2);
                }
                index += 1;
                let key = format!("mbox:{index}:{:016x}", fnv1a(&msg));
                b.add(key, msg).await?;
                progress(index, None);
            }
            if n == 0 {
                break;
            }
            current = Some(Vec::new());
            continue;
        }
        let Some(msg) = current.as_mut() else {
            continue; // Garbage before the first separator.
        };
        let quoted = line.iter().position(|&c| c != b'>').is_some_and(|p| p > 0 && line[p..].starts_with(b"From "));
        msg.extend_from_slice(if quoted { &line[1..] } else { &line });
    }
    b.flush().await?;
    Ok(b.report)
}

/// (seconds, microseconds) from a Maildir name like `1795945812.M73238P16692.host`.
fn maildir_time(base: &str) -> (u64, u64) {
    let mut parts = base.splitn(3, '.');
    let secs = parts.next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    let usecs = parts
        .next()
        .and_then(|p| p.split_once('M'))
        .map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).collect::<String>())
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    (secs, usecs)
}

/// Dovecot's `dovecot-uidlist`: `<uid> [fields] :<base name>` per line after
/// a header. Unreadable or absent: empty.
fn read_dovecot_uidlist(path: &Path) -> std::collections::HashMap<String, u64> {
    let Ok(text) = std::fs::read_to_string(path) else { return Default::default() };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let (head, name) = line.split_once(':')?;
            let uid = head.split_whitespace().next()?.parse().ok()?;
            Some((name.to_owned(), uid))
        })
        .collect()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maildir_times_order_numerically() {
        assert!(maildir_time("1795945812.M73238P16692.vm") < maildir_time("1795945812.M251505P16692.vm"));
        assert_eq!(maildir_time("1795945812.M73238P16692.vm"), (1795945812, 73238));
        assert_eq!(maildir_time("1000.12345_1.host"), (1000, 0));
    }

    #[test]
    fn crlf_conversion() {
        assert_eq!(to_crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc\r\n");
        assert_eq!(to_crlf(b""), b"");
    }
}
