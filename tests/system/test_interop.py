"""Interoperability with real POP3 clients and LMTP senders, plus protocol
conformance checks that those clients rely on.

Messages are delivered over LMTP (swaks and a raw client) and downloaded
with curl, mpop, fetchmail and python's poplib over implicit TLS and STLS.
Downloaded bytes are compared with what was delivered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import poplib
import socket
import re
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

import syslib
from conftest import require_tool
from syslib import CRLF, LOOPBACK, addr, make_message, strip_trace

MAX_MESSAGE = 1024 * 1024
# Failed logins made on purpose below (wrong passwords, SCRAM, plaintext
# refusals) add up within the [abuse] window; they must not get 127.0.0.1
# banned halfway through the module. Bans are tested in test_abuse.py.
SERVER_SETTINGS = {
    ("lmtp", "max_message_size"): MAX_MESSAGE,
    ("abuse", "ban_after_auth_failures"): 1000,
    ("abuse", "lockout_after_failures"): 1000,
    ("auth", "failure_delay_ms"): 50,
    ("abuse", "max_failure_delay_ms"): 200,
}


def run(cmd, timeout=60, env=None, input=b"", cwd=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, input=input, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {cmd}\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}")


def describe(cp: subprocess.CompletedProcess) -> str:
    return (f"command: {cp.args}\nexit: {cp.returncode}\nstdout: {cp.stdout.decode(errors='replace')[-3000:]}\n"
            f"stderr: {cp.stderr.decode(errors='replace')[-3000:]}")


def swaks_deliver(server: syslib.Server, tmp: Path, rcpt: str, msg: bytes) -> None:
    """Delivers msg with swaks over LMTP. swaks appends CRLF.CRLF to the
    data, so the file holds the message without its final CRLF; swaks then
    sends exactly `msg` (dot-stuffed)."""
    require_tool("swaks")
    assert msg.endswith(CRLF)
    f = tmp / f"swaks-{os.urandom(4).hex()}.eml"
    f.write_bytes(msg[:-2])
    cp = run(["swaks", "--server", LOOPBACK, "--port", str(server.ports.lmtp), "--protocol", "LMTP",
              "--helo", "client.test", "--from", "sender@example.org", "--to", rcpt,
              "--data", f"@{f}", "--timeout", "30"], timeout=60)
    assert cp.returncode == 0, describe(cp)
    out = cp.stdout.decode(errors="replace")
    # the LMTP reply to the end of data for our single recipient
    after_dot = out.split("\n -> .\n")[-1]
    assert "\n -> .\n" in out and re.match(r"<-\s+250[ -]", after_dot), "swaks: no 250 after DATA\n" + out


def assert_client_copy(got: bytes, original: bytes, what: str):
    """A client-side copy may use LF line ends and may have header lines
    prepended (Received:, Return-Path:, X-...:) but must otherwise be the
    original message byte for byte."""
    g, o = syslib.lf(got), syslib.lf(original)
    assert g.endswith(o), (f"{what}: delivered message is not a suffix of the downloaded copy\n"
                           f"downloaded head: {g[:600]!r}\noriginal head: {o[:300]!r}")
    prefix = g[: len(g) - len(o)]
    for line in prefix.split(b"\n")[:-1] if prefix else []:
        assert re.match(rb"^([A-Za-z0-9-]+:|[ \t])", line), \
            f"{what}: client copy has non-header bytes before the message: {line!r}"


def read_drop_dir(d: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(d.iterdir())]


def by_test_id(msgs: list[bytes]) -> dict[str, bytes]:
    out = {}
    for m in msgs:
        tid = syslib.header_value(m, "X-Test-Id")
        assert tid, f"downloaded message without X-Test-Id: {m[:300]!r}"
        assert tid not in out, f"message {tid} downloaded twice"
        out[tid] = m
    return out


# --------------------------------------------------------------------------
# init, CAPA, STLS
# --------------------------------------------------------------------------

def test_init_created_contracted_files(server):
    d = server.data_dir
    for rel in ["pop3connex.toml", "tls/ca.pem", "tls/cert.pem", "tls/key.pem", "master.key"]:
        assert (d / rel).is_file(), f"`init` did not create {rel}"
    for rel in ["tls/key.pem", "master.key"]:
        mode = stat.S_IMODE((d / rel).stat().st_mode)
        assert mode & 0o077 == 0, f"{rel} has mode {oct(mode)}, expected 0600"
    assert b"BEGIN CERTIFICATE" in (d / "tls/ca.pem").read_bytes()
    # The CA must verify the leaf for localhost and 127.0.0.1.
    ctx = ssl.create_default_context(cafile=str(server.ca))
    for name in ["localhost", "127.0.0.1"]:
        with socket.create_connection((LOOPBACK, server.ports.pop3s), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as s:
                cert = s.getpeercert()
                assert s.version() in ("TLSv1.2", "TLSv1.3")
                assert s.recv(3) == b"+OK"
    san = {v for k, v in cert.get("subjectAltName", ())}
    assert {"localhost", "127.0.0.1"} <= san, f"leaf SANs: {san}"


def caps_of(lines: list[str]) -> dict[str, str]:
    out = {}
    for l in lines:
        k, _, v = l.partition(" ")
        out[k.upper()] = v
    return out


def test_capa_plaintext_port_before_and_after_stls(server, user):
    name, pw = user
    with server.pop3() as p:
        caps = caps_of(p.capa())
        assert "STLS" in caps, f"STLS not offered on the plaintext port: {caps}"
        assert "IMPLEMENTATION" not in caps, f"CAPA leaks IMPLEMENTATION: {caps}"
        assert "USER" not in caps, f"USER offered before TLS: {caps}"
        assert "PLAIN" not in caps.get("SASL", "").upper().split(), f"SASL PLAIN offered before TLS: {caps}"
        # no SASL at all: even SCRAM in the clear gives an eavesdropper an
        # offline dictionary attack on the password
        assert not caps.get("SASL", "").strip(), f"SASL mechanisms offered before TLS: {caps}"
        # and refused if tried anyway
        s = p.cmd(f"USER {name}", expect_ok=None)
        if s.startswith("+OK"):
            p.cmd(f"PASS {pw}", expect_ok=False)
        else:
            assert s.startswith("-ERR")
        tok = base64.b64encode(f"\0{name}\0{pw}".encode()).decode()
        p.cmd(f"AUTH PLAIN {tok}", expect_ok=False)
        p.cmd("AUTH SCRAM-SHA-256 " + base64.b64encode(f"n,,n={name},r=abcdefghijkl".encode()).decode(),
              expect_ok=False)
        p.stls(server.tls_context())
        caps2 = caps_of(p.capa())
        assert "STLS" not in caps2, f"STLS still offered after TLS is up: {caps2}"
        assert "USER" in caps2 and "PLAIN" in caps2.get("SASL", "").upper().split(), caps2
        assert "IMPLEMENTATION" not in caps2
        p.cmd("STLS", expect_ok=False)
        p.login(name, pw)
        caps3 = caps_of(p.capa())
        assert "STLS" not in caps3 and "IMPLEMENTATION" not in caps3, caps3
        p.quit()


def test_capa_implicit_tls(server, user):
    name, pw = user
    with server.pop3s() as p:
        caps = caps_of(p.capa())
        for c in ["USER", "TOP", "UIDL", "RESP-CODES"]:
            assert c in caps, f"{c} missing from CAPA on implicit TLS: {caps}"
        assert "PLAIN" in caps.get("SASL", "").upper().split(), caps
        assert "STLS" not in caps, f"STLS offered on implicit TLS: {caps}"
        assert "IMPLEMENTATION" not in caps, caps
        p.cmd("STLS", expect_ok=False)
        p.login(name, pw)
        caps = caps_of(p.capa())
        assert "STLS" not in caps and "IMPLEMENTATION" not in caps and "USER" not in caps, caps
        p.quit()


@pytest.mark.parametrize("listener", ["pop3s", "stls"])
def test_alpn_pop3_selected_unknown_protocols_served_without_alpn(server, user, listener):
    """RFC 7301: a client offering `pop3` gets `pop3`. Documented deviation
    (docs/specifications.md, tls.rs): a client offering only other
    protocols, or none, is served without ALPN instead of being refused
    with a no_application_protocol alert."""
    name, pw = user

    def selected(protocols: list[str] | None) -> str | None:
        ctx = server.tls_context()
        if protocols is not None:
            ctx.set_alpn_protocols(protocols)
        if listener == "pop3s":
            p = syslib.Pop3.connect(LOOPBACK, server.ports.pop3s, tls_ctx=ctx)
        else:
            p = server.pop3()
            p.stls(ctx)
        with p:
            chosen = p.ls.sock.selected_alpn_protocol()
            p.login(name, pw)
            p.quit()
        return chosen

    assert selected(["pop3"]) == "pop3"
    assert selected(["imap", "pop3", "http/1.1"]) == "pop3", "pop3 not chosen from a list that has it"
    assert selected(["x-unknown/1"]) is None, "an unknown protocol was selected"
    assert selected(["imap", "h2"]) is None
    assert selected(None) is None


def test_stls_discards_pipelined_plaintext(server, user):
    name, pw = user
    s = syslib.connect(LOOPBACK, server.ports.pop3)
    ls = syslib.LineSock(s)
    try:
        assert ls.readline().startswith(b"+OK")
        ls.send(b"STLS\r\nCAPA\r\n")
        first = ls.readline()
        assert first.startswith(b"+OK"), first
        extra = ls.buf + ls.read_available(1.0)
        assert extra == b"", f"server answered plaintext pipelined after STLS: {extra!r}"
        tls = server.tls_context().wrap_socket(s, server_hostname="localhost")
        ls2 = syslib.LineSock(tls)
        stray = ls2.read_available(1.0)
        assert stray == b"", f"server executed the pipelined CAPA inside TLS: {stray!r}"
        ls2.send(b"NOOP\r\n")
        # NOOP before auth may be -ERR or +OK; it must be exactly one line
        reply = ls2.readline()
        assert reply.startswith((b"+OK", b"-ERR")), reply
        assert ls2.read_available(0.5) == b"", "more than one reply to one command"
        ls2.send(f"USER {name}\r\n".encode())
        assert ls2.readline().startswith(b"+OK")
        ls2.send(f"PASS {pw}\r\n".encode())
        assert ls2.readline().startswith(b"+OK")
        ls2.send(b"QUIT\r\n")
        assert ls2.readline().startswith(b"+OK")
    finally:
        ls.close()


def test_wrong_password_and_unknown_user_look_the_same(server, user):
    name, pw = user
    replies = []
    for u, w in [(name, pw + "x"), ("nosuchuser" + os.urandom(3).hex(), pw)]:
        with server.pop3s() as p:
            p.cmd(f"USER {u}", expect_ok=None)
            r = p.cmd(f"PASS {w}", expect_ok=False)
            replies.append(r)
    assert replies[0] == replies[1], f"user enumeration: {replies}"
    assert "[AUTH]" in replies[0], f"failed login should carry [AUTH] (RFC 3206): {replies[0]!r}"
    with server.pop3s() as p:
        p.login(name, pw)
        p.quit()


# --------------------------------------------------------------------------
# raw client: exact bytes, LIST, UIDL, DELE, IN-USE, TOP
# --------------------------------------------------------------------------

def test_raw_retr_exact_bytes_and_list_sizes(server, user):
    name, pw = user
    big_body = b"".join(b".%06d " % i + b"y" * 70 + CRLF for i in range(4000))  # ~310 KiB, stuffed lines
    msgs = [
        make_message("raw-plain"),
        make_message("raw-8bit", eight_bit=True),
        make_message("raw-dots", extra_body=b".\r\n..\r\n...\r\n. \r\n"),
        make_message("raw-big", extra_body=big_body),
        b"X-Test-Id: raw-minimal\r\n\r\n",
    ]
    for m in msgs:
        assert server.deliver(addr(name), m) == {addr(name): 250}
    with server.pop3s() as p:
        p.login(name, pw)
        n, octets = p.stat()
        assert n == len(msgs)
        sizes = p.list()
        stored = {}
        for i, m in enumerate(msgs, 1):
            got = p.retr(i)
            stored[i] = got
            assert strip_trace(got, rcpt=addr(name)) == m, f"RETR {i} differs from what was delivered"
            s = p.cmd(f"LIST {i}")
            assert s.split()[1:3] == [str(i), str(len(got))], f"LIST {i} {s!r} != retrieved size {len(got)}"
        assert sizes == {i: len(g) for i, g in stored.items()}, "LIST sizes != sizes of the retrieved octets"
        assert octets == sum(len(g) for g in stored.values()), "STAT octets != sum of retrieved sizes"
        p.cmd(f"RETR {len(msgs) + 1}", expect_ok=False)
        p.cmd("RETR 0", expect_ok=False)
        p.quit()
    assert server.mailbox_stat(name) == (len(msgs), octets)


def test_uidl_stable_and_unique(server, user):
    name, pw = user
    for i in range(4):
        server.deliver(addr(name), make_message(f"uidl-{i}"))
    with server.pop3s() as p:
        p.login(name, pw)
        u1 = p.uidl()
        for n, uid in u1.items():
            assert 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid), f"bad unique-id {uid!r}"
            assert p.cmd(f"UIDL {n}").split()[1:3] == [str(n), uid]
        p.quit()
    assert len(set(u1.values())) == 4, f"UIDs not unique: {u1}"
    with server.pop3_stls() as p:
        p.login(name, pw)
        assert p.uidl() == u1, "UIDL changed between sessions"
        p.dele(1)
        p.quit()
    server.deliver(addr(name), make_message("uidl-new"))
    with server.pop3s() as p:
        p.login(name, pw)
        u3 = p.uidl()
        assert list(u3.values())[:3] == [u1[2], u1[3], u1[4]], "surviving messages changed UID"
        assert u3[4] not in u1.values(), "a new message reused a UID"
        p.quit()


def test_dele_applied_only_at_quit(server, user):
    name, pw = user
    msgs = [make_message(f"dele-{i}") for i in range(3)]
    for m in msgs:
        server.deliver(addr(name), m)
    # 1. DELE then drop the connection: nothing deleted
    p = server.pop3s()
    p.login(name, pw)
    p.dele(1)
    p.dele(2)
    assert p.stat()[0] == 1, "STAT must not count messages marked deleted"
    p.cmd("RETR 1", expect_ok=False)
    p.cmd("DELE 1", expect_ok=False)
    p.close()  # no QUIT
    # 2. the lock is released promptly; DELE + RSET + QUIT deletes nothing
    def login():
        q = server.pop3s()
        try:
            q.login(name, pw)
            return q
        except syslib.PopError as e:
            q.close()
            if "[IN-USE]" in e.line:
                return None
            raise
    p = syslib.wait_until(login, 5, 0.1, "mailbox lock release after a dropped connection")
    assert p.stat()[0] == 3, "a dropped connection applied DELE"
    p.dele(3)
    p.cmd("RSET")
    assert p.stat()[0] == 3
    p.quit()
    # 3. DELE + QUIT deletes exactly that message
    with server.pop3_stls() as p:
        p.login(name, pw)
        assert p.stat()[0] == 3
        p.dele(2)
        p.quit()
    with server.pop3s() as p:
        p.login(name, pw)
        n, octets = p.stat()
        got = [p.retr(1), p.retr(2)]
        assert (n, octets) == (2, len(got[0]) + len(got[1]))
        assert [strip_trace(g) for g in got] == [msgs[0], msgs[2]]
        p.quit()


def test_second_session_gets_in_use(server, user):
    name, pw = user
    server.deliver(addr(name), make_message("inuse"))
    a = server.pop3s()
    a.login(name, pw)
    try:
        with server.pop3s() as b:
            b.cmd(f"USER {name}")
            r = b.cmd(f"PASS {pw}", expect_ok=False)
            assert r.startswith("-ERR [IN-USE]"), r
        with server.pop3_stls() as b:
            tok = base64.b64encode(f"\0{name}\0{pw}".encode()).decode()
            r = b.cmd(f"AUTH PLAIN {tok}", expect_ok=False)
            assert r.startswith("-ERR [IN-USE]"), r
        assert a.stat()[0] == 1  # first session unaffected
    finally:
        a.quit()
        a.close()
    with server.pop3s() as b:
        b.auth_plain(name, pw)
        assert b.stat()[0] == 1
        b.quit()


def test_top(server, user):
    name, pw = user
    m = make_message("top", body_lines=3)
    server.deliver(addr(name), m)
    with server.pop3s() as p:
        p.login(name, pw)
        full = p.retr(1)
        assert strip_trace(full) == m
        head, body = full.split(b"\r\n\r\n", 1)
        body_lines = body.split(b"\r\n")
        assert p.top(1, 0) == head + b"\r\n\r\n"
        assert p.top(1, 3) == head + b"\r\n\r\n" + CRLF.join(body_lines[:3]) + CRLF
        assert p.top(1, 100000) == full
        p.cmd("TOP 2 0", expect_ok=False)
        p.cmd("TOP 1", expect_ok=False)
        p.quit()


# --------------------------------------------------------------------------
# real clients
# --------------------------------------------------------------------------

def deliver_set(server, tmp, name, prefix, n_swaks=2, n_raw=1) -> dict[str, bytes]:
    msgs = {}
    for i in range(n_swaks):
        tid = f"{prefix}-swaks-{i}"
        msgs[tid] = make_message(tid)
        swaks_deliver(server, tmp, addr(name), msgs[tid])
    for i in range(n_raw):
        tid = f"{prefix}-raw-{i}"
        msgs[tid] = make_message(tid, eight_bit=True)
        assert server.deliver(addr(name), msgs[tid]) == {addr(name): 250}
    return msgs


def test_curl_pop3s_retr_and_list(server, user, tmp_path):
    require_tool("curl")
    name, pw = user
    msgs = deliver_set(server, tmp_path, name, "curl")
    ordered = list(msgs.values())
    base = ["curl", "-sS", "--max-time", "30", "--cacert", str(server.ca), "-u", f"{name}:{pw}"]
    sizes = {}
    for i, m in enumerate(ordered, 1):
        out = tmp_path / f"curl-{i}.eml"
        cp = run(base + ["-o", str(out), f"pop3s://{LOOPBACK}:{server.ports.pop3s}/{i}"])
        assert cp.returncode == 0, describe(cp)
        got = out.read_bytes()
        sizes[str(i)] = str(len(got))
        assert strip_trace(got) == m, f"curl RETR {i} differs from the delivered message"
    cp = run(base + [f"pop3s://{LOOPBACK}:{server.ports.pop3s}/"])
    assert cp.returncode == 0, describe(cp)
    listing = dict(l.split() for l in cp.stdout.decode().split("\r\n") if l.strip())
    assert listing == sizes, f"curl LIST {cp.stdout!r} != sizes of the retrieved messages {sizes}"
    # UIDL through a custom request
    cp = run(base + ["-X", "UIDL", f"pop3s://{LOOPBACK}:{server.ports.pop3s}/"])
    assert cp.returncode == 0, describe(cp)
    assert len([l for l in cp.stdout.split(b"\r\n") if l.strip()]) == len(ordered)


def test_curl_pop3_stls_required(server, user, tmp_path):
    require_tool("curl")
    name, pw = user
    m = make_message("curl-stls")
    swaks_deliver(server, tmp_path, addr(name), m)
    out = tmp_path / "curl-stls.eml"
    cp = run(["curl", "-sS", "--max-time", "30", "--ssl-reqd", "--cacert", str(server.ca), "-u", f"{name}:{pw}",
              "-o", str(out), f"pop3://{LOOPBACK}:{server.ports.pop3}/1"])
    assert cp.returncode == 0, describe(cp)
    assert strip_trace(out.read_bytes()) == m
    # without TLS the server must refuse the credentials (plaintext_auth_networks = [])
    cp = run(["curl", "-sS", "--max-time", "30", "-u", f"{name}:{pw}", f"pop3://{LOOPBACK}:{server.ports.pop3}/1"])
    assert cp.returncode != 0 and m not in cp.stdout, "credentials accepted over plaintext:\n" + describe(cp)


def mpop_run(server, tmp: Path, name: str, pw: str, starttls: bool, auth: str, keep: bool = False,
             ca: Path | None = None, check: bool = True):
    require_tool("mpop")
    drop = tmp / f"mpop-drop-{os.urandom(3).hex()}"
    drop.mkdir()
    rc = tmp / f"mpoprc-{os.urandom(3).hex()}"
    port = server.ports.pop3 if starttls else server.ports.pop3s
    rc.write_text(f"""defaults
tls on
tls_starttls {'on' if starttls else 'off'}
tls_trust_file {ca or server.ca}
tls_certcheck on
received_header off
timeout 30

account test
host {LOOPBACK}
port {port}
user {name}
password {pw}
auth {auth}
uidls_file {tmp}/mpop-uidls-%U
only_new off
keep {'on' if keep else 'off'}
delivery mda "cat > {drop}/msg.$$"
""")
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp))
    cp = run(["mpop", f"--file={rc}", "-q", "test"], timeout=90, env=env)
    if not check:
        return drop, cp
    assert cp.returncode == 0, describe(cp)
    return drop


@pytest.mark.parametrize("starttls,auth", [(False, "user"), (False, "plain"), (True, "plain"), (True, "user"),
                                           (False, "scram-sha-256"), (True, "scram-sha-256"), (False, "on")])
def test_mpop(server, user, tmp_path, starttls, auth):
    name, pw = user
    msgs = deliver_set(server, tmp_path, name, f"mpop{int(starttls)}{auth}")
    drop = mpop_run(server, tmp_path, name, pw, starttls, auth)
    got = by_test_id(read_drop_dir(drop))
    assert set(got) == set(msgs)
    for tid, m in msgs.items():
        assert_client_copy(got[tid], m, f"mpop {tid}")
    # mpop deleted them (keep off): DELE + QUIT were applied
    assert server.mailbox_stat(name) == (0, 0)


def test_mpop_mbox_delivery(server, user, tmp_path):
    require_tool("mpop")
    name, pw = user
    msgs = deliver_set(server, tmp_path, name, "mbox", n_swaks=1, n_raw=1)
    mbox = tmp_path / "inbox.mbox"
    mbox.write_bytes(b"")
    rc = tmp_path / "mpoprc-mbox"
    rc.write_text(f"""account test
host {LOOPBACK}
port {server.ports.pop3s}
tls on
tls_starttls off
tls_trust_file {server.ca}
received_header off
user {name}
password {pw}
uidls_file {tmp_path}/uidls-mbox
keep on
delivery mbox {mbox}
""")
    rc.chmod(0o600)
    cp = run(["mpop", f"--file={rc}", "-q", "test"], timeout=90, env=dict(os.environ, HOME=str(tmp_path)))
    assert cp.returncode == 0, describe(cp)
    data = mbox.read_bytes()
    for tid, m in msgs.items():
        # mboxrd quoting: body lines "From " get a '>'
        quoted = re.sub(rb"(?m)^(>*From )", rb">\1", syslib.lf(m))
        assert quoted in data, f"mbox does not contain message {tid} intact"
    # keep on: nothing deleted; a second run fetches nothing new
    assert server.mailbox_stat(name)[0] == len(msgs)


def fetchmail_run(server, tmp: Path, name: str, pw: str, implicit: bool) -> tuple[Path, subprocess.CompletedProcess]:
    require_tool("fetchmail")
    drop = tmp / f"fm-drop-{os.urandom(3).hex()}"
    drop.mkdir()
    port = server.ports.pop3s if implicit else server.ports.pop3
    rc = tmp / f"fetchmailrc-{os.urandom(3).hex()}"
    tls = ("ssl sslproto 'tls1.2+'" if implicit else "sslproto 'tls1.2+'")
    rc.write_text(f"""set no syslog
set no bouncemail
set invisible
poll localhost via {LOOPBACK} proto POP3 port {port} uidl timeout 30
  user "{name}" there with password "{pw}" is "root" here
  {tls} sslcertck sslcertfile "{server.ca}" sslcommonname "localhost"
  fetchall no keep no rewrite
  mda "cat > {drop}/msg.$$"
""")
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp), FETCHMAILHOME=str(tmp))
    cp = run(["fetchmail", "-f", str(rc), "-i", str(tmp / f"fm-ids-{os.urandom(3).hex()}"),
              "--pidfile", str(tmp / "fetchmail.pid"), "--nodetach", "-v"], timeout=90, env=env)
    return drop, cp


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-tls", "stls"])
def test_fetchmail(server, user, tmp_path, implicit):
    name, pw = user
    msgs = deliver_set(server, tmp_path, name, f"fm{int(implicit)}")
    drop, cp = fetchmail_run(server, tmp_path, name, pw, implicit)
    assert cp.returncode == 0, describe(cp)
    log = cp.stdout.decode(errors="replace") + cp.stderr.decode(errors="replace")
    if not implicit:
        assert "STLS" in log, "fetchmail did not use STLS:\n" + log[-3000:]
    got = by_test_id(read_drop_dir(drop))
    assert set(got) == set(msgs), log[-3000:]
    for tid, m in msgs.items():
        assert_client_copy(got[tid], m, f"fetchmail {tid}")
    assert server.mailbox_stat(name) == (0, 0), "fetchmail's deletes were not applied"


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-tls", "stls"])
def test_fetchmail_rejects_untrusted_certificate(server, user, tmp_path, server_factory, implicit):
    """Certificate checking is really in effect in the client setup above:
    another instance's CA must not validate this server."""
    name, pw = user
    other = server_factory(start=False)
    server.deliver(addr(name), make_message("fm-untrusted"))
    real_ca = server.ca
    try:
        server.ca = other.ca
        drop, cp = fetchmail_run(server, tmp_path, name, pw, implicit)
    finally:
        server.ca = real_ca
    assert cp.returncode != 0, "fetchmail accepted a certificate from an untrusted CA:\n" + describe(cp)
    assert list(drop.iterdir()) == []
    assert server.mailbox_stat(name)[0] == 1


@pytest.mark.parametrize("starttls", [False, True], ids=["implicit-tls", "stls"])
def test_mpop_and_curl_reject_untrusted_certificate(server, user, tmp_path, server_factory, starttls):
    name, pw = user
    other = server_factory(start=False)
    m = make_message("untrusted")
    server.deliver(addr(name), m)
    drop, cp = mpop_run(server, tmp_path, name, pw, starttls, "plain", ca=other.ca, check=False)
    assert cp.returncode != 0, "mpop accepted a certificate from an untrusted CA:\n" + describe(cp)
    assert list(drop.iterdir()) == []
    url = (f"pop3://{LOOPBACK}:{server.ports.pop3}/1" if starttls else f"pop3s://{LOOPBACK}:{server.ports.pop3s}/1")
    cp = run(["curl", "-sS", "--max-time", "30", "--ssl-reqd", "--cacert", str(other.ca), "-u", f"{name}:{pw}", url])
    assert cp.returncode != 0 and m not in cp.stdout, "curl accepted an untrusted certificate:\n" + describe(cp)
    assert server.mailbox_stat(name)[0] == 1


def test_poplib_pop3_ssl(server, user):
    name, pw = user
    msgs = [make_message(f"poplib-ssl-{i}", eight_bit=bool(i % 2)) for i in range(3)]
    for m in msgs:
        server.deliver(addr(name), m)
    ctx = server.tls_context()
    c = poplib.POP3_SSL(LOOPBACK, server.ports.pop3s, context=ctx, timeout=30)
    try:
        assert c.getwelcome().startswith(b"+OK")
        c.user(name)
        c.pass_(pw)
        count, octets = c.stat()
        assert count == 3
        resp, listing, _ = c.list()
        uids = [l.split()[1] for l in c.uidl()[1]]
        got = []
        for i, m in enumerate(msgs, 1):
            resp, lines, _ = c.retr(i)
            assert resp.startswith(b"+OK")
            got.append(CRLF.join(lines) + CRLF)
            assert strip_trace(got[-1]) == m
        assert [l.split()[1] for l in listing] == [str(len(g)).encode() for g in got]
        assert octets == sum(len(g) for g in got)
        resp, lines, _ = c.top(1, 0)
        assert CRLF.join(lines) + CRLF == got[0].split(b"\r\n\r\n")[0] + CRLF + CRLF
        c.dele(1)
        c.quit()
    finally:
        c.close()
    c = poplib.POP3_SSL(LOOPBACK, server.ports.pop3s, context=ctx, timeout=30)
    try:
        c.user(name)
        c.pass_(pw)
        assert c.stat()[0] == 2
        assert [l.split()[1] for l in c.uidl()[1]] == uids[1:]
        c.quit()
    finally:
        c.close()


def test_poplib_stls(server, user):
    name, pw = user
    m = make_message("poplib-stls")
    server.deliver(addr(name), m)
    c = poplib.POP3(LOOPBACK, server.ports.pop3, timeout=30)
    try:
        caps = c.capa()
        assert "STLS" in caps and "IMPLEMENTATION" not in caps
        c.stls(context=server.tls_context())
        caps = c.capa()
        assert "STLS" not in caps and "USER" in caps
        c.user(name)
        c.pass_(pw)
        resp, lines, _ = c.retr(1)
        assert strip_trace(CRLF.join(lines) + CRLF) == m
        c.quit()
    finally:
        c.close()


# --------------------------------------------------------------------------
# LMTP
# --------------------------------------------------------------------------

def test_lmtp_unknown_user_and_multiple_recipients(server, make_user):
    (a, pa), (b, pb) = make_user("la"), make_user("lb")
    unknown = addr("nosuch" + os.urandom(3).hex())
    m = make_message("multi-rcpt")
    with server.lmtp() as l:
        assert l.cmd("MAIL FROM:<sender@example.org>").code == 250
        ra = l.cmd(f"RCPT TO:<{addr(a)}>")
        ru = l.cmd(f"RCPT TO:<{unknown}>")
        rb = l.cmd(f"RCPT TO:<{addr(b)}>")
        assert ra.code == 250 and rb.code == 250, (ra, rb)
        assert ru.code == 550 and ru.text.startswith("5.1.1"), f"unknown user: {ru}"
        assert l.cmd("DATA").code == 354
        l.ls.send(syslib.dot_stuff(m) + b".\r\n")
        replies = [l.reply(), l.reply()]
        assert [r.code for r in replies] == [250, 250], replies
        extra = l.ls.read_available(0.5)
        assert extra == b"", f"more replies than accepted recipients: {extra!r}"
        q = l.cmd("QUIT")
        assert q.code == 221
    for u, p in [(a, pa), (b, pb)]:
        assert server.fetch_all(u, p) == [m]
    # all recipients unknown: DATA must be refused
    with server.lmtp() as l:
        assert l.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert l.cmd(f"RCPT TO:<{unknown}>").code == 550
        assert l.cmd("DATA").code in (503, 554), "DATA accepted with no valid recipient"


def test_lmtp_oversize_552(server, user):
    name, pw = user
    with server.lmtp() as l:
        size_ext = [e for e in l.ext if e.startswith("SIZE")]
        if size_ext:
            assert size_ext[0].split()[1:] in ([str(MAX_MESSAGE)], []), size_ext
            assert l.cmd("MAIL FROM:<sender@example.org> SIZE=%d" % (MAX_MESSAGE * 3)).code == 552
            l.cmd("RSET")
        big = make_message("oversize", extra_body=(b"z" * 998 + CRLF) * (MAX_MESSAGE // 1000 + 50))
        assert len(big) > MAX_MESSAGE
        r = l.send_mail("sender@example.org", [addr(name)], big)
        assert r[addr(name)] == 552, f"oversize message: {r}"
    # just under the limit is accepted and intact
    ok = make_message("undersize", extra_body=(b"z" * 998 + CRLF) * (MAX_MESSAGE // 1000 - 30))
    assert len(ok) < MAX_MESSAGE
    assert server.deliver(addr(name), ok) == {addr(name): 250}
    assert server.fetch_all(name, pw) == [ok]


@pytest.mark.parametrize("sep", [b"\n.\n", b"\n.\r\n", b"\r\n.\n"], ids=["LF.LF", "LF.CRLF", "CRLF.LF"])
def test_lmtp_bare_lf_smuggling(server, make_user, sep):
    (rcpt, rpw), (victim, _) = make_user("sm"), make_user("vi")
    payload = (b"X-Test-Id: smuggle\r\nSubject: carrier\r\n\r\nhello" + sep +
               b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<" + addr(victim).encode() + b">\r\nDATA\r\n"
               b"Subject: smuggled\r\n\r\nevil payload")
    with server.lmtp() as l:
        assert l.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert l.cmd(f"RCPT TO:<{addr(rcpt)}>").code == 250
        assert l.cmd("DATA").code == 354
        l.ls.send(payload + b"\r\n.\r\n")
        first = l.reply()
        # docs/specifications.md (RFC 5321 section): a bare CR or LF refuses
        # the message with 550 5.6.0 for each recipient.
        assert first.code == 550 and first.text.startswith("5.6.0 "), f"end of DATA: {first}"
        l.ls.send(b"QUIT\r\n")
        extra = []
        for _ in range(10):
            r = l.reply()
            if r.code == 221:
                break
            extra.append(r)
        assert extra == [], f"bytes after a bare-LF dot were run as commands: {extra}"
    assert server.mailbox_stat(victim)[0] == 0, "smuggled message was delivered to the victim"
    assert server.fetch_all(rcpt, rpw) == [], "a message with a bare LF was stored"


# --------------------------------------------------------------------------
# user administration applies to a running server
# --------------------------------------------------------------------------

def test_user_passwd_disable_enable_live(server, user):
    name, pw = user
    m = make_message("useradmin")
    server.deliver(addr(name), m)
    new_pw = syslib.new_password()
    server.cli("user", "passwd", name, "--password-stdin", input=new_pw.encode() + b"\n")
    with server.pop3s() as p:
        p.cmd(f"USER {name}", expect_ok=None)
        p.cmd(f"PASS {pw}", expect_ok=False)
    with server.pop3s() as p:
        p.login(name, new_pw)
        p.quit()
    listed = server.cli("user", "list").stdout.decode()
    assert name in listed, f"`user list` does not show {name}: {listed!r}"
    assert pw not in listed and new_pw not in listed

    server.cli("user", "disable", name)
    with server.pop3s() as p:
        p.cmd(f"USER {name}", expect_ok=None)
        p.cmd(f"PASS {new_pw}", expect_ok=False)
    with server.lmtp() as l:
        assert l.cmd("MAIL FROM:<sender@example.org>").code == 250
        r = l.cmd(f"RCPT TO:<{addr(name)}>")
        assert 400 <= r.code < 600, f"delivery to a disabled user accepted: {r}"
    server.cli("user", "enable", name)
    assert server.fetch_all(name, new_pw) == [m]


# --------------------------------------------------------------------------
# SASL SCRAM-SHA-256 (RFC 5802, RFC 7677) with a stdlib client
# --------------------------------------------------------------------------

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def scram_first(p: syslib.Pop3, user: str, cnonce: str) -> tuple[str, dict[str, str]]:
    bare = f"n={user},r={cnonce}"
    r = p.cmd(f"AUTH SCRAM-SHA-256 {_b64(('n,,' + bare).encode())}", expect_ok=None)
    assert r.startswith("+ "), f"expected a SCRAM server-first challenge, got {r!r}"
    server_first = base64.b64decode(r[2:]).decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    assert attrs["r"].startswith(cnonce) and len(attrs["r"]) > len(cnonce), server_first
    assert int(attrs["i"]) >= 4096, f"SCRAM iteration count too low: {attrs['i']}"
    return bare, attrs


def scram_login(p: syslib.Pop3, user: str, password: str) -> str:
    cnonce = _b64(os.urandom(18))
    bare, a = scram_first(p, user, cnonce)
    server_first = f"r={a['r']},s={a['s']},i={a['i']}"
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(a["s"]), int(a["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={_b64(b'n,,')},r={a['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    sig = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(x ^ y for x, y in zip(client_key, sig))
    r = p.cmd(_b64(f"{without_proof},p={_b64(proof)}".encode()), expect_ok=None)
    if r.startswith("-ERR"):
        return r
    assert r.startswith("+ "), f"expected SCRAM server-final, got {r!r}"
    server_final = base64.b64decode(r[2:]).decode()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = _b64(hmac.new(server_key, auth_message, hashlib.sha256).digest())
    assert server_final == f"v={expected}", f"server signature does not verify: {server_final!r}"
    return p.cmd("", expect_ok=None)


def test_scram_sha256(server, user):
    name, pw = user
    with server.pop3s() as p:
        r = scram_login(p, name, pw)
        assert r.startswith("+OK"), r
        p.stat()
        p.quit()
    with server.pop3s() as p:
        wrong = scram_login(p, name, pw + "x")
        assert wrong.startswith("-ERR"), wrong
    ghost = "ghost" + os.urandom(3).hex()
    with server.pop3s() as p:
        unknown = scram_login(p, ghost, pw)
        assert unknown == wrong, f"unknown user distinguishable from wrong password: {unknown!r} vs {wrong!r}"
    # salts and iteration counts are stable per user name, also for unknown
    # users, so probing cannot tell real accounts from fake ones
    for who in (name, ghost):
        seen = []
        for _ in range(2):
            with server.pop3s() as p:
                _, a = scram_first(p, who, _b64(os.urandom(12)))
                seen.append((a["s"], a["i"]))
                p.cmd("*", expect_ok=False)
        assert seen[0] == seen[1], f"SCRAM salt/iterations for {who!r} change between attempts: {seen}"
