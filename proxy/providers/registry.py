"""Wire styles by name: an OpenAI-compatible provider needs only a `style = "openai"` line."""

from __future__ import annotations

from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.base import Adapter
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import AzureAdapter, OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {
    adapter.style: adapter for adapter in (OpenAIAdapter(), AnthropicAdapter(), GeminiAdapter(), AzureAdapter())
}

#: Every header a client may put a credential in, whatever the route: all are stripped.
CREDENTIAL_HEADERS = frozenset(
    {name for adapter in ADAPTERS.values() for name in adapter.credential_headers} | {"cf-access-jwt-assertion"}
)
#: Query parameters that carry credentials: stripped before forwarding.
CREDENTIAL_QUERY_PARAMS = frozenset({p for adapter in ADAPTERS.values() for p in adapter.credential_query_params})


def adapter_for(style: str) -> Adapter:
    return ADAPTERS[style]
