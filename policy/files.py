"""Load and validate the governance lead's CSV files, with `file:line: reason` problems.

Casbin loads a malformed CSV mostly silently, so every file is parsed and checked here first;
only a set with no errors is ever turned into enforcers.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

EFFECTS = ("allow", "deny")
METRICS = ("requests", "tokens", "usd")
WINDOWS = ("minute", "hour", "day", "month")
LIMITS_HEADER = ["tenant", "subject", "metric", "window", "limit"]
MODEL_CONF = "policy/model.conf"
BUILT_IN_MODEL_CONF = Path(__file__).with_name("model.conf")  # what applies where a deployment has none
#: Every file of a policy set, relative to the deployment directory.
POLICY_FILES = ("tenants.csv", "pricing.csv", MODEL_CONF, "policy/access.csv", "policy/routes.csv",
                "policy/limits.csv", "policy/operations.csv", "policy/identities.csv")
_NAME = re.compile(r"^[A-Za-z0-9._@:\-]+$")
_GLOB = re.compile(r"^[A-Za-z0-9._@:/\-*?]+$")
_OPERATION_GLOB = re.compile(r"^[A-Za-z0-9_\-*?]+/[A-Za-z0-9_.*?]+$")
#: What applies when a deployment has no policy/operations.csv (the sample `tollway init` writes says the
#: same): inference, model lists, token counting, files, batches and stored responses for everyone; no
#: fine-tuning; `admin` and `other` only where a rule names them (see `policy.engine`).
DEFAULT_OPERATIONS = (
    "*/chat.completions.*", "*/completions.create", "*/responses.*", "*/embeddings.create", "*/moderations.create",
    "*/images.*", "*/audio.*", "*/realtime*", "*/models.*", "*/messages.*", "*/generate_content*", "*/count_tokens",
    "*/embed_content", "*/batch_embed_contents", "*/files.*", "*/uploads.*", "*/batches.*", "*/cached_contents.*",
    "*/vector_stores.*",
)


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.severity}: {self.message}"


@dataclass(frozen=True, slots=True)
class Bounds:
    """The numbers a field allows: finite, from `low` (excluded if `above`) to `high`, whole if `whole`.

    >>> Bounds(0, 1000).check("markup_pct", "1e400")
    'markup_pct 1e400 is out of range: it must be a number >= 0 and at most 1000'
    """

    low: int
    high: int
    whole: bool = False
    above: bool = False

    def __str__(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        return f"{kind} {'above' if self.above else '>='} {self.low} and at most {self.high}"

    def check(self, label: str, text: str, what: str = "it") -> Decimal | str:
        """`text` as a number within these bounds, else why not: `LABEL TEXT is ...: WHAT must be ...`."""
        value = finite_number(text)
        if value is None:
            return self.refusal(label, repr(text), "is not a number", what)
        if not self.low <= value <= self.high or (self.above and value == self.low):
            return self.refusal(label, text, "is out of range", what)
        if self.whole and value != value.to_integral_value():
            return self.refusal(label, text, "is not a whole number", what)
        return value

    def refusal(self, label: str, shown: str, why: str, what: str = "it") -> str:
        """The problem text for a value these bounds refuse; it says what they allow."""
        return f"{label} {shown} {why}: {what} must be {self}"


def finite_number(text: str) -> Decimal | None:
    """`text` as a finite Decimal; None for anything else (NaN, sNaN and Infinity included)."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


#: tenants.csv's markup_pct and byok_fee_pct.
PERCENT = Bounds(0, 1000)
#: limits.csv's limit per metric, far above any real one (usd: events and reports hold money as DECIMAL(18,9)).
LIMIT_BOUNDS = {"requests": Bounds(0, 10**12, whole=True), "tokens": Bounds(0, 10**12, whole=True),
                "usd": Bounds(0, 10**9)}


@dataclass(frozen=True, slots=True)
class AccessRule:
    line: int
    subject: str
    tenant: str
    model_glob: str
    effect: str

    def as_row(self) -> list[str]:
        return [self.subject, self.tenant, self.model_glob, self.effect]


@dataclass(frozen=True, slots=True)
class OperationRule:
    line: int  # 0: a built-in default (no policy/operations.csv)
    subject: str
    tenant: str
    operation_glob: str  # provider/operation with * and ?, e.g. */fine_tuning.*
    effect: str

    def as_row(self) -> list[str]:
        return [self.subject, self.tenant, self.operation_glob, self.effect]


def default_operation_rules() -> list[OperationRule]:
    return ([OperationRule(0, "*", "*", glob, "allow") for glob in DEFAULT_OPERATIONS]
            + [OperationRule(0, "*", "*", "*/fine_tuning.*", "deny")])


@dataclass(frozen=True, slots=True)
class RoleLink:
    line: int
    user: str
    role: str
    tenant: str


@dataclass(frozen=True, slots=True)
class RouteRule:
    line: int
    tenant: str
    model_glob: str
    key_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LimitRule:
    line: int
    tenant: str  # a tenant id or *
    subject: str  # tenant | * | role:NAME | a user id
    metric: str  # requests | tokens | usd
    window: str  # minute | hour | day | month
    limit: Decimal


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant: str
    name: str
    markup_pct: Decimal
    byok_fee_pct: Decimal


@dataclass
class PolicyFiles:
    access: list[AccessRule] = field(default_factory=list)
    roles: list[RoleLink] = field(default_factory=list)
    routes: list[RouteRule] = field(default_factory=list)
    limits: list[LimitRule] = field(default_factory=list)
    operations: list[OperationRule] = field(default_factory=default_operation_rules)
    tenants: dict[str, Tenant] = field(default_factory=dict)
    identities: list = field(default_factory=list)  # policy.identities.IdentityRule, in file order
    hashes: dict[str, str] = field(default_factory=dict)  # file -> sha256, for the audit trail
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def csv_lines(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank, non-comment lines as (line number, stripped fields).

    A UTF-8 byte-order mark opening the file (as Excel writes it) is dropped; one anywhere else is text.
    Every CSV file of a deployment is read through here.
    """
    out = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            fields = next(csv.reader([raw], skipinitialspace=True))
            out.append((number, [f.strip() for f in fields]))
    return out


def load_policy_files(data_dir: Path) -> PolicyFiles:
    """Parse `tenants.csv` and `policy/{access,routes,limits,operations,identities}.csv` from a deployment."""
    from policy.identities import load_identities  # it builds on this module

    files = PolicyFiles()
    files.hashes = file_hashes(data_dir)
    files.tenants = _load_tenants(data_dir / "tenants.csv", files.problems)
    _load_access(data_dir / "policy" / "access.csv", files)
    _load_routes(data_dir / "policy" / "routes.csv", files)
    _load_limits(data_dir / "policy" / "limits.csv", files)
    _load_operations(data_dir / "policy" / "operations.csv", files)
    load_identities(data_dir / "policy" / "identities.csv", files, _read)
    _warn_duplicates(files)
    return files


def file_hashes(data_dir: Path) -> dict[str, str]:
    """sha256 of each policy file that exists; for `policy/model.conf`, of the built-in copy when the
    deployment has none (it is the one in force, and the one a newer Tollway might change)."""
    hashes = {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
              for name in POLICY_FILES if (data_dir / name).exists()}
    hashes.setdefault(MODEL_CONF, hashlib.sha256(BUILT_IN_MODEL_CONF.read_bytes()).hexdigest())
    return hashes


def set_hash(hashes: dict[str, str]) -> str:
    """The policy set's hash: sha256 of `name=sha256(bytes);` for each file of `file_hashes`, by name.

    Raw bytes, on purpose: the same hash means the same files, byte for byte (a BOM or CRLF the loader
    ignores still changes it). A missing file is left out, so it differs from an empty one (but a missing
    model.conf counts as the built-in copy it stands for). Gateways
    show it as `policy_hash` (`/readyz`) and `tollway_policy_info` (`/metrics`); `tollway policy check`
    prints it for a directory, so an operator can compare a machine's files with what a gateway serves.
    """
    text = "".join(f"{name}={digest};" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _relative(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name == "policy" else path.name


def _read(path: Path, problems: list[Problem]) -> list[tuple[int, list[str]]]:
    if not path.exists():
        problems.append(Problem(_relative(path), 0, "file is missing; `tollway init` writes a sample"))
        return []
    try:
        return csv_lines(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        problems.append(Problem(_relative(path), 0, f"cannot be read as UTF-8 CSV: {exc}"))
        return []


def _load_tenants(path: Path, problems: list[Problem]) -> dict[str, Tenant]:
    name = _relative(path)
    rows = _read(path, problems)
    tenants: dict[str, Tenant] = {}
    if rows and rows[0][1] == ["tenant", "name", "markup_pct", "byok_fee_pct"]:
        rows = rows[1:]
    elif rows:
        problems.append(Problem(name, rows[0][0], "header must be tenant,name,markup_pct,byok_fee_pct"))
        return tenants
    for line, fields in rows:
        if len(fields) != 4:
            problems.append(Problem(name, line, f"expected 4 columns, got {len(fields)}"))
            continue
        tenant, title, markup, fee = fields
        if not _NAME.match(tenant) or tenant == "*":
            problems.append(Problem(name, line, f"tenant id {tenant!r} may only hold letters, digits and - _ . @"))
            continue
        if tenant in tenants:
            problems.append(Problem(name, line, f"tenant {tenant!r} is listed twice"))
            continue
        pcts = [_percent(column, value) for column, value in (("markup_pct", markup), ("byok_fee_pct", fee))]
        problem = next((p for p in pcts if isinstance(p, str)), None)
        if problem:  # still a known tenant: its rules are not reported as naming an unknown one
            problems.append(Problem(name, line, problem))
            pcts = [Decimal(0), Decimal(0)]
        tenants[tenant] = Tenant(tenant, title, pcts[0], pcts[1])
    return tenants


def _percent(column: str, text: str) -> Decimal | str:
    """A tenant's percentage, else its problem (a non-number keeps the wording `/readyz` has always shown)."""
    if finite_number(text) is None:
        return "markup_pct and byok_fee_pct must be numbers >= 0, e.g. 10 or 2.5"
    return PERCENT.check(column, text)


def _load_access(path: Path, files: PolicyFiles) -> None:
    name = _relative(path)
    for line, fields in _read(path, files.problems):
        kind, rest = fields[0], fields[1:]
        if kind == "p":
            rule = _access_rule(name, line, rest, files)
            if rule:
                files.access.append(rule)
        elif kind == "g":
            link = _role_link(name, line, rest, files)
            if link:
                files.roles.append(link)
        else:
            files.problems.append(Problem(name, line, f"unknown rule type {kind!r}: use p (permission) or g (role)"))


def _access_rule(name: str, line: int, rest: list[str], files: PolicyFiles) -> AccessRule | None:
    fields = _permission(name, line, rest, files, "model-glob", _glob_problem)
    return AccessRule(line, *fields) if fields else None


def _permission(name: str, line: int, rest: list[str], files: PolicyFiles, what: str, glob_problem
                ) -> list[str] | None:
    """The fields of a p line (subject, tenant, glob, effect) once valid, else None with its problem noted."""
    if len(rest) != 4:
        files.problems.append(Problem(name, line, f"p needs 4 fields (subject, tenant, {what}, effect), got {len(rest)}"))
        return None
    subject, tenant, glob, effect = rest
    problem = (_empty(rest) or _subject_problem(subject) or _tenant_problem(tenant, files.tenants)
               or glob_problem(glob) or (None if effect in EFFECTS else f"unknown effect {effect!r}: use allow or deny"))
    if problem:
        files.problems.append(Problem(name, line, problem))
        return None
    return rest


def _load_operations(path: Path, files: PolicyFiles) -> None:
    """`p, subject, tenant, provider/operation-glob, effect` lines; without the file, the defaults apply."""
    name = _relative(path)
    if not path.exists():
        files.problems.append(Problem(name, 0, "file is missing: the default operations policy applies (inference, "
                                      "models, token counting, files, batches, stored responses; no fine-tuning, "
                                      "admin or other); `tollway init` writes it as a sample", "warning"))
        return
    files.operations = []
    for line, fields in _read(path, files.problems):
        if fields[0] != "p":
            files.problems.append(Problem(name, line, f"unknown rule type {fields[0]!r}: operations use p lines "
                                          "(roles come from the g lines of policy/access.csv)"))
            continue
        rule = _permission(name, line, fields[1:], files, "provider/operation-glob", _operation_glob_problem)
        if rule:
            files.operations.append(OperationRule(line, *rule))


def _operation_glob_problem(glob: str) -> str | None:
    if glob == "*" or _OPERATION_GLOB.match(glob):
        return None
    return (f"bad operation glob {glob!r}: use provider/operation with * and ? wildcards, "
            "e.g. openai/files.* or */fine_tuning.*")


def _role_link(name: str, line: int, rest: list[str], files: PolicyFiles) -> RoleLink | None:
    if len(rest) != 3:
        files.problems.append(Problem(name, line, f"g needs 3 fields (user, role:NAME, tenant), got {len(rest)}"))
        return None
    user, role, tenant = rest
    problem = (_empty(rest) or ("a role link names one user, not *" if user == "*" else _subject_problem(user))
               or (None if role.startswith("role:") and _NAME.match(role) else f"role {role!r} must look like role:NAME")
               or _tenant_problem(tenant, files.tenants))
    if problem:
        files.problems.append(Problem(name, line, problem))
        return None
    return RoleLink(line, user, role, tenant)


def _load_routes(path: Path, files: PolicyFiles) -> None:
    name = _relative(path)
    for line, fields in _read(path, files.problems):
        if fields[0] != "p":
            files.problems.append(Problem(name, line, f"unknown rule type {fields[0]!r}: routes use p lines only"))
            continue
        rest = fields[1:]
        if len(rest) != 3:
            files.problems.append(Problem(name, line, f"p needs 3 fields (tenant, model-glob, key-id[|key-id...]), got {len(rest)}"))
            continue
        tenant, glob, keys = rest
        key_ids = tuple(k.strip() for k in keys.split("|"))
        problem = (_empty(rest) or _tenant_problem(tenant, files.tenants) or _glob_problem(glob)
                   or next((f"key id {k!r} is not valid" for k in key_ids if not _NAME.match(k)), None))
        if problem:
            files.problems.append(Problem(name, line, problem))
            continue
        files.routes.append(RouteRule(line, tenant, glob, key_ids))


def _empty(fields: list[str]) -> str | None:
    return "empty field" if any(not f for f in fields) else None


def _subject_problem(subject: str) -> str | None:
    if subject == "*" or _NAME.match(subject):
        return None
    return f"subject {subject!r} is not valid: use a user id, role:NAME or *"


def _tenant_problem(tenant: str, tenants: dict[str, Tenant]) -> str | None:
    if tenant == "*" or tenant in tenants:
        return None
    return f"tenant {tenant!r} is not in tenants.csv"


def _glob_problem(glob: str) -> str | None:
    if not _GLOB.match(glob):
        return f"bad model glob {glob!r}: use provider/model with * and ? wildcards"
    if glob != "*" and "/" not in glob and not glob.endswith("*"):
        return f"bad model glob {glob!r}: models are named provider/model, e.g. openai/gpt-4o-mini"
    return None


def _load_limits(path: Path, files: PolicyFiles) -> None:
    name = _relative(path)
    rows = _read(path, files.problems) if path.exists() else []
    if not rows:
        return
    if rows[0][1] != LIMITS_HEADER:
        files.problems.append(Problem(name, rows[0][0], "header must be " + ",".join(LIMITS_HEADER)))
        return
    for line, fields in rows[1:]:
        if len(fields) != 5:
            files.problems.append(Problem(name, line, f"expected 5 columns, got {len(fields)}"))
            continue
        tenant, subject, metric, window, amount = fields
        problem = (_empty(fields) or _tenant_problem(tenant, files.tenants)
                   or (None if subject in ("tenant", "*") else _subject_problem(subject))
                   or (None if metric in METRICS else f"unknown metric {metric!r}: use {', '.join(METRICS)}")
                   or (None if window in WINDOWS else f"unknown window {window!r}: use {', '.join(WINDOWS)}"))
        limit = problem or LIMIT_BOUNDS[metric].check("limit", amount, f"a {metric} limit")
        if isinstance(limit, str):
            files.problems.append(Problem(name, line, limit))
            continue
        files.limits.append(LimitRule(line, tenant, subject, metric, window, limit))


def _warn_duplicates(files: PolicyFiles) -> None:
    """Warnings for lines that can never change a decision: repeats and shadowed routes."""
    seen: dict[tuple, int] = {}
    denies: dict[tuple[str, str], list[AccessRule]] = {}  # (subject, tenant) -> deny rules, in file order
    for rule in files.access:
        if rule.effect == "deny":
            denies.setdefault((rule.subject, rule.tenant), []).append(rule)
    for rule in files.access:
        key = tuple(rule.as_row())
        if key in seen:
            files.problems.append(Problem("policy/access.csv", rule.line,
                                          f"duplicate of line {seen[key]}", "warning"))
        elif rule.effect == "allow":
            candidates = [d for subject in {rule.subject, "*"} for tenant in {rule.tenant, "*"}
                          for d in denies.get((subject, tenant), ())]
            cover = min((d for d in candidates if glob_covers(d.model_glob, rule.model_glob)),
                        key=lambda d: d.line, default=None)
            if cover:
                files.problems.append(Problem("policy/access.csv", rule.line,
                                              f"never allows: line {cover.line} denies everything it would allow",
                                              "warning"))
        seen.setdefault(key, rule.line)
    for index, route in enumerate(files.routes):
        for earlier in files.routes[:index]:
            if earlier.tenant in ("*", route.tenant) and glob_covers(earlier.model_glob, route.model_glob):
                files.problems.append(Problem(
                    "policy/routes.csv", route.line,
                    f"never used: line {earlier.line} ({earlier.tenant}, {earlier.model_glob}) matches first", "warning"))
                break
    limit_seen: dict[tuple, int] = {}
    for limit in files.limits:
        key = (limit.tenant, limit.subject, limit.metric, limit.window)
        if key in limit_seen:
            files.problems.append(Problem("policy/limits.csv", limit.line,
                                          f"same tenant, subject, metric and window as line {limit_seen[key]}; "
                                          "the tighter limit applies", "warning"))
        limit_seen.setdefault(key, limit.line)


def glob_covers(wide: str, narrow: str) -> bool:
    """Does every name `narrow` matches also match `wide`? (Exact for the shapes used in practice.)

    >>> glob_covers("openai/*", "openai/gpt-4o*"), glob_covers("openai/gpt-4o", "openai/*")
    (True, False)
    """
    if wide == narrow or wide == "*":
        return True
    if "*" not in narrow and "?" not in narrow:
        return glob_regex(wide).match(narrow) is not None
    if wide.endswith("*") and "*" not in wide[:-1] and "?" not in wide:
        return narrow.startswith(wide[:-1])
    return False


@lru_cache(maxsize=8192)
def glob_regex(glob: str) -> re.Pattern[str]:
    """A model glob as a compiled regex: `*` any run of characters (`/` included), `?` one."""
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in glob]
    return re.compile("".join(parts) + r"\Z", re.DOTALL)
