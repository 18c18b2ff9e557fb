"""What routes depend on: the token check, the server's state and its generation service."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
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


def header_token_ok(request: Request) -> bool:
    """`Authorization: Bearer TOKEN` or HTTP Basic `orch:TOKEN` carries the instance's token."""
    token = get_state(request).settings.token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        given = password if user == "orch" else ""
    return bool(given) and secrets.compare_digest(given.encode(), token.encode())


def require_token(request: Request) -> None:
    """The instance's token, as `Authorization: Bearer TOKEN` or HTTP Basic `orch:TOKEN`, or the
    page's session cookie (set by the one-time link `orch open` opens). A browser request from
    another origin is refused whatever it carries: a browser sends cookies and cached Basic
    credentials along with requests that any page may make to 127.0.0.1."""
    check_origin(request)
    if header_token_ok(request):
        return
    token = get_state(request).settings.token
    cookie = request.cookies.get(session_cookie_name(token))
    if cookie is not None and valid_session(token, cookie):
        if request.method not in SAFE_METHODS and not request.headers.get("origin") \
                and request.headers.get("sec-fetch-site") != "same-origin":
            raise HTTPException(status_code=403, detail="refused: a request with the page's cookie must come from the page "
                                "(no Origin header); use the page, or send the token in an Authorization header")
        return
    raise unauthorized()


def require_header_token(request: Request) -> None:
    """The token itself (not the page's cookie): for what hands out new access, like a login link."""
    check_origin(request)
    if not header_token_ok(request):
        raise unauthorized()


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=401,
        detail="missing or wrong token: send 'Authorization: Bearer TOKEN' or HTTP Basic orch:TOKEN (orch status --json shows it); "
               "in a browser, `orch open` opens the page signed in",
        headers={"WWW-Authenticate": 'Basic realm="orch"'},
    )


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check_origin(request: Request) -> None:
    """ComfyUI's origin-only check, with the Fetch metadata browsers add: a page of another origin
    (another site, or another port of 127.0.0.1) gets a 403 from every authenticated route.
    Clients that are not browsers send neither header and are not concerned."""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    if site in ("cross-site", "same-site"):
        raise HTTPException(status_code=403, detail=f"refused: a request from another origin ({origin or site}); "
                            f"this server answers its own page only (`orch open`)")
    if origin is not None and origin != f"{request.url.scheme}://{host}":
        raise HTTPException(status_code=403, detail=f"refused: a request from another origin ({origin}) to {host}; "
                            f"this server answers its own page only (`orch open`)")


# -- the page's session cookie ----------------------------------------------------------------

SESSION_SECONDS = 7 * 24 * 3600


def session_cookie_name(token: str) -> str:
    """Per instance: cookies of 127.0.0.1 go to every port, and two instances may be open at once."""
    return "orch_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def make_session(token: str, now: float | None = None) -> str:
    """ISSUED.MAC: the MAC is keyed with the token (which it does not reveal), so a session survives
    a server restart and ends with the token or after SESSION_SECONDS."""
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_mac(token, issued)}"


def valid_session(token: str, value: str, now: float | None = None) -> bool:
    issued_text, _, mac = value.partition(".")
    try:
        issued = int(issued_text)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if not issued <= now + 60 or now - issued > SESSION_SECONDS:
        return False
    return secrets.compare_digest(mac, _mac(token, issued))


def _mac(token: str, issued: int) -> str:
    return hmac.new(token.encode(), f"orch-page-session:{issued}".encode(), hashlib.sha256).hexdigest()


AUTH = [Depends(require_token)]
