"""SSO / zero-trust JWT identity against a real `tollway serve`.

A small identity provider runs on loopback: it serves a JWKS (RSA and EC keys generated here) and
counts how often it is fetched. Tokens are minted with PyJWT (or by hand, for the forged ones) and
sent through the official SDKs (`api_key=<jwt>`) and through `Cf-Access-Jwt-Assertion`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.helpers import SIM_KEYS, Deployment, GatewayProcess

pytestmark = pytest.mark.timeout(90)

ISSUER = "https://login.acme-sso.test/"
AUDIENCE = "tollway-gateway"
NO_LIMITS = "tenant,subject,metric,window,limit\n"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Idp:
    """A JWKS endpoint on loopback whose key set can be rotated; counts its fetches."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.keys: dict[str, object] = {}  # kid -> private key
        self.hits = 0
        self.delay_s = delay_s
        self._lock = threading.Lock()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                with idp._lock:
                    idp.hits += 1
                time.sleep(idp.delay_s)
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Idp:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, kid: str, key) -> None:
        self.keys[kid] = key

    def jwks(self) -> dict:
        out = []
        for kid, key in self.keys.items():
            if isinstance(key, rsa.RSAPrivateKey):
                jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "RS256"}
            else:
                jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "ES256"}
            out.append(jwk | {"kid": kid, "use": "sig"})
        return {"keys": out}

    def mint(self, kid: str | None, key=None, alg: str | None = None, **claims) -> str:
        """A token signed with `key` (default: the key published under `kid`)."""
        key = key if key is not None else self.keys[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(payload(**claims), key, algorithm=alg, headers={"kid": kid} if kid else None)


def payload(**claims) -> dict:
    """Claims of a valid token for bob-like user in acme; `name=None` drops a claim."""
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600, "jti": uuid.uuid4().hex,
            "email": "zoe@acme.com", "org": "acme"}
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


def jwt_toml(jwks_url: str | None = None, public_key_file: str | None = None, **claims: str) -> str:
    lines = ["[auth.jwt]", f'issuer = "{ISSUER}"', f'audience = "{AUDIENCE}"']
    if jwks_url:
        lines.append(f'jwks_url = "{jwks_url}"')
    if public_key_file:
        lines.append(f'public_key_file = "{public_key_file}"')
    lines += [f'{name} = "{value}"' for name, value in claims.items()]
    return "\n".join(lines) + "\n"


def make_deployment(path, sim_url: str, extra: str) -> Deployment:
    dep = Deployment(path, sim_url)
    dep.add_key("operator-openai", "openai", SIM_KEYS["openai"])
    dep.add_key("operator-gemini", "gemini", SIM_KEYS["gemini"])
    dep.add_key("operator-anthropic", "anthropic", SIM_KEYS["anthropic"])
    dep.add_key("acme-anthropic", "anthropic", SIM_KEYS["anthropic"], tenant="acme")
    dep.issue_token("bob", "acme", "bob@acme.com")
    (path / "policy" / "limits.csv").write_text(NO_LIMITS)
    dep.write_toml(extra=extra)
    return dep


def chat(url: str, model: str = "gpt-4o-mini", **headers: str) -> httpx.Response:
    return httpx.post(url + "/openai/v1/chat/completions", timeout=10, headers=headers,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --- one gateway shared by the tests that do not depend on its JWKS cache ------------------------
@pytest.fixture(scope="module")
def idp():
    provider = Idp().start()
    provider.add("rsa-1", rsa_key())
    provider.add("ec-1", ec_key())
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, simulator, idp):
    dep = make_deployment(tmp_path_factory.mktemp("jwt") / "deploy", simulator.url, jwt_toml(jwks_url=idp.url))
    process = GatewayProcess(dep).start()
    yield process
    process.stop()


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_rs256_and_es256_tokens_work_as_the_openai_sdk_api_key(gw, idp, kid):
    client = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=idp.mint(kid), max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content.startswith("This is a simulated reply")


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_token_in_cf_access_jwt_assertion_header(gw, idp, kid, sim):
    token = idp.mint(kid)
    assert chat(gw.url, **{"cf-access-jwt-assertion": token}).status_code == 200
    reply = httpx.post(gw.url + "/anthropic/v1/messages", timeout=10, headers={
        "cf-access-jwt-assertion": idp.mint(kid, groups=["engineering"]), "anthropic-version": "2023-06-01"},
        json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text
    for request in sim.requests:  # the assertion never travels upstream
        assert "cf-access-jwt-assertion" not in request.headers
        assert token not in repr(request.headers)


def test_groups_claim_becomes_roles_for_the_policy(gw, idp):
    """Line 3 of the sample access.csv: role:engineering may use anthropic/claude-* in acme."""
    def claude(**claims) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=idp.mint("rsa-1", **claims), max_retries=0)

    def ask(client: anthropic.Anthropic, model: str = "claude-sonnet-4-5"):
        return client.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}])

    assert ask(claude(groups=["engineering"])).content[0].text
    assert ask(claude(groups="engineering")).content[0].text  # a single group as a string
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        ask(claude())  # no groups: no role
    assert "Tenant 'acme' may not use model 'anthropic/claude-sonnet-4-5'" in str(denied.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(claude(groups=["marketing"]))
    # role:contractors is denied claude-opus-* even with role:engineering (deny overrides allow)
    both = claude(groups=["engineering", "contractors"])
    assert ask(both).content[0].text
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(both, "claude-opus-4-1")


def test_tenant_and_user_come_from_the_claims(gw, idp):
    assert chat(gw.url, "gpt-4o", **bearer(idp.mint("rsa-1", org="globex", email="carol@globex.com"))).status_code == 200
    assert chat(gw.url, "gpt-4o", **bearer(idp.mint("rsa-1"))).status_code == 403  # acme: only gpt-4o-mini
    # alice@acme.com holds role:engineering through the g line: the user claim is the policy subject
    alice = anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=idp.mint("ec-1", email="alice@acme.com"),
                                max_retries=0)
    assert alice.messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                 messages=[{"role": "user", "content": "hi"}]).content


def forged_tokens(idp: Idp) -> list[tuple[str, str, str]]:
    """(case, token, the reason the gateway must give)."""
    now = int(time.time())
    valid = idp.mint("rsa-1")
    head, body, signature = valid.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    tampered_claims["org"] = "globex"
    tampered = f"{head}.{b64url(json.dumps(tampered_claims).encode())}.{signature}"
    unsigned = (b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "."
                + b64url(json.dumps(payload()).encode()) + ".")
    # algorithm confusion: HS256 "signed" with the published RSA public key as the HMAC secret
    hs_head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    hs_body = b64url(json.dumps(payload()).encode())
    hs_sig = b64url(hmac.new(public_pem(idp.keys["rsa-1"]), f"{hs_head}.{hs_body}".encode(), hashlib.sha256).digest())
    return [
        ("expired", idp.mint("rsa-1", iat=now - 3600, nbf=now - 3600, exp=now - 120),
         "JWT has expired: sign in again to get a fresh one."),
        ("not-yet-valid", idp.mint("rsa-1", nbf=now + 300, exp=now + 900),
         "JWT is not valid yet (its nbf or iat is in the future)."),
        ("wrong-audience", idp.mint("rsa-1", aud="some-other-app"),
         f"JWT audience does not match; this gateway accepts '{AUDIENCE}'."),
        ("wrong-issuer", idp.mint("ec-1", iss="https://evil.example/"),
         f"JWT issuer 'https://evil.example/' is not trusted by this gateway; it accepts tokens from '{ISSUER}'. "
         "Ask your Tollway operator to add the issuer to [[auth.issuers]]."),
        ("alg-none", unsigned, "JWT algorithm 'none' is not accepted; tokens must be signed with RS256 or ES256."),
        ("tampered-payload", tampered,
         "JWT signature does not verify: the token was altered or signed by another key."),
        ("signed-by-another-key", idp.mint("rsa-1", key=rsa_key()),
         "JWT signature does not verify: the token was altered or signed by another key."),
        ("hs256-with-public-key", f"{hs_head}.{hs_body}.{hs_sig}",
         "JWT algorithm 'HS256' is not accepted; tokens must be signed with RS256 or ES256."),
        ("unknown-kid", idp.mint("rogue-kid", key=rsa_key()), "JWT is signed with an unknown key id 'rogue-kid'."),
        ("no-exp", idp.mint("rsa-1", exp=None), "JWT lacks the required claim 'exp'."),
        ("no-user-claim", idp.mint("rsa-1", email=None), "JWT has no 'email' claim to identify the user."),
        ("no-tenant-claim", idp.mint("ec-1", org=None), "JWT has no 'org' claim naming the tenant."),
        ("malformed", "eyJhbGciOiJSUzI1NiJ9.!!!.???", "The credential looks like a JWT but is malformed."),
        ("rs256-naming-an-ec-key", idp.mint("ec-1", key=rsa_key(), alg="RS256"),
         "JWT algorithm 'RS256' does not match the key its kid names."),
        ("es256-naming-an-rsa-key", idp.mint("rsa-1", key=ec_key(), alg="ES256"),
         "JWT algorithm 'ES256' does not match the key its kid names."),
        ("string-exp", idp.mint("rsa-1", exp=str(now + 600)), "JWT claim 'exp' must be a number (seconds since the epoch)."),
        ("string-iat", idp.mint("ec-1", iat=str(now)), "JWT claim 'iat' must be a number (seconds since the epoch)."),
        ("tenant-claim-too-long", idp.mint("rsa-1", org="a" * 257),
         "JWT claim 'org' is not a usable identifier (at most 256 printable characters)."),
        ("user-claim-with-a-newline", idp.mint("ec-1", email="zoe@acme.com\nadmin@acme.com"),
         "JWT claim 'email' is not a usable identifier (at most 256 printable characters)."),
        ("groups-claim-an-object", idp.mint("rsa-1", groups={"engineering": True}),
         "JWT claim 'groups' must be a list of at most 256 group names."),
        ("too-many-groups", idp.mint("rsa-1", groups=[f"g{i}" for i in range(257)]),
         "JWT claim 'groups' must be a list of at most 256 group names."),
        ("group-with-a-control-character", idp.mint("ec-1", groups=["engineering\x00"]),
         "JWT claim 'groups' holds a group name that is not a usable identifier (at most 256 printable characters)."),
    ]


CASES = ["expired", "not-yet-valid", "wrong-audience", "wrong-issuer", "alg-none", "tampered-payload",
         "signed-by-another-key", "hs256-with-public-key", "unknown-kid", "no-exp", "no-user-claim",
         "no-tenant-claim", "malformed", "rs256-naming-an-ec-key", "es256-naming-an-rsa-key", "string-exp",
         "string-iat", "tenant-claim-too-long", "user-claim-with-a-newline", "groups-claim-an-object",
         "too-many-groups", "group-with-a-control-character"]


@pytest.mark.parametrize("case", CASES)
def test_every_bad_token_is_refused_with_401_and_its_reason(gw, idp, case):
    [(_, token, reason)] = [t for t in forged_tokens(idp) if t[0] == case]
    for headers in (bearer(token), {"cf-access-jwt-assertion": token}):
        response = chat(gw.url, **headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["message"] == reason
    # the same refusal in the Anthropic format, through the SDK
    client = anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=token, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["error"]["message"] == reason


def test_a_jwt_naming_a_tenant_missing_from_tenants_csv_is_403_and_recorded_without_it(gw, idp):
    response = chat(gw.url, **bearer(idp.mint("rsa-1", org="initech", email="eve@initech.com")))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "unknown_tenant"
    assert "'initech'" in response.json()["error"]["message"]
    at_the_limit = idp.mint("ec-1", org="a" * 256)  # a usable identifier, but no tenant of ours
    assert chat(gw.url, **bearer(at_the_limit)).json()["error"]["code"] == "unknown_tenant"


def test_a_token_valid_within_the_leeway_is_accepted(gw, idp):
    now = int(time.time())
    assert chat(gw.url, **bearer(idp.mint("rsa-1", nbf=now + 10))).status_code == 200
    assert chat(gw.url, **bearer(idp.mint("ec-1", exp=now - 10))).status_code == 200


# --- gateways of their own: the JWKS cache, claim names, a static key, the events ----------------------
@pytest.fixture
def fresh_idp():
    provider = Idp().start()
    provider.add("rsa-1", rsa_key())
    yield provider
    provider.stop()


def test_jwks_is_cached_and_refetched_when_a_new_kid_appears(tmp_path, simulator, fresh_idp):
    dep = make_deployment(tmp_path / "deploy", simulator.url, jwt_toml(jwks_url=fresh_idp.url))
    gateway = GatewayProcess(dep).start()
    try:
        assert fresh_idp.hits == 0  # fetched lazily
        first_fetch = time.monotonic()
        with httpx.Client() as client:
            for i in range(25):  # 25 different tokens: 25 signature checks, one JWKS fetch
                token = fresh_idp.mint("rsa-1", email=f"user{i}@acme.com")
                response = client.post(gateway.url + "/openai/v1/chat/completions", headers=bearer(token),
                                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
                assert response.status_code == 200, response.text
        assert fresh_idp.hits == 1

        # the identity provider rotates: a new key is published and the old one withdrawn
        fresh_idp.keys = {"rsa-2": rsa_key()}
        time.sleep(max(0.0, first_fetch + 5.5 - time.monotonic()))  # past the refresh rate limit
        assert chat(gateway.url, **bearer(fresh_idp.mint("rsa-2"))).status_code == 200
        assert fresh_idp.hits == 2
        for _ in range(5):
            assert chat(gateway.url, **bearer(fresh_idp.mint("rsa-2"))).status_code == 200
        assert fresh_idp.hits == 2
    finally:
        gateway.stop()


def test_concurrent_first_requests_all_wait_for_the_jwks_fetch(tmp_path, simulator):
    """Eight requests arrive together while the JWKS is being fetched (it takes 0.5 s, as a remote
    identity provider may): every one of them carries a valid token and must be answered 200, not
    refused with "unknown key id" because another request's fetch is still in progress."""
    provider = Idp(delay_s=0.5).start()
    provider.add("rsa-1", rsa_key())
    dep = make_deployment(tmp_path / "deploy", simulator.url, jwt_toml(jwks_url=provider.url))
    gateway = GatewayProcess(dep).start()
    try:
        tokens = [provider.mint("rsa-1", email=f"user{i}@acme.com") for i in range(8)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(lambda t: chat(gateway.url, **bearer(t)), tokens))
        assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
        assert provider.hits == 1
    finally:
        gateway.stop()
        provider.stop()


def test_custom_claim_names_and_anonymised_events(tmp_path, simulator, fresh_idp):
    extra = jwt_toml(jwks_url=fresh_idp.url, user_claim="upn", tenant_claim="tenant_id", roles_claim="roles")
    dep = make_deployment(tmp_path / "deploy", simulator.url, extra)
    gateway = GatewayProcess(dep).start()
    email = "yusuf.engineer@acme.com"
    try:
        token = fresh_idp.mint("rsa-1", email=None, org=None, upn=email, tenant_id="acme", roles=["engineering"])
        client = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key=token, max_retries=0)
        for _ in range(2):
            assert client.messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                          messages=[{"role": "user", "content": "hi"}]).content
        # the default claim names mean nothing now
        default_names = fresh_idp.mint("rsa-1", groups=["engineering"])
        refused = chat(gateway.url, **bearer(default_names))
        assert refused.status_code == 401
        assert refused.json()["error"]["message"] == "JWT has no 'upn' claim to identify the user."
        no_role = fresh_idp.mint("rsa-1", upn=email, tenant_id="acme", groups=["engineering"])
        assert httpx.post(gateway.url + "/anthropic/v1/messages", timeout=10,
                          headers={"x-api-key": no_role, "anthropic-version": "2023-06-01"},
                          json={"model": "claude-sonnet-4-5", "max_tokens": 5,
                                "messages": [{"role": "user", "content": "hi"}]}).status_code == 403
        assert chat(gateway.url, **bearer(dep.tokens["bob"])).status_code == 200  # gateway tokens still work
    finally:
        assert gateway.stop() == 0

    rows = dep.events()
    assert [r["status_code"] for r in rows] == [200, 200, 401, 403, 200]
    jwt_rows = [rows[i] for i in (0, 1, 3)]  # identified through the JWT
    assert [r["auth_method"] for r in jwt_rows] == ["jwt", "jwt", "jwt"]
    assert rows[4]["auth_method"] == "token"
    assert len({r["user_pseudonym"] for r in jwt_rows}) == 1 and jwt_rows[0]["user_pseudonym"] is not None
    assert all(r["tenant"] == "acme" for r in jwt_rows)
    assert rows[4]["user_pseudonym"] != jwt_rows[0]["user_pseudonym"]
    raw = (dep.path / "events.duckdb").read_bytes()
    for secret in (token, default_names, no_role, token.split(".")[2], email, "zoe@acme.com", "bob@acme.com"):
        assert secret.encode() not in raw


def test_static_public_key_file_without_a_jwks_server(tmp_path, simulator):
    key = ec_key()
    dep = make_deployment(tmp_path / "deploy", simulator.url, jwt_toml(public_key_file="sso-public.pem"))
    (dep.path / "sso-public.pem").write_bytes(public_pem(key))
    gateway = GatewayProcess(dep).start()
    try:
        good = jwt.encode(payload(), key, algorithm="ES256")  # no kid: there is only one key
        client = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=good, max_retries=0)
        assert client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]).id
        other = jwt.encode(payload(), ec_key(), algorithm="ES256")
        refused = chat(gateway.url, **bearer(other))
        assert refused.status_code == 401
        assert refused.json()["error"]["message"] == ("JWT signature does not verify: the token was altered or "
                                                      "signed by another key.")
        expired = jwt.encode(payload(exp=int(time.time()) - 100), key, algorithm="ES256")
        assert chat(gateway.url, **bearer(expired)).json()["error"]["message"] == (
            "JWT has expired: sign in again to get a fresh one.")
    finally:
        gateway.stop()
