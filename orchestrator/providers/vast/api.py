"""A thin typed client of Vast.ai's REST API (`https://console.vast.ai`), over the shared REST client.

Vast's names are kept (offers are `bundles`, an offer is an `ask`, create is `PUT /asks/{id}/`,
its answer's `new_contract` is the instance id). Which version where: the search, create,
one instance, stop/start/label, destroy, logs and snapshots stay on `/api/v0`; the list is
`/api/v1/instances/` (pages of at most 25, `after_token` -> `next_token`): the v0 list is
deprecated and answers `deprecated_endpoint` (HTTP 410 on some accounts, 200 on others).

Vast's error bodies are `{"success": false, "error": CODE, "msg": TEXT}` (sometimes with a
2xx status); they become typed errors in `classify`:
- a bad key is a 404 (or 401) with `auth_error` ("Invalid user key"): AuthError naming VAST_API_KEY;
- an offer gone between the search and the create (`no_such_ask`: 404, or 410 when it cannot
  start at once) is InsufficientCapacity, so the failover moves on to the next offer; a low
  balance is InsufficientFunds; an account limit QuotaExceeded;
- `deprecated_endpoint` is BadResponse: a list answered in a shape orch does not know is an
  error, never "no instances";
- 429 "API requests too frequent endpoint threshold=N" (no Retry-After): Vast limits each
  endpoint to one call per N seconds per key; orch waits N, retries, and from then on spaces
  calls of that endpoint at least N apart (every endpoint `request_interval` apart anyway).
Reads, stop/start and destroy are retried on 5xx; a create or a snapshot request never is.
The key is only ever in the Authorization header, and never follows a log's `result_url`.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

from .._http import RestClient
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

API_KEY_ENV = "VAST_API_KEY"
PROVIDER = "vast"
KEYS_URL = "https://cloud.vast.ai/manage-keys/"
V0 = "/api/v0"
V1 = "/api/v1"
PAGE = 25  # the v1 list's largest page
MAX_PAGES = 400
_THRESHOLD = re.compile(r"threshold\s*=\s*([0-9]+(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"^\d+$")
_FUNDS_WORDS = ("credit", "balance", "insufficient funds", "payment")
_QUOTA_WORDS = ("quota", "too many instances", "maximum number", "instance limit", "max instances")


def body_of(response: httpx.Response) -> tuple[str, str]:
    """(error code, message) of Vast's error body; ("", text) where it is not one."""
    try:
        data = response.json()
    except ValueError:
        return "", response.text[:300].strip()
    if not isinstance(data, dict):
        return "", str(data)[:300]
    code = data.get("error") if isinstance(data.get("error"), str) else ""
    msg = data.get("msg") or data.get("detail") or data.get("message") or ""
    return code, str(msg)[:500]


def threshold(response: httpx.Response) -> float | None:
    """Seconds from Vast's 429 ("API requests too frequent endpoint threshold=2.0"); None where it does not say."""
    code, msg = body_of(response)
    m = _THRESHOLD.search(msg or response.text[:300])
    return float(m.group(1)) if m else None


def endpoint(method: str, path: str) -> str:
    """The rate-limited unit: the method and the path with ids as {id} ("PUT /api/v0/instances/{id}/")."""
    parts = ["{id}" if _NUMBER.match(p) else p for p in urlsplit(path).path.split("/")]
    return f"{method.upper()} {'/'.join(parts)}"


def _creating(request: httpx.Request) -> bool:
    return request.method == "PUT" and "/asks/" in request.url.path


def _starting(request: httpx.Request) -> bool:
    if request.method != "PUT" or "/instances/" not in request.url.path:
        return False
    try:
        return json.loads(request.content or b"{}").get("state") == "running"
    except (ValueError, AttributeError):
        return False


def auth_error(what: str, code: int | str, said: str) -> AuthError:
    return AuthError(f"{what}: Vast refused the API key ({code}: {said or 'auth_error'}); set {API_KEY_ENV} to a valid key "
                     f"({KEYS_URL})")


def classify(response: httpx.Response) -> ProviderError | None:
    """Vast's answers → typed errors; None leaves it to the status code (5xx, ...)."""
    status = response.status_code
    code, msg = body_of(response)
    request = response.request
    what = f"{PROVIDER}: {request.method} {request.url.path}"
    if response.is_success:
        try:
            data = response.json()
        except ValueError:
            return None  # the caller reads it (and refuses what is not JSON)
        if not (isinstance(data, dict) and data.get("success") is False):
            return None
        status = 400  # a refusal answered with 2xx: read it as what it says
    elif status >= 500:
        return None
    said = msg or code or response.reason_phrase
    if code == "auth_error" or "invalid user key" in said.lower():
        return auth_error(what, status, said)
    if code == "deprecated_endpoint":
        return BadResponse(f"{what}: Vast says this endpoint is deprecated ({said}); orch lists instances with "
                           f"{V1}/instances/ and cannot read this answer as a list (it is not 'no instances')")
    if status == 429:
        wait = threshold(response)
        return RateLimited(f"{what}: Vast's rate limit for this endpoint ({said})", wait if wait is not None else 1.0)
    if _creating(request):
        if code == "no_such_ask" or status in (404, 410) or "no_such_ask" in said:
            return InsufficientCapacity(f"the Vast offer is gone (rented by someone else since the search): {said}")
        if status == 402 or any(w in said.lower() for w in _FUNDS_WORDS):
            return InsufficientFunds(f"{what}: the Vast account's credit does not cover this ({said}); add credit")
        if any(w in said.lower() for w in _QUOTA_WORDS):
            return QuotaExceeded(f"the Vast account's limit stops this: {said}")
        if status == 403:
            return InsufficientCapacity(f"Vast does not let this account rent that offer: {said}")
        return ProviderError(f"{what}: Vast refused the create ({status} {code}: {said})")
    if status in (401, 403):
        return auth_error(what, status, said)
    if status == 402 or (_starting(request) and any(w in said.lower() for w in _FUNDS_WORDS)):
        return InsufficientFunds(f"{what}: the Vast account's credit does not cover this ({said}); add credit")
    if status == 404:
        return NotFound(f"{what}: {said or 'not found'}")
    if status == 409:
        return InvalidState(f"{what}: {said}")
    return ProviderError(f"{what}: Vast refused it ({status} {code}: {said})")


def _fetchable(url: str) -> bool:
    """A log's result_url orch may fetch: https, or http on this machine (a simulator)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    try:
        return parts.scheme == "http" and ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


class VastApi:
    def __init__(self, base_url: str, api_key: str, *, transport: httpx.BaseTransport | None = None,
                 request_interval: float = 2.0, sleep: Callable[[float], None] = time.sleep, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "orch", "Accept": "application/json"}
        self._rest = RestClient(base_url, headers, provider=PROVIDER, credential_hint=API_KEY_ENV, transport=transport,
                                classify=self._classify, timeout=timeout, sleep=sleep)
        # Logs come from a presigned URL: a client of its own, without the key.
        self._plain = httpx.Client(transport=transport, timeout=timeout, headers={"User-Agent": "orch"})
        self._sleep = sleep
        self._interval = request_interval
        self._learned: dict[str, float] = {}  # endpoint -> threshold Vast told us
        self._last: dict[str, float] = {}  # endpoint -> when it was last called (monotonic)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._rest.close()
        self._plain.close()

    # -- plumbing --------------------------------------------------------------------------

    def _classify(self, response: httpx.Response) -> ProviderError | None:
        error = classify(response)
        if isinstance(error, RateLimited) and error.retry_after:
            key = endpoint(response.request.method, response.request.url.path)
            with self._lock:
                self._learned[key] = max(self._learned.get(key, 0.0), error.retry_after)
                self._last[key] = time.monotonic()
        return error

    def spacing(self, key: str) -> float:
        return max(self._interval, self._learned.get(key, 0.0))

    def _space(self, key: str) -> None:
        with self._lock:
            wait = self._last.get(key, -1e9) + self.spacing(key) - time.monotonic()
        if wait > 0:
            self._sleep(min(wait, 120.0))
        with self._lock:
            self._last[key] = time.monotonic()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        key = endpoint(method, path)
        self._space(key)
        try:
            return self._rest.request(method, path, **kwargs)
        finally:  # the spacing counts from the last answer (the shared client may have retried after a 429 or a 5xx)
            with self._lock:
                self._last[key] = time.monotonic()

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._request(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError:
            raise BadResponse(f"{PROVIDER}: {method} {path} answered something that is not JSON: "
                              f"{response.text[:200]!r}") from None
        if not isinstance(data, dict):
            raise BadResponse(f"{PROVIDER}: {method} {path} answered {type(data).__name__}, expected an object")
        return data

    # -- the calls -------------------------------------------------------------------------

    def search_offers(self, query: dict[str, Any]) -> list[Any]:
        """`POST /api/v0/bundles/`: a read, so retried on 5xx."""
        body = self._json("POST", f"{V0}/bundles/", json=query, idempotent=True)
        offers = body.get("offers")
        if not isinstance(offers, list):
            raise BadResponse(f"{PROVIDER}: the offer search answered without an `offers` list: {str(body)[:200]}")
        return offers

    def create_instance(self, ask_id: int, body: dict[str, Any]) -> int:
        """`PUT /api/v0/asks/{id}/`: never retried (a lost answer may have rented it: the caller finds it by its label)."""
        data = self._json("PUT", f"{V0}/asks/{ask_id}/", json=body, idempotent=False)
        contract = data.get("new_contract")
        if isinstance(contract, bool) or not isinstance(contract, int):
            raise BadResponse(f"{PROVIDER}: the create of ask {ask_id} answered without `new_contract`: {str(data)[:200]}")
        return contract

    def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        self._json("POST", f"{V0}/instances/{instance_id}/ssh/", json={"ssh_key": public_key}, idempotent=False)

    def instance(self, instance_id: int) -> dict[str, Any] | None:
        """`GET /api/v0/instances/{id}/`: one object under the plural key `instances`; null when there is none."""
        body = self._json("GET", f"{V0}/instances/{instance_id}/", params={"owner": "me"})
        if "instances" not in body:
            raise BadResponse(f"{PROVIDER}: instance {instance_id} answered without `instances`: {str(body)[:200]}")
        row = body["instances"]
        if row is None or row == []:
            return None
        if isinstance(row, list) and len(row) == 1:
            row = row[0]
        if not isinstance(row, dict):
            raise BadResponse(f"{PROVIDER}: instance {instance_id} answered `instances` as {type(row).__name__}")
        return row

    def instances(self) -> list[dict[str, Any]]:
        """Every instance of the account: `GET /api/v1/instances/`, page by page (never the deprecated v0 list)."""
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": PAGE, "order_by": json.dumps([{"col": "id", "dir": "asc"}])}
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            body = self._json("GET", f"{V1}/instances/", params=params)
            page = body.get("instances")
            token = body.get("next_token")
            if not isinstance(page, list) or not (token is None or isinstance(token, str)):
                raise BadResponse(f"{PROVIDER}: the instance list answered in a shape orch does not know (not 'no "
                                  f"instances'): {str(body)[:200]}")
            for row in page:
                if not isinstance(row, dict) or isinstance(row.get("id"), bool) or not isinstance(row.get("id"), int):
                    raise BadResponse(f"{PROVIDER}: an instance in the list orch cannot read: {str(row)[:200]}")
                rows.append(row)
            if not token:
                return rows
            if token in seen:
                raise BadResponse(f"{PROVIDER}: the instance list repeats its next_token: orch stops paging")
            seen.add(token)
            params = {**params, "after_token": token}
        raise BadResponse(f"{PROVIDER}: the instance list did not end after {MAX_PAGES} pages")

    def manage(self, instance_id: int, body: dict[str, Any]) -> None:
        """`PUT /api/v0/instances/{id}/` with {"state": "stopped"|"running"} (or a label): repeatable, so retried on 5xx."""
        self._json("PUT", f"{V0}/instances/{instance_id}/", json=body, idempotent=True)

    def destroy(self, instance_id: int) -> None:
        self._json("DELETE", f"{V0}/instances/{instance_id}/")

    def request_logs(self, instance_id: int, tail: int = 200) -> str:
        """`PUT /api/v0/instances/request_logs/{id}/`: the URL (presigned) the container log will be uploaded to."""
        body = self._json("PUT", f"{V0}/instances/request_logs/{instance_id}/", json={"tail": str(tail)}, idempotent=True)
        url = body.get("result_url")
        if not isinstance(url, str) or not url:
            raise BadResponse(f"{PROVIDER}: the log request answered without a result_url: {str(body)[:200]}")
        return url

    def fetch_log(self, url: str, attempts: int = 20, delay: float = 0.5) -> str | None:
        """The log at a result_url once it is uploaded (polled, as Vast's CLI does); None if it never appears."""
        if not _fetchable(url):
            raise BadResponse(f"{PROVIDER}: a log URL orch will not fetch (not https): {url[:100]!r}")
        for attempt in range(attempts):
            try:
                response = self._plain.get(url)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 200:
                return response.text
            if attempt + 1 < attempts:
                self._sleep(delay)
        return None

    def take_snapshot(self, instance_id: int, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /api/v0/instances/take_snapshot/{id}/` (Vast's CLI; not in its OpenAPI). Never retried."""
        return self._json("POST", f"{V0}/instances/take_snapshot/{instance_id}/", json=body, idempotent=False)


__all__ = ["API_KEY_ENV", "VastApi", "body_of", "classify", "endpoint", "threshold"]
