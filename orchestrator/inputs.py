"""User input → typed values, or a ConfigError naming the input and what to write instead.

Everything `orch up` is given is checked here before anything is created: a number that is
NaN, infinite, negative or absurd, a port out of range, a name that is not a plain word.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
MAX_PRICE_PER_HOUR = 10_000.0  # USD/h: above any GPU rental
MAX_BUDGET = 1_000_000.0  # USD


def instance_name(value: Any, *, what: str = "instance name") -> str:
    name = str(value)
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{what} {name[:80]!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit "
                          f"(it names files and cloud resources)")
    return name


def number(value: Any, *, what: str) -> float:
    """A finite number from a flag, an environment variable or orch.yaml."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    try:
        x = float(str(value).strip().lstrip("$")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: cannot read {value!r} as a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{what}: {value!r} is not a finite number")
    return x


def price_per_hour(value: Any, *, what: str = "price per hour") -> float:
    usd = number(value, what=what)
    if usd < 0 or usd > MAX_PRICE_PER_HOUR:
        raise ConfigError(f"{what}: {value!r} is out of range; write USD per hour from 0 to {MAX_PRICE_PER_HOUR:,.0f}")
    return usd


def max_price(value: Any, *, what: str = "--max-price") -> float:
    usd = number(value, what=what)
    if usd <= 0 or usd > MAX_PRICE_PER_HOUR:
        raise ConfigError(f"{what}: {value!r} is out of range; write a price cap in USD per hour above 0, like 2.50")
    return usd


def budget(value: Any, *, what: str = "budget") -> float:
    try:
        usd = number(value, what=what)
    except ConfigError:
        raise ConfigError(f"{what}: cannot read {value!r}; write an amount in USD like 2 or 2.50") from None
    if usd <= 0:
        raise ConfigError(f"{what}: {value!r} is not positive; write an amount in USD like 2 or 2.50")
    if usd > MAX_BUDGET:
        raise ConfigError(f"{what}: {value!r} is above {MAX_BUDGET:,.0f} USD; write the amount you mean to spend")
    return usd


def port(value: Any, *, what: str = "--port") -> int:
    try:
        p = int(str(value).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: cannot read {value!r} as a port number") from None
    if not 1 <= p <= 65535:
        raise ConfigError(f"{what}: {p} is not a TCP port; use 1-65535 (ports under 1024 need root)")
    return p


__all__ = ["budget", "instance_name", "max_price", "number", "port", "price_per_hour"]


MAX_GPUS = 64


def gpu_count(value: Any, *, what: str = "--gpus") -> int:
    """GPUs to serve from: a whole number from 1 to MAX_GPUS (leave it out for all the instance has)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a number of GPUs; write a whole number like 2, or leave it out for all")
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a number of GPUs; write a whole number like 2, or leave it out for all") from None
    if not 1 <= n <= MAX_GPUS or str(n) != str(value).strip():
        raise ConfigError(f"{what}: {value!r} is out of range; write a whole number from 1 to {MAX_GPUS}, or leave it out "
                          f"for all the instance has")
    return n
