"""The connector forwarding by MX: a private Dovecot upstream (POP3S) ->
POP3conneX -> `[[connector.downstreams]]` without `host`, so the connector
resolves MX, A/AAAA and TLSA records itself through a private NSD (signed
zones, the test trust anchor in `[connector.dns]`) and delivers to a private
Postfix on 127.0.0.1 (STARTTLS, Maildirs; see test_connector_downstream).

For MX delivery the SMTP port is the downstream's `port`, so it is Postfix's
port, and TLSA records live at `_<port>._tcp.<mx host>`. Every MX host
resolves to 127.0.0.1. Postfix presents one certificate (plus the issuing
CA, for DANE-TA), from the CA `mx`, valid for some of the MX names only:

  ee.secure.test        MX mx-ee (not in the cert), TLSA 3 1 1 = Postfix key
  badtlsa.secure.test   MX mx-badtlsa (in the cert), TLSA 3 1 1 = another key
  ta0/ta1.secure.test   MX mx-ta0/1 (in the cert), TLSA 2 0 1 / 2 1 1 = CA
  tanoname.secure.test  MX mx-tanoname (not in the cert), TLSA 2 1 1 = CA
  bogus.test            MX RRSIG corrupted (dnslib)
  downgrade.bogus.test  valid MX, forged denial of TLSA/AAAA (dnslib)
  insecure.test         unsigned: MX mail.insecure.test (in the cert)
  noname.insecure.test  unsigned: MX mx-noname (not in the cert)
  fakedane.insecure.test  unsigned: MX mx-fakedane (not in the cert), with
                        an (unsigned, so unusable) TLSA 3 1 1 = Postfix key
  stsok/stsbad.insecure.test  unsigned, MTA-STS enforce policies whose
                        `mx` matches / does not match mx-sts (in the cert)
  stssig.secure.test    signed, MX mx-sts.secure.test (in the cert) without
                        TLSA, MTA-STS enforce policy `mx: *.secure.test`

Where the cases could fall back to PKIX, the downstream's `ca_file` is the
CA `mx`, so that a fallback would succeed and be seen. Every deferral is
checked: the message stays upstream, `connector_deferred` is logged (or the
run fails with error=downstream) and nothing arrived at Postfix.

Needs root and the Debian packages postfix, dovecot-core, dovecot-lmtpd,
dovecot-pop3d, nsd, ldnsutils, openssl.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import time

import pytest

import connectorlib as cl
import dnslib
import peers
import syslib
from conftest import require_tool
from syslib import make_message
from test_connector_downstream import arrivals, check_forwarded, without_return_path

TEST_TIMEOUT = 180
SERVER_SETTINGS = {("log", "format"): "json"}

# Names in Postfix's certificate (the others are deliberately missing).
CERT_NAMES = ["mx-badtlsa.secure.test", "mx-ta0.secure.test", "mx-ta1.secure.test", "mx-sts.secure.test",
              "mail.bogus.test",
              "mail.insecure.test", "mx-sts.insecure.test"]
DOMAINS = ["ee.secure.test", "badtlsa.secure.test", "ta0.secure.test", "ta1.secure.test", "tanoname.secure.test",
           "stssig.secure.test", "bogus.test", "downgrade.bogus.test", "insecure.test", "noname.insecure.test",
           "fakedane.insecure.test", "stsok.insecure.test", "stsbad.insecure.test"]
LOCALS = ["a", "b", "c"]
STS_OK = "version: STSv1\nmode: enforce\nmx: mx-sts.insecure.test\nmax_age: 86400\n"
STS_SIGNED = "version: STSv1\nmode: enforce\nmx: *.secure.test\nmax_age: 86400\n"
STS_BAD = "version: STSv1\nmode: enforce\nmx: mx-other.insecure.test\nmx: *.elsewhere.test\nmax_age: 86400\n"


def der(pem) -> bytes:
    return subprocess.run(["openssl", "x509", "-in", str(pem), "-outform", "DER"], capture_output=True,
                          check=True, timeout=30).stdout


def spki_sha256(pem) -> str:
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo (TLSA selector 1, matching 1)."""
    return base64.b64decode(peers.TestCA.spki_pin(pem).removeprefix("sha256/")).hex()


class MxPostfix(peers.PostfixDownstream):
    """PostfixDownstream accepting several domains (the recipient domains of
    the MX tests), with mailboxes LOCALS in each."""

    def __init__(self, root, smtp_port, domains):
        super().__init__(root, smtp_port, " ".join(domains))
        self.domains = domains

    def configure(self, _mailboxes, cert):
        super().configure([], cert)
        (self.conf / "vmailbox").write_text("".join(f"{m}@{d} {d}/{m}/\n" for d in self.domains for m in LOCALS))
        self.postmap(self.conf / "vmailbox")

    def messages(self, address: str) -> list[bytes]:
        local, domain = address.split("@")
        md = self.root / "vmail" / domain / local
        files = sorted(p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()
                       if p.is_file())
        return [peers.crlf(f.read_bytes()) for f in files]

    def everything(self) -> int:
        vmail = self.root / "vmail"
        return sum(1 for p in vmail.rglob("*") if p.is_file() and p.parent.name in ("new", "cur"))


@pytest.fixture(scope="module")
def mx_ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("mx-ca"), "mx")


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("wrong-ca"), "wrong")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    up_ca = peers.TestCA(tmp_path_factory.mktemp("up-ca"), "up-ca")
    with peers.running("pop3connex-upstream-", peers.PrivateDovecot,
                       {"seed": syslib.new_password()}, pop3=True, cert=up_ca.issue("upstream"), ca=up_ca) as d:
        yield d


@pytest.fixture(scope="module")
def postfix(mx_ca):
    peers.PrivatePostfix.check_installed()
    root = peers.world_readable_tmpdir("pop3connex-mx-postfix-")
    pf = MxPostfix(root, syslib.free_port(), DOMAINS)
    try:
        leaf, key = mx_ca.issue("postfix-mx", tuple(f"DNS:{n}" for n in CERT_NAMES))
        chain = leaf.with_name("postfix-mx-chain.pem")
        chain.write_text(leaf.read_text() + mx_ca.cert.read_text())  # leaf + CA, for DANE-TA
        pf.leaf = leaf
        pf.configure([], (chain, key))
        pf.start()
        yield pf
    finally:
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)


def extra_records(port: int, leaf_spki: str, other_spki: str, ca_der: str, ca_spki: str) -> dict[str, str]:
    def mx(domain: str, host: str, tlsa: str | None = None) -> str:
        out = f"{domain}. 300 IN MX 10 {host}.\n{host}. 300 IN A 127.0.0.1\n"
        if tlsa:
            out += f"_{port}._tcp.{host}. 300 IN TLSA {tlsa}\n"
        return out

    def sts(domain: str) -> str:
        return (f'_mta-sts.{domain}. 300 IN TXT "v=STSv1; id=20261129T1300"\n'
                f"mta-sts.{domain}. 300 IN A 127.0.0.1\n")

    return {
        "secure.test.": (mx("ee.secure.test", "mx-ee.secure.test", f"3 1 1 {leaf_spki}")
                         + mx("badtlsa.secure.test", "mx-badtlsa.secure.test", f"3 1 1 {other_spki}")
                         + mx("ta0.secure.test", "mx-ta0.secure.test", f"2 0 1 {ca_der}")
                         + mx("ta1.secure.test", "mx-ta1.secure.test", f"2 1 1 {ca_spki}")
                         + mx("tanoname.secure.test", "mx-tanoname.secure.test", f"2 1 1 {ca_spki}")
                         + mx("stssig.secure.test", "mx-sts.secure.test") + sts("stssig.secure.test")),
        "insecure.test.": (mx("noname.insecure.test", "mx-noname.insecure.test")
                           + mx("fakedane.insecure.test", "mx-fakedane.insecure.test", f"3 1 1 {leaf_spki}")
                           + "stsok.insecure.test. 300 IN MX 10 mx-sts.insecure.test.\n"
                           + "stsbad.insecure.test. 300 IN MX 10 mx-sts.insecure.test.\n"
                           + "mx-sts.insecure.test. 300 IN A 127.0.0.1\n"
                           + sts("stsok.insecure.test") + sts("stsbad.insecure.test")),
    }


@pytest.fixture(scope="module")
def dns(tmp_path_factory, postfix, mx_ca, wrong_ca):
    for t in ("nsd", "nsd-checkconf", "ldns-keygen", "ldns-signzone", "ldns-key2ds", "openssl"):
        require_tool(t)
    base = tmp_path_factory.mktemp("mx-dns")
    other_leaf, _ = wrong_ca.issue("other-key", ("DNS:mx-badtlsa.secure.test",))
    nsd = dnslib.Nsd(base, extra_records(
        postfix.smtp_port, spki_sha256(postfix.leaf), spki_sha256(other_leaf),
        hashlib.sha256(der(mx_ca.cert)).hexdigest(), spki_sha256(mx_ca.cert)))
    servers = {}
    try:
        for domain, policy in (("stsok.insecure.test", STS_OK), ("stsbad.insecure.test", STS_BAD),
                               ("stssig.secure.test", STS_SIGNED)):
            name = domain.split(".")[0]
            servers[name] = dnslib.PolicyServer(*mx_ca.issue(f"sts-{name}", (f"DNS:mta-sts.{domain}",)), policy)
        yield {"nsd": nsd, **servers}
    finally:
        for s in servers.values():
            s.stop()
        nsd.stop()


@pytest.fixture
def fwd(module_server, upstream, postfix, dns, mx_ca):
    """An upstream mailbox, and a way to configure the account forwarding it
    by MX to one address."""
    class Fwd:
        up_user = syslib.unique_name("upmx")
        up_pw = upstream.add_user(up_user)
        acct = syslib.unique_name("mx")

        def fill(self, msgs):
            for m in msgs:
                upstream.deliver(f"{self.up_user}@upstream.test", m)
            return upstream.upstream(self.up_user)

        def configure(self, rcpt: str, tls: str | None, ca_file=None, sts: str = "stsok", auth: bool = False):
            down = {"name": "mx", "protocol": "smtp", "port": postfix.smtp_port, "helo": "connector.test",
                    "timeout_secs": 10}
            if auth:
                down["auth_user"] = "relay"
                down["auth_password"] = cl.secret_file(module_server, "relay-" + self.acct, "relay-secret")
            if tls is not None:
                down["tls"] = tls
            if ca_file is not None:
                down["ca_file"] = str(ca_file)
            a = cl.account(self.acct, port=upstream.pop3s_port, user=self.up_user,
                           password=cl.secret_file(module_server, self.acct, self.up_pw),
                           ca_file=upstream.ca.cert, delete="after-delivery",
                           route={"deliver_to": {"forward": rcpt, "via": "mx"}})
            resolver = {"nameservers": [f"127.0.0.1:{dns['nsd'].port}"],
                        "trust_anchor_file": str(dns["nsd"].anchor), "timeout_ms": 2000,
                        "mta_sts_port": dns[sts].port, "mta_sts_ca_file": str(mx_ca.cert)}
            cl.write_connector(module_server, [a], [down], retry_base_secs=10, retry_max_secs=20, dns=resolver)

        def upstream_now(self):
            return upstream.upstream(self.up_user)

    cl.write_connector(module_server, [])
    return Fwd()


# --------------------------------------------------------------------------
# outcomes
# --------------------------------------------------------------------------

def delivered(srv, postfix, fwd, rcpt: str, tag: str):
    """One message forwarded by MX: arrived at Postfix intact over TLS, gone upstream."""
    before = len(postfix.messages(rcpt))
    ups = fwd.fill([make_message(f"mx-{tag}")])
    cl.run_ok(srv, fwd.acct, fetched=1, forwarded=1, deleted=1, deferred=0, quarantined=0)
    got = arrivals(lambda: postfix.messages(rcpt)[before:], 1, f"the message at Postfix for {rcpt}")
    assert len(got) == 1, got
    found = check_forwarded(got[0], without_return_path(ups[0][1]), downstream_received=1)
    pf_received = [raw for name, raw in found if name == "received"][0]
    assert b"postfix.test.invalid" in pf_received and b"TLS" in pf_received, f"not over TLS: {pf_received!r}"
    assert fwd.upstream_now() == []


def deferred(srv, postfix, fwd, rcpt: str, tag: str, reason: str) -> cl.Run:
    """One message deferred: still upstream, `connector_deferred` whose detail
    contains `reason`, nothing at Postfix."""
    total = postfix.everything()
    ups = fwd.fill([make_message(f"mx-{tag}")])
    r = cl.run_once(srv, fwd.acct, timeout=90)
    if r.rc == 0:
        c = r.counts(fwd.acct)
        assert (c["deferred"], c["forwarded"], c["quarantined"], c["deleted"]) == (1, 0, 0, 0), r.describe()
    else:
        assert r.errors.get(fwd.acct, ("",))[0] == "downstream", r.describe()
    details = [str(e.get("detail")) for e in r.events if e.get("event") == "connector_deferred"]
    assert details, f"no connector_deferred event\n{r.describe()}"
    assert any(reason in d for d in details), f"expected {reason!r} in the deferral's detail\n{r.describe()}"
    assert fwd.upstream_now() == ups, "a deferred message must stay upstream"
    time.sleep(1)
    assert postfix.everything() == total, f"mail arrived at Postfix although it had to be deferred\n{postfix.log()}"
    assert "Mail queue is empty" in postfix.queue()
    return r


# --------------------------------------------------------------------------
# DANE
# --------------------------------------------------------------------------

def test_dane_ee_authenticates_an_untrusted_certificate(module_server, postfix, fwd, wrong_ca):
    # mx-ee.secure.test is not in Postfix's certificate, whose CA the
    # downstream does not trust: only the 3 1 1 record can authenticate it.
    fwd.configure("a@ee.secure.test", "dane", ca_file=wrong_ca.cert)
    delivered(module_server, postfix, fwd, "a@ee.secure.test", "dane-ee")


def test_dane_ee_default_policy_and_system_roots(module_server, postfix, fwd):
    # `tls` left out: MX delivery defaults to dane; no ca_file (system roots).
    fwd.configure("b@ee.secure.test", None)
    delivered(module_server, postfix, fwd, "b@ee.secure.test", "dane-default")


def test_dane_tlsa_mismatch_defers_without_pkix_fallback(module_server, postfix, fwd, mx_ca):
    # The certificate would verify by PKIX (CA trusted, name present), but a
    # secure TLSA record that does not match must not fall back to it.
    fwd.configure("a@badtlsa.secure.test", "dane", ca_file=mx_ca.cert)
    deferred(module_server, postfix, fwd, "a@badtlsa.secure.test", "dane-mismatch",
             reason="no TLSA record matches")


@pytest.mark.parametrize("domain", ["ta0.secure.test", "ta1.secure.test"])
def test_dane_ta_delivers(module_server, postfix, fwd, wrong_ca, domain):
    # 2 0 1 (CA certificate) / 2 1 1 (CA key); the CA is not in ca_file.
    fwd.configure(f"a@{domain}", "dane", ca_file=wrong_ca.cert)
    delivered(module_server, postfix, fwd, f"a@{domain}", f"dane-ta-{domain}")


def test_dane_ta_checks_the_mx_name(module_server, postfix, fwd, mx_ca):
    # Chains to the DANE-TA anchor, but mx-tanoname is not in the certificate.
    fwd.configure("a@tanoname.secure.test", "dane", ca_file=mx_ca.cert)
    deferred(module_server, postfix, fwd, "a@tanoname.secure.test", "dane-ta-noname",
             reason="no TLSA record matches")


@pytest.mark.parametrize("domain", ["bogus.test", "downgrade.bogus.test"])
def test_bogus_dnssec_fails_closed(module_server, postfix, fwd, mx_ca, domain):
    # The certificate is valid for mail.bogus.test and its CA is trusted, so
    # any fallback to PKIX would deliver.
    fwd.configure(f"a@{domain}", "dane", ca_file=mx_ca.cert)
    deferred(module_server, postfix, fwd, f"a@{domain}", f"bogus-{domain}", reason="DNSSEC validation failed")
    assert postfix.messages(f"a@{domain}") == []


# --------------------------------------------------------------------------
# no DANE: verified TLS to the MX name
# --------------------------------------------------------------------------

def test_insecure_domain_verified_tls_with_ca_file(module_server, postfix, fwd, mx_ca):
    fwd.configure("a@insecure.test", "dane", ca_file=mx_ca.cert)
    delivered(module_server, postfix, fwd, "a@insecure.test", "insecure-verified")


def test_insecure_domain_untrusted_certificate_defers(module_server, postfix, fwd, wrong_ca):
    fwd.configure("b@insecure.test", "dane", ca_file=wrong_ca.cert)
    deferred(module_server, postfix, fwd, "b@insecure.test", "insecure-untrusted",
             reason="invalid peer certificate")


def test_insecure_domain_certificate_name_must_be_the_mx(module_server, postfix, fwd, mx_ca):
    fwd.configure("a@noname.insecure.test", "dane", ca_file=mx_ca.cert)
    deferred(module_server, postfix, fwd, "a@noname.insecure.test", "insecure-noname",
             reason="not valid for name")


def test_unsigned_tlsa_is_not_dane(module_server, postfix, fwd, wrong_ca):
    # The same 3 1 1 record that delivers for ee.secure.test, but unsigned:
    # it must not authenticate the untrusted certificate.
    fwd.configure("a@fakedane.insecure.test", "dane", ca_file=wrong_ca.cert)
    deferred(module_server, postfix, fwd, "a@fakedane.insecure.test", "insecure-fakedane",
             reason="invalid peer certificate")


# --------------------------------------------------------------------------
# MTA-STS
# --------------------------------------------------------------------------

def test_mta_sts_enforce_matching_mx_delivers(module_server, postfix, fwd, dns, mx_ca):
    fwd.configure("a@stsok.insecure.test", "mta-sts", ca_file=mx_ca.cert, sts="stsok")
    hits = dns["stsok"].hits
    delivered(module_server, postfix, fwd, "a@stsok.insecure.test", "sts-ok")
    assert dns["stsok"].hits > hits, "the MTA-STS policy was never fetched"


def test_signed_domain_without_tlsa_uses_mta_sts(module_server, postfix, fwd, dns, mx_ca):
    # dane: MX secure but no TLSA at the MX host -> the MTA-STS rules.
    fwd.configure("a@stssig.secure.test", "dane", ca_file=mx_ca.cert, sts="stssig")
    hits = dns["stssig"].hits
    delivered(module_server, postfix, fwd, "a@stssig.secure.test", "sts-signed")
    assert dns["stssig"].hits > hits, "the MTA-STS policy was never fetched"


@pytest.mark.parametrize("tls", ["mta-sts", "dane"])
def test_mta_sts_enforce_foreign_mx_defers(module_server, postfix, fwd, dns, mx_ca, tls):
    # mx-sts.insecure.test would verify, but the policy does not list it.
    fwd.configure("a@stsbad.insecure.test", tls, ca_file=mx_ca.cert, sts="stsbad")
    hits = dns["stsbad"].hits
    deferred(module_server, postfix, fwd, "a@stsbad.insecure.test", f"sts-bad-{tls}",
             reason="not allowed by the MTA-STS policy")
    assert dns["stsbad"].hits > hits, "the MTA-STS policy was never fetched"


# --------------------------------------------------------------------------
# SMTP AUTH
# --------------------------------------------------------------------------

@pytest.mark.parametrize("tls", ["verify", "secure", "mta-sts"])
def test_config_check_refuses_smtp_auth_to_mx_chosen_by_unsigned_dns(module_server, fwd, mx_ca, tls):
    fwd.configure("a@insecure.test", tls, ca_file=mx_ca.cert, auth=True)
    bad = module_server.cli("config", "check", check=False)
    out = (bad.stdout + bad.stderr).decode(errors="replace")
    assert bad.returncode != 0 and 'needs tls = "dane"' in out, out
    fwd.configure("a@insecure.test", "dane", ca_file=mx_ca.cert, auth=True)
    ok = module_server.cli("config", "check", check=False)
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode(errors="replace")


def test_smtp_auth_is_never_sent_to_an_mx_chosen_by_unsigned_dns(module_server, postfix, fwd, mx_ca, wrong_ca):
    # `dane` for an unsigned domain falls back to certificate checks, which
    # pass here (CA trusted, MX name in the certificate): the MX host was
    # still picked by unsigned DNS, so the credentials are withheld and the
    # mail deferred.
    fwd.configure("a@insecure.test", "dane", ca_file=mx_ca.cert, auth=True)
    deferred(module_server, postfix, fwd, "a@insecure.test", "auth-unsigned", reason="not authenticated by DANE")
    # A DANE-authenticated MX host passes the guard and gets as far as AUTH
    # (this Postfix offers none, so that attempt defers too).
    fwd.configure("a@ee.secure.test", "dane", ca_file=wrong_ca.cert, auth=True)
    deferred(module_server, postfix, fwd, "a@ee.secure.test", "auth-dane", reason="does not offer AUTH PLAIN")
