"""Postfix -> POP3conneX over LMTP, configured with docs/postfix-main.cf.snippet.

A private Postfix instance runs as the test harness: its own config, queue
and data directories under a temporary directory, smtpd on a free 127.0.0.1
port, every transport other than the snippet's LMTP one set to `error:` (it
never sends mail off the machine). Mail goes in over SMTP (smtplib), Postfix
delivers the snippet's domain to the module's POP3conneX over LMTP, and the
messages are read back over POP3S (poplib). What is compared: the stored
message minus the leading trace headers (Return-Path and Delivered-To from
POP3conneX, Received from Postfix) must be the submitted message byte for
byte.

Needs the Debian package `postfix` and root: Postfix's master runs as root
and its daemons as the mail_owner `postfix` that the package creates.
"""

from __future__ import annotations

import grp
import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import peers
import syslib
from conftest import REPO
from syslib import CRLF, LOOPBACK, make_message

TEST_TIMEOUT = 100
SNIPPET = REPO / "docs" / "postfix-main.cf.snippet"
SNIPPET_PORT = 2400          # the placeholder port written in the snippet
DELIVERY_WAIT = 60           # seconds, per wait for a message to arrive
ENVELOPE_SENDER = "sender@example.org"

# The harness part of main.cf (the snippet is appended after it): the shared private-instance
# settings of peers.py.
MAIN_CF = peers.POSTFIX_BASE_CF


TOOLS: dict[str, str] = {}


def tool(name: str) -> str:
    """Full path of a Postfix command (in /usr/sbin, which a non-root PATH
    may lack); fails the test with the package to install if missing."""
    if name not in TOOLS:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if not path:
            pytest.fail(f"`{name}` not found: Postfix is not installed. Install the Debian package `postfix` "
                        f"(scripts/test.sh lists it in DEBIAN_PACKAGES).", pytrace=False)
        TOOLS[name] = path
    return TOOLS[name]


def snippet_lines(lmtp_port: int) -> list[str]:
    """The snippet's setting lines, with its placeholder port replaced."""
    lines = [l for l in SNIPPET.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    placeholder = f"127.0.0.1:{SNIPPET_PORT}"
    assert sum(placeholder in l for l in lines) == 1, \
        f"{SNIPPET} must name the LMTP destination {placeholder} exactly once: {lines}"
    return [l.replace(placeholder, f"127.0.0.1:{lmtp_port}") for l in lines]


def snippet_setting(lines: list[str], name: str) -> str:
    for l in lines:
        k, _, v = l.partition("=")
        if k.strip() == name:
            return v.strip()
    raise AssertionError(f"{SNIPPET} does not set {name}")


class PrivatePostfix(peers.PrivatePostfix):
    """The shared private Postfix, configured from the documented snippet."""

    def configure(self, snippet: list[str], mailboxes: list[str]):
        self.write_config(MAIN_CF.format(root=self.root) + "\n# docs/postfix-main.cf.snippet\n"
                          + "\n".join(snippet) + "\n")
        # the snippet's map, as the operator would build it
        m = re.fullmatch(r"hash:(\S+)", self.postconf("-xh", "virtual_mailbox_maps").strip())
        assert m, "the snippet's virtual_mailbox_maps is expected to be one hash: table"
        table = Path(m.group(1))
        assert table.parent == self.conf, f"map {table} not under the private config directory"
        table.write_text("".join(f"{a} OK\n" for a in mailboxes))
        self.postmap(table)
        self.check()


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def accounts(module_server):
    """POP3conneX users for the module: name -> password."""
    names = {}
    for role in ["rcpt", "mixed", "sender"]:
        name, pw = syslib.unique_name(role), syslib.new_password()
        module_server.add_user(name, pw)
        names[role] = (name, pw)
    # listed in Postfix's map but unknown to POP3conneX (map out of date)
    names["ghost"] = (syslib.unique_name("ghost"), None)
    return names


@pytest.fixture(scope="module")
def postfix(module_server, accounts):
    for name in ["postfix", "postconf", "postmap", "postqueue"]:
        tool(name)
    if os.geteuid() != 0:
        pytest.fail("the Postfix test runs Postfix's master and must run as root", pytrace=False)
    for kind, name, lookup in [("user", "postfix", pwd.getpwnam), ("group", "postdrop", grp.getgrnam)]:
        try:
            lookup(name)
        except KeyError:
            pytest.fail(f"{kind} `{name}` missing: install the Debian package `postfix`", pytrace=False)
    snippet = snippet_lines(module_server.ports.lmtp)
    domain = snippet_setting(snippet, "virtual_mailbox_domains").split(",")[0].strip()
    # Postfix's unprivileged daemons must reach the queue: not under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix="pop3connex-postfix-", dir="/tmp"))
    os.chmod(root, 0o755)
    pf = PrivatePostfix(root, syslib.free_port(), domain)
    try:
        pf.configure(snippet, [f"{n}@{domain}" for n, _ in accounts.values()])
        pf.start()
        yield pf
    finally:
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def smtp_send(pf: PrivatePostfix, sender: str, rcpts: list[str], msg: bytes) -> dict:
    """Submits msg over SMTP; returns smtplib's refused-recipients dict."""
    with smtplib.SMTP(LOOPBACK, pf.smtp_port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("8bitmime"), "Postfix did not offer 8BITMIME"
        refused = s.sendmail(sender, rcpts, msg, mail_options=["BODY=8BITMIME"])
        s.quit()
    return refused


def wait_for_messages(srv: syslib.Server, pf: PrivatePostfix, user: str, count: int):
    """Bounded wait until user's POP3conneX mailbox holds `count` messages,
    flushing the Postfix queue now and then."""
    deadline = time.monotonic() + DELIVERY_WAIT
    next_flush = 0.0
    n = 0
    while time.monotonic() < deadline:
        n, _ = srv.mailbox_stat(user)
        if n >= count:
            return n
        if time.monotonic() >= next_flush:
            pf.flush()
            next_flush = time.monotonic() + 5
        time.sleep(0.2)
    pytest.fail(f"{user} has {n} of {count} messages after {DELIVERY_WAIT}s\nPostfix queue:\n{pf.queue()}\n"
                f"Postfix log:\n{pf.log()}\nPOP3conneX log:\n{srv.log_text()[-3000:]}", pytrace=False)


def poplib_fetch_all(srv: syslib.Server, user: str, password: str) -> list[bytes]:
    """All messages over POP3S with poplib (lines re-joined with CRLF)."""
    p = poplib.POP3_SSL(LOOPBACK, srv.ports.pop3s, context=srv.tls_context(), timeout=30)
    try:
        p.user(user)
        p.pass_(password)
        n, _ = p.stat()
        out = []
        for i in range(1, n + 1):
            resp, lines, octets = p.retr(i)
            assert resp.startswith(b"+OK"), resp
            out.append(b"".join(l + CRLF for l in lines))
        p.quit()
    finally:
        p.close()
    return out


def assert_queue_empty(pf: PrivatePostfix):
    q = pf.queue()
    assert "Mail queue is empty" in q, f"Postfix still holds mail:\n{q}\nlog:\n{pf.log()}"


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

def test_postfix_delivers_over_lmtp(module_server, postfix, accounts):
    srv, pf = module_server, postfix
    name, pw = accounts["rcpt"]
    rcpt = f"{name}@{pf.domain}"
    originals = [
        make_message("pf-plain", to=rcpt),
        # 8-bit text: UTF-8 and a Latin-1 byte; ends with a lone "." line
        make_message("pf-8bit", to=rcpt, eight_bit=True, extra_body=b"caf\xe9 cr\xe8me\r\n.\r\n"),
        # about 200 KB, with dot, "From " and blank lines all through
        make_message("pf-large", to=rcpt, body_lines=3000,
                     extra_body=b"".join(b".%d\r\nFrom line %d\r\n\r\n" % (i, i) for i in range(500))),
    ]
    assert len(originals[2]) > 150_000
    t0 = time.monotonic()
    for msg in originals:
        assert smtp_send(pf, ENVELOPE_SENDER, [rcpt], msg) == {}
    wait_for_messages(srv, pf, name, len(originals))
    delivered_in = time.monotonic() - t0

    got = poplib_fetch_all(srv, name, pw)
    assert len(got) == len(originals), f"expected {len(originals)} messages, POP3 has {len(got)}"
    by_id = {}
    for m in got:
        found, rest = syslib.trace_headers(m)
        names = [h for h, _ in found]
        assert "received" in names, f"no Received header from Postfix: {m[:600]!r}"
        assert any("postfix.test.invalid" in v and "Postfix" in v for h, v in found if h == "received"), found
        syslib.strip_trace(m, sender=ENVELOPE_SENDER, rcpt=rcpt)  # checks Return-Path, Delivered-To
        tid = syslib.header_value(rest, "X-Test-Id")
        assert tid and tid not in by_id, f"unexpected or duplicate message: {m[:400]!r}"
        by_id[tid] = rest
    for msg in originals:
        tid = syslib.header_value(msg, "X-Test-Id")
        assert tid in by_id, f"{tid} not delivered"
        assert by_id[tid] == msg, (f"{tid}: body differs after Postfix -> LMTP -> POP3\n"
                                   f"got head:  {by_id[tid][:400]!r}\nsent head: {msg[:400]!r}")
    assert_queue_empty(pf)
    assert delivered_in < DELIVERY_WAIT


def test_unknown_recipient_rejected_at_rcpt(module_server, postfix, accounts):
    srv, pf = module_server, postfix
    name, pw = accounts["mixed"]
    rcpt = f"{name}@{pf.domain}"
    unknown = f"{syslib.unique_name('nobody')}@{pf.domain}"
    # alone: the whole transaction is refused
    with pytest.raises(smtplib.SMTPRecipientsRefused) as ei:
        smtp_send(pf, ENVELOPE_SENDER, [unknown], make_message("pf-unknown-only", to=unknown))
    code, text = ei.value.recipients[unknown]
    assert code == 550, f"unknown recipient: expected 550, got {code} {text!r}"
    # with a known recipient: only the known one gets it, once
    msg = make_message("pf-mixed", to=rcpt)
    refused = smtp_send(pf, ENVELOPE_SENDER, [unknown, rcpt], msg)
    assert set(refused) == {unknown} and refused[unknown][0] == 550, refused
    wait_for_messages(srv, pf, name, 1)
    time.sleep(1)  # a duplicate would arrive right behind the first copy
    got = poplib_fetch_all(srv, name, pw)
    assert len(got) == 1, f"expected exactly one copy, got {len(got)}"
    assert syslib.strip_trace(got[0], sender=ENVELOPE_SENDER, rcpt=rcpt) == msg
    assert_queue_empty(pf)


def test_recipient_unknown_to_pop3connex_is_bounced(module_server, postfix, accounts):
    """A name in Postfix's map that POP3conneX does not know: POP3conneX's
    LMTP refuses it (5xx), Postfix bounces to the sender (here a mailbox of
    the same domain, so the bounce is observable) and does not retry."""
    srv, pf = module_server, postfix
    sname, spw = accounts["sender"]
    sender = f"{sname}@{pf.domain}"
    ghost = f"{accounts['ghost'][0]}@{pf.domain}"
    msg = make_message("pf-ghost", to=ghost)
    assert smtp_send(pf, sender, [ghost], msg) == {}, "Postfix must accept a recipient listed in its map"
    wait_for_messages(srv, pf, sname, 1)
    got = poplib_fetch_all(srv, sname, spw)
    assert len(got) == 1, f"expected one bounce, got {len(got)}"
    bounce = syslib.strip_trace(got[0], sender="", rcpt=sender)  # bounces have the null sender <>
    head = bounce.split(b"\r\n\r\n", 1)[0]
    assert re.search(rb"(?im)^From: .*MAILER-DAEMON", head), f"not a Postfix bounce: {bounce[:600]!r}"
    assert ghost.encode() in bounce, f"bounce does not name {ghost}: {bounce[:1500]!r}"
    assert re.search(rb"\b550[ -]5\.1\.1\b", bounce), f"bounce lacks POP3conneX's 550 5.1.1: {bounce[:2000]!r}"
    assert b"X-Test-Id: pf-ghost" in bounce, "bounce does not carry the original headers"
    assert_queue_empty(pf)
