"""A thin typed client of AutoDL's Pro instance API (`/api/v1/dev/...`), over the shared REST client.

AutoDL's names are kept. Its quirks, handled here and nowhere else:
- the token goes in `Authorization` as it is, without "Bearer";
- every answer is HTTP 200 with `{"code": "Success" | <error>, "msg", "data"}`: `classify` turns an
  error code (and its Chinese message: AutoDL publishes no list of codes) into a typed error;
- GET calls take the query string: a JSON body is refused (`RequestParameterIsWrong`);
- money is an integer of thousandths of a yuan (`to_cny`);
- `create` starts billing at once and is never retried (nor is `power_on`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

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
    ProviderUnavailable,
)

TOKEN_ENV = "AUTODL_TOKEN"
PROVIDER = "autodl"
PRO = "/api/v1/dev/instance/pro"
PAGE_SIZE = 100
REAL_NAME_HINT = ("complete real-name verification (实名认证) for your AutoDL account in its console "
                  "(账号 → 实名认证): AutoDL refuses to create instances through its API until then")


class InvalidParameters(ProviderError):
    """AutoDL refused the request's parameters (`RequestParameterIsWrong`): nothing was done."""


def to_cny(milli: Any) -> float:
    """AutoDL's money (an integer of thousandths of a yuan) as yuan."""
    if isinstance(milli, bool) or not isinstance(milli, (int, float)):
        raise BadResponse(f"{PROVIDER}: an amount orch cannot read: {milli!r}")
    return round(milli / 1000, 3)


def _envelope(response: httpx.Response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) and isinstance(body.get("code"), str) else None


def classify(response: httpx.Response) -> ProviderError | None:
    """AutoDL's error envelope (any HTTP status) → a typed error; None: a success, or left to the status code."""
    what = f"{PROVIDER}: {response.request.method} {response.request.url.path}"
    body = _envelope(response)
    if response.status_code == 429:
        return None  # the REST client waits it out (Retry-After)
    if response.status_code in (401, 403):
        return AuthError(f"{what}: AutoDL refused the token ({response.status_code}); set {TOKEN_ENV} to a developer "
                         f"token from the AutoDL console (设置 → 开发者Token)")
    if body is None:
        if response.is_success:  # a 200 without the envelope: never read as "nothing there"
            return BadResponse(f"{what}: answered something orch cannot read: {response.text[:200]!r}")
        return None
    code, msg = body["code"], str(body.get("msg") or "")
    if code == "Success":
        return None
    said = f"{code}: {msg}" if msg else code
    lower = f"{code} {msg}".lower()
    if code == "TORealName" or "实名" in msg:
        return AuthError(f"{what}: {said}; {REAL_NAME_HINT}")
    if "token" in lower or "unauthor" in lower or "authoriz" in lower or "登录" in msg:
        return AuthError(f"{what}: AutoDL refused the token ({said}); set {TOKEN_ENV} to a developer token from the "
                         f"AutoDL console (设置 → 开发者Token)")
    if code == "BadRequest" and "权限" in msg:
        return AuthError(f"{what}: AutoDL says the account may not do this ({said}); the Pro API needs personal real-name "
                         f"or enterprise verification")
    if "库存" in msg or "no stock" in lower or "sold out" in lower:
        return InsufficientCapacity(f"AutoDL has no GPU of this spec free now ({said}); another GPU or data center may")
    if "余额" in msg or "insufficient balance" in lower:
        return InsufficientFunds(f"{what}: the AutoDL balance does not cover this ({said}); top it up in the AutoDL console")
    if code == "RecordNotFoundError" or "不存在" in msg or "not found" in lower:
        return NotFound(f"{what}: {said}")
    if "关机" in msg:  # "save the image only once it is off", "power it off before release"
        return InvalidState(f"{what}: {said} (the instance must be powered off first)")
    if code == "RequestParameterIsWrong":
        return InvalidParameters(f"{what}: AutoDL refused the parameters ({said})")
    if response.status_code >= 500:
        return ProviderUnavailable(f"{what}: AutoDL's API failed ({response.status_code}, {said}); try again later")
    return ProviderError(f"{what}: {said}")


class AutoDLApi:
    def __init__(self, base_url: str, token: str, *, transport: httpx.BaseTransport | None = None,
                 request_interval: float = 0.2, sleep: Callable[[float], None] = time.sleep, timeout: float = 30.0):
        self._rest = RestClient(base_url, {"Authorization": token, "User-Agent": "orch"}, provider=PROVIDER,
                                credential_hint=TOKEN_ENV, transport=transport, classify=classify, timeout=timeout,
                                min_interval=request_interval, sleep=sleep)

    def close(self) -> None:
        self._rest.close()

    def _data(self, method: str, path: str, **kwargs: Any) -> Any:
        body = self._rest.json(method, path, expect=dict, **kwargs)
        if body.get("code") != "Success" or "data" not in body:
            raise BadResponse(f"{PROVIDER}: {method} {path} answered without AutoDL's envelope: {str(body)[:200]}")
        return body["data"]

    def _typed(self, method: str, path: str, expect: type | tuple[type, ...], **kwargs: Any) -> Any:
        data = self._data(method, path, **kwargs)
        if not isinstance(data, expect):
            raise BadResponse(f"{PROVIDER}: {method} {path} answered a `data` orch cannot read: {str(data)[:200]}")
        return data

    def _pages(self, path: str, what: str) -> Iterator[dict]:
        """Every row of a paged list (POST {page_index, page_size}); an unreadable page is BadResponse."""
        page = 1
        while True:
            data = self._typed("POST", path, dict, json={"page_index": page, "page_size": PAGE_SIZE}, idempotent=True)
            rows, max_page = data.get("list"), data.get("max_page")
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or \
                    isinstance(max_page, bool) or not isinstance(max_page, int):
                raise BadResponse(f"{PROVIDER}: the {what} list came back in a shape orch cannot read: {str(data)[:200]}")
            yield from rows
            if page >= max_page or not rows:
                return
            page += 1

    # -- account and stock -------------------------------------------------------------

    def balance(self) -> dict[str, Any]:
        return self._typed("POST", "/api/v1/dev/wallet/balance", dict, idempotent=True)

    def gpu_stock(self, region: str, gpu_names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """{stock name: {idle_gpu_num, total_gpu_num, ...}} in one data center (an unknown one answers [])."""
        body: dict[str, Any] = {"region_sign": region}
        if gpu_names:
            body["gpu_name_set"] = gpu_names
        rows = self._typed("POST", "/api/v1/dev/machine/region/gpu_stock", list, json=body, idempotent=True)
        out: dict[str, dict[str, Any]] = {}
        for row in rows:
            if not isinstance(row, dict):
                raise BadResponse(f"{PROVIDER}: a stock row orch cannot read: {str(row)[:200]}")
            out.update({str(k): v for k, v in row.items() if isinstance(v, dict)})
        return out

    # -- instances ---------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> str:
        """Never retried: it starts billing at once, and a lost answer may have created it (the caller
        looks for it by its name)."""
        uuid = self._typed("POST", f"{PRO}/create", str, json=body, idempotent=False)
        if not uuid:
            raise BadResponse(f"{PROVIDER}: create answered an empty instance id")
        return uuid

    def status(self, uuid: str) -> str:
        return self._typed("GET", f"{PRO}/status", str, params={"instance_uuid": uuid})

    def snapshot(self, uuid: str) -> dict[str, Any]:
        return self._typed("GET", f"{PRO}/snapshot", dict, params={"instance_uuid": uuid})

    def instances(self) -> Iterator[dict]:
        return self._pages(f"{PRO}/list", "instance")

    def power_on(self, uuid: str, start_command: str | None = None) -> None:
        body: dict[str, Any] = {"instance_uuid": uuid, "payload": "gpu"}  # the only mode the API has
        if start_command:
            body["start_command"] = start_command
        self._data("POST", f"{PRO}/power_on", json=body, idempotent=False)  # starts billing

    def power_off(self, uuid: str) -> None:
        self._data("POST", f"{PRO}/power_off", json={"instance_uuid": uuid}, idempotent=True)

    def release(self, uuid: str) -> None:
        self._data("POST", f"{PRO}/release", json={"instance_uuid": uuid}, idempotent=True)

    # -- images ------------------------------------------------------------------------

    def save_image(self, uuid: str, name: str) -> str:
        data = self._typed("POST", f"{PRO}/image/save", dict, json={"instance_uuid": uuid, "image_name": name}, idempotent=False)
        image = data.get("image_uuid")
        if not isinstance(image, str) or not image:
            raise BadResponse(f"{PROVIDER}: image/save answered without an image_uuid: {str(data)[:200]}")
        return image

    def private_images(self) -> Iterator[dict]:
        return self._pages(f"{PRO}/image/private/list", "private image")


__all__ = ["AutoDLApi", "InvalidParameters", "PRO", "TOKEN_ENV", "classify", "to_cny"]
