"""LMTP resource limits against hostile clients, on the real binary:
deadlines per command line and for DATA (slowloris), idle sessions making
room at the connection limit, the in-flight DATA budget, SIZE values beyond
any integer, and recipient resolution for user names containing `+`.
"""

from __future__ import annotations

import time

import pytest

import syslib
from syslib import LOOPBACK, make_message

TEST_TIMEOUT = 120
TIMEOUT = 5  # [lmtp] timeout_secs for these servers (the minimum allowed)


def answer_and_close(l: syslib.Lmtp, limit: float, trickle: bytes = b"") -> tuple[bytes, float]:
    """Sends one byte of `trickle` every half second until the server closes
    the connection; returns what it said meanwhile and after how long."""
    t0 = time.monotonic()
    said = b""
    i = 0
    while time.monotonic() - t0 < limit:
        try:
            if trickle:
                l.ls.send(trickle[i % len(trickle):i % len(trickle) + 1])
                i += 1
            said += l.ls.read_available(0.5)
        except (syslib.Closed, OSError):
            return said, time.monotonic() - t0
    pytest.fail(f"LMTP connection still open after {limit:.0f}s (timeout_secs = {TIMEOUT}); it said {said!r}")


def deliver_ok(srv: syslib.Server, rcpt: str, tag: str):
    with srv.lmtp() as l:
        assert l.send_mail("sender@example.org", [rcpt], make_message(tag)) == {rcpt: 250}
        l.quit()


def test_lmtp_slowloris_is_closed_at_the_deadline(server_factory, make_user):
    """One byte every half second, as a partial command line or inside DATA,
    no longer keeps a connection open past timeout_secs: both are closed
    with 421 4.4.2 at the deadline."""
    srv = server_factory({("lmtp", "timeout_secs"): TIMEOUT})
    name, _ = make_user(srv=srv)
    l = srv.lmtp()
    said, took = answer_and_close(l, TIMEOUT + 6, trickle=b"MAIL FROM:<" + b"a" * 100)
    assert said.startswith(b"421 4.4.2"), said
    assert took >= TIMEOUT - 1, f"cut after {took:.1f}s, before timeout_secs"
    l.close()

    l = srv.lmtp()
    assert l.cmd("MAIL FROM:<s@example.org>").code == 250
    assert l.cmd(f"RCPT TO:<{syslib.addr(name)}>").code == 250
    assert l.cmd("DATA").code == 354
    said, took = answer_and_close(l, TIMEOUT + 6, trickle=b"Subject: drip\r\n\r\n" + b"x" * 100)
    assert said.startswith(b"421 4.4.2"), said
    assert took >= TIMEOUT - 1
    l.close()
    assert srv.mailbox_stat(name) == (0, 0), "nothing delivered from a timed-out DATA"
    deliver_ok(srv, syslib.addr(name), "after-slowloris")
    assert srv.mailbox_stat(name)[0] == 1


def test_lmtp_idle_sessions_make_room_at_the_connection_limit(server_factory, make_user):
    """Silent clients holding every LMTP slot are closed after 10 s once the
    limit is reached, so the MTA gets in again long before timeout_secs."""
    limit = 3
    srv = server_factory({("lmtp", "max_connections"): limit})  # timeout_secs stays 300
    name, _ = make_user(srv=srv)
    hogs = [srv.lmtp() for _ in range(limit)]
    t0 = time.monotonic()
    for h in hogs:
        assert h.ls.is_closed(15 - (time.monotonic() - t0)), \
            "an idle LMTP session still holds its slot at the limit after 15 s"
    took = time.monotonic() - t0
    assert took >= 8, f"idle sessions cut after {took:.1f}s, before the 10 s busy deadline"
    deliver_ok(srv, syslib.addr(name), "after-hogs")
    assert srv.mailbox_stat(name)[0] == 1


def test_lmtp_inflight_budget_refuses_with_452_until_released(server_factory, make_user):
    """With a 64 KiB in-flight DATA budget, a second transaction announcing
    more than what is left is refused 452 4.3.1 while the first is in DATA,
    and accepted once the first has finished."""
    srv = server_factory({("lmtp", "max_message_size"): 65536, ("lmtp", "max_inflight_data"): 65536})
    name, _ = make_user(srv=srv)
    rcpt = syslib.addr(name)
    first = srv.lmtp()
    assert first.cmd("MAIL FROM:<s@example.org>").code == 250
    assert first.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert first.cmd("DATA").code == 354
    first.ls.send(b"Subject: big\r\n\r\n" + (b"a" * 998 + b"\r\n") * 50)
    second = srv.lmtp()
    r = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = second.cmd("MAIL FROM:<s@example.org> SIZE=30000")
        if r.code == 452:
            break
        assert r.code == 250, r
        assert second.cmd("RSET").code == 250
        time.sleep(0.1)
    assert r is not None and r.code == 452 and r.text.startswith("4.3.1"), r
    first.ls.send(b".\r\n")
    assert first.reply().code == 250
    assert second.cmd("MAIL FROM:<s@example.org> SIZE=30000").code == 250
    assert second.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert second.cmd("DATA").code == 354
    second.ls.send(b"Subject: second\r\n\r\n" + (b"b" * 998 + b"\r\n") * 25 + b".\r\n")
    assert second.reply().code == 250
    first.close()
    second.close()
    assert srv.mailbox_stat(name)[0] == 2


def test_lmtp_size_beyond_any_integer_gets_552(server, make_user):
    """SIZE values that overflow 64 bits are above the maximum, not zero."""
    with server.lmtp() as l:
        for size in ["999999999999999999999999999", "18446744073709551616"]:
            r = l.cmd(f"MAIL FROM:<s@example.org> SIZE={size}")
            assert (r.code, r.text[:5]) == (552, "5.3.4"), f"SIZE={size}: {r}"
        assert l.cmd("MAIL FROM:<s@example.org> SIZE=1000").code == 250
        l.quit()


def test_lmtp_plus_user_gets_its_own_mail(server):
    """A user whose name contains `+` receives mail addressed to it; the
    user named by the part before `+` does not (detail stripping comes only
    after exact matches)."""
    base = syslib.unique_name("sales")
    pw = syslib.new_password()
    server.add_user(base, pw)
    server.add_user(f"{base}+eu", pw)
    deliver_ok(server, f"{base}+eu@example.com", "for-plus-user")
    assert server.mailbox_stat(f"{base}+eu")[0] == 1
    assert server.mailbox_stat(base)[0] == 0, "mail for sales+eu leaked into sales"
    deliver_ok(server, f"{base}+asia@example.com", "detail-stripped")
    assert server.mailbox_stat(base)[0] == 1
