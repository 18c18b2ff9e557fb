"""Models on the instance: find them, load them, generate with them.

A model is a diffusers folder (with model_index.json) under the models directory. When
there is none, the demo model (a tiny random-weight pipeline built locally) is served,
and every answer says so. Loading never touches the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import samplers
from .demo_model import DEMO_MODEL_NAME, ensure_demo_model

log = logging.getLogger("orch.server")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

MAX_SEED = 2**32 - 1


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    is_demo: bool = False

    @property
    def short_hash(self) -> str:
        """A stable short id, like A1111's 10-hex model hash (here of the folder's index)."""
        index = self.path / "model_index.json"
        data = index.read_bytes() if index.exists() else str(self.path).encode()
        return hashlib.sha256(data).hexdigest()[:10]


@dataclass
class LoadedModel:
    entry: ModelEntry
    pipeline: Any
    scheduler_config: dict[str, Any]
    device: str
    load_seconds: float


@dataclass(frozen=True)
class GenerationRequest:
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


@dataclass
class GenerationResult:
    images: list[Any]
    seeds: list[int]
    infotexts: list[str]
    sampler_name: str
    schedule: str
    model: ModelEntry
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def format_infotext(req: GenerationRequest, seed: int, sampler: str, schedule: str, model: ModelEntry) -> str:
    """A1111's `parameters` text: prompt, negative prompt line, then 'Key: value' pairs."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    pairs = [
        ("Steps", req.steps),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", f"{req.cfg_scale:g}"),
        ("Seed", seed),
        ("Size", f"{req.width}x{req.height}"),
        ("Model hash", model.short_hash),
        ("Model", model.name),
        ("Version", "orch"),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs))
    return "\n".join(lines)


class ModelManager:
    def __init__(self, models_dir: Path, device: str | None = None):
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._device = device

    def list_models(self) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        if self.models_dir.exists():
            for index in sorted(self.models_dir.glob("**/model_index.json")):
                folder = index.parent
                if any(part.startswith(".") for part in folder.relative_to(self.models_dir).parts):
                    continue  # a model being written (temporary folder)
                name = str(folder.relative_to(self.models_dir))
                entries.append(ModelEntry(name=name, path=folder, is_demo=name == DEMO_MODEL_NAME))
        return entries

    def default_entry(self) -> ModelEntry:
        real = [e for e in self.list_models() if not e.is_demo]
        if real:
            return real[0]
        path = ensure_demo_model(self.models_dir)
        log.warning("no model in %s: serving the demo model %s (tiny random weights; its images are noise)", self.models_dir, DEMO_MODEL_NAME)
        return ModelEntry(name=DEMO_MODEL_NAME, path=path, is_demo=True)

    def find(self, name: str) -> ModelEntry:
        wanted = name.split(" [")[0].strip()  # A1111 titles look like "name [hash]"
        for entry in self.list_models():
            if entry.name == wanted or entry.path.name == wanted:
                return entry
        if wanted == DEMO_MODEL_NAME:
            return ModelEntry(name=DEMO_MODEL_NAME, path=ensure_demo_model(self.models_dir), is_demo=True)
        valid = ", ".join(e.name for e in self.list_models()) or "(none)"
        raise ModelNotFound(f"unknown model {name!r}; models on this instance: {valid}")

    @property
    def current(self) -> LoadedModel | None:
        return self._loaded

    def load(self, name: str | None = None) -> LoadedModel:
        entry = self.find(name) if name else self.default_entry()
        with self._lock:
            if self._loaded and self._loaded.entry.path == entry.path:
                return self._loaded
            import torch
            from diffusers import DiffusionPipeline

            device, dtype = (self._device, torch.float32) if self._device else pick_device()
            started = time.monotonic()
            pipe = DiffusionPipeline.from_pretrained(entry.path, torch_dtype=dtype, local_files_only=True)
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            if hasattr(pipe, "safety_checker"):
                pipe.safety_checker = None
            previous, self._loaded = self._loaded, LoadedModel(
                entry=entry,
                pipeline=pipe,
                scheduler_config=dict(pipe.scheduler.config),
                device=device,
                load_seconds=time.monotonic() - started,
            )
            del previous
            if device == "cuda":
                torch.cuda.empty_cache()
            log.info("loaded %s on %s in %.1fs", entry.name, device, self._loaded.load_seconds)
            return self._loaded

    def generate(self, req: GenerationRequest, model: LoadedModel | None = None) -> GenerationResult:
        import torch

        model = model or self._loaded or self.load()
        spec, schedule = samplers.resolve(req.sampler_name, req.scheduler)
        first_seed = random.randint(0, MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
        total = req.batch_size * req.n_iter
        seeds = [(first_seed + i) % (MAX_SEED + 1) for i in range(total)]
        # Components are shared, the scheduler is not: one per request.
        pipe = model.pipeline.__class__(**{**model.pipeline.components, "scheduler": samplers.make_scheduler(model.scheduler_config, spec, schedule)})
        pipe.set_progress_bar_config(disable=True)
        started = time.monotonic()
        images = []
        for it in range(req.n_iter):
            batch_seeds = seeds[it * req.batch_size : (it + 1) * req.batch_size]
            # CPU generators: the same seed gives the same image on any device, as in A1111.
            generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
            with torch.inference_mode():
                out = pipe(
                    prompt=[req.prompt] * len(batch_seeds),
                    negative_prompt=[req.negative_prompt] * len(batch_seeds) if req.negative_prompt else None,
                    num_inference_steps=req.steps,
                    guidance_scale=req.cfg_scale,
                    width=req.width,
                    height=req.height,
                    generator=generators,
                )
            images.extend(out.images)
        infotexts = [format_infotext(req, s, spec.name, schedule, model.entry) for s in seeds]
        return GenerationResult(
            images=images,
            seeds=seeds,
            infotexts=infotexts,
            sampler_name=spec.name,
            schedule=schedule,
            model=model.entry,
            seconds=time.monotonic() - started,
        )
