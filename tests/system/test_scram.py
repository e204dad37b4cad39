"""SCRAM-SHA-256 with real, independent client implementations: mpop (GNU
SASL) and Python's scramp. Tampered proofs, wrong nonces, replays and the
downgrade flag must fail. (-PLUS with tls-exporter is covered in-process by
crates/pop3connex-core/tests/scram_session.rs: neither Debian's mpop nor
Python's ssl module can export TLS 1.3 keying material.)"""

from __future__ import annotations

import base64
import subprocess

import pytest
import scramp

import syslib
from conftest import require_tool

TEST_TIMEOUT = 120
SERVER_SETTINGS = {("auth", "failure_delay_ms"): 0, ("pop3", "max_auth_failures"): 20}


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def scram_session(server, user, pw, tamper=None, replay=None):
    """Runs AUTH SCRAM-SHA-256 with scramp; returns (final status, client-final sent)."""
    c = scramp.ScramClient(["SCRAM-SHA-256"], user, pw)
    with syslib.Pop3.connect(syslib.LOOPBACK, server.ports.pop3s, server.tls_context()) as p:
        r = p.cmd(f"AUTH SCRAM-SHA-256 {b64(c.get_client_first().encode())}", expect_ok=None)
        assert r.startswith("+ "), r
        c.set_server_first(unb64(r[2:]))
        final = replay or c.get_client_final()
        if tamper:
            final = tamper(final)
        r = p.cmd(b64(final.encode()), expect_ok=None)
        if not r.startswith("+ "):
            return r, final
        c.set_server_final(unb64(r[2:]))  # raises if the server's signature is wrong
        return p.cmd("", expect_ok=None), final


def test_scramp_login_and_failures(server, make_user):
    name, pw = make_user("scram")
    status, final = scram_session(server, name, pw)
    assert status.startswith("+OK"), status
    assert scram_session(server, name, pw + "x")[0] == "-ERR [AUTH] Authentication failed"
    assert scram_session(server, "nobody-" + name, pw)[0] == "-ERR [AUTH] Authentication failed"

    def flip_proof(f: str) -> str:
        head, proof = f.rsplit(",p=", 1)
        raw = bytearray(base64.b64decode(proof))
        raw[0] ^= 1
        return f"{head},p={b64(bytes(raw))}"

    assert scram_session(server, name, pw, tamper=flip_proof)[0].startswith("-ERR [AUTH]")

    def other_nonce(f: str) -> str:
        return f.replace(",r=", ",r=X", 1)

    assert scram_session(server, name, pw, tamper=other_nonce)[0].startswith("-ERR [AUTH]")
    # Replaying a client-final that worked: the new server nonce differs.
    assert scram_session(server, name, pw, replay=final)[0].startswith("-ERR [AUTH]")


def test_downgrade_flag_is_refused_where_plus_is_offered(server, make_user):
    name, pw = make_user("down")
    with syslib.Pop3.connect(syslib.LOOPBACK, server.ports.pop3s, server.tls_context()) as p:
        p.cmd("CAPA")
        caps = p.multiline_raw().decode()
        assert "SCRAM-SHA-256-PLUS" in caps, "TLS 1.3 connection offers -PLUS"
        r = p.cmd(f"AUTH SCRAM-SHA-256 {b64(f'y,,n={name},r=abcdef'.encode())}", expect_ok=None)
        assert r.startswith("-ERR [AUTH]"), r


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_mpop_scram_sha_256(server, make_user, tmp_path, mode):
    mpop = require_tool("mpop")
    name, pw = make_user("mpop")
    msg = (f"From: a@example.org\r\nTo: {name}@example.org\r\nSubject: scram {mode}\r\n\r\n"
           f"body line\r\n.dot line\r\n").encode()
    server.deliver([f"{name}@example.org"], msg)
    out = tmp_path / "out"
    out.mkdir()
    rc = tmp_path / "mpoprc"
    port = server.ports.pop3s if mode == "tls" else server.ports.pop3
    rc.write_text(
        "account test\nhost localhost\n"
        f"port {port}\ntls on\ntls_starttls {'off' if mode == 'tls' else 'on'}\n"
        f"tls_trust_file {server.ca}\nuser {name}\nauth scram-sha-256\npassword {pw}\n"
        f"delivery maildir {out}\nuidls_file {tmp_path / 'uidls'}\nkeep on\nreceived_header off\n")
    for sub in ("cur", "new", "tmp"):
        (out / sub).mkdir()
    rc.chmod(0o600)
    cp = subprocess.run([mpop, "-C", str(rc), "-a", "-d"], capture_output=True, timeout=60)
    log = cp.stdout.decode(errors="replace") + cp.stderr.decode(errors="replace")
    assert cp.returncode == 0, log
    assert "--> AUTH SCRAM-SHA-256" in log, log
    files = list((out / "new").iterdir())
    assert len(files) == 1, log
    got = files[0].read_bytes().replace(b"\n", b"\r\n")
    assert syslib.strip_trace(got, rcpt=None).endswith(msg), got
    assert 'mechanism="SCRAM-SHA-256"' in server.log_text()


def test_scram_locked_account_answers_like_wrong_proof(server_factory, make_user):
    """A correct SCRAM proof for a locked account gets no server-final: the
    reply is the one a wrong proof gets (checked with scramp, a client
    written independently of the server)."""
    srv = server_factory({("auth", "failure_delay_ms"): 0, ("abuse", "lockout_after_failures"): 3,
                          ("abuse", "ban_after_auth_failures"): 1000})
    name, pw = make_user("locked", srv=srv)
    # Failures from several addresses: the name is locked, no address banned.
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        with syslib.Pop3.connect(syslib.LOOPBACK, srv.ports.pop3s, srv.tls_context(), source=source) as p:
            p.cmd(f"USER {name}", expect_ok=None)
            p.cmd("PASS not-the-password", expect_ok=False)

    def reply_to_client_final(password: str) -> str:
        c = scramp.ScramClient(["SCRAM-SHA-256"], name, password)
        with syslib.Pop3.connect(syslib.LOOPBACK, srv.ports.pop3s, srv.tls_context(), source="127.0.0.5") as p:
            r = p.cmd(f"AUTH SCRAM-SHA-256 {b64(c.get_client_first().encode())}", expect_ok=None)
            assert r.startswith("+ "), r
            c.set_server_first(unb64(r[2:]))
            return p.cmd(b64(c.get_client_final().encode()), expect_ok=None)

    right, wrong = reply_to_client_final(pw), reply_to_client_final(pw + "x")
    assert right.startswith("-ERR [AUTH]"), f"no server-final for a locked account: {right!r}"
    assert right == wrong, f"a locked account's correct proof is distinguishable: {right!r} vs {wrong!r}"
