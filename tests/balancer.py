"""A load balancer in front of several gateways on loopback: HAProxy when installed, else a small TCP one.

HAProxy is configured as a company would run it in front of Tollway: round robin, a health check on
`/readyz` every 200 ms, a dead server taken out after one failed check, and a request whose
connection was refused sent to the next server (`retries` + `option redispatch`). The Python
fallback does the part the tests rely on: round robin, and a connection refused by one backend
goes to the next.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.helpers import free_port

HAPROXY_CONFIG = """global
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend tollway
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    default-server inter 200ms fall 1 rise 2
{servers}
"""


class Balancer:
    """A started balancer: `url`, `kind` ("haproxy" or "python"), `close()`."""

    def __init__(self, backends: list[int], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        haproxy = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
        if os.environ.get("TOLLWAY_TEST_BALANCER") == "python":
            haproxy = None
        if haproxy:
            self.kind = "haproxy"
            servers = "\n".join(f"    server gw{i} 127.0.0.1:{port} check" for i, port in enumerate(backends))
            config = workdir / "haproxy.cfg"
            config.write_text(HAPROXY_CONFIG.format(port=self.port, servers=servers))
            self._proc = subprocess.Popen([haproxy, "-f", str(config), "-db"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._tcp = None
        else:
            self.kind = "python"
            self._proc = None
            self._tcp = TcpBalancer(self.port, backends)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self._proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the balancer did not listen on {self.port} within {timeout} s")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._tcp is not None:
            self._tcp.close()


class TcpBalancer:
    """Round robin over backends on its own event loop thread; a refused connection tries the next."""

    def __init__(self, port: int, backends: list[int]) -> None:
        self._backends = backends
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port, started), daemon=True)
        self._thread.start()
        started.wait(5)

    def _run(self, port: int, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", port))
        started.set()
        self._loop.run_forever()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        first = next(self._turn)
        for i in range(len(self._backends)):
            port = self._backends[(first + i) % len(self._backends)]
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
        raise ConnectionRefusedError("no backend accepted the connection")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._connect()
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)

    def close(self) -> None:
        def stop() -> None:
            self._server.close()
            self._loop.stop()
        self._loop.call_soon_threadsafe(stop)
        self._thread.join(5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
