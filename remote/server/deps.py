"""What routes depend on: the token check, the server's state and its generation service."""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from .service import GenerationService
from .state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


StateDep = Annotated[ServerState, Depends(get_state)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]


def require_token(request: Request) -> None:
    """The instance's token, as `Authorization: Bearer TOKEN` or HTTP Basic `orch:TOKEN`."""
    token = get_state(request).settings.token
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        given = password if user == "orch" else ""
    if not given or not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong token: send 'Authorization: Bearer TOKEN' or HTTP Basic orch:TOKEN (orch status --json shows it)",
            headers={"WWW-Authenticate": 'Basic realm="orch"'},
        )


AUTH = [Depends(require_token)]
