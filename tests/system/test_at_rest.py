"""Encryption at rest, checked from the outside: after a delivery, no file
of the data directory (database, -wal, -shm, lock files, anything else) and
not the server's log holds the message's text, its subject or the user's
passwords in clear, while POP3 RETR returns the message intact.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import syslib
from syslib import addr, make_message

TEST_TIMEOUT = 120


def files_under(root: Path) -> list[Path]:
    found = [p for p in root.rglob("*") if p.is_file()]
    assert found, f"no files under {root}"
    return found


def holding(secret: bytes, paths: list[Path]) -> list[str]:
    """Files whose bytes contain `secret` (also as UTF-16, as some tools
    store text)."""
    forms = [secret, secret.decode().encode("utf-16-le")]
    return [str(p) for p in paths if any(f in p.read_bytes() for f in forms)]


def test_no_plaintext_of_a_delivered_message_or_password_on_disk(server_factory):
    srv = server_factory()
    name, pw = syslib.unique_name("rest"), syslib.new_password()
    srv.add_user(name, pw)
    app_out = srv.cli("user", "app-password", "add", name, "at-rest").stdout.decode()
    app_pw = app_out.splitlines()[0].rsplit(": ", 1)[1]

    marker = "AtRest" + secrets.token_hex(12)
    subject_marker = "Subj" + secrets.token_hex(12)
    body_marker = "Body" + secrets.token_hex(12)
    msg = make_message(marker, extra_body=f"the body says {body_marker}\r\n".encode())
    msg = msg.replace(f"Subject: system test {marker}".encode(), f"Subject: {subject_marker}".encode(), 1)
    assert subject_marker.encode() in msg and body_marker.encode() in msg
    assert srv.deliver(addr(name), msg) == {addr(name): 250}

    secrets_to_find = {
        "message marker": marker.encode(),
        "subject": subject_marker.encode(),
        "body": body_marker.encode(),
        "account password": pw.encode(),
        "app password": app_pw.encode(),
    }

    def scan(when: str):
        paths = files_under(srv.data_dir) + [srv.log_path]
        names = {p.name for p in paths}
        assert "pop3connex.db" in names, names
        for what, secret in secrets_to_find.items():
            leaks = holding(secret, paths)
            assert not leaks, f"{what} in clear text {when}: {leaks}"
        return names

    # live: the delivery sits in the WAL (and the -shm index) right now
    live = scan("while the server runs")
    assert "pop3connex.db-wal" in live, f"expected a WAL file next to the database: {sorted(live)}"
    got = srv.fetch_all(name, pw)
    assert got == [msg], "RETR did not return the delivered message"
    with srv.pop3s() as p:
        p.login(name, app_pw)
        assert p.retr(1).endswith(msg)
        p.quit()
    # stopped: the WAL has been checkpointed into the database file
    srv.stop()
    scan("after a clean shutdown")
    # and after a crash, with whatever the WAL still holds
    srv.start()
    assert srv.fetch_all(name, pw) == [msg]
    srv.kill9()
    scan("after kill -9")
