"""The local event store through the real binary: a running server keeps
the events a client causes (a failed and a successful login) and
`events search` finds them by user, address, type and time, as a table
and as ECS-named JSON lines; every search is in the audit log; the
catalogue the binary prints is docs/events.md; hostile filter values are
refused, not run.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import syslib

REPO = Path(__file__).resolve().parents[2]
TEST_TIMEOUT = 120
SERVER_SETTINGS = {
    ("abuse", "ban_after_auth_failures"): 1000,
    ("abuse", "lockout_after_failures"): 1000,
    ("auth", "failure_delay_ms"): 0,
}


def search(server: syslib.Server, *args: str) -> list[dict]:
    cp = server.cli("events", "search", "--json", *args)
    return [json.loads(line) for line in cp.stdout.decode().splitlines()]


def test_logins_are_searchable_by_user_address_type_and_time(server, make_user):
    name, pw = make_user("ev")
    since = int(time.time()) - 1
    with server.pop3s() as p:
        p.cmd(f"USER {name}")
        p.cmd("PASS wrong-password", expect_ok=False)
        p.cmd(f"USER {name}")
        p.cmd(f"PASS {pw}")
        p.quit()

    def mine():
        return search(server, "--user", name)
    got = syslib.wait_until(lambda: (lambda e: e if len(e) >= 2 else None)(mine()), 10, interval=0.3,
                          what="the login events")
    assert [e["event.action"] for e in got[:2]] == ["auth_success", "auth_failure"], got
    fail = got[1]
    assert fail["event.code"] == 101 and fail["event.severity"] == 4
    assert fail["user.name"] == name and fail["source.ip"] == "127.0.0.1"
    assert fail["fields"]["mechanism"] == "USER" and "password" in fail["fields"]["reason"]
    assert "wrong-password" not in json.dumps(got), "no password in the event store"

    only_failures = search(server, "--user", name, "--type", "auth_failure")
    assert [e["event.action"] for e in only_failures] == ["auth_failure"]
    by_ip = search(server, "--ip", "127.0.0.1", "--type", "auth_success,auth_failure", "--since", str(since))
    assert {e["user.name"] for e in by_ip} >= {name}
    assert search(server, "--user", name, "--until", str(since)) == [], "nothing before the test started"

    table = server.cli("events", "search", "--user", name).stdout.decode()
    assert "auth_failure" in table and name in table

    # Every search is recorded in the audit log, with its filter.
    audit = [json.loads(line) for line in server.cli("audit-log", "export").stdout.decode().splitlines()]
    assert any(r["action"] == "events.read" and f"user={name}" in r["target"] for r in audit)

    # Hostile or wrong filters are refused with a clear message.
    for args, why in [(["--type", "drop_table"], "no such event"), (["--ip", "1.2.3.4; --"], "not an IP"),
                      (["--since", "yesterday"], "expected Unix seconds")]:
        cp = server.cli("events", "search", *args, check=False)
        assert cp.returncode != 0 and why in cp.stderr.decode(), (args, cp.stderr)


def test_the_printed_catalogue_is_docs_events_md(server):
    printed = server.cli("events", "catalogue", "--markdown").stdout.decode()
    assert printed == (REPO / "docs/events.md").read_text()
    catalogue = json.loads(server.cli("events", "catalogue", "--json").stdout)
    ids = [d["id"] for d in catalogue]
    assert len(ids) == len(set(ids)) and {"auth_failure", "ban", "admin_login"} <= {d["name"] for d in catalogue}


def test_a_failed_login_spike_on_one_account_raises_one_alert(server_factory, tmp_path, make_user):
    alerts = tmp_path / "alerts.jsonl"
    srv = server_factory({
        ("abuse", "ban_after_auth_failures"): 1000,
        ("abuse", "lockout_after_failures"): 1000,
        ("auth", "failure_delay_ms"): 0,
        ("pop3", "max_auth_failures"): 100,
        ("anomaly.account", "absolute"): 6,
        ("connector", "alert_command"): ["sh", "-c", f"cat >> '{alerts}'"],
    })
    name, _ = make_user("spray", srv=srv)
    with srv.pop3s() as p:
        for i in range(12):
            p.cmd(f"USER {name}")
            p.cmd(f"PASS guess-{i}", expect_ok=False)

    def spikes():
        return search(srv, "--type", "auth_failure_spike")
    got = syslib.wait_until(spikes, 10, interval=0.3, what="the spike event in the store")
    assert len(got) == 1, got
    f = got[0]["fields"]
    assert (f["scope"], f["key"], f["count"], f["threshold"]) == ("account", name, 6, 6), f
    assert f["last_peer"] == "127.0.0.1" and got[0]["event.code"] == 700

    # The same event went to the alert hook, once.
    def hooked():
        lines = alerts.read_text().splitlines() if alerts.exists() else []
        return [json.loads(x) for x in lines if "auth_failure_spike" in x]
    hook = syslib.wait_until(hooked, 10, interval=0.3, what="the alert hook")
    time.sleep(1)
    assert len(hooked()) == 1 and hook[0]["source"] == "anomaly" and hook[0]["key"] == name


def test_a_session_that_retrieves_and_deletes_reports_its_volume(server, make_user):
    name, pw = make_user("vol")
    msg = syslib.make_message("volume", body_lines=60)
    for _ in range(3):
        assert server.deliver(syslib.addr(name), msg)[syslib.addr(name)] == 250
    got = server.fetch_all(name, pw)
    assert len(got) == 3
    with server.pop3s() as p:
        p.cmd(f"USER {name}")
        p.cmd(f"PASS {pw}")
        p.cmd("DELE 1")
        p.cmd("DELE 2")
        p.quit()
    volume = syslib.wait_until(lambda: (lambda e: e if len(e) >= 2 else None)(
        search(server, "--user", name, "--type", "mail_retrieved")), 10, interval=0.3, what="two volume events")
    deleting, fetching = volume[0]["fields"], volume[1]["fields"]
    assert (deleting["messages"], deleting["deleted"]) == (0, 2), deleting
    assert fetching["messages"] == 3 and fetching["octets"] >= 3 * len(msg) and fetching["deleted"] == 0, fetching

    # TOP with a large line count downloads the whole message: it counts too.
    with server.pop3s() as p:
        p.cmd(f"USER {name}")
        p.cmd(f"PASS {pw}")
        assert len(p.top(1, 100000)) >= len(msg) - 200
        p.quit()
    volume = syslib.wait_until(lambda: (lambda e: e if len(e) >= 3 else None)(
        search(server, "--user", name, "--type", "mail_retrieved")), 10, interval=0.3, what="the TOP volume event")
    topping = volume[0]["fields"]
    assert topping["messages"] == 1 and topping["octets"] >= len(msg) - 200, topping


def test_a_reload_names_the_configuration_keys_changed_since_start(server_factory):
    srv = server_factory({("pop3", "max_bad_commands"): 7})
    srv.set_option("pop3", "max_bad_commands", 9)
    srv.set_option("log", "level", "info")
    srv.proc.send_signal(signal.SIGHUP)
    got = syslib.wait_until(lambda: search(srv, "--type", "config_reloaded"), 10, interval=0.3,
                            what="the config_reloaded event")
    f = got[0]["fields"]
    assert f["trigger"] == "sighup" and "pop3.max_bad_commands" in f["changed_keys"], f
    assert "9" not in f["changed_keys"], "key names only, never values"
    assert 'event="config_reloaded"' in srv.log_text()
