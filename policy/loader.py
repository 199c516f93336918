"""A whole policy set (tenants, access, routes, limits, prices), checked across files.

`check_policy_set` returns every problem; `load_policy_set` builds the enforcers or raises
`PolicyInvalid` with the errors. Nothing is ever half-applied: a set is built complete, then
swapped in by its caller as one reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from policy.engine import Policy
from policy.files import PolicyFiles, Problem, RouteRule, glob_regex, load_policy_files, set_hash
from proxy.control import ProviderKey
from proxy.metering import Prices, load_prices
from proxy.overrides import is_glob
from proxy.pricebook import book_provider


class PolicyInvalid(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        listing = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"the policy files have {len(problems)} error(s):\n{listing}{more}")


@dataclass(frozen=True)
class PolicySet:
    policy: Policy
    prices: Prices
    files: PolicyFiles
    warnings: list[Problem]
    version: str  # the first 12 hex digits of `hash`
    hash: str  # policy.files.set_hash of the files loaded: equal on two machines with the same files
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def check_policy_set(data_dir: Path, keys: Mapping[str, ProviderKey] | None
                     ) -> tuple[PolicyFiles, Prices, list[Problem]]:
    """Parse every file and run the cross-file checks; `keys=None` skips the key checks."""
    files = load_policy_files(data_dir)
    prices, price_problems = load_prices(data_dir / "pricing.csv")
    problems = files.problems + price_problems
    if keys is not None:
        problems += route_key_problems(files, keys)
    if not files.errors:  # a file with errors loaded only in part: what it seems to lack would mislead
        problems += unrouted_access_warnings(files)
        if keys is not None:
            problems += unrouted_key_warnings(files, keys)
    problems += unpriced_glob_warnings(files, prices)
    return files, prices, sorted(problems, key=lambda p: (p.file, p.line, p.severity))


def load_policy_set(data_dir: Path, keys: Mapping[str, ProviderKey] | None) -> PolicySet:
    files, prices, problems = check_policy_set(data_dir, keys)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise PolicyInvalid(errors)
    digest = set_hash(files.hashes)  # once per (re)load, never per request
    return PolicySet(Policy(files, data_dir / "policy" / "model.conf"), prices, files,
                     [p for p in problems if p.severity == "warning"], digest[:12], digest)


def route_key_problems(files: PolicyFiles, keys: Mapping[str, ProviderKey]) -> list[Problem]:
    """A route may only name keys that exist, serve its provider, and belong to its tenant or the operator."""
    problems = []
    for route in files.routes:
        literal_provider = route_provider(route.model_glob)
        usable = 0
        for key_id in route.key_ids:
            key = keys.get(key_id)
            error = None
            if key is None:
                error = (f"key {key_id!r} does not exist: add it with `{keys_add_command(route, key_id)}` "
                         "(the provider key on stdin), or take it out of this route")
            elif key.owner_tenant is not None and key.owner_tenant != route.tenant:
                error = (f"key {key_id!r} belongs to tenant {key.owner_tenant!r}; a route for "
                         f"{route.tenant!r} may not use it")
            elif literal_provider and key.provider != literal_provider:
                error = f"key {key_id!r} is a {key.provider} key, the route is for {literal_provider}"
            elif key.status != "active":
                problems.append(Problem("policy/routes.csv", route.line, f"key {key_id!r} is {key.status}; "
                                        "the route skips it", "warning"))
                continue
            if error:
                problems.append(Problem("policy/routes.csv", route.line, error))
            else:
                usable += 1
        if usable == 0 and all(keys.get(k) for k in route.key_ids):
            problems.append(Problem("policy/routes.csv", route.line, "no usable key left in this route", "warning"))
    return problems


def route_provider(glob: str) -> str | None:
    """The one provider a model glob names (`openai` for `openai/gpt-4o*`); None for `*` or `open*/...`."""
    provider, slash, _ = glob.partition("/")
    return provider if slash and provider and not is_glob(provider) else None


def keys_add_command(route: RouteRule, key_id: str, tollway: str = "tollway") -> str:
    """The command that adds `key_id` as `route` uses it: its provider, and its tenant's (BYOK) or the operator's."""
    owner = "--operator" if route.tenant == "*" else f"--tenant {route.tenant}"
    return f"{tollway} keys add {key_id} --provider {route_provider(route.model_glob) or 'PROVIDER'} {owner}"


def unrouted_key_warnings(files: PolicyFiles, keys: Mapping[str, ProviderKey]) -> list[Problem]:
    """Active keys that no route names: the gateway never uses them."""
    named = {key_id for route in files.routes for key_id in route.key_ids}
    return [Problem("policy/routes.csv", 0, f"key {key.key_id!r} ({key.provider}, owner "
                    f"{key.owner_tenant or 'operator'}) is on no route: the gateway never uses it; name it in a "
                    f"route, or `tollway keys revoke {key.key_id}`", "warning")
            for key in sorted(keys.values(), key=lambda k: k.key_id)
            if key.status == "active" and key.key_id not in named]


def unrouted_access_warnings(files: PolicyFiles) -> list[Problem]:
    """Allow rules for a provider that no route serves for the tenant: those calls get 403 "No key route".

    Only rules naming one provider are checked, against routes for that provider (or any) in that
    tenant (or `*`); one warning per rule, naming every tenant it leaves without a route.
    """
    problems = []
    for rule in files.access:
        provider = route_provider(rule.model_glob)
        if rule.effect != "allow" or provider is None:
            continue
        tenants = sorted(files.tenants) if rule.tenant == "*" else [rule.tenant]
        unrouted = [t for t in tenants if not any(
            route.tenant in ("*", t) and glob_regex(route.model_glob.partition("/")[0]).match(provider)
            for route in files.routes)]
        if unrouted:
            who = f"tenant {unrouted[0]}" if len(unrouted) == 1 else f"tenants {', '.join(unrouted)}"
            problems.append(Problem("policy/access.csv", rule.line, f"allows {rule.model_glob} in {who}, but no route "
                                    f"in policy/routes.csv serves {provider} there: those calls get 403 \"No key "
                                    "route\" until a route and its key are added", "warning"))
    return problems


def unpriced_glob_warnings(files: PolicyFiles, prices: Prices) -> list[Problem]:
    """Access and route rules whose model (or glob) has no price in the overrides or the price book."""
    problems = []
    for name, rules in (("policy/access.csv", files.access), ("policy/routes.csv", files.routes)):
        for rule in rules:
            if not _priced(rule.model_glob, prices):
                problems.append(Problem(name, rule.line, f"model glob {rule.model_glob!r} matches no priced model "
                                        "(not in the price book nor in pricing.csv): its usage would be unpriced",
                                        "warning"))
    return problems


def _priced(glob: str, prices: Prices) -> bool:
    provider, _, model = glob.partition("/")
    if not model or is_glob(provider):
        return True  # any provider: nothing to check against
    known = book_provider(provider, "")
    if not is_glob(model):
        return prices.resolve(provider, model, known) is not None
    pattern = glob_regex(model)
    return any(pattern.match(m) for m in prices.models(provider, known))
