"""`tollway serve`: one gateway process, or `--workers N` supervised processes on one port."""

from __future__ import annotations

import argparse
from pathlib import Path

from proxy.cli import CommandError, port_number, say
from proxy.settings import load_settings, resolve_data_dir


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server import bind_socket

    settings = load_settings(resolve_data_dir(args.data_dir))
    if args.workers > 1:
        from proxy.workers import scale_out_problem

        problem = scale_out_problem(settings, args.workers)
        if problem:
            say(f"error: {problem}")
            return 2
    host, port = args.host or settings.server.host, args.port or settings.server.port
    if args.worker_fd is not None:
        return serve_worker(settings, host, port, args.worker_fd, args.ready_fd)
    if settings.events.sink == "duckdb":
        refuse_if_served(settings.events_db)
    lock = one_memory_gateway(settings) if args.workers == 1 else None
    sock = bind_socket(host, port)
    if args.workers > 1:
        from proxy.server import configure_logging
        from proxy.workers import Supervisor

        configure_logging()
        say(f"tollway serving {settings.data_dir} on http://{host}:{port} with {args.workers} worker processes")
        return Supervisor(settings.data_dir, sock, args.workers, host, port).run()
    return serve_one(settings, host, port, sock, lock)


def serve_one(settings, host: str, port: int, sock, lock) -> int:
    from proxy.factory import build_gateway
    from proxy.server import build_server

    gateway = build_gateway(settings)
    say(f"tollway serving {settings.data_dir} on http://{host}:{port}  "
        f"(providers: {', '.join(sorted(gateway.routes))})")
    try:
        build_server(gateway, host, port).run(sockets=[sock])
    finally:
        if lock is not None:
            lock.release()
    return 0


def serve_worker(settings, host: str, port: int, worker_fd: int, ready_fd: int | None) -> int:
    """One worker of `serve --workers N`: the supervisor's listening socket, inherited by descriptor."""
    import os
    import socket

    from proxy.factory import build_gateway
    from proxy.server import build_server

    sock = socket.socket(fileno=worker_fd)
    server = build_server(build_gateway(settings), host, port, worker=True)
    if ready_fd is not None:
        server.on_ready = lambda: (os.write(ready_fd, b"1"), os.close(ready_fd))
    server.run(sockets=[sock])
    return 0


def one_memory_gateway(settings):
    """With segments and the memory limit store, one gateway per deployment (its counters are its own):
    a second one is refused, naming the first. With the DuckDB sink, events.duckdb's lock does this."""
    from proxy.process_lock import ProcessLock

    if settings.events.sink != "segments" or settings.limits.store != "memory":
        return None
    lock = ProcessLock(settings.data_dir / "gateway.lock")
    if not lock.acquire():
        raise CommandError(f"another gateway ({lock.holder()}) serves {settings.data_dir} with the memory limit "
                           "store: stop it first; several gateway processes need [limits] store = a Redis URL")
    return lock


def refuse_if_served(events_db: Path) -> None:
    """A second gateway on one directory: refused, naming the process that holds `events.duckdb`."""
    from proxy.server import events_db_holder

    holder = events_db_holder(events_db)
    if holder:
        raise CommandError(f"{events_db} is held by {holder}: another gateway serves this directory already; "
                           "stop it first, or serve another --data-dir")


def worker_count(text: str) -> int:
    """--workers: 1 to 64 processes."""
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number of processes from 1 to 64")
    return int(text)


def register(commands, common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--host", help="interface to listen on (default from tollway.toml)")
    serve.add_argument("--port", type=port_number, help="port to listen on (default from tollway.toml)")
    serve.add_argument("--workers", type=worker_count, default=1,
                       help="gateway processes sharing the port (default 1; more need [limits] store = a Redis "
                            'URL and [events] sink = "segments")')
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)
