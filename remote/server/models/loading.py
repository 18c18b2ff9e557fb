"""Turning files into pipelines on a device: checkpoints, VAE overrides. Never touches the network."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .. import checkpoints
from .catalog import ModelEntry
from .types import RequestError

log = logging.getLogger(__name__)


def load_pipeline(entry: ModelEntry, device: str, dtype, config_cache: Path) -> tuple[Any, checkpoints.Architecture | None]:
    """The entry's pipeline on `device`, ready to serve (no safety checker, the VAE's precision settled)."""
    architecture = None
    if entry.is_file:
        try:
            pipe, architecture = checkpoints.load_single_file(entry.path, config_cache, dtype)
        except checkpoints.UnsupportedCheckpoint as e:
            raise RequestError(f"sd_model_checkpoint: {e}") from None
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(entry.path, torch_dtype=dtype, local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    vae_in_float32(pipe, pipe.vae)
    return pipe, architecture


def load_vae(path: Path, builtin_vae, pipe, device: str, config_cache: Path):
    """A VAE override from a file, shaped like the model's own VAE, on the model's device."""
    started = time.monotonic()
    try:
        vae = checkpoints.load_vae_file(path, builtin_vae.config, config_cache, builtin_vae.dtype)
    except Exception as e:
        raise RequestError(f"sd_vae: {path.name} could not be loaded as this model's VAE ({type(e).__name__}: {e})") from None
    vae.to(device)
    vae_in_float32(pipe, vae)
    if device == "cuda":
        import torch

        vae.to(memory_format=torch.channels_last)
    log.info("loaded VAE %s in %.1fs", path.name, time.monotonic() - started)
    return vae


def vae_in_float32(pipe, vae) -> None:
    """Keep a VAE that its pipeline would upcast in float32 once, and cast what it is given.

    SDXL pipelines decode (and encode) a float16 VAE marked `force_upcast` (the stock SDXL VAE
    overflows in float16) by converting it to float32 and back at every call: new weight
    tensors each time, so the compiled decoder's CUDA graph was captured again for every image.
    The same float32 weights and float32 decode, converted once (the one difference: the
    pipeline scales the latents before they reach the VAE, in float16 here: pixels within one
    8-bit level of diffusers' own).
    A VAE whose dtype differs from the UNet's for another reason (a VAE file loaded next to such
    a model) gets the same input cast."""
    import torch

    upcasts = hasattr(type(pipe), "upcast_vae")  # pipelines that honour force_upcast
    if upcasts and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae.to(torch.float32)
        vae.register_to_config(force_upcast=False)  # or the pipeline would convert it back to float16
    if vae.dtype == pipe.unet.dtype or getattr(vae, "orch_casts_inputs", False):
        return
    for name in ("encode", "decode"):
        method = getattr(vae, name)

        def cast_input(x, *args, _method=method, **kwargs):
            return _method(x.to(vae.dtype), *args, **kwargs)

        setattr(vae, name, cast_input)
    vae.orch_casts_inputs = True
