"""`tollway status URL...`: ask every gateway behind a load balancer whether it is ready, and on which policy.

Each gateway's `/readyz` is fetched concurrently. A gateway passes when it answers, is ready, every
check in `checks` is "ok" (whatever checks it reports: limits, event store, policy, control, ...), and
its `policy_hash` is the one the others serve. Exit 0 only when every gateway passes; otherwise exit 1
with one line per problem on stderr, saying what to do. It needs no deployment directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

#: What a check of /readyz is about, for the messages; a check not listed here is shown by its name.
CHECK_NAMES = {
    "limits": "limit store (Redis)",
    "control": "control store (PostgreSQL)",
    "event_store": "event store (DuckDB or segments)",
    "policy": "policy files",
}
SHORT = 12  # hex digits of a hash in human output (as /metrics' tollway_policy_info shows it)


@dataclass
class GatewayStatus:
    url: str
    reachable: bool = False
    ready: bool = False
    policy_hash: str | None = None
    checks: dict[str, str] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)  # settings at risk that do not stop service (an evicting Redis)
    error: str | None = None

    @property
    def failing(self) -> dict[str, str]:
        return {name: value for name, value in self.checks.items() if value != "ok"}


def base_url(text: str) -> str:
    """`host:port` gets `http://`; a trailing `/` or `/readyz` goes (the path is added back)."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep:
        scheme, rest = "http", scheme
    return f"{scheme}://{rest.rstrip('/').removesuffix('/readyz')}"


async def probe(client, url: str) -> GatewayStatus:
    """One gateway's /readyz, read; never raises for a gateway that is down or answers nonsense."""
    import httpx

    status = GatewayStatus(url)
    try:
        response = await client.get(url + "/readyz")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        status.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return status
    status.reachable = True
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("checks"), dict):
        status.error = f"/readyz answered {response.status_code} without a Tollway readiness document"
        return status
    status.checks = {str(k): str(v) for k, v in document["checks"].items()}
    advice = document.get("advice")
    status.advice = [str(a) for a in advice] if isinstance(advice, list) else []
    status.policy_hash = document.get("policy_hash") or None
    status.ready = response.status_code == 200 and document.get("status") == "ready"
    if status.policy_hash is None:
        status.error = "/readyz has no policy_hash: this gateway runs an older Tollway; upgrade it"
    return status


async def probe_all(urls: list[str], timeout_s: float) -> list[GatewayStatus]:
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        return list(await asyncio.gather(*(probe(client, url) for url in urls)))


def majority_hash(statuses: list[GatewayStatus]) -> str | None:
    """The hash most gateways serve (on a tie, the one listed first); None when none reported one."""
    counts = Counter(s.policy_hash for s in statuses if s.policy_hash)
    # Counter keeps first-seen order and max() returns the first of equal counts.
    return max(counts, key=counts.__getitem__) if counts else None


def problems(statuses: list[GatewayStatus], majority: str | None) -> list[str]:
    """One line per problem, each saying what to do."""
    out = []
    served = sum(1 for s in statuses if s.policy_hash == majority)
    hashed = sum(1 for s in statuses if s.policy_hash)
    for s in statuses:
        if not s.reachable:
            out.append(f"{s.url}: unreachable ({s.error}): is `tollway serve` running there, and is the URL right?")
            continue
        if s.error:
            out.append(f"{s.url}: {s.error}")
        for name, reason in s.failing.items():
            what = CHECK_NAMES.get(name, name)
            if name == "policy":
                fix = "fix the file (`tollway policy check` on that machine); the previous policy stays in force"
            elif s.ready:
                fix = "fix it; the gateway still serves meanwhile"
            else:
                fix = "fix it, or take this gateway out of the load balancer until its /readyz answers 200"
            out.append(f"{s.url}: {'not ready: ' if not s.ready else ''}{what}: {reason}; {fix}")
        if not s.ready and not s.failing and not s.error:
            out.append(f"{s.url}: not ready (no failing check named): see its log")
        if s.policy_hash and majority and s.policy_hash != majority:
            out.append(f"{s.url}: serves policy {s.policy_hash[:SHORT]}, but {served} of {hashed} gateway(s) "
                       f"serve {majority[:SHORT]}: copy the same policy files to every machine "
                       "(`tollway policy check` prints a directory's hash)")
    return out


def report(statuses: list[GatewayStatus]) -> dict:
    """The `--json` document."""
    majority = majority_hash(statuses)
    agree = len({s.policy_hash for s in statuses if s.policy_hash}) <= 1
    found = problems(statuses, majority)
    return {"gateways": [asdict(s) for s in statuses], "policy_hashes_agree": agree,
            "majority_policy_hash": majority, "ok": not found, "problems": found}


def render(statuses: list[GatewayStatus], document: dict) -> str:
    """One aligned line per gateway, then the verdict on the policy hashes."""
    width = max(len(s.url) for s in statuses)
    lines = []
    for s in statuses:
        state = "unreachable" if not s.reachable else "ready" if s.ready else "not ready"
        shown = s.policy_hash[:SHORT] if s.policy_hash else "-"
        lines.append(f"{s.url:<{width}}  {state:<11}  policy {shown:<{SHORT}}  {_detail(s)}")
        lines += [f"{'':<{width}}  advice: {advice}" for advice in s.advice]
    majority = document["majority_policy_hash"]
    hashed = [s for s in statuses if s.policy_hash]
    if majority is None:
        lines.append("policy: no gateway reported a policy hash")
    elif document["policy_hashes_agree"]:
        lines.append(f"policy: the same on all {len(hashed)} gateway(s) that answered: {majority}")
    else:
        served = sum(1 for s in hashed if s.policy_hash == majority)
        differ = ", ".join(f"{s.url} ({s.policy_hash[:SHORT]})" for s in hashed if s.policy_hash != majority)
        lines.append(f"policy: hashes differ: {served} of {len(hashed)} serve {majority}; different: {differ}")
    return "\n".join(lines)


def _detail(s: GatewayStatus) -> str:
    """Why a gateway fails (its error, its failing checks), or the checks that passed."""
    if not s.reachable:
        return s.error or ""
    reasons = [f"{name}: {reason}" for name, reason in s.failing.items()] + ([s.error] if s.error else [])
    return "; ".join(reasons) if reasons else " ".join((", ".join(s.checks), "ok")).strip()


def cmd_status(args: argparse.Namespace) -> int:
    urls = [base_url(u) for u in args.urls]
    statuses = asyncio.run(probe_all(urls, args.timeout))
    document = report(statuses)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(render(statuses, document))
    for line in document["problems"]:
        print(f"error: {line}", file=sys.stderr)
    if document["ok"]:
        print(f"all {len(statuses)} gateway(s) ready, on the same policy", file=sys.stderr)
    return 0 if document["ok"] else 1


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    status = commands.add_parser(
        "status", parents=[common, as_json], help="check gateways: reachable, ready, on the same policy",
        description="Fetch /readyz of every gateway URL at once and report, per gateway: reachable, ready, the "
                    "checks that fail (limit store, control store, event store, policy) and the policy hash; then "
                    "whether all serve the same policy. Exit 0 only when all are reachable, ready, every check ok, "
                    "and the policy hashes agree; else 1.")
    status.add_argument("urls", nargs="+", metavar="URL", help="a gateway's base URL (http:// is added when missing)")
    status.add_argument("--timeout", type=positive_seconds, default=5.0,
                        help="seconds to wait for each gateway (default 5)")
    status.set_defaults(func=cmd_status)
