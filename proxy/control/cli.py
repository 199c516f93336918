"""`tollway control …`: the control store itself: `status` (backend, schema version) and `migrate --to URL`."""

from __future__ import annotations

import argparse

from proxy.control.target import POSTGRES_SCHEMES, describe, is_postgres


def cmd_status(args: argparse.Namespace) -> int:
    from proxy.cli import emit
    from proxy.control.schema import SCHEMA_VERSION
    from proxy.control.store import ControlStore
    from proxy.settings import load_settings, resolve_data_dir

    target = load_settings(resolve_data_dir(args.data_dir)).control_target
    store = ControlStore(target, None, read_only=True)
    try:
        document = {"backend": store.backend, "url": describe(target), "schema_version": store.schema_version(),
                    "code_schema_version": SCHEMA_VERSION, "audit_entries": store.count("audit_log")}
    finally:
        store.close()
    emit(args, document, f"control store: {document['backend']} at {document['url']}, schema version "
                         f"{document['schema_version']} (this Tollway: {SCHEMA_VERSION}), "
                         f"{document['audit_entries']} audit entries")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit, say
    from proxy.control.migrate import migrate_store
    from proxy.crypto import Keyring, load_master_key
    from proxy.settings import load_settings, resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    source = load_settings(data_dir).control_target
    if is_postgres(source):
        raise CommandError(f"this deployment's control store is PostgreSQL already ({describe(source)}); "
                           "migrate copies a SQLite control.db into PostgreSQL")
    if not source.exists():
        raise CommandError(f"no control.db in {data_dir}: nothing to migrate")
    if not is_postgres(args.to):
        raise CommandError(f"--to {describe(args.to)!r}: give a PostgreSQL URL, e.g. "
                           "postgresql://tollway@db.internal:5432/tollway (password from PGPASSWORD or ~/.pgpass)")
    say(f"copying {source} into {describe(args.to)}")
    report = migrate_store(source, args.to, Keyring(load_master_key(data_dir)), progress=lambda m: say(f"  {m}"))
    for table, (src, dst) in report.counts.items():
        if src != dst:
            say(f"error: {table}: {src} rows in control.db, {dst} in PostgreSQL")
    for problem in report.audit_problems:
        say(f"error: audit log on the target: {problem}")
    url_line = f'[control]\nurl = "{describe(args.to)}"'
    rows = sum(src for src, _ in report.counts.values())
    human = (f"migrated {rows} rows in {len(report.counts)} tables; counts equal, audit chain verified.\n"
             f"next: add to {data_dir / 'tollway.toml'} (and every gateway machine's):\n{url_line}\n"
             "then restart the gateways; control.db is left as it was") if report.ok else None
    emit(args, {**report.as_json(), "toml": url_line}, human)
    return 0 if report.ok else 1


def _postgres_url(text: str) -> str:
    if not text.startswith(POSTGRES_SCHEMES):
        raise argparse.ArgumentTypeError(f"{describe(text)!r}: give a postgresql:// URL")
    return text


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    control = commands.add_parser("control", parents=[common], help="the control store: status, migrate to PostgreSQL")
    actions = control.add_subparsers(dest="control_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", parents=[common, as_json], help="backend, URL (password hidden), schema version")
    status.set_defaults(func=cmd_status)
    migrate = actions.add_parser("migrate", parents=[common, as_json],
                                 help="copy control.db into an empty PostgreSQL database and verify it")
    migrate.add_argument("--to", required=True, type=_postgres_url, metavar="URL",
                         help="postgresql://USER@HOST:PORT/DB (the password from PGPASSWORD or ~/.pgpass)")
    migrate.set_defaults(func=cmd_migrate)
