"""Upscalers, as A1111 names them: for the hires fix, and for extra-single-image / extra-batch-images.

- "None", "Lanczos", "Nearest": plain resampling (Pillow).
- Latent modes ("Latent", "Latent (bicubic)", ...): the hires fix resizes the latents
  themselves (no decode and encode in between); no weights.
- Model upscalers: super-resolution networks (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ...)
  from files under the models directory, in A1111's folders (ESRGAN/, RealESRGAN/, DAT/,
  SwinIR/, ...), synced like any model. spandrel reads the file and recognises the
  architecture from its weights; the network runs in tiles (A1111's ESRGAN_tile) on the
  model's device. Named by file name without extension, as A1111 names them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A1111's latent upscale modes: torch interpolation mode, antialias.
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PLAIN = ("None", "Lanczos", "Nearest")
MODEL_FOLDERS = ("ESRGAN", "RealESRGAN", "DAT", "SwinIR", "ScuNET", "HAT", "Upscalers")
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")
TILE, TILE_OVERLAP = 192, 8  # A1111's ESRGAN_tile / ESRGAN_tile_overlap defaults


class UnknownUpscaler(ValueError):
    pass


@dataclass(frozen=True)
class Upscaler:
    name: str
    path: Path | None = None  # a model file; None for plain resampling
    scale: float | None = None


class Upscalers:
    """The upscalers on this instance (the folders are read at each call) and the loaded networks."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def model_files(self) -> list[Path]:
        files = []
        for folder in MODEL_FOLDERS:
            root = self.models_dir / folder
            if root.is_dir():
                files += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
                                and not any(part.startswith(".") for part in p.relative_to(root).parts))
        return files

    def available(self) -> list[Upscaler]:
        """What /sdapi/v1/upscalers lists: plain resampling, then one entry per model file."""
        out = [Upscaler(name) for name in PLAIN]
        out += [Upscaler(p.stem, p, _scale_from_name(p.stem)) for p in self.model_files()]
        return out

    def find(self, name: str | None, field: str) -> Upscaler:
        wanted = (name or "None").strip()
        for u in self.available():
            if u.name.lower() == wanted.lower() or (u.path is not None and wanted in (u.path.name, str(u.path))):
                return u
        valid = ", ".join([u.name for u in self.available()] + list(LATENT_MODES))
        raise UnknownUpscaler(f"{field}: unknown upscaler {name!r}; upscalers on this instance: {valid}")

    # -- running ---------------------------------------------------------------------------------

    def upscale(self, image, upscaler: Upscaler, width: int, height: int, device: str = "cpu"):
        """`image` (PIL) resized to width x height with the upscaler (the network first, then Lanczos to the exact size)."""
        from PIL import Image

        if upscaler.path is None or upscaler.name == "None":
            if (width, height) == image.size:
                return image
            return image.resize((width, height), Image.NEAREST if upscaler.name == "Nearest" else Image.LANCZOS)
        model = self._load(upscaler.path, device)
        current = image.convert("RGB")
        for _ in range(3):  # A1111 runs the network up to three times to reach the size
            if current.width >= width and current.height >= height:
                break
            current = _run_tiled(model, current, device)
        if current.size != (width, height):
            current = current.resize((width, height), Image.LANCZOS)
        return current

    def _load(self, path: Path, device: str):
        key = f"{path}:{device}"
        with self._lock:
            model = self._loaded.get(key)
            if model is None:
                try:
                    import spandrel
                except ImportError as e:
                    raise UnknownUpscaler(f"{path.stem}: model upscalers need the spandrel package on the instance "
                                          f"(pip install 'orch[upscalers]'; it needs torchvision) ({e})") from None
                try:
                    descriptor = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
                except Exception as e:
                    raise UnknownUpscaler(f"{path.stem}: not an upscaler model spandrel can read ({type(e).__name__}: {e})") from None
                if not isinstance(descriptor, spandrel.ImageModelDescriptor):
                    raise UnknownUpscaler(f"{path.stem}: {descriptor.architecture.name} is not an image-to-image upscaler")
                descriptor.to(device).eval()
                if device == "cuda" and descriptor.supports_half:
                    descriptor.half()
                self._loaded = {key: descriptor}  # one at a time: they can be large
                model = descriptor
                log.info("loaded upscaler %s (%s, x%s)", path.name, descriptor.architecture.name, descriptor.scale)
        return model


def _scale_from_name(stem: str) -> float | None:
    import re

    m = re.search(r"(?:^|[^0-9])([1-8])x|x([1-8])(?:[^0-9]|$)", stem)
    return float(m.group(1) or m.group(2)) if m else None


def _run_tiled(model, image, device: str):
    """One pass of the network over the image, in overlapping tiles (A1111's ESRGAN tiling)."""
    import numpy as np
    import torch
    from PIL import Image

    scale = int(model.scale)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    dtype = next(model.model.parameters()).dtype
    _, _, h, w = x.shape
    out = torch.zeros((1, 3, h * scale, w * scale))
    with torch.inference_mode():
        for y0 in range(0, h, TILE):
            for x0 in range(0, w, TILE):
                y1, x1 = min(y0 + TILE, h), min(x0 + TILE, w)
                py0, px0 = max(y0 - TILE_OVERLAP, 0), max(x0 - TILE_OVERLAP, 0)
                py1, px1 = min(y1 + TILE_OVERLAP, h), min(x1 + TILE_OVERLAP, w)
                tile = x[:, :, py0:py1, px0:px1].to(device, dtype)
                result = model(tile).float().cpu().clamp(0, 1)
                oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
                out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                    result[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    pixels = (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(pixels)
