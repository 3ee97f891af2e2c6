"""JWT checks at the gateway against tokens made by an independent library (PyJWT with
`cryptography`): every algorithm with its static key (PEM public key or HS256 secret) and
from a JWKS, then a negative corpus — `alg: none`, key-type confusion (an RSA public key
used as an HMAC secret), algorithms the issuer does not pin, expired and not-yet-valid
tokens, string-typed `exp`/`nbf`, wrong `iss`/`aud`, an unknown `kid`, a forged signature,
`crit` — each of which must be refused with 401 before the upstream sees it."""

import base64
import hashlib
import hmac
import http.client
import json
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import EchoUpstream

ISS = "https://issuer.test"
AUD = "shop"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, claims: dict) -> str:
    """A token assembled by hand, for shapes PyJWT refuses to produce."""
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), ""])


def hs256(claims: dict, key: bytes, header: dict | None = None) -> str:
    """HS256 by hand: PyJWT (rightly) refuses a PEM public key as an HMAC secret."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", **(header or {})}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def get(addr: str, path: str, token: str | None):
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.getheader("www-authenticate"), body


def test_pyjwt_tokens_and_a_negative_corpus(gateway, upstream, tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    # The gateway drops trailing CR/LF from a secret file (as `echo secret > file` adds
    # one), so the random secret must not end in one; the file gets a newline to prove it.
    secret = os.urandom(47) + b"s"
    files = {
        "rsa.pem": pem_public(rsa_key),
        "ec.pem": pem_public(ec_key),
        "ed.pem": pem_public(ed_key),
        "secret": secret + b"\n",
    }
    jwks = {"keys": []}
    for kid, key, alg in [("r1", rsa_key, jwt.algorithms.RSAAlgorithm),
                          ("e1", ec_key, jwt.algorithms.ECAlgorithm),
                          ("d1", ed_key, jwt.algorithms.OKPAlgorithm)]:
        jwk = json.loads(alg.to_jwk(key.public_key()))
        jwk["kid"] = kid
        jwks["keys"].append(jwk)
    files["jwks.json"] = json.dumps(jwks).encode()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    p = lambda name: json.dumps(str(tmp_path / name))  # noqa: E731

    issuers = {
        "rsa": f"public_key_file = {p('rsa.pem')}\nalgorithms = [\"RS256\"]",
        "ec": f"public_key_file = {p('ec.pem')}\nalgorithms = [\"ES256\"]",
        "ed": f"public_key_file = {p('ed.pem')}\nalgorithms = [\"EdDSA\"]",
        "hs": f"hs256_secret_file = {p('secret')}\nalgorithms = [\"HS256\"]",
        "jwks": f"jwks_file = {p('jwks.json')}\nalgorithms = [\"RS256\", \"ES256\", \"EdDSA\"]",
    }
    config = ""
    for name, source in issuers.items():
        config += f"""
[jwt.{name}]
{source}
issuer = "{ISS}"
audience = "{AUD}"
clock_skew = "30s"
forward = {{ "x-user" = "sub" }}

[[routes]]
path = {{ prefix = "/{name}" }}
upstream = "echo"
auth = {{ jwt = "{name}" }}
"""
    config += f'\n[upstreams.echo]\nendpoints = ["127.0.0.1:{upstream}"]\n'
    addr, _ = gateway(config)

    now = int(time.time())
    good = {"sub": "ada", "iss": ISS, "aud": AUD, "exp": now + 600, "nbf": now - 10}
    rsa_pem = files["rsa.pem"]

    # The hand-made HS256 is right: the same claims pass.
    assert get(addr, "/hs", hs256(good, secret))[0] == 200
    valid = [
        ("/rsa", jwt.encode(good, rsa_key, algorithm="RS256")),
        ("/ec", jwt.encode(good, ec_key, algorithm="ES256")),
        ("/ed", jwt.encode(good, ed_key, algorithm="EdDSA")),
        ("/hs", jwt.encode(good, secret, algorithm="HS256")),
        ("/jwks", jwt.encode(good, rsa_key, algorithm="RS256", headers={"kid": "r1"})),
        ("/jwks", jwt.encode(good, ec_key, algorithm="ES256", headers={"kid": "e1"})),
        ("/jwks", jwt.encode(good, ed_key, algorithm="EdDSA", headers={"kid": "d1"})),
        # Within the configured clock skew.
        ("/rsa", jwt.encode({**good, "exp": now - 5}, rsa_key, algorithm="RS256")),
    ]
    for path, token in valid:
        status, _, body = get(addr, path, token)
        assert status == 200, (path, status, body)
        assert json.loads(body)["headers"]["x-user"] == "ada", body

    # A valid RS256 token with one part changed.
    forged = jwt.encode(good, rsa_key, algorithm="RS256").split(".")
    forged[1] = b64(json.dumps({**good, "sub": "root"}).encode())
    corpus = [
        ("no token", "/rsa", None),
        ("not a JWT", "/rsa", "abc"),
        ("alg none", "/rsa", unsigned({"alg": "none", "typ": "JWT"}, good)),
        ("alg none, lower-case", "/hs", unsigned({"alg": "none"}, good)),
        # Key confusion: the RSA public key as an HMAC secret, sent to the RSA issuer
        # (HS256 not pinned there) and via a JWKS kid that names the RSA key.
        ("RSA key as HMAC secret", "/rsa", hs256(good, rsa_pem)),
        ("HS256 naming an RSA kid", "/jwks", hs256(good, rsa_pem, {"kid": "r1"})),
        ("RS256 to an HS256 issuer", "/hs", jwt.encode(good, rsa_key, algorithm="RS256")),
        ("ES256 to the RSA issuer", "/rsa", jwt.encode(good, ec_key, algorithm="ES256")),
        ("RS384, not pinned", "/rsa", jwt.encode(good, rsa_key, algorithm="RS384")),
        ("wrong HMAC secret", "/hs", jwt.encode(good, os.urandom(48), algorithm="HS256")),
        ("forged payload", "/rsa", ".".join(forged)),
        ("expired", "/rsa", jwt.encode({**good, "exp": now - 120}, rsa_key, algorithm="RS256")),
        ("not yet valid", "/ec", jwt.encode({**good, "nbf": now + 120}, ec_key, algorithm="ES256")),
        ("exp as a string", "/hs", hs256({**good, "exp": str(now + 600)}, secret)),
        ("nbf as a string", "/hs", hs256({**good, "nbf": str(now - 10)}, secret)),
        ("wrong issuer", "/ed", jwt.encode({**good, "iss": "https://evil.test"}, ed_key, algorithm="EdDSA")),
        ("wrong audience", "/ed", jwt.encode({**good, "aud": "admin"}, ed_key, algorithm="EdDSA")),
        ("no audience", "/ed", jwt.encode({k: v for k, v in good.items() if k != "aud"}, ed_key, algorithm="EdDSA")),
        ("unknown kid", "/jwks", jwt.encode(good, rsa_key, algorithm="RS256", headers={"kid": "nope"})),
        ("kid of another key type", "/jwks", jwt.encode(good, rsa_key, algorithm="RS256", headers={"kid": "e1"})),
        ("crit header", "/ec", jwt.encode(good, ec_key, algorithm="ES256", headers={"crit": ["exp"]})),
        ("signature of another token", "/ed", ".".join(
            jwt.encode(good, ed_key, algorithm="EdDSA").split(".")[:2]
            + [jwt.encode({**good, "sub": "x"}, ed_key, algorithm="EdDSA").split(".")[2]])),
    ]
    before = EchoUpstream.hits
    for what, path, token in corpus:
        status, challenge, body = get(addr, path, token)
        assert status == 401, (what, status, body)
        assert challenge and challenge.startswith("Bearer"), (what, challenge)
        assert json.loads(body)["code"] == "unauthorized", (what, body)
    assert EchoUpstream.hits == before, "a refused token reached the upstream"
