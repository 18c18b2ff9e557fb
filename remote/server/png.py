"""PNG encoding on several cores: what the client waits for after the GPU is done.

Pillow deflates a whole image on one core (25-45 ms for 512x512 that does not compress,
such as noise or detailed photos), which at batch 1 is a sixth of the request. Here rows are
filtered with numpy (PNG's "Up" filter, which makes smooth images compress well), and bands
of rows are deflated side by side, pigz-style: each band ends on a full flush, so the bands
joined make one valid zlib stream. The deflate library (ISA-L, else zlib) releases the GIL
while it compresses.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
try:
    # Intel's ISA-L, zlib's API and format: a 512x512 band set deflates in ~1-2 ms where
    # zlib takes ~14 ms, with output as small or smaller (measured at level 1, noise and smooth
    # images). After a batch, eight PNGs were most of the time the GPU waited for its clients.
    from isal import isal_zlib as _zlib
except ImportError:  # not installed: zlib, slower, same bytes on the wire format
    _zlib = zlib

_BAND_BYTES = 1 << 17  # a band per ~128 KiB of filtered rows
# A batch's PNGs are encoded at once (8 images of 512x512 took 64 ms on 8 threads of a
# 16-core host, 17 ms for one): a thread per core.
_pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 8), thread_name_prefix="deflate")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def text_chunk(key: str, text: str) -> bytes:
    """tEXt when Latin-1 can hold it (what A1111 writes), else iTXt (UTF-8), as Pillow chooses."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def _deflate(band: bytes, level: int, last: bool) -> bytes:
    c = _zlib.compressobj(level, _zlib.DEFLATED, -15)  # raw deflate: one zlib header for the whole stream
    return c.compress(band) + c.flush(_zlib.Z_FINISH if last else _zlib.Z_FULL_FLUSH)


def encode_png(pixels, text: dict[str, str] | None = None, level: int = 1) -> bytes:
    """An 8-bit RGB/RGBA/L PNG of `pixels` (H x W [x C] uint8 array, or a PIL image) with text chunks."""
    import numpy as np

    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        raise ValueError(f"encode_png wants uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    height, width, channels = a.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = a.reshape(height, width * channels)
    # "Up" filter: each row minus the row above (the first row against zeros), uint8 wrap-around.
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    raw = filtered.tobytes()
    row_bytes = filtered.shape[1]
    band_rows = max(1, _BAND_BYTES // row_bytes)
    bands = [raw[i * row_bytes:(i + band_rows) * row_bytes] for i in range(0, height, band_rows)]
    if len(bands) == 1:
        body = _deflate(bands[0], level, True)
    else:
        body = b"".join(_pool.map(lambda ib: _deflate(ib[1], level, ib[0] == len(bands) - 1), enumerate(bands)))
    stream = b"\x78\x01" + body + struct.pack(">I", _zlib.adler32(raw) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    parts = [_SIGNATURE, _chunk(b"IHDR", header)]
    parts += [text_chunk(k, v) for k, v in (text or {}).items()]
    parts += [_chunk(b"IDAT", stream), _chunk(b"IEND", b"")]
    return b"".join(parts)
