"""Which models are loaded: several stay resident, least recently used first out.

A1111's sd_checkpoints_limit; on a GPU fewer when memory runs short for the next one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoints, lora
from ..prompt_cache import PromptCache
from .catalog import ModelEntry

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    entry: ModelEntry
    pipeline: Any
    scheduler_config: dict[str, Any]
    device: str
    load_seconds: float
    architecture: checkpoints.Architecture | None = None
    builtin_vae: Any = None
    vae_path: Path | None = None  # the override in use; None: the model's own VAE
    vaes: dict[str, Any] = field(default_factory=dict)  # overrides loaded for this model, by path
    lora: lora.LoraState = field(default_factory=lora.LoraState)
    compiled: bool = False  # the pipeline runs the compiled UNet and VAE decoder
    graph_pool: Any = None  # CUDA graph memory pool shared by the model's precompiled graphs
    prompts: PromptCache = field(default_factory=PromptCache)  # text-encoder outputs of recent prompts
    pipelines: dict[str, Any] = field(default_factory=dict)  # kind -> the pipeline object requests reuse
    upscalers: Any = None  # upscalers.Upscalers, for the hires fix
    clip_skip: int = 1  # of the call running now (the prompt cache keys on it)

    @property
    def inpainting(self) -> bool:
        return int(self.pipeline.unet.config.in_channels) == 9


class Residency:
    """The loaded models by path, least recently used first; `current` is the last one used."""

    def __init__(self, max_resident: int = 3):
        self.max_resident = max_resident
        self.current: LoadedModel | None = None
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()
        self.load_times: dict[str, float] = {}

    @property
    def models(self) -> list[LoadedModel]:
        return list(self._resident.values())

    def get(self, entry: ModelEntry) -> LoadedModel | None:
        """The entry's model if resident (it becomes the current and most recent one)."""
        key = str(entry.path)
        if key not in self._resident:
            return None
        self._resident.move_to_end(key)
        self.current = self._resident[key]
        while len(self._resident) > max(1, self.max_resident):  # the limit may have been lowered
            self.evict()
        return self.current

    def load(self, entry: ModelEntry, device: str, build: Callable[[], LoadedModel]) -> LoadedModel:
        """Make room for the entry, build it, keep it resident; the current model from now on."""
        self._make_room(entry, device)
        started = time.monotonic()
        loaded = build()
        loaded.load_seconds = time.monotonic() - started
        self._resident[str(entry.path)] = loaded
        self.current = loaded
        self.load_times[entry.name] = loaded.load_seconds
        log.info("loaded %s on %s in %.1fs (%d resident)", entry.name, device, loaded.load_seconds, len(self._resident))
        return loaded

    def _make_room(self, entry: ModelEntry, device: str) -> None:
        """Unload least recently used models: over the count limit, or (GPU) short of memory for this one."""
        while self._resident and len(self._resident) >= max(1, self.max_resident):
            self.evict()
        if device != "cuda":
            return
        import torch

        need = int(entry.size_bytes() * 1.1) + (3 << 30)  # weights + room to generate
        while self._resident:
            free, _ = torch.cuda.mem_get_info()
            free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
            if free >= need:
                break
            self.evict()

    def evict(self) -> None:
        key, old = self._resident.popitem(last=False)
        if self.current is old:
            self.current = None
        log.info("unloading %s to make room", old.entry.name)
        del old
        free_memory()


def free_memory() -> None:
    """Give cached GPU memory back after a model left or a request ran out of memory."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
