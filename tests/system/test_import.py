"""Migration into POP3conneX: `pop3connex import maildir` from a real
Dovecot Maildir, and `pop3connex import mbox` from an mboxrd file.

Maildir: a private Dovecot (own config file, base_dir, log and passwd-file
userdb in a temporary directory, LMTP on a free 127.0.0.1 port) receives
about 30 varied messages over LMTP and is stopped; its Maildir is imported
and every message is read back over POP3S. What is compared, per message:
  * the POP3 copy is Dovecot's file exactly, with LF line ends made CRLF;
  * without the trace headers Dovecot prepended (Return-Path, Delivered-To,
    Received) it is the message delivered over LMTP, byte for byte;
  * POP3 message order is Dovecot's arrival (UID) order; two of the
    messages are delivered timed so that their file names sort the other
    way round (Dovecot's microsecond field is not zero-padded).
mbox: the same kind of messages written as mboxrd (">From " quoting); the
POP3 copy must be the original message exactly, in file order.
Both imports are then re-run (nothing imported twice) and re-run after one
new message was added (only that one is imported).

Needs the Debian packages dovecot-core and dovecot-lmtpd for the Maildir
part, and root (Dovecot's master runs as root, mail as `nobody`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import syslib
from peers import PrivateDovecot
from syslib import CRLF, LOOPBACK, make_message

TEST_TIMEOUT = 110
SENDER = "sender@example.org"
DOMAIN = "example.com"
IMPORT_RE = re.compile(r"imported (\d+) messages.*?(\d+) were already present", re.S)


# --------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------

def corpus(prefix: str) -> list[bytes]:
    """About 30 CRLF messages, each with a unique X-Test-Id."""
    msgs = []
    for i in range(22):
        msgs.append(make_message(f"{prefix}-{i:02d}", body_lines=(i * 13) % 40, eight_bit=i % 3 == 0))

    def custom(tag: str, headers: list[bytes], body: bytes) -> bytes:
        h = [b"From: Sender <sender@example.org>", b"To: <rcpt@example.com>",
             b"Subject: import test " + tag.encode(), b"Message-ID: <" + tag.encode() + b"@test.invalid>",
             b"Date: Tue, 02 Jan 2024 10:00:00 +0100", b"X-Test-Id: " + tag.encode(), *headers]
        return CRLF.join(h) + CRLF + CRLF + body

    t = f"{prefix}-from"  # mbox separator look-alikes in the body
    msgs.append(custom(t, [], b"First line\r\nFrom sender@example.org Mon Jan  1 00:00:00 2024\r\n"
                              b">From already quoted once\r\n>>From quoted twice\r\nFrom \r\n"
                              b"From: not a header\r\n>From\r\nlast\r\n"))
    t = f"{prefix}-dots"  # dot transparency
    msgs.append(custom(t, [], b".\r\n..\r\n...\r\n. space\r\n.\r\nend\r\n.\r\n"))
    t = f"{prefix}-latin1"  # 8-bit, not UTF-8
    msgs.append(custom(t, [b"Content-Type: text/plain; charset=iso-8859-1",
                           b"Content-Transfer-Encoding: 8bit"],
                       b"caf\xe9, na\xefve, \xa9 \xb1 \xff\xfe\r\n\xe0 la ligne\r\n"))
    t = f"{prefix}-utf8hdr"  # raw UTF-8 in a header (RFC 6532) and a folded header
    msgs.append(custom(t, ["Subject2: Grüße aus Köln ✓".encode(), b"X-Folded: first part",
                           b"\tsecond part", b"  third part"], "Ünïcødé body\r\n".encode()))
    t = f"{prefix}-empty-body"
    msgs.append(custom(t, [], b""))
    t = f"{prefix}-blank-tail"  # body ends with blank lines
    msgs.append(custom(t, [], b"text\r\n\r\n\r\n"))
    t = f"{prefix}-long-line"
    msgs.append(custom(t, [], b"y" * 990 + b"\r\n" + b"z" * 500 + b"\r\n"))
    t = f"{prefix}-large"  # about 200 KB
    body = b"".join(b"%06d " % i + b"abcdefghij" * 5 + (b"\r\n.dot\r\nFrom x\r\n" if i % 97 == 0 else b"\r\n")
                    for i in range(3300))
    msgs.append(custom(t, [], body))
    assert len(msgs[-1]) > 190_000
    ids = [syslib.header_value(m, "X-Test-Id") for m in msgs]
    assert len(set(ids)) == len(ids)
    return msgs


def msg_id(msg: bytes) -> str:
    tid = syslib.header_value(syslib.trace_headers(msg)[1], "X-Test-Id")
    assert tid, f"message without X-Test-Id: {msg[:300]!r}"
    return tid


def crlf(raw: bytes) -> bytes:
    out = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    return out if out.endswith(CRLF) or not out else out + CRLF


TOOLS: dict[str, str] = {}


def tool(name: str) -> str:
    """Full path of a Dovecot command (in /usr/sbin, which a non-root PATH
    may lack); fails the test with the package to install if missing."""
    if name not in TOOLS:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if not path:
            pytest.fail(f"`{name}` not found: Dovecot is not installed. Install the Debian packages "
                        f"`dovecot-core` and `dovecot-lmtpd`.", pytrace=False)
        TOOLS[name] = path
    return TOOLS[name]


def run_import(srv: syslib.Server, kind: str, user: str, path: Path) -> tuple[int, int]:
    cp = srv.cli("import", kind, user, str(path), timeout=60)
    out = cp.stdout.decode(errors="replace") + cp.stderr.decode(errors="replace")
    m = IMPORT_RE.search(out)
    assert m, f"`pop3connex import {kind}` output not as contracted: {out!r}"
    return int(m.group(1)), int(m.group(2))


def pop3s_all(srv: syslib.Server, user: str, password: str) -> list[bytes]:
    """Every message as RETR returns it (dot-unstuffed, nothing removed)."""
    with srv.pop3s() as p:
        p.login(user, password)
        n, _ = p.stat()
        msgs = [p.retr(i) for i in range(1, n + 1)]
        p.quit()
    return msgs


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

def maildir_files(md: Path) -> list[Path]:
    """INBOX message files, in Dovecot's order (the order of its UIDs)."""
    files = {p.name.split(":")[0]: p for sub in ["new", "cur"] for p in (md / sub).iterdir() if p.is_file()}
    uidlist = md / "dovecot-uidlist"
    order = []
    for line in uidlist.read_text().splitlines()[1:]:
        m = re.match(r"\d+\s+(?:\S+\s+)*?:(\S+)", line)
        if m and m.group(1).split(":")[0] in files:
            order.append(files.pop(m.group(1).split(":")[0]))
    return order + sorted(files.values())


def order_probes(deliver, maildir: Path, attempts: int = 5) -> list[bytes]:
    """Delivers pairs of messages timed so that Dovecot names them
    <secs>.M<5-digit usecs>... and <secs>.M<6-digit usecs>... within the
    same second: the later one then sorts first by name (as happens by
    chance whenever deliveries cross the first 100 ms of a second). Returns
    the messages delivered, in order, once a pair came out that way."""
    sent = []
    for attempt in range(attempts):
        pair = []
        for part, frac in [("a", 0.03), ("b", 0.15)]:
            now = time.time()
            target = math.floor(now) + frac
            if part == "a" and target <= now + 0.005:
                target += 1
            time.sleep(max(0.0, target - now))
            msg = make_message(f"md-order-{attempt}{part}")
            deliver(msg)
            pair.append(msg)
        sent += pair
        names = {}
        for f in (maildir / "new").iterdir():
            names[msg_id(crlf(f.read_bytes()))] = f.name
        a, b = (names.get(msg_id(m)) for m in pair)
        assert a and b, f"Dovecot did not store the order probes: {names}"
        if a.split(".")[0] == b.split(".")[0] and b < a:
            return sent
    pytest.fail(f"could not make Dovecot store two same-second messages whose name order is not their "
                f"arrival order in {attempts} tries (machine too slow?)", pytrace=False)


@dataclass
class Migration:
    name: str
    password: str
    rcpt: str
    maildir: Path
    files: list[Path]          # Dovecot's files, in its UID (= arrival) order
    on_disk: list[bytes]       # their contents
    originals: list[bytes]     # what was delivered, same order
    first_import: tuple[int, int]
    import_secs: float


@pytest.fixture(scope="module")
def dovecot_migration(module_server):
    """Dovecot receives the corpus over LMTP and is stopped; its Maildir is
    imported once with `pop3connex import maildir`."""
    for name in ["dovecot", "doveadm"]:
        tool(name)
    if not Path("/usr/lib/dovecot/lmtp").exists():
        pytest.fail("Dovecot's LMTP server is not installed: install the Debian package `dovecot-lmtpd`",
                    pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the Dovecot import test runs Dovecot's master and must run as root", pytrace=False)
    srv = module_server
    name, pw = syslib.unique_name("mig"), syslib.new_password()
    srv.add_user(name, pw)
    rcpt = f"{name}@{DOMAIN}"
    originals = corpus_msgs = corpus("md")
    # Dovecot's unprivileged processes must reach the mail: not under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix="pop3connex-dovecot-", dir="/tmp"))
    os.chmod(root, 0o755)
    dovecot = PrivateDovecot(root)
    try:
        dovecot.configure([name])
        dovecot.start()
        with syslib.Lmtp(LOOPBACK, dovecot.port) as l:
            def deliver(msg: bytes):
                r = l.send_mail(SENDER, [rcpt], msg)
                assert r == {rcpt: 250}, f"Dovecot LMTP refused {msg_id(msg)}: {r}\n{dovecot.log()}"

            originals = order_probes(deliver, dovecot.maildir(name)) + originals
            for msg in originals[-len(corpus_msgs):]:
                deliver(msg)
            l.quit()
        dovecot.stop()
        md = dovecot.maildir(name)
        files = maildir_files(md)
        assert len(files) == len(originals), f"Dovecot stored {len(files)} of {len(originals)}\n{dovecot.log()}"
        on_disk = [f.read_bytes() for f in files]
        assert [msg_id(crlf(b)) for b in on_disk] == [msg_id(m) for m in originals], \
            "Dovecot's UID order is not the delivery order (test harness assumption)"
        t0 = time.monotonic()
        first = run_import(srv, "maildir", name, md)
        took = time.monotonic() - t0
        yield Migration(name, pw, rcpt, md, files, on_disk, originals, first, took)
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_maildir_import_content(module_server, dovecot_migration):
    srv, m = module_server, dovecot_migration
    assert m.first_import == (len(m.originals), 0), \
        f"first import: {m.first_import[0]} imported, {m.first_import[1]} already present"
    assert m.import_secs < 30, f"importing {len(m.originals)} messages took {m.import_secs:.1f}s"
    got = pop3s_all(srv, m.name, m.password)
    assert len(got) == len(m.originals)
    assert srv.mailbox_stat(m.name) == (len(got), sum(map(len, got)))
    by_id = {msg_id(g): g for g in got}
    assert len(by_id) == len(got), "a message was imported twice"
    for disk, orig in zip(m.on_disk, m.originals):
        tid = msg_id(orig)
        g = by_id.get(tid)
        assert g is not None, f"{tid} missing after import"
        assert g == crlf(disk), f"{tid}: POP3 copy is not Dovecot's file with CRLF line ends"
        found, _ = syslib.trace_headers(g)
        assert [h for h, _ in found][:2] == ["return-path", "delivered-to"], found
        assert syslib.strip_trace(g, sender=SENDER, rcpt=m.rcpt) == orig, \
            f"{tid}: differs from the message delivered to Dovecot"


def test_maildir_import_keeps_arrival_order(module_server, dovecot_migration):
    """POP3 message numbers follow arrival order, as Dovecot's UIDs do.
    Dovecot names files <secs>.M<usecs>P<pid>...; the microseconds are not
    zero-padded, so file-name order is not arrival order within a second."""
    srv, m = module_server, dovecot_migration
    got = pop3s_all(srv, m.name, m.password)[: len(m.originals)]
    want = [msg_id(o) for o in m.originals]
    have = [msg_id(g) for g in got]
    assert have == want, (f"POP3 order differs from Dovecot's arrival (UID) order\n"
                          f"Dovecot: {[(msg_id(crlf(d)), f.name) for d, f in zip(m.on_disk, m.files)]}\n"
                          f"POP3:    {have}")


def test_maildir_reimport_is_idempotent_and_resumes(module_server, dovecot_migration):
    srv, m = module_server, dovecot_migration
    before = pop3s_all(srv, m.name, m.password)
    assert len(before) == len(m.originals)
    # re-run: nothing twice
    assert run_import(srv, "maildir", m.name, m.maildir) == (0, len(m.originals))
    assert pop3s_all(srv, m.name, m.password) == before
    # a client marked one message read (Dovecot moves it into cur/ with
    # flags) and one new message arrived: only the new one is imported
    first = m.files[0]
    first.rename(m.maildir / "cur" / (first.name.split(":")[0] + ":2,S"))
    extra = make_message("md-late", eight_bit=True)
    stored = b"Return-Path: <" + SENDER.encode() + b">\n" + syslib.lf(extra)
    (m.maildir / "new" / f"{int(time.time()) + 5}.M1P1.test.invalid,S={len(stored)}").write_bytes(stored)
    assert run_import(srv, "maildir", m.name, m.maildir) == (1, len(m.originals))
    after = pop3s_all(srv, m.name, m.password)
    assert len(after) == len(m.originals) + 1
    assert after[:-1] == before, "re-import changed the already imported messages"
    assert syslib.strip_trace(after[-1], sender=SENDER) == extra


def mboxrd(messages: list[bytes]) -> bytes:
    """An mbox file (LF line ends) with mboxrd quoting: every line that
    matches ^>*From gets one more '>'."""
    out = []
    for i, m in enumerate(messages):
        out.append(b"From sender@example.org Mon Jan  %d 00:00:%02d 2024\n" % (1 + i % 9, i % 60))
        body = syslib.lf(m)
        out.append(re.sub(rb"(?m)^(>*From )", rb">\1", body))
        out.append(b"\n")
    return b"".join(out)


def test_import_mbox(module_server, tmp_path):
    srv = module_server
    name, pw = syslib.unique_name("mbx"), syslib.new_password()
    srv.add_user(name, pw)
    originals = corpus("mb")
    path = tmp_path / "inbox.mbox"
    data = mboxrd(originals)
    # the quoting is really exercised
    assert b"\n>From sender@example.org Mon" in data and b"\n>>From already" in data and b"\n>>>From quoted" in data
    path.write_bytes(data)

    imported, present = run_import(srv, "mbox", name, path)
    assert (imported, present) == (len(originals), 0), f"first import: {imported} imported, {present} present"
    got = pop3s_all(srv, name, pw)
    assert [msg_id(g) for g in got] == [msg_id(m) for m in originals], "POP3 order differs from mbox order"
    for g, orig in zip(got, originals):
        assert g == orig, f"{msg_id(orig)}: imported message differs\ngot:  {g[:800]!r}\nsent: {orig[:800]!r}"

    assert run_import(srv, "mbox", name, path) == (0, len(originals))
    assert len(pop3s_all(srv, name, pw)) == len(originals)

    extra = make_message("mb-late", eight_bit=True)
    with open(path, "ab") as f:
        f.write(mboxrd([extra]))
    assert run_import(srv, "mbox", name, path) == (1, len(originals))
    got2 = pop3s_all(srv, name, pw)
    assert got2[:-1] == got and got2[-1] == extra


# --------------------------------------------------------------------------
# hostile input (findings of an attack on the import path)
# --------------------------------------------------------------------------

HOSTILE_ARGON2 = "{ARGON2ID}$argon2id$v=19$m=4294967295,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
SHA_999M = "{SHA512-CRYPT}$6$rounds=999999999$saltsalt$" + "A" * 86


def login_reply(srv: syslib.Server, user: str, password: str) -> str:
    with srv.pop3s() as p:
        p.cmd(f"USER {user}")
        return p.cmd(f"PASS {password}", expect_ok=False)


def test_import_passwd_hostile_hash_refused_server_survives(server, tmp_path):
    """A passwd line with Argon2 m=4 GiB or SHA512-CRYPT rounds=999999999 is
    refused with its line number; every other skipped line is reported too,
    and names are never echoed with raw control characters."""
    srv = server
    victim, slow = syslib.unique_name("vic"), syslib.unique_name("slow")
    path = tmp_path / "passwd"
    path.write_bytes(f"{victim}:{HOSTILE_ARGON2}::::::\n{slow}:{SHA_999M}\nnohash\n".encode()
                     + b"esc\x1b[31mred:{PLAIN}x\n")
    cp = srv.cli("user", "import-passwd", str(path), check=False)
    out, err = cp.stdout.decode(), cp.stderr.decode()
    assert "imported 0 users, skipped 4" in out, (out, err)
    assert f"{path}:1: {victim}: hash refused: Argon2 memory m=4294967295 KiB is above the limit" in err, err
    assert f"{path}:2: {slow}: hash refused: SHA512-CRYPT rounds=999999999 is above the limit" in err, err
    assert f"{path}:3: nohash: no ':' in the line" in err, err
    assert f"{path}:4: esc\\u{{1b}}[31mred: invalid user name" in err, err
    assert b"\x1b" not in cp.stderr + cp.stdout, "a raw ESC reached the terminal"
    listed = srv.cli("user", "list").stdout.decode()
    assert victim not in listed and slow not in listed, listed
    t0 = time.monotonic()
    assert login_reply(srv, victim, "anything").startswith("-ERR")
    assert time.monotonic() - t0 < 10
    assert srv.alive(), "the server died on a login attempt"


def test_stored_hostile_hash_fails_login_with_error_log(server, tmp_path):
    """A hostile hash already in a store (imported by an earlier release) is
    never run: the login fails like a wrong password, the server stays up,
    and an ERROR names the user and the reason."""
    import sqlite3
    srv = server
    victim, pw = syslib.unique_name("old"), syslib.new_password()
    srv.add_user(victim, pw)
    db = sqlite3.connect(str(srv.data_dir / "pop3connex.db"), timeout=10)
    with db:
        n = db.execute("UPDATE users SET password_hash = ?, scram = NULL WHERE name = ?", (HOSTILE_ARGON2, victim))
        assert n.rowcount == 1
    db.close()
    t0 = time.monotonic()
    assert login_reply(srv, victim, pw).startswith("-ERR")
    assert time.monotonic() - t0 < 10
    assert srv.alive(), "the server died on a login attempt"
    deadline = time.monotonic() + 5
    while True:
        lines = [l for l in srv.log_text().splitlines() if "cost parameters out of bounds" in l and victim in l]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert lines, f"no log line naming {victim}:\n{srv.log_text()[-3000:]}"
    assert "ERROR" in lines[0] and "m=4294967295" in lines[0], lines[0]


def test_import_maildir_symlinked_cur_refused_key_not_imported(server, tmp_path):
    """`cur -> <data dir>/tls`: the import is refused and the server's TLS
    key never reaches the mailbox."""
    srv = server
    name, pw = syslib.unique_name("mal"), syslib.new_password()
    srv.add_user(name, pw)
    md = tmp_path / "Maildir"
    (md / "new").mkdir(parents=True)
    (md / "tmp").mkdir()
    (md / "cur").symlink_to(srv.data_dir / "tls")
    assert any(b"PRIVATE KEY" in f.read_bytes() for f in (srv.data_dir / "tls").iterdir() if f.is_file())
    cp = srv.cli("import", "maildir", name, str(md), check=False)
    err = cp.stderr.decode(errors="replace")
    assert cp.returncode != 0 and f"{md}/cur is a symbolic link: refused" in err, (cp.returncode, err)
    assert srv.mailbox_stat(name) == (0, 0)
    assert pop3s_all(srv, name, pw) == []


def test_import_fifo_refused_quickly(server, tmp_path):
    """A FIFO as the mbox, or inside a Maildir, never blocks the import."""
    srv = server
    name, pw = syslib.unique_name("fifo"), syslib.new_password()
    srv.add_user(name, pw)
    fifo = tmp_path / "inbox.mbox"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    cp = srv.cli("import", "mbox", name, str(fifo), check=False, timeout=20)
    assert time.monotonic() - t0 < 5
    assert cp.returncode != 0 and "is not a regular file (it is a FIFO)" in cp.stderr.decode(), cp
    md = tmp_path / "Maildir"
    for sub in ["cur", "new", "tmp"]:
        (md / sub).mkdir(parents=True)
    os.mkfifo(md / "new" / "3000.F.host")
    msg = make_message("fifo-neighbour")
    (md / "new" / "3001.G.host").write_bytes(syslib.lf(msg))
    t0 = time.monotonic()
    cp = srv.cli("import", "maildir", name, str(md), check=False, timeout=20)
    assert time.monotonic() - t0 < 5
    out, err = cp.stdout.decode(), cp.stderr.decode()
    assert cp.returncode != 0 and "skipped: new/3000.F.host: FIFO, not imported" in err, (out, err)
    assert IMPORT_RE.search(out).groups() == ("1", "0"), out
    assert pop3s_all(srv, name, pw) == [msg]


def test_import_mbox_without_from_line_is_an_error(server, tmp_path):
    srv = server
    name, pw = syslib.unique_name("nofrom"), syslib.new_password()
    srv.add_user(name, pw)
    path = tmp_path / "not.mbox"
    path.write_bytes(b"Subject: no From_ line at all\n\nbody\n")
    cp = srv.cli("import", "mbox", name, str(path), check=False)
    assert cp.returncode != 0 and "is not an mbox file" in cp.stderr.decode(), cp
    assert srv.mailbox_stat(name) == (0, 0)
