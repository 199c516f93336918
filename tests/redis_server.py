"""A private `redis-server` on a free loopback port for tests (no persistence: a restart comes back empty),
plain or TLS only (`tls=True`: a private CA's server certificate; `client_certs=True`: clients must show one)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.helpers import free_port
from tests.tls_certs import make_tls_files


class RedisServer:
    """A private `redis-server` on a loopback port, without persistence: a restart comes back empty."""

    def __init__(self, workdir: Path, tls: bool = False, client_certs: bool = False,
                 config: tuple[str, ...] = ()) -> None:
        self.port, self.workdir, self.config = free_port(), workdir, config
        self.tls = make_tls_files(workdir / "tls") if tls else None
        self.client_certs = client_certs
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                      "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca),
                      "--tls-auth-clients", "yes" if self.client_certs else "no"]
        self.proc = subprocess.Popen(["redis-server", *listen, "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir), *self.config],
                                     stdout=log, stderr=log)
        client = self.client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        self.stop()  # never left running by a start that failed
        raise RuntimeError((self.workdir / "redis.log").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        if self.tls is None:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, ssl=True, ssl_ca_certs=str(self.tls.ca),
                           ssl_certfile=str(self.tls.client_cert), ssl_keyfile=str(self.tls.client_key))


class SentinelSet:
    """A master, one replica and one Sentinel watching them as service `tw` (quorum 1, a master is called down
    after 500 ms), on free loopback ports: `url` is the `redis+sentinel://` URL a gateway uses."""

    SERVICE = "tw"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica", config=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.port = free_port()
        self.url = f"redis+sentinel://127.0.0.1:{self.port}/{self.SERVICE}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> SentinelSet:
        try:
            return self._start()
        except BaseException:
            self.stop()  # never left running by a start that failed
            raise

    def _start(self) -> SentinelSet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master.start()
        self.replica.start()
        self._wait(lambda: self.replica.client().info("replication").get("master_link_status") == "up",
                   "the replica never synced")
        conf = self.workdir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                        f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
                        f"sentinel down-after-milliseconds {self.SERVICE} 500\n"
                        f"sentinel failover-timeout {self.SERVICE} 3000\n")
        log = (self.workdir / "sentinel.log").open("ab")
        self.proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=log, stderr=log)
        self._wait(lambda: self.master_port() == self.master.port, "Sentinel never named the master")
        self._wait(lambda: self._sentinel().execute_command("SENTINEL", "REPLICAS", self.SERVICE),
                   "Sentinel never found the replica")
        return self

    def _sentinel(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def master_port(self) -> int | None:
        try:
            reply = self._sentinel().execute_command("SENTINEL", "get-master-addr-by-name", self.SERVICE)
        except redis.exceptions.ConnectionError:
            return None
        return int(reply[1]) if reply else None

    @staticmethod
    def _wait(check, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(what)
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.replica.stop()
        self.master.stop()
