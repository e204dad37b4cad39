"""The connector tests' peers, checked with Python's own clients (no
POP3conneX involved): if one of these fails, the connector tests' failures
say nothing about the connector.

Needs root and the Debian packages dovecot-core, dovecot-lmtpd,
dovecot-pop3d, postfix, openssl; Python: scramp, pyjwt[crypto].
"""

from __future__ import annotations

import json
import poplib
import shutil
import socket
import smtplib
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest

import peers
import syslib
from syslib import CRLF, LOOPBACK, make_message

TEST_TIMEOUT = 90


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def dovecot(ca):
    with peers.running("pop3connex-peer-dovecot-", peers.PrivateDovecot,
                       {"alice": syslib.new_password(), "catchall": syslib.new_password()}, pop3=True,
                       cert=ca.issue("dovecot"), ca=ca, mechanisms="plain scram-sha-256",
                       aliases={"bob": "catchall", "carol": "catchall"}) as d:
        yield d


def test_dovecot_upstream_serves_lmtp_mail_over_pop3s_and_stls(dovecot, ca):
    msg = make_message("peer-1", eight_bit=True, extra_body=b".\r\n..\r\nbare\rcr\r\n")
    dovecot.deliver("alice@upstream.test", msg)
    got = dovecot.upstream("alice")
    assert len(got) == 1 and got[0][1].endswith(msg), got
    with dovecot.pop3("alice", implicit=False) as p:
        assert p.tls
        assert p.stat()[0] == 1
        p.quit()
    # poplib, implicit TLS, verified against the test CA
    p = poplib.POP3_SSL(LOOPBACK, dovecot.pop3s_port, context=ca.client_context(), timeout=30)
    try:
        p.user("alice")
        p.pass_(dovecot.passwords["alice"])
        assert p.stat()[0] == 1
        p.quit()
    finally:
        p.close()
    dovecot.clear("alice")
    assert dovecot.upstream("alice") == []


def test_dovecot_offers_scram_sha_256_and_it_works(dovecot):
    scramp = pytest.importorskip("scramp")
    with syslib.Pop3.connect(LOOPBACK, dovecot.pop3s_port, dovecot.ca.client_context()) as p:
        capa = p.capa()
        assert any("SCRAM-SHA-256" in c for c in capa if c.startswith("SASL")), capa
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", dovecot.passwords["alice"])
        import base64
        s = p.cmd("AUTH SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode()).decode(),
                  expect_ok=None)
        assert s.startswith("+ "), s
        client.set_server_first(base64.b64decode(s[2:]).decode())
        s = p.cmd(base64.b64encode(client.get_client_final().encode()).decode(), expect_ok=None)
        if s.startswith("+ "):
            client.set_server_final(base64.b64decode(s[2:]).decode())
            s = p.cmd("", expect_ok=None)
        assert s.startswith("+OK"), s
        p.quit()


def test_dovecot_catch_all_and_wrong_ca(dovecot, tmp_path):
    for rc in ["bob@corp.test", "carol@corp.test"]:  # one at a time: Dovecot then adds Delivered-To
        dovecot.deliver(rc, make_message("peer-ca-" + rc[:3]))
    got = dovecot.upstream("catchall")
    assert len(got) == 2
    assert {syslib.header_value(m, "Delivered-To") for _, m in got} == {"bob@corp.test", "carol@corp.test"}
    dovecot.clear("catchall")
    other = peers.TestCA(tmp_path / "other", "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        syslib.Pop3.connect(LOOPBACK, dovecot.pop3s_port, other.client_context())


def test_dovecot_lmtp_downstream_with_starttls(ca):
    root = peers.world_readable_tmpdir("pop3connex-peer-lmtp-")
    d = peers.PrivateDovecot(root)
    try:
        d.configure(["dave"], cert=ca.issue("lmtp"), ca=ca)
        d.start()
        msg = make_message("peer-lmtp", eight_bit=True)
        with smtplib.LMTP(LOOPBACK, d.port, timeout=30) as l:
            l.ehlo("client.test")
            assert l.has_extn("starttls"), l.esmtp_features
            l.starttls(context=ca.client_context())
            l.ehlo("client.test")
            assert l.sendmail("sender@example.org", ["dave@down.test"], msg) == {}
        got = d.maildir_messages("dave")
        assert len(got) == 1 and got[0].endswith(msg)
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_downstream_tls_delivery_and_refusals(ca):
    root = peers.world_readable_tmpdir("pop3connex-peer-postfix-")
    pf = peers.PostfixDownstream(root, syslib.free_port(), "down.test")
    try:
        pf.configure(["erin", "busy", "gone"], ca.issue("postfix", ("DNS:localhost", "IP:127.0.0.1")))
        pf.start()
        pf.set_refusals({"busy@down.test": "450 4.2.1 mailbox busy", "gone@down.test": "550 5.1.1 gone"})
        msg = make_message("peer-pf", eight_bit=True)
        with smtplib.SMTP(LOOPBACK, pf.smtp_port, local_hostname="client.test", timeout=30) as s:
            s.ehlo()
            s.starttls(context=ca.client_context())
            s.ehlo()
            refused = s.sendmail("sender@example.org", ["erin@down.test", "busy@down.test", "gone@down.test"],
                                 msg, mail_options=["BODY=8BITMIME"])
            assert {a: c for a, (c, _) in refused.items()} == {"busy@down.test": 450, "gone@down.test": 550}
        got = syslib.wait_until(lambda: pf.messages("erin"), 30, 0.2, "Postfix delivery to erin")
        assert len(got) == 1 and got[0].endswith(msg), got
        found, rest = peers.split_trace(got[0])
        assert rest == msg and any(h == "received" and b"TLS" in v for h, v in found), found
        pf.set_refusals({})
        with smtplib.SMTP(LOOPBACK, pf.smtp_port, local_hostname="client.test", timeout=30) as s:
            assert s.sendmail("sender@example.org", ["busy@down.test"], msg) == {}
        syslib.wait_until(lambda: pf.messages("busy"), 30, 0.2, "Postfix delivery to busy")
    finally:
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("fault", ["none", "stls-inject", "slow-drip"])
def test_scripted_pop3(ca, fault):
    msg = make_message("peer-scripted")
    with peers.ScriptedPop3(ca.issue("fake"), [msg], fault=fault, implicit=fault == "none") as fake:
        p = syslib.Pop3.connect(LOOPBACK, fake.port, ca.client_context() if fault == "none" else None, timeout=10)
        with p:
            if fault == "stls-inject":
                with pytest.raises(AssertionError, match="after STLS"):
                    p.stls(ca.client_context())
                return
            if fault == "slow-drip":
                p.stls(ca.client_context())
                p.login("x", "y")
                p.send(b"RETR 1\r\n")
                assert p.ls.read_available(3) in (b"+", b"+O")
                return
            p.login("x", "y")
            assert p.uidl() == {1: "scripted-0"}
            assert p.retr(1) == msg
            p.quit()
        assert not fake.errors


def test_token_endpoint(ca):
    tokens = iter(["tok-1", "tok-2"])
    ep = peers.TokenEndpoint(ca.issue("idp"), "cid", "rt-initial", lambda: next(tokens))
    try:
        def post(rt):
            data = urllib.parse.urlencode({"grant_type": "refresh_token", "refresh_token": rt,
                                           "client_id": "cid"}).encode()
            req = urllib.request.Request(ep.url, data=data)
            with urllib.request.urlopen(req, context=ca.client_context(), timeout=10) as r:
                return json.loads(r.read())
        doc = post("rt-initial")
        assert doc["access_token"] == "tok-1" and doc["refresh_token"] == ep.refresh_token != "rt-initial"
        with pytest.raises(urllib.error.HTTPError) as ei:
            post("rt-initial")
        assert ei.value.code == 400
        assert post(doc["refresh_token"])["access_token"] == "tok-2"
    finally:
        ep.stop()


def test_crlf_helper():
    assert peers.crlf(b"a\nb\r\n") == b"a\r\nb\r\n" and CRLF == b"\r\n"


def test_dovecot_users_and_aliases_added_later(dovecot):
    pw = dovecot.add_user("late")
    dovecot.add_aliases({"lateralias": "late"})
    dovecot.deliver("lateralias@corp.test", make_message("peer-late"))
    got = dovecot.upstream("late")
    assert len(got) == 1 and syslib.header_value(got[0][1], "Delivered-To") == "lateralias@corp.test"
    assert dovecot.passwords["late"] == pw


# --------------------------------------------------------------------------
# the harness: a port taken between "found free" and the daemon's bind
# --------------------------------------------------------------------------

def squat(port: int) -> socket.socket:
    """Another process's listener on `port` (this test process's)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, port))
    s.listen(1)
    return s


def test_dovecot_start_moves_off_a_taken_port(ca):
    root = peers.world_readable_tmpdir("pop3connex-peer-dovecot-port-")
    d = peers.PrivateDovecot(root)
    squatter = None
    try:
        d.configure({"alice": syslib.new_password()}, pop3=True, cert=ca.issue("dovecot"), ca=ca)
        taken = d.pop3s_port
        squatter = squat(taken)
        d.start()
        assert d.pop3s_port != taken, "Dovecot claims a port another process listens on"
        for port in (d.lmtp_port, d.pop3_port, d.pop3s_port):
            assert syslib.listener_owned_by(d.master_pid(), port), port
        with d.pop3("alice") as p:
            assert p.stat()[0] == 0
            p.quit()
    finally:
        if squatter:
            squatter.close()
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_start_moves_off_a_taken_port(ca):
    root = peers.world_readable_tmpdir("pop3connex-peer-postfix-port-")
    taken = syslib.free_port()
    squatter = squat(taken)
    pf = peers.PostfixDownstream(root, taken, "down.test")
    try:
        pf.configure(["erin"], ca.issue("postfix", ("DNS:localhost", "IP:127.0.0.1")))
        pf.start()
        assert pf.smtp_port != taken, "Postfix claims a port another process listens on"
        assert syslib.listener_owned_by(pf.master_pid(), pf.smtp_port)
        with smtplib.SMTP(LOOPBACK, pf.smtp_port, local_hostname="client.test", timeout=30) as s:
            assert s.ehlo()[0] == 250
    finally:
        squatter.close()
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)
