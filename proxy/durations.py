"""Durations as people write them: `30s`, `5m`, `1h`, `30d`, `2w` (a whole number and one unit).

One grammar for `tokens create --expires-in` and `[auth] exchange_ttl`.

>>> parse_duration("5m")
datetime.timedelta(seconds=300)
"""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
EXAMPLES = "e.g. 30s, 5m, 1h, 30d, 2w"


def parse_duration(text: str) -> timedelta | None:
    """`text` as a timedelta, or None when it is not a number followed by s, m, h, d or w."""
    match = _DURATION.match(text.strip())
    if not match:
        return None
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
