"""A data directory written by the previous release opens and upgrades in
place: the store in tests/fixtures/store-0.1.0 was written by the 0.1.0
binary (tests/fixtures/make_store_fixture.py says how). The binary under
test migrates its schema on open; users, hashes, app passwords, account
flags, bans, connector accounts and every sealed message with its UIDL
come through, byte for byte, and the upgraded store keeps working."""

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

import syslib

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store-0.1.0"


def schema_version(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute("PRAGMA user_version").fetchone()[0]


def install_fixture(srv: syslib.Server) -> dict:
    db = srv.data_dir / "pop3connex.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(FIXTURE / "pop3connex.db", db)
    key = srv.data_dir / "master.key"
    key.unlink()
    shutil.copy(FIXTURE / "master.key", key)
    os.chmod(key, 0o600)
    os.chmod(db, 0o600)
    return json.loads((FIXTURE / "expected.json").read_text())


def check_mailbox(pop: syslib.Pop3, want: list[dict]):
    uidl = pop.uidl()
    assert [uidl[n] for n in sorted(uidl)][: len(want)] == [m["uidl"] for m in want]
    for n, m in zip(sorted(uidl), want):
        data = pop.retr(n)
        assert len(data) == m["octets"], f"message {n}: size changed"
        assert hashlib.sha256(data).hexdigest() == m["sha256"], f"message {n}: content changed"


def test_previous_release_store_upgrades_in_place(server_factory):
    fresh = server_factory(start=False, name="fresh")
    fresh.cli("user", "list")  # opens (creates) a database at the current schema
    current = schema_version(fresh.data_dir / "pop3connex.db")

    srv = server_factory(start=False, name="upgraded")
    expected = install_fixture(srv)
    assert schema_version(srv.data_dir / "pop3connex.db") == expected["schema_version"]
    assert expected["schema_version"] <= current

    srv.start()
    assert schema_version(srv.data_dir / "pop3connex.db") == current

    for user, u in expected["users"].items():
        with srv.pop3s() as pop:
            if user in expected["modern_auth_only"]:
                with pytest.raises(syslib.PopError, match=r"\[AUTH\]"):
                    pop.login(user, u["password"])
                pop.close()
                pop = srv.pop3s()
                pop.login(user, expected["app_passwords"][user])
            else:
                pop.login(user, u["password"])
            check_mailbox(pop, u["messages"])
            pop.quit()
    with srv.pop3s() as pop:
        pop.login("alice@example.org", expected["app_passwords"]["alice@example.org"])
        pop.quit()

    assert expected["ban"] in srv.cli("ban", "list").stdout.decode()
    assert expected["connector_account"] in srv.cli("connector", "list").stdout.decode()

    # The upgraded store takes new mail after the old, and keeps the old UIDLs.
    alice = expected["users"]["alice@example.org"]
    srv.deliver(["alice@example.org"], b"Subject: after the upgrade\r\n\r\nnew mail\r\n")
    srv.stop()
    srv.start()
    with srv.pop3s() as pop:
        pop.login("alice@example.org", alice["password"])
        check_mailbox(pop, alice["messages"])
        assert len(pop.uidl()) == len(alice["messages"]) + 1
        pop.quit()
