//! Integration tests against the real `pop3connex` binary on 127.0.0.1:0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pop3connex");

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn data_dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("p3x-bin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let out = Command::new(BIN).args(["init", "--data-dir"]).arg(&d).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = d.join("pop3connex.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1:9950", "127.0.0.1:0")
        .replace("127.0.0.1:1100", "127.0.0.1:0")
        .replace("127.0.0.1:2400", "127.0.0.1:0")
        .replace("[lmtp]", "[auth]\nargon2_memory_kib = 8192\nargon2_iterations = 1\nfailure_delay_ms = 0\n\n[lmtp]")
        .replace("[pop3]\n", "[pop3]\nplaintext_auth_networks = [\"127.0.0.1/32\"]\n");
    std::fs::write(&cfg, text).unwrap();
    Dir(d)
}

fn pop3connex(dir: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(dir.join("pop3connex.toml"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

struct Server {
    child: Child,
    pop3s: String,
    pop3: String,
    lmtp: String,
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Server {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(dir.join("pop3connex.toml"))
        .arg("serve")
        .env("POP3CONNEX_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut pop3s, mut pop3, mut lmtp) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pop3s.is_none() || pop3.is_none() || lmtp.is_none() {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("server did not start");
        let addr = line.split("address=").nth(1).map(|s| s.trim().to_owned());
        if line.contains("listening pop3s") {
            pop3s = addr;
        } else if line.contains("listening pop3 ") {
            pop3 = addr;
        } else if line.contains("listening lmtp") {
            lmtp = addr;
        }
    }
    Server { child, pop3s: pop3s.unwrap(), pop3: pop3.unwrap(), lmtp: lmtp.unwrap(), log: rx }
}

struct Conn(BufReader<TcpStream>);

impl Conn {
    fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn(BufReader::new(s))
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        l.trim_end().to_owned()
    }
    fn cmd(&mut self, c: &str) -> String {
        self.0.get_mut().write_all(format!("{c}\r\n").as_bytes()).unwrap();
        self.line()
    }
}

fn deliver(addr: &str, rcpt: &str, body: &str) -> String {
    let mut c = Conn::open(addr);
    c.line();
    c.0.get_mut().write_all(b"LHLO t\r\n").unwrap();
    while c.line().starts_with("250-") {}
    c.cmd("MAIL FROM:<s@example.org>");
    c.cmd(&format!("RCPT TO:<{rcpt}>"));
    c.cmd("DATA");
    c.cmd(&format!("{body}\r\n."))
}

#[test]
fn config_check_reports_file_line_and_reason() {
    let d = data_dir("check");
    let ok = pop3connex(&d.0, &["config", "check"], "");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let cfg = d.0.join("pop3connex.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[log]", "[log]\ncolour = \"yes\"")).unwrap();
    let bad = pop3connex(&d.0, &["config", "check"], "");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("pop3connex.toml:") && err.contains("colour"), "{err}");
    // A world-readable key file is refused.
    std::fs::write(&cfg, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.0.join("master.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let bad = pop3connex(&d.0, &["config", "check"], "");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("chmod 600"));
}

#[test]
fn users_delivery_retrieval_reload_and_graceful_shutdown() {
    let d = data_dir("serve");
    let add = pop3connex(&d.0, &["user", "add", "alice", "--password-stdin"], "s3cret pass phrase\n");
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    let dup = pop3connex(&d.0, &["user", "add", "alice", "--password-stdin"], "x\n");
    assert!(!dup.status.success());
    let mut srv = serve(&d.0);

    assert!(deliver(&srv.lmtp, "alice@example.org", "Subject: t\r\n\r\nhello").starts_with("250 2.0.0"));
    let stat = pop3connex(&d.0, &["mailbox", "stat", "alice"], "");
    assert!(String::from_utf8_lossy(&stat.stdout).contains("messages: 1"));

    let mut c = Conn::open(&srv.pop3);
    assert_eq!(c.line(), "+OK POP3 server ready");
    c.cmd("USER alice");
    assert!(c.cmd("PASS s3cret pass phrase").starts_with("+OK"));
    assert!(c.cmd("RETR 1").starts_with("+OK"));
    let mut body = String::new();
    loop {
        let l = c.line();
        if l == "." {
            break;
        }
        body.push_str(&l);
        body.push('\n');
    }
    assert!(body.ends_with("Subject: t\n\nhello\n"), "{body}");

    // The implicit-TLS port does not speak plaintext.
    let mut raw = TcpStream::connect(&srv.pop3s).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"USER alice\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = raw.read(&mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("+OK"));

    // SIGHUP reloads TLS and the server keeps running.
    Command::new("kill").args(["-HUP", &srv.child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reloaded = false;
    while Instant::now() < deadline {
        if let Ok(l) = srv.log.recv_timeout(Duration::from_millis(200)) {
            if l.contains("tls_reloaded") {
                reloaded = true;
                break;
            }
        }
    }
    assert!(reloaded, "SIGHUP reload was logged");
    assert!(c.cmd("NOOP").starts_with("+OK"));

    // SIGTERM: the idle session gets a goodbye and the process exits 0.
    Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status().unwrap();
    assert_eq!(c.line(), "-ERR [SYS/TEMP] Server shutting down, try again later");
    let status = srv.child.wait().unwrap();
    assert!(status.success());
    let stat = pop3connex(&d.0, &["mailbox", "stat", "alice"], "");
    assert!(String::from_utf8_lossy(&stat.stdout).contains("messages: 1"), "nothing deleted without QUIT");
}

#[test]
fn dovecot_hashes_import_log_in_and_are_upgraded() {
    let d = data_dir("passwd");
    // Hashes made by `doveadm pw -s SCHEME -p test` (Dovecot 2.3).
    let passwd = d.0.join("passwd");
    std::fs::write(
        &passwd,
        "sha:{SHA512-CRYPT}$6$DAEBdnbM6x1qs1Zp$61UH.TYqGe1o4wPuELC1PJHFGN.eczraTrksAeTWd3Gpnaim7hyGbXA9b1rP4wGtu.AQHqM8B1R0wQa3Hyamc1::::::\n\
         blf:{BLF-CRYPT}$2y$05$9EEIy.4MYOsRqqq3U3lQ8uLOysSjbXYfEbyLOa3Gk8.I5O2n64.cu::::::\n\
         arg:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$NlT2VO6jUfKoLbL89cUmiA$tc6AOu37+6LQifp8HGtMMgeKfbyETSqJA6Jo0s649PU\n\
         bad:{PLAIN}test\n",
    )
    .unwrap();
    let out = pop3connex(&d.0, &["user", "import-passwd", passwd.to_str().unwrap()], "");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("imported 3 users, skipped 1"), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    let srv = serve(&d.0);
    for user in ["sha", "blf", "arg"] {
        let mut c = Conn::open(&srv.pop3);
        c.line();
        c.cmd(&format!("USER {user}"));
        assert!(c.cmd("PASS test").starts_with("+OK"), "{user}");
        c.cmd("QUIT");
    }
    let db = d.0.join("pop3connex.db");
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; print('\\n'.join(h[:10] + ' ' + str(s is not None) for h, s in sqlite3.connect(sys.argv[1]).execute('select password_hash, scram from users')))")
        .arg(&db)
        .output()
        .unwrap();
    let rows = String::from_utf8_lossy(&out.stdout);
    assert_eq!(rows.lines().filter(|l| l.starts_with("$argon2id$") && l.ends_with("True")).count(), 3, "{rows}");
}

/// `user list` once printed the header padded to 40 columns and the rows
/// not padded at all (`UserName`'s `Display` ignores the width).
#[test]
fn user_list_header_and_rows_align() {
    let d = data_dir("list");
    let long = format!("long.{}@example.org", "n".repeat(50));
    for name in ["al", long.as_str(), "bob"] {
        let add = pop3connex(&d.0, &["user", "add", name, "--password-stdin"], "s3cret pass phrase\n");
        assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    }
    let srv = serve(&d.0);
    assert!(deliver(&srv.lmtp, "bob@example.org", "Subject: t\r\n\r\nhello").starts_with("250 2.0.0"));
    drop(srv);
    let out = pop3connex(&d.0, &["user", "list"], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].split_whitespace().eq(["user", "messages", "octets", "status"]), "{text}");
    for name in ["al", long.as_str(), "bob"] {
        assert!(lines.iter().any(|l| l.split_whitespace().next() == Some(name)), "{name} missing: {text}");
    }
    // Byte offsets where each whitespace-separated field starts and ends.
    let fields = |l: &str| -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in l.char_indices().chain(std::iter::once((l.len(), ' '))) {
            match (c == ' ', start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    out.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        out
    };
    let header = fields(lines[0]);
    for l in &lines[1..] {
        let row = fields(l);
        assert_eq!(row.len(), 4, "{l:?}");
        assert_eq!(row[0].0, header[0].0, "names start where the header's does:\n{text}");
        assert_eq!(row[1].1, header[1].1, "message counts end under \"messages\":\n{text}");
        assert_eq!(row[2].1, header[2].1, "octets end under \"octets\":\n{text}");
        assert_eq!(row[3].0, header[3].0, "status starts under \"status\":\n{text}");
    }
}

#[test]
fn admin_cli_round_trip() {
    let dir = data_dir("admin-cli");
    let pw = "correct horse battery staple\n";
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let add = pop3connex(&dir.0, &["admin", "add", "alice", "--role", "superadmin", "--password-stdin"], pw);
    assert!(ok(&add).contains("added administrator alice"));
    ok(&pop3connex(&dir.0, &["admin", "add", "bob", "--role", "auditor", "--role", "key-custodian"], pw));
    let dup = pop3connex(&dir.0, &["admin", "add", "bob", "--role", "auditor", "--password-stdin"], pw);
    assert!(!dup.status.success() && String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let bad = pop3connex(&dir.0, &["admin", "add", "carol", "--role", "root", "--password-stdin"], pw);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("unknown role"));

    let table = ok(&pop3connex(&dir.0, &["admin", "list"], ""));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("admin") && lines[0].contains("roles") && lines[0].contains("factors"), "{table}");
    assert!(lines[2].starts_with("bob") && lines[2].contains("auditor,key-custodian") && lines[2].contains("active"));
    assert!(lines[2].contains("none (enrolment pending)"), "{table}");

    ok(&pop3connex(&dir.0, &["admin", "disable", "bob"], ""));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&pop3connex(&dir.0, &["admin", "list", "--json"], ""))).unwrap();
    assert_eq!(json[1]["name"], "bob");
    assert_eq!(json[1]["enabled"], false);
    assert_eq!(json[0]["roles"][0], "superadmin");
    assert!(json.to_string().find("argon2").is_none(), "no password hash in the listing");

    ok(&pop3connex(&dir.0, &["admin", "set-roles", "bob", "--role", "mailbox-admin"], ""));
    ok(&pop3connex(&dir.0, &["admin", "reset-mfa", "bob"], ""));
    ok(&pop3connex(&dir.0, &["admin", "passwd", "bob", "--password-stdin"], "another long passphrase here\n"));
    let roles = ok(&pop3connex(&dir.0, &["admin", "roles"], ""));
    assert!(roles.lines().any(|l| l.starts_with("auditor") && l.contains("audit.read") && !l.contains("users.write")));

    // A token for automation, shown once, listed without its secret, revoked.
    let out = pop3connex(
        &dir.0,
        &[
            "admin",
            "token",
            "create",
            "--admin",
            "alice",
            "--name",
            "backup",
            "--permission",
            "users.read",
            "--expires-days",
            "7",
        ],
        "",
    );
    let token = ok(&out).trim().to_owned();
    assert!(token.starts_with("p3x_"), "{token}");
    let id = token[4..20].to_owned();
    let list = ok(&pop3connex(&dir.0, &["admin", "token", "list"], ""));
    assert!(list.contains(&id) && list.contains("backup") && !list.contains(&token), "{list}");
    let more = pop3connex(
        &dir.0,
        &[
            "admin",
            "token",
            "create",
            "--admin",
            "bob",
            "--name",
            "x",
            "--permission",
            "users.read",
            "--expires-days",
            "7",
        ],
        "",
    );
    assert!(!more.status.success(), "bob lacks tokens.write");
    ok(&pop3connex(&dir.0, &["admin", "token", "revoke", &id], ""));
    let list: serde_json::Value =
        serde_json::from_str(&ok(&pop3connex(&dir.0, &["admin", "token", "list", "--json"], ""))).unwrap();
    assert_eq!(list[0]["revoked"], true);

    ok(&pop3connex(&dir.0, &["admin", "remove", "bob"], ""));
    let table = ok(&pop3connex(&dir.0, &["admin", "list"], ""));
    assert!(!table.contains("bob") && table.contains("alice"));
    let gone = pop3connex(&dir.0, &["admin", "remove", "bob"], "");
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("no such administrator"));
}
