"""`tollway dashboard`: start the Streamlit dashboard on a deployment directory."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from proxy.settings import DATA_DIR_ENV, resolve_data_dir

APP = Path(__file__).parent / "streamlit_app.py"


def streamlit_argv(host: str, port: int) -> list[str]:
    """The `streamlit run` command line: headless, no telemetry, no source watching."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--client.toolbarMode", "viewer", "--theme.base", "light"]


def cmd_dashboard(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, say

    data_dir = resolve_data_dir(args.data_dir)
    if not (data_dir / "tollway.toml").exists() and not (data_dir / "policy").exists():
        raise CommandError(f"no deployment at {data_dir}: create one with `tollway init {data_dir}` "
                           "or pass --data-dir")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise CommandError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); "
                               "pick another port with --port") from exc
    say(f"Tollway dashboard for {data_dir} on http://{args.host}:{args.port} (Ctrl-C stops it)")
    env = {**os.environ, DATA_DIR_ENV: str(data_dir)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, streamlit_argv(args.host, args.port), env)
    return 0  # not reached: the process is Streamlit now


def register(commands, common: argparse.ArgumentParser) -> None:
    dashboard = commands.add_parser("dashboard", parents=[common],
                                    help="start the Streamlit dashboard (reads reports/, never events.duckdb)")
    dashboard.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")
    dashboard.set_defaults(func=cmd_dashboard)
