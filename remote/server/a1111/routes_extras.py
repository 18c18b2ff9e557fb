"""Extras (upscaling an image with the upscalers the hires fix uses), png-info, interrogate."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import AUTH, StateDep
from ..encoding import decode_image, encode_png, read_infotext
from ..errors import ERROR_RESPONSES, ApiError, ApiRoute, ErrorResponse
from ..infotext import parse_infotext
from ..models import RequestError
from ..upscalers import UnknownUpscaler
from .protocol import (ExtrasBatchImagesRequest, ExtrasBatchImagesResponse, ExtrasSingleImageRequest, ExtrasSingleImageResponse,
                       InterrogateRequest, PngInfoRequest, PNGInfoResponse)

router = APIRouter(prefix="/sdapi/v1", tags=["extras"], dependencies=AUTH, responses=ERROR_RESPONSES, route_class=ApiRoute)
MAX_OUTPUT_SIDE = 8192


def _upscale_one(state, body, image) -> tuple[Any, list[str]]:
    """A1111's extras upscale: by a factor or to a size (cropped to fit), a second upscaler blended in."""
    from PIL import Image

    upscalers = state.models.upscalers
    notes: list[str] = []
    if body.gfpgan_visibility > 0 or body.codeformer_visibility > 0:
        notes.append("GFPGAN / CodeFormer face restoration is not available on orch: not applied")
    try:
        first = upscalers.find(body.upscaler_1, "upscaler_1")
        second = upscalers.find(body.upscaler_2, "upscaler_2")
    except UnknownUpscaler as e:
        raise RequestError(str(e)) from None
    image = image.convert("RGB")
    if body.resize_mode == 1:
        target_w, target_h = body.upscaling_resize_w, body.upscaling_resize_h
        scale = max(target_w / image.width, target_h / image.height)
    else:
        scale = body.upscaling_resize
        target_w, target_h = int(image.width * scale), int(image.height * scale)
    if first.name == "None":
        return image, notes + ["upscaler_1 is None: the image is unchanged"]
    w, h = round(image.width * scale), round(image.height * scale)
    if max(w, h) > MAX_OUTPUT_SIDE or min(w, h) < 1:
        raise RequestError(f"upscaling_resize: the result would be {w}x{h}; at most {MAX_OUTPUT_SIDE} on a side")
    device = state.models.current.device if state.models.current else "cpu"

    def run():
        out = upscalers.upscale(image, first, w, h, device)
        if second.name != "None" and body.extras_upscaler_2_visibility > 0:
            other = upscalers.upscale(image, second, w, h, device)
            out = Image.blend(out, other, body.extras_upscaler_2_visibility)
        return out

    try:
        out = state.engine.call(run)  # on the GPU worker: model upscalers share the GPU with generation
    except UnknownUpscaler as e:
        raise RequestError(str(e)) from None
    if body.resize_mode == 1 and body.upscaling_crop and out.size != (target_w, target_h):
        left, top = (out.width - target_w) // 2, (out.height - target_h) // 2
        out = out.crop((left, top, left + target_w, top + target_h))
    notes.insert(0, f"Upscaled with {first.name} to {out.width}x{out.height}")
    return out, notes


def _html(notes: list[str]) -> str:
    return "".join(f"<p>{n}</p>" for n in notes)


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
def extra_single_image(body: ExtrasSingleImageRequest, state: StateDep) -> dict[str, Any]:
    """Upscale one image (A1111's Extras tab)."""
    state.check_ready()
    image = decode_image(body.image, "image")
    out, notes = _upscale_one(state, body, image)
    return {"html_info": _html(notes), "image": encode_png(out, "").decode() if body.show_extras_results else None}


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
def extra_batch_images(body: ExtrasBatchImagesRequest, state: StateDep) -> dict[str, Any]:
    """Upscale several images."""
    state.check_ready()
    images, notes = [], []
    for i, item in enumerate(body.imageList):
        out, n = _upscale_one(state, body, decode_image(item.data, f"imageList.{i}.data"))
        images.append(encode_png(out, "").decode() if body.show_extras_results else "")
        notes += n
    return {"html_info": _html(list(dict.fromkeys(notes))), "images": images if body.show_extras_results else []}


@router.post("/png-info", response_model=PNGInfoResponse)
def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """The generation parameters written into an image (PNG chunk, or EXIF for JPEG / WebP)."""
    img = decode_image(body.image, "image")
    text = read_infotext(img)
    items = {k: v for k, v in img.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
    return {"info": text, "items": items, "parameters": parse_infotext(text)}


@router.post("/interrogate", responses={404: {"model": ErrorResponse, "description": "No such interrogate model"}})
def interrogate(body: InterrogateRequest) -> None:
    """A1111 captions images with CLIP or DeepDanbooru; orch has neither model: 404, as A1111 answers for a model it lacks."""
    decode_image(body.image, "image")
    raise ApiError(404, f"Model not found: {body.model!r}; orch has no interrogate models (clip, deepdanbooru)")
