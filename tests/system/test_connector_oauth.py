"""The connector logging in upstream with XOAUTH2: the upstream is a second
POP3conneX server that accepts JWTs (verified against a JWKS file made
here); the access tokens come from an HTTPS token endpoint run by the test
(certificate from the test CA) that accepts only grant_type=refresh_token
with the current refresh token and rotates it on every refresh.

Checked: mail is fetched byte for byte; the endpoint saw the refresh with
the configured token; after rotation the next run uses the new refresh
token (the old one is refused by the endpoint); a revoked refresh token or
an unverifiable token endpoint fails with a clear error and fetches
nothing, and no refresh token is sent to an endpoint that did not verify.

Python: pyjwt[crypto] (installed by scripts/test.sh).
"""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import connectorlib as cl
import peers
import syslib
from syslib import make_message

TEST_TIMEOUT = 120
ISSUER = "https://idp.test/realms/mail"
AUDIENCE = "pop3connex"
CLIENT_ID = "pop3connex-connector-test"


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def upstream(server_factory, key, tmp_path):
    """A POP3conneX that accepts XOAUTH2 with JWTs from ISSUER."""
    jwks = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": "rsa-1",
                      "use": "sig"}]}
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(json.dumps(jwks))
    srv = server_factory({("auth", "failure_delay_ms"): 0}, start=False, name="upstream")
    with open(srv.config, "a") as f:
        f.write(f'\n[[oauth.issuer]]\nissuer = "{ISSUER}"\naudiences = ["{AUDIENCE}"]\n'
                f'jwks_file = "{jwks_path}"\nalgorithms = ["RS256"]\n'
                'username_claim = "preferred_username"\n')
    srv.start()
    return srv


@pytest.fixture
def local(server_factory):
    return server_factory({("log", "format"): "json"}, name="local")


class Setup:
    pass


@pytest.fixture
def setup(upstream, local, key, ca):
    s = Setup()
    s.up_user = syslib.unique_name("oaup")
    upstream.add_user(s.up_user, syslib.new_password())
    s.local_user, s.local_pw = syslib.unique_name("oalo"), syslib.new_password()
    local.add_user(s.local_user, s.local_pw)

    def mint():
        now = int(time.time())
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "opaque", "preferred_username": s.up_user,
                           "iat": now, "nbf": now - 5, "exp": now + 300}, key, algorithm="RS256",
                          headers={"kid": "rsa-1"})
    s.client_secret = "cs-" + syslib.new_password()
    # expires_in = 1: the connector must refresh on every run
    s.endpoint = peers.TokenEndpoint(ca.issue("idp"), CLIENT_ID, "rt-initial", mint,
                                     client_secret=s.client_secret, expires_in=1)
    s.refresh_ref = cl.secret_file(local, "refresh-token", "rt-initial")
    s.secret_ref = cl.secret_file(local, "client-secret", s.client_secret)

    def configure(token_ca=ca.cert):
        a = cl.account("oauthacct", port=upstream.ports.pop3s, user=s.up_user, password=None,
                       ca_file=upstream.ca, local=s.local_user, auth="xoauth2", delete="after-delivery",
                       oauth2={"token_url": s.endpoint.url, "client_id": CLIENT_ID,
                               "client_secret": s.secret_ref, "refresh_token": s.refresh_ref,
                               "ca_file": str(token_ca)})
        cl.write_connector(local, [a])
    s.configure = configure

    yield s
    s.endpoint.stop()


def deliver_upstream(upstream, user, tag) -> bytes:
    msg = make_message(tag, eight_bit=True, to=f"{user}@localhost")
    assert upstream.deliver([f"{user}@localhost"], msg) == {f"{user}@localhost": 250}
    return msg


def test_xoauth2_refresh_and_rotation(upstream, local, setup):
    s = setup
    sent1 = deliver_upstream(upstream, s.up_user, "oa-1")
    s.configure()
    cl.run_ok(local, "oauthacct", fetched=1, delivered=1, deleted=1)
    got = cl.local_messages(local, s.local_user, s.local_pw)
    assert len(got) == 1
    # the upstream (the final delivery agent) adds trace headers; the
    # connector stores what upstream RETR served, which ends with the message
    assert got[0].endswith(sent1), got[0][:400]
    reqs = [r for r in s.endpoint.requests if r.get("grant_type") == "refresh_token"]
    assert len(reqs) >= 1 and reqs[0]["refresh_token"] == "rt-initial", s.endpoint.requests
    assert reqs[0].get("client_id") == CLIENT_ID and reqs[0].get("client_secret") == s.client_secret
    assert reqs[0]["content_type"].startswith("application/x-www-form-urlencoded"), reqs[0]
    assert 'mechanism="XOAUTH2"' in upstream.log_text(), "upstream login was not XOAUTH2"
    rotated = s.endpoint.issued[-1]

    time.sleep(2)  # the access token (expires_in = 1) is stale now
    sent2 = deliver_upstream(upstream, s.up_user, "oa-2")
    n_before = len(s.endpoint.requests)
    cl.run_ok(local, "oauthacct", fetched=1, delivered=1)
    new = s.endpoint.requests[n_before:]
    assert new, "the second run did not refresh the (expired) access token"
    assert new[0]["refresh_token"] == rotated, (f"the second run used {new[0]['refresh_token']!r}, "
                                                f"not the rotated refresh token {rotated!r}")
    assert all(r["refresh_token"] != "rt-initial" for r in new), "the replaced refresh token was used again"
    got = cl.local_messages(local, s.local_user, s.local_pw)
    assert len(got) == 2 and got[1].endswith(sent2)
    # no token reaches the log or the output
    assert rotated not in local.log_text()


def test_revoked_refresh_token_is_an_oauth_error(upstream, local, setup):
    s = setup
    deliver_upstream(upstream, s.up_user, "oa-revoked")
    s.endpoint.refresh_token = "rt-someone-else"  # the grant was revoked
    s.configure()
    r = cl.run_fails(local, "oauthacct", ("oauth", "auth"))
    assert "rt-initial" not in r.stdout + r.stderr, "the refresh token reached the output"
    assert cl.local_messages(local, s.local_user, s.local_pw) == []
    assert upstream.mailbox_stat(s.up_user)[0] == 1


def test_unverifiable_token_endpoint_gets_no_refresh_token(upstream, local, setup, tmp_path):
    s = setup
    deliver_upstream(upstream, s.up_user, "oa-wrongca")
    other = peers.TestCA(tmp_path / "other", "other")
    s.configure(token_ca=other.cert)
    cl.run_fails(local, "oauthacct", ("oauth", "tls"))
    assert s.endpoint.requests == [], "a request reached a token endpoint whose certificate did not verify"
    assert cl.local_messages(local, s.local_user, s.local_pw) == []
