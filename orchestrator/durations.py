"""Durations as users write them: `90s`, `15m`, `8h`, `1h30m`, `2d`."""

from __future__ import annotations

import math
import re

from .errors import DurationError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
# orch exists to stop what is not used: a deadline further out than this is a typo.
MAX_SECONDS = 30 * 86400.0


def parse_duration(text: str | int | float, *, what: str = "duration") -> float:
    """Seconds in `text`. Zero, negative, unparsable, infinite and absurd values are errors, never 'forever'."""
    if isinstance(text, bool):
        raise DurationError(f"{what}: {text!r} is not a duration; write it like 90s, 15m or 8h")
    if isinstance(text, (int, float)):
        seconds = float(text)
        if not math.isfinite(seconds):
            raise DurationError(f"{what}: {text!r} is not a duration; write it like 90s, 15m or 8h")
    else:
        s = str(text).strip().lower().replace(" ", "")
        if not s:
            raise DurationError(f"{what}: empty; write it like 90s, 15m or 8h")
        if s.startswith("-"):
            raise DurationError(f"{what}: {text!r} is negative; write a positive duration like 90s, 15m or 8h")
        pos = 0
        seconds = 0.0
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise DurationError(f"{what}: cannot read {text!r}; write it like 90s, 15m, 8h or 1h30m")
    if seconds <= 0:
        raise DurationError(f"{what}: {text!r} is not positive; write a positive duration like 90s, 15m or 8h")
    if seconds > MAX_SECONDS:
        raise DurationError(f"{what}: {text!r} is longer than 30d; orch stops what is not used, so a deadline "
                            f"that far is refused (`orch extend` moves one later while the instance runs)")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 0:
        return "-" + format_duration(-seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    if m:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    return f"{s}s"
