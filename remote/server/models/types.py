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


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32
