"""`tollway demo`'s slice of the CLI. The demo itself (and what it imports: the report jobs, Polars, the
history writer) loads only when the demo runs, so every other command starts without it."""

from __future__ import annotations

import argparse


def register(commands, common: argparse.ArgumentParser) -> None:
    demo = commands.add_parser("demo", parents=[common],
                               help="run a complete demo on loopback (no keys, no network)",
                               description="Create a temporary deployment with a simulated provider, a month of "
                                           "history, live traffic, reports, the gateway and the dashboard.")
    demo.add_argument("--keep", metavar="DIR", help="create the deployment in DIR (a new directory, kept afterwards; "
                                                    "--data-dir does the same); default: a temporary directory")
    demo.add_argument("--port", type=int, help="gateway port (default 8080, or a free one if taken)")
    demo.add_argument("--days", type=int, default=30, help="days of history to generate (default 30)")
    demo.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard (headless use)")
    demo.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from proxy.demo import cmd_demo

    return cmd_demo(args)
