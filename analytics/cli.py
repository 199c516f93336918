"""`tollway report …` and `tollway credits …`: build reports now; prepaid credits for unified billing."""

from __future__ import annotations

import argparse
from decimal import Decimal

from policy.files import Bounds, load_policy_files
from proxy.settings import resolve_data_dir

#: One top-up, in USD: a billion is far above any real one and well inside the statements' DECIMAL(18,2).
CREDIT_AMOUNT = Bounds(0, 1_000_000_000, above=True)


def cmd_credits_add(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit, open_store, say

    amount = CREDIT_AMOUNT.check("--amount", args.amount, "a top-up in USD")
    if isinstance(amount, str):
        raise CommandError(f"{amount}, e.g. 250 or 99.50")
    if amount != amount.quantize(Decimal("0.01")):
        raise CommandError("--amount has more than two decimals: credits are whole cents")
    tenants = load_policy_files(resolve_data_dir(args.data_dir)).tenants
    if args.tenant not in tenants:
        raise CommandError(f"tenant {args.tenant!r} is not in tenants.csv; known: {', '.join(sorted(tenants)) or 'none'}")
    store = open_store(args)
    credit_id = store.add_credits(args.tenant, amount, args.note)
    total = sum((a for tenant, a, _, _ in store.list_credits() if tenant == args.tenant), Decimal(0))
    say(f"added {amount} USD of prepaid credits to {args.tenant} ({tenants[args.tenant].name})"
        + (f", note {args.note!r}" if args.note else "")
        + f"; {args.tenant}'s top-ups now total {total} USD (`tollway credits list` lists them)")
    emit(args, {"id": credit_id, "tenant": args.tenant, "amount_usd": str(amount), "note": args.note,
                "tenant_total_usd": str(total)}, None)
    return 0


def cmd_credits_list(args: argparse.Namespace) -> int:
    from proxy.cli import emit, open_store

    rows = open_store(args).list_credits()
    lines = [f"{'TENANT':16} {'AMOUNT_USD':>12}  {'ADDED':21} NOTE"] + [
        f"{tenant:16} {amount:>12}  {created:21} {note or ''}" for tenant, amount, note, created in rows]
    emit(args, [{"tenant": t, "amount_usd": str(a), "note": n, "created_at": c} for t, a, n, c in rows],
         "\n".join(lines))
    return 0


def cmd_report_run(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit, say
    from proxy.settings import load_settings

    settings = load_settings(resolve_data_dir(args.data_dir))
    if args.period and not _is_period(args.period):
        raise CommandError(f"--period {args.period!r}: use YYYY-MM, e.g. 2026-10")
    segments = settings.events.sink == "segments"
    if not settings.events_db.exists() and not segments:
        raise CommandError(f"no events yet in {settings.events_db}: start the gateway (`tollway serve`) first")
    say("building reports" + (" (asking the running gateway, which owns events.duckdb)"
                              if not segments and _locked(settings) else ""))
    try:
        manifest, how = _run_now(settings)
    except TimeoutError as exc:
        raise CommandError(str(exc)) from exc
    lines = [f"{name:14} {info['rows']:>8} rows  {', '.join(info['files'])}" for name, info in manifest["reports"].items()]
    if args.period:
        lines += _period_lines(settings.reports_dir, args.period)
    say(f"built by the {how if how in ('gateway', 'pipeline') else 'CLI'} from {manifest['source_rows']} events "
        f"in {manifest.get('build_seconds', 0)} s into {settings.reports_dir}")
    emit(args, manifest, "\n".join(lines))
    return 0


def cmd_report_close(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    import polars as pl

    from proxy.cli import CommandError, emit, open_store, say
    from proxy.settings import load_settings

    if not _is_period(args.period):
        raise CommandError(f"--period {args.period!r}: use YYYY-MM, e.g. 2026-10")
    if args.period >= datetime.now(UTC).strftime("%Y-%m"):
        raise CommandError(f"period {args.period} has not ended yet; close it once the month is over")
    settings = load_settings(resolve_data_dir(args.data_dir))
    store = open_store(args)
    if settings.events_db.exists() or settings.events.sink == "segments":
        _run_now(settings)  # the figures as of now
    path = settings.reports_dir / "statements.parquet"
    rows = (pl.read_parquet(path).filter(pl.col("period") == args.period).to_dicts() if path.exists() else [])
    store.close_period(args.period, rows)
    say(f"closed {args.period}: {len(rows)} statement(s) frozen; later events for it become adjustments "
        "in the next open period")
    emit(args, {"period": args.period, "statements": rows}, f"{args.period} closed")
    return 0


def _run_now(settings) -> tuple[dict, str]:
    """Build now, whichever process owns events.duckdb: with segments, the pipeline (or this command,
    which ingests the waiting segments first when no pipeline runs)."""
    from analytics.jobs import run_now

    if settings.events.sink == "segments":
        from proxy.pipeline.cli import report_now

        return report_now(settings)
    return run_now(settings.data_dir, settings.events_db, settings.reports_dir)


def _period_lines(reports_dir, period: str) -> list[str]:
    """That period's statements, one line per tenant."""
    import polars as pl

    path = reports_dir / "statements.parquet"
    rows = pl.read_parquet(path).filter(pl.col("period") == period).to_dicts() if path.exists() else []
    if not rows:
        return [f"no statements for {period}"]
    return [f"{period} {r['tenant']:16} charges {r['charges_usd']:>12}  credits applied {r['credits_applied_usd']:>10}"
            f"  due {r['amount_due_usd']:>12}" + ("  (closed)" if r["closed"] else "") for r in rows]


def _is_period(text: str) -> bool:
    import re

    return re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", text) is not None


def _locked(settings) -> bool:
    import duckdb

    try:
        duckdb.connect(str(settings.events_db), read_only=True).close()
        return False
    except duckdb.IOException:
        return True


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    report = commands.add_parser("report", parents=[common],
                                 help="reports: run (build them now), close (freeze a period's statements)")
    report_actions = report.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    run = report_actions.add_parser("run", parents=[common, as_json],
                                    help="build every report now (works whether or not the gateway runs)")
    run.add_argument("--period", help="YYYY-MM: also print that period's statements")
    run.set_defaults(func=cmd_report_run)
    close = report_actions.add_parser("close", parents=[common, as_json],
                                      help="freeze a past period's statements (late events become adjustments)")
    close.add_argument("--period", required=True, help="YYYY-MM, a month that has ended")
    close.set_defaults(func=cmd_report_close)

    credits = commands.add_parser("credits", parents=[common], help="prepaid credits: add, list")
    actions = credits.add_subparsers(dest="credits_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[common, as_json], help="top up a tenant's prepaid credits")
    add.add_argument("--tenant", required=True, help="a tenant of tenants.csv")
    add.add_argument("--amount", required=True, help="USD, e.g. 250 or 99.50")
    add.add_argument("--note", help="a note for the statement and the audit log")
    add.set_defaults(func=cmd_credits_add)
    actions.add_parser("list", parents=[common, as_json], help="every top-up, oldest first"
                       ).set_defaults(func=cmd_credits_list)
