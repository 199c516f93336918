"""An S3-compatible server on loopback for tests: moto in server mode, in its own process.

    with S3Server() as s3:                       # a free port from tests.helpers.free_port
        s3.create_bucket("events")
        env = s3.env                             # AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, dummy keys, AWS_REGION
        s3.kill(); s3.start(); s3.create_bucket("events")   # an outage (moto keeps no state across restarts)

Gateways and the pipeline reach it through the standard environment variables only (`env`), as
they would reach a real store. The keys are dummies; `SECRET` is distinctive so a test can check
that it never shows up in a log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.helpers import free_port

SECRET = "tollway-test-secret-0123456789abcdef"
ACCESS_KEY = "TOLLWAYTESTKEY"
REGION = "us-east-1"


class S3Server:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a gateway or the pipeline needs in its environment to use this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION}

    def start(self, timeout: float = 30) -> S3Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                if httpx.get(self.endpoint + "/moto-api/", timeout=0.5).status_code < 500:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None

    def kill(self) -> None:
        """The store gone at once (connections refused from now on)."""
        self.stop(signal.SIGKILL)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET, region_name=REGION)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
