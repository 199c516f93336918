"""`tollway audit`: admin actions done with the CLI are logged; `audit verify` detects any edit or
deletion of past entries (made here with sqlite3 directly, as an intruder would)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.control import audit_hash
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(60)


def ok(data_dir: Path, *args: str, stdin: str | None = None) -> str:
    result = run_cli(data_dir, *args, stdin=stdin)
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def audit(data_dir: Path, *args: str) -> list[dict]:
    return json.loads(ok(data_dir, "audit", "--json", *args))


def verify(data_dir: Path) -> tuple[int, list[str]]:
    result = run_cli(data_dir, "audit", "verify")
    return result.returncode, result.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[Path, datetime, dict]:
    """A deployment whose log holds key and token actions in two batches, a second or more apart."""
    root = tmp_path_factory.mktemp("audit") / "deploy"
    ok(None, "init", str(root))
    ok(root, "keys", "add", "operator-openai", "--provider", "openai", "--operator", stdin="sk-audit-0001\n")
    ok(root, "keys", "add", "acme-anthropic", "--provider", "anthropic", "--tenant", "acme", stdin="sk-ant-0002\n")
    token = json.loads(ok(root, "tokens", "create", "--tenant", "acme", "--user", "bob@acme.com", "--role", "dev",
                          "--expires-in", "30d", "--json"))
    first_batch_done = datetime.now(UTC)
    time.sleep(1.05)
    ok(root, "keys", "rotate", "operator-openai", stdin="sk-audit-0003\n")
    ok(root, "keys", "revoke", "acme-anthropic")
    ok(root, "tokens", "revoke", token["id"])
    boundary = (first_batch_done + timedelta(seconds=1)).replace(microsecond=0)
    return root, boundary, token


@pytest.fixture
def copy(logged, tmp_path) -> Path:
    target = tmp_path / "deploy"
    shutil.copytree(logged[0], target)
    return target


def test_cli_admin_actions_are_logged_in_order(logged):
    root, _, token = logged
    entries = audit(root)
    assert [(e["seq"], e["action"], e["actor"], e["target"]) for e in entries] == [
        (1, "key.added", "cli", "operator-openai"),
        (2, "key.added", "cli", "acme-anthropic"),
        (3, "token.issued", "cli", token["id"]),
        (4, "key.rotated", "cli", "operator-openai"),
        (5, "key.revoked", "cli", "acme-anthropic"),
        (6, "token.revoked", "cli", token["id"]),
    ]
    assert entries[0]["details"] == {"provider": "openai", "owner": "operator"}
    assert entries[1]["details"] == {"provider": "anthropic", "owner": "acme"}
    assert entries[2]["details"] == {"tenant": "acme", "roles": ["dev"], "expires_at": token["expires_at"]}
    assert all(e["ts"].endswith("Z") for e in entries)
    assert entries[1]["prev_hash"] == entries[0]["hash"]
    # neither the secrets nor the token nor the user id are in the log
    dumped = json.dumps(entries) + ok(root, "audit")
    for secret in ("sk-audit-0001", "sk-ant-0002", "sk-audit-0003", token["token"], "bob@acme.com"):
        assert secret not in dumped


def test_human_listing(logged):
    lines = ok(logged[0], "audit").strip().splitlines()
    assert len(lines) == 6
    assert lines[0].split()[:4] == ["1", lines[0].split()[1], "cli", "key.added"]
    assert "operator-openai" in lines[0] and '"owner":"operator"' in lines[0]


def test_filter_by_action_prefix(logged):
    root = logged[0]
    assert [e["action"] for e in audit(root, "--action", "key.")] == ["key.added", "key.added", "key.rotated",
                                                                      "key.revoked"]
    assert [e["seq"] for e in audit(root, "--action", "token.revoked")] == [6]
    assert audit(root, "--action", "policy") == []
    assert ok(root, "audit", "--action", "nothing.").strip() == "(no entries)"


def test_filter_since(logged):
    root, boundary, _ = logged
    assert [e["seq"] for e in audit(root, "--since", boundary.strftime("%Y-%m-%dT%H:%M:%S"))] == [4, 5, 6]
    assert [e["seq"] for e in audit(root, "--since", boundary.date().isoformat())] == [1, 2, 3, 4, 5, 6]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert audit(root, "--since", tomorrow) == []
    assert [e["seq"] for e in audit(root, "--action", "key.", "--since", boundary.isoformat()[:19])] == [4, 5]


def test_since_with_a_utc_offset_is_converted_to_utc(logged):
    """`--since 2026-11-01T13:00+01:00` is the same instant as 12:00 UTC."""
    root, boundary, _ = logged
    plus_two = (boundary + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S") + "+02:00"  # == boundary
    assert [e["seq"] for e in audit(root, "--since", plus_two)] == [4, 5, 6]
    zulu = boundary.strftime("%Y-%m-%dT%H:%M:%S") + "Z"
    assert [e["seq"] for e in audit(root, "--since", zulu)] == [4, 5, 6]


def test_bad_since_is_refused(logged):
    result = run_cli(logged[0], "audit", "--since", "last tuesday")
    assert result.returncode == 1
    assert "--since 'last tuesday': use a date like" in result.stderr


def test_credits_added_is_logged(copy):
    """The spec lists `tollway credits add --tenant T --amount USD [--note TEXT]` and audits it."""
    result = run_cli(copy, "credits", "add", "--tenant", "acme", "--amount", "250", "--note", "PO 42")
    assert result.returncode == 0, result.stderr
    [entry] = audit(copy, "--action", "credits.")
    assert (entry["action"], entry["target"], entry["details"]) == (
        "credits.added", "acme", {"amount_usd": "250", "note": "PO 42"})
    assert verify(copy)[0] == 0


# --- verify ------------------------------------------------------------------------------------
def tamper(data_dir: Path, *statements: tuple[str, tuple]) -> None:
    con = sqlite3.connect(data_dir / "control.db")
    try:
        for sql, args in statements:
            con.execute(sql, args)
        con.commit()
    finally:
        con.close()


def test_verify_passes_on_an_intact_log(logged):
    code, lines = verify(logged[0])
    assert (code, lines) == (0, ["audit log: 6 entries, chain intact"])
    result = run_cli(logged[0], "audit", "verify", "--json")
    assert json.loads(result.stdout) == {"entries": 6, "ok": True, "problems": []}


def test_verify_detects_an_edited_entry(copy):
    tamper(copy, ("UPDATE audit_log SET details = ? WHERE seq = 2", ('{"owner":"operator","provider":"anthropic"}',)))
    code, lines = verify(copy)
    assert code == 1
    assert lines == ["audit log: seq 2: content does not match its hash (altered)",
                     "audit log: 6 entries, 1 problem(s)"]


def test_verify_detects_an_edited_entry_whose_hash_was_recomputed(copy):
    con = sqlite3.connect(copy / "control.db")
    ts, action, actor, target, prev = con.execute(
        "SELECT ts, action, actor, target, prev_hash FROM audit_log WHERE seq = 5").fetchone()
    con.close()
    details = '{"note":"nothing happened"}'
    tamper(copy, ("UPDATE audit_log SET action = 'key.rotated', details = ?, hash = ? WHERE seq = 5",
                  (details, audit_hash(prev, ts, "key.rotated", actor, target, details))))
    code, lines = verify(copy)
    assert code == 1
    assert lines[:-1] == ["audit log: seq 6: link to the previous entry is broken"]


def test_verify_detects_a_deleted_middle_entry(copy):
    tamper(copy, ("DELETE FROM audit_log WHERE seq = 3", ()))
    code, lines = verify(copy)
    assert code == 1
    assert lines == ["audit log: seq 3..3: entries missing (deleted)",
                     "audit log: seq 4: link to the previous entry is broken",
                     "audit log: 5 entries, 2 problem(s)"]


def test_verify_detects_a_deleted_first_entry(copy):
    tamper(copy, ("DELETE FROM audit_log WHERE seq = 1", ()))
    code, lines = verify(copy)
    assert code == 1
    assert "audit log: seq 1..1: entries missing (deleted)" in lines


def test_verify_detects_deleted_newest_entries(copy):
    tamper(copy, ("DELETE FROM audit_log WHERE seq = 6", ()))
    code, lines = verify(copy)
    assert code == 1
    assert lines == ["audit log: seq 6..6: newest entries missing (deleted)", "audit log: 5 entries, 1 problem(s)"]
    tamper(copy, ("DELETE FROM audit_log WHERE seq >= 4", ()))
    assert verify(copy) == (1, ["audit log: seq 4..6: newest entries missing (deleted)",
                                "audit log: 3 entries, 1 problem(s)"])


def test_verify_detects_a_changed_hash(copy):
    tamper(copy, ("UPDATE audit_log SET hash = ? WHERE seq = 4", ("f" * 64,)))
    code, lines = verify(copy)
    assert code == 1
    assert lines == ["audit log: seq 4: content does not match its hash (altered)",
                     "audit log: seq 5: link to the previous entry is broken",
                     "audit log: 6 entries, 2 problem(s)"]


def test_verify_detects_a_changed_timestamp(copy):
    tamper(copy, ("UPDATE audit_log SET ts = '2020-01-01T00:00:00Z' WHERE seq = 1", ()))
    code, lines = verify(copy)
    assert code == 1
    assert lines[0] == "audit log: seq 1: content does not match its hash (altered)"


def test_the_chain_continues_after_more_actions(copy):
    ok(copy, "tokens", "create", "--tenant", "globex", "--user", "carol@globex.com")
    assert verify(copy) == (0, ["audit log: 7 entries, chain intact"])
    entries = audit(copy)
    assert entries[-1]["prev_hash"] == entries[-2]["hash"]
