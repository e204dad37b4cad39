"""The connector against a hostile upstream: a scripted POP3 server (Python,
TLS with a certificate from the test CA) that misbehaves in one way per
test. Every `connector run-once` must exit 1 within a bounded time with
`account=NAME error=KIND: message`, the POP3conneX server keeps running, no
partial message is delivered (the local mailbox is unchanged, checked over
POP3S), nothing is deleted upstream, and no credentials are sent where TLS
was not established.

Needs openssl (the test CA); no other peer.
"""

from __future__ import annotations

import pytest

import connectorlib as cl
import peers
import syslib
from syslib import make_message

TEST_TIMEOUT = 120
SERVER_SETTINGS = {("log", "format"): "json"}

# fault -> (upstream TLS mode, acceptable error kinds, extra account settings)
FAULTS = {
    "oversized-status": ("implicit", ("protocol", "too_large"), {}),
    "endless-line": ("implicit", ("protocol", "too_large"), {}),
    "retr-longer": ("implicit", ("too_large", "protocol"), {"max_message_size": 65536}),
    "stls-err": ("starttls", ("tls", "protocol"), {}),
    "stls-inject": ("starttls", ("tls", "protocol"), {}),
    "invalid-status": ("implicit", ("protocol",), {}),
    "disconnect-retr": ("implicit", ("protocol", "io", "connect"), {}),
    "slow-drip": ("implicit", ("timeout",), {"timeout_secs": 5}),
}
MAX_SECONDS = 45  # the slowest case: a 5 s response timeout against a 1 byte/s drip


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def cert(ca):
    return ca.issue("hostile")


@pytest.fixture
def local(module_server, server):
    cl.write_connector(module_server, [])  # a previous test may have left a broken block
    name, pw = syslib.unique_name("ho"), syslib.new_password()
    module_server.add_user(name, pw)
    return name, pw


def configure(srv, ca, fake, local_user, tls, **kw):
    acct = syslib.unique_name("hostile")
    a = cl.account(acct, port=fake.port, tls=tls, user="victim",
                   password=cl.secret_file(srv, acct, "secret-" + acct), ca_file=ca.cert, local=local_user,
                   delete="after-delivery", **kw)
    cl.write_connector(srv, [a])
    return acct


def messages(tag: str) -> list[bytes]:
    return [make_message(f"{tag}-1", body_lines=30), make_message(f"{tag}-2", eight_bit=True)]


def test_control_the_scripted_server_is_fetched_normally(module_server, ca, cert, local):
    """Without a fault the scripted server is an ordinary upstream."""
    msgs = messages("ho-ok")
    with peers.ScriptedPop3(cert, msgs, "none", implicit=True) as fake:
        acct = configure(module_server, ca, fake, local[0], "implicit")
        cl.run_ok(module_server, acct, fetched=2, delivered=2, deleted=2)
        assert not fake.errors, fake.errors
    assert cl.local_messages(module_server, *local) == msgs


@pytest.mark.parametrize("fault", list(FAULTS))
def test_hostile_upstream(module_server, ca, cert, local, fault):
    srv = module_server
    tls, kinds, extra = FAULTS[fault]
    before = cl.local_messages(srv, *local)
    stat_before = srv.mailbox_stat(local[0])
    with peers.ScriptedPop3(cert, messages(f"ho-{fault}"), fault, implicit=tls == "implicit") as fake:
        acct = configure(srv, ca, fake, local[0], tls, **extra)
        r = cl.run_fails(srv, acct, kinds, timeout=90)
        assert r.seconds < MAX_SECONDS, f"run-once took {r.seconds:.0f}s\n{r.describe()}"
        commands = [c.strip().split(b" ")[0].upper() for c in fake.commands]
        assert not fake.errors, f"scripted server failed: {fake.errors}"
    assert srv.alive(), "the POP3conneX server died"
    assert srv.mailbox_stat(local[0]) == stat_before, "the local mailbox changed"
    assert cl.local_messages(srv, *local) == before, "a partial message was delivered"
    assert b"DELE" not in commands, f"the connector deleted upstream although nothing was delivered: {commands}"
    if fault in ("stls-err", "stls-inject"):
        # after a failed or tampered STLS no login may be attempted
        assert not {b"USER", b"PASS", b"AUTH"} & set(commands), f"credentials sent: {fake.commands}"
    assert "connector_upstream_error" in r.event_names(), r.describe()
    secret = "secret-" + acct
    assert secret not in r.stdout + r.stderr, "the password reached the output"
