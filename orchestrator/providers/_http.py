"""The REST client every HTTP provider shares (httpx, with an injectable transport).

- Vendor status codes become the typed errors of errors.py; a provider passes `classify`
  for its own error bodies (capacity, quota, auth answered with 200 or 404, ...).
- 429 waits for Retry-After (or RateLimit-Reset) and tries again, a bounded number of times.
- 5xx and transport errors are retried only for idempotent calls (GET, and what the caller
  marks idempotent): a create is never retried blindly.
- `json()` of an answer that is not JSON (or not the expected shape) raises BadResponse:
  a list that cannot be read is never taken for "no instances".
Tests pass `transport=httpx.MockTransport(handler)`, or point `base_url` at a simulator.
"""

from __future__ import annotations

import email.utils
import logging
import time
from typing import Any, Callable

import httpx

from .errors import (
    AuthError,
    BadResponse,
    InsufficientFunds,
    InvalidState,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

# (response) -> an error to raise, or None to fall back to the status-code mapping.
Classify = Callable[[httpx.Response], "ProviderError | None"]


def retry_after_seconds(response: httpx.Response, default: float = 1.0) -> float:
    """Seconds to wait from Retry-After (seconds or an HTTP date) or RateLimit-Reset."""
    for header in ("retry-after", "ratelimit-reset", "x-ratelimit-reset"):
        value = response.headers.get(header)
        if not value:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            continue
    return default


def error_for(response: httpx.Response, what: str, credential_hint: str) -> ProviderError:
    """The typed error for a failed answer, by status code."""
    code = response.status_code
    detail = _detail(response)
    if code in (401, 403):
        return AuthError(f"{what}: credentials refused ({code}: {detail}); check {credential_hint}")
    if code == 402:
        return InsufficientFunds(f"{what}: the account's balance does not cover this ({detail})")
    if code == 404:
        return NotFound(f"{what}: not found ({detail})")
    if code == 409:
        return InvalidState(f"{what}: {detail}")
    if code == 429:
        return RateLimited(f"{what}: rate limited ({detail})", retry_after_seconds(response))
    if code >= 500:
        return ProviderUnavailable(f"{what}: the provider's API failed ({code}: {detail}); try again later")
    return ProviderError(f"{what}: refused ({code}: {detail})")


def _detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(data, dict):
        for key in ("error", "message", "msg", "detail", "errors"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value
            if value:
                return str(value)[:300]
    return str(data)[:300]


class RestClient:
    """One provider's API: base URL, auth headers, timeouts, retries, error mapping."""

    def __init__(self, base_url: str, headers: dict[str, str], *, provider: str, credential_hint: str,
                 transport: httpx.BaseTransport | None = None, classify: Classify | None = None,
                 timeout: float = 30.0, max_attempts: int = 4, min_interval: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.provider = provider
        self.credential_hint = credential_hint
        self._client = httpx.Client(base_url=base_url, headers=headers, transport=transport, timeout=timeout)
        self._classify = classify
        self._max_attempts = max_attempts
        self._min_interval = min_interval
        self._sleep = sleep
        self._last_call = 0.0

    def __enter__(self) -> "RestClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any) -> httpx.Response:
        """Send; retry what is safe to retry; return a 2xx answer or raise a typed error."""
        method = method.upper()
        retry_failures = method in IDEMPOTENT if idempotent is None else idempotent
        what = f"{self.provider}: {method} {path}"
        delay = 1.0
        for attempt in range(1, self._max_attempts + 1):
            self._space_calls()
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if not retry_failures or attempt == self._max_attempts:
                    # A create whose answer was lost may have happened: the caller reconciles by tag.
                    raise ProviderUnavailable(f"{what}: no answer ({type(e).__name__}: {e})") from None
                log.info("%s: %s; retrying in %.1fs", what, e, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if response.is_success:
                error = self._classify(response) if self._classify else None
                if error is None:
                    return response
                raise error
            error = (self._classify(response) if self._classify else None) or error_for(response, what, self.credential_hint)
            if isinstance(error, RateLimited) and attempt < self._max_attempts:
                wait = error.retry_after if error.retry_after is not None else delay
                log.info("%s: rate limited; waiting %.1fs", what, wait)
                self._sleep(min(wait, 120.0))
                delay = min(delay * 2, 30.0)
                continue
            if isinstance(error, ProviderUnavailable) and retry_failures and attempt < self._max_attempts:
                log.info("%s: %s; retrying in %.1fs", what, error, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            raise error
        raise ProviderUnavailable(f"{what}: gave up after {self._max_attempts} attempts")  # pragma: no cover

    def json(self, method: str, path: str, *, expect: type | tuple[type, ...] = (dict, list), **kwargs: Any) -> Any:
        """The decoded JSON answer, of the expected type, or BadResponse."""
        response = self.request(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError:
            raise BadResponse(f"{self.provider}: {method} {path} answered something that is not JSON: "
                              f"{response.text[:200]!r}") from None
        if not isinstance(data, expect):
            raise BadResponse(f"{self.provider}: {method} {path} answered {type(data).__name__}, expected "
                              f"{expect.__name__ if isinstance(expect, type) else ' or '.join(t.__name__ for t in expect)}")
        return data

    def _space_calls(self) -> None:
        if self._min_interval:
            wait = self._last_call + self._min_interval - time.monotonic()
            if wait > 0:
                self._sleep(wait)
        self._last_call = time.monotonic()


__all__ = ["RestClient", "error_for", "retry_after_seconds"]
