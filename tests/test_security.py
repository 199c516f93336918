"""Tollway as an attacker sees it: path tricks, header smuggling, credential leaks, token guessing, an
admin API that must not exist, secrets on disk and in every output.

Requests that must reach the provider go to a capture server (`FaultServer` from `test_faults`, which
records every request as it arrived on the wire); a second one plays the attacker's host and must never
see a byte. Raw sockets are used wherever an HTTP client would normalise what is being tested.
Already covered elsewhere: one 401 for unknown/expired/revoked tokens as parsed JSON on the OpenAI route
(`test_gateway_errors.py`); the JWT refusals (`test_jwt.py`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import sqlite3
import stat
import urllib.parse
from datetime import UTC, datetime, timedelta

import anthropic
import duckdb
import httpx
import httpx2
import openai
import polars as pl
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.helpers import SIM_KEYS, Deployment, GatewayProcess, run_cli
from tests.test_faults import FaultServer, _parse_answer, _read_answer

pytestmark = pytest.mark.timeout(90)

REQUEST_ID = "x-tollway-request-id"
USERS = {"alice": ("acme", "alice@acme.com", ()), "bob": ("acme", "bob@acme.com", ()),
         "dana": ("acme", "dana@acme.com", ("engineering", "contractors")),
         "carol": ("globex", "carol@globex.com", ())}
BODIES = {
    "openai": ("/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
    "anthropic": ("/anthropic/v1/messages",
                  {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}),
    "gemini": ("/gemini/v1beta/models/gemini-2.5-flash:generateContent",
               {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}),
}


# --- a running gateway whose providers are a capture server --------------------------------------
@pytest.fixture(scope="module")
def capture():
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def evil():
    """The attacker's host: nothing may ever reach it."""
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def armed(tmp_path_factory, simulator, capture):
    """A gateway (as the conftest deployment: same keys, same users) forwarding to `capture`.

    Each provider's base URL has a path (`/openai`, ...) so an escape from it is visible. Also: erin's
    token expired a minute ago, frank's was revoked with the CLI.
    """
    dep = Deployment(tmp_path_factory.mktemp("security") / "deploy", simulator.url)
    for key_id, provider, tenant in (("operator-openai", "openai", None), ("operator-gemini", "gemini", None),
                                     ("operator-anthropic", "anthropic", None),
                                     ("acme-anthropic", "anthropic", "acme")):
        dep.add_key(key_id, provider, SIM_KEYS[provider], tenant=tenant)
    for name, (tenant, user, roles) in USERS.items():
        dep.issue_token(name, tenant, user, roles)
    dep.issue_token("erin", "acme", "erin@acme.com", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    dep.issue_token("frank", "acme", "frank@acme.com")
    listed = run_cli(dep.path, "tokens", "list", "--json")
    [frank_id] = [t["id"] for t in json.loads(listed.stdout) if t["user"] == "frank@acme.com"]
    assert run_cli(dep.path, "tokens", "revoke", frank_id).returncode == 0
    dep.write_toml(providers={name: f"{capture.url}/{name}" for name in BODIES})
    gw = GatewayProcess(dep).start()
    yield gw
    gw.stop()


def _exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return _read_answer(s)


def _raw_request(gw: GatewayProcess, target: bytes, provider: str = "openai", extra: bytes = b"",
                 host: bytes = b"gateway.local", body: dict | None = None, method: bytes = b"POST",
                 credential: bool = True) -> bytes:
    dep = gw.deployment
    line = {"openai": b"Authorization: Bearer " + dep.tokens["bob"].encode(),
            "anthropic": b"x-api-key: " + dep.tokens["alice"].encode(),
            "gemini": b"x-goog-api-key: " + dep.tokens["carol"].encode()}[provider] + b"\r\n"
    payload = json.dumps(BODIES[provider][1] if body is None else body).encode()
    return (method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + (line if credential else b"") +
            b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n" +
            extra + b"Connection: close\r\n\r\n" + payload)


def _route_error(provider: str, status: int, headers: dict, body: bytes) -> dict:
    """An error of the gateway's own, in the format of `provider`."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    assert REQUEST_ID in headers, headers
    payload = json.loads(body)
    if provider == "anthropic":
        assert payload["type"] == "error" and set(payload) == {"type", "error"}, payload
    elif provider == "gemini":
        assert set(payload) == {"error"} and payload["error"]["code"] == status, payload
        assert payload["error"]["status"].isupper(), payload
    else:
        assert set(payload) == {"error"} and isinstance(payload["error"]["type"], str), payload
    assert payload["error"]["message"], payload
    return payload["error"]


# --- paths ---------------------------------------------------------------------------------------
def _attacks(provider: str, evil_host: str) -> list[bytes]:
    """Request targets that try to leave `/{provider}/`; each ends in the route's real API path so that
    only the trick itself can make the gateway refuse it."""
    p, e, x = f"/{provider}", evil_host, BODIES[provider][0].split("/", 2)[2]  # e.g. v1/chat/completions
    targets = [
        f"{p}/../{provider}/{x}", f"{p}/v1/../../{x}", f"{p}/v1/../../../etc/passwd", f"{p}/./{x}",
        f"{p}/v1/%2e%2e/%2e%2e/{x}", f"{p}/v1/%2E%2E%2F{x}", f"{p}/%2e%2e/{x}", f"{p}/v1/.%2e/{x}",
        f"{p}/v1/%2e./{x}", f"{p}/v1%2F..%2F..%2F{x}", f"{p}/{x.replace('/', '%2f', 1)}", f"{p}/%2F%2F{e}/{x}",
        f"{p}//{e}/{x}", f"{p}///{e}/{x}", f"{p}/http://{e}/{x}", f"{p}/https:/{e}/{x}", f"{p}@{e}/{x}",
        f"{p}/@{e}/{x}", f"{p}/:@{e}/{x}", f"{p}/%40{e}/{x}", f"{p}/\\\\{e}/{x}", f"{p}/v1\\..\\..\\{x}",
        f"{p}/%5c%5c{e}/{x}", f"{p}/v1/%252e%252e/%252e%252e/{x}", f"{p}/v1/..;/..;/{x}", f"{p}/v1/%00/../{x}",
        f"http://{e}{p}/{x}", f"//{e}{p}/{x}", f"{p}/{x}?next=http://{e}/&u=@{e}", f"{p}/{x}#@{e}",
        f"{p}%2F..%2F{e}/{x}", f"{p}/%09/{e}/{x}",
    ]
    return [t.encode() for t in targets]


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_path_tricks_are_refused_or_stay_on_the_configured_provider_host(armed, capture, evil, provider):
    evil_host = f"127.0.0.1:{evil.port}"
    outcomes = []
    for target in _attacks(provider, evil_host):
        before = len(capture.requests)
        raw = _exchange(armed.deployment.port, _raw_request(armed, target, provider))
        assert raw, f"{target!r}: the gateway closed the connection without an answer"
        status, headers, body = _parse_answer(raw)
        forwarded = capture.requests[before:]
        outcomes.append((target, status, [r.target for r in forwarded]))
        assert status < 500, (target, status, body)
        if forwarded:
            [request] = forwarded
            # the request stayed under the provider's base path, with no way back up from it
            assert request.target.startswith(f"/{provider}/"), (target, request.target)
            path = request.target.split("?", 1)[0]
            decoded = urllib.parse.unquote(path)
            assert not {".", ".."} & set(decoded.split("/")) and "\\" not in decoded, (target, request.target)
            assert not path.startswith(f"/{provider}//"), (target, request.target)
            assert request.header("host") == f"127.0.0.1:{capture.port}", request.raw_headers
        else:
            assert 400 <= status < 500, (target, status, body)
            error = _route_error("openai" if status == 404 else provider, status, headers, body)
            assert evil_host not in error["message"] or status == 404, error
    assert evil.requests == [] and evil.stats.accepted == 0, "a request reached the attacker's host"
    refused = [t for t, status, fwd in outcomes if not fwd]
    assert len(refused) >= 20 and len(refused) < len(outcomes), outcomes
    for must in (b"/../", b"%2e%2e", b"%2F..", b"\\\\", b"//127"):
        assert any(must.lower() in t.lower() for t in refused), (must, outcomes)
    assert httpx.get(armed.url + "/healthz", timeout=5).status_code == 200


def test_connect_and_absolute_form_requests_never_reach_another_host(armed, capture, evil):
    evil_host = f"127.0.0.1:{evil.port}".encode()
    answers = [
        _exchange(armed.deployment.port, b"CONNECT " + evil_host + b" HTTP/1.1\r\nHost: " + evil_host + b"\r\n\r\n"),
        _exchange(armed.deployment.port, _raw_request(armed, b"http://" + evil_host + b"/openai/v1/chat/completions",
                                                      host=evil_host)),
        _exchange(armed.deployment.port, _raw_request(armed, b"/openai/v1/chat/completions", host=evil_host,
                                                      extra=b"X-Forwarded-Host: " + evil_host + b"\r\n"
                                                            b"Forwarded: host=" + evil_host + b"\r\n")),
    ]
    statuses = [_parse_answer(a)[0] if a else None for a in answers]
    assert statuses[0] is None or 400 <= statuses[0] < 500, answers[0][:200]
    assert statuses[1:] == [200, 200], [a[:200] for a in answers]
    assert evil.stats.accepted == 0, "a request reached the attacker's host"
    assert all(r.header("host") == f"127.0.0.1:{capture.port}" for r in capture.requests[-2:])


# --- headers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    b"X-Smuggle: a\rb\r\n", b"X-Smuggle: a\nInjected: yes\r\n", b"X-Smuggle: a\x00b\r\n", b"X-Sm\xc3\xbcggle: yes\r\n",
    b"X-Smuggle : yes\r\n", b"Bad Name: yes\r\n", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
], ids=["cr", "lf", "nul", "non-ascii-name", "space-before-colon", "space-in-name", "two-content-lengths",
        "cl-and-te"])
def test_malformed_header_is_400_and_never_forwarded(armed, capture, bad):
    before = len(capture.requests)
    raw = _exchange(armed.deployment.port, _raw_request(armed, b"/openai/v1/chat/completions", extra=bad))
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:300]
    assert len(capture.requests) == before, f"a malformed request was forwarded: {capture.requests[before:]}"
    # the gateway survived and still serves
    ok = _exchange(armed.deployment.port, _raw_request(armed, b"/openai/v1/chat/completions"))
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:300]
    assert httpx.get(armed.url + "/healthz", timeout=5).status_code == 200


def test_non_ascii_header_value_is_refused_or_forwarded_byte_for_byte(armed, capture):
    for value in (b"caf\xc3\xa9", b"caf\xe9"):
        before = len(capture.requests)
        raw = _exchange(armed.deployment.port, _raw_request(armed, b"/openai/v1/chat/completions",
                                                            extra=b"X-Note: " + value + b"\r\n"))
        status = _parse_answer(raw)[0]
        assert status in (200, 400), raw[:300]
        if status == 400:
            assert len(capture.requests) == before
        else:
            [request] = capture.requests[before:]
            sent = [v for k, v in request.raw_headers if k.lower() == b"x-note"]
            assert sent == [value], f"{value!r} reached the provider as {sent!r}"
    assert httpx.get(armed.url + "/healthz", timeout=5).status_code == 200


DECOYS = {"x-api-key": "tw_decoy_x_api_key_123456", "x-goog-api-key": "tw_decoy_goog_123456",
          "api-key": "tw_decoy_azure_123456", "cf-access-jwt-assertion": "eyJdecoy.jwt.assertion",
          "proxy-authorization": "Basic ZGVjb3k6c2VjcmV0", "cookie": "session=decoy-cookie-123456; theme=dark"}
HOP_AND_ROUTING = {"x-forwarded-for": "6.6.6.6", "x-forwarded-host": "evil.example", "x-forwarded-proto": "http",
                   "x-forwarded-port": "6666", "forwarded": "for=6.6.6.6;host=evil.example", "x-real-ip": "6.6.6.6",
                   "keep-alive": "timeout=99", "te": "trailers", "upgrade": "h2c", "proxy-connection": "keep-alive",
                   "trailer": "x-late", "x-http-method-override": "DELETE", "x-http-method": "DELETE",
                   "x-method-override": "DELETE", "x-original-url": "/v1/files", "x-rewrite-url": "/v1/files"}


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_client_credentials_and_hop_by_hop_headers_are_not_forwarded(armed, capture, provider):
    dep = armed.deployment
    path, body = BODIES[provider]
    token = {"openai": dep.tokens["bob"], "anthropic": dep.tokens["alice"], "gemini": dep.tokens["carol"]}[provider]
    headers = {**HOP_AND_ROUTING, "cookie": DECOYS["cookie"], "proxy-authorization": DECOYS["proxy-authorization"],
               "x-keep-me": "kept", "user-agent": "attacker/1.0"}
    if provider == "openai":  # every other credential header is a decoy: never used, never forwarded
        headers |= {"authorization": f"Bearer {token}", **DECOYS}
        query = "?key=tw_decoy_query_123456&keep=1"
    elif provider == "anthropic":
        # a Bearer wins over x-api-key (Claude Code may send a stale x-api-key beside a fresh Bearer)
        headers |= {"authorization": f"Bearer {token}", "x-api-key": "tw_decoy_bearer_123456",
                    "api-key": DECOYS["api-key"], "cf-access-jwt-assertion": DECOYS["cf-access-jwt-assertion"]}
        query = "?key=tw_decoy_query_123456&keep=1"
    else:  # Gemini: the token in the query string
        headers |= {"api-key": DECOYS["api-key"], "cf-access-jwt-assertion": DECOYS["cf-access-jwt-assertion"]}
        query = f"?key={token}&keep=1"
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    before = len(capture.requests)
    raw = _exchange(dep.port, _raw_request(armed, (path + query).encode(), provider, extra=extra,
                                           host=b"evil.example", credential=False))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:400]
    [request] = capture.requests[before:]
    wire = request.target.encode() + b"\n" + b"\n".join(k + b": " + v for k, v in request.raw_headers) + request.body

    forwarded = {k.decode().lower() for k, _ in request.raw_headers}
    leaked = forwarded & (set(HOP_AND_ROUTING) | set(DECOYS) | {"authorization", "x-api-key", "x-goog-api-key"})
    expected_key_header = {"openai": "authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[provider]
    assert leaked == {expected_key_header}, f"forwarded: {sorted(leaked - {expected_key_header})}"
    key_values = [v.decode() for k, v in request.raw_headers if k.decode().lower() == expected_key_header]
    assert key_values == [("Bearer " if provider == "openai" else "") + SIM_KEYS[provider]], key_values
    for secret in [token, *DECOYS.values(), "tw_decoy_query_123456", "tw_decoy_bearer_123456", "6.6.6.6",
                   "evil.example", "decoy-cookie"]:
        assert secret.encode() not in wire, f"{secret!r} reached the provider"
    assert request.header("host") == f"127.0.0.1:{capture.port}"
    assert request.header("x-keep-me") == "kept", "ordinary headers pass through"
    assert urllib.parse.parse_qs(request.target.split("?", 1)[1]) == {"keep": ["1"]}, request.target
    assert json.loads(request.body) == body, "the body is forwarded untouched"


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_a_provider_echoing_request_headers_never_hands_the_injected_key_to_the_client(armed, provider):
    path, _ = BODIES[provider]
    raw = _exchange(armed.deployment.port, _raw_request(armed, path.encode(), provider,
                                                        extra=b"x-fault: echo-headers\r\nx-keep-me: kept\r\n"))
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
    assert b"x-echo-x-keep-me: kept" in head, "the provider's other headers pass through"
    assert SIM_KEYS[provider].encode().lower() not in raw.lower(), "the injected key came back to the client"


def test_headers_named_in_connection_are_not_forwarded(armed, capture):
    before = len(capture.requests)
    raw = _exchange(armed.deployment.port, _raw_request(
        armed, b"/openai/v1/chat/completions",
        extra=b"Connection: keep-alive, X-Custom, x-hop-secret\r\nX-Custom: hop-value\r\nX-Hop-Secret: s3cr3t\r\n"))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
    [request] = capture.requests[before:]
    assert {"x-custom", "x-hop-secret"}.isdisjoint(request.names), request.raw_headers


# --- tokens --------------------------------------------------------------------------------------
def test_every_bad_token_gets_the_same_401_byte_for_byte_on_every_route(armed, capture):
    """Unknown, revoked, expired and garbled tokens must be indistinguishable to whoever tries them."""
    tokens = armed.deployment.tokens
    bob = tokens["bob"]
    flipped = bob[:-1] + ("A" if bob[-1] != "A" else "B")
    bad = {"unknown": "tw_" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="),
           "revoked": tokens["frank"], "expired": tokens["erin"], "flipped": flipped, "truncated": bob[:-1],
           "extended": bob + "x", "upper-cased": "tw_" + bob[3:].upper(), "prefix-only": "tw_",
           "oversized": "tw_" + "A" * 4000, "not-tollway": "sk-proj-" + "a" * 40, "jwt-shaped": "eyJhbGciOi.eyJzdWIi.sig",
           "non-ascii": "tw_caf\u00e9\u00e9"}
    before = len(capture.requests)
    with httpx.Client(timeout=10) as http:
        for provider, (path, body) in BODIES.items():
            answers = {}
            for name, token in bad.items():
                header = {"openai": "authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[provider]
                value = ("Bearer " if provider == "openai" else "") + token
                response = http.post(armed.url + path, json=body, headers={header: value.encode("latin-1")})
                answers[name] = response
            statuses = {name: r.status_code for name, r in answers.items()}
            assert set(statuses.values()) == {401}, (provider, statuses)
            bodies = {r.content for r in answers.values()}
            assert len(bodies) == 1, (provider, {n: r.content for n, r in answers.items()})
            shapes = {tuple(sorted((k, v) for k, v in r.headers.items() if k not in (REQUEST_ID, "date")))
                      for r in answers.values()}
            assert len(shapes) == 1, (provider, shapes)
            [only] = bodies
            message = _route_error(provider, 401, dict(answers["unknown"].headers), only)["message"]
            assert "expired or revoked" in message
            for token in bad.values():
                assert len(token) < 4 or token.encode() not in only
    assert len(capture.requests) == before, "a bad token never reaches the provider"
    # and the good token still works after the barrage
    ok = httpx.post(armed.url + BODIES["openai"][0], json=BODIES["openai"][1], timeout=10,
                    headers={"authorization": f"Bearer {bob}"})
    assert ok.status_code == 200


def test_control_db_holds_keyed_hashes_of_tokens_and_ciphertext_of_keys(armed):
    """Tokens are looked up by HMAC (so comparing is constant-time by construction); nothing stored in
    control.db, in any column of any table or in its WAL, is a token or a provider key."""
    dep = armed.deployment
    secrets = {**{f"token {n}": t for n, t in dep.tokens.items()}, **{f"key {p}": k for p, k in SIM_KEYS.items()}}
    db = sqlite3.connect(f"file:{dep.path / 'control.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        cells = []
        for table in tables:
            cells += [(table, value) for row in db.execute(f'SELECT * FROM "{table}"') for value in row]
        hashes = [r[0] for r in db.execute("SELECT token_hash FROM client_tokens")]
        ciphertexts = [r[0] for r in db.execute("SELECT ciphertext FROM provider_keys")]
    finally:
        db.close()
    assert len(hashes) == len(dep.tokens) and len(ciphertexts) == 4
    for table, value in cells:
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        for what, secret in secrets.items():
            assert secret not in text and secret[3:23] not in text, f"{what} stored in table {table}: {text!r}"
    for token in dep.tokens.values():
        assert hashlib.sha256(token.encode()).hexdigest() not in hashes, "an unkeyed hash of a token is stored"
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), hashes
    for name in ("control.db", "control.db-wal"):
        path = dep.path / name
        if path.exists():
            data = path.read_bytes()
            for what, secret in secrets.items():
                assert secret.encode() not in data, f"{what} in {name}"


def test_init_creates_master_key_and_control_db_readable_by_the_owner_only(tmp_path):
    old = os.umask(0o022)  # the usual umask: files would be 0644 unless created 0600 on purpose
    try:
        done = run_cli(None, "init", str(tmp_path / "fresh"))
        assert done.returncode == 0, done.stderr
        added = run_cli(tmp_path / "fresh", "keys", "add", "k1", "--provider", "openai", "--operator",
                        stdin="sk-permission-check-0001\n")
        assert added.returncode == 0, added.stderr
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "fresh").iterdir()
             if p.name == "master.key" or p.name.startswith("control.db")}
    assert {"master.key", "control.db"} <= set(modes), modes
    assert modes["master.key"] == 0o600 and modes["control.db"] == 0o600, {k: oct(v) for k, v in modes.items()}
    assert all(mode & 0o077 == 0 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}


# --- no admin API --------------------------------------------------------------------------------
def test_there_is_no_admin_http_endpoint(armed):
    dep = armed.deployment

    def control_rows() -> dict[str, int]:
        db = sqlite3.connect(f"file:{dep.path / 'control.db'}?mode=ro", uri=True)
        try:
            names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {n: db.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
        finally:
            db.close()

    before = control_rows()
    bearer = {"authorization": f"Bearer {dep.tokens['bob']}"}
    payloads = {"id": "stolen", "provider": "openai", "secret": "sk-planted-0001", "tenant": "acme",
                "user": "mallory@evil", "amount": 1000}
    paths = ["/keys", "/keys/operator-openai", "/tokens", "/tokens/x", "/admin", "/admin/keys", "/admin/tokens",
             "/credits", "/api/keys", "/api/v1/tokens", "/v1/keys", "/policy", "/policy/reload", "/audit",
             "/reports", "/config", "/tollway.toml", "/control.db", "/master.key", "/healthz", "/readyz",
             "/metrics", "/_admin", "/dashboard", "/openai/keys", "/openai/admin"]
    seen = {}
    with httpx.Client(timeout=10) as http:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in paths:
                response = http.request(method, armed.url + path, json=payloads, headers=bearer)
                seen[(method, path)] = response.status_code
                assert b"sk-sim" not in response.content and b"BEGIN" not in response.content
    unexpected = {k: v for k, v in seen.items()
                  if v not in (404, 405) and not (k[1].startswith("/openai/") and v in (200, 400, 403))}
    assert not unexpected, unexpected
    assert all(seen[(m, p)] in (404, 405) for m in ("POST", "PUT", "DELETE", "PATCH") for p in paths
               if not p.startswith("/openai/"))
    assert control_rows() == before, "an HTTP request changed control.db"
    listed = run_cli(dep.path, "keys", "list", "--json")
    assert "stolen" not in listed.stdout


# --- secrets, everywhere -------------------------------------------------------------------------
class Recorder:
    """Every HTTP response an SDK or a raw client got: status line, headers and body, as text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def hook(self, response) -> None:
        response.read()
        self.texts.append(f"{response.status_code}\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
                          + "\n" + response.content.decode("utf-8", "replace"))

    def client(self, module=httpx):
        """An httpx client that records; the Anthropic SDK wants its own fork, `httpx2`."""
        return module.Client(timeout=20, event_hooks={"response": [self.hook]})


def _session(gw: GatewayProcess, recorder: Recorder) -> None:
    """A realistic mix: each provider through its SDK, streamed and not, with provider errors and bad tokens."""
    tokens, url = gw.deployment.tokens, gw.url
    messages = [{"role": "user", "content": "Write one line about toll roads."}]
    fault = {"x-sim-fault": "status:500"}

    oa = openai.OpenAI(base_url=url + "/openai/v1", api_key=tokens["bob"], max_retries=0, http_client=recorder.client())
    oa.chat.completions.create(model="gpt-4o-mini", messages=messages)
    "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True) if c.choices)
    openai.OpenAI(base_url=url + "/openai/v1", api_key=tokens["carol"], max_retries=0,
                  http_client=recorder.client()).embeddings.create(model="text-embedding-3-small", input="toll")
    with pytest.raises(openai.InternalServerError):
        oa.chat.completions.create(model="gpt-4o-mini", messages=messages, extra_headers=fault)
    with pytest.raises(openai.PermissionDeniedError):
        oa.chat.completions.create(model="gpt-4o", messages=messages)
    oa.models.list()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/openai/v1", api_key="tw_not-a-token", max_retries=0,
                      http_client=recorder.client()).models.list()
    openai.OpenAI(base_url=url + "/openai/v1", api_key=tokens["dave"], max_retries=0,
                  http_client=recorder.client()).chat.completions.create(model="gpt-4o-mini", messages=messages)

    an = anthropic.Anthropic(base_url=url + "/anthropic", api_key=tokens["alice"], max_retries=0,
                             http_client=recorder.client(httpx2))
    an.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=messages)
    with an.messages.stream(model="claude-sonnet-4-5", max_tokens=50, messages=messages) as stream:
        "".join(stream.text_stream)
    with pytest.raises(anthropic.InternalServerError):
        an.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=messages, extra_headers=fault)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url + "/anthropic", api_key=tokens["frank-revoked"], max_retries=0,
                            http_client=recorder.client(httpx2)).messages.create(
            model="claude-sonnet-4-5", max_tokens=50, messages=messages)
    anthropic.Anthropic(base_url=url + "/anthropic", api_key=tokens["dana"], max_retries=0,
                        http_client=recorder.client(httpx2)).messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=messages)

    gm = genai.Client(api_key=tokens["carol"], http_options=types.HttpOptions(
        base_url=url + "/gemini", api_version="v1beta", httpx_client=recorder.client()))
    gm.models.generate_content(model="gemini-2.5-flash", contents="toll roads")
    "".join(c.text or "" for c in gm.models.generate_content_stream(model="gemini-2.5-flash", contents="toll"))
    with pytest.raises(genai_errors.APIError):
        gm.models.generate_content(model="gemini-2.5-flash", contents="toll", config=types.GenerateContentConfig(
            http_options=types.HttpOptions(headers=fault)))
    with recorder.client() as http:  # a Gemini key in the query string, and a bad one
        http.post(f"{url}/gemini/v1beta/models/gemini-2.5-flash:generateContent?key={tokens['carol']}",
                  json=BODIES["gemini"][1])
        http.post(f"{url}/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=tw_bad",
                  json=BODIES["gemini"][1])
        for path in ("/healthz", "/readyz", "/metrics"):
            http.get(url + path)


def _events_text(dep: Deployment) -> str:
    con = duckdb.connect(str(dep.path / "events.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT * FROM events").fetchall()
    finally:
        con.close()
    assert rows
    return "\n".join(repr(row) for row in rows)


def _reports_text(dep: Deployment) -> str:
    reports = sorted((dep.path / "reports").glob("*.parquet"))
    assert reports and list((dep.path / "reports").glob("*.csv")), "tollway report run built no reports"
    return "\n".join(pl.read_parquet(p).write_csv() for p in reports) + "\n".join(
        p.read_text() for p in (dep.path / "reports").iterdir() if p.suffix in (".csv", ".json"))


def test_no_secret_or_user_id_leaks_into_files_outputs_or_responses(deployment, sim):
    dep = deployment
    extra_key, rotated_key = "sk-extra-openai-secret-7731", "sk-rotated-openai-secret-9902"
    cli_out: list[str] = []

    def cli(*args: str, stdin: str | None = None, expect: int = 0, hide_token: bool = False):
        done = run_cli(dep.path, *args, stdin=stdin)
        assert done.returncode == expect, (args, done.stdout, done.stderr)
        cli_out.append(done.stderr if hide_token else done.stdout + done.stderr)
        return done

    # an extra operator key first in the OpenAI pool: the simulator refuses it, so it fails over and is marked
    cli("keys", "add", "extra-openai", "--provider", "openai", "--operator", stdin=extra_key + "\n")
    (dep.path / "policy" / "routes.csv").write_text(
        (dep.path / "policy" / "routes.csv").read_text().replace("operator-openai", "extra-openai|operator-openai"))
    created = cli("tokens", "create", "--tenant", "acme", "--user", "dave@acme.com", "--expires-in", "1d", "--json",
                  hide_token=True)
    dep.tokens["dave"] = json.loads(created.stdout)["token"]
    dep.issue_token("frank-revoked", "acme", "frank@acme.com")
    [frank] = [t["id"] for t in json.loads(cli("tokens", "list", "--json").stdout) if t["user"] == "frank@acme.com"]
    cli("tokens", "revoke", frank)
    cli("credits", "add", "--tenant", "acme", "--amount", "25")

    recorder = Recorder()
    gw = GatewayProcess(dep).start()
    try:
        _session(gw, recorder)
        cli("keys", "rotate", "extra-openai", stdin=rotated_key + "\n")
        cli("report", "run")
        for args in (("audit",), ("audit", "--json"), ("audit", "verify"), ("keys", "list"), ("keys", "list", "--json"),
                     ("tokens", "list"), ("tokens", "list", "--json"), ("credits", "list")):
            cli(*args)
    finally:
        assert gw.stop() == 0, gw.log()
    cli("report", "run", "--json")  # once more with the gateway stopped: every event in the reports

    master_text = (dep.path / "master.key").read_text().strip()
    master_raw = base64.b64decode(master_text)
    keys = {**{f"provider key {p}": k for p, k in SIM_KEYS.items()},
            "provider key extra": extra_key, "provider key rotated": rotated_key}
    tokens = {f"token {n}": t for n, t in dep.tokens.items()}
    masters = {"master key (base64)": master_text, "master key (hex)": master_raw.hex()}
    secrets = {**keys, **tokens, **masters}
    users = {u for _, u, _ in USERS.values()} | {"dave@acme.com", "frank@acme.com"}

    # every file of the deployment, as bytes
    leaks = []
    for path in sorted(p for p in dep.path.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for what, secret in secrets.items():
            if secret.encode() in data and not (path.name == "master.key" and what.startswith("master")):
                leaks.append(f"{what} in {path.relative_to(dep.path)}")
        if path.name != "master.key" and master_raw in data:
            leaks.append(f"raw master key bytes in {path.relative_to(dep.path)}")
        if path.name.startswith("events.duckdb") or "reports" in path.parts:
            leaks += [f"user id {u} in {path.relative_to(dep.path)}" for u in users if u.encode() in data]
    # events and reports as rendered text (compressed columns would hide from a byte search)
    rendered = {"events": _events_text(dep), "reports": _reports_text(dep)}
    for where, text in rendered.items():
        for what, secret in secrets.items():
            if secret in text:
                leaks.append(f"{what} in {where}")
        for user in users:
            local = user.split("@")[0]
            if user in text or re.search(rf"\b{local}\b", text):
                leaks.append(f"user id {user} in {where}")
        if "127.0.0.1" in text:
            leaks.append(f"an IP address in {where}")
    # what every client and operator saw
    for where, texts in (("an HTTP response", recorder.texts), ("CLI output", cli_out)):
        for text in texts:
            for what, secret in secrets.items():  # `tokens create` printed its token once: kept out above
                if secret in text:
                    leaks.append(f"{what} in {where}: {text[:200]!r}")
    metrics = [t for t in recorder.texts if "tollway_requests_total" in t]
    assert metrics, "the session read /metrics"
    leaks += [f"user id {u} in /metrics" for u in users for t in metrics if u in t or u.split("@")[0] in t]
    assert not leaks, "\n".join(leaks)

    # the session really happened: what was grepped holds the traffic
    assert len(recorder.texts) >= 20 and any("text/event-stream" in t for t in recorder.texts)
    assert {"200", "401", "403", "500"} <= {t.split("\n", 1)[0] for t in recorder.texts}
    events = dep.events()
    assert {e["provider"] for e in events} == {"openai", "anthropic", "gemini"}
    assert {"ok", "unauthenticated", "upstream_error", "denied"} <= {e["outcome"] for e in events}
    assert any(e["streamed"] for e in events)
    keys_listed = json.loads(run_cli(dep.path, "keys", "list", "--json").stdout)
    assert any(k["id"] == "extra-openai" for k in keys_listed)
    assert (dep.path / "reports" / "manifest.json").exists()
