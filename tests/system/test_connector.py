"""The connector, fetching from a real upstream: a private Dovecot serving
POP3 with implicit TLS and STLS (certificate from a CA made by the test,
PLAIN and SCRAM-SHA-256, mailboxes filled over LMTP) into POP3conneX's
local store, read back over POP3S.

What is compared: every locally stored message is the upstream copy exactly
as Dovecot's RETR serves it (read with a raw POP3 client over TLS before the
run), byte for byte; quarantined messages are that plus one prepended
X-POP3conneX-Quarantine header.

Needs root and the Debian packages dovecot-core, dovecot-lmtpd,
dovecot-pop3d, openssl.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import time

import pytest

import connectorlib as cl
import peers
import syslib
from syslib import CRLF, make_message

TEST_TIMEOUT = 180
SERVER_SETTINGS = {("log", "format"): "json", ("auth", "failure_delay_ms"): 0}
QUARANTINE = "quarantine"


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def upstream(ca):
    root = peers.world_readable_tmpdir("pop3connex-upstream-")
    d = peers.PrivateDovecot(root)
    try:
        d.cert = ca.issue("upstream")
        d.configure({"seed": syslib.new_password()}, pop3=True, cert=d.cert, ca=ca,
                    mechanisms="plain scram-sha-256")
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def quarantine(module_server):
    pw = syslib.new_password()
    module_server.add_user(QUARANTINE, pw)
    return pw


@pytest.fixture
def box(upstream, module_server, server, quarantine):
    """A fresh upstream mailbox and a fresh local user."""
    class Box:
        up_user = syslib.unique_name("up")
        up_pw = upstream.add_user(up_user)
        local, local_pw = syslib.unique_name("lo"), syslib.new_password()
        acct = syslib.unique_name("acct")

        def fill(self, msgs):
            for m in msgs:
                upstream.deliver(f"{self.up_user}@upstream.test", m)
            return upstream.upstream(self.up_user)

        def account(self, **kw):
            kw.setdefault("port", upstream.pop3s_port if kw.get("tls", "implicit") == "implicit"
                          else upstream.pop3_port)
            kw.setdefault("password", cl.secret_file(module_server, self.acct, self.up_pw))
            kw.setdefault("ca_file", upstream.ca.cert)
            kw.setdefault("local", self.local)
            return cl.account(self.acct, user=self.up_user, **kw)

        def configure(self, **kw):
            cl.write_connector(module_server, [self.account(**kw)])

        def local_msgs(self):
            return cl.local_messages(module_server, self.local, self.local_pw)

    cl.write_connector(module_server, [])  # a previous test may have left a broken block
    b = Box()
    module_server.add_user(b.local, b.local_pw)
    return b


def corpus(tag: str) -> list[bytes]:
    """Messages that exercise transparency, 8-bit data, size and line ends."""
    big = b"".join(b"%07d %s\r\n" % (i, b"0123456789abcdef" * 4) for i in range(28_000))
    big += b".\r\n..dots at the start\r\nFrom mbox bait\r\n"
    msgs = [
        make_message(f"{tag}-plain"),
        make_message(f"{tag}-dots", extra_body=b".\r\n..\r\n...\r\n. space\r\n.\r\n"),
        make_message(f"{tag}-8bit", eight_bit=True, extra_body=b"caf\xe9 \xff\xfe raw latin-1\r\n"),
        make_message(f"{tag}-big", extra_body=big),
        make_message(f"{tag}-crlf", extra_body=(b"bare\rCR inside a line\r\n\r\n\r\n   \r\n\t\r\n"
                                                b"x" * 998 + b"\r\n" + b"line ending in CR\r\r\n"
                                                b"blank lines follow\r\n\r\n\r\n")),
    ]
    assert len(msgs[3]) > 2_000_000
    return msgs


def upstream_bytes(pairs) -> list[bytes]:
    return [m for _, m in pairs]


# --------------------------------------------------------------------------
# fetching and byte equality
# --------------------------------------------------------------------------

def test_fetch_exact_bytes_and_uidl_tracking(module_server, upstream, box):
    srv = module_server
    ups = box.fill(corpus("cx1"))
    assert len(ups) == 5
    box.configure(delete="never")
    c = cl.run_ok(srv, box.acct, fetched=5, delivered=5, forwarded=0, quarantined=0, deleted=0, deferred=0)
    assert c["octets"] >= sum(len(m) for m in upstream_bytes(ups)), c
    got = box.local_msgs()
    assert len(got) == 5, f"expected 5 local messages, got {len(got)}"
    for want, have in zip(upstream_bytes(ups), got):
        assert have == want, (f"{cl.message_id(want)}: local copy differs from Dovecot's RETR "
                              f"(len {len(have)} vs {len(want)})\nlocal head: {have[:300]!r}\n"
                              f"upstream head: {want[:300]!r}")
    # delete = never: upstream untouched, and the next run fetches nothing
    assert upstream.upstream(box.up_user) == ups
    cl.run_ok(srv, box.acct, fetched=0, delivered=0)
    assert len(box.local_msgs()) == 5
    # one new message: only it is fetched
    late = make_message("cx1-late")
    ups2 = box.fill([late])
    cl.run_ok(srv, box.acct, fetched=1, delivered=1)
    got = box.local_msgs()
    assert len(got) == 6 and got[-1] == ups2[-1][1]
    st = cl.connector(srv, "status", box.acct)
    assert st.rc == 0 and box.acct in st.stdout, st.describe()


@pytest.mark.parametrize("tls,auth,dovecot_method", [
    ("starttls", "scram-sha-256", "SCRAM-SHA-256"),
    ("implicit", "scram-sha-256", "SCRAM-SHA-256"),
    ("implicit", "plain", "PLAIN"),
    ("starttls", "plain", "PLAIN"),
    ("starttls", "user", "PLAIN"),
    ("implicit", "auto", "SCRAM-SHA-256"),
])
def test_tls_modes_and_auth_mechanisms(module_server, upstream, box, tls, auth, dovecot_method):
    ups = box.fill([make_message(f"cx-auth-{tls}-{auth}", eight_bit=True)])
    box.configure(tls=tls, auth=auth)
    cl.run_ok(module_server, box.acct, fetched=1, delivered=1)
    assert box.local_msgs() == upstream_bytes(ups)
    # Dovecot logs the mechanism (USER/PASS shows as PLAIN) and TLS
    log = (upstream.root / "dovecot.log").read_text(errors="replace")
    logins = [l for l in log.splitlines() if f"user=<{box.up_user}>" in l and "Login:" in l]
    assert logins, f"no Dovecot login line for {box.up_user}\n{upstream.log()}"
    assert f"method={dovecot_method}" in logins[-1], logins[-1]
    assert "TLS" in logins[-1], f"login without TLS: {logins[-1]}"


def test_env_secret_reference(module_server, upstream, box, monkeypatch):
    ups = box.fill([make_message("cx-env")])
    monkeypatch.setenv("CONNECTOR_TEST_UPSTREAM_PW", box.up_pw)
    box.configure(password="env:CONNECTOR_TEST_UPSTREAM_PW")
    cl.run_ok(module_server, box.acct, fetched=1, delivered=1)
    assert box.local_msgs() == upstream_bytes(ups)


# --------------------------------------------------------------------------
# delete policies
# --------------------------------------------------------------------------

def test_delete_after_delivery_empties_upstream(module_server, upstream, box):
    ups = box.fill([make_message(f"cx-ad-{i}", eight_bit=i == 1) for i in range(4)])
    box.configure(delete="after-delivery")
    cl.run_ok(module_server, box.acct, fetched=4, delivered=4, deleted=4)
    assert box.local_msgs() == upstream_bytes(ups)
    assert upstream.upstream(box.up_user) == [], "upstream copies not deleted after delivery"
    cl.run_ok(module_server, box.acct, fetched=0)


def test_delete_after_days_keeps_upstream_for_now(module_server, upstream, box):
    ups = box.fill([make_message(f"cx-days-{i}") for i in range(3)])
    box.configure(delete="after-days", delete_after_days=2)
    cl.run_ok(module_server, box.acct, fetched=3, delivered=3, deleted=0)
    assert box.local_msgs() == upstream_bytes(ups)
    assert upstream.upstream(box.up_user) == ups, "after-days deleted upstream copies early"
    cl.run_ok(module_server, box.acct, fetched=0, deleted=0)
    assert len(box.local_msgs()) == 3


def test_resync_marks_everything_seen(module_server, upstream, box):
    box.fill([make_message(f"cx-resync-{i}") for i in range(3)])
    box.configure()
    r = cl.connector(module_server, "resync", box.acct)
    assert r.rc == 0, r.describe()
    cl.run_ok(module_server, box.acct, fetched=0, delivered=0)
    assert box.local_msgs() == []
    assert len(upstream.upstream(box.up_user)) == 3, "resync must not delete or download"
    ups = box.fill([make_message("cx-resync-new")])
    cl.run_ok(module_server, box.acct, fetched=1, delivered=1)
    assert box.local_msgs() == [ups[-1][1]]


# --------------------------------------------------------------------------
# failures: nothing fetched
# --------------------------------------------------------------------------

@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_wrong_ca_is_a_tls_error(module_server, upstream, box, tmp_path, tls):
    ups = box.fill([make_message(f"cx-wrongca-{tls}")])
    other = peers.TestCA(tmp_path / "other", "other")
    box.configure(tls=tls, ca_file=other.cert)
    cl.run_fails(module_server, box.acct, ("tls",))
    assert box.local_msgs() == []
    assert upstream.upstream(box.up_user) == ups
    assert module_server.alive()


def test_wrong_password_is_an_auth_error(module_server, upstream, box):
    ups = box.fill([make_message("cx-wrongpw")])
    box.configure(password=cl.secret_file(module_server, box.acct + "-bad", "not-the-password"))
    r = cl.run_fails(module_server, box.acct, ("auth",))
    assert "not-the-password" not in r.stdout + r.stderr, "the password reached the output"
    assert box.local_msgs() == []
    assert upstream.upstream(box.up_user) == ups
    assert "connector_upstream_error" in r.event_names(), r.describe()


@pytest.mark.parametrize("pin", ["right", "wrong"])
def test_spki_pins(module_server, upstream, box, pin):
    ups = box.fill([make_message(f"cx-pin-{pin}")])
    right = peers.TestCA.spki_pin(upstream.cert[0])
    wrong = "sha256/" + base64.b64encode(hashlib.sha256(right.encode()).digest()).decode()
    box.configure(spki_pins=[right] if pin == "right" else [wrong])
    if pin == "right":
        cl.run_ok(module_server, box.acct, fetched=1, delivered=1)
        assert box.local_msgs() == upstream_bytes(ups)
    else:
        cl.run_fails(module_server, box.acct, ("tls",))
        assert box.local_msgs() == []


def test_plaintext_only_port_is_refused(module_server, upstream, box):
    """tls = "implicit" against the STLS port: the TLS handshake fails."""
    box.fill([make_message("cx-plainport")])
    box.configure(tls="implicit", port=upstream.pop3_port)
    cl.run_fails(module_server, box.acct, ("tls", "protocol"))
    assert box.local_msgs() == []


# --------------------------------------------------------------------------
# size limits
# --------------------------------------------------------------------------

def small_message(tag: str) -> bytes:
    return (b"From: a@example.org\r\nMessage-ID: <" + tag.encode() + b"@test.invalid>\r\nSubject: s\r\n\r\nhi\r\n")


@pytest.mark.parametrize("policy", ["skip", "delete"])
def test_oversize(module_server, upstream, box, policy):
    big = make_message(f"cx-oversize-{policy}", body_lines=80)
    assert len(big) > 4096
    ups = box.fill([small_message(f"cx-small-{policy}"), big])
    assert len(ups[0][1]) < 1024, len(ups[0][1])
    box.configure(max_message_size=1024, oversize=policy)
    r = cl.run_once(module_server, box.acct)
    assert r.rc == 0, r.describe()
    c = r.counts(box.acct)
    assert c["fetched"] == 1 and c["delivered"] == 1 and c["skipped"] == 1, r.describe()
    assert "connector_oversize" in r.event_names(), r.describe()
    assert box.local_msgs() == [ups[0][1]]
    left = upstream.upstream(box.up_user)
    if policy == "skip":
        assert ups[1] in left, "oversize = skip must leave the message upstream"
        r2 = cl.run_once(module_server, box.acct)
        assert r2.rc == 0 and r2.counts(box.acct)["fetched"] == 0, r2.describe()
        assert box.local_msgs() == [ups[0][1]]
    else:
        assert ups[1] not in left, "oversize = delete must delete the message upstream"
        assert "connector_deleted" in r.event_names() or c["deleted"] >= 1, r.describe()


def test_max_messages_per_run(module_server, upstream, box):
    ups = box.fill([make_message(f"cx-max-{i}") for i in range(5)])
    box.configure(max_messages_per_run=2)
    cl.run_ok(module_server, box.acct, fetched=2)
    cl.run_ok(module_server, box.acct, fetched=2)
    cl.run_ok(module_server, box.acct, fetched=1)
    assert box.local_msgs() == upstream_bytes(ups)


# --------------------------------------------------------------------------
# routing, quarantine, duplicates, loops
# --------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["Delivered-To", "X-Original-To"])
def test_catch_all_routing(module_server, upstream, box, quarantine, header):
    srv = module_server
    l2, l2_pw = syslib.unique_name("wild"), syslib.new_password()
    srv.add_user(l2, l2_pw)
    bob, dan = syslib.unique_name("bob"), syslib.unique_name("dan")
    rcpts = {"bob": f"{bob}@corp.test", "wild": f"{l2}@sales.test", "dan": f"{dan}@elsewhere.test"}
    upstream.add_aliases({local_part: box.up_user for local_part in (bob, l2, dan)})
    sent = {}
    for key, rcpt in rcpts.items():
        tag = f"cx-route-{header}-{key}"
        if header == "X-Original-To":
            # as Postfix's local/virtual delivery writes it; Dovecot's own
            # Delivered-To (the catch-all mailbox) must not be used
            msg = b"X-Original-To: " + rcpt.encode() + CRLF + make_message(tag)
            upstream.deliver(f"{box.up_user}@upstream.test", msg)
        else:
            msg = make_message(tag)
            upstream.deliver(rcpt, msg)  # Dovecot writes Delivered-To: rcpt
        sent[key] = msg
    ups = {cl.message_id(m): m for _, m in upstream.upstream(box.up_user)}
    assert len(ups) == 3
    route = {"envelope_header": header,
             "addresses": {rcpts["bob"]: {"local": box.local}},
             "domains": {"sales.test": {"local": "*"}}}
    cl.write_connector(srv, [box.account(local=None, route=route, delete="after-delivery")])
    qbefore = len(cl.local_messages(srv, QUARANTINE, quarantine))
    r = cl.run_once(srv, box.acct)
    assert r.rc == 0, r.describe()
    c = r.counts(box.acct)
    assert (c["fetched"], c["delivered"], c["quarantined"]) == (3, 2, 1), r.describe()

    def upstream_copy(key):
        return ups[cl.message_id(sent[key])]
    assert box.local_msgs() == [upstream_copy("bob")]
    assert cl.local_messages(srv, l2, l2_pw) == [upstream_copy("wild")]
    q = cl.local_messages(srv, QUARANTINE, quarantine)[qbefore:]
    assert len(q) == 1, f"expected one quarantined message, got {len(q)}"
    reason, rest = cl.unquarantine(q[0])
    assert rest == upstream_copy("dan") and reason, q[0][:400]
    assert "connector_quarantined" in r.event_names(), r.describe()
    # quarantine counts as delivered: the upstream copies are gone
    assert upstream.upstream(box.up_user) == []


def test_duplicate_is_delivered_once(module_server, upstream, box):
    msg = make_message("cx-dup")
    ups = box.fill([msg, msg])
    assert len(ups) == 2 and cl.message_id(ups[0][1]) == cl.message_id(ups[1][1])
    box.configure(delete="after-delivery")
    r = cl.run_once(module_server, box.acct)
    assert r.rc == 0, r.describe()
    c = r.counts(box.acct)
    assert (c["fetched"], c["delivered"], c["duplicates"]) == (2, 1, 1), r.describe()
    got = box.local_msgs()
    assert len(got) == 1 and got[0] == ups[0][1]
    assert "connector_duplicate" in r.event_names(), r.describe()
    assert upstream.upstream(box.up_user) == [], "a duplicate is handled: its upstream copy goes too"


def test_loop_goes_to_quarantine(module_server, upstream, box, quarantine):
    srv = module_server
    hops = b"".join(b"Received: from hop%d.example.org by hop%d.example.org; Mon, 1 Jan 2024 00:00:%02d +0000\r\n"
                    % (i, i + 1, i) for i in range(12))
    msg = hops + make_message("cx-loop")
    ups = box.fill([msg, make_message("cx-noloop")])
    cl.write_connector(srv, [box.account()], max_hops=10)
    qbefore = len(cl.local_messages(srv, QUARANTINE, quarantine))
    r = cl.run_once(srv, box.acct)
    assert r.rc == 0, r.describe()
    c = r.counts(box.acct)
    assert (c["fetched"], c["delivered"], c["quarantined"]) == (2, 1, 1), r.describe()
    assert box.local_msgs() == [ups[1][1]]
    q = cl.local_messages(srv, QUARANTINE, quarantine)[qbefore:]
    assert len(q) == 1
    reason, rest = cl.unquarantine(q[0])
    assert rest == ups[0][1], "quarantined copy is not the upstream message plus one header"
    assert "connector_loop" in r.event_names(), r.describe()


# --------------------------------------------------------------------------
# CLI management and the schedule inside `serve`
# --------------------------------------------------------------------------

def test_add_list_show_remove(module_server, upstream, box, tmp_path):
    srv = module_server
    cl.write_connector(srv, [])
    ups = box.fill([make_message("cx-cli")])
    acct = box.account()
    path = tmp_path / "account.toml"
    path.write_text("".join(f"{k} = {cl.toml_inline(v)}\n" for k, v in acct.items()))
    r = cl.connector(srv, "add", "--file", str(path))
    assert r.rc == 0, r.describe()
    r = cl.connector(srv, "list")
    assert r.rc == 0 and box.acct in r.stdout, r.describe()
    r = cl.connector(srv, "show", box.acct)
    assert r.rc == 0 and box.up_user in r.stdout, r.describe()
    assert box.up_pw not in r.stdout + r.stderr, "`connector show` printed the password"
    cl.run_ok(srv, box.acct, fetched=1, delivered=1)
    assert box.local_msgs() == upstream_bytes(ups)
    r = cl.connector(srv, "add", "--file", str(path))
    assert r.rc != 0, f"adding the same account twice must fail\n{r.describe()}"
    r = cl.connector(srv, "remove", box.acct)
    assert r.rc == 0, r.describe()
    r = cl.connector(srv, "list")
    assert r.rc == 0 and box.acct not in r.stdout, r.describe()


def test_serve_runs_the_schedule(server_factory, upstream):
    srv = server_factory({("log", "format"): "json"}, start=False)
    local, local_pw = syslib.unique_name("sch"), syslib.new_password()
    srv.add_user(local, local_pw)
    up_user = syslib.unique_name("upsch")
    up_pw = upstream.add_user(up_user)
    upstream.deliver(f"{up_user}@upstream.test", make_message("cx-schedule"))
    ups = upstream.upstream(up_user)
    acct = cl.account("sched", port=upstream.pop3s_port, user=up_user,
                      password=cl.secret_file(srv, "sched", up_pw), ca_file=upstream.ca.cert, local=local,
                      interval_secs=30, delete="after-delivery")
    cl.write_connector(srv, [acct], enabled=True, jitter_percent=0)
    srv.start()
    t0 = time.monotonic()
    got = syslib.wait_until(lambda: cl.local_messages(srv, local, local_pw), 75, 0.5,
                            "the scheduled fetch inside `serve`")
    assert got == upstream_bytes(ups), f"after {time.monotonic() - t0:.0f}s"
    syslib.wait_until(lambda: upstream.upstream(up_user) == [], 30, 0.5, "the upstream delete")
    assert "connector_fetched" in [e.get("event") for e in cl.connector_events(srv.log_text())]
