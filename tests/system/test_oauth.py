"""OAuth 2.0 login with a real client: mpop (GNU SASL's OAUTHBEARER and
XOAUTH2) presenting JWTs minted here with RS256 and ES256 keys generated
here, verified by the server against a JWKS file. Expired, wrong-audience,
wrong-issuer, alg:none and unknown-kid tokens must be refused."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import syslib
from conftest import require_tool

TEST_TIMEOUT = 120
ISSUER = "https://idp.test/realms/mail"
AUDIENCE = "pop3connex"


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1())}


@pytest.fixture
def oauth_server(server_factory, keys, tmp_path):
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa"].public_key())), "kid": "rsa-1", "use": "sig"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys["ec"].public_key())), "kid": "ec-1", "use": "sig"},
    ]}
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(json.dumps(jwks))
    srv = server_factory({("auth", "failure_delay_ms"): 0, ("pop3", "max_auth_failures"): 20}, start=False)
    with open(srv.config, "a") as f:
        f.write(f'\n[[oauth.issuer]]\nissuer = "{ISSUER}"\naudiences = ["{AUDIENCE}"]\n'
                f'jwks_file = "{jwks_path}"\nalgorithms = ["RS256", "ES256"]\n'
                'username_claim = "preferred_username"\n')
    srv.start()
    return srv


def token(keys, user, alg="RS256", kid=None, **over):
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "opaque-id", "preferred_username": user,
              "iat": now, "nbf": now - 5, "exp": now + 600, **over}
    if alg == "none":
        header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT","kid":"rsa-1"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"{header}.{body}.x"
    key = keys["rsa"] if alg == "RS256" else keys["ec"]
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid or ("rsa-1" if alg == "RS256" else "ec-1")})


def mpop(srv: syslib.Server, tmp: Path, user: str, mech: str, tok: str) -> tuple[int, str, Path]:
    tool = require_tool("mpop")
    out = tmp / f"md-{mech}-{time.monotonic_ns()}"
    for sub in ("cur", "new", "tmp"):
        (out / sub).mkdir(parents=True)
    rc = tmp / f"mpoprc-{time.monotonic_ns()}"
    # mpop limits config lines to 500 characters: hand the token over by
    # passwordeval, as a token helper would.
    tok_file = tmp / f"token-{time.monotonic_ns()}"
    tok_file.write_text(tok)
    tok_file.chmod(0o600)
    rc.write_text(f"account t\nhost localhost\nport {srv.ports.pop3s}\ntls on\ntls_starttls off\n"
                  f"tls_trust_file {srv.ca}\nuser {user}\nauth {mech}\npasswordeval \"cat {tok_file}\"\n"
                  f"delivery maildir {out}\nuidls_file {tmp / 'uidls'}\nkeep on\n")
    rc.chmod(0o600)
    cp = subprocess.run([tool, "-C", str(rc), "-a", "-d"], capture_output=True, timeout=60)
    return cp.returncode, cp.stdout.decode(errors="replace") + cp.stderr.decode(errors="replace"), out


@pytest.mark.parametrize("mech,alg", [("oauthbearer", "RS256"), ("xoauth2", "ES256"),
                                      ("oauthbearer", "ES256"), ("xoauth2", "RS256")])
def test_mpop_logs_in_with_a_valid_token(oauth_server, keys, tmp_path, mech, alg):
    name = syslib.unique_name("oa")
    oauth_server.add_user(name, syslib.new_password())
    msg = f"Subject: oauth {mech}\r\nTo: {name}@example.org\r\n\r\nhello\r\n".encode()
    oauth_server.deliver([f"{name}@example.org"], msg)
    rc, log, out = mpop(oauth_server, tmp_path, name, mech, token(keys, name, alg))
    assert rc == 0, log
    assert f"--> AUTH {mech.upper()}" in log, log
    files = list((out / "new").iterdir())
    assert len(files) == 1 and files[0].read_bytes().replace(b"\n", b"\r\n").endswith(msg), log
    assert f'mechanism="{mech.upper()}"' in oauth_server.log_text()


@pytest.mark.parametrize("case", ["expired", "wrong-audience", "wrong-issuer", "alg-none", "unknown-kid",
                                  "other-user", "tampered"])
@pytest.mark.parametrize("mech", ["oauthbearer", "xoauth2"])
def test_bad_tokens_are_refused(oauth_server, keys, tmp_path, case, mech):
    name = syslib.unique_name("ob")
    oauth_server.add_user(name, syslib.new_password())
    now = int(time.time())
    tok = {
        "expired": lambda: token(keys, name, exp=now - 3600, iat=now - 7200, nbf=now - 7200),
        "wrong-audience": lambda: token(keys, name, aud="someone-else"),
        "wrong-issuer": lambda: token(keys, name, iss="https://evil.test/"),
        "alg-none": lambda: token(keys, name, alg="none"),
        "unknown-kid": lambda: token(keys, name, kid="rsa-404"),
        "other-user": lambda: token(keys, "someone" + name),
        "tampered": lambda: (lambda t: t[:-6] + ("AAAAAA" if not t.endswith("AAAAAA") else "BBBBBB"))(token(keys, name)),
    }[case]()
    rc, log, out = mpop(oauth_server, tmp_path, name, mech, tok)
    assert rc != 0, f"{case}: login must fail\n{log}"
    assert "-ERR [AUTH]" in log or "authentication failed" in log.lower(), log
    assert not list((out / "new").iterdir())
    assert 'event="auth_failure"' in oauth_server.log_text()
    assert tok not in oauth_server.log_text(), "tokens never reach the log"
