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
    """Finds and loads models. load() and generate() run on the engine's worker thread."""

    def __init__(self, models_dir: Path, device: str | None = None, compile: bool | None = None):
        self.models_dir = models_dir
        self._loaded: LoadedModel | None = None
        self._device = device
        env = os.environ.get("ORCH_COMPILE")
        self._compile = compile if compile is not None else (env != "0" if env is not None else None)
        self.load_times: dict[str, float] = {}
        self.compiling = False

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
        entry = self.find(name) if name else (self._loaded.entry if self._loaded else self.default_entry())
        if self._loaded and self._loaded.entry.path == entry.path:
            return self._loaded
        import torch
        from diffusers import DiffusionPipeline

        device, dtype = (self._device, torch.float16 if self._device == "cuda" else torch.float32) if self._device else pick_device()
        started = time.monotonic()
        # The previous model goes first: two resident SDXLs may not fit.
        self._loaded = None
        if device == "cuda":
            torch.cuda.empty_cache()
        pipe = DiffusionPipeline.from_pretrained(entry.path, torch_dtype=dtype, local_files_only=True)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
        if device == "cuda":
            self._optimize(pipe)
        self._loaded = LoadedModel(entry=entry, pipeline=pipe, scheduler_config=dict(pipe.scheduler.config), device=device,
                                   load_seconds=time.monotonic() - started)
        self.load_times[entry.name] = self._loaded.load_seconds
        log.info("loaded %s on %s in %.1fs", entry.name, device, self._loaded.load_seconds)
        return self._loaded

    def _optimize(self, pipe) -> None:
        """fp16 + SDPA are already on; add channels_last, fused QKV and torch.compile."""
        import torch

        torch.backends.cudnn.benchmark = True
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        try:
            pipe.fuse_qkv_projections()
        except Exception as e:  # not every pipeline or attention processor supports it
            log.info("fused QKV not available: %s", e)
        if self._compile is not False:
            self.compiling = True
            torch._inductor.config.conv_1x1_as_mm = True
            # reduce-overhead: CUDA graphs remove the per-kernel launch cost that dominates
            # SD at batch 1. (max-autotune compiled for minutes without finishing.)
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead")

    def warm_up(self, sizes: list[tuple[int, int]], batches: list[int]) -> float:
        """Run each (size, batch) once so compiling happens at boot, not on a user's request."""
        started = time.monotonic()
        model = self._loaded or self.load()
        for width, height in sizes:
            for batch in batches:
                self._run(model, GenerationRequest(prompt="warm-up", steps=2, width=width, height=height, batch_size=batch),
                          ["warm-up"] * batch, [""] * batch, list(range(batch)), None)
        return time.monotonic() - started

    def _pipeline_for(self, model: LoadedModel, spec, schedule: str, kind: str = "txt2img"):
        """The model's components with a fresh scheduler: shared weights, private sampler state."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        scheduler = samplers.make_scheduler(model.scheduler_config, spec, schedule)
        base = model.pipeline
        if kind == "txt2img":
            pipe = base.__class__(**{**base.components, "scheduler": scheduler})
        elif kind == "img2img":
            pipe = AutoPipelineForImage2Image.from_pipe(base, scheduler=scheduler)
        else:
            pipe = AutoPipelineForInpainting.from_pipe(base, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _run(self, model: LoadedModel, req: GenerationRequest, prompts: list[str], negatives: list[str], seeds: list[int],
             engine, kind: str = "txt2img", extra: dict[str, Any] | None = None) -> list[Any]:
        import torch

        spec, schedule = samplers.resolve(req.sampler_name, req.scheduler)
        pipe = self._pipeline_for(model, spec, schedule, kind)
        steps = req.steps

        def on_step(p, i, t, kwargs):
            if engine is not None and engine.step(i + 1, steps):
                p._interrupt = True  # skip the remaining steps; what is done so far is decoded
            return kwargs

        # CPU generators: the same seed gives the same image on any device, as in A1111.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        args: dict[str, Any] = dict(
            prompt=prompts, negative_prompt=negatives if any(negatives) else None, num_inference_steps=steps,
            guidance_scale=req.cfg_scale, generator=generators, callback_on_step_end=on_step,
        )
        if kind == "txt2img":
            args.update(width=req.width, height=req.height)
        args.update(extra or {})
        with torch.inference_mode():
            return list(pipe(**args).images)

    def generate_batch(self, requests: list[GenerationRequest], engine=None, model_name: str | None = None,
                       kind: str = "txt2img", extra: dict[str, Any] | None = None) -> list[GenerationResult]:
        """Several compatible requests as few pipeline calls as possible (at most max_batch images each)."""
        model = self.load(model_name)
        head = requests[0]
        spec, schedule = samplers.resolve(head.sampler_name, head.scheduler)
        per_request_seeds = []
        flat: list[tuple[int, str, str, int]] = []
        for r_index, req in enumerate(requests):
            first = random.randint(0, MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
            seeds = [(first + i) % (MAX_SEED + 1) for i in range(req.batch_size * req.n_iter)]
            per_request_seeds.append(seeds)
            flat.extend((r_index, req.prompt, req.negative_prompt, s) for s in seeds)
        max_batch = getattr(engine, "max_batch", 8) if engine is not None else 8
        pad_to = getattr(engine, "pad_to", None) if engine is not None else None
        started = time.monotonic()
        images: list[Any] = []
        for i in range(0, len(flat), max_batch):
            chunk = flat[i : i + max_batch]
            # Padding to a compiled batch size; the padded images are dropped.
            padding = [(0, "", "", 0)] * (pad_to - len(chunk)) if pad_to and len(chunk) < pad_to and kind == "txt2img" else []
            out = self._run(model, head, [c[1] for c in chunk + padding], [c[2] for c in chunk + padding],
                            [c[3] for c in chunk + padding], engine, kind, extra)
            images.extend(out[: len(chunk)])
        seconds = time.monotonic() - started
        results = []
        cursor = 0
        for req, seeds in zip(requests, per_request_seeds):
            mine = images[cursor : cursor + len(seeds)]
            cursor += len(seeds)
            infotexts = [format_infotext(req, s, spec.name, schedule, model.entry) for s in seeds]
            results.append(GenerationResult(images=mine, seeds=seeds, infotexts=infotexts, sampler_name=spec.name,
                                            schedule=schedule, model=model.entry, seconds=seconds,
                                            extra={"batch_images": len(flat)}))
        return results

    def generate(self, req: GenerationRequest, model: LoadedModel | None = None) -> GenerationResult:
        """One request, run directly (tests and scripts; the server goes through the engine)."""
        return self.generate_batch([req], None, model.entry.name if model else None)[0]
