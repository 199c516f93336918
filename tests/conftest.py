"""Real fixtures: the simulated providers on loopback, a deployment in a temp dir, a running gateway."""

from __future__ import annotations

import anthropic
import openai
import pytest

from proxy.simulator import Simulator
from tests.helpers import SIM_KEYS, Deployment, GatewayProcess


@pytest.fixture(scope="session")
def simulator():
    sim = Simulator(keys=SIM_KEYS).start()
    yield sim
    sim.stop()


@pytest.fixture
def sim(simulator):
    simulator.clear()
    return simulator


@pytest.fixture
def deployment(tmp_path, simulator) -> Deployment:
    """Sample policy from `tollway init`; keys for every provider; tokens for three users.

    acme: anthropic via its own key (BYOK), openai via the operator's (unified).
    alice is in role engineering (through a g line); bob has no role; dana's token carries
    role contractors; carol is in globex.
    """
    dep = Deployment(tmp_path / "deploy", simulator.url)
    dep.add_test_keys()
    dep.issue_token("alice", "acme", "alice@acme.com")
    dep.issue_token("bob", "acme", "bob@acme.com")
    dep.issue_token("dana", "acme", "dana@acme.com", roles=("engineering", "contractors"))
    dep.issue_token("carol", "globex", "carol@globex.com")
    return dep


@pytest.fixture
def gateway(deployment):
    gw = GatewayProcess(deployment).start()
    yield gw
    gw.stop()


@pytest.fixture
def openai_for(gateway):
    def make(token_name: str, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=gateway.deployment.tokens[token_name],
                             max_retries=0, **kwargs)
    return make


@pytest.fixture
def anthropic_for(gateway):
    def make(token_name: str, **kwargs) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key=gateway.deployment.tokens[token_name],
                                   max_retries=0, **kwargs)
    return make


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free loopback port (tests/redis_server.py), stopped afterwards."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _no_gateway_outlives_the_session():
    """A test that failed before stopping its gateway must not leave `tollway serve` running."""
    yield
    from tests.helpers import GatewayProcess

    for proc in GatewayProcess.started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
