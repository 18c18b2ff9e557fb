"""txt2img batches decoded image by image, each image handed over as soon as it is on the host."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def to_8_bits(images):
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8 on the same device, the arithmetic of
    diffusers' PIL output (float32 x 255, rounded). Done on the GPU: a quarter of the bytes to
    copy and no float pass over the pixels on the CPU (~30 ms for eight 512x512 images)."""
    import torch

    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class DecodeStream:
    """During one txt2img call, the VAE decodes the batch image by image and each image is
    handed to `on_image` as soon as it is on the host, while the GPU decodes the next: its
    client gets its PNG while the rest of the batch decodes, instead of all eight clients
    encoding and receiving at once after the last. Image by image costs the GPU nothing more
    (SD1.5 on an H100: 8 x 7.8 ms vs 65.7 ms for a batch of 8). The pipeline still gets the
    whole batch back and finishes as usual; pixels are the same as its own (same ops)."""

    def __init__(self, pipe, on_image: Callable[[int, Any], None]):
        self.pipe = pipe
        self.vae = pipe.vae
        self.on_image = on_image
        self.images: dict[int, Any] = {}  # what the call returns: already converted, no second copy
        self.error: BaseException | None = None

    def __enter__(self):
        import queue

        self.decode = self.vae.decode
        self.vae.decode = self._decode
        self.handoff: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._deliver, name="decode-stream", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.vae.decode = self.decode
        self.handoff.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _decode(self, z, *args, **kwargs):
        import torch

        samples = []
        for i in range(z.shape[0]):
            out = self.decode(z[i : i + 1], *args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else out.sample
            samples.append(sample)
            pixels = to_8_bits(self.pipe.image_processor.denormalize(sample))  # as postprocess() does next
            if pixels.is_cuda:
                host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
                host.copy_(pixels, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                self.handoff.put((i, host, ready))
            else:
                self.handoff.put((i, pixels, None))
        sample = torch.cat(samples)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)

    def _deliver(self) -> None:
        from PIL import Image

        while (item := self.handoff.get()) is not None:
            i, pixels, ready = item
            try:
                if ready is not None:
                    ready.synchronize()
                if self.error is None:
                    self.images[i] = Image.fromarray(pixels[0].numpy())
                    self.on_image(i, self.images[i])
            except BaseException as e:  # raised on the worker when the call ends
                self.error = e
