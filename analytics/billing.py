"""Unified-billing statements: exact decimal math per period and tenant, cents only at the end.

    charges  = unified + markup + byok_fee (+ adjustments for late events of closed periods)
                                                  markup   = unified × markup_pct / 100
    applied  = min(opening + added, charges)      byok_fee = byok × byok_fee_pct / 100
    closing  = opening + added − applied          due      = charges − applied

Every line is computed from exact figures, then rounded half-up to cents; the totals are sums of the
rounded lines, so a statement always adds up. A tenant's opening credits are the previous period's
closing credits. Unpriced requests are counted on the statement, never billed as zero silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from policy.files import Tenant

CENT = Decimal("0.01")
HUNDRED = Decimal(100)


@dataclass(frozen=True)
class PeriodUsage:
    """One tenant's usage in one period (YYYY-MM), from the events."""

    period: str
    tenant: str
    unified_cost: Decimal
    byok_cost: Decimal
    unpriced_requests: int


@dataclass(frozen=True)
class Credit:
    tenant: str
    amount: Decimal
    added_at: datetime


@dataclass(frozen=True)
class Statement:
    period: str
    tenant: str
    unified_cost_usd: Decimal
    markup_usd: Decimal
    byok_cost_usd: Decimal
    byok_fee_usd: Decimal
    charges_usd: Decimal
    credits_opening_usd: Decimal
    credits_added_usd: Decimal
    credits_applied_usd: Decimal
    credits_closing_usd: Decimal
    amount_due_usd: Decimal
    unpriced_requests: int
    adjustments_usd: Decimal = Decimal("0.00")  # late events of closed periods, charged here
    closed: bool = False

    def row(self) -> dict:
        return asdict(self)

    @classmethod
    def frozen(cls, row: dict) -> Statement:
        """A statement as `report close` stored it."""
        money = {k: Decimal(str(v)) for k, v in row.items() if k.endswith("_usd")}
        return cls(**{**row, **money, "unpriced_requests": int(row["unpriced_requests"]), "closed": True})


def cents(value: Decimal) -> Decimal:
    """Half-up to the cent: 0.005 → 0.01, 0.0049 → 0.00."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def statements(usage: Iterable[PeriodUsage], credits: Iterable[Credit], tenants: dict[str, Tenant],
               until: str, closed: dict[tuple[str, str], dict] | None = None) -> list[Statement]:
    """Statements for every tenant and period from its first usage or credit up to `until` (YYYY-MM).

    A closed period's statement is the frozen one; what its events add up to beyond that (late events)
    is charged in the next open period as `adjustments_usd`.

    >>> t = {"acme": Tenant("acme", "Acme", Decimal(10), Decimal(2))}
    >>> [s] = statements([PeriodUsage("2025-03", "acme", Decimal("100"), Decimal("50"), 0)], [], t, "2025-03")
    >>> (s.markup_usd, s.byok_fee_usd, s.charges_usd, s.amount_due_usd)
    (Decimal('10.00'), Decimal('1.00'), Decimal('111.00'), Decimal('111.00'))
    """
    by_key = {(u.period, u.tenant): u for u in usage}
    added: dict[tuple[str, str], Decimal] = {}
    for credit in credits:
        key = (credit.added_at.strftime("%Y-%m"), credit.tenant)
        added[key] = added.get(key, Decimal(0)) + credit.amount
    out = []
    closed = closed or {}
    for tenant in sorted({t for _, t in by_key} | {t for _, t in (*added, *closed)}):
        first = min(p for p, t in (*by_key, *added, *closed) if t == tenant)
        opening, carried = Decimal(0), Decimal(0)
        for period in months(first, until):
            computed = _statement(period, tenant, by_key.get((period, tenant)), added.get((period, tenant)),
                                  opening, tenants.get(tenant), carried if (period, tenant) not in closed else None)
            frozen = closed.get((period, tenant))
            if frozen is not None:
                statement = Statement.frozen(frozen)
                carried += computed.charges_usd - statement.charges_usd
            else:
                statement, carried = computed, Decimal(0)
            out.append(statement)
            opening = statement.credits_closing_usd
    return sorted(out, key=lambda s: (s.period, s.tenant))


def _statement(period: str, tenant: str, usage: PeriodUsage | None, added: Decimal | None, opening: Decimal,
               terms: Tenant | None, adjustment: Decimal | None) -> Statement:
    unified = usage.unified_cost if usage else Decimal(0)
    byok = usage.byok_cost if usage else Decimal(0)
    markup_pct = terms.markup_pct if terms else Decimal(0)
    fee_pct = terms.byok_fee_pct if terms else Decimal(0)
    lines = [cents(unified), cents(unified * markup_pct / HUNDRED), cents(byok), cents(byok * fee_pct / HUNDRED)]
    unified_c, markup_c, byok_c, fee_c = lines
    adjustment_c = cents(adjustment or Decimal(0))
    charges = unified_c + markup_c + fee_c + adjustment_c
    added_c = cents(added or Decimal(0))
    applied = max(min(opening + added_c, charges), Decimal(0))
    return Statement(period, tenant, unified_c, markup_c, byok_c, fee_c, charges, opening, added_c, applied,
                     opening + added_c - applied, charges - applied, usage.unpriced_requests if usage else 0,
                     adjustment_c)


def months(first: str, last: str) -> list[str]:
    """Every YYYY-MM from `first` to `last`, inclusive."""
    year, month = map(int, first.split("-"))
    out = []
    while f"{year:04d}-{month:02d}" <= last:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out
