"""The hires fix, as A1111 does it: a first pass at width x height, an upscale, a second pass.

The second pass is img2img at denoising_strength on the upscaled image, with its own steps
(hr_second_pass_steps, else steps), sampler and schedule (hr_sampler_name, hr_scheduler) and
prompts (hr_prompt, hr_negative_prompt). Latent upscalers resize the first pass's latents;
the others decode it, upscale the pixels and encode them again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HiresPlan:
    upscaler: str  # a latent mode or an upscaler name
    target_width: int  # the size the upscale reaches
    target_height: int
    truncate_x: int = 0  # latent columns / rows cropped when hr_resize_x and _y both set another aspect ratio
    truncate_y: int = 0
    steps: int = 0  # 0: the first pass's steps
    sampler_name: str | None = None  # None: the first pass's
    scheduler: str | None = None
    prompt: str | None = None  # None: the first pass's
    negative_prompt: str | None = None
    denoising_strength: float = 0.7

    @property
    def final_width(self) -> int:
        return self.target_width - self.truncate_x * 8

    @property
    def final_height(self) -> int:
        return self.target_height - self.truncate_y * 8


def target_size(width: int, height: int, hr_scale: float, hr_resize_x: int, hr_resize_y: int) -> tuple[int, int, int, int]:
    """(upscale_to_x, upscale_to_y, truncate_x, truncate_y), A1111's calculate_target_resolution."""
    if hr_resize_x == 0 and hr_resize_y == 0:
        return int(width * hr_scale), int(height * hr_scale), 0, 0
    if hr_resize_y == 0:
        return hr_resize_x, hr_resize_x * height // width, 0, 0
    if hr_resize_x == 0:
        return hr_resize_y * width // height, hr_resize_y, 0, 0
    if width / height < hr_resize_x / hr_resize_y:
        to_x, to_y = hr_resize_x, hr_resize_x * height // width
    else:
        to_x, to_y = hr_resize_y * width // height, hr_resize_y
    return to_x, to_y, (to_x - hr_resize_x) // 8, (to_y - hr_resize_y) // 8


def upscale_latents(latents, plan: HiresPlan):
    import torch

    from .upscalers import LATENT_MODES

    mode, antialias = LATENT_MODES[plan.upscaler]
    size = (plan.target_height // 8, plan.target_width // 8)
    out = torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, antialias=antialias).to(latents.dtype)
    return crop_latents(out, plan)


def crop_latents(latents, plan: HiresPlan):
    ty, tx = plan.truncate_y, plan.truncate_x
    if not (ty or tx):
        return latents
    return latents[:, :, ty // 2:latents.shape[2] - (ty + 1) // 2, tx // 2:latents.shape[3] - (tx + 1) // 2]
