"""A request's `alwayson_scripts.controlnet.args`, read as sd-webui-controlnet reads its units.

Each unit: `image` (base64, data: URL, {"image", "mask"} or [image, mask]), `mask`, `module`,
`model`, `weight`, `guidance_start`/`guidance_end`, `control_mode` (name or 0/1/2),
`resize_mode` (name, its older aliases, or 0/1/2), `processor_res`, `threshold_a`/`_b`,
`pixel_perfect`, `enabled` (the extension's default is false); other fields are ignored, as
the extension ignores them. The map is detected here (on the request's thread) and fitted to
the generation's size; what the runner gets is a ControlUnit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..encoding import decode_image
from ..models.types import RequestError
from . import annotators, preprocessors
from .catalog import ControlCatalog

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": 1, "Outer Fit (Shrink to Fit)": 2, "Scale to Fit (Inner Fit)": 1,
                  "Envelope (Outer Fit)": 2}
SCRIPT_NAMES = ("controlnet",)  # A1111 matches alwayson script names without regard to case


@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit, ready for the runner. Units compare without their maps: requests whose
    units differ only in their images may share a batch."""

    model: str  # the ControlNet's title, "name [hash]"
    path: Path
    module: str
    weight: float
    guidance_start: float
    guidance_end: float
    control_mode: int  # 0 Balanced, 1 My prompt is more important, 2 ControlNet is more important
    resize_mode: int  # 0 Just Resize, 1 Crop and Resize, 2 Resize and Fill
    processor_res: Any
    threshold_a: Any
    threshold_b: Any
    pixel_perfect: bool
    index: int  # its place among the request's units ("ControlNet 0")
    control: Any = field(default=None, compare=False)  # float32 H x W x 3 (as_control)

    def infotext(self) -> str:
        """The extension's ControlNetUnit.serialize()."""
        values = [("Module", self.module), ("Model", self.model), ("Weight", self.weight),
                  ("Resize Mode", RESIZE_MODES[self.resize_mode]), ("Processor Res", self.processor_res),
                  ("Threshold A", self.threshold_a), ("Threshold B", self.threshold_b),
                  ("Guidance Start", self.guidance_start), ("Guidance End", self.guidance_end),
                  ("Pixel Perfect", self.pixel_perfect), ("Control Mode", CONTROL_MODES[self.control_mode])]
        return ", ".join(f"{k}: {v}" for k, v in values)


def script_args(alwayson: dict[str, Any]) -> tuple[list[Any] | None, list[str]]:
    """The ControlNet units of alwayson_scripts, and the names of the other scripts there (None: no ControlNet)."""
    units, others = None, []
    for name, value in (alwayson or {}).items():
        if name.lower() in SCRIPT_NAMES:
            args = value.get("args", []) if isinstance(value, dict) else value
            if not isinstance(args, list):
                raise RequestError(f"alwayson_scripts.{name}.args: a list of ControlNet units")
            units = args
        else:
            others.append(name)
    return units, others


def _choice(value: Any, names: tuple[str, ...], aliases: dict[str, int], where: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        if value == 3 and names is RESIZE_MODES:  # "Just Resize (Latent upscale)": the extension resizes
            return 0
        if 0 <= value < len(names):
            return value
    elif isinstance(value, str):
        if value in names:
            return names.index(value)
        if value in aliases:
            return aliases[value]
        if value.isdigit() and int(value) < len(names):
            return int(value)
    raise RequestError(f"{where}: {value!r} is not one of {', '.join(names)} (or 0-{len(names) - 1})")


def _number(raw: dict[str, Any], key: str, default: float, where: str) -> float:
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}.{key}: a number (got {value!r})")
    return value


def _image_and_mask(raw: dict[str, Any], where: str):
    """The unit's image and mask (numpy), from any of the extension's forms."""
    import numpy as np

    image, mask = raw.get("image", raw.get("input_image")), raw.get("mask", raw.get("mask_image"))
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, (list, tuple)) and image:
        if isinstance(image[0], dict):
            image, mask = image[0].get("image"), image[0].get("mask", mask)
        elif len(image) == 2:
            image, mask = image
    if not image or not isinstance(image, str):
        return None, None
    pil = decode_image(image, f"{where}.image")
    arr = preprocessors.hwc3(np.asarray(pil.convert("RGBA") if "A" in pil.mode or pil.mode == "P" else pil.convert("RGB")))
    m = None
    if isinstance(mask, str) and mask:
        mp = decode_image(mask, f"{where}.mask")
        m = np.asarray(mp.convert("L") if "A" not in mp.mode else mp.split()[-1])
        if m.shape != arr.shape[:2]:
            raise RequestError(f"{where}.mask: {m.shape[1]}x{m.shape[0]}, not the image's {arr.shape[1]}x{arr.shape[0]}")
    return arr, m


def detect(module: preprocessors.Module, image, resolution, a, b, mask, annotators_dir: Path):
    """Run a module on an image (numpy): its map, before fitting."""
    if module.weighted:
        return annotators.run(module, image, resolution, annotators_dir)
    return module.run(image, resolution, a, b, mask)


def read_units(args: list[Any], catalog: ControlCatalog, annotators_dir: Path, width: int, height: int,
               warnings: list[str], fallback_image=None, fallback_mask=None) -> tuple[ControlUnit, ...]:
    """The enabled units, their maps detected and fitted to width x height.

    fallback_image / fallback_mask: img2img's first init image and mask (numpy), used by a unit
    that brings no image (the extension does the same)."""
    out = []
    for i, raw in enumerate(args):
        where = f"alwayson_scripts.controlnet.args.{i}"
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise RequestError(f"{where}: a ControlNet unit is an object (got {type(raw).__name__})")
        if "enabled" not in raw:
            warnings.append(f"ControlNet unit {i}: `enabled` not given; skipped (the extension's default is false)")
            continue
        if not raw.get("enabled"):
            continue
        module = preprocessors.find(str(raw.get("module") or "none"), f"{where}.module")
        model_name = str(raw.get("model") or "None")
        if model_name == "None":
            raise RequestError(f"{where}.model: no ControlNet model chosen; models on this instance: "
                               f"{', '.join(m.title for m in catalog.list()) or 'none'}")
        model = catalog.find(model_name, f"{where}.model")
        weight = float(_number(raw, "weight", 1.0, where))
        start = float(_number(raw, "guidance_start", 0.0, where))
        end = float(_number(raw, "guidance_end", raw.get("guidance", 1.0) if isinstance(raw.get("guidance"), (int, float)) else 1.0, where))
        if not (0 <= weight <= 2):
            raise RequestError(f"{where}.weight: from 0 to 2 (got {weight})")
        if not (0 <= start <= 1 and 0 <= end <= 1) or start > end:
            raise RequestError(f"{where}: guidance_start ({start}) and guidance_end ({end}) must be within 0-1, start <= end")
        control_mode = _choice(raw.get("control_mode", 0), CONTROL_MODES, {}, f"{where}.control_mode")
        resize_mode = _choice(raw.get("resize_mode", 1), RESIZE_MODES, RESIZE_ALIASES, f"{where}.resize_mode")
        image, mask = _image_and_mask(raw, where)
        if image is None:
            if fallback_image is None:
                raise RequestError(f"{where}.image: give the unit a base64 image")
            image, mask = fallback_image, (mask if mask is not None else fallback_mask)
        if module.needs_mask and mask is None:
            mask = fallback_mask
        if module.needs_mask and mask is None:
            raise RequestError(f"{where}.mask: module {module.label} needs a mask (the unit's, or img2img's)")
        pixel_perfect = bool(raw.get("pixel_perfect", False))
        res, a, b = preprocessors.settle(module, _number(raw, "processor_res", -1, where),
                                         _number(raw, "threshold_a", -1, where), _number(raw, "threshold_b", -1, where))
        if pixel_perfect:
            res = preprocessors.pixel_perfect_resolution(image, width, height, resize_mode)
        if start == end:
            warnings.append(f"ControlNet unit {i}: guidance_start equals guidance_end: the unit acts on no step")
            continue
        detected = detect(module, image, res, a, b, mask, annotators_dir)
        fitted = preprocessors.fit(detected, width, height, resize_mode)
        out.append(ControlUnit(model=model.title, path=model.path, module=str(raw.get("module") or "none"), weight=weight, guidance_start=start,
                               guidance_end=end, control_mode=control_mode, resize_mode=resize_mode, processor_res=res,
                               threshold_a=a, threshold_b=b, pixel_perfect=pixel_perfect, index=i,
                               control=preprocessors.as_control(fitted)))
    return tuple(out)
