"""Policy everywhere the same: the policy hash in /readyz and /metrics, and `tollway status` over real gateways."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import Deployment, GatewayProcess, free_port, run_cli

#: The files a policy set is made of, relative to the deployment directory (written out here on purpose:
#: the test computes the hash by hand, not through the code under test).
SET_FILES = ("tenants.csv", "pricing.csv", "policy/model.conf", "policy/access.csv", "policy/routes.csv",
             "policy/limits.csv", "policy/operations.csv", "policy/identities.csv")


def hash_by_hand(root: Path) -> str:
    """sha256 over `name=sha256(bytes);` of every file present, in name order."""
    present = sorted(name for name in SET_FILES if (root / name).exists())
    text = "".join(f"{name}={hashlib.sha256((root / name).read_bytes()).hexdigest()};" for name in present)
    return hashlib.sha256(text.encode()).hexdigest()


def readyz(gw: GatewayProcess) -> dict:
    return httpx.get(gw.url + "/readyz", timeout=5).json()


def info_series(gw: GatewayProcess) -> list[str]:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    return [line for line in text.splitlines() if line.startswith("tollway_policy_info")]


def status(*args: str) -> tuple[int, str, str]:
    result = run_cli(None, "status", "--timeout", "3", *args)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def two_gateways(tmp_path, simulator):
    """Two machines' worth: separate deployment directories and processes, the same policy files."""
    deps = [Deployment(tmp_path / name, simulator.url) for name in ("one", "two")]
    for dep in deps:
        dep.add_test_keys()
    gateways = [GatewayProcess(dep).start() for dep in deps]
    yield gateways
    for gw in gateways:
        gw.stop()


def test_status_agrees_then_names_the_gateway_whose_policy_was_edited(two_gateways):
    one, two = two_gateways
    expected = hash_by_hand(one.deployment.path)
    assert hash_by_hand(two.deployment.path) == expected
    for gw in (one, two):
        ready = readyz(gw)
        assert ready["policy_hash"] == ready["policy"]["hash"] == expected
        assert ready["policy"]["version"] == expected[:12]
        assert info_series(gw) == [f'tollway_policy_info{{hash="{expected[:12]}"}} 1.0']
    check = run_cli(one.deployment.path, "policy", "check")
    assert check.stdout == f"policy hash {expected}\n"

    code, out, err = status(one.url, two.url.removeprefix("http://"))  # a URL without a scheme gets http://
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith(f"{one.url}  ready        policy {expected[:12]}  ")
    assert lines[1].startswith(f"{two.url}  ready        policy {expected[:12]}  ")
    assert lines[2] == f"policy: the same on all 2 gateway(s) that answered: {expected}"
    code, out, _ = status("--json", one.url, two.url)
    document = json.loads(out)
    assert (code, document["ok"], document["policy_hashes_agree"]) == (0, True, True)
    assert [g["url"] for g in document["gateways"]] == [one.url, two.url]
    for g in document["gateways"]:
        assert set(g) >= {"url", "reachable", "ready", "policy_hash", "checks", "error"}
        assert (g["reachable"], g["ready"], g["policy_hash"], g["error"]) == (True, True, expected, None)
        assert g["checks"] and set(g["checks"].values()) == {"ok"}

    access = two.deployment.path / "policy" / "access.csv"
    access.write_text(access.read_text() + "# a comment: the same rules, other bytes\n")
    edited = hash_by_hand(two.deployment.path)
    assert edited != expected
    deadline = time.monotonic() + 10
    while readyz(two)["policy_hash"] != edited:
        assert time.monotonic() < deadline, "the edit was not reloaded"
        time.sleep(0.1)
    assert info_series(two) == [f'tollway_policy_info{{hash="{edited[:12]}"}} 1.0']  # the old series is gone
    assert run_cli(two.deployment.path, "policy", "check").stdout == f"policy hash {edited}\n"

    code, out, err = status(one.url, two.url)
    assert code == 1
    assert f"policy: hashes differ: 1 of 2 serve {expected}; different: {two.url} ({edited[:12]})" in out
    assert (f"error: {two.url}: serves policy {edited[:12]}, but 1 of 2 gateway(s) serve {expected[:12]}"
            in err.splitlines()[0])
    assert one.url + ":" not in err
    code, out, _ = status("--json", one.url, two.url)
    document = json.loads(out)
    assert (code, document["ok"], document["policy_hashes_agree"]) == (1, False, False)
    assert [g["policy_hash"] for g in document["gateways"]] == [expected, edited]


def test_a_url_where_nothing_listens_is_unreachable():
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = status(url)
    assert code == 1
    assert out.startswith(f"{url}  unreachable  policy -  ")
    assert f"error: {url}: unreachable (" in err and "is `tollway serve` running there" in err
    code, out, _ = status("--json", url)
    (gateway,) = json.loads(out)["gateways"]
    assert code == 1
    assert (gateway["reachable"], gateway["ready"], gateway["policy_hash"]) == (False, False, None)
    assert gateway["error"]


def test_a_deployment_without_model_conf_hashes_the_built_in_copy_that_applies(tmp_path, simulator):
    """No policy/model.conf means the built-in one: hashed as such, so a deployment with no copy and one with
    an identical copy agree, and one whose model differs does not."""
    built_in = Path(__file__).parents[1] / "policy" / "model.conf"
    without, copied, changed = (Deployment(tmp_path / name, simulator.url) for name in ("without", "copied", "changed"))
    (without.path / "policy" / "model.conf").unlink(missing_ok=True)
    (copied.path / "policy" / "model.conf").write_bytes(built_in.read_bytes())
    (changed.path / "policy" / "model.conf").write_bytes(built_in.read_bytes() + b"\n# tuned\n")
    checked = {dep.path.name: run_cli(dep.path, "policy", "check").stdout for dep in (without, copied, changed)}
    assert checked["without"] == checked["copied"] == f"policy hash {hash_by_hand(copied.path)}\n"
    assert checked["changed"] == f"policy hash {hash_by_hand(changed.path)}\n" != checked["copied"]


def test_a_gateway_whose_redis_is_down_is_named_with_the_failing_check(tmp_path, simulator):
    dep = Deployment(tmp_path / "deploy", simulator.url)
    dep.add_test_keys()
    dead = free_port()  # nothing listens: the gateway starts and refuses requests until Redis answers
    dep.write_toml(f'[limits]\nstore = "redis://127.0.0.1:{dead}/0"\n')
    gw = GatewayProcess(dep).start()
    try:
        response = httpx.get(gw.url + "/readyz", timeout=5)
        assert response.status_code == 503
        assert response.json()["checks"]["limits"] != "ok"
        assert response.json()["policy_hash"] == hash_by_hand(dep.path)
        code, out, err = status("--json", gw.url)
        (gateway,) = json.loads(out)["gateways"]
        assert code == 1
        assert (gateway["reachable"], gateway["ready"]) == (True, False)
        assert f"127.0.0.1:{dead}" in gateway["checks"]["limits"]
        assert gateway["checks"]["event_store"] == "ok"
        assert f"error: {gw.url}: not ready: limit store (Redis): " in err
        code, out, _ = status(gw.url)
        assert code == 1
        assert out.startswith(f"{gw.url}  not ready    policy {gateway['policy_hash'][:12]}  limits: ")
    finally:
        gw.stop()
