"""One error shape for every failure: {"error": kind, "detail": what to do, ...}.

A1111's API answers {"error", "detail", "body", "errors"}; orch answers the same keys it
has: `error` (the kind), `detail` (one sentence naming the field and the fix), and for
validation errors `errors` (one entry per problem).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

STATUS_NAMES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "ValidationError", 500: "InternalError", 503: "ServiceUnavailable"}


def error_response(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": STATUS_NAMES.get(status, "Error"), "detail": detail, **extra})


class ApiError(HTTPException):
    """Raised anywhere below a route: becomes error_response(status, detail, **extra)."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.extra = extra


class NotReady(Exception):
    """No model to serve yet (503)."""

    def __init__(self, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.retry_after = retry_after


class OutOfMemory(Exception):
    """The GPU ran out of memory for this request (503); the server lives on."""


def install_handlers(app: FastAPI, on_unexpected=None) -> None:
    from .encoding import BadImage
    from .models.types import JobCancelled, RequestError

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(BadImage)
    async def _bad_image(request: Request, exc: BadImage) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady) -> JSONResponse:
        extra = {"retry_after": exc.retry_after} if exc.retry_after else {}
        return error_response(503, str(exc), **extra)

    @app.exception_handler(OutOfMemory)
    async def _out_of_memory(request: Request, exc: OutOfMemory) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        messages = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            field = ".".join(loc) or "body"
            msg = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                msg = f"malformed JSON: {err.get('ctx', {}).get('error', msg)}"
                field = "body"
            messages.append(f"{field}: {msg.removeprefix('Value error, ')}")
        # Each error's location, message and kind; not the input (it may be a NaN JSON cannot carry, or a whole image).
        errors = [{"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
                  for err in exc.errors()]
        return error_response(422, "; ".join(messages), errors=errors)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's own (a body it cannot parse: 400) derive from it too
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail), **getattr(exc, "extra", {}))
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response

    @app.exception_handler(JobCancelled)
    async def _cancelled(request: Request, exc: JobCancelled) -> JSONResponse:
        return error_response(503, f"cancelled: {exc}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected(request, exc)

    app.state.on_unexpected = on_unexpected


def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed: %s %s", request.method, request.url.path, exc_info=exc)
    hook = getattr(request.app.state, "on_unexpected", None)
    if hook is not None:
        hook(exc)
    return error_response(500, f"{type(exc).__name__}: {exc}")


class ApiRoute(APIRoute):
    """A route whose unexpected exceptions become a 500 answer right here.

    Starlette turns them into a 500 in its outermost middleware and then re-raises them, and
    uvicorn closes the connection: the client's next request on that keep-alive connection
    got no answer. Answered here, the connection lives on. Exceptions that have a handler
    (HTTP errors, validation, RequestError...) go to it as before."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except Exception as exc:
                handlers = request.app.exception_handlers
                if any(cls in handlers for cls in type(exc).__mro__ if cls is not Exception):
                    raise
                return unexpected(request, exc)

        return route


def is_out_of_memory(e: BaseException) -> bool:
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return "out of memory" in str(e).lower()


class ErrorResponse(BaseModel):
    """Every error's body."""

    error: str = Field(description="The kind: ValidationError, Unauthorized, NotFound, ServiceUnavailable, InternalError")
    detail: str = Field(description="What went wrong, naming the field, and what to do")
    errors: list[dict[str, Any]] | None = Field(default=None, description="Validation errors: one per problem")
    retry_after: int | None = Field(default=None, description="Seconds to wait before retrying (503 while loading)")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body could not be read (not UTF-8 text)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong token"},
    422: {"model": ErrorResponse, "description": "A field is invalid, or names something this instance does not have"},
    500: {"model": ErrorResponse, "description": "Unexpected server error"},
    503: {"model": ErrorResponse, "description": "Still loading, out of GPU memory, or cancelled (the client went away)"},
}
