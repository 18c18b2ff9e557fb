"""Every request a simulator receives, and every answer it gives, checked against its cloud's
vendored OpenAPI description (openapi-core), so a simulator cannot drift from the real API
without a test failing.

    check = OpenApiCheck(spec_file("lambda", "openapi.yaml"), base_path="/api/v1", patch=..., extra_statuses=...)
    check.request("POST", url, headers, body)                           # raises SpecMismatch
    check.response("POST", url, headers, body, status, answer_body)     # raises SpecMismatch

`patch` edits the loaded document before it is compiled: the gaps that
../shared/provider-specs/README.md lists (fields newer than the vendored copy) are allowed
there, in one place, in words. `extra_statuses` adds answers the vendor's servers give but
the spec does not list (429 with Retry-After, a 5xx) to every operation that lacks them.
`validating_transport` wraps an httpx MockTransport handler the same way, for canned answers
in unit tests. Written for any REST simulator (Lambda, RunPod, Vast): nothing here names one.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def specs_dir() -> Path:
    """Where the vendored specs are: ../shared/provider-specs next to the repository (ORCH_PROVIDER_SPECS overrides)."""
    return Path(os.environ.get("ORCH_PROVIDER_SPECS") or ROOT.parent / "shared" / "provider-specs")


def spec_file(*parts: str) -> Path:
    path = specs_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"the vendored API spec {path} is missing: the simulators validate every request and answer "
                                f"against it (set ORCH_PROVIDER_SPECS to the provider-specs directory)")
    return path


class SpecMismatch(AssertionError):
    """A request or an answer that the vendored spec does not allow: a test failure, never a warning."""


class OpenApiCheck:
    def __init__(self, spec: Path, *, base_path: str = "", patch: Callable[[dict], None] | None = None,
                 extra_statuses: Mapping[int, dict] | None = None):
        from openapi_core import OpenAPI

        self.spec_path = spec
        text = spec.read_text()
        document = json.loads(text) if spec.suffix == ".json" else yaml.safe_load(text)
        # Requests arrive at 127.0.0.1:PORT, not at the vendor's host: a relative server matches any host.
        document["servers"] = [{"url": base_path or "/"}]
        if patch:
            patch(document)
        for item in document.get("paths", {}).values():
            for method, operation in item.items():
                if method in HTTP_METHODS:
                    responses = operation.setdefault("responses", {})
                    for status, response in (extra_statuses or {}).items():
                        responses.setdefault(str(status), response)
        self.document = document
        self._api = OpenAPI.from_dict(document)
        self._lock = threading.Lock()

    def _request(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None):
        from openapi_core.testing import MockRequest

        parts = urlsplit(url)
        host_url = f"{parts.scheme or 'http'}://{parts.netloc or 'localhost'}"
        lowered = {k.lower(): v for k, v in headers.items()}
        content_type = (lowered.get("content-type") or "application/json").split(";")[0].strip()
        return MockRequest(host_url, method.lower(), parts.path, args=dict(parse_qsl(parts.query)), headers=dict(headers),
                           data=body or None, content_type=content_type)

    def request(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> None:
        req = self._request(method, url, headers, body)
        try:
            with self._lock:
                self._api.validate_request(req)
        except Exception as e:  # openapi-core's errors share no base class worth naming here
            raise SpecMismatch(f"{method.upper()} {urlsplit(url).path}: the request does not match {self.spec_path.name}: "
                               f"{describe(e)}") from None

    def response(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, status: int,
                 answer: bytes, content_type: str = "application/json") -> None:
        from openapi_core.testing import MockResponse

        req = self._request(method, url, headers, body)
        resp = MockResponse(answer, status_code=status, content_type=content_type)
        try:
            with self._lock:
                self._api.validate_response(req, resp)
        except Exception as e:
            raise SpecMismatch(f"{method.upper()} {urlsplit(url).path} -> {status}: the answer does not match "
                               f"{self.spec_path.name}: {describe(e)}; answer: {answer[:300]!r}") from None


def describe(error: BaseException) -> str:
    """openapi-core's error with the schema errors that caused it (they hold the useful part)."""
    parts = [str(error) or type(error).__name__]
    cause = error.__cause__ or error.__context__
    for err in getattr(cause, "schema_errors", ()) or getattr(error, "schema_errors", ()):
        where = "/".join(str(p) for p in getattr(err, "absolute_path", ())) or "(top)"
        parts.append(f"at {where}: {getattr(err, 'message', err)}")
    return "; ".join(dict.fromkeys(parts))


def validating_transport(check: OpenApiCheck, handler: Callable[[Any], Any]):
    """An httpx.MockTransport whose every request and canned answer must match the spec."""
    import httpx

    def validated(request: httpx.Request) -> httpx.Response:
        body = request.read()
        check.request(request.method, str(request.url), dict(request.headers), body)
        response = handler(request)
        content = response.read()
        content_type = response.headers.get("content-type", "application/json").split(";")[0]
        check.response(request.method, str(request.url), dict(request.headers), body, response.status_code, content, content_type)
        return response

    return httpx.MockTransport(validated)


__all__ = ["OpenApiCheck", "SpecMismatch", "describe", "spec_file", "specs_dir", "validating_transport"]
