"""/sdapi/v1/txt2img and /sdapi/v1/img2img: HTTP in, GenerationService, base64 PNGs out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from ..deps import AUTH, ServiceDep
from ..encoding import decode_image, images_json
from ..errors import ERROR_RESPONSES
from ..models import RequestError
from ..service import GenerationOutput
from .protocol import Img2ImgRequest, ImageToImageResponse, TextToImageResponse, Txt2ImgRequest

router = APIRouter(prefix="/sdapi/v1", tags=["generation"], dependencies=AUTH, responses=ERROR_RESPONSES)


def _answer(output: GenerationOutput) -> Response:
    return Response(images_json(output.images, parameters=output.parameters, info=output.info), media_type="application/json")


@router.post("/txt2img", response_model=TextToImageResponse)
def txt2img(body: Txt2ImgRequest, service: ServiceDep) -> Response:
    """Images from a prompt (A1111's txt2img)."""
    return _answer(service.run(body, "txt2img", None))


@router.post("/img2img", response_model=ImageToImageResponse)
def img2img(body: Img2ImgRequest, service: ServiceDep) -> Response:
    """Images from an image and a prompt; with `mask`, inpainting (A1111's img2img)."""
    if not body.init_images:
        raise RequestError("init_images: give at least one base64 image")
    init = decode_image(body.init_images[0], "init_images.0").convert("RGB").resize((body.width, body.height))
    extra: dict[str, Any] = {"image": init, "strength": body.denoising_strength}
    kind = "img2img"
    if body.mask:
        mask = decode_image(body.mask, "mask").convert("L").resize((body.width, body.height))
        extra.update(mask_image=mask, width=body.width, height=body.height)
        kind = "inpaint"
    return _answer(service.run(body, kind, extra))
