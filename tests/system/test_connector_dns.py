"""The connector's DNSSEC-validating resolver and MTA-STS client against a
real authoritative DNS server (NSD, pre-signed zones from ldns-signzone) and
an HTTPS policy server, through `pop3connex connector dns-check`.

Zones (see dnslib): secure.test (signed, DS in test.), insecure.test
(delegated without DS), bogus.test (signed, MX RRSIG corrupted); the key of
test. is the only trust anchor. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import pytest

import dnslib
import syslib
from conftest import require_tool

TEST_TIMEOUT = 120

POLICY = "version: STSv1\nmode: enforce\nmx: mx1.secure.test\nmx: *.secure.test\nmax_age: 86400\n"


@pytest.fixture(scope="module")
def dns_env(tmp_path_factory):
    for tool in ("nsd", "nsd-checkconf", "ldns-keygen", "ldns-signzone", "ldns-key2ds", "openssl"):
        require_tool(tool)
    base = tmp_path_factory.mktemp("dns")
    nsd = dnslib.Nsd(base)
    https = wrong_name = None
    try:
        ca = dnslib.make_ca(base / "ca")
        https = dnslib.PolicyServer(*dnslib.make_cert(ca, base / "good", ["mta-sts.secure.test"]), POLICY)
        # Same CA, but a certificate for another name.
        wrong_name = dnslib.PolicyServer(*dnslib.make_cert(ca, base / "wrong", ["mta-sts.other.test"]), POLICY)
        yield {"nsd": nsd, "https": https, "wrong_name": wrong_name, "ca": ca}
    finally:
        for s in (https, wrong_name):
            if s:
                s.stop()
        nsd.stop()


@pytest.fixture
def checker(dns_env, server_factory):
    """check(domain, anchor=None) -> (exit code, stdout, stderr) of dns-check."""
    srv = server_factory(start=False)
    text = srv.config.read_text()
    text = syslib.toml_set(text, "connector.dns", "nameservers", [f"127.0.0.1:{dns_env['nsd'].port}"])
    text = syslib.toml_set(text, "connector.dns", "timeout_ms", 2000)
    text = syslib.toml_set(text, "connector.dns", "mta_sts_ca_file", str(dns_env["ca"]))

    def check(domain: str, anchor=None, sts_port=None):
        t = syslib.toml_set(text, "connector.dns", "trust_anchor_file", str(anchor or dns_env["nsd"].anchor))
        t = syslib.toml_set(t, "connector.dns", "mta_sts_port", sts_port or dns_env["https"].port)
        srv.config.write_text(t)
        cp = srv.cli("connector", "dns-check", domain, timeout=60, check=False)
        return cp.returncode, cp.stdout.decode(errors="replace"), cp.stderr.decode(errors="replace")

    return check


def test_secure_domain_shows_mx_tlsa_and_mta_sts(checker, dns_env):
    code, out, err = checker("secure.test")
    assert code == 0, err
    lines = out.splitlines()
    assert "MX: DNSSEC secure" in lines, out
    # Sorted by preference: mx1 (10) before mx2 (20).
    assert out.index("  mx mx1.secure.test") < out.index("  mx mx2.secure.test"), out
    assert "    addresses: DNSSEC secure: 127.0.0.1, ::1" in lines, out
    assert "    TLSA _25._tcp.mx1.secure.test: DNSSEC secure (usable for DANE)" in lines, out
    assert f"      usage 3 selector 1 matching 1 data {dnslib.TLSA_HEX}" in lines, out
    assert any(line.startswith("    TLSA _25._tcp.mx2.secure.test: none") for line in lines), out
    assert "MTA-STS: mode enforce max_age 86400" in lines, out
    assert "  mx pattern mx1.secure.test" in lines and "  mx pattern *.secure.test" in lines, out
    assert dns_env["https"].hits >= 1


def test_ds_trust_anchor_works_like_dnskey(checker, dns_env):
    code, out, err = checker("secure.test", anchor=dns_env["nsd"].anchor_ds)
    assert code == 0, err
    assert "MX: DNSSEC secure" in out.splitlines(), out


def test_insecure_delegation_is_insecure(checker):
    code, out, err = checker("insecure.test")
    assert code == 0, err
    lines = out.splitlines()
    assert "MX: DNSSEC insecure" in lines, out
    assert "  mx mail.insecure.test" in lines, out
    assert "    addresses: DNSSEC insecure: 127.0.0.1" in lines, out
    assert "MTA-STS: none (no v=STSv1 TXT record at _mta-sts.insecure.test)" in lines, out


def test_bogus_signature_is_refused(checker):
    code, out, err = checker("bogus.test")
    assert code == 0, err
    mx = [line for line in out.splitlines() if line.startswith("MX:")]
    assert mx and "REFUSED: DNSSEC bogus" in mx[0], out
    assert "mail.bogus.test" not in out, out


def test_null_and_implicit_mx(checker):
    code, out, err = checker("nullmx.secure.test")
    assert code == 0, err
    assert "null MX" in out, out
    code, out, err = checker("implicit.secure.test")
    assert code == 0, err
    assert "MX: DNSSEC secure" in out.splitlines() and "  mx implicit.secure.test" in out.splitlines(), out


def test_wrong_trust_anchor_makes_everything_bogus(checker, dns_env, tmp_path):
    # A DS anchor whose digest matches no key of test.
    wrong = tmp_path / "wrong.ds"
    wrong.write_text("test. IN DS 12345 13 2 " + "00" * 32 + "\n")
    code, out, err = checker("secure.test", anchor=wrong)
    assert "MX: REFUSED: DNSSEC bogus" in out, out + err


def test_forged_denial_of_tlsa_is_refused(checker):
    # downgrade.bogus.test has a valid MX, but the NSEC proving that
    # mail.bogus.test has no TLSA (and no AAAA) carries a broken signature.
    code, out, err = checker("downgrade.bogus.test")
    assert code == 0, err
    lines = out.splitlines()
    assert "MX: DNSSEC secure" in lines, out
    assert "    TLSA _25._tcp.mail.bogus.test: REFUSED: DNSSEC bogus" in "\n".join(lines), out
    assert "    addresses: REFUSED: DNSSEC bogus" in out, out


def test_mta_sts_certificate_must_match_the_policy_host(checker, dns_env):
    code, out, err = checker("secure.test", sts_port=dns_env["wrong_name"].port)
    assert code == 0, err
    sts = [line for line in out.splitlines() if line.startswith("MTA-STS:")]
    assert sts and "policy unavailable" in sts[0] and "TLS" in sts[0], out
    assert "mx pattern" not in out, out


def test_garbage_names_are_refused(checker, dns_env):
    for name in ("exa mple.test", "x_y.test", "a..test", "192.0.2.1"):
        code, out, err = checker(name)
        assert code == 0, err
        assert "is not a valid host name" in out, out
