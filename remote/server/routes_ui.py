"""The page at `/` and the JSON it needs that A1111's API lacks: the gallery, the queue, signing in.

- `/`, `/app.js`, `/style.css`: plain files from remote/server/ui/ (no build step, no CDN),
  behind the same auth as the API: the page's session cookie, or Basic `orch:TOKEN` (which a
  browser asks for by itself), or Bearer.
- `POST /ui/api/login-link` (the token itself, in a header): a one-time code, valid for
  LINK_SECONDS. `GET /ui/login?code=...` spends it and sets the session cookie (HttpOnly,
  SameSite=Strict), then sends the browser to `/`. This is what `orch open` opens: the token is
  never in a URL, a browser history or a command line.
- `/ui/api/gallery`, `/ui/api/images/{id}[/thumb|/info]`: the instance's outputs (gallery.py).
- `/ui/api/queue`: the page's job queue (queue.py).
- `/ui/api/png-info`: a dropped image's parameters, as form fields.

These routes are the page's own, not a client contract: they are left out of /openapi.json.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from .a1111.protocol import Img2ImgRequest, Txt2ImgRequest
from .a1111.translate import INFOTEXT_FIELDS
from .deps import AUTH, SESSION_SECONDS, StateDep, make_session, require_header_token, require_token, session_cookie_name
from .encoding import decode_image, read_infotext
from .errors import ApiRoute, error_response
from .gallery import EXTENSIONS, BadCursor, Gallery
from .infotext import parse_infotext
from .queue import JobQueue, QueueError

UI_DIR = Path(__file__).parent / "ui"
LINK_SECONDS = 120


class LoginLinks:
    """One-time codes: each opens one browser session, once, within LINK_SECONDS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, float] = {}

    def issue(self) -> str:
        code = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._codes = {c: t for c, t in self._codes.items() if t > now}
            self._codes[code] = now + LINK_SECONDS
        return code

    def spend(self, code: str) -> bool:
        with self._lock:
            expires = self._codes.pop(code, None)
        return expires is not None and expires > time.monotonic()


class Page:
    """What the page's routes share, on app.state.page."""

    def __init__(self, gallery: Gallery | None, queue: JobQueue):
        self.gallery = gallery
        self.queue = queue
        self.links = LoginLinks()


def get_page(request: Request) -> Page:
    return request.app.state.page


def get_gallery(request: Request) -> Gallery:
    gallery = get_page(request).gallery
    if gallery is None:
        raise HTTPException(404, "this server keeps no images (ORCH_KEEP_OUTPUTS=0): the gallery is off")
    return gallery


router = APIRouter(prefix="/ui/api", tags=["page"], dependencies=AUTH, route_class=ApiRoute, include_in_schema=False)
login_router = APIRouter(tags=["page"], route_class=ApiRoute, include_in_schema=False)


# -- signing in --------------------------------------------------------------------------------

@login_router.post("/ui/api/login-link", dependencies=[Depends(require_header_token)])
def login_link(request: Request) -> dict[str, Any]:
    """A one-time link that signs a browser in (what `orch open` opens)."""
    code = get_page(request).links.issue()
    return {"path": f"/ui/login?code={code}", "expires_in": LINK_SECONDS}


@login_router.get("/ui/login")
def login(request: Request, code: str = "") -> Response:
    state = request.app.state.server
    if not code or not get_page(request).links.spend(code):
        return HTMLResponse(_SIGN_IN_FAILED, status_code=401, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    response.set_cookie(session_cookie_name(state.settings.token), make_session(state.settings.token), max_age=SESSION_SECONDS,
                        path="/", httponly=True, samesite="strict")
    return response


_SIGN_IN_FAILED = """<!doctype html><meta charset="utf-8"><title>orch: sign-in link used</title>
<body style="font:16px system-ui;margin:3em;max-width:40em">
<h1>This sign-in link was already used or has expired</h1>
<p>Each link from <code>orch open</code> signs in one browser, once, within two minutes.
Run <code>orch open</code> again for a new one, or sign in with user <code>orch</code> and the
instance's token (<code>orch status --json</code> shows it).</p></body>"""


# -- the gallery -------------------------------------------------------------------------------

@router.get("/gallery")
def gallery_page(request: Request, limit: int = Query(60, ge=1, le=200), cursor: str | None = None,
                 q: str = Query("", max_length=500)) -> dict[str, Any]:
    """Newest first, a page at a time: {"items", "next" (the cursor of the next page), "total"}."""
    try:
        return get_gallery(request).page(limit, cursor, q.strip())
    except BadCursor as e:
        raise HTTPException(422, str(e)) from None


def _entry(request: Request, image_id: int):
    gallery = get_gallery(request)
    entry = gallery.get(image_id)
    if entry is None:
        raise HTTPException(404, f"no image {image_id} in this instance's outputs")
    return gallery, entry


@router.get("/images/{image_id}")
def image_file(request: Request, image_id: int, download: bool = False) -> Response:
    gallery, entry = _entry(request, image_id)
    path = gallery.file(entry)
    if path is None:
        raise HTTPException(404, f"image {image_id}'s file is gone from the instance's outputs")
    headers = {"Cache-Control": "private, max-age=31536000, immutable"}
    return FileResponse(path, media_type=EXTENSIONS.get(path.suffix.lower(), "application/octet-stream"), headers=headers,
                        filename=path.name if download else None, content_disposition_type="attachment")


@router.get("/images/{image_id}/thumb")
def image_thumb(request: Request, image_id: int) -> Response:
    gallery, entry = _entry(request, image_id)
    thumb = gallery.thumbnail(entry)
    if thumb is None:
        raise HTTPException(404, f"image {image_id}'s file is gone from the instance's outputs")
    return FileResponse(thumb, media_type="image/webp", headers={"Cache-Control": "private, max-age=31536000, immutable"})


@router.get("/images/{image_id}/info")
def image_info(request: Request, image_id: int) -> dict[str, Any]:
    """Its parameters: the infotext, as png-info reads it, and as the form's fields."""
    _, entry = _entry(request, image_id)
    return {"id": entry.id, "created": entry.created, "width": entry.width, "height": entry.height, "kind": entry.kind,
            "name": entry.path.rsplit("/", 1)[-1], **describe(entry.infotext)}


class PngInfoBody(BaseModel):
    image: str = Field(description="A base64 image (a data: URL is fine)")


@router.post("/png-info")
def png_info(body: PngInfoBody) -> dict[str, Any]:
    """A dropped image's parameters, as png-info reads them and as the form's fields."""
    img = decode_image(body.image, "image")
    return {"width": img.width, "height": img.height, **describe(read_infotext(img))}


def describe(infotext: str) -> dict[str, Any]:
    parameters = parse_infotext(infotext)
    fields: dict[str, Any] = {name: parameters[key] for key, name in INFOTEXT_FIELDS.items() if key in parameters}
    if parameters.get("Model"):
        fields["sd_model_checkpoint"] = parameters["Model"]
    if parameters.get("VAE"):
        fields["sd_vae"] = parameters["VAE"]
    if any(k.startswith("Hires") for k in parameters):
        fields["enable_hr"] = True
    return {"infotext": infotext, "parameters": parameters, "fields": fields}


# -- the queue ---------------------------------------------------------------------------------

class QueueBody(BaseModel):
    kind: Literal["txt2img", "img2img"] = "txt2img"
    request: dict[str, Any] = Field(default_factory=dict, description="An A1111 txt2img / img2img body")


class MoveBody(BaseModel):
    to: int = Field(ge=0, description="The new position among the waiting jobs (0: next)")


@router.get("/queue")
def queue_list(request: Request) -> dict[str, Any]:
    return get_page(request).queue.snapshot()


@router.post("/queue", status_code=202)
def queue_add(request: Request, body: QueueBody) -> dict[str, Any]:
    """Add a job; its request is checked now (422 naming the field), and runs when its turn comes."""
    model = Txt2ImgRequest if body.kind == "txt2img" else Img2ImgRequest
    try:
        req = model.model_validate({**body.request, "send_images": True})
    except ValidationError as e:
        problems = ["request." + ".".join(str(p) for p in err["loc"]) + ": " + err["msg"].removeprefix("Value error, ")
                    for err in e.errors()]
        raise HTTPException(422, "; ".join(problems)) from None
    if body.kind == "img2img" and not req.init_images:
        raise HTTPException(422, "request.init_images: img2img needs an image (drop one, or use 'send to img2img')")
    try:
        job = get_page(request).queue.submit(body.kind, req)
    except QueueError as e:
        raise HTTPException(409, str(e)) from None
    return job.as_json()


@router.post("/queue/{job_id}/move")
def queue_move(request: Request, job_id: str, body: MoveBody) -> dict[str, Any]:
    queue = get_page(request).queue
    try:
        queue.move(job_id, body.to)
    except KeyError:
        raise HTTPException(404, f"no job {job_id} in the queue") from None
    except QueueError as e:
        raise HTTPException(409, str(e)) from None
    return queue.snapshot()


@router.delete("/queue/{job_id}")
def queue_cancel(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel a waiting job, stop the running one at its next step, or clear a finished one."""
    try:
        done = get_page(request).queue.cancel(job_id)
    except KeyError:
        raise HTTPException(404, f"no job {job_id} in the queue") from None
    return {"id": job_id, "result": done}


@router.delete("/queue")
def queue_clear(request: Request) -> dict[str, Any]:
    return {"cleared": get_page(request).queue.clear_finished()}


@router.get("/status")
def page_status(state: StateDep, request: Request) -> dict[str, Any]:
    """What the page's header shows: readiness, the model, images kept, the agent's time left."""
    from .app import time_left

    ready = state.readiness.snapshot()
    gallery = get_page(request).gallery
    return {"status": ready.get("status"), "model": ready.get("model"), "demo": ready.get("demo", False),
            "error": ready.get("error"), "images": gallery.count() if gallery else None,
            "time_left": time_left(state.settings.state_dir), "device": ready.get("device")}


# -- the static page ---------------------------------------------------------------------------

class PageFiles(StaticFiles):
    """remote/server/ui/ behind the API's auth; anything else under / is the API's JSON 404."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            request = Request(scope, receive)
            try:
                require_token(request)
            except HTTPException as e:
                response = error_response(e.status_code, str(e.detail))
                for k, v in (e.headers or {}).items():
                    response.headers[k] = v
                return await response(scope, receive, send)
        await super().__call__(scope, receive, send)

    async def get_response(self, path: str, scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except StarletteHTTPException as e:
            if e.status_code != 404:
                raise
            return error_response(404, f"no route {scope.get('path')!r}: the page is at /, the API under /sdapi/v1")
        response.headers.setdefault("Cache-Control", "no-cache")  # revalidated (ETag): a new orch's page shows at once
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if response.media_type == "text/html":
            response.headers["Content-Security-Policy"] = (
                "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
        return response


def install(app: FastAPI) -> None:
    """The page's routes and files: call after every API router (the files are mounted at / last)."""
    state = app.state.server
    gallery = Gallery(state.settings.outputs_dir) if state.settings.keep_outputs else None
    state.gallery = gallery
    app.state.page = Page(gallery, JobQueue(app.state.service, state.engine))
    if gallery is not None:
        threading.Thread(target=_scan, args=(gallery,), name="outputs-scan", daemon=True).start()
    app.include_router(login_router)
    app.include_router(router)
    app.mount("/", PageFiles(directory=UI_DIR, html=True), name="page")


def _scan(gallery: Gallery) -> None:
    import logging

    try:
        found = gallery.scan()
        if found:
            logging.getLogger(__name__).info("outputs: indexed %d image(s) found on disk", found)
    except Exception as e:  # the gallery lists what it has; the server serves on
        logging.getLogger(__name__).warning("outputs: scanning for images failed: %s", e)

