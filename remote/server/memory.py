"""Will a request fit? A guard before any GPU work, so that a request too large for this
instance is a 422 that says so, not an out-of-memory half way (or a host swapping to death).

The estimate is deliberately simple and on the generous side: activations grow with the
pixels, the batch and the model's widths; weights are already resident. It refuses only
what clearly cannot fit; a request it lets through that still runs out of memory is a 503
and the server lives on.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Need:
    bytes: int
    where: str  # "GPU" or "RAM"


def estimate(unet_channels: int, vae_channels: int, dtype_bytes: int, width: int, height: int, batch: int,
             images: int, cfg: bool = True, decode_batch: int = 1) -> int:
    """Bytes a generation needs beyond the weights: UNet activations for a batch (twice with
    CFG), the VAE decoder's at full size for `decode_batch` images, and the images kept for the answer."""
    latent_px = (width // 8) * (height // 8)
    unet = latent_px * unet_channels * dtype_bytes * 96 * batch * (2 if cfg else 1)
    vae = width * height * vae_channels * 2 * dtype_bytes * 6 * decode_batch
    answer = images * width * height * 3 * 3  # pixels, PNG and base64 of every image of the request
    return unet + vae + answer


def available(device: str) -> int:
    """Bytes free for a request: GPU memory free plus what torch holds unused; RAM on the CPU."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    import psutil

    return psutil.virtual_memory().available


def check(model, width: int, height: int, batch: int, images: int, cfg: bool, decode_batch: int) -> str | None:
    """None if the request fits, else a sentence saying what it needs and what there is."""
    pipe = model.pipeline
    unet_channels = int(pipe.unet.config.block_out_channels[0])
    vae_channels = int(max(pipe.vae.config.block_out_channels[:2]))
    dtype_bytes = 2 if model.device == "cuda" else 4
    need = estimate(unet_channels, vae_channels, dtype_bytes, width, height, batch, images, cfg, decode_batch)
    have = available(model.device)
    if need <= have:
        return None
    where = "GPU memory" if model.device == "cuda" else "memory"
    return (f"needs about {need / GiB:.1f} GiB of {where} and this instance has {have / GiB:.1f} GiB free: "
            f"lower width/height, batch_size or n_iter (or hr_scale), or use a larger GPU")
