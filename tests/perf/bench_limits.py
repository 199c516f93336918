"""Limits benchmark: the latency limit checks add to a request, with 50 limits applying and with none.

    python tests/perf/bench_limits.py [--iterations 20000] [--users 1000]

Loads a synthetic policy set exactly as the gateway does (50 limits.csv rules apply to each measured
user: the tenant's, each user's, and two roles' (one from the token, one from a g line) across every
metric and window, and two for every tenant; plus rules for other tenants, roles and users that do not), then times, in process and on one event
loop, what the gateway does per request: `Limiter.applicable` + `reserve` (worst case) + `settle`
(real figures, budget alert check). Users rotate so that per-user counters are not all hot.
Target: p99 under 50 µs with 50 limits.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.loader import PolicySet, load_policy_set  # noqa: E402
from proxy.events import Event, Pseudonymizer  # noqa: E402
from proxy.limiter import Limiter  # noqa: E402
from proxy.limits import Amounts, MemoryLimitStore  # noqa: E402

TARGET_P99_US = 50.0
METRICS = ("requests", "tokens", "usd")
WINDOWS = ("minute", "hour", "day", "month")
HUGE = {"requests": "100000000", "tokens": "100000000000", "usd": "100000000"}  # never refused


def write_deployment(root: Path, users: int, with_limits: bool) -> list[tuple[str, str, tuple[str, ...]]]:
    """A deployment of two tenants; returns the measured identities (tenant, user, subjects)."""
    src = Path(__file__).resolve().parents[2] / "data"
    (root / "policy").mkdir(parents=True)
    (root / "tenants.csv").write_text("tenant,name,markup_pct,byok_fee_pct\nacme,Acme,0,2.5\nglobex,Globex,12,0\n")
    (root / "pricing.csv").write_text((src / "pricing.csv").read_text())
    (root / "policy" / "routes.csv").write_text("")
    identities = [("acme", f"user{u}@acme.example", (f"user{u}@acme.example", "role:engineering")) for u in range(users)]
    links = [f"g, user{u}@acme.example, role:platform, acme" for u in range(users)]
    (root / "policy" / "access.csv").write_text("p, *, acme, openai/*, allow\n" + "\n".join(links) + "\n")
    rows = []
    if with_limits:
        # 12 each (3 metrics x 4 windows): the tenant as a whole, each user (*), role:engineering (carried by
        # the token), role:platform (granted by a g line); and 2 for every tenant: 50 apply to each request
        for subject in ("tenant", "*", "role:engineering", "role:platform"):
            rows += [f"acme,{subject},{m},{w},{HUGE[m]}" for m in METRICS for w in WINDOWS]
        rows += [f"*,*,{m},month,{HUGE[m]}" for m in ("requests", "usd")]
        # rules that apply to nobody measured: other tenants, other roles, other users
        rows += [f"globex,{s},{m},{w},{HUGE[m]}" for s in ("tenant", "*") for m in METRICS for w in WINDOWS]
        rows += [f"acme,role:interns,{m},{w},{HUGE[m]}" for m in METRICS for w in WINDOWS]
        rows += [f"acme,someone{u}@acme.example,requests,day,{HUGE['requests']}" for u in range(100)]
    (root / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n" + "".join(r + "\n" for r in rows))
    return identities


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(policies: PolicySet, identities, iterations: int, warmup: int) -> tuple[list[float], int]:
    limiter = Limiter(MemoryLimitStore(), 4096, lambda alert: None, lambda refusal: None)
    pseudonymize = Pseudonymizer(b"k" * 32)
    prepared = [(tenant, user, subjects, pseudonymize(tenant, user)) for tenant, user, subjects in identities]
    amounts = Amounts(1, 4196, Decimal("0.002472"))
    samples: list[float] = []
    applied = 0
    clock = time.perf_counter_ns
    for i in range(warmup + iterations):
        tenant, user, subjects, pseudonym = prepared[i % len(prepared)]
        at = datetime.now(UTC)
        event = Event(event_id=uuid.uuid4(), ts=at, tenant=tenant, user_pseudonym=pseudonym, input_tokens=100,
                      output_tokens=12, cost_usd=Decimal("0.000022200"))
        started = clock()
        limits = limiter.applicable(policies, tenant, user, subjects, pseudonym)
        reservation = await limiter.reserve(limits, tenant, pseudonym, amounts, at)
        await limiter.settle(reservation, limits, event)
        elapsed = clock() - started
        if i >= warmup:
            samples.append(elapsed / 1000)
            applied = len(limits)
    return samples, applied


def report(label: str, samples: list[float], applied: int) -> float:
    ordered = sorted(samples)
    p50, p90, p99, p999 = (percentile(ordered, q) for q in (0.5, 0.9, 0.99, 0.999))
    print(f"{label:<10} {applied:>3} limits applying: p50 {p50:6.1f} µs  p90 {p90:6.1f} µs  p99 {p99:6.1f} µs  "
          f"p99.9 {p999:6.1f} µs  mean {statistics.fmean(ordered):6.1f} µs  max {ordered[-1]:7.1f} µs")
    return p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=1_000)
    args = parser.parse_args()
    results = {}
    for label, with_limits in (("baseline", False), ("50 limits", True)):
        with tempfile.TemporaryDirectory() as tmp:
            identities = write_deployment(Path(tmp), args.users, with_limits)
            policies = load_policy_set(Path(tmp), keys=None)
        # as `tollway serve` does once loaded: long-lived objects out of the collector's way
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)
        samples, applied = asyncio.run(measure(policies, identities, args.iterations, warmup=min(5_000, args.users * 3)))
        if with_limits and applied != 50:
            print(f"expected 50 limits to apply, got {applied}", file=sys.stderr)
            return 2
        results[label] = (samples, applied, len(policies.files.limits))
        gc.unfreeze()

    print(f"Limiter.applicable + reserve + settle, {args.iterations:,} requests, {args.users:,} users rotating, "
          f"in process (limits.csv: {results['50 limits'][2]} rules, 50 of them apply to each request)")
    report("baseline", *results["baseline"][:2])
    p99 = report("50 limits", *results["50 limits"][:2])
    added = statistics.median(results["50 limits"][0]) - statistics.median(results["baseline"][0])
    print(f"added by 50 limits at the median: {added:.1f} µs")
    verdict = "meets" if p99 < TARGET_P99_US else "MISSES"
    print(f"p99 with 50 limits {p99:.1f} µs {verdict} the target of {TARGET_P99_US:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
