"""What a generation asks for and what it gives back, and the errors a request can meet.

Plain data, shared by the catalog, the runner and the HTTP layer above them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_SEED = 2**32 - 1


class ModelNotFound(LookupError):
    pass


class RequestError(ValueError):
    """A request this server cannot serve as asked (answered 422, naming the field)."""


class JobCancelled(Exception):
    """Every client of the running batch went away: the work stopped at the next step."""


@dataclass(frozen=True)
class ImageInputs:
    """What img2img starts from: the init images (one per image of a batch, repeated), and for
    inpainting the prepared mask and overlays (inpaint.Prepared)."""

    images: tuple[Any, ...]
    denoising_strength: float = 0.75
    resize_mode: int = 0
    inpaint: Any = None  # inpaint.Prepared
    inpainting_fill: int = 1


@dataclass(frozen=True)
class GenerationRequest:
    """One request, as the runner sees it (the HTTP layer has validated and resolved it)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    scheduler: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # from the prompt's <lora:name:weight> tags
    vae: str | None = None  # "Automatic", "None" or a file under models/VAE
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    clip_skip: int = 1  # A1111's CLIP_stop_at_last_layers: 1 = the last layer
    tiling: bool = False
    eta: float | None = None  # DDIM's eta
    hires: Any = None  # hires.HiresPlan when the request asks for the hires fix
    inputs: ImageInputs | None = None  # img2img and inpainting
    preview_every: int = 0  # live preview every N steps; 0: none
    extra_params: tuple[tuple[str, Any], ...] = ()  # further 'Key: value' pairs for the infotext

    @property
    def output_size(self) -> tuple[int, int]:
        if self.hires is not None:
            return self.hires.final_width, self.hires.final_height
        return self.width, self.height


@dataclass
class GenerationResult:
    images: list[Any]
    seeds: list[int]
    infotexts: list[str]
    sampler_name: str
    schedule: str
    model: Any  # catalog.ModelEntry
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    subseeds: list[int] = field(default_factory=list)
    vae_name: str | None = None
    vae_hash: str | None = None


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32
