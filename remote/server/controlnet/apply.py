"""The units of a request in a diffusers ControlNet pipeline, on the loaded model's own components.

The pipeline (StableDiffusion[XL]ControlNet[Img2Img|Inpaint]Pipeline) is made once per kind
with `from_pipe`: the UNet, VAE and text encoders are the base model's, never copied. Each
call puts the units' ControlNets in it (one, or a MultiControlNetModel), each as a view that
shares the network's weights and applies the unit's control mode to its residuals:

- Balanced: the residuals times the weight (diffusers' own arithmetic);
- My prompt is more important: the extension's soft injection, residual k of 13 times
  weight * 0.825 ** (12 - k) (SDXL: the first 10 of those), on both halves of CFG;
- ControlNet is more important: diffusers' guess_mode (residuals scaled 10 ** (-1 .. 0), no
  control on the unconditional half). The extension scales by 0.825 ** (12 .. 0): the same
  curve within 0.6%; the answer's warnings say so.

The network itself always runs at scale 1 (the scale is applied outside), so a compiled
ControlNet has one graph whatever the weight.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

from . import catalog

log = logging.getLogger(__name__)

SOFT = [0.825 ** float(12 - i) for i in range(13)]

_PIPELINES = {
    (False, "txt2img"): "StableDiffusionControlNetPipeline",
    (False, "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    (False, "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    (True, "txt2img"): "StableDiffusionXLControlNetPipeline",
    (True, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    (True, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


def pipeline_class(kind: str, sdxl: bool):
    import diffusers

    return getattr(diffusers, _PIPELINES[(sdxl, kind)])


class UnitForward:
    """Stands in for a ControlNet view's forward: the network at scale 1, then the unit's scales."""

    def __init__(self, inner, mode: int, cfg: bool):
        self.inner, self.mode, self.cfg = inner, mode, cfg

    def __call__(self, *args, conditioning_scale: float = 1.0, guess_mode: bool = False, return_dict: bool = True, **kwargs):
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        cond_only = self.mode == 2 and not guess_mode and self.cfg  # guess_mode in a call with other modes
        down, mid = self.inner(*args, conditioning_scale=1.0, guess_mode=guess_mode or self.mode == 2, return_dict=False,
                               **kwargs)
        outs = [*down, mid]
        if self.mode == 1:
            scales = SOFT[: len(outs)] if len(outs) <= len(SOFT) else [1.0] * len(outs)
            outs = [o * s for o, s in zip(outs, scales)]
        outs = [o * conditioning_scale for o in outs]
        if cond_only:
            half = outs[0].shape[0] // 2
            outs = [o.clone() for o in outs]
            for o in outs:
                o[:half] = 0
        down, mid = tuple(outs[:-1]), outs[-1]
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid) if return_dict else (down, mid)


def view(net, mode: int, cfg: bool):
    """The network with the unit's control mode: a shallow copy (same weights), its own forward."""
    v = copy.copy(net)
    v.forward = UnitForward(net.forward, mode, cfg)
    return v


def nets_for(model, units, cache_dir, compiler=None) -> list[Any]:
    """The units' ControlNets, loaded once per base model (the last few kept, least recently used out)."""
    loaded: OrderedDict = model.controlnets
    out = []
    for unit in units:
        key = str(unit.path)
        if key not in loaded:
            while len(loaded) >= catalog.KEEP_LOADED:
                loaded.popitem(last=False)
            unet = model.pipeline.unet
            net = catalog.load(catalog.ControlModel(unit.path.stem if unit.path.is_file() else unit.path.name, unit.path),
                               getattr(unet, "_orig_mod", unet), cache_dir, unet.dtype, model.device)
            if compiler is not None and model.compiled:
                net.forward = compiler._compile_fn(net.forward)  # the UNet's path: torch.compile, CUDA graphs
            loaded[key] = net
        loaded.move_to_end(key)
        out.append(loaded[key])
    return out


def control_args(pipe, nets: list[Any], units, rows: list[tuple], kind: str, cfg: bool) -> dict[str, Any]:
    """The call's ControlNet arguments; puts the units' views in the pipeline. `rows`: each image's units."""
    import numpy as np
    import torch
    from diffusers import MultiControlNetModel

    guess = all(u.control_mode == 2 for u in units)
    views = [view(net, u.control_mode, cfg) for net, u in zip(nets, units)]
    pipe.controlnet = views[0] if len(views) == 1 else MultiControlNetModel(views)
    images = []
    for j in range(len(units)):
        maps = np.stack([row[j].control for row in rows])  # (B, H, W, 3) float32
        images.append(torch.from_numpy(maps).permute(0, 3, 1, 2).contiguous())
    args: dict[str, Any] = {"image" if kind == "txt2img" else "control_image": images[0] if len(images) == 1 else images,
                            "controlnet_conditioning_scale": [u.weight for u in units] if len(units) > 1 else units[0].weight,
                            "control_guidance_start": [u.guidance_start for u in units],
                            "control_guidance_end": [u.guidance_end for u in units],
                            "guess_mode": guess}
    if len(units) == 1:
        args["control_guidance_start"], args["control_guidance_end"] = units[0].guidance_start, units[0].guidance_end
    return args
