"""The login-geography rules ([anomaly.geo]) through the real binary.

The test writes its own City database (MaxMind DB format, a few lines of
stdlib Python below) that places two loopback addresses far apart: Berlin
for 127.0.0.2 and Sydney for 127.0.0.3. A client logs in from one, then,
binding the other as its source address, from the other: the second login
raises one `geo_impossible_travel` alert carrying both places, and it is
in the event store. No configuration switch exists for tests: the database
is an ordinary database that happens to place loopback addresses. SIGHUP
re-reads the database (as after `geoipupdate`).
"""

from __future__ import annotations

import json
import signal
import struct
import time

import syslib

TEST_TIMEOUT = 120


# --- a minimal MaxMind DB writer (IPv4 tree, 32-bit records) -------------

def _control(kind: int, size: int) -> bytes:
    if size < 29:
        head, extra = size, b""
    elif size < 285:
        head, extra = 29, bytes([size - 29])
    else:
        head, extra = 30, struct.pack(">H", size - 285)
    if kind <= 7:
        return bytes([(kind << 5) | head]) + extra
    return bytes([head, kind - 7]) + extra


def _encode(v) -> bytes:
    if isinstance(v, str):
        b = v.encode()
        return _control(2, len(b)) + b
    if isinstance(v, float):
        return _control(3, 8) + struct.pack(">d", v)
    if isinstance(v, tuple):  # ("u16" | "u32" | "u64", n): readers want the exact type
        kind, n = v
        b = n.to_bytes(8, "big").lstrip(b"\0")
        return _control({"u16": 5, "u32": 6, "u64": 9}[kind], len(b)) + b
    if isinstance(v, dict):
        return _control(7, len(v)) + b"".join(_encode(k) + _encode(x) for k, x in v.items())
    if isinstance(v, list):
        return _control(11, len(v)) + b"".join(_encode(x) for x in v)
    raise TypeError(v)


def write_mmdb(path, kind: str, entries: dict[str, dict]) -> None:
    """entries: {"127.0.0.2/32": record}; non-overlapping IPv4 networks."""
    nodes = [[None, None]]
    data = b""
    for net, record in entries.items():
        addr, length = net.split("/")
        bits = int.from_bytes(bytes(int(o) for o in addr.split(".")), "big")
        length = int(length)
        offset = len(data)
        data += _encode(record)
        node = 0
        for i in range(length):
            bit = (bits >> (31 - i)) & 1
            if i + 1 == length:
                nodes[node][bit] = ("data", offset)
                break
            if nodes[node][bit] is None:
                nodes.append([None, None])
                nodes[node][bit] = ("node", len(nodes) - 1)
            node = nodes[node][bit][1]
    count = len(nodes)

    def rec(r):
        if r is None:
            return count
        return r[1] if r[0] == "node" else count + 16 + r[1]
    tree = b"".join(struct.pack(">II", rec(a), rec(b)) for a, b in nodes)
    meta = {
        "binary_format_major_version": ("u16", 2), "binary_format_minor_version": ("u16", 0),
        "build_epoch": ("u64", 1700000000), "database_type": kind,
        "description": {"en": "POP3conneX system test"}, "ip_version": ("u16", 4),
        "languages": ["en"], "node_count": ("u32", count), "record_size": ("u16", 32),
    }
    path.write_bytes(tree + b"\0" * 16 + data + b"\xab\xcd\xefMaxMind.com" + _encode(meta))


def city(country: str, name: str, lat: float, lon: float) -> dict:
    return {"city": {"names": {"en": name}}, "country": {"iso_code": country},
            "location": {"latitude": lat, "longitude": lon}}


def login(server: syslib.Server, name: str, pw: str, source: str) -> None:
    with server.pop3s(source=source) as p:
        p.cmd(f"USER {name}")
        p.cmd(f"PASS {pw}")
        p.quit()


def search(server: syslib.Server, *args: str) -> list[dict]:
    cp = server.cli("events", "search", "--json", *args)
    return [json.loads(line) for line in cp.stdout.decode().splitlines()]


def test_a_jump_from_berlin_to_sydney_raises_one_impossible_travel_alert(server_factory, tmp_path):
    db = tmp_path / "city.mmdb"
    write_mmdb(db, "GeoLite2-City", {
        "127.0.0.2/32": city("DE", "Berlin", 52.52, 13.405),
        "127.0.0.3/32": city("AU", "Sydney", -33.8688, 151.2093),
    })
    srv = server_factory({("anomaly.geo", "city_database"): str(db),
                          ("auth", "failure_delay_ms"): 0})
    name, pw = syslib.unique_name("geo"), syslib.new_password()
    srv.add_user(name, pw)

    login(srv, name, pw, "127.0.0.2")   # teaches
    login(srv, name, pw, "127.0.0.2")   # same place
    login(srv, name, pw, "127.0.0.1")   # loopback with no record: skipped
    login(srv, name, pw, "127.0.0.3")   # 16,000 km within seconds

    got = syslib.wait_until(
        lambda: search(srv, "--user", name, "--type", "geo_impossible_travel,geo_new_country") or None,
        10, interval=0.3, what="the geography alert")
    time.sleep(1)  # anything more would have arrived by now
    got = search(srv, "--user", name, "--type", "geo_impossible_travel,geo_new_country")
    assert len(got) == 1, got
    e = got[0]
    assert e["event.action"] == "geo_impossible_travel" and e["event.code"] == 703, e
    assert e["source.ip"] == "127.0.0.3" and e["user.name"] == name
    f = e["fields"]
    assert (f["country"], f["city"], f["previous_country"], f["previous_city"]) == ("AU", "Sydney", "DE", "Berlin")
    assert f["previous_peer"] == "127.0.0.2" and f["new_country"] is True
    assert 16000 <= f["distance_km"] <= 16200, f
    assert f["speed_kmh"] > 900 and f["known_countries"] == "DE"
    assert f["mechanism"] == "USER" and f["previous_mechanism"] == "USER"


def test_sighup_re_reads_the_database(server_factory, tmp_path):
    db = tmp_path / "city.mmdb"
    berlin = city("DE", "Berlin", 52.52, 13.405)
    write_mmdb(db, "GeoLite2-City", {"127.0.0.2/32": berlin})
    srv = server_factory({("anomaly.geo", "city_database"): str(db), ("auth", "failure_delay_ms"): 0})
    name, pw = syslib.unique_name("geohup"), syslib.new_password()
    srv.add_user(name, pw)
    login(srv, name, pw, "127.0.0.2")
    login(srv, name, pw, "127.0.0.3")   # not in this database: skipped
    time.sleep(1)
    assert search(srv, "--user", name, "--type", "geo_impossible_travel,geo_new_country") == []

    # The updated database is written beside and renamed over, as geoipupdate does.
    new = tmp_path / "city.mmdb.new"
    write_mmdb(new, "GeoLite2-City", {"127.0.0.2/32": berlin,
                                      "127.0.0.3/32": city("AU", "Sydney", -33.8688, 151.2093)})
    new.rename(db)
    srv.proc.send_signal(signal.SIGHUP)
    syslib.wait_until(lambda: "GeoIP databases re-read" in srv.log_text(), 10, interval=0.3,
                      what="the reload")
    login(srv, name, pw, "127.0.0.3")
    got = syslib.wait_until(
        lambda: search(srv, "--user", name, "--type", "geo_impossible_travel,geo_new_country") or None,
        10, interval=0.3, what="the geography alert")
    assert [e["event.action"] for e in got] == ["geo_impossible_travel"], got
    assert got[0]["fields"]["previous_city"] == "Berlin" and got[0]["fields"]["city"] == "Sydney"

    # A broken database at the next reload leaves the loaded one in use, with an alert.
    db.write_bytes(b"not a database")
    srv.proc.send_signal(signal.SIGHUP)
    syslib.wait_until(lambda: "could not be re-read" in srv.log_text(), 10, interval=0.3,
                      what="the failed reload")
    assert srv.alive()
