"""The extension's preprocessors ("modules"): names, aliases, sliders; the weightless ones with OpenCV.

A module turns the unit's image (H x W x 3, uint8) into a control map at about `processor_res`
on its short side; fit() then brings the map to the generation's width x height by the unit's
resize mode, as the extension's detectmap_proc does. Inpaint modules return RGBA: the alpha is
the mask, turned into the -1 pixels the inpaint ControlNet reads (as_control).
Names, labels, sliders and arithmetic are sd-webui-controlnet's (scripts/preprocessor/,
scripts/controlnet.py); modules that need weights are in annotators.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..models.types import RequestError


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float = 0.01

    def api(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Module:
    name: str  # the extension's key ("depth")
    label: str  # its name in the UI, also accepted ("depth_midas")
    run: Callable[..., Any] | None  # (image, resolution, a, b, mask) -> map; None: annotators.py runs it
    resolution: Slider | None = RESOLUTION  # None: the module takes no resolution
    slider_1: Slider | None = None
    slider_2: Slider | None = None
    priority: int = 0
    annotator_files: tuple[str, ...] = ()  # files under models/Annotators (weighted modules)
    needs_mask: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weighted(self) -> bool:
        return self.run is None

    def sliders(self) -> list[dict[str, Any]]:
        return [s.api() for s in (self.resolution, self.slider_1, self.slider_2) if s is not None]


# -- helpers, as the extension's annotator/util.py and processor.py have them -------------------


def hwc3(x):
    import numpy as np

    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 4:
        color, alpha = x[:, :, :3].astype(np.float32), x[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def _pad64(x: int) -> int:
    return int(-(-x // 64) * 64) - x


def resize_with_pad(image, resolution: float):
    """The image with its short side at `resolution`, padded (edge) to multiples of 64; and the un-padder."""
    import cv2
    import numpy as np

    img = hwc3(image)
    h, w, _ = img.shape
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    if (th, tw) != (h, w):
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(img, [[0, _pad64(th)], [0, _pad64(tw)], [0, 0]], mode="edge")
    return padded, lambda x: np.ascontiguousarray(x[:th, :tw])


def _none(img, res, a, b, mask):
    return img


def _canny(img, res, a, b, mask):
    import cv2

    padded, unpad = resize_with_pad(img, res)
    return unpad(cv2.cvtColor(cv2.Canny(padded, int(a), int(b)), cv2.COLOR_GRAY2RGB))


def _invert(img, res, a, b, mask):
    return 255 - hwc3(img)


def _blur(img, res, a, b, mask):
    import cv2

    padded, unpad = resize_with_pad(img, res)
    return cv2.GaussianBlur(unpad(padded), (0, 0), float(a))


def _scribble_xdog(img, res, a, b, mask):
    import cv2
    import numpy as np

    padded, unpad = resize_with_pad(img, res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(padded, dtype=np.uint8)
    out[2 * (255 - dog) > a] = 255
    return unpad(out)


def _threshold(img, res, a, b, mask):
    import numpy as np

    padded, unpad = resize_with_pad(img, res)
    out = np.zeros_like(padded, dtype=np.uint8)
    out[np.min(padded, axis=2) > a] = 255
    return unpad(out)


def _tile_resample(img, res, a, b, mask):
    import cv2

    img = hwc3(img)
    if a < 1.1:
        return img
    h, w = int(img.shape[0] / a), int(img.shape[1] / a)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _inpaint(img, res, a, b, mask):
    """RGB + the mask as alpha: fit() resizes both, as_control() makes the masked pixels -1."""
    import numpy as np

    if mask is None:
        raise RequestError("a mask: inpaint modules need the unit's `mask` (or img2img's mask)")
    return np.concatenate([hwc3(img), mask[:, :, None]], axis=2)


_WEIGHTLESS = [
    Module("none", "none", _none, priority=10**9),
    Module("canny", "canny", _canny, slider_1=Slider("Low Threshold", 100, 1, 255, 1),
           slider_2=Slider("High Threshold", 200, 1, 255, 1), priority=100),
    Module("invert", "invert (from white bg & black line)", _invert, resolution=None, priority=20),
    Module("blur_gaussian", "blur_gaussian", _blur, slider_1=Slider("Sigma", 9.0, 0.01, 64.0)),
    Module("scribble_xdog", "scribble_xdog", _scribble_xdog, slider_1=Slider("XDoG Threshold", 32, 1, 64)),
    Module("threshold", "threshold", _threshold, slider_1=Slider("Binarization Threshold", 127, 0, 255)),
    Module("tile_resample", "tile_resample", _tile_resample, resolution=None,
           slider_1=Slider("Down Sampling Rate", 1.0, 1.0, 8.0), priority=100),
    Module("inpaint", "inpaint_global_harmonious", _inpaint, resolution=None, needs_mask=True),
    Module("inpaint_only", "inpaint_only", _inpaint, resolution=None, needs_mask=True),
]


def _weighted() -> list[Module]:
    from .annotators import MODULES

    return MODULES


def all_modules() -> list[Module]:
    """In the extension's order: none first, then by priority (high first) and label, descending."""
    mods = _WEIGHTLESS + _weighted()
    rest = sorted((m for m in mods if m.name != "none"), key=lambda m: str(m.priority).zfill(8) + m.label, reverse=True)
    return [mods[0], *rest]


def find(name: str, where: str = "module") -> Module:
    """A module by its key or its label (the extension accepts both); unknown: a 422 naming the valid ones."""
    for m in all_modules():
        if name in (m.name, m.label):
            return m
    valid = ", ".join(m.name for m in all_modules())
    raise RequestError(f"{where}: unknown ControlNet module {name!r}; modules on orch: {valid}")


HIDDEN = Slider("", 0.5, 0.0, 1.0)  # a slider the module does not show: the extension still bounds-checks it


def settle(module: Module, processor_res: float, threshold_a: float, threshold_b: float) -> tuple[Any, Any, Any]:
    """The extension's bound check: a value outside its slider (-1: unset) becomes the slider's default
    (a module without that slider: 0.5, as the extension's hidden sliders give)."""
    out: list[Any] = []
    for value, slider, cast in ((processor_res, module.resolution, int), (threshold_a, module.slider_1, float),
                                (threshold_b, module.slider_2, float)):
        slider = slider or HIDDEN
        out.append(slider.value if value < slider.min or value > slider.max else cast(value))
    return out[0], out[1], out[2]


def pixel_perfect_resolution(image, width: int, height: int, resize_mode: int) -> int:
    """The extension's pixel-perfect processor resolution for this image and target size."""
    raw_h, raw_w = image.shape[:2]
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if resize_mode == 2 else max(k0, k1)
    return int(round(k * min(raw_h, raw_w)))


# -- the detected map at the generation's size (the extension's detectmap_proc) -----------------


def _resize(x, size: tuple[int, int]):
    """A map resized: few colours nearest, binary maps re-binarized (Otsu), else area/cubic."""
    import numpy as np

    mask = None
    if x.ndim == 3 and x.shape[2] == 4:
        x, mask = x[:, :, :3], x[:, :, 3]
    if x.shape[1] != size[0] or x.shape[0] != size[1]:
        import cv2  # only here: a map already at the generation's size needs no OpenCV (module "none")

        smaller = size[0] * size[1] < x.shape[0] * x.shape[1]
        colours = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
        binary = colours == 2 and x.min() < 16 and x.max() > 240
        interpolation = cv2.INTER_NEAREST if 2 < colours < 200 else (cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)
        y = cv2.resize(x, size, interpolation=interpolation)
        if mask is not None:
            mask = cv2.resize(mask, size, interpolation=interpolation)
        if binary:
            y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = np.stack([y] * 3, axis=2)
        x = y
    if mask is not None:
        x = np.concatenate([x, ((mask > 127) * 255).astype(np.uint8)[:, :, None]], axis=2)
    return x


def fit(detected, width: int, height: int, resize_mode: int):
    """0 Just Resize (stretch), 1 Crop and Resize (cover, centre crop), 2 Resize and Fill (contain, border colour around)."""
    import numpy as np

    x = detected if detected.ndim == 3 and detected.shape[2] == 4 else hwc3(detected)
    if resize_mode == 0:
        return _resize(x, (width, height))
    old_h, old_w = x.shape[:2]
    k0, k1 = height / old_h, width / old_w
    if resize_mode == 2:
        k = min(k0, k1)
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        colour = np.median(borders, axis=0).astype(x.dtype)
        if len(colour) == 4:
            colour[3] = 255
        out = np.tile(colour[None, None], [height, width, 1])
        y = _resize(x, (int(round(old_w * k)), int(round(old_h * k))))
        nh, nw = y.shape[:2]
        top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        out[top:top + nh, left:left + nw] = y
        return out
    k = max(k0, k1)
    y = _resize(x, (int(round(old_w * k)), int(round(old_h * k))))
    nh, nw = y.shape[:2]
    top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
    return np.ascontiguousarray(y[top:top + height, left:left + width])


def as_control(fitted):
    """The map as the ControlNet reads it: float32 H x W x 3 in [0, 1]; inpaint maps -1 where masked."""
    import numpy as np

    if fitted.ndim == 3 and fitted.shape[2] == 4:
        color = fitted[:, :, :3].astype(np.float32) / 255.0
        m = (fitted[:, :, 3:4].astype(np.float32) / 255.0 > 0.5).astype(np.float32)
        return color * (1 - m) - m
    return fitted.astype(np.float32) / 255.0


def visible(detected):
    """A map to show (detect's answer): inpaint maps with the masked area black."""
    import numpy as np

    if detected.ndim == 3 and detected.shape[2] == 4:
        keep = (detected[:, :, 3:4] <= 127).astype(np.uint8)
        return detected[:, :, :3] * keep
    return hwc3(detected)
