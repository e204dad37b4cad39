"""The connector forwarding to downstream servers: a private Dovecot upstream
(POP3S) -> POP3conneX -> a private Postfix (SMTP with STARTTLS, certificate
from the test CA, delivering into Maildirs) or a private Dovecot LMTP.

What is compared: what arrives downstream is the upstream copy (as
Dovecot's RETR serves it) preceded by the downstream's own trace headers and
exactly one Received header from POP3conneX. Postfix's cleanup(8) drops
Return-Path headers from incoming mail, so for Postfix the upstream copy is
compared without its Return-Path.

Refusals come from a Postfix access map: 450 must defer (the message stays
upstream and a later run delivers it), 550 must quarantine locally (the
upstream copy then goes per the delete policy). A downstream whose
certificate does not verify defers, and nothing is lost.

Needs root and the Debian packages postfix, dovecot-core, dovecot-lmtpd,
dovecot-pop3d, openssl.
"""

from __future__ import annotations

import re
import time

import pytest

import connectorlib as cl
import peers
import syslib
from syslib import make_message

TEST_TIMEOUT = 180
SERVER_SETTINGS = {("log", "format"): "json"}
QUARANTINE = "quarantine"
DOMAIN = "down.test"
ARRIVAL_WAIT = 60


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("wrong-ca"), "wrong")


@pytest.fixture(scope="module")
def upstream(ca):
    with peers.running("pop3connex-upstream-", peers.PrivateDovecot,
                       {"seed": syslib.new_password()}, pop3=True, cert=ca.issue("upstream"), ca=ca) as d:
        yield d


MAILBOXES = ["fwd", "fwd2", "busy", "gone", "tlsfail", "never"]


@pytest.fixture(scope="module")
def postfix(ca):
    peers.PrivatePostfix.check_installed()
    def make(root):
        return peers.PostfixDownstream(root, syslib.free_port(), DOMAIN)

    with peers.running("pop3connex-downstream-postfix-", make, MAILBOXES,
                       ca.issue("postfix", ("DNS:localhost", "IP:127.0.0.1"))) as pf:
        yield pf


@pytest.fixture(scope="module")
def lmtp_down(ca):
    with peers.running("pop3connex-downstream-lmtp-", peers.PrivateDovecot,
                       ["dave", "dora"], cert=ca.issue("lmtp-down"), ca=ca) as d:
        yield d


@pytest.fixture(scope="module")
def quarantine(module_server):
    pw = syslib.new_password()
    module_server.add_user(QUARANTINE, pw)
    return pw


def downstreams(ca, wrong_ca, postfix, lmtp_down) -> list[dict]:
    pf = {"protocol": "smtp", "host": "127.0.0.1", "port": postfix.smtp_port, "helo": "connector.test",
          "timeout_secs": 30}
    lm = {"protocol": "lmtp", "host": "127.0.0.1", "port": lmtp_down.port, "timeout_secs": 30}
    return [
        {"name": "pf-verify", **pf, "tls": "verify", "ca_file": str(ca.cert)},
        {"name": "pf-secure", **pf, "tls": "secure", "ca_file": str(ca.cert)},
        {"name": "pf-wrongca", **pf, "tls": "verify", "ca_file": str(wrong_ca.cert)},
        {"name": "lmtp-verify", **lm, "tls": "verify", "ca_file": str(ca.cert)},
        {"name": "lmtp-none", **lm, "tls": "none"},
    ]


@pytest.fixture
def fwd(module_server, server, upstream, postfix, lmtp_down, ca, wrong_ca, quarantine):
    """An upstream mailbox, and a way to configure the account forwarding it."""
    class Fwd:
        up_user = syslib.unique_name("upf")
        up_pw = upstream.add_user(up_user)
        acct = syslib.unique_name("fw")

        def fill(self, msgs):
            for m in msgs:
                upstream.deliver(f"{self.up_user}@upstream.test", m)
            return upstream.upstream(self.up_user)

        def configure(self, target: dict, delete: str = "after-delivery"):
            a = cl.account(self.acct, port=upstream.pop3s_port, user=self.up_user,
                           password=cl.secret_file(module_server, self.acct, self.up_pw),
                           ca_file=upstream.ca.cert, delete=delete, route={"deliver_to": target})
            cl.write_connector(module_server, [a], downstreams(ca, wrong_ca, postfix, lmtp_down),
                               retry_base_secs=10, retry_max_secs=20)

        def upstream_now(self):
            return upstream.upstream(self.up_user)

    cl.write_connector(module_server, [])  # a previous test may have left a broken block
    return Fwd()


# --------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------

_RETURN_PATH = re.compile(rb"(?im)^Return-Path:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def without_return_path(msg: bytes) -> bytes:
    head, sep, body = msg.partition(b"\r\n\r\n")
    head = _RETURN_PATH.sub(b"", head + b"\r\n")[:-2]
    return head + sep + body


def check_forwarded(arrived: bytes, original: bytes, downstream_received: int):
    """arrived = downstream trace headers + one Received from POP3conneX +
    original, exactly."""
    assert arrived.endswith(original), (f"{cl.message_id(original)}: the forwarded message is not the upstream "
                                        f"copy\narrived head: {arrived[:800]!r}\nupstream head: {original[:400]!r}")
    prefix = arrived[: len(arrived) - len(original)]
    found, rest = peers.split_trace(prefix)
    assert rest == b"", f"unexpected bytes before the original message: {rest[:500]!r}"
    received = [raw for name, raw in found if name == "received"]
    assert len(received) == downstream_received + 1, (
        f"expected {downstream_received} downstream Received header(s) and one from POP3conneX, got:\n"
        + "".join(r.decode(errors='replace') for r in received))
    assert found[-1][0] == "received", f"the last header before the original is not POP3conneX's Received: {found}"
    return found


def arrivals(get, count: int, what: str):
    return syslib.wait_until(lambda: len(get()) >= count and get(), ARRIVAL_WAIT, 0.2, what)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["pf-verify", "pf-secure"])
def test_forward_to_postfix(module_server, postfix, fwd, via):
    mailbox = "fwd" if via == "pf-verify" else "fwd2"
    before = len(postfix.messages(mailbox))
    msgs = [make_message(f"dsx-{via}-plain"), make_message(f"dsx-{via}-8bit", eight_bit=True),
            make_message(f"dsx-{via}-dots", extra_body=b".\r\n..\r\n.x\r\n")]
    ups = fwd.fill(msgs)
    fwd.configure({"forward": f"{mailbox}@{DOMAIN}", "via": via})
    c = cl.run_ok(module_server, fwd.acct, fetched=3, forwarded=3, delivered=0, quarantined=0, deferred=0)
    assert c["deleted"] == 3, c
    got = arrivals(lambda: postfix.messages(mailbox)[before:], 3, f"3 messages in Postfix mailbox {mailbox}")
    by_id = [cl.message_id(peers.split_trace(m)[1]) for m in got]
    for _, up in ups:
        mid = cl.message_id(up)
        arrived = next((m for m in got if m.endswith(without_return_path(up))), None)
        assert arrived is not None, f"{mid} did not arrive intact; arrived: {list(by_id)}\n{postfix.log()}"
        found = check_forwarded(arrived, without_return_path(up), downstream_received=1)
        pf_received = [raw for name, raw in found if name == "received"][0]
        assert b"postfix.test.invalid" in pf_received and b"TLS" in pf_received, \
            f"not received over TLS: {pf_received!r}"
    assert fwd.upstream_now() == [], "forwarded messages must be deleted upstream (after-delivery)"
    assert "Mail queue is empty" in postfix.queue()


def test_450_defers_and_a_later_run_delivers(module_server, postfix, fwd):
    ups = fwd.fill([make_message("dsx-450")])
    postfix.set_refusals({f"busy@{DOMAIN}": "450 4.2.1 mailbox busy, try later"})
    try:
        fwd.configure({"forward": f"busy@{DOMAIN}", "via": "pf-verify"})
        r = cl.run_once(module_server, fwd.acct)
        if r.rc == 0:
            c = r.counts(fwd.acct)
            assert (c["deferred"], c["forwarded"], c["deleted"]) == (1, 0, 0), r.describe()
        else:
            assert r.errors.get(fwd.acct, ("",))[0] == "downstream", r.describe()
        assert "connector_deferred" in r.event_names(), r.describe()
        assert fwd.upstream_now() == ups, "a deferred message must stay upstream"
        assert postfix.messages("busy") == []
    finally:
        postfix.set_refusals({})
    r = cl.run_once(module_server, fwd.acct)
    assert r.rc == 0, r.describe()
    c = r.counts(fwd.acct)
    assert (c["forwarded"], c["deleted"]) == (1, 1), r.describe()
    got = arrivals(lambda: postfix.messages("busy"), 1, "the deferred message at Postfix")
    assert len(got) == 1
    check_forwarded(got[0], without_return_path(ups[0][1]), downstream_received=1)
    assert fwd.upstream_now() == []


@pytest.mark.parametrize("delete", ["after-delivery", "never"])
def test_550_quarantines_locally(module_server, postfix, fwd, quarantine, delete):
    srv = module_server
    ups = fwd.fill([make_message(f"dsx-550-{delete}")])
    postfix.set_refusals({f"gone@{DOMAIN}": "550 5.1.1 no such mailbox here"})
    try:
        fwd.configure({"forward": f"gone@{DOMAIN}", "via": "pf-verify"}, delete=delete)
        qbefore = len(cl.local_messages(srv, QUARANTINE, quarantine))
        r = cl.run_once(srv, fwd.acct)
        assert r.rc == 0, r.describe()
        c = r.counts(fwd.acct)
        assert (c["fetched"], c["quarantined"], c["forwarded"]) == (1, 1, 0), r.describe()
        ev = r.event_names()
        assert "connector_refused" in ev or "connector_quarantined" in ev, r.describe()
        q = cl.local_messages(srv, QUARANTINE, quarantine)[qbefore:]
        assert len(q) == 1, f"expected one quarantined message, got {len(q)}"
        reason, rest = cl.unquarantine(q[0])
        assert rest == ups[0][1], "quarantined copy is not the upstream message plus one header"
        assert "550" in reason or "refused" in reason.lower() or "5.1.1" in reason, reason
        assert postfix.messages("gone") == []
        if delete == "after-delivery":
            assert fwd.upstream_now() == []
        else:
            assert fwd.upstream_now() == ups
            cl.run_ok(srv, fwd.acct, fetched=0, quarantined=0)
            assert len(cl.local_messages(srv, QUARANTINE, quarantine)) == qbefore + 1
    finally:
        postfix.set_refusals({})


@pytest.mark.parametrize("via", ["lmtp-verify", "lmtp-none"])
def test_forward_to_dovecot_lmtp(module_server, lmtp_down, fwd, via):
    mailbox = "dave" if via == "lmtp-verify" else "dora"
    before = len(lmtp_down.maildir_messages(mailbox))
    ups = fwd.fill([make_message(f"dsx-{via}-a", eight_bit=True), make_message(f"dsx-{via}-b")])
    fwd.configure({"forward": f"{mailbox}@{DOMAIN}", "via": via})
    cl.run_ok(module_server, fwd.acct, fetched=2, forwarded=2, deleted=2)
    got = arrivals(lambda: lmtp_down.maildir_messages(mailbox)[before:], 2, f"2 messages in Dovecot's {mailbox}")
    for _, up in ups:
        arrived = next((m for m in got if m.endswith(up)), None)
        assert arrived is not None, f"{cl.message_id(up)} did not arrive intact\n{lmtp_down.log()}"
        found = check_forwarded(arrived, up, downstream_received=1)
        dovecot_received = [raw for name, raw in found if name == "received"][0]
        if via == "lmtp-verify":  # Dovecot writes "with LMTPS" after STARTTLS
            assert b"with LMTPS" in dovecot_received, f"LMTP without STARTTLS: {dovecot_received!r}"
    assert fwd.upstream_now() == []


def test_downstream_tls_failure_defers_and_loses_nothing(module_server, postfix, fwd, quarantine):
    srv = module_server
    ups = fwd.fill([make_message("dsx-tlsfail")])
    fwd.configure({"forward": f"tlsfail@{DOMAIN}", "via": "pf-wrongca"})
    qbefore = len(cl.local_messages(srv, QUARANTINE, quarantine))
    r = cl.run_once(srv, fwd.acct)
    if r.rc == 0:
        c = r.counts(fwd.acct)
        assert (c["deferred"], c["forwarded"], c["quarantined"], c["deleted"]) == (1, 0, 0, 0), r.describe()
    else:
        assert r.errors.get(fwd.acct, ("",))[0] in ("downstream", "tls"), r.describe()
    assert fwd.upstream_now() == ups, "the upstream copy must stay when the downstream cannot be verified"
    assert len(cl.local_messages(srv, QUARANTINE, quarantine)) == qbefore, "a TLS failure is not a refusal"
    time.sleep(1)
    assert postfix.messages("tlsfail") == [], "mail went to a downstream whose certificate did not verify"
    # with the right CA the next run delivers it
    fwd.configure({"forward": f"tlsfail@{DOMAIN}", "via": "pf-verify"})
    cl.run_ok(srv, fwd.acct, forwarded=1, deleted=1)
    got = arrivals(lambda: postfix.messages("tlsfail"), 1, "the message at Postfix after the CA fix")
    check_forwarded(got[0], without_return_path(ups[0][1]), downstream_received=1)
