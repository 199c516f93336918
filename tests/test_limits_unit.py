"""Limits and budgets in process: the store's arithmetic, calendar windows, refusals, thresholds,
which limits.csv rules apply to whom, the worst-case estimate, and rebuilding counters from events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from policy.files import LimitRule
from policy.loader import PolicySet, load_policy_set
from proxy.cli import init_deployment
from proxy.errors import BudgetExceeded, RateLimited
from proxy.events import Event
from proxy.limiter import ADMITTED, Limiter, rebuild_counters
from proxy.limits import (
    METRICS,
    WINDOWS,
    Alert,
    Amounts,
    AppliedLimit,
    Denied,
    Refusal,
    Reservation,
    Scope,
    SeedRow,
    crossed_thresholds,
    refusal,
    window_end,
    window_start,
)
from proxy.price import Price
from proxy.pricebook import book_provider
from proxy.providers.registry import adapter_for
from proxy.recorder import EventRecorder, open_events_db
from proxy.stores.memory import MemoryLimitStore

pytestmark = pytest.mark.timeout(30)

AT = datetime(2025, 6, 15, 12, 34, 56, 500_000, tzinfo=UTC)
ALICE = uuid.UUID("8f1f3a52-0000-8000-8000-000000000001")
BOB = uuid.UUID("8f1f3a52-0000-8000-8000-000000000002")
TENANT = Scope("acme", None)


def rule(metric: str, window: str, limit, subject: str = "tenant", tenant: str = "acme", line: int = 2) -> LimitRule:
    return LimitRule(line, tenant, subject, metric, window, Decimal(str(limit)))


def applied(metric: str, window: str, limit, user: uuid.UUID | None = None, line: int = 2) -> AppliedLimit:
    return AppliedLimit(rule(metric, window, limit, "tenant" if user is None else "*", line=line), Scope("acme", user))


def scopes(user: uuid.UUID = ALICE) -> tuple[Scope, ...]:
    return (TENANT, Scope("acme", user))


async def reserve(store: MemoryLimitStore, limits: list[AppliedLimit], amounts: Amounts, at: datetime = AT,
                  user: uuid.UUID = ALICE) -> Reservation | Refusal:
    result = await store.reserve([lim.check for lim in limits], scopes(user), amounts, at)
    return refusal(limits, result) if isinstance(result, Denied) else result


# --- MemoryLimitStore: reserve and settle ---------------------------------------------------------
async def test_a_request_holds_its_worst_case_only_where_one_of_its_limits_checks_it():
    """As the Redis store does: a request no limit applied to (or a limit added by a reload after it was
    admitted) is not held against that limit while in flight; its real figures count once it settles."""
    store = MemoryLimitStore()
    budget = [applied("usd", "day", "1.00")]
    unchecked = await reserve(store, [], Amounts(1, 10, Decimal("0.90")))
    checked = await reserve(store, budget, Amounts(1, 10, Decimal("0.90")))
    assert isinstance(unchecked, Reservation) and isinstance(checked, Reservation), "0.90 held, not 1.80"
    third = await reserve(store, budget, Amounts(1, 10, Decimal("0.20")))
    assert isinstance(third, Refusal) and third.used == Decimal("0.90"), "the checked request's 0.90 is held"
    await store.settle(unchecked, Amounts(1, 5, Decimal("0.05")))
    fourth = await reserve(store, budget, Amounts(1, 10, Decimal("0.06")))
    assert isinstance(fourth, Refusal) and fourth.used == Decimal("0.95"), "0.05 used + 0.90 held"
    await store.settle(checked, Amounts(1, 5, Decimal("0.10")))
    assert await store.spent(TENANT, "usd", "day", AT) == Decimal("0.15")
    last = await reserve(store, budget, Amounts(1, 10, Decimal("0.85")))
    assert isinstance(last, Reservation), "nothing held once both settled: 0.15 + 0.85 fits"


async def test_reservations_count_until_settled_then_the_actual_figures_replace_them():
    store = MemoryLimitStore()
    budget = [applied("usd", "month", "1.00")]
    first = await reserve(store, budget, Amounts(1, 500, Decimal("0.40")))
    second = await reserve(store, budget, Amounts(1, 500, Decimal("0.40")))
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert await store.spent(TENANT, "usd", "month", AT) == 0, "a reservation is not spend"

    third = await reserve(store, budget, Amounts(1, 500, Decimal("0.40")))
    assert isinstance(third, Refusal) and third.used == Decimal("0.80"), "0.80 reserved, 0.40 more would cross 1.00"

    await store.settle(first, Amounts(1, 120, Decimal("0.10")))
    assert await store.spent(TENANT, "usd", "month", AT) == Decimal("0.10")
    fourth = await reserve(store, budget, Amounts(1, 500, Decimal("0.40")))
    assert isinstance(fourth, Reservation), "0.10 spent + 0.40 reserved + 0.40 = 0.90 fits"
    refused = await reserve(store, budget, Amounts(1, 0, Decimal("0.11")))
    assert isinstance(refused, Refusal) and refused.used == Decimal("0.90")
    exactly = await reserve(store, budget, Amounts(1, 0, Decimal("0.10")))
    assert isinstance(exactly, Reservation), "reaching the limit exactly is allowed; crossing it is not"

    for reservation, actual in ((second, "0.35"), (fourth, "0.05"), (exactly, "0.10")):
        await store.settle(reservation, Amounts(1, 100, Decimal(actual)))
    # settled figures land in every metric and window, for the tenant and for the user
    for scope in scopes():
        for window in WINDOWS:
            assert await store.spent(scope, "usd", window, AT) == Decimal("0.60")
            assert await store.spent(scope, "tokens", window, AT) == 420
            assert await store.spent(scope, "requests", window, AT) == 4
    assert await store.spent(Scope("acme", BOB), "requests", "minute", AT) == 0, "another user's counters are untouched"
    assert await store.spent(Scope("globex", None), "usd", "month", AT) == 0
    again = await reserve(store, budget, Amounts(1, 0, Decimal("0.40")))
    assert isinstance(again, Reservation), "nothing stays reserved once every request settled"


async def test_a_failed_request_settles_to_zero_and_frees_its_reservation():
    store = MemoryLimitStore()
    tokens = [applied("tokens", "hour", 1000, ALICE)]
    held = await reserve(store, tokens, Amounts(1, 900, Decimal(0)))
    assert isinstance(await reserve(store, tokens, Amounts(1, 200, Decimal(0))), Refusal)
    await store.settle(held, Amounts(1, 0, Decimal(0)))  # e.g. the provider answered 500
    assert await store.spent(Scope("acme", ALICE), "requests", "hour", AT) == 1, "an admitted request still counts"
    assert isinstance(await reserve(store, tokens, Amounts(1, 1000, Decimal(0))), Reservation)


async def test_per_user_limits_count_each_user_apart_and_tenant_limits_count_everyone():
    store = MemoryLimitStore()
    per_user = applied("requests", "minute", 2, ALICE)
    per_user_bob = AppliedLimit(per_user.rule, Scope("acme", BOB))
    tenant = applied("requests", "minute", 3, line=3)
    one = Amounts(1, 0, Decimal(0))
    assert isinstance(await reserve(store, [per_user, tenant], one), Reservation)
    assert isinstance(await reserve(store, [per_user, tenant], one), Reservation)
    refused = await reserve(store, [per_user, tenant], one)
    assert isinstance(refused, Refusal) and refused.limit is per_user
    assert isinstance(await reserve(store, [per_user_bob, tenant], one, user=BOB), Reservation)
    refused = await reserve(store, [per_user_bob, tenant], one, user=BOB)
    assert isinstance(refused, Refusal) and refused.limit is tenant and refused.used == 3


async def test_reserve_is_all_or_nothing():
    store = MemoryLimitStore()
    roomy = applied("tokens", "hour", 1000, ALICE)
    budget = applied("usd", "day", "0.50", line=3)
    closed = applied("requests", "minute", 0, line=4)
    refused = await reserve(store, [roomy, budget, closed], Amounts(1, 600, Decimal("0.30")))
    assert isinstance(refused, Refusal) and refused.limit is closed
    # nothing was reserved anywhere: each of the other limits still has all of its room
    full = await reserve(store, [roomy], Amounts(1, 1000, Decimal(0)))
    assert isinstance(full, Reservation), "the refused request left a reservation behind"
    await store.settle(full, Amounts())
    assert isinstance(await reserve(store, [budget], Amounts(1, 0, Decimal("0.50"))), Reservation)
    for scope in scopes():
        for metric in METRICS:
            for window in WINDOWS:
                assert await store.spent(scope, metric, window, AT) == 0


async def test_the_refusal_is_the_one_to_wait_longest_for_then_the_smallest_limit():
    store = MemoryLimitStore()
    minute = applied("requests", "minute", 0, line=2)
    month = applied("usd", "month", "0.10", line=3)
    hour_small = applied("tokens", "hour", 10, line=4)
    hour_big = applied("tokens", "hour", 50, line=5)
    refused = await reserve(store, [minute, hour_big, month, hour_small], Amounts(1, 100, Decimal("1")))
    assert isinstance(refused, Refusal) and refused.limit is month
    end_of_june = (datetime(2025, 7, 1, tzinfo=UTC) - AT).total_seconds()
    assert refused.retry_after_s == int(end_of_june) + 1

    refused = await reserve(store, [minute, hour_big, hour_small], Amounts(1, 100, Decimal(0)))
    assert refused.limit is hour_small, "same wait: the tightest limit is named"
    assert refused.retry_after_s == 25 * 60 + 4  # 12:34:56.5 -> 13:00:00, rounded up

    refused = await reserve(store, [minute], Amounts(1, 0, Decimal(0)))
    assert refused.retry_after_s == 4  # 3.5 s to the next minute, rounded up
    on_the_edge = await reserve(store, [minute], Amounts(1, 0, Decimal(0)), at=AT.replace(second=59, microsecond=999_999))
    assert on_the_edge.retry_after_s == 1, "never Retry-After: 0"


async def test_the_refusal_message_names_tenant_metric_window_and_limit():
    store = MemoryLimitStore()
    per_user = applied("requests", "minute", 10, ALICE)
    for _ in range(10):
        assert isinstance(await reserve(store, [per_user], Amounts(1, 0, Decimal(0))), Reservation)
    refused = await reserve(store, [per_user], Amounts(1, 0, Decimal(0)))
    message = refused.message()
    assert "'acme'" in message and "10 requests per minute" in message and "line 2" in message, message
    assert "Retry after 4 s" in message
    assert str(ALICE) not in message, "a pseudonym is nobody's business in an error message"

    budget = applied("usd", "month", "1.00", line=7)
    refused = await reserve(store, [budget], Amounts(1, 0, Decimal("2")))
    message = refused.message()
    assert "budget" in message and "'acme'" in message and "1.00 USD per month" in message and "line 7" in message


# --- calendar windows -----------------------------------------------------------------------------
@pytest.mark.parametrize(("window", "at", "start", "end"), [
    ("minute", datetime(2025, 6, 15, 12, 34, 56, 1, tzinfo=UTC),
     datetime(2025, 6, 15, 12, 34, tzinfo=UTC), datetime(2025, 6, 15, 12, 35, tzinfo=UTC)),
    ("minute", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC),
     datetime(2025, 12, 31, 23, 59, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
    ("hour", datetime(2025, 6, 15, 12, 34, 56, tzinfo=UTC),
     datetime(2025, 6, 15, 12, tzinfo=UTC), datetime(2025, 6, 15, 13, tzinfo=UTC)),
    ("hour", datetime(2025, 6, 30, 23, 0, tzinfo=UTC),
     datetime(2025, 6, 30, 23, tzinfo=UTC), datetime(2025, 7, 1, tzinfo=UTC)),
    ("day", datetime(2025, 6, 15, 23, 59, 59, 999_999, tzinfo=UTC),
     datetime(2025, 6, 15, tzinfo=UTC), datetime(2025, 6, 16, tzinfo=UTC)),
    ("day", datetime(2024, 2, 28, 8, tzinfo=UTC), datetime(2024, 2, 28, tzinfo=UTC), datetime(2024, 2, 29, tzinfo=UTC)),
    ("day", datetime(2024, 2, 29, 8, tzinfo=UTC), datetime(2024, 2, 29, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
    ("day", datetime(2025, 12, 31, 8, tzinfo=UTC), datetime(2025, 12, 31, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
    ("month", datetime(2025, 6, 15, 12, tzinfo=UTC), datetime(2025, 6, 1, tzinfo=UTC), datetime(2025, 7, 1, tzinfo=UTC)),
    ("month", datetime(2025, 1, 31, 23, 59, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC)),
    ("month", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC),
     datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
    ("month", datetime(2024, 2, 29, 23, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
    ("month", datetime(2023, 2, 28, 23, tzinfo=UTC), datetime(2023, 2, 1, tzinfo=UTC), datetime(2023, 3, 1, tzinfo=UTC)),
    ("month", datetime(2100, 2, 28, 23, tzinfo=UTC), datetime(2100, 2, 1, tzinfo=UTC), datetime(2100, 3, 1, tzinfo=UTC)),
    ("month", datetime(2025, 7, 1, tzinfo=UTC), datetime(2025, 7, 1, tzinfo=UTC), datetime(2025, 8, 1, tzinfo=UTC)),
])
def test_windows_are_calendar_windows_in_utc(window, at, start, end):
    assert window_start(window, at) == start
    assert window_end(window, start) == end
    assert window_start(window, end) == end, "the end of a window is the start of the next"
    assert window_start(window, end - timedelta(microseconds=1)) == start


def test_windows_are_taken_in_utc_whatever_the_timezone_of_the_instant():
    tokyo = timezone(timedelta(hours=9))
    at = datetime(2025, 1, 1, 5, 30, tzinfo=tokyo)  # still 31 December 2024 in UTC
    assert window_start("day", at) == datetime(2024, 12, 31, tzinfo=UTC)
    assert window_start("month", at) == datetime(2024, 12, 1, tzinfo=UTC)
    assert window_end("month", window_start("month", at)) == datetime(2025, 1, 1, tzinfo=UTC)
    india = timezone(timedelta(hours=5, minutes=30))
    assert window_start("hour", datetime(2025, 6, 15, 18, 15, tzinfo=india)) == datetime(2025, 6, 15, 12, tzinfo=UTC)


async def test_a_new_window_starts_empty():
    store = MemoryLimitStore()
    minute = [applied("requests", "minute", 1)]
    assert isinstance(await reserve(store, minute, Amounts(1, 0, Decimal(0))), Reservation)
    assert isinstance(await reserve(store, minute, Amounts(1, 0, Decimal(0))), Refusal)
    next_minute = AT.replace(second=0, microsecond=0) + timedelta(minutes=1)
    assert isinstance(await reserve(store, minute, Amounts(1, 0, Decimal(0)), at=next_minute), Reservation)

    month = [applied("usd", "month", "1")]
    store = MemoryLimitStore()
    december = datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)
    spent = await reserve(store, month, Amounts(1, 0, Decimal("1")), at=december)
    await store.settle(spent, Amounts(1, 0, Decimal("1")))
    assert isinstance(await reserve(store, month, Amounts(1, 0, Decimal("0.01")), at=december), Refusal)
    january = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert isinstance(await reserve(store, month, Amounts(1, 0, Decimal("1")), at=january), Reservation)


async def test_a_settle_after_the_window_rolled_over_does_not_touch_the_new_window():
    store = MemoryLimitStore()
    tokens = [applied("tokens", "minute", 1000)]
    late = datetime(2025, 6, 15, 12, 0, 59, 900_000, tzinfo=UTC)
    early = datetime(2025, 6, 15, 12, 1, 0, 100_000, tzinfo=UTC)
    old = await reserve(store, tokens, Amounts(1, 500, Decimal(0)), at=late)
    new = await reserve(store, tokens, Amounts(1, 300, Decimal(0)), at=early)
    assert isinstance(old, Reservation) and isinstance(new, Reservation)
    await store.settle(old, Amounts(1, 100, Decimal(0)))  # ends in the next minute

    probe_at = early + timedelta(seconds=1)
    probe = await reserve(store, tokens, Amounts(1, 800, Decimal(0)), at=probe_at)
    assert isinstance(probe, Refusal), "the old request's release leaked into the new minute"
    assert probe.used == 300, "the new minute holds exactly the new reservation"
    assert await store.spent(TENANT, "tokens", "minute", probe_at) == 0
    # the hour (and day, month) both requests fall in counts the old request's real figures
    assert await store.spent(TENANT, "tokens", "hour", probe_at) == 100

    await store.settle(new, Amounts(1, 250, Decimal(0)))
    assert await store.spent(TENANT, "tokens", "minute", probe_at) == 250
    assert await store.spent(TENANT, "tokens", "hour", probe_at) == 350
    assert await store.spent(TENANT, "requests", "day", probe_at) == 2


async def test_an_old_windows_settle_after_the_month_rolled_over_leaves_the_new_month_alone():
    store = MemoryLimitStore()
    budget = [applied("usd", "month", "1")]
    old = await reserve(store, budget, Amounts(1, 0, Decimal("0.9")), at=datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC))
    january = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    new = await reserve(store, budget, Amounts(1, 0, Decimal("0.5")), at=january)
    assert isinstance(new, Reservation), "December's reservation does not count in January"
    await store.settle(old, Amounts(1, 0, Decimal("0.8")))
    assert await store.spent(TENANT, "usd", "month", january) == 0
    refused = await reserve(store, budget, Amounts(1, 0, Decimal("0.6")), at=january)
    assert isinstance(refused, Refusal) and refused.used == Decimal("0.5")


@pytest.mark.parametrize(("window", "before", "after"), [
    ("month", datetime(2025, 12, 31, 23, 59, 59, 900_000, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 0, 100_000, tzinfo=UTC)),
    ("minute", datetime(2025, 6, 15, 12, 0, 59, 900_000, tzinfo=UTC), datetime(2025, 6, 15, 12, 1, 0, 100_000, tzinfo=UTC)),
])
async def test_a_request_that_started_before_the_boundary_but_reserves_after_leaves_nothing_behind(
        window, before, after):
    # Request A starts (its event ts) just before the boundary; request B starts just after and reserves
    # first; then A reserves (it was still reading its body or being authenticated). Both settle.
    store = MemoryLimitStore()
    budget = [applied("usd", window, "1")]
    b = await reserve(store, budget, Amounts(1, 10, Decimal("0.5")), at=after)
    a = await reserve(store, budget, Amounts(1, 10, Decimal("0.4")), at=before)
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    await store.settle(a, Amounts(1, 5, Decimal("0.1")))
    await store.settle(b, Amounts(1, 5, Decimal("0.2")))

    now = after + timedelta(seconds=1)
    spent = await store.spent(TENANT, "usd", window, now)
    assert spent in (Decimal("0.2"), Decimal("0.3")), spent  # B's, and A's if it is counted in the new window
    rest = await reserve(store, budget, Amounts(1, 0, Decimal(1) - spent), at=now)
    assert isinstance(rest, Reservation), (
        f"every request settled, yet {rest.used} USD of the new {window} is still used or reserved: "
        f"A's reservation of 0.4 was never released")


async def test_spent_for_an_earlier_window_does_not_report_the_current_one():
    store = MemoryLimitStore()
    budget = [applied("usd", "month", "10")]
    december, january = datetime(2025, 12, 20, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    old = await reserve(store, budget, Amounts(1, 0, Decimal("1")), at=december)
    await store.settle(old, Amounts(1, 0, Decimal("1")))
    new = await reserve(store, budget, Amounts(1, 0, Decimal("3")), at=january)
    await store.settle(new, Amounts(1, 0, Decimal("3")))
    assert await store.spent(TENANT, "usd", "month", january) == 3
    # "settled use in the window containing `at`": December's figure, or nothing if it is no longer kept
    assert await store.spent(TENANT, "usd", "month", december) in (Decimal(1), Decimal(0))


# --- budget alert thresholds ----------------------------------------------------------------------
@pytest.mark.parametrize(("before", "after", "limit", "crossed"), [
    ("40", "85", "100", [50, 80]),
    ("0", "50", "100", [50]),
    ("50", "79.99", "100", []),
    ("49.999", "50", "100", [50]),
    ("79.99", "100", "100", [80, 100]),
    ("0", "250", "100", [50, 80, 100]),
    ("100", "150", "100", []),
    ("10", "20", "100", []),
    ("0.004", "0.0051", "0.01", [50]),
    ("0.0079", "0.0101", "0.01", [80, 100]),
    ("0", "5", "0", []),
])
def test_crossed_thresholds(before, after, limit, crossed):
    assert crossed_thresholds(Decimal(before), Decimal(after), Decimal(limit)) == crossed


# --- which limits apply to whom -------------------------------------------------------------------
ACCESS = """p, *, acme, openai/*, allow
p, *, globex, openai/*, allow
g, alice@acme.com, role:engineering, acme
g, erin@acme.com, role:interns, *
g, gus@globex.com, role:engineering, globex
"""
LIMITS = """tenant,subject,metric,window,limit
acme,tenant,usd,month,5000
acme,*,requests,minute,60
acme,role:interns,usd,day,5
acme,role:engineering,tokens,hour,1000
acme,bob@acme.com,requests,hour,7
*,*,tokens,minute,200000
*,tenant,usd,day,100
globex,*,requests,minute,5
globex,role:engineering,requests,day,50
"""


@pytest.fixture
def policies(tmp_path) -> PolicySet:
    init_deployment(tmp_path)
    (tmp_path / "policy" / "access.csv").write_text(ACCESS)
    (tmp_path / "policy" / "routes.csv").write_text("")
    (tmp_path / "policy" / "limits.csv").write_text(LIMITS)
    return load_policy_set(tmp_path, None)


def _lines(policies: PolicySet, tenant: str, user: str, roles: tuple[str, ...] = ()) -> dict[int, bool]:
    subjects = (user, *(f"role:{r}" for r in roles))
    return {rule.line: per_user for rule, per_user in policies.policy.limits_for(tenant, user, subjects)}


def test_limits_for_a_user_without_roles(policies):
    # the tenant as a whole, each user (*), this user by id, and the * tenant's rules
    assert _lines(policies, "acme", "bob@acme.com") == {2: False, 3: True, 6: True, 7: True, 8: False}
    assert _lines(policies, "acme", "zoe@acme.com") == {2: False, 3: True, 7: True, 8: False}


def test_limits_for_role_members_via_g_lines_and_via_token_roles(policies):
    assert _lines(policies, "acme", "alice@acme.com") == {2: False, 3: True, 5: True, 7: True, 8: False}
    assert _lines(policies, "acme", "dana@acme.com", ("engineering",))[5] is True, "a token role counts"
    assert 5 not in _lines(policies, "acme", "dana@acme.com", ("contractors",))
    # a role granted in every tenant (g ..., *) makes erin an intern in acme
    assert _lines(policies, "acme", "erin@acme.com") == {2: False, 3: True, 4: True, 7: True, 8: False}
    assert _lines(policies, "acme", "ivan@acme.com", ("interns",))[4] is True
    # alice's engineering role is acme's; gus's is globex's
    assert _lines(policies, "globex", "alice@acme.com") == {7: True, 8: False, 9: True}
    assert _lines(policies, "globex", "gus@globex.com") == {7: True, 8: False, 9: True, 10: True}
    assert 5 not in _lines(policies, "acme", "gus@globex.com")


def test_star_tenant_limits_apply_to_every_tenant_each_on_its_own_counters(policies):
    assert _lines(policies, "globex", "carol@globex.com") == {7: True, 8: False, 9: True}
    assert _lines(policies, "initech", "x@initech.com") == {7: True, 8: False}
    assert 6 not in _lines(policies, "globex", "bob@acme.com"), "a user-id limit is for its tenant only"

    limiter = Limiter(MemoryLimitStore(), 4096, lambda alert: None, lambda refusal: None)
    applied_limits = limiter.applicable(policies, "globex", "carol@globex.com", ("carol@globex.com",), BOB)
    by_line = {a.rule.line: a.scope for a in applied_limits}
    assert by_line == {7: Scope("globex", BOB), 8: Scope("globex", None), 9: Scope("globex", BOB)}


# --- the worst-case estimate ----------------------------------------------------------------------
PRICED_AT = datetime(2026, 11, 2, tzinfo=UTC)  # every model and tier used below has a price in force


def _estimate(policies: PolicySet, style: str, path: str, body: dict, default_max_output: int = 4096,
              max_output: int = 131_072) -> Amounts:
    adapter = adapter_for(style)
    limiter = Limiter(MemoryLimitStore(), default_max_output, lambda alert: None, lambda refusal: None, max_output)
    info = adapter.inspect("POST", path, body, b"")
    priced = policies.prices.price(style, info.model, book_provider(style, style), PRICED_AT, info.service_tier)
    return limiter.estimate(priced.price if priced else None, adapter, info, body)


def _usd(input_tokens: int, output_tokens: int, in_per_mtok: str, out_per_mtok: str) -> Decimal:
    return ((input_tokens * Decimal(in_per_mtok) + output_tokens * Decimal(out_per_mtok)) / 1_000_000).quantize(
        Decimal("1e-9"))


def test_estimate_reserves_estimated_input_plus_the_clients_output_cap(policies):
    messages = [{"role": "user", "content": "x" * 400}]  # 100 tokens at four characters a token
    chat = "/v1/chat/completions"
    capped = _estimate(policies, "openai", chat, {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 100})
    assert capped == Amounts(1, 200, _usd(100, 100, "0.15", "0.60"))
    newer = _estimate(policies, "openai", chat, {"model": "gpt-4o-mini", "messages": messages,
                                                 "max_completion_tokens": 50, "max_tokens": 999})
    assert newer.tokens == 150, "max_completion_tokens is the cap when both are sent"
    responses = _estimate(policies, "openai", "/v1/responses",
                          {"model": "gpt-4o", "input": "y" * 40, "max_output_tokens": 30})
    assert responses == Amounts(1, 40, _usd(10, 30, "2.50", "10.00"))
    claude = _estimate(policies, "anthropic", "/v1/messages",
                       {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": messages})
    assert claude == Amounts(1, 164, _usd(100, 64, "3.00", "15.00"))
    gemini = _estimate(policies, "gemini", "/v1beta/models/gemini-2.5-flash:generateContent",
                       {"contents": [{"role": "user", "parts": [{"text": "z" * 80}]}],
                        "generationConfig": {"maxOutputTokens": 20}})
    assert gemini == Amounts(1, 40, _usd(20, 20, "0.30", "2.50"))


def test_estimate_without_a_client_cap_reserves_the_longest_reply_for_money(policies):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 400}]}
    assert _estimate(policies, "openai", "/v1/chat/completions", body).tokens == 100 + 4096
    # tokens: the configured default; money: the model's context window (128,000 for gpt-4o-mini)
    small = _estimate(policies, "openai", "/v1/chat/completions", body, default_max_output=16)
    assert small == Amounts(1, 116, _usd(100, 128_000, "0.15", "0.60"))
    # at most [metering] max_output_tokens
    bounded = _estimate(policies, "openai", "/v1/chat/completions", body, default_max_output=16, max_output=1000)
    assert bounded == Amounts(1, 116, _usd(100, 1000, "0.15", "0.60"))


def test_estimate_uses_the_requested_tier_and_the_long_context_rates(policies):
    flex = {"model": "gpt-5", "service_tier": "flex", "max_completion_tokens": 100,
            "messages": [{"role": "user", "content": "x" * 400}]}
    # 404 characters of text ("flex" counts too): 101 estimated input tokens, at the flex rates
    assert _estimate(policies, "openai", "/v1/chat/completions", flex).usd == _usd(101, 100, "0.625", "5")
    long = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "x" * 800_008}]}
    # 200,002 estimated prompt tokens: every token at the long-context rates (6 in, 22.5 out)
    assert _estimate(policies, "anthropic", "/v1/messages", long).usd == _usd(200_002, 100, "6", "22.5")


def test_estimate_of_an_unpriced_model_reserves_tokens_but_no_money(policies):
    body = {"model": "gpt-unpriced", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 10}
    amounts = _estimate(policies, "openai", "/v1/chat/completions", body)
    assert amounts == Amounts(1, 20, Decimal(0))


def test_estimate_of_an_unmetered_call_is_one_request(policies):
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x" * 4000}]}
    assert _estimate(policies, "anthropic", "/v1/messages/count_tokens", body) == Amounts(requests=1)


# --- the Limiter: refusals, settling, alerts ------------------------------------------------------
def _event(tokens_in: int | None, tokens_out: int | None, cost: str | None) -> Event:
    return Event(event_id=uuid.uuid4(), ts=AT, tenant="acme", user_pseudonym=ALICE, input_tokens=tokens_in,
                 output_tokens=tokens_out, cost_usd=Decimal(cost) if cost is not None else None)


async def test_limiter_refusals_raise_the_right_error_and_are_reported():
    refusals: list[Refusal] = []
    limiter = Limiter(MemoryLimitStore(), 4096, lambda alert: None, refusals.append)
    rate = [applied("requests", "minute", 0, ALICE)]
    with pytest.raises(RateLimited) as caught:
        await limiter.reserve(rate, "acme", ALICE, Amounts(1, 0, Decimal(0)), AT)
    assert type(caught.value) is RateLimited and caught.value.retry_after == 4
    assert caught.value.outcome == "rate_limited" and caught.value.status == 429

    budget = [applied("usd", "month", "0.01")]
    with pytest.raises(BudgetExceeded) as caught:
        await limiter.reserve(budget, "acme", ALICE, Amounts(1, 0, Decimal("0.02")), AT)
    assert caught.value.outcome == "budget_exceeded" and caught.value.status == 429
    assert caught.value.retry_after == int((datetime(2025, 7, 1, tzinfo=UTC) - AT).total_seconds()) + 1
    assert [r.limit.rule.metric for r in refusals] == ["requests", "usd"]


async def test_limiter_settles_the_events_figures_and_alerts_once_per_threshold_and_window():
    alerts: list[Alert] = []
    limiter = Limiter(MemoryLimitStore(), 4096, alerts.append, lambda refusal: None)
    budget = applied("usd", "month", "1.00")
    limits = [budget, applied("requests", "minute", 100, ALICE, line=3)]

    async def spend(cost: str | None, at: datetime = AT) -> None:
        reservation = await limiter.reserve(limits, "acme", ALICE, Amounts(1, 10, Decimal("0.01")), at)
        await limiter.settle(reservation, limits, _event(3, 4, cost))

    await spend("0.45")
    assert alerts == []
    await spend("0.40")  # 0.85: crosses 50 and 80
    assert [(a.threshold, a.spent) for a in alerts] == [(50, Decimal("0.85")), (80, Decimal("0.85"))]
    assert alerts[0].window_start == datetime(2025, 6, 1, tzinfo=UTC) and alerts[0].limit is budget
    await spend(None)  # an unpriced or failed request: no money
    assert await limiter.store.spent(TENANT, "tokens", "month", AT) == 21
    assert await limiter.store.spent(TENANT, "usd", "month", AT) == Decimal("0.85")
    await spend("0.20")  # 1.05: crosses 100 (a provider may return more than reserved)
    assert [a.threshold for a in alerts] == [50, 80, 100]

    # a new month starts over; a remembered alert (from the audit log) is not repeated
    july = datetime(2025, 7, 2, tzinfo=UTC)
    await limiter.remember_alerts([(budget.rule.line, budget.scope, "month", datetime(2025, 7, 1, tzinfo=UTC), 50)])
    await spend("0.90", july)
    assert [(a.threshold, a.window_start.month) for a in alerts[3:]] == [(80, 7)]


async def test_limiter_does_not_repeat_an_alert_when_spend_dips_and_crosses_again():
    alerts: list[Alert] = []
    limiter = Limiter(MemoryLimitStore(), 4096, alerts.append, lambda refusal: None)
    budget = applied("usd", "day", "1.00")
    reservation = await limiter.reserve([budget], "acme", ALICE, Amounts(1, 0, Decimal("0.6")), AT)
    await limiter.settle(reservation, [budget], _event(1, 1, "0.6"))
    # the same threshold, the same window: a second crossing (e.g. after counters were rebuilt) stays quiet
    await limiter.store.seed("test", [SeedRow(TENANT, "day", window_start("day", AT), 0, 0, -200_000_000)])
    reservation = await limiter.reserve([budget], "acme", ALICE, Amounts(1, 0, Decimal("0.1")), AT)
    await limiter.settle(reservation, [budget], _event(1, 1, "0.1"))
    assert [a.threshold for a in alerts] == [50]


# --- rebuilding the current windows from events.duckdb --------------------------------------------
def _row(ts: datetime, outcome: str, tenant: str | None = "acme", user: uuid.UUID | None = ALICE,
         tokens: tuple[int | None, int | None] = (10, 5), cost: str | None = "0.01") -> Event:
    return Event(event_id=uuid.uuid4(), ts=ts, tenant=tenant, user_pseudonym=user if tenant else None,
                 provider="openai", model="openai/gpt-4o-mini", outcome=outcome, status_code=200,
                 input_tokens=tokens[0], output_tokens=tokens[1],
                 cost_usd=Decimal(cost) if cost is not None else None)


def _fill(path: Path, events: list[Event]):
    con = open_events_db(path)
    recorder = EventRecorder(con, flush_interval_ms=10_000)
    for event in events:
        recorder.record(event)
    recorder.close()
    return con


async def test_rebuild_counts_only_admitted_outcomes_in_the_current_windows(tmp_path):
    assert set(ADMITTED) == {"ok", "upstream_error", "timeout", "cancelled", "internal_error"}
    now = AT
    this_minute, this_hour = now - timedelta(seconds=20), now - timedelta(minutes=20)
    earlier_today, earlier_month = now - timedelta(hours=5), now - timedelta(days=10)
    events = [
        _row(this_minute, "ok", tokens=(100, 50), cost="0.25"),
        _row(this_minute, "upstream_error", tokens=(None, None), cost=None),
        _row(this_minute, "timeout", tokens=(None, None), cost=None),
        _row(this_minute, "cancelled", tokens=(20, 7), cost="0.03"),
        _row(this_hour, "ok", tokens=(1, 2), cost="0.10"),
        _row(earlier_today, "ok", tokens=(1000, 0), cost="1.00"),
        _row(earlier_month, "ok", tokens=(0, 3), cost="2.00"),
        _row(now - timedelta(days=20), "ok", tokens=(7, 7), cost="9.00"),  # last month: counts nowhere
        _row(this_minute, "ok", user=BOB, tokens=(5, 5), cost="0.05"),
        _row(this_minute, "ok", tenant="globex", user=BOB, tokens=(1, 1), cost="0.50"),
        # refused or unidentified: never admitted, never counted
        *(_row(this_minute, outcome, tokens=(None, None), cost=None)
          for outcome in ("denied", "rate_limited", "budget_exceeded", "bad_request")),
        _row(this_minute, "unauthenticated", tenant=None, tokens=(None, None), cost=None),
    ]
    con = _fill(tmp_path / "events.duckdb", events)
    store = MemoryLimitStore()
    try:
        rows = await rebuild_counters(store, con, now)
    finally:
        con.close()
    assert rows == 3 + 3 + 3 + 3, "(acme, alice), (acme, bob), (globex, bob) in each of four windows"

    alice, bob = Scope("acme", ALICE), Scope("acme", BOB)
    expected = {  # window: (alice's requests, tokens, usd), bob's
        "minute": ((4, 177, "0.28"), (1, 10, "0.05")),
        "hour": ((5, 180, "0.38"), (1, 10, "0.05")),
        "day": ((6, 1180, "1.38"), (1, 10, "0.05")),
        "month": ((7, 1183, "3.38"), (1, 10, "0.05")),
    }
    for window, (mine, his) in expected.items():
        for scope, figures in ((alice, mine), (bob, his)):
            assert (await store.spent(scope, "requests", window, now), await store.spent(scope, "tokens", window, now),
                    await store.spent(scope, "usd", window, now)) == (figures[0], figures[1], Decimal(figures[2])), (
                window, scope)
        tenant = tuple(a + b for a, b in zip((mine[0], mine[1], Decimal(mine[2])),
                                             (his[0], his[1], Decimal(his[2])), strict=True))
        assert (await store.spent(TENANT, "requests", window, now), await store.spent(TENANT, "tokens", window, now),
                await store.spent(TENANT, "usd", window, now)) == tenant
        assert await store.spent(Scope("globex", None), "usd", window, now) == Decimal("0.50")


async def test_rebuilt_counters_are_enforced(tmp_path):
    con = _fill(tmp_path / "events.duckdb", [_row(AT - timedelta(days=3), "ok", cost="0.95")])
    store = MemoryLimitStore()
    try:
        await rebuild_counters(store, con, AT)
    finally:
        con.close()
    budget = [applied("usd", "month", "1.00")]
    refused = await reserve(store, budget, Amounts(1, 0, Decimal("0.10")))
    assert isinstance(refused, Refusal) and refused.used == Decimal("0.95")
    assert isinstance(await reserve(store, budget, Amounts(1, 0, Decimal("0.05"))), Reservation)


async def test_rebuild_on_an_empty_store_reads_nothing(tmp_path):
    con = open_events_db(tmp_path / "events.duckdb")
    store = MemoryLimitStore()
    try:
        assert await rebuild_counters(store, con, AT) == 0
    finally:
        con.close()
    assert await store.spent(TENANT, "usd", "month", AT) == 0


def test_an_uncapped_request_reserves_the_output_bound_pricing_csv_states():
    adapter = adapter_for("openai")
    body = {"model": "my-house-model", "messages": [{"role": "user", "content": "x" * 400}]}
    info = adapter.inspect("POST", "/v1/chat/completions", body, b"")
    limiter = Limiter(MemoryLimitStore(), 16, lambda alert: None, lambda refusal: None)
    stated = Price(PRICED_AT.date(), Decimal(1), Decimal(2), max_output_tokens=1000)  # max_output_tokens column
    # 100 input tokens at $1 + 1,000 output tokens at $2 per million
    assert limiter.estimate(stated, adapter, info, body) == Amounts(1, 116, _usd(100, 1000, "1", "2"))
    unstated = Price(PRICED_AT.date(), Decimal(1), Decimal(2))  # no bound known: [metering] max_output_tokens
    assert limiter.estimate(unstated, adapter, info, body).usd == _usd(100, 131_072, "1", "2")
