"""Redis behind Sentinel: `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`.

Sentinel watches a master and its replicas and promotes a replica when the master is lost. A client asks
any Sentinel which address is the master of SERVICE now (`SENTINEL get-master-addr-by-name`) before it
connects, and asks again whenever its connection breaks, or the server it reached says it is a replica
(`READONLY`: a failover happened meanwhile). The password, if any, is the master's (`AUTH`); the
Sentinels themselves are asked without one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import unquote

import hiredis

SCHEME = "redis+sentinel://"


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a `redis+sentinel://` URL; ValueError saying what is wrong."""
    rest = url.removeprefix(SCHEME)
    auth, _, rest = rest.rpartition("@")
    where, _, path = rest.partition("/")
    username = password = None
    if auth:
        user, has_password, secret = auth.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if has_password else None)
    sentinels = []
    for address in where.split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{address.strip()!r} is not HOST:PORT (a Sentinel's address; 26379 is its usual port)")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("the URL names no service: redis+sentinel://HOST:26379[,HOST:26379…]/SERVICE[/DB]")
    if db and not db.isdigit():
        raise ValueError(f"{db!r} is not a database number")
    return SentinelUrl(tuple(sentinels), service, int(db or 0), username, password)


async def master_address(target: SentinelUrl, timeout: float) -> tuple[str, int]:
    """The master's address, from the first Sentinel that names one (each asked within `timeout`)."""
    problems = []
    for host, port in target.sentinels:
        try:
            async with asyncio.timeout(timeout):
                reply = await _ask(host, port, ("SENTINEL", "get-master-addr-by-name", target.service))
        except (OSError, TimeoutError, ConnectionError, hiredis.ProtocolError) as exc:
            problems.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
            continue
        if isinstance(reply, list) and len(reply) == 2:
            return reply[0].decode(), int(reply[1])
        problems.append(f"{host}:{port} knows no master named {target.service!r}")
    raise ConnectionError(f"no Sentinel named the master of {target.service!r} ({'; '.join(problems)})")


async def _ask(host: str, port: int, command: tuple) -> object:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(hiredis.pack_command(command))
        parser = hiredis.Reader()
        while (reply := parser.gets()) is False:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the Sentinel closed the connection")
            parser.feed(data)
        return reply
    finally:
        writer.close()
