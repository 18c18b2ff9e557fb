"""Live previews (A1111's "Approx cheap"): the latents seen as colors through a fixed 4x3 matrix.

No weights and no VAE: a matrix product at latent size every N steps. The copy to the host
is asynchronous (pinned memory and a CUDA event), so the GPU never waits for a preview; the
image is built only when /progress asks for it.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

# Latent channel -> RGB contributions, SD1.x/2.x and SDXL latent spaces (A1111's cheap approximation).
SD15 = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))


class Preview:
    """The latest preview of the running job: latents copied off the GPU, turned into a PNG on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: tuple[Any, Any] | None = None  # (host tensor, CUDA event or None)
        self._png: str | None = None
        self.step = 0

    def clear(self) -> None:
        with self._lock:
            self._pending, self._png, self.step = None, None, 0

    def capture(self, latents, sdxl: bool, step: int) -> None:
        """The first image's latents as RGB in [0, 1] (computed on the latents' device, copied without waiting)."""
        import torch

        coefs = torch.tensor(SDXL if sdxl else SD15, dtype=torch.float32, device=latents.device)
        rgb = torch.einsum("lxy,lr->rxy", latents[0].float(), coefs)
        rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
        if rgb.is_cuda:
            host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = rgb.clone(), None
        with self._lock:
            self._pending, self._png, self.step = (host, event), None, step

    def png_base64(self) -> str | None:
        with self._lock:
            pending, png = self._pending, self._png
        if png is not None or pending is None:
            return png
        host, event = pending
        if event is not None:
            event.synchronize()
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(host.numpy()).save(buf, format="PNG")
        png = base64.b64encode(buf.getvalue()).decode()
        with self._lock:
            if self._pending is pending:
                self._png = png
        return png
