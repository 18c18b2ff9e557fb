"""Inpainting as A1111 does it: the mask prepared, the masked area filled, the original kept outside.

1. The mask: its alpha when it has transparency, else its gray levels; inverted on request
   (inpainting_mask_invert); blurred (mask_blur, or mask_blur_x / mask_blur_y).
2. "Only masked" (inpaint_full_res): the masked area plus `inpaint_full_res_padding` pixels,
   grown to the request's aspect ratio, is cut out and generated at width x height, then
   scaled back into place. Otherwise the image and mask are resized to width x height.
3. Masked content (inpainting_fill): 0 fill (colors from around the mask), 1 original,
   2 latent noise, 3 latent nothing.
4. The result is pasted over the original with the (blurred) mask, so that outside it every
   pixel is the original's.
An inpainting checkpoint (9 input channels) gets the masked image as its conditioning; a
normal one gets the original's latents put back outside the mask at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .images import flatten, resize_image


@dataclass(frozen=True)
class InpaintOptions:
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    full_res: bool = False
    full_res_padding: int = 0
    invert: bool = False


@dataclass
class Prepared:
    """What the pipeline gets, and what puts its output back in place."""

    images: list[Any]  # the images to generate from, width x height (RGB)
    mask: Any  # the mask the pipeline uses, width x height (L)
    overlays: list[Any]  # the originals, transparent where the mask is: pasted over the results
    paste_to: tuple[int, int, int, int] | None = None  # (x, y, w, h) in the original, for "only masked"
    original_size: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def binary_mask(mask):
    """The alpha of a mask with transparency (A1111: white where it is opaque), else its gray levels."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    return mask.convert("L")


def blur(mask, sigma_x: int, sigma_y: int):
    """Gaussian blur along x then y, with A1111's kernel sizes (2 * int(2.5 * sigma + 0.5) + 1)."""
    import numpy as np
    from PIL import Image
    from scipy.ndimage import gaussian_filter1d

    a = np.asarray(mask, dtype=np.float32)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma > 0:
            radius = int(2.5 * sigma + 0.5)
            a = gaussian_filter1d(a, sigma, axis=axis, mode="mirror", truncate=radius / sigma)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def crop_region(mask, padding: int) -> tuple[int, int, int, int]:
    """The box around the mask's non-zero pixels, grown by `padding` (clamped to the image)."""
    import numpy as np

    a = np.asarray(mask)
    ys, xs = np.nonzero(a)
    h, w = a.shape
    if len(xs) == 0:
        return 0, 0, w, h
    return (max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0),
            min(int(xs.max()) + 1 + padding, w), min(int(ys.max()) + 1 + padding, h))


def expand_to_ratio(region, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow the box to the aspect ratio width:height, inside the image where it can be."""
    x1, y1, x2, y2 = region
    ratio = width / height
    rw, rh = x2 - x1, y2 - y1
    if rw / rh < ratio:  # too narrow: widen
        want = min(round(rh * ratio), image_w)
        x1 -= (want - rw) // 2
        x2 = x1 + want
        if x1 < 0:
            x2 -= x1
            x1 = 0
        if x2 > image_w:
            x1 -= x2 - image_w
            x2 = image_w
        x1 = max(x1, 0)
    else:  # too flat: heighten
        want = min(round(rw / ratio), image_h)
        y1 -= (want - rh) // 2
        y2 = y1 + want
        if y1 < 0:
            y2 -= y1
            y1 = 0
        if y2 > image_h:
            y1 -= y2 - image_h
            y2 = image_h
        y1 = max(y1, 0)
    return x1, y1, x2, y2


def fill(image, mask):
    """The masked area filled with the colors around it (A1111's "fill"): the unmasked pixels,
    blurred at falling radii, laid over it from the widest blur to none."""
    import numpy as np
    from PIL import Image, ImageFilter

    keep = 255 - np.asarray(mask.convert("L"), dtype=np.float32)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = rgb.copy()
    premultiplied = Image.fromarray(np.dstack([rgb * keep[..., None] / 255, keep]).clip(0, 255).astype(np.uint8), "RGBA")
    layers = [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]
    for radius, repeats in layers:
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied
        b = np.asarray(blurred, dtype=np.float32)
        alpha = b[..., 3:4] / 255
        color = np.where(alpha > 0, b[..., :3] / np.maximum(alpha, 1e-6), 0)
        for _ in range(repeats):
            out = color * alpha + out * (1 - alpha)
    return Image.fromarray(out.clip(0, 255).round().astype(np.uint8))


def prepare(init_images: list[Any], mask_image, width: int, height: int, opts: InpaintOptions, resize_mode: int = 0,
            upscale=None) -> Prepared:
    """A1111's img2img init with a mask: the images and mask to generate from, and the overlays."""
    from PIL import Image, ImageOps

    mask = binary_mask(mask_image)
    if opts.invert:
        mask = ImageOps.invert(mask)
    mask = blur(mask, opts.mask_blur_x, opts.mask_blur_y)
    paste_to = region = None
    original_size = None
    if opts.full_res:
        overlay_mask = mask
        region = expand_to_ratio(crop_region(mask, opts.full_res_padding), width, height, mask.width, mask.height)
        x1, y1, x2, y2 = region
        latent_mask = resize_image(2, mask.crop(region), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        original_size = mask.size
    else:
        latent_mask = resize_image(resize_mode, mask, width, height)
        overlay_mask = latent_mask.point(lambda v: min(255, v * 2))
    images, overlays = [], []
    for img in init_images:
        image = flatten(img)
        if region is None and resize_mode != 3:
            image = resize_image(resize_mode, image, width, height, upscale)
        elif region is None:
            image = image.resize((width, height), Image.LANCZOS)
        overlay = image.convert("RGBA")
        overlay.putalpha(ImageOps.invert(overlay_mask.resize(image.size)))
        overlays.append(overlay)
        if region is not None:
            image = resize_image(2, image.crop(region), width, height)
        if opts.inpainting_fill == 0:
            image = fill(image, latent_mask)
        images.append(image)
    return Prepared(images=images, mask=latent_mask, overlays=overlays, paste_to=paste_to, original_size=original_size)


def paste_back(result, overlay, paste_to):
    """The generated image in place over the original: outside the mask, the original's pixels."""
    from PIL import Image

    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(result.resize((w, h), Image.LANCZOS), (x, y))
        result = base
    elif result.size != overlay.size:
        result = result.resize(overlay.size, Image.LANCZOS)
    out = result.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")


def latent_mask_tensor(mask, latent_h: int, latent_w: int, device, dtype):
    """The mask at latent size, rounded to 0/1 (1 = to generate), as A1111 makes it."""
    import numpy as np
    import torch
    from PIL import Image

    small = np.asarray(mask.convert("L").resize((latent_w, latent_h), Image.BICUBIC), dtype=np.float32) / 255
    return torch.from_numpy(np.around(small))[None, None].to(device, dtype)
