"""The real Claude Code and Codex CLIs, configured as the README says, against the simulated provider
through a real gateway. `.ci/run` installs them with npm into `.ci/agents`; without them (no npm, no
registry) these tests are skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from tests.helpers import REPO, SIM_KEYS

AGENT_BIN = REPO / ".ci" / "agents" / "node_modules" / ".bin"


def _agent(name: str) -> str:
    found = AGENT_BIN / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.skip(f"the {name} CLI is not installed (.ci/run installs it with npm into .ci/agents)")
    return on_path


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: a fresh home, no telemetry or update checks (the test machine is offline)."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", **extra}


def test_claude_code_through_tollway(gateway, sim, tmp_path):
    claude = _agent("claude")
    env = _env(tmp_path, ANTHROPIC_BASE_URL=gateway.url + "/anthropic",
               ANTHROPIC_AUTH_TOKEN=gateway.deployment.tokens["alice"])
    run = subprocess.run([claude, "-p", "say hi", "--output-format", "json"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["is_error"] is False and result["result"].startswith("This is a simulated reply")

    calls = [r for r in sim.requests if r.path == "/v1/messages"]
    assert calls and all(r.headers["x-api-key"] == SIM_KEYS["anthropic"] for r in calls)
    assert all("authorization" not in r.headers for r in calls), "the Tollway token never reaches the provider"
    assert all(r.headers.get("anthropic-version") for r in calls)
    assert gateway.stop() == 0
    events = [e for e in gateway.deployment.events() if e["endpoint"] == "anthropic/messages.create"]
    assert len(events) == len(calls) and {e["outcome"] for e in events} == {"ok"}
    usage = result["usage"]
    assert sum(e["input_tokens"] for e in events) == usage["input_tokens"] + usage["cache_read_input_tokens"] + \
        usage["cache_creation_input_tokens"]
    assert sum(e["output_tokens"] for e in events) == usage["output_tokens"]
    # Claude Code prices its own usage: Tollway's exact figure agrees with it to the nano-dollar
    ours = sum(e["cost_usd"] for e in events)
    assert ours == Decimal(repr(result["total_cost_usd"])).quantize(Decimal("1e-9"))


def _codex_home(home: Path, gateway_url: str, websockets: bool) -> Path:
    codex_home = home / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        'model = "gpt-4o-mini"\nmodel_provider = "tollway"\n\n[model_providers.tollway]\nname = "Tollway"\n'
        f'base_url = "{gateway_url}/openai/v1"\nenv_key = "TOLLWAY_TOKEN"\nwire_api = "responses"\n'
        + ("supports_websockets = true\n" if websockets else ""))
    return codex_home


@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_through_tollway(gateway, sim, tmp_path, websockets):
    codex = _agent("codex")
    codex_home = _codex_home(tmp_path, gateway.url, websockets)
    env = _env(tmp_path, CODEX_HOME=str(codex_home), TOLLWAY_TOKEN=gateway.deployment.tokens["bob"])
    run = subprocess.run([codex, "exec", "--skip-git-repo-check", "say hi"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert "This is a simulated reply from gpt-4o-mini" in run.stdout

    calls = [r for r in sim.requests if r.path == "/v1/responses"]
    assert calls and {r.method for r in calls} == ({"GET"} if websockets else {"POST"})
    assert all(r.headers["authorization"] == f"Bearer {SIM_KEYS['openai']}" for r in calls)
    assert gateway.stop() == 0
    events = [e for e in gateway.deployment.events() if e["endpoint"] == "openai/responses.create"]
    assert events and all(e["outcome"] == "ok" and e["model"] == "openai/gpt-4o-mini" for e in events)
    # gpt-4o-mini: $0.15 in, $0.60 out per million tokens
    for e in events:
        assert e["cost_usd"] == (Decimal(e["input_tokens"]) * Decimal("0.15")
                                 + Decimal(e["output_tokens"]) * Decimal("0.60")) / 1_000_000
