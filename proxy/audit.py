"""`tollway audit`: read and verify the hash-chained audit log of the control store.

Each entry's hash covers its content and the previous entry's hash, so an edited entry breaks its
own hash and a removed one breaks the next entry's link. Sequence numbers come from SQLite's
AUTOINCREMENT (or PostgreSQL's identity sequence), whose high-water mark survives deletes, so
removing the newest entries shows too.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, date, datetime

from proxy.control import GENESIS_HASH, ControlStore, audit_hash, is_postgres


def verify_chain(entries: list[dict], high_water: int | None) -> list[str]:
    """Every problem of the chain, as `seq N: what`; empty when intact."""
    problems = []
    previous, expected_seq = GENESIS_HASH, 1
    for entry in entries:
        seq = entry["seq"]
        if seq != expected_seq:
            problems.append(f"seq {expected_seq}..{seq - 1}: entries missing (deleted)")
        if entry["prev_hash"] != previous:
            problems.append(f"seq {seq}: link to the previous entry is broken")
        recomputed = audit_hash(entry["prev_hash"], entry["ts"], entry["action"], entry["actor"], entry["target"],
                                entry["details"])
        if recomputed != entry["hash"]:
            problems.append(f"seq {seq}: content does not match its hash (altered)")
        previous, expected_seq = entry["hash"], seq + 1
    if high_water is not None and high_water >= expected_seq:
        problems.append(f"seq {expected_seq}..{high_water}: newest entries missing (deleted)")
    return problems


def read_entries(target) -> tuple[list[dict], int | None]:
    """The log and its sequence's high-water mark, read-only (no master key needed)."""
    store = ControlStore(target, None, read_only=True)
    try:
        return store.audit_entries(), store.audit_high_water()
    finally:
        store.close()


def cmd_audit(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit
    from proxy.settings import load_settings, resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    target = load_settings(data_dir).control_target
    if not is_postgres(target) and not target.exists():
        raise CommandError(f"no control.db in {data_dir}: run `tollway init {data_dir}` first")
    entries, high_water = read_entries(target)
    if args.audit_action == "verify":
        problems = verify_chain(entries, high_water)
        for problem in problems:
            print(f"audit log: {problem}")
        emit(args, {"entries": len(entries), "ok": not problems, "problems": problems},
             f"audit log: {len(entries)} entries, " + ("chain intact" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    since = _since(args.since)
    shown = [e for e in entries if (not args.action or e["action"].startswith(args.action))
             and (since is None or e["ts"] >= since)]
    lines = [f"{e['seq']:>6}  {e['ts']}  {e['actor']:8} {e['action']:18} {e['target'] or '-':24} {e['details']}"
             for e in shown]
    emit(args, [{**e, "details": json.loads(e["details"])} for e in shown], "\n".join(lines) or "(no entries)")
    return 0


def _since(text: str | None) -> str | None:
    if not text:
        return None
    from proxy.cli import CommandError

    try:
        parsed = datetime.fromisoformat(text) if "T" in text else datetime.combine(date.fromisoformat(text),
                                                                                   datetime.min.time())
    except ValueError as exc:
        raise CommandError(f"--since {text!r}: use a date like 2026-11-01 or 2026-11-01T12:00") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%dT%H:%M:%S")


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    audit = commands.add_parser("audit", parents=[common, as_json],
                                help="show the audit log (`audit verify` checks its hash chain)")
    audit.add_argument("audit_action", nargs="?", choices=["verify"], help="verify: exit 1 if any entry was "
                       "altered or removed")
    audit.add_argument("--action", help="only actions starting with this, e.g. key. or token.revoked")
    audit.add_argument("--since", help="only entries at or after this date (UTC), e.g. 2026-11-01")
    audit.set_defaults(func=cmd_audit)
