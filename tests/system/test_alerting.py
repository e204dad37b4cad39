"""Alert routing. Webhooks ([[alerts.webhook]]): a receiver written here,
HTTPS with a certificate from a throw-away CA, gets each alert as JSON and
checks its HMAC-SHA256 signature the way an operator's receiver would. It
answers the first delivery with 503: the same delivery comes again (same
delivery id, next attempt). A second webhook points at a closed port: its
failure is itself an alert (`alert_undeliverable`), which reaches the first
webhook. E-mail ([[alerts.email]]): a real Postfix takes the alert mail
over STARTTLS, verified against the test CA, and delivers it to a
Maildir."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import signal
import ssl
import threading
import time

import email
import email.policy

import pytest

import peers
import syslib
from peers import TestCA, server_context

SECRET = os.urandom(24).hex().encode()


class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ctx: ssl.SSLContext, fail_first: int):
        super().__init__((syslib.LOOPBACK, 0), Handler)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.fail_first = fail_first
        self.requests: list[dict] = []
        self.lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                         "at": time.time()})
            fail = len(self.server.requests) <= self.server.fail_first
        self.send_response(503 if fail else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def verify(req: dict) -> dict:
    """What an operator's receiver does: recompute the HMAC over the raw
    body, compare in constant time, refuse an old timestamp."""
    h = {k.lower(): v for k, v in req["headers"].items()}
    ts = h["x-pop3connex-timestamp"]
    want = "v1=" + hmac.new(SECRET, ts.encode() + b"." + req["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(want, h["x-pop3connex-signature"]), "signature does not verify"
    assert abs(time.time() - int(ts)) < 300, "stale timestamp"
    assert h["content-type"] == "application/json"
    return json.loads(req["body"])


@pytest.fixture
def receiver(tmp_path):
    ca = TestCA(tmp_path / "pki")
    cert, key = ca.issue("hooks")
    rx = Receiver(server_context(cert, key), fail_first=1)
    t = threading.Thread(target=rx.serve_forever, daemon=True)
    t.start()
    yield rx, ca
    rx.shutdown()
    rx.server_close()


def test_alerts_reach_a_webhook_signed_retried_and_a_dead_webhook_is_itself_an_alert(server_factory, receiver,
                                                                                     tmp_path):
    rx, ca = receiver
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    dead = syslib.free_port()
    srv = server_factory(start=False)
    with open(srv.config, "a") as f:
        f.write(f'\n[[alerts.webhook]]\nname = "oncall"\nurl = "https://127.0.0.1:{rx.server_port}/hook"\n'
                f'secret = "file:{secret}"\nca_file = "{ca.cert}"\n')
        f.write(f'\n[[alerts.webhook]]\nname = "dead"\nurl = "https://127.0.0.1:{dead}/hook"\n'
                f'secret = "file:{secret}"\nca_file = "{ca.cert}"\nmax_attempts = 1\n'
                'events = ["config_reloaded"]\n')
    srv.start()
    srv.proc.send_signal(signal.SIGHUP)

    def bodies():
        with rx.lock:
            return [(r, verify(r)) for r in rx.requests]

    got = syslib.wait_until(lambda: (b := bodies()) and any(d["event"]["action"] == "alert_undeliverable"
                                                           for _, d in b) and len(b) >= 3 and b,
                            30, interval=0.3, what="the reload alert (after one retry) and the dead webhook's alert")
    reloads = [(r, d) for r, d in got if d["event"]["action"] == "config_reloaded"]
    assert len(reloads) == 2, [d["event"]["action"] for _, d in got]
    (first, d1), (second, d2) = reloads
    assert first["path"] == "/hook"
    h1 = {k.lower(): v for k, v in first["headers"].items()}
    h2 = {k.lower(): v for k, v in second["headers"].items()}
    assert h1["x-pop3connex-delivery"] == h2["x-pop3connex-delivery"] == d1["alert"]["delivery"], "one delivery, retried"
    assert (h1["x-pop3connex-attempt"], h2["x-pop3connex-attempt"]) == ("1", "2")
    assert second["at"] - first["at"] >= 1.5, "retried after a back-off"
    assert d2["event"]["code"] == "516" and d2["event"]["kind"] == "alert", d2
    assert d2["pop3connex"]["trigger"] == "sighup" and d2["alert"]["channel"] == "oncall", d2
    assert d2["host"]["hostname"] == "localhost"

    (_, lost), = [(r, d) for r, d in got if d["event"]["action"] == "alert_undeliverable"]
    assert lost["pop3connex"]["channel"] == "dead" and lost["pop3connex"]["lost"] == 1, lost
    assert lost["event"]["code"] == "603", lost

    # A forged body (signature from another key) does not verify.
    forged = dict(first, body=first["body"].replace(b"sighup", b"console"))
    with pytest.raises(AssertionError):
        verify(forged)
    assert SECRET.decode() not in srv.log_text(), "the key never reaches the log"


def test_a_short_or_unreadable_webhook_key_stops_the_server_at_start(server_factory, tmp_path):
    short = tmp_path / "short.secret"
    short.write_bytes(b"too-short")
    os.chmod(short, 0o600)
    srv = server_factory(start=False)
    with open(srv.config, "a") as f:
        f.write(f'\n[[alerts.webhook]]\nurl = "https://127.0.0.1:9/hook"\nsecret = "file:{short}"\n')
    with pytest.raises(syslib.ServerError) as e:
        srv.start(timeout=15)
    assert "fewer than 16 bytes" in str(e.value) + srv.log_text()
    assert "too-short" not in srv.log_text()


def test_alerts_reach_a_mailbox_through_a_verified_starttls_relay(server_factory, tmp_path):
    peers.PrivatePostfix.check_installed()
    ca = TestCA(tmp_path / "pki")
    domain = "alerts.test"

    def make(root):
        return peers.PostfixDownstream(root, syslib.free_port(), domain)

    with peers.running("pop3connex-alert-mail-", make, ["oncall"],
                       ca.issue("postfix", ("DNS:localhost", "IP:127.0.0.1"))) as pf:
        srv = server_factory(start=False)
        with open(srv.config, "a") as f:
            f.write(f'\n[[connector.downstreams]]\nname = "relay"\nprotocol = "smtp"\nhost = "127.0.0.1"\n'
                    f'port = {pf.smtp_port}\ntls = "verify"\nca_file = "{ca.cert}"\nhelo = "mail.{domain}"\n')
            f.write(f'\n[[alerts.email]]\nname = "ops"\nrelay = "relay"\nfrom = "pop3connex@{domain}"\n'
                    f'to = ["oncall@{domain}"]\nevents = ["config_reloaded"]\n')
        srv.start()
        srv.set_option("pop3", "max_bad_commands", 9)
        srv.proc.send_signal(signal.SIGHUP)
        raw = syslib.wait_until(lambda: pf.messages("oncall"), 30, interval=0.3,
                                what="the alert mail in the Maildir")[0]
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg["Subject"] == "[POP3conneX] warning config_reloaded on localhost", msg["Subject"]
        assert msg["From"].addresses[0].addr_spec == f"pop3connex@{domain}"
        assert msg["Auto-Submitted"] == "auto-generated"
        body = msg.get_content()
        assert "trigger: sighup" in body and "pop3.max_bad_commands" in body, body
        assert "event:    config_reloaded (id 516)" in body, body
        received = " ".join(msg.get_all("Received"))
        assert "using TLS" in received, received
