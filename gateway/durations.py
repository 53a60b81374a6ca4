"""Human durations for the command line ("30d", "12h", "90m", "3600s", "1h30m"), parsed to seconds.

Used by `apprentice log prune --older-than` and `apprentice distill --since`.
"""

from __future__ import annotations

import math
import re

UNIT_SECONDS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

_PART = r"(\d+(?:\.\d+)?)([smhdw])"
_WHOLE = re.compile(rf"(?:{_PART})+")
_PARTS = re.compile(_PART)


def parse_duration(text: str) -> float:
    """Seconds in `text`: one or more <number><unit> parts, units s, m, h, d, w; e.g. "30d" or "1h30m".

    Raises ValueError naming the input and the accepted form; zero and negative durations are refused
    because "prune everything" and "the last 0 seconds" are never what a command-line user meant.
    """
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string like '30d', got {type(text).__name__}")
    compact = text.strip()
    if not _WHOLE.fullmatch(compact):
        raise ValueError(
            f"invalid duration {text!r}: expected a number followed by a unit "
            "(s, m, h, d or w), e.g. '30d', '12h', '90m', '3600s' or '1h30m'"
        )
    seconds = sum(float(number) * UNIT_SECONDS[unit] for number, unit in _PARTS.findall(compact))
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return seconds
