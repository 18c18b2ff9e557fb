"""A thin typed client of Lambda Cloud's API (`/api/v1`), over the shared REST client.

Lambda's names are kept (instance types, `instance-operations/launch`, ...). Its error bodies
(`{"error": {"code", "message", "suggestion"}}`) become typed errors here; an answer without
the expected `data` becomes BadResponse. Calls are spaced `request_interval` apart (about
1 request/s on Lambda) and launches `launch_interval` apart (1 per 10 s); a 429 is waited out
(Retry-After) by the REST client. The key is only ever in the Authorization header.
"""

from __future__ import annotations

import time
from typing import Any, Callable
from urllib.parse import quote

import httpx

from .._http import RestClient
from ..errors import (
    AuthError,
    BadResponse,
    InsufficientCapacity,
    InvalidState,
    NotFound,
    ProviderError,
    QuotaExceeded,
)

API_KEY_ENV = "LAMBDA_API_KEY"
PROVIDER = "lambda"


class InvalidParameters(ProviderError):
    """Lambda refused the request's parameters (`global/invalid-parameters`); `fields` names them."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


def _error(response: httpx.Response) -> tuple[str, str, dict]:
    try:
        body = response.json()
    except ValueError:
        return "", "", {}
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return "", "", {}
    error = body["error"]
    message = str(error.get("message") or "")
    if error.get("suggestion"):
        message += f" ({error['suggestion']})"
    fields = body.get("field_errors") if isinstance(body.get("field_errors"), dict) else {}
    return str(error.get("code") or ""), message, fields


def classify(response: httpx.Response) -> ProviderError | None:
    """Lambda's error codes → typed errors; None leaves it to the status code (429, 5xx, ...)."""
    if response.is_success or response.status_code == 429 or response.status_code >= 500:
        return None
    code, message, fields = _error(response)
    what = f"{PROVIDER}: {response.request.method} {response.request.url.path}"
    if code == "instance-operations/launch/insufficient-capacity":
        return InsufficientCapacity(f"Lambda has no capacity for this instance type in this region now: {message}")
    if code == "global/quota-exceeded":
        return QuotaExceeded(f"the Lambda account's quota is used up: {message}")
    if code in ("global/invalid-api-key", "global/account-inactive") or response.status_code in (401, 403):
        return AuthError(f"{what}: Lambda refused the API key ({code or response.status_code}: {message}); "
                         f"set {API_KEY_ENV} to a valid key from https://cloud.lambda.ai/api-keys")
    if code == "global/object-does-not-exist" or response.status_code == 404:
        return NotFound(f"{what}: {message or 'does not exist'}")
    if code == "ssh-keys/key-in-use":
        return InvalidState(f"{what}: {message}")
    if code == "global/invalid-parameters" or fields:
        detail = "; ".join(f"{k}: {v.get('message') if isinstance(v, dict) else v}" for k, v in fields.items())
        return InvalidParameters(f"{what}: Lambda refused the parameters: {message}{' (' + detail + ')' if detail else ''}",
                                 tuple(fields))
    if code:
        return ProviderError(f"{what}: {code}: {message}")
    return None


class LambdaApi:
    def __init__(self, base_url: str, api_key: str, *, transport: httpx.BaseTransport | None = None,
                 request_interval: float = 1.0, launch_interval: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep, timeout: float = 30.0):
        self._rest = RestClient(base_url, {"Authorization": f"Bearer {api_key}", "User-Agent": "orch"}, provider=PROVIDER,
                                credential_hint=API_KEY_ENV, transport=transport, classify=classify, timeout=timeout,
                                min_interval=request_interval, sleep=sleep)
        self._launch_interval = launch_interval
        self._sleep = sleep
        self._last_launch: float | None = None

    def close(self) -> None:
        self._rest.close()

    def _data(self, method: str, path: str, expect: type, **kwargs: Any) -> Any:
        body = self._rest.json(method, path, expect=dict, **kwargs)
        data = body.get("data")
        if not isinstance(data, expect):
            raise BadResponse(f"{PROVIDER}: {method} {path} answered without the expected `data` "
                              f"({expect.__name__}): {str(body)[:200]}")
        return data

    # -- the calls -------------------------------------------------------------------------

    def instance_types(self) -> dict[str, Any]:
        return self._data("GET", "/instance-types", dict)

    def instances(self) -> list[Any]:
        return self._data("GET", "/instances", list)

    def instance(self, instance_id: str) -> dict[str, Any]:
        return self._data("GET", f"/instances/{quote(instance_id, safe='')}", dict)

    def launch(self, body: dict[str, Any]) -> list[Any]:
        """Never retried on a failure (a lost answer may have launched it); 429 means nothing happened."""
        if self._last_launch is not None:
            wait = self._last_launch + self._launch_interval - time.monotonic()
            if wait > 0:
                self._sleep(wait)
        try:
            data = self._data("POST", "/instance-operations/launch", dict, json=body)
        finally:
            # Counted from the answer (the request may have waited for the general spacing first).
            self._last_launch = time.monotonic()
        ids = data.get("instance_ids")
        if not isinstance(ids, list):
            raise BadResponse(f"{PROVIDER}: launch answered without instance_ids: {str(data)[:200]}")
        return ids

    def terminate(self, instance_ids: list[str]) -> list[Any]:
        # Terminating twice is harmless: safe to retry after a 5xx or a lost answer.
        data = self._data("POST", "/instance-operations/terminate", dict, json={"instance_ids": instance_ids}, idempotent=True)
        done = data.get("terminated_instances")
        return done if isinstance(done, list) else []

    def ssh_keys(self) -> list[Any]:
        return self._data("GET", "/ssh-keys", list)

    def add_ssh_key(self, name: str, public_key: str) -> dict[str, Any]:
        return self._data("POST", "/ssh-keys", dict, json={"name": name, "public_key": public_key})


__all__ = ["API_KEY_ENV", "InvalidParameters", "LambdaApi", "classify"]
