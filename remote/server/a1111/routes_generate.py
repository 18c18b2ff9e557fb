"""/sdapi/v1/txt2img and /sdapi/v1/img2img: HTTP in, GenerationService, base64 images out.

A request whose client disconnects is cancelled: the engine stops its batch at the next
step (or drops it before it starts) when every request of the batch has gone.
"""

from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..deps import AUTH, ServiceDep
from ..encoding import images_json
from ..errors import ERROR_RESPONSES, ApiRoute
from .protocol import Img2ImgRequest, ImageToImageResponse, TextToImageResponse, Txt2ImgRequest

router = APIRouter(prefix="/sdapi/v1", tags=["generation"], dependencies=AUTH, responses=ERROR_RESPONSES, route_class=ApiRoute)


async def _generate(request: Request, service, body, kind: str) -> Response:
    cancel = threading.Event()

    async def watch() -> None:  # the body is read: the next message is the client going away
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        output = await run_in_threadpool(service.run, body, kind, cancel)
    finally:
        watcher.cancel()
    return Response(images_json(output.images, parameters=output.parameters, info=output.info), media_type="application/json")


@router.post("/txt2img", response_model=TextToImageResponse)
async def txt2img(body: Txt2ImgRequest, request: Request, service: ServiceDep) -> Response:
    """Images from a prompt (A1111's txt2img), with the hires fix when enable_hr is set."""
    return await _generate(request, service, body, "txt2img")


@router.post("/img2img", response_model=ImageToImageResponse)
async def img2img(body: Img2ImgRequest, request: Request, service: ServiceDep) -> Response:
    """Images from an image and a prompt; with `mask`, inpainting (A1111's img2img)."""
    return await _generate(request, service, body, "img2img")
