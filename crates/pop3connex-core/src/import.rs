//! Import from Maildir and mbox (migrations from Dovecot, Courier, ...).
//!
//! Messages are converted to CRLF line ends, sealed and committed in
//! batches; each message's source identity is recorded in the same
//! transaction, so an interrupted import resumes exactly where the last
//! durable batch ended and never imports a message twice. mbox files are
//! streamed, never loaded whole.
//!
//! The files imported are hostile input: a Maildir may belong to the very
//! user it is imported for. Below a Maildir root nothing is followed:
//! `cur/`, `new/` and `tmp/` must be real directories (a symbolic link is
//! refused, so `cur -> <data dir>/tls` cannot leak the server's key), each
//! is opened once and its messages are opened relative to that open
//! directory (via `/proc/self/fd`), so swapping a directory for a link
//! during the import changes nothing. Message files are opened with
//! `O_NOFOLLOW | O_NONBLOCK` and must be regular files: links, FIFOs,
//! sockets, devices and directories are skipped and reported, never
//! opened blocking. The path given on the command line (the Maildir root
//! or the mbox file) may be a symbolic link only with `follow_symlinks`.

use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::mailstore::{MailStore, MailStoreError};
use crate::store::UserRecord;

/// Messages per transaction.
const BATCH: usize = 64;
/// A larger `dovecot-uidlist` is ignored (order then follows the file
/// names): Dovecot writes about 60 bytes per message, so this is a million
/// messages and the memory stays bounded.
const MAX_UIDLIST_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} is not a Maildir (no cur/ or new/ folder)")]
    NotMaildir(PathBuf),
    #[error("{0} is not an mbox file: it does not start with a \"From \" line")]
    NotMbox(PathBuf),
    #[error("{0} is a symbolic link: refused{1}")]
    Symlink(PathBuf, &'static str),
    #[error("{0} is not a {1} (it is a {2})")]
    FileType(PathBuf, &'static str, &'static str),
    #[error(transparent)]
    Store(#[from] MailStoreError),
}

/// What an import did. `skipped` and `notes` are meant for the operator;
/// they quote file names from the source, so escape them for a terminal
/// ([`escape_controls`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: u64,
    pub already_present: u64,
    /// Entries not imported, each with the reason.
    pub skipped: Vec<String>,
    /// Imported, but worth knowing (e.g. messages containing NUL bytes).
    pub notes: Vec<String>,
}

/// How the path given by the operator may be opened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportOptions {
    /// Accept a symbolic link as the mbox file or the Maildir root (never
    /// below the root).
    pub follow_symlinks: bool,
}

/// Progress callback: (messages handled so far, total if known).
pub type Progress<'a> = &'a mut dyn FnMut(u64, Option<u64>);

/// Converts every line end (bare LF, bare CR, CRLF) to CRLF and makes sure
/// the message ends with CRLF, as POP3 transmits it.
pub fn to_crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40 + 2);
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if raw.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `s` with control characters (ESC, CR, LF, ...) and bidirectional
/// overrides escaped, for echoing names from hostile input to a terminal.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

struct Pending {
    key: String,
    /// The key an earlier release recorded for the same message, honoured
    /// so an import it began resumes without duplicates.
    legacy_key: Option<String>,
    body: Vec<u8>,
}

struct Batcher<'a> {
    mail: &'a MailStore,
    user: &'a UserRecord,
    pending: Vec<Pending>,
    report: ImportReport,
}

impl Batcher<'_> {
    async fn add(
        &mut self,
        label: &str,
        key: String,
        legacy_key: Option<String>,
        body: Vec<u8>,
    ) -> Result<(), ImportError> {
        // LMTP accepts NUL bytes too (it refuses bare CR and LF, which the
        // import turns into CRLF): keep the message, tell the operator.
        if body.contains(&0) {
            self.report.notes.push(format!("{label}: contains NUL bytes; imported unchanged"));
        }
        self.pending.push(Pending { key, legacy_key, body });
        if self.pending.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ImportError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> =
            self.pending.iter().flat_map(|p| std::iter::once(p.key.clone()).chain(p.legacy_key.clone())).collect();
        let done = self.mail.store().imported(self.user.mailbox.id, keys).await.map_err(MailStoreError::from)?;
        let mut sealed = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in self.pending.drain(..) {
            let legacy_done = p.legacy_key.as_ref().is_some_and(|k| done.contains(k));
            if legacy_done || done.contains(&p.key) || !seen.insert(p.key.clone()) {
                self.report.already_present += 1;
                continue;
            }
            sealed.push(self.mail.seal(self.user, &to_crlf(&p.body), Some(p.key)).map_err(MailStoreError::from)?);
        }
        let n = sealed.len() as u64;
        self.mail.commit(sealed).await?;
        self.report.imported += n;
        Ok(())
    }
}

/// What a directory entry is, for messages.
fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_symlink() {
        "symbolic link"
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else if t.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

fn is_eloop(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// Opens a directory; a symbolic link as its last component only if
/// `follow`. `shown` is the path for messages.
fn open_dir(path: &Path, shown: &Path, follow: bool) -> Result<File, ImportError> {
    let io = |source| ImportError::Io { path: shown.to_owned(), source };
    let mut flags = libc::O_DIRECTORY;
    if !follow {
        flags |= libc::O_NOFOLLOW;
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        if meta.file_type().is_symlink() {
            return Err(ImportError::Symlink(shown.to_owned(), ""));
        }
    }
    let file = OpenOptions::new().read(true).custom_flags(flags).open(path).map_err(|e| {
        if is_eloop(&e) {
            ImportError::Symlink(shown.to_owned(), "")
        } else if e.raw_os_error() == Some(libc::ENOTDIR) {
            ImportError::FileType(shown.to_owned(), "directory", "file")
        } else {
            io(e)
        }
    })?;
    Ok(file)
}

/// Opens a regular file without blocking (a FIFO would) and, unless
/// `follow`, without following a link. Returns the file and its metadata,
/// or what it is instead.
fn open_regular(path: &Path, follow: bool) -> std::io::Result<Result<(File, Metadata), &'static str>> {
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if is_eloop(&e) => return Ok(Err("symbolic link")),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    Ok(if meta.is_file() { Ok((file, meta)) } else { Err(kind(meta.file_type())) })
}

/// A path that reaches `name` inside the directory `dir` is open on,
/// whatever is renamed or swapped in the meantime.
fn pinned(dir: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

/// Imports the INBOX of a Maildir (`cur/` and `new/`), oldest first.
pub async fn import_maildir(
    mail: &MailStore,
    user: &UserRecord,
    dir: &Path,
    options: ImportOptions,
    progress: Progress<'_>,
) -> Result<ImportReport, ImportError> {
    let root = open_dir(dir, dir, options.follow_symlinks)?;
    let root_pin = pinned(&root);
    if std::fs::symlink_metadata(&root_pin).is_err() {
        return Err(ImportError::Io {
            path: root_pin,
            source: std::io::Error::other("/proc is needed to import a Maildir safely; mount it"),
        });
    }
    let mut report = ImportReport::default();
    // (sub, file name, index into `subdirs`)
    let mut files: Vec<(&'static str, std::ffi::OsString, usize)> = Vec::new();
    let mut subdirs: Vec<File> = Vec::new();
    for sub in ["cur", "new", "tmp"] {
        let shown = dir.join(sub);
        match std::fs::symlink_metadata(root_pin.join(sub)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ImportError::Io { path: shown, source }),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ImportError::Symlink(shown, " (cur/, new/ and tmp/ must be real directories)"))
            }
            Ok(m) if !m.is_dir() => return Err(ImportError::FileType(shown, "directory", kind(m.file_type()))),
            Ok(_) => {}
        }
        let d = open_dir(&root_pin.join(sub), &shown, false)?;
        if sub == "tmp" {
            continue; // Checked only: tmp/ holds deliveries in progress, never read.
        }
        let pin = pinned(&d);
        for entry in std::fs::read_dir(&pin).map_err(|source| ImportError::Io { path: shown.clone(), source })? {
            let entry = entry.map_err(|source| ImportError::Io { path: shown.clone(), source })?;
            let t =
                entry.file_type().map_err(|source| ImportError::Io { path: shown.join(entry.file_name()), source })?;
            if t.is_file() {
                files.push((sub, entry.file_name(), subdirs.len()));
            } else {
                let name = entry.file_name();
                report.skipped.push(format!("{sub}/{}: {}, not imported", name.to_string_lossy(), kind(t)));
            }
        }
        subdirs.push(d);
    }
    if subdirs.is_empty() {
        return Err(ImportError::NotMaildir(dir.to_owned()));
    }
    // Arrival order: Dovecot's uidlist when present, else the delivery time
    // encoded in the name (seconds, then microseconds as a number: Dovecot
    // does not zero-pad "M<usecs>", so plain name order is wrong).
    let uids = read_dovecot_uidlist(&root_pin.join("dovecot-uidlist"), &mut report);
    let base_of = |name: &OsStr| {
        let name = name.to_string_lossy().into_owned();
        name.split(':').next().unwrap_or(&name).to_owned()
    };
    files.sort_by_cached_key(|(_, name, _)| {
        let base = base_of(name);
        let uid = uids.get(&base).copied().unwrap_or(u64::MAX);
        let (secs, usecs) = maildir_time(&base);
        (uid, secs, usecs, base)
    });
    let total = files.len() as u64;
    let mut b = Batcher { mail, user, pending: Vec::new(), report };
    for (i, (sub, name, d)) in files.into_iter().enumerate() {
        let label = format!("{sub}/{}", name.to_string_lossy());
        let shown = dir.join(sub).join(&name);
        let path = pinned(&subdirs[d]).join(&name);
        let io = |source| ImportError::Io { path: shown.clone(), source };
        match open_regular(&path, false).map_err(io)? {
            Err(what) => b.report.skipped.push(format!("{label}: {what}, not imported")),
            Ok((mut file, meta)) => {
                let mut body = Vec::with_capacity(meta.len().min(64 << 20) as usize);
                file.read_to_end(&mut body).map_err(io)?;
                // The part before ":2," is the message's stable unique name;
                // the flags after it change when a client reads the message.
                // Names are not unique in hostile or broken Maildirs, so the
                // content is part of the key.
                let base = base_of(&name);
                let digest = Sha256::digest(&body);
                let hex: String = digest[..16].iter().map(|x| format!("{x:02x}")).collect();
                let key = format!("maildir:{base}:{hex}");
                b.add(&label, key, Some(format!("maildir:{base}")), body).await?;
            }
        }
        progress(i as u64 + 1, Some(total));
    }
    b.flush().await?;
    drop(subdirs);
    drop(root);
    Ok(b.report)
}

/// Imports an mbox file (mboxrd quoting: one `>` is removed from lines
/// matching `^>+From `). The file must start with a `From ` line (an empty
/// file is an empty mbox).
pub async fn import_mbox(
    mail: &MailStore,
    user: &UserRecord,
    path: &Path,
    options: ImportOptions,
    progress: Progress<'_>,
) -> Result<ImportReport, ImportError> {
    let io = |source| ImportError::Io { path: path.to_owned(), source };
    if !options.follow_symlinks && std::fs::symlink_metadata(path).map_err(io)?.file_type().is_symlink() {
        return Err(ImportError::Symlink(path.to_owned(), "; pass --follow-symlinks to import the file it points to"));
    }
    let file = match open_regular(path, options.follow_symlinks).map_err(io)? {
        Ok((file, _)) => file,
        Err("symbolic link") => {
            return Err(ImportError::Symlink(
                path.to_owned(),
                "; pass --follow-symlinks to import the file it points to",
            ))
        }
        Err(what) => return Err(ImportError::FileType(path.to_owned(), "regular file", what)),
    };
    let mut reader = BufReader::new(file);
    let mut b = Batcher { mail, user, pending: Vec::new(), report: ImportReport::default() };
    let mut current: Option<Vec<u8>> = None;
    let mut index = 0u64;
    let mut line_no = 0u64;
    let mut from_line = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        line_no += 1;
        let at_separator = n == 0 || line.starts_with(b"From ");
        if line_no == 1 && !at_separator {
            return Err(ImportError::NotMbox(path.to_owned()));
        }
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
                b.add(&format!("message {index} (line {from_line})"), key, None, msg).await?;
                progress(index, None);
            }
            if n == 0 {
                break;
            }
            from_line = line_no;
            current = Some(Vec::new());
            continue;
        }
        let Some(msg) = current.as_mut() else {
            continue; // Unreachable: the first line is a separator.
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
/// a header. Absent: empty. A link, a special file, an oversized or
/// unreadable one: empty, with a note.
fn read_dovecot_uidlist(path: &Path, report: &mut ImportReport) -> std::collections::HashMap<String, u64> {
    let mut note = |why: &str| report.notes.push(format!("dovecot-uidlist: {why}; order taken from file names"));
    let (file, meta) = match open_regular(path, false) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Default::default(),
        Err(e) => {
            note(&e.to_string());
            return Default::default();
        }
        Ok(Err(what)) => {
            note(&format!("{what}, not read"));
            return Default::default();
        }
        Ok(Ok(f)) => f,
    };
    if meta.len() > MAX_UIDLIST_BYTES {
        note("too large, not read");
        return Default::default();
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_UIDLIST_BYTES).read_to_end(&mut bytes) {
        note(&e.to_string());
        return Default::default();
    }
    let text = String::from_utf8_lossy(&bytes);
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
