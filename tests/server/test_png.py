"""The server's own PNG encoder (parallel deflate): any decoder must read back the same pixels and text."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from remote.server import png
from remote.server.png import encode_png


@pytest.fixture(params=["isal", "zlib"], autouse=True)
def deflate_library(request, monkeypatch):
    """Every test runs with ISA-L (what the server uses when installed) and with zlib (its fallback)."""
    if request.param == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib")
        monkeypatch.setattr(png, "_zlib", isal_zlib)
    else:
        import zlib

        monkeypatch.setattr(png, "_zlib", zlib)
    return request.param


@pytest.mark.parametrize("shape", [(512, 512, 3), (1024, 768, 3), (77, 13, 3), (64, 64, 4), (40, 30, 1), (1, 1, 3)])
def test_pixels_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels, {"parameters": "a cat\nSteps: 2"})
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    img = Image.open(io.BytesIO(data))
    got = np.asarray(img)
    assert np.array_equal(got, pixels[:, :, 0] if shape[2] == 1 else pixels)
    assert img.info["parameters"] == "a cat\nSteps: 2"


def test_smooth_images_compress_and_unicode_text_survives():
    x = np.linspace(0, 255, 512)
    smooth = np.stack([np.add.outer(x, x) / 2] * 3, -1).astype(np.uint8)
    data = encode_png(Image.fromarray(smooth), {"parameters": "café, 猫 <lora:ink:0.5>"})
    assert len(data) < smooth.nbytes / 20  # the Up filter makes gradients cheap
    img = Image.open(io.BytesIO(data))
    assert img.info["parameters"] == "café, 猫 <lora:ink:0.5>"
    assert np.array_equal(np.asarray(img), smooth)


def test_wrong_pixel_type_is_an_error():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
