"""The ControlNet models under models/ControlNet, as the extension lists and finds them, and how they load.

A model is a single file (.safetensors / .pth / .pt / .ckpt, the original layout users
download) or a diffusers folder (config.json + weights). Listed as "name [hash]" (A1111's
short hash of a file), found by that title, by name (any case), or as the extension does, by
the shortest name containing what was asked ("canny").
A single file loads with diffusers' own conversion and a config written here, offline: the
base model's UNet shapes the ControlNet (as ControlNetModel.from_unet does) and the file's
hint block gives its conditioning channels; a file for another architecture is a clear 422.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoints
from ..models.types import RequestError

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
KEEP_LOADED = 4  # ControlNets kept on the device per base model


@dataclass(frozen=True)
class ControlModel:
    name: str  # the file's stem, or the folder's name
    path: Path

    @property
    def is_file(self) -> bool:
        return self.path.is_file()

    @property
    def short_hash(self) -> str:
        if self.is_file:
            return checkpoints.short_hash(self.path) if self.path.stat().st_size > 0x100000 else _whole_hash(self.path)
        config = self.path / "config.json"
        return hashlib.sha256(config.read_bytes() if config.exists() else str(self.path).encode()).hexdigest()[:8]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]"


def _whole_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


class ControlCatalog:
    def __init__(self, folder: Path):
        self.folder = folder

    def list(self) -> list[ControlModel]:
        if not self.folder.is_dir():
            return []
        found = [ControlModel(p.parent.name, p.parent)
                 for p in sorted(self.folder.rglob("config.json")) if p.parent != self.folder]
        folders = [m.path for m in found]
        for p in sorted(self.folder.rglob("*")):
            if p.suffix.lower() in SUFFIXES and p.is_file() and not any(f in p.parents for f in folders) \
                    and not any(part.startswith(".") for part in p.relative_to(self.folder).parts):
                found.append(ControlModel(p.stem, p))
        return sorted(found, key=lambda m: m.name.lower())

    def find(self, wanted: str, where: str = "model") -> ControlModel:
        models = self.list()
        for m in models:
            if wanted == m.title:
                return m
        search = wanted.split(" [")[0].strip().lower()
        for m in models:
            if search in (m.name.lower(), m.path.name.lower()):
                return m
        close = sorted((m for m in models if search and search in m.name.lower()), key=lambda m: len(m.name))
        if close:
            return close[0]
        valid = ", ".join(m.title for m in models) or f"none (put ControlNet models under {self.folder})"
        raise RequestError(f"{where}: ControlNet model {wanted!r} not found; models on this instance: {valid}")


# -- loading -----------------------------------------------------------------------------------


def _config_from_unet(unet, hint_channels: tuple[int, ...]) -> dict[str, Any]:
    """The ControlNet config ControlNetModel.from_unet gives for this UNet (built on the meta device: no memory)."""
    import torch
    from diffusers import ControlNetModel

    with torch.device("meta"):
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels, load_weights_from_unet=False)
    return {k: v for k, v in dict(cn.config).items() if not k.startswith("_")} | {"_class_name": "ControlNetModel"}


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    keys = checkpoints.CheckpointKeys(path)
    prefix = "control_model." if any(k.startswith("control_model.") for k in keys) else ""
    return {k[len(prefix):]: keys[k].shape for k in keys if k.startswith(prefix)}


def _check_fits(path: Path, shapes: dict[str, tuple[int, ...]], unet) -> tuple[int, ...]:
    """The hint block's channels; a 422 when the file is not a ControlNet of the base model's architecture."""
    if "input_hint_block.0.weight" not in shapes or "time_embed.0.weight" not in shapes:
        raise RequestError(f"model: {path.name} is not a ControlNet in the original layout (no input_hint_block); "
                           "T2I-Adapters, control-LoRAs and IP-Adapters are not supported on orch")
    channels = shapes.get("input_blocks.0.0.weight", (0,))[0]
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    cfg = unet.config
    if channels != cfg.block_out_channels[0] or (context is not None and context != cfg.cross_attention_dim):
        raise RequestError(f"model: {path.name} is a ControlNet for another architecture (width {channels}, context "
                           f"{context}) than the loaded model's (width {cfg.block_out_channels[0]}, context "
                           f"{cfg.cross_attention_dim}): pick one made for it (SD1.5 vs SDXL)")
    hint = sorted({(int(k.split(".")[1]), s[0]) for k, s in shapes.items()
                   if k.startswith("input_hint_block.") and k.endswith(".weight")})
    outs = [c for _, c in hint[:-1]]
    return tuple(dict.fromkeys(outs))


def load(model: ControlModel, unet, cache_dir: Path, dtype, device: str):
    """The ControlNetModel of a file or folder, on the device, in the base model's dtype. Never touches the network."""
    from diffusers import ControlNetModel

    try:
        if not model.is_file:
            net = ControlNetModel.from_pretrained(str(model.path), torch_dtype=dtype, local_files_only=True)
        else:
            hint = _check_fits(model.path, _file_shapes(model.path), unet)
            config = _config_from_unet(unet, hint)
            digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
            folder = cache_dir / f"controlnet-{digest}"
            if not (folder / "config.json").exists():
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump(config, f, default=str)
                os.replace(tmp, folder / "config.json")
            net = ControlNetModel.from_single_file(str(model.path), config=str(folder), torch_dtype=dtype,
                                                   local_files_only=True)
    except RequestError:
        raise
    except Exception as e:
        raise RequestError(f"model: {model.path.name} could not be loaded as a ControlNet ({type(e).__name__}: "
                           f"{str(e)[:300]})") from None
    net.to(device)
    net.eval()
    if device == "cuda":
        import torch

        net.to(memory_format=torch.channels_last)
    log.info("loaded ControlNet %s", model.title)
    return net
