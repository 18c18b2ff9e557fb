"""/controlnet/*: the sd-webui-controlnet extension's own routes, in its shapes.

version, model_list (?update), module_list (?alias_names, each module's sliders), settings,
detect (a module run on images: the maps, base64). Same token as every other API route.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..controlnet import preprocessors, units
from ..deps import AUTH, StateDep
from ..encoding import decode_image, encode_png
from ..errors import ERROR_RESPONSES, ApiRoute
from ..models import RequestError
from .protocol import ControlNetDetectRequest, ControlNetDetectResponse, ControlNetModelList, ControlNetModuleList

router = APIRouter(prefix="/controlnet", tags=["controlnet"], dependencies=AUTH, responses=ERROR_RESPONSES, route_class=ApiRoute)

API_VERSION = 3  # the extension's get_api_version()
UNIT_COUNT = 3  # its control_net_unit_count default; orch takes any number of units


@router.get("/version")
def version() -> dict[str, Any]:
    """The extension's API version."""
    return {"version": API_VERSION}


@router.get("/model_list", response_model=ControlNetModelList)
def model_list(state: StateDep, update: bool = True) -> dict[str, Any]:
    """ControlNet models under models/ControlNet (read at every call, so `update` changes nothing)."""
    return {"model_list": [m.title for m in state.models.control.list()]}


@router.get("/module_list", response_model=ControlNetModuleList)
def module_list(alias_names: bool = False) -> dict[str, Any]:
    """Preprocessors, by key (or by their UI names with alias_names), with each one's sliders."""
    mods = preprocessors.all_modules()
    names = [m.label if alias_names else m.name for m in mods]
    detail = {n: {"model_free": False, "sliders": m.sliders()} for n, m in zip(names, mods)}
    return {"module_list": names, "module_detail": detail}


@router.get("/settings")
def settings() -> dict[str, Any]:
    return {"control_net_unit_count": UNIT_COUNT}


@router.post("/detect", response_model=ControlNetDetectResponse)
def detect(body: ControlNetDetectRequest, state: StateDep) -> dict[str, Any]:
    """Run a preprocessor on images; the maps come back as base64 PNGs."""
    import numpy as np
    from PIL import Image

    module = preprocessors.find(body.controlnet_module, "controlnet_module")
    if not body.controlnet_input_images:
        raise RequestError("controlnet_input_images: No image selected")
    if module.needs_mask and len(body.controlnet_masks) != len(body.controlnet_input_images):
        raise RequestError(f"controlnet_masks: Preprocessor {body.controlnet_module} requires `controlnet_masks` param.")
    annotators_dir = state.models.annotators_dir
    if module.weighted:
        from ..controlnet import annotators

        annotators.check(module, annotators_dir)
    res, a, b = preprocessors.settle(module, body.controlnet_processor_res, body.controlnet_threshold_a,
                                     body.controlnet_threshold_b)
    out = []
    for i, b64 in enumerate(body.controlnet_input_images):
        image = preprocessors.hwc3(np.asarray(decode_image(b64, f"controlnet_input_images.{i}").convert("RGB")))
        mask = None
        if i < len(body.controlnet_masks):
            mask = np.asarray(decode_image(body.controlnet_masks[i], f"controlnet_masks.{i}").convert("L"))

        def run(image=image, mask=mask):
            return units.detect(module, image, res, a, b, mask, annotators_dir)

        detected = state.engine.call(run) if module.weighted else run()  # weighted ones on the GPU worker
        out.append(encode_png(Image.fromarray(preprocessors.visible(detected)), "").decode())
    return {"info": "Success", "images": out}
