"""The upstream HTTP client (aiohttp) and the one place its exceptions become gateway errors.

aiohttp is used because it kept its throughput flat under concurrency where httpx's pool did not
(see the README's performance section). Per provider: a connect timeout and a read timeout
(the longest silence while waiting for headers or the next chunk).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import aiohttp
from yarl import URL

from proxy.errors import UpstreamTimeout, UpstreamUnreachable
from proxy.settings import ProviderSettings


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self._session:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def request(self, provider: ProviderSettings, method: str, url: URL,
                      headers: Iterable[tuple[str, str]], body: bytes | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; yield the response with its headers read. Errors are translated."""
        assert self._session is not None, "Upstream.start() was not awaited"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=provider.connect_timeout_s,
                                        sock_read=provider.read_timeout_s)
        try:
            async with self._session.request(method, url, headers=list(headers), data=body, timeout=timeout,
                                             allow_redirects=False) as response:
                yield response
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"The provider {provider.name!r} did not answer in time. Try again; "
                                  f"if it persists, check its status or raise read_timeout_s.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"The provider {provider.name!r} could not be reached "
                                      f"({type(exc).__name__}). Try again later.") from exc
