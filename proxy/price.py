"""One price and the exact cost of one usage record under it (pure arithmetic, no I/O).

A `Price` holds USD per million tokens for each kind of token a provider bills differently, fees
per call, and the long-context tiers that replace it when a prompt is longer than a threshold
(providers bill every token of such a request at the tier's rates, not just the excess). A blank
(None) rate falls back to the nearest general one: cached input, cache writes and audio input to
the input rate, 1-hour cache writes to the cache-write rate, audio output to the output rate.
Cost is exact, rounded half-up to a nano-dollar (the events' DECIMAL(18,9)): in integers of
1e-15 USD when every rate has at most nine decimal places per million tokens (it is so for every
published price; that path costs a fraction of Decimal arithmetic on the request path), else in
Decimal arithmetic at 60 digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, localcontext

from proxy.providers.base import Usage

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
NANO = Decimal("0.000000001")


@dataclass(frozen=True, slots=True)
class Price:
    effective_from: date
    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None  # 5-minute cache writes (and writes of unstated duration)
    cache_write_1h: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    web_search_per_k: Decimal | None = None  # USD per 1,000 web searches (or grounded prompts)
    request_fee: Decimal | None = None  # USD per request
    max_output_tokens: int | None = None  # the model's longest reply, reserved for requests with no cap
    long_context: tuple[tuple[int, Price], ...] = ()  # (prompt tokens above which it applies, price), ascending
    units: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", _integer_rates(self))

    def for_prompt(self, input_tokens: int) -> Price:
        """The price in force for a prompt of this many tokens (cached and cache writes included).

        >>> tier = Price(date(2025, 1, 1), Decimal(6), Decimal("22.5"))
        >>> Price(date(2025, 1, 1), Decimal(3), Decimal(15), long_context=((200_000, tier),)).for_prompt(200_001).input
        Decimal('6')
        """
        chosen = self
        for threshold, tier in self.long_context:
            if input_tokens > threshold:
                chosen = tier
        return chosen


def cost_of(price: Price, usage: Usage) -> Decimal:
    """Exact cost of one usage record under one price (its long-context tier chosen by the prompt).

    >>> p = Price(date(2025, 1, 1), Decimal("2.50"), Decimal("10"), Decimal("1.25"), None)
    >>> cost_of(p, Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=400))
    Decimal('0.003000000')
    """
    if price.long_context:
        price = price.for_prompt(usage.input_tokens or 0)
    if price.units is not None:
        return _integer_cost(price.units, usage)
    with localcontext(prec=60):  # exact for any token count a request can name (10**27 included)
        return _cost(price, usage)


def _parts(u: Usage) -> tuple[int, int, int, int, int, int, int]:
    """(fresh text input, fresh audio input, cached, 5-minute writes, 1-hour writes, text output, audio output)."""
    cached = u.cached_input_tokens or 0
    written = u.cache_write_tokens or 0
    written_1h = min(u.cache_write_1h_tokens or 0, written)
    fresh = max((u.input_tokens or 0) - cached - written, 0)
    audio_in = min(u.input_audio_tokens or 0, fresh)
    output = u.output_tokens or 0
    audio_out = min(u.output_audio_tokens or 0, output)
    return fresh - audio_in, audio_in, cached, written - written_1h, written_1h, output - audio_out, audio_out


def _integer_cost(units: tuple[int, ...], u: Usage) -> Decimal:
    """Σ tokens × rate in 1e-15 USD, rounded half-up to 1e-9 USD (written out: this is the request path)."""
    text_in, audio_in, cached, written_5m, written_1h, text_out, audio_out = _parts(u)
    total = (text_in * units[0] + audio_in * units[1] + cached * units[2] + written_5m * units[3]
             + written_1h * units[4] + text_out * units[5] + audio_out * units[6]
             + (u.web_search_calls or 0) * units[7] + units[8])
    nanos = (total + 500_000) // 1_000_000
    # a product keeps all its digits below the context's 28; beyond, the exact text form
    return Decimal(nanos) * NANO if nanos < 10**27 else Decimal(f"{nanos}E-9")


def _rates(p: Price) -> tuple[Decimal, ...]:
    """The rate of each of `_parts` (blank rates fall back to the general ones)."""
    write = p.input if p.cache_write is None else p.cache_write
    return (p.input, p.input if p.input_audio is None else p.input_audio,
            p.input if p.cached_input is None else p.cached_input, write,
            write if p.cache_write_1h is None else p.cache_write_1h,
            p.output, p.output if p.output_audio is None else p.output_audio)


def _integer_rates(p: Price) -> tuple[int, ...] | None:
    """Rates per token in 1e-15 USD, per-search and per-request fees likewise; None unless all are whole."""
    scaled = [r * 10**9 for r in _rates(p)]
    scaled += [(p.web_search_per_k or 0) * 10**12, (p.request_fee or 0) * 10**15]
    if not all(v.is_finite() and v == v.to_integral_value() for v in map(Decimal, scaled)):
        return None
    return tuple(int(v) for v in scaled)


def _cost(p: Price, u: Usage) -> Decimal:
    tokens = sum(count * rate for count, rate in zip(_parts(u), _rates(p), strict=False))
    total = tokens / MILLION + (u.web_search_calls or 0) * (p.web_search_per_k or 0) / THOUSAND + (p.request_fee or 0)
    return total.quantize(NANO, rounding=ROUND_HALF_UP)
