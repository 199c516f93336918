"""Policy benchmark: decision latency with 10,000 access rules and 1,000 users, and reload time.

    python tests/perf/bench_policy.py [--rules 10000] [--users 1000]

Writes a synthetic policy set (50 tenants, roles granted through g lines, user and role rules with
globs, some denies) to a temp directory, loads it exactly as the gateway does, then times
first decisions (Casbin runs) and repeated decisions (the per-policy-version cache).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.loader import load_policy_set  # noqa: E402

PROVIDERS = {"openai": ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3"],
             "anthropic": ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"],
             "gemini": ["gemini-2.5-flash", "gemini-2.5-pro"]}
MODELS = [f"{p}/{m}" for p, ms in PROVIDERS.items() for m in ms]


def write_policy(root: Path, rules: int, users: int, tenants: int = 50) -> list[tuple[str, tuple[str, ...]]]:
    rng = random.Random(7)
    (root / "policy").mkdir(parents=True)
    names = [f"t{i:03d}" for i in range(tenants)]
    (root / "tenants.csv").write_text("tenant,name,markup_pct,byok_fee_pct\n"
                                      + "".join(f"{t},Tenant {t},10,2\n" for t in names))
    src = Path(__file__).resolve().parents[2] / "data"
    (root / "pricing.csv").write_text((src / "pricing.csv").read_text())
    (root / "policy" / "routes.csv").write_text("")
    identities, lines = [], []
    for u in range(users):
        tenant = names[u % tenants]
        user = f"user{u}@{tenant}.example"
        role = f"role:team{u % 12}"
        lines.append(f"g, {user}, {role}, {tenant}")
        identities.append((tenant, (user, f"role:tok{u % 5}")))
    globs = ["openai/*", "anthropic/claude-*", "gemini/*", "openai/gpt-4o*", "anthropic/claude-opus-*", *MODELS]
    for r in range(rules):
        tenant = names[r % tenants]
        subject = rng.choice([f"role:team{r % 12}", f"role:tok{r % 5}", f"user{r % users}@{tenant}.example"])
        effect = "deny" if r % 9 == 0 else "allow"
        lines.append(f"p, {subject}, {tenant}, {rng.choice(globs)}, {effect}")
    (root / "policy" / "access.csv").write_text("\n".join(lines) + "\n")
    return identities


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return f"p50 {p(0.5):.1f} µs, p99 {p(0.99):.1f} µs, mean {statistics.fmean(ordered) * 1e6:.1f} µs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        identities = write_policy(root, args.rules, args.users)
        started = time.perf_counter()
        policies = load_policy_set(root, keys=None)
        reload_s = time.perf_counter() - started
        errors = [p for p in policies.warnings if p.severity == "error"]
        assert not errors, errors
        policy = policies.policy
        rng = random.Random(1)
        requests = [(t, s, rng.choice(MODELS)) for t, s in identities for _ in range(3)]
        cold, warm = [], []
        for tenant, subjects, model in requests:
            t0 = time.perf_counter()
            policy.decide(tenant, subjects, model)
            cold.append(time.perf_counter() - t0)
        for _ in range(5):
            for tenant, subjects, model in requests:
                t0 = time.perf_counter()
                policy.decide(tenant, subjects, model)
                warm.append(time.perf_counter() - t0)
        allowed = sum(policy.decide(t, s, m).allowed for t, s, m in requests)
    print(f"policy: {len(policies.files.access):,} access rules, {len(policies.files.roles):,} role links, "
          f"{len(policies.files.tenants)} tenants, {args.users:,} users")
    print(f"reload (parse + validate + build enforcers): {reload_s * 1000:.0f} ms")
    print(f"first decision per (identity, model), Casbin: {percentiles(cold)}")
    print(f"repeated decision, cached per policy version: {percentiles(warm)}")
    print(f"{allowed} of {len(requests)} sampled requests allowed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
