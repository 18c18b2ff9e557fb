"""A thin typed client of RunPod's REST API v2 (`https://api.runpod.io/v2`), over the shared REST client.

RunPod's names are kept (pods, `/catalog/gpus`, `/pods/{id}/action`). Its error bodies are
RFC 9457 problems (`{title, status, detail, errors}`), turned into typed errors here by status
and by what was asked: a 400 to a create means "this GPU and data center could not be placed"
(no capacity) or a broken rule, both of which leave nothing created (InsufficientCapacity, or
QuotaExceeded for the account's spend limit); 401/403 are the key (AuthError naming
RUNPOD_API_KEY); 410 is v1's retirement. Rate limits: every answer carries `RateLimit`
(`"minute";r=REMAINING;t=RESET, "hour";...`): when a window is used up the next call waits for
its reset; a 429 is waited out for its Retry-After by the REST client. A create is never
retried; reads, DELETE and the stop/start actions (repeatable) are, on 5xx. The key is only
ever in the Authorization header.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable
from urllib.parse import quote

import httpx

from .._http import RestClient, retry_after_seconds
from ..errors import (
    AuthError,
    BadResponse,
    InsufficientCapacity,
    InsufficientFunds,
    InvalidState,
    NotFound,
    ProviderError,
    QuotaExceeded,
    RateLimited,
)

API_KEY_ENV = "RUNPOD_API_KEY"
PROVIDER = "runpod"
KEYS_URL = "https://www.runpod.io/console/user/settings"
# Words RunPod's 400 to a create uses when the account's spend limit (not the GPU's stock) stops it.
_QUOTA_WORDS = ("spend limit", "spending limit", "quota", "maximum number of pods", "max pods")
_RATELIMIT_ITEM = re.compile(r'\s*"?([A-Za-z0-9_-]+)"?\s*((?:;\s*[a-z]+=[^;,]*)*)')


def problem(response: httpx.Response) -> tuple[str, str, list[str]]:
    """(title, detail, errors) of RunPod's problem+json body; empty where it is not one."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:300].strip(), []
    if not isinstance(body, dict):
        return "", str(body)[:300], []
    errors = body.get("errors") if isinstance(body.get("errors"), list) else []
    detail = body.get("detail") or body.get("message") or body.get("error") or ""
    return str(body.get("title") or ""), str(detail)[:500], [str(e)[:200] for e in errors[:10]]


def ratelimit_windows(value: str) -> list[tuple[str, int | None, float | None]]:
    """`"minute";r=0;t=42, "hour";r=10;t=1800` -> [("minute", 0, 42.0), ("hour", 10, 1800.0)]."""
    windows = []
    for item in value.split(","):
        m = _RATELIMIT_ITEM.match(item)
        if not m or not m.group(1):
            continue
        params = dict(p.strip().split("=", 1) for p in m.group(2).split(";") if "=" in p)
        try:
            remaining = int(params["r"]) if "r" in params else None
            reset = float(params["t"]) if "t" in params else None
        except ValueError:
            continue
        windows.append((m.group(1), remaining, reset))
    return windows


def exhausted_for(response: httpx.Response) -> float | None:
    """Seconds until the longest used-up window of RateLimit resets; None when none is used up."""
    waits = [t for _, r, t in ratelimit_windows(response.headers.get("ratelimit", "")) if r == 0 and t is not None]
    return max(waits) if waits else None


def _creating(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.rstrip("/").endswith("/pods")


def _starting(request: httpx.Request) -> bool:
    if request.method != "POST" or not request.url.path.endswith("/action"):
        return False
    try:
        return json.loads(request.content or b"{}").get("action") == "start"
    except (ValueError, AttributeError):
        return False


def classify(response: httpx.Response) -> ProviderError | None:
    """RunPod's answers → typed errors; None leaves it to the status code (5xx, ...)."""
    code = response.status_code
    if response.is_success or code >= 500:
        return None
    title, detail, errors = problem(response)
    request = response.request
    what = f"{PROVIDER}: {request.method} {request.url.path}"
    said = detail or title or response.reason_phrase
    if code == 410:
        return ProviderError(f"{what}: 410 Gone ({said}): RunPod retired REST v1 on 2026-11-15 and orch speaks v2; "
                             f"set runpod.api_url to https://api.runpod.io/v2")
    if code == 429:
        wait = retry_after_seconds(response, default=-1.0)
        if wait < 0:
            wait = exhausted_for(response) or 1.0
        return RateLimited(f"{what}: RunPod's rate limit ({said})", wait)
    if code == 403 and _creating(request) and "pool" in said.lower():
        # The spec: 403 to a create = this account cannot use that GPU pool; another candidate may work.
        return InsufficientCapacity(f"RunPod does not let this account use that GPU pool: {said}")
    if code in (401, 403):
        return AuthError(f"{what}: RunPod refused the API key ({code}: {said}); set {API_KEY_ENV} to a valid key "
                         f"({KEYS_URL}) with read and write access to pods")
    if code == 402:
        return InsufficientFunds(f"{what}: the RunPod account's balance does not cover this ({said}); add funds")
    if code == 404:
        return NotFound(f"{what}: {said or 'not found'}")
    if code == 409:
        return InvalidState(f"{what}: {said}")
    if code == 400 and (_creating(request) or _starting(request)):
        # RunPod's 400 to a create is "could not be placed" (no capacity: no code of its own) or a broken rule;
        # either way nothing was created and the next offer may work.
        if any(w in said.lower() for w in _QUOTA_WORDS):
            return QuotaExceeded(f"the RunPod account's limit stops this: {said}")
        return InsufficientCapacity(f"RunPod could not place it: {said}")
    more = f" ({'; '.join(errors)})" if errors else ""
    return ProviderError(f"{what}: RunPod refused it ({code}: {said}){more}")


class RunPodApi:
    def __init__(self, base_url: str, api_key: str, *, transport: httpx.BaseTransport | None = None,
                 request_interval: float = 0.0, sleep: Callable[[float], None] = time.sleep, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "orch"}
        self._rest = RestClient(base_url, headers, provider=PROVIDER, credential_hint=API_KEY_ENV, transport=transport,
                                classify=classify, timeout=timeout, min_interval=request_interval, sleep=sleep)
        self._stream = httpx.Client(base_url=base_url, headers=headers, transport=transport, timeout=timeout)
        self._sleep = sleep
        self._not_before = 0.0  # a used-up RateLimit window: no request before this (monotonic)

    def close(self) -> None:
        self._rest.close()
        self._stream.close()

    # -- plumbing --------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        wait = self._not_before - time.monotonic()
        if wait > 0:
            self._sleep(min(wait, 120.0))
        try:
            response = self._rest.request(method, path, **kwargs)
        except RateLimited as e:
            if e.retry_after:
                self._not_before = time.monotonic() + e.retry_after
            raise
        self._follow_ratelimit(response)
        return response

    def _follow_ratelimit(self, response: httpx.Response) -> None:
        reset = exhausted_for(response)
        if reset is not None:
            self._not_before = time.monotonic() + reset

    def _json(self, method: str, path: str, expect: type, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError:
            raise BadResponse(f"{PROVIDER}: {method} {path} answered something that is not JSON: "
                              f"{response.text[:200]!r}") from None
        if not isinstance(data, expect):
            raise BadResponse(f"{PROVIDER}: {method} {path} answered {type(data).__name__}, expected {expect.__name__}")
        return data

    def _list(self, method: str, path: str, key: str, **kwargs: Any) -> list[Any]:
        body = self._json(method, path, dict, **kwargs)
        items = body.get(key)
        if not isinstance(items, list):
            raise BadResponse(f"{PROVIDER}: {method} {path} answered without the expected `{key}` list: {str(body)[:200]}")
        return items

    # -- the calls -------------------------------------------------------------------------

    def gpu_types(self, cloud: str, count: int = 1, min_cuda: str = "") -> list[Any]:
        params: dict[str, Any] = {"include": "AVAILABILITY", "product": "POD", "cloud": cloud, "count": count}
        if min_cuda:
            params["minCudaVersion"] = min_cuda
        return self._list("GET", "/catalog/gpus", "gpus", params=params)

    def data_centers(self) -> list[Any]:
        return self._list("GET", "/catalog/datacenters", "dataCenters")

    def pods(self) -> list[Any]:
        return self._list("GET", "/pods", "pods")

    def pod(self, pod_id: str) -> dict[str, Any]:
        return self._json("GET", f"/pods/{quote(pod_id, safe='')}", dict)

    def create_pod(self, body: dict[str, Any]) -> dict[str, Any]:
        """Never retried on a failure (a lost answer may have created it: the caller finds it by its tags)."""
        return self._json("POST", "/pods", dict, json=body, idempotent=False)

    def action(self, pod_id: str, action: str) -> dict[str, Any] | None:
        """stop/start/restart (the pod) or terminate (None). Repeating one is harmless (a 409 at worst), so 5xx retries."""
        response = self._request("POST", f"/pods/{quote(pod_id, safe='')}/action", json={"action": action}, idempotent=True)
        if response.status_code == 204 or not response.content:
            return None
        try:
            data = response.json()
        except ValueError:
            raise BadResponse(f"{PROVIDER}: {action} of {pod_id} answered something that is not JSON") from None
        return data if isinstance(data, dict) else None

    def delete_pod(self, pod_id: str) -> None:
        self._request("DELETE", f"/pods/{quote(pod_id, safe='')}")

    def container_log(self, pod_id: str, tail: int = 200, read_for: float = 5.0) -> list[str]:
        """The pod's container log lines (its start command's output): the SSE backfill, read for at most `read_for` s."""
        wait = self._not_before - time.monotonic()
        if wait > 0:
            self._sleep(min(wait, 120.0))
        lines: list[str] = []
        deadline = time.monotonic() + read_for
        path = f"/pods/{quote(pod_id, safe='')}/logs"
        try:
            with self._stream.stream("GET", path, params={"source": "container", "tail": tail},
                                     timeout=httpx.Timeout(read_for, read=min(2.0, read_for))) as response:
                if not response.is_success:
                    response.read()
                    raise classify(response) or ProviderError(f"{PROVIDER}: GET {path}: {response.status_code}")
                self._follow_ratelimit(response)
                for raw in response.iter_lines():
                    if raw.startswith("data:"):
                        try:
                            event = json.loads(raw[5:].strip())
                        except ValueError:
                            continue
                        if isinstance(event, dict) and isinstance(event.get("line"), str):
                            lines.append(event["line"])
                    if time.monotonic() > deadline:
                        break
        except httpx.TimeoutException:
            pass  # the stream stays open for new lines: what arrived is the backfill
        except httpx.TransportError as e:
            raise ProviderError(f"{PROVIDER}: GET {path}: no answer ({type(e).__name__})") from None
        return lines


__all__ = ["API_KEY_ENV", "RunPodApi", "classify", "exhausted_for", "problem", "ratelimit_windows"]
