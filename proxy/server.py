"""Run a gateway with uvicorn: graceful on SIGTERM/SIGINT, exit status 0 after a clean stop."""

from __future__ import annotations

import logging

import uvicorn

from proxy.app import create_app
from proxy.gateway import Gateway


class GatewayServer(uvicorn.Server):
    """uvicorn's server, minus re-raising the stop signal after a graceful shutdown.

    uvicorn re-raises SIGTERM once it has drained, so the process would end "killed by signal";
    a gateway that finished its in-flight requests and flushed its events has succeeded.
    """

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def configure_logging() -> None:
    """Tollway's own log lines (reloads, refused edits, budget alerts) to stderr, with a timestamp."""
    logger = logging.getLogger("tollway")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def build_server(gateway: Gateway, host: str, port: int, *, log_level: str = "info") -> GatewayServer:
    configure_logging()
    config = uvicorn.Config(create_app(gateway), host=host, port=port, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=30, server_header=False, lifespan="on",
                            proxy_headers=False)
    return GatewayServer(config)
