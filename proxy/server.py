"""Run a gateway with uvicorn: graceful on SIGTERM/SIGINT, exit status 0 after a clean stop.

Also the checks that come before serving (shared with `tollway simulator`): the listening socket is
bound here, so a port in use is refused with a message before anything says "serving" (with
`--workers N` the supervisor binds it once and every worker accepts on it, see `proxy.workers`),
and a deployment whose `events.duckdb` another process holds is refused naming that process.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

from proxy.app import create_app
from proxy.errors import StartupError
from proxy.gateway import Gateway


class GatewayServer(uvicorn.Server):
    """uvicorn's server, minus re-raising the stop signal after a graceful shutdown.

    uvicorn re-raises SIGTERM once it has drained, so the process would end "killed by signal";
    a gateway that finished its in-flight requests and flushed its events has succeeded.
    """

    on_ready: Callable[[], None] | None = None  # called once the socket accepts (a worker tells its supervisor)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up, plus the line it omits for sockets bound beforehand (see `bind_socket`)."""
        await super().startup(sockets)
        if self.started:
            logging.getLogger("tollway.server").info("listening on http://%s:%d (Ctrl-C or SIGTERM stops it)",
                                                     self.config.host, self.config.port)
            if self.on_ready is not None:
                self.on_ready()


def configure_logging(with_pid: bool = False) -> None:
    """Tollway's own log lines (reloads, refused edits, budget alerts) to stderr, with a timestamp
    (and the process id, for the workers of `serve --workers N`)."""
    logger = logging.getLogger("tollway")
    if not logger.handlers:
        handler = logging.StreamHandler()
        pid = "[%(process)d]" if with_pid else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{pid}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def build_server(gateway: Gateway, host: str, port: int, *, log_level: str = "info",
                 worker: bool = False) -> GatewayServer:
    configure_logging(with_pid=worker)
    config = uvicorn.Config(create_app(gateway), host=host, port=port, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=30, server_header=False, lifespan="on",
                            proxy_headers=False)
    return GatewayServer(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` (SO_REUSEADDR, as uvicorn and aiohttp set it), for the server to listen on.

    Raises `StartupError` saying what to do when the port is taken or the address cannot be used.
    """
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, OverflowError) as exc:
        raise StartupError(f"cannot listen on {host}:{port} ({exc}); pass another --host or --port") from exc
    # A name such as `localhost` may resolve to ::1 first; clients mostly try 127.0.0.1.
    family, kind, proto, _, address = next((a for a in found if a[0] == socket.AF_INET), found[0])
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is in use (by another program or another Tollway); "
                               "stop it or pass --port") from exc
        raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --host or --port") from exc
    return sock


def events_db_holder(path: Path) -> str | None:
    """The process that holds DuckDB's lock on `path` (its PID and command line), None when it is free.

    DuckDB allows one writing process per file, and names the holder's PID in its lock error.
    """
    import duckdb

    if not path.exists():
        return None
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.IOException as exc:  # e.g. 'Could not set lock on file "…": Conflicting lock is held in … (PID 42)'
        match = re.search(r"Conflicting lock is held in .*\(PID (\d+)\)", str(exc))
        if match is None:
            return None  # not a lock: the gateway reports what else is wrong with the file
        return f"process {match.group(1)}{_command_line(int(match.group(1)))}"
    return None


def _command_line(pid: int) -> str:
    """` (python3 -m proxy.cli ... serve)` from /proc, or nothing where it cannot be read."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    text = " ".join(w.decode(errors="replace") for w in words)
    return f" ({text[:200]})" if text else ""
