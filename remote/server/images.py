"""Image preparation as A1111 does it: flatten transparency, resize by resize_mode."""

from __future__ import annotations

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}


def flatten(img, background: str = "#ffffff"):
    """RGB, with transparent parts on the background color (A1111's img2img_background_color)."""
    from PIL import Image

    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info) or img.mode == "LA":
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background)
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return img.convert("RGB")


def resize_image(mode: int, im, width: int, height: int, upscale=None):
    """A1111's resize modes: 0 just resize, 1 crop and resize (fill the frame, crop the excess),
    2 resize and fill (fit inside, stretch the edges into the gaps), 3 like 0 (the latent is
    resized later). `upscale(im, w, h)` does the resizing (default: Lanczos)."""
    from PIL import Image

    def resize(image, w, h):
        if upscale is not None and (w > image.width or h > image.height):
            return upscale(image, w, h)
        return image.resize((w, h), Image.LANCZOS)

    if mode in (0, 3):
        return resize(im, width, height)
    ratio = width / height
    src_ratio = im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, max(1, src_w), max(1, src_h))
        res = Image.new("RGB" if im.mode != "L" else "L", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = resize(im, max(1, src_w), max(1, src_h))
    res = Image.new("RGB" if im.mode != "L" else "L", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:  # bands above and below: stretch the first and last rows
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio:  # bands left and right: stretch the first and last columns
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return res
