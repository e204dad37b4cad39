"""DNS blocklist lookups at accept, against a DNSBL zone served by a small
authoritative responder in this test (loopback only). 127.0.0.1 is listed,
127.0.0.2 is not; a zone that never answers must not lock anyone out."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

import syslib

TEST_TIMEOUT = 120


class Responder:
    """Answers A queries: 127.0.0.2 for names in `listed`, NXDOMAIN for
    other names under `zone`, and silence for names under `silent`."""

    def __init__(self, zone: str, listed: set[str], silent: str):
        self.zone, self.listed, self.silent = zone, listed, silent
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                data, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            if len(data) < 12:
                continue
            qid, = struct.unpack("!H", data[:2])
            labels, i = [], 12
            while i < len(data) and data[i] != 0:
                n = data[i]
                labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace"))
                i += 1 + n
            question = data[12:i + 5]
            name = ".".join(labels).lower()
            self.queries.append(name)
            if name.endswith(self.silent):
                continue
            if name in self.listed:
                answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([127, 0, 0, 2])
                header = struct.pack("!HHHHHH", qid, 0x8580, 1, 1, 0, 0)
                self.sock.sendto(header + question + answer, peer)
            else:
                header = struct.pack("!HHHHHH", qid, 0x8583, 1, 0, 0, 0)
                self.sock.sendto(header + question, peer)

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def dns():
    r = Responder("dnsbl.test", {"1.0.0.127.dnsbl.test"}, "silent.test")
    yield r
    r.close()


def greeted(port: int, source: str) -> str:
    """The first line the server sends. Served and DNSBL-refused
    connections both get one (`+OK` greeting or `-ERR ... listed in ZONE`),
    so a connection closed without a line or a timeout fails the test."""
    s = syslib.connect(syslib.LOOPBACK, port, timeout=10, source=source)
    ls = syslib.LineSock(s, 10)
    try:
        return ls.readline().decode(errors="replace")
    finally:
        ls.close()


def test_listed_address_is_refused_others_are_served(server_factory, dns):
    srv = server_factory({("abuse", "dnsbl"): ["dnsbl.test"],
                          ("abuse", "dnsbl_resolver"): f"127.0.0.1:{dns.port}",
                          ("abuse", "dnsbl_timeout_ms"): 2000})
    line = greeted(srv.ports.pop3, "127.0.0.1")
    assert line.startswith("-ERR") and "dnsbl.test" in line, line
    assert greeted(srv.ports.pop3, "127.0.0.2").startswith("+OK"), "unlisted address served"
    assert "1.0.0.127.dnsbl.test" in dns.queries and "2.0.0.127.dnsbl.test" in dns.queries
    log = srv.log_text()
    assert 'event="dnsbl_listed"' in log and 'zone="dnsbl.test"' in log
    # Cached: a second connection does not query again.
    before = len(dns.queries)
    greeted(srv.ports.pop3, "127.0.0.2")
    assert len(dns.queries) == before


def test_unanswered_lookup_fails_open_within_the_timeout(server_factory, dns):
    srv = server_factory({("abuse", "dnsbl"): ["silent.test"],
                          ("abuse", "dnsbl_resolver"): f"127.0.0.1:{dns.port}",
                          ("abuse", "dnsbl_timeout_ms"): 500})
    start = time.monotonic()
    assert greeted(srv.ports.pop3, "127.0.0.3").startswith("+OK")
    assert time.monotonic() - start < 5
    assert any(q.endswith("silent.test") for q in dns.queries), "the lookup was really attempted"


def test_allowlisted_networks_are_not_looked_up(server_factory, dns):
    srv = server_factory({("abuse", "dnsbl"): ["dnsbl.test"],
                          ("abuse", "dnsbl_resolver"): f"127.0.0.1:{dns.port}",
                          ("abuse", "allowlist"): ["127.0.0.1/32"]})
    assert greeted(srv.ports.pop3, "127.0.0.1").startswith("+OK")
    assert not any(q.startswith("1.0.0.127.") for q in dns.queries)
