"""`tollway token print`: exchange a JWT for a short-lived Tollway token at a running gateway.

Made for credential helpers: Claude Code's `apiKeyHelper`, a CI step, a service's start script.
Only the token goes to stdout; every message goes to stderr, and a refusal exits 1. It needs no
deployment directory: it runs wherever the JWT is (a laptop, a CI runner, a pod).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class ExchangeRefused(Exception):
    """The exchange did not give a token; the message says why and what to do."""


def read_jwt(args: argparse.Namespace) -> str:
    """The JWT from --jwt-file or --jwt-env, whitespace trimmed."""
    if args.jwt_file:
        try:
            text = Path(args.jwt_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ExchangeRefused(f"cannot read the JWT from {args.jwt_file}: {exc.strerror or exc}") from exc
        where = args.jwt_file
    else:
        text = os.environ.get(args.jwt_env, "")
        where = f"${args.jwt_env}"
    if not text.strip():
        raise ExchangeRefused(f"no JWT in {where} (it is empty or unset)")
    return text.strip()


def exchange(gateway: str, jwt: str, timeout_s: float) -> str:
    """POST the JWT to `gateway`/auth/token; the Tollway token, or why not."""
    import httpx  # here: every other command starts without it

    url = gateway.rstrip("/") + "/auth/token"
    try:
        response = httpx.post(url, headers={"authorization": f"Bearer {jwt}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ExchangeRefused(f"cannot reach the gateway at {url}: {exc}") from exc
    try:
        document = response.json()
    except ValueError:
        document = {}
    if response.status_code != 200 or not str(document.get("token", "")).startswith("tw_"):
        message = (document.get("error") or {}).get("message") if isinstance(document, dict) else None
        raise ExchangeRefused(f"the gateway refused the exchange ({response.status_code}): "
                              f"{message or response.text[:300] or 'no reason given'}")
    return document["token"]


def cmd_token_print(args: argparse.Namespace) -> int:
    try:
        token = exchange(args.gateway, read_jwt(args), args.timeout)
    except ExchangeRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def register(commands, common: argparse.ArgumentParser) -> None:
    token = commands.add_parser("token", parents=[common], help="exchange a JWT for a short-lived token (tw_...)")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    printer = actions.add_parser(
        "print", parents=[common], help="exchange a JWT at a gateway and print only the token (for apiKeyHelper, CI)",
        description="POST the JWT to GATEWAY/auth/token and print the Tollway token it is exchanged for. "
                    "Exit 1, with the reason on stderr, when the gateway refuses.")
    printer.add_argument("--gateway", required=True, help="the gateway's base URL, e.g. https://llm.acme.internal")
    source = printer.add_mutually_exclusive_group(required=True)
    source.add_argument("--jwt-file", help="file holding the JWT (e.g. a Kubernetes projected token)")
    source.add_argument("--jwt-env", help="environment variable holding the JWT")
    printer.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the gateway (default 30)")
    printer.set_defaults(func=cmd_token_print)
