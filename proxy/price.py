"""One price and the exact cost of one usage record under it (pure arithmetic, no I/O).

A `Price` holds USD per million tokens for each kind of token a provider bills differently, fees
per call, and the long-context tiers that replace it when a prompt is longer than a threshold
(providers bill every token of such a request at the tier's rates, not just the excess). A blank
(None) rate falls back to the nearest general one: cached input, cache writes and audio input to
the input rate, 1-hour cache writes to the cache-write rate, audio output to the output rate.
Cost is exact decimal arithmetic, rounded half-up to a nano-dollar (the events' DECIMAL(18,9)).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    with localcontext(prec=60):  # exact for any token count a request can name (10**27 included)
        return _cost(price.for_prompt(usage.input_tokens or 0), usage)


def _cost(p: Price, u: Usage) -> Decimal:
    cached = u.cached_input_tokens or 0
    written = u.cache_write_tokens or 0
    fresh = max((u.input_tokens or 0) - cached - written, 0)
    output = u.output_tokens or 0
    cached_rate = p.input if p.cached_input is None else p.cached_input
    write_rate = p.input if p.cache_write is None else p.cache_write
    tokens = fresh * p.input + cached * cached_rate + written * write_rate + output * p.output
    if u.cache_write_1h_tokens:  # the 1-hour part of the writes, at its own rate
        tokens += min(u.cache_write_1h_tokens, written) * ((write_rate if p.cache_write_1h is None
                                                            else p.cache_write_1h) - write_rate)
    if u.input_audio_tokens and p.input_audio is not None:
        tokens += min(u.input_audio_tokens, fresh) * (p.input_audio - p.input)
    if u.output_audio_tokens and p.output_audio is not None:
        tokens += min(u.output_audio_tokens, output) * (p.output_audio - p.output)
    total = tokens / MILLION
    if u.web_search_calls and p.web_search_per_k is not None:
        total += u.web_search_calls * p.web_search_per_k / THOUSAND
    if p.request_fee is not None:
        total += p.request_fee
    return total.quantize(NANO, rounding=ROUND_HALF_UP)
