"""ModelManager: the one object the server asks for models and images.

A facade over the catalog (what is on disk), loading, residency (what is loaded), the
compiler and the runner. load() and generate_batch() run on the engine's worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .. import lora
from .batching import generate_batch
from .catalog import Catalog, ModelEntry
from .loading import load_pipeline, load_vae, vae_in_float32
from .optimize import Compiler, optimize
from .residency import LoadedModel, Residency
from .run import run
from ..upscalers import Upscalers
from .types import GenerationRequest, GenerationResult, RequestError, pick_device

log = logging.getLogger(__name__)


class ModelManager:
    """Finds and loads models, and generates with them."""

    def __init__(self, models_dir: Path, device: str | None = None, compile: bool | None = None,
                 max_resident: int = 3, precompiled_dir: Path | None = None, compile_backend: str = "inductor",
                 cudnn_benchmark: bool = False):
        self.models_dir = models_dir
        self.catalog = Catalog(models_dir)
        self.config_cache = models_dir / ".orch-configs"
        self.loras = lora.LoraLibrary(models_dir / "Lora")
        self.residency = Residency(max_resident)
        self.upscalers = Upscalers(models_dir)
        self.compiler = Compiler(enabled=compile, backend=compile_backend, precompiled_dir=precompiled_dir)
        self.cudnn_benchmark = cudnn_benchmark
        self._device = device
        self.last_phases: dict[str, float] = {}

    # -- what is on disk (catalog.py) ----------------------------------------------------------

    def list_models(self) -> list[ModelEntry]:
        return self.catalog.list_models()

    def vae_files(self) -> list[Path]:
        return self.catalog.vae_files()

    def find(self, name: str) -> ModelEntry:
        return self.catalog.find(name)

    def find_vae(self, choice: str | None, entry: ModelEntry | None) -> Path | None:
        return self.catalog.find_vae(choice, entry)

    def default_entry(self) -> ModelEntry:
        return self.catalog.default_entry()

    def prefetch_default(self):
        return self.catalog.prefetch_default(self.precompiled_dir)

    @property
    def precompiled_dir(self) -> Path | None:
        return self.compiler.precompiled_dir

    # -- what is loaded (residency.py, loading.py) ---------------------------------------------

    @property
    def current(self) -> LoadedModel | None:
        return self.residency.current

    @property
    def resident(self) -> list[LoadedModel]:
        return self.residency.models

    @property
    def max_resident(self) -> int:
        return self.residency.max_resident

    @max_resident.setter
    def max_resident(self, value: int) -> None:
        self.residency.max_resident = value

    @property
    def load_times(self) -> dict[str, float]:
        return self.residency.load_times

    def load(self, name: str | None = None) -> LoadedModel:
        current = self.residency.current
        entry = self.find(name) if name else (current.entry if current else self.default_entry())
        resident = self.residency.get(entry)
        if resident is not None:
            return resident
        import torch

        if self._device:
            device, dtype = self._device, torch.float16 if self._device == "cuda" else torch.float32
        else:
            device, dtype = pick_device()

        def build() -> LoadedModel:
            pipe, architecture = load_pipeline(entry, device, dtype, self.config_cache)
            if device == "cuda":
                optimize(pipe, self.cudnn_benchmark)
            return LoadedModel(entry=entry, pipeline=pipe, scheduler_config=dict(pipe.scheduler.config), device=device,
                               load_seconds=0.0, architecture=architecture, builtin_vae=pipe.vae, upscalers=self.upscalers)

        return self.residency.load(entry, device, build)

    def use_vae(self, model: LoadedModel, choice: str | None) -> None:
        """Put the chosen VAE into the model's pipeline (loaded once, kept with the model)."""
        path = self.find_vae(choice, model.entry)
        if path == model.vae_path:
            return
        if path is None:
            vae = model.builtin_vae
        else:
            vae = model.vaes.get(str(path))
            if vae is None:
                vae = load_vae(path, model.builtin_vae, model.pipeline, model.device, self.config_cache)
                if model.compiled:
                    self.compiler.compile_vae_decode(model, vae)  # compiles (or loads) at its first use
                model.vaes[str(path)] = vae
        model.pipeline.vae = vae
        model.vae_path = path

    # -- compiling (optimize.py) ---------------------------------------------------------------

    def compile_enabled(self, model: LoadedModel) -> bool:
        return self.compiler.enabled_for(model)

    def compile(self, model: LoadedModel) -> None:
        self.compiler.compile(model)

    def warm_up(self, sizes: list[tuple[int, int]], batches: list[int]) -> float:
        """Run each (size, batch) once so compiling happens at boot, not on a user's request."""
        started = time.monotonic()
        model = self.current or self.load()
        for width, height in sizes:
            for batch in batches:
                # Batches decode image by image (DecodeStream), as user batches do: no batch-size VAE graph.
                run(model, GenerationRequest(prompt="warm-up", steps=2, width=width, height=height, batch_size=batch),
                    ["warm-up"] * batch, [""] * batch, list(range(batch)), None,
                    on_image=(lambda i, image: None) if batch > 1 else None)
        return time.monotonic() - started

    # -- generating (batching.py, run.py) ------------------------------------------------------

    def generate_batch(self, requests: list[GenerationRequest], engine=None, model_name: str | None = None,
                       kind: str = "txt2img", answer: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Several compatible requests as few pipeline calls as possible (at most the engine's max_batch images each).

        With `answer`, each request's result is also passed to it as soon as its images are
        decoded (answer(request_index, result)), before the batch ends."""
        model = self.load(model_name)
        head = requests[0]
        if model.inpainting and kind != "inpaint":
            raise RequestError(f"sd_model_checkpoint: {model.entry.name} is an inpainting model: use img2img with a mask, "
                               "or choose another model")
        # Requests in one batch share these (the engine's batch key includes them).
        self.use_vae(model, head.vae)
        try:
            lora.apply(model.pipeline, model.lora, self.loras, head.loras)
        except lora.LoraError as e:
            raise RequestError(str(e)) from None
        results, self.last_phases = generate_batch(model, requests, engine, kind, answer)
        return results

    def generate(self, req: GenerationRequest, model: LoadedModel | None = None) -> GenerationResult:
        """One request, run directly (tests and scripts; the server goes through the engine)."""
        return self.generate_batch([req], None, model.entry.name if model else None)[0]


__all__ = ["ModelManager", "vae_in_float32"]
