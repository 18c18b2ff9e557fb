"""Models on the instance: find them, load them, keep several resident, generate with them.

A model is a diffusers folder (with model_index.json) or a single-file checkpoint
(.safetensors / .ckpt, as A1111 users have them; see checkpoints.py) under the models
directory. When there is none, the demo model (a tiny random-weight pipeline built
locally) is served, and every answer says so. Loading never touches the network.
Layout, as A1111's: models/Lora for LoRAs, models/VAE for VAE overrides.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections import OrderedDict
from typing import Any, Callable

from . import checkpoints, graphed, lora, precompiled, samplers
from .demo_model import DEMO_MODEL_NAME, ensure_demo_model
from .prompt_cache import PromptCache

log = logging.getLogger("orch.server")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

MAX_SEED = 2**32 - 1


# Subfolders of the models directory that hold other things than checkpoints (A1111's layout).
NOT_CHECKPOINTS = {"Lora", "LyCORIS", "VAE", "embeddings", "ControlNet", "hypernetworks", "ESRGAN"}
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")


class ModelNotFound(LookupError):
    pass


class RequestError(ValueError):
    """A request this server cannot serve as asked (answered 422, naming the field)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    is_demo: bool = False

    @property
    def is_file(self) -> bool:
        return self.path.suffix.lower() in checkpoints.CHECKPOINT_SUFFIXES

    @property
    def model_name(self) -> str:
        return Path(self.name).stem if self.is_file else self.name

    @functools.cached_property
    def short_hash(self) -> str:
        """A stable short id, like A1111's model hash (of a file: A1111's legacy hash; of a folder: its index).

        Cached: every image's infotext names it, and for a file it is a disk read."""
        if self.is_file:
            return checkpoints.short_hash(self.path)
        index = self.path / "model_index.json"
        data = index.read_bytes() if index.exists() else str(self.path).encode()
        return hashlib.sha256(data).hexdigest()[:10]

    def size_bytes(self) -> int:
        if self.is_file:
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*.safetensors"))


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

    @property
    def inpainting(self) -> bool:
        return int(self.pipeline.unet.config.in_channels) == 9


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
    loras: tuple[tuple[str, float], ...] = ()  # from the prompt's <lora:name:weight> tags
    vae: str | None = None  # "Automatic", "None" or a file under models/VAE


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


def format_infotext(req: GenerationRequest, seed: int, sampler: str, schedule: str, model: ModelEntry,
                    vae: Path | None = None) -> str:
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
        ("Model", model.model_name),
    ]
    if vae is not None:
        pairs.append(("VAE", vae.name))
    if req.loras:
        pairs.append(("Lora weights", '"' + ", ".join(f"{n}: {w:g}" for n, w in req.loras) + '"'))
    pairs.append(("Version", "orch"))
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs))
    return "\n".join(lines)


def _read_through(files: list[Path]) -> None:
    buffer = bytearray(8 << 20)
    for path in files:
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):  # releases the GIL while the disk works
                    pass
        except OSError:
            pass  # only a hint: the loader reports real problems


def _to_8_bits(images):
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8 on the same device, the arithmetic of
    diffusers' PIL output (float32 x 255, rounded). Done on the GPU: a quarter of the bytes to
    copy and no float pass over the pixels on the CPU (~30 ms for eight 512x512 images)."""
    import torch

    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@functools.cache
def _served(cls: type) -> type:
    """cls, with the execution device given (`orch_device`). diffusers searches every submodule
    of every component for offloading hooks to find it (none here: models stay on the GPU),
    once per call: thousands of attribute misses, milliseconds of CPU while the GPU waits."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "_execution_device": property(lambda self: self.orch_device)})


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


class _DecodeStream:
    """During one txt2img call, the VAE decodes the batch image by image and each image is
    handed to `on_image` as soon as it is on the host, while the GPU decodes the next: its
    client gets its PNG while the rest of the batch decodes, instead of all eight clients
    encoding and receiving at once after the last. Image by image costs the GPU nothing more
    (SD1.5 on an H100: 8 x 7.8 ms vs 65.7 ms for a batch of 8). The pipeline still gets the
    whole batch back and finishes as usual; pixels are the same as its own (same ops)."""

    def __init__(self, pipe, on_image: Callable[[int, Any], None]):
        self.pipe = pipe
        self.vae = pipe.vae
        self.on_image = on_image
        self.images: dict[int, Any] = {}  # what the call returns: already converted, no second copy
        self.error: BaseException | None = None

    def __enter__(self):
        import queue

        self.decode = self.vae.decode
        self.vae.decode = self._decode
        self.handoff: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._deliver, name="decode-stream", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.vae.decode = self.decode
        self.handoff.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _decode(self, z, *args, **kwargs):
        import torch

        samples = []
        for i in range(z.shape[0]):
            out = self.decode(z[i : i + 1], *args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else out.sample
            samples.append(sample)
            pixels = _to_8_bits(self.pipe.image_processor.denormalize(sample))  # as postprocess() does next
            if pixels.is_cuda:
                host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
                host.copy_(pixels, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                self.handoff.put((i, host, ready))
            else:
                self.handoff.put((i, pixels, None))
        sample = torch.cat(samples)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)

    def _deliver(self) -> None:
        from PIL import Image

        while (item := self.handoff.get()) is not None:
            i, pixels, ready = item
            try:
                if ready is not None:
                    ready.synchronize()
                if self.error is None:
                    self.images[i] = Image.fromarray(pixels[0].numpy())
                    self.on_image(i, self.images[i])
            except BaseException as e:  # raised on the worker when the call ends
                self.error = e


class _PhaseClock:
    """Where a pipeline call's time goes, measured on the GPU's own clock (CUDA events: no sync)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def _between(self, a: str, b: str) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b]) / 1000
        return self.marks[b] - self.marks[a]

    def phases(self) -> dict[str, float]:
        """prompt encoding + first step; the other steps; VAE decode + conversion to 8 bits (seconds)."""
        if not {"start", "first_step", "end"} <= self.marks.keys():
            return {}
        last = "last_step" if "last_step" in self.marks else "first_step"
        return {"prompt_and_first_step": round(self._between("start", "first_step"), 4),
                "other_steps": round(self._between("first_step", last), 4),
                "decode": round(self._between(last, "end"), 4)}


class ModelManager:
    """Finds and loads models. load() and generate() run on the engine's worker thread."""

    def __init__(self, models_dir: Path, device: str | None = None, compile: bool | None = None,
                 max_resident: int | None = None, precompiled_dir: Path | None = None):
        self.models_dir = models_dir
        # Where standalone compiled graphs are kept (precompiled.py); None: plain torch.compile.
        env_precompiled = os.environ.get("ORCH_PRECOMPILED_DIR")
        self.precompiled_dir = precompiled_dir or (Path(env_precompiled) if env_precompiled else None)
        self.config_cache = models_dir / ".orch-configs"
        self.loras = lora.LoraLibrary(models_dir / "Lora")
        self._loaded: LoadedModel | None = None
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._device = device
        env = os.environ.get("ORCH_COMPILE")
        self._compile = compile if compile is not None else (env != "0" if env is not None else None)
        env_resident = os.environ.get("ORCH_RESIDENT_MODELS")
        # How many models stay loaded at most; on a GPU fewer when memory runs short (A1111: sd_checkpoints_limit).
        self.max_resident = max_resident or (int(env_resident) if env_resident else 3)
        self.load_times: dict[str, float] = {}
        self.last_phases: dict[str, float] = {}

    def list_models(self) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        if not self.models_dir.exists():
            return entries
        for index in sorted(self.models_dir.glob("**/model_index.json")):
            folder = index.parent
            if any(part.startswith(".") for part in folder.relative_to(self.models_dir).parts):
                continue  # a model being written (temporary folder)
            name = str(folder.relative_to(self.models_dir))
            entries.append(ModelEntry(name=name, path=folder, is_demo=name == DEMO_MODEL_NAME))
        folders = [e.path for e in entries]
        for path in sorted(self.models_dir.rglob("*")):
            if path.suffix.lower() not in checkpoints.CHECKPOINT_SUFFIXES or not path.is_file():
                continue
            rel = path.relative_to(self.models_dir)
            if rel.parts[0] in NOT_CHECKPOINTS or any(p.startswith(".") for p in rel.parts) or path.name.endswith((".vae.safetensors", ".vae.pt")):
                continue
            if any(folder in path.parents for folder in folders):
                continue  # a component of a diffusers folder
            if not checkpoints.looks_like_checkpoint(path):
                continue  # e.g. a LoRA pulled to the top of the models folder
            # A1111 keeps checkpoints in models/Stable-diffusion and names them from there.
            name = str(rel.relative_to("Stable-diffusion")) if rel.parts[0] == "Stable-diffusion" and len(rel.parts) > 1 else str(rel)
            entries.append(ModelEntry(name=name, path=path))
        return entries

    def vae_files(self) -> list[Path]:
        folder = self.models_dir / "VAE"
        if not folder.exists():
            return []
        files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VAE_SUFFIXES]
        folders = [p.parent for p in folder.rglob("config.json") if p.parent != folder]
        return sorted(files + folders)

    def find_vae(self, choice: str | None, entry: ModelEntry | None) -> Path | None:
        """The VAE file for an sd_vae choice; None means the model's own. Unknown names are errors."""
        if choice in (None, "", "Automatic"):
            if entry is not None and entry.is_file:
                for suffix in (".vae.safetensors", ".vae.pt"):
                    sibling = entry.path.with_name(entry.path.stem + suffix)
                    if sibling.exists():
                        return sibling
            return None
        if choice == "None":
            return None
        for path in self.vae_files():
            rel = str(path.relative_to(self.models_dir / "VAE"))
            if choice in (path.name, path.stem, rel):
                return path
        valid = ", ".join(["Automatic", "None", *(p.name for p in self.vae_files())])
        raise RequestError(f"sd_vae: unknown VAE {choice!r}; choose one of: {valid}")

    def default_entry(self) -> ModelEntry:
        real = [e for e in self.list_models() if not e.is_demo]
        if real:
            return real[0]
        path = ensure_demo_model(self.models_dir)
        log.warning("no model in %s: serving the demo model %s (tiny random weights; its images are noise)", self.models_dir, DEMO_MODEL_NAME)
        return ModelEntry(name=DEMO_MODEL_NAME, path=path, is_demo=True)

    def prefetch_default(self) -> threading.Thread | None:
        """Read the default model's files (and the saved compiled graphs) into the page cache
        on a thread, while the main thread spends its ~15 s importing torch, diffusers and
        transformers: after an instance restart the cache is empty, and a 2 GB SD1.5 at the
        250 MB/s of a cloud volume is 8 s of reading that would otherwise come after."""
        real = [e for e in self.list_models() if not e.is_demo]
        if not real:
            return None
        entry = real[0]
        files = [entry.path] if entry.is_file else [p for p in entry.path.rglob("*") if p.is_file()]
        if self.precompiled_dir is not None and self.precompiled_dir.exists():
            files += [p for p in self.precompiled_dir.rglob("*.bin")]
        thread = threading.Thread(target=_read_through, args=(files,), name="prefetch", daemon=True)
        thread.start()
        return thread

    def find(self, name: str) -> ModelEntry:
        wanted = name.split(" [")[0].strip()  # A1111 titles look like "name [hash]"
        for entry in self.list_models():
            if wanted in (entry.name, entry.path.name, entry.model_name):
                return entry
        if wanted == DEMO_MODEL_NAME:
            return ModelEntry(name=DEMO_MODEL_NAME, path=ensure_demo_model(self.models_dir), is_demo=True)
        valid = ", ".join(e.name for e in self.list_models()) or "(none)"
        raise ModelNotFound(f"unknown model {name!r}; models on this instance: {valid}")

    @property
    def current(self) -> LoadedModel | None:
        return self._loaded

    @property
    def resident(self) -> list[LoadedModel]:
        return list(self._resident.values())

    def load(self, name: str | None = None) -> LoadedModel:
        entry = self.find(name) if name else (self._loaded.entry if self._loaded else self.default_entry())
        key = str(entry.path)
        if key in self._resident:
            self._resident.move_to_end(key)
            self._loaded = self._resident[key]
            while len(self._resident) > max(1, self.max_resident):  # the limit may have been lowered
                self._evict()
            return self._loaded
        import torch

        device, dtype = (self._device, torch.float16 if self._device == "cuda" else torch.float32) if self._device else pick_device()
        self._make_room(entry, device)
        started = time.monotonic()
        architecture = None
        if entry.is_file:
            try:
                pipe, architecture = checkpoints.load_single_file(entry.path, self.config_cache, dtype)
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
        if device == "cuda":
            self._optimize(pipe)
        loaded = LoadedModel(entry=entry, pipeline=pipe, scheduler_config=dict(pipe.scheduler.config), device=device,
                             load_seconds=time.monotonic() - started, architecture=architecture, builtin_vae=pipe.vae)
        self._resident[key] = loaded
        self._loaded = loaded
        self.load_times[entry.name] = loaded.load_seconds
        log.info("loaded %s on %s in %.1fs (%d resident)", entry.name, device, loaded.load_seconds, len(self._resident))
        return loaded

    def _make_room(self, entry: ModelEntry, device: str) -> None:
        """Unload least recently used models: over the count limit, or (GPU) short of memory for this one."""
        while self._resident and len(self._resident) >= max(1, self.max_resident):
            self._evict()
        if device != "cuda":
            return
        import torch

        need = int(entry.size_bytes() * 1.1) + (3 << 30)  # weights + room to generate
        while self._resident:
            free, _ = torch.cuda.mem_get_info()
            free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
            if free >= need:
                break
            self._evict()

    def _evict(self) -> None:
        import gc

        key, old = self._resident.popitem(last=False)
        if self._loaded is old:
            self._loaded = None
        log.info("unloading %s to make room", old.entry.name)
        del old
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

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
                started = time.monotonic()
                try:
                    vae = checkpoints.load_vae_file(path, model.builtin_vae.config, self.config_cache, model.builtin_vae.dtype)
                except Exception as e:
                    raise RequestError(f"sd_vae: {path.name} could not be loaded as this model's VAE ({type(e).__name__}: {e})") from None
                vae.to(model.device)
                vae_in_float32(model.pipeline, vae)
                if model.device == "cuda":
                    import torch

                    vae.to(memory_format=torch.channels_last)
                if model.compiled:
                    self._compile_vae_decode(model, vae)  # compiles (or loads) at its first use
                model.vaes[str(path)] = vae
                log.info("loaded VAE %s in %.1fs", path.name, time.monotonic() - started)
        model.pipeline.vae = vae
        model.vae_path = path

    def _optimize(self, pipe) -> None:
        """fp16 + SDPA are already on; add channels_last and fused QKV (compiling comes later)."""
        import torch

        # cuDNN's own heuristics, not its benchmark: on an H100 (SD1.5 512², Inductor graphs,
        # whose convolutions go to cuDNN) the benchmark made no image faster (batch 1: 0.233 vs
        # 0.229 s, batch 8: 1.175 vs 1.171 s) and added ~2 s to every start, run again per shape.
        torch.backends.cudnn.benchmark = os.environ.get("ORCH_CUDNN_BENCHMARK") == "1"
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        try:
            pipe.fuse_qkv_projections()
        except Exception as e:  # not every pipeline or attention processor supports it
            log.info("fused QKV not available: %s", e)

    # -- torch.compile ---------------------------------------------------------------------
    #
    # reduce-overhead: CUDA graphs remove the per-kernel launch cost that dominates SD at
    # batch 1 (max-autotune compiled for minutes without finishing). Compiling, or with a
    # warm cache re-tracing, happens on the GPU worker: cudagraph trees are thread-local.

    def compile_enabled(self, model: LoadedModel) -> bool:
        return self._compile is True or (self._compile is None and model.device == "cuda")

    @staticmethod
    def _backend() -> str:
        return os.environ.get("ORCH_COMPILE_BACKEND", "inductor")  # tests use "eager": Dynamo without codegen

    def _compile_fn(self, fn):
        import torch

        backend = self._backend()
        if backend == "inductor":
            import torch._inductor.config as inductor_config

            # (coordinate_descent_tuning was tried: on an H100 the SD1.5 UNet at batch 1 had
            # not finished compiling after 9 minutes.)
            inductor_config.conv_1x1_as_mm = True
            # dynamic=False: each batch size gets its own static graph. (Automatic dynamic
            # shapes made the second batch size a symbolic-shape graph, slower to run.)
            return torch.compile(fn, mode="reduce-overhead", dynamic=False)
        return torch.compile(fn, backend=backend, dynamic=False)

    def _precompiling(self) -> bool:
        return self.precompiled_dir is not None and self._backend() == "inductor"

    def compile(self, model: LoadedModel) -> None:
        """Put the compiled UNet and VAE decoder in place (on the worker); they compile, or load, at their first run."""
        unet = model.pipeline.unet
        if self._precompiling():
            if model.device == "cuda":
                import torch

                model.graph_pool = torch.cuda.graph_pool_handle()  # one memory pool for all of the model's graphs
            precompiled.install_unet(unet, self.precompiled_dir, self._compile_fn(unet.forward), model.graph_pool)
        else:
            model.pipeline.unet = self._compile_fn(unet)
        self._compile_vae_decode(model, model.builtin_vae)
        if model.device == "cuda":
            for name in ("text_encoder", "text_encoder_2"):  # eager, replayed as CUDA graphs (graphed.py)
                encoder = getattr(model.pipeline, name, None)
                if encoder is not None and not isinstance(encoder.forward, graphed.GraphedForward):
                    graphed.install(encoder, model.graph_pool)
        model.compiled = True

    def _compile_vae_decode(self, model: LoadedModel, vae) -> None:
        if self._precompiling():
            precompiled.install_vae_decode(vae, self.precompiled_dir, self._compile_fn(vae.decode), model.graph_pool)
        else:
            vae.decode = self._compile_fn(vae.decode)

    def warm_up(self, sizes: list[tuple[int, int]], batches: list[int]) -> float:
        """Run each (size, batch) once so compiling happens at boot, not on a user's request."""
        started = time.monotonic()
        model = self._loaded or self.load()
        for width, height in sizes:
            for batch in batches:
                # Batches decode image by image (_DecodeStream), as user batches do: no batch-size VAE graph.
                self._run(model, GenerationRequest(prompt="warm-up", steps=2, width=width, height=height, batch_size=batch),
                          ["warm-up"] * batch, [""] * batch, list(range(batch)), None,
                          on_image=(lambda i, image: None) if batch > 1 else None)
        return time.monotonic() - started

    def _pipeline_for(self, model: LoadedModel, spec, schedule: str, kind: str = "txt2img"):
        """The model's components with a fresh scheduler: shared weights, private sampler state.

        One pipeline object per kind is kept and given the request's scheduler (requests run
        one at a time on the worker): building one was ~3 ms of CPU before the GPU could start."""
        import torch

        scheduler = samplers.make_scheduler(model.scheduler_config, spec, schedule)
        base = model.pipeline
        pipe = model.pipelines.get(kind)
        if pipe is None:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            if kind == "txt2img":
                pipe = base.__class__(**base.components)
            elif kind == "img2img":
                pipe = AutoPipelineForImage2Image.from_pipe(base)
            else:
                pipe = AutoPipelineForInpainting.from_pipe(base)
            pipe.__class__ = _served(type(pipe))
            pipe.orch_device = torch.device(model.device)
            pipe.set_progress_bar_config(disable=True)
            pipe.encode_prompt = model.prompts.wrap(pipe.encode_prompt, lambda: model.lora.version)
            model.pipelines[kind] = pipe
        for name, component in base.components.items():  # a VAE chosen, or the UNet compiled, since
            if name != "scheduler" and getattr(pipe, name, None) is not component:
                setattr(pipe, name, component)
        pipe.scheduler = scheduler
        return pipe

    def _run(self, model: LoadedModel, req: GenerationRequest, prompts: list[str], negatives: list[str], seeds: list[int],
             engine, kind: str = "txt2img", extra: dict[str, Any] | None = None,
             on_image: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Generate; with on_image, txt2img images are also handed over one by one as each is decoded."""
        import torch

        spec, schedule = samplers.resolve(req.sampler_name, req.scheduler)
        pipe = self._pipeline_for(model, spec, schedule, kind)
        steps = req.steps

        clock = _PhaseClock(model.device)

        def on_step(p, i, t, kwargs):
            clock.mark("first_step" if i == 0 else "last_step")
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
        stream = None
        if on_image is not None and kind == "txt2img" and getattr(pipe, "watermark", None) is None and len(seeds) > 1:
            stream = _DecodeStream(pipe, on_image)
        with torch.inference_mode():
            clock.mark("start")
            if stream is not None:
                with stream:
                    pipe(**args, output_type="pt")
                    clock.mark("end")
            else:
                pixels = _to_8_bits(pipe(**args, output_type="pt").images)
                clock.mark("end")
                pixels = pixels.cpu().numpy()
        self.last_phases = clock.phases()
        if stream is not None:
            return [stream.images[i] for i in range(len(seeds))]
        from PIL import Image

        return [Image.fromarray(p) for p in pixels]

    def generate_batch(self, requests: list[GenerationRequest], engine=None, model_name: str | None = None,
                       kind: str = "txt2img", extra: dict[str, Any] | None = None,
                       answer: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Several compatible requests as few pipeline calls as possible (at most max_batch images each).

        With `answer`, each request's result is also passed to it as soon as its images are
        decoded (answer(request_index, result)), before the batch ends."""
        model = self.load(model_name)
        head = requests[0]
        if model.inpainting and kind != "inpaint":
            raise RequestError(f"sd_model_checkpoint: {model.entry.name} is an inpainting model: use img2img with a mask, "
                               "or choose another model")
        spec, schedule = samplers.resolve(head.sampler_name, head.scheduler)
        # Requests in one batch share these (the engine's batch key includes them).
        self.use_vae(model, head.vae)
        try:
            lora.apply(model.pipeline, model.lora, self.loras, head.loras)
        except lora.LoraError as e:
            raise RequestError(str(e)) from None
        per_request_seeds = []
        flat: list[tuple[int, str, str, int]] = []
        for r_index, req in enumerate(requests):
            first = random.randint(0, MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
            seeds = [(first + i) % (MAX_SEED + 1) for i in range(req.batch_size * req.n_iter)]
            per_request_seeds.append(seeds)
            prompt = lora.parse_prompt(req.prompt)[0]  # the tags were read into req.loras
            flat.extend((r_index, prompt, req.negative_prompt, s) for s in seeds)
        max_batch = getattr(engine, "max_batch", 8) if engine is not None else 8
        pad_to = getattr(engine, "pad_to", None) if engine is not None else None
        started = time.monotonic()
        phases: dict[str, float] = {}  # filled when the batch ends (a result answered earlier may not show them)

        def result_for(r_index: int, images: list[Any]) -> GenerationResult:
            req, seeds = requests[r_index], per_request_seeds[r_index]
            infotexts = [format_infotext(req, s, spec.name, schedule, model.entry, model.vae_path) for s in seeds]
            return GenerationResult(images=images, seeds=seeds, infotexts=infotexts, sampler_name=spec.name,
                                    schedule=schedule, model=model.entry, seconds=time.monotonic() - started,
                                    extra={"batch_images": len(flat), "phases": phases})

        starts = list(itertools.accumulate((len(seeds) for seeds in per_request_seeds), initial=0))  # in `flat`
        early: dict[int, GenerationResult] = {}
        ready: dict[int, list[Any]] = {}

        def on_image(position: int, image) -> None:
            r_index = flat[position][0]
            got = ready.setdefault(r_index, [None] * len(per_request_seeds[r_index]))
            got[position - starts[r_index]] = image
            if all(x is not None for x in got):
                early[r_index] = result_for(r_index, got)
                answer(r_index, early[r_index])

        def chunk_delivery(offset: int, n: int) -> Callable[[int, Any], None]:
            def deliver(j: int, image) -> None:
                if j < n:  # padded images are not anyone's
                    on_image(offset + j, image)
            return deliver

        images: list[Any] = []
        for i in range(0, len(flat), max_batch):
            chunk = flat[i : i + max_batch]
            # Padding to a compiled batch size; the padded images are dropped.
            padding = [(0, "", "", 0)] * (pad_to - len(chunk)) if pad_to and len(chunk) < pad_to and kind == "txt2img" else []
            out = self._run(model, head, [c[1] for c in chunk + padding], [c[2] for c in chunk + padding],
                            [c[3] for c in chunk + padding], engine, kind, extra,
                            on_image=chunk_delivery(i, len(chunk)) if answer else None)
            images.extend(out[: len(chunk)])
        phases.update(self.last_phases)
        return [early.get(r) or result_for(r, images[starts[r] : starts[r + 1]]) for r in range(len(requests))]

    def generate(self, req: GenerationRequest, model: LoadedModel | None = None) -> GenerationResult:
        """One request, run directly (tests and scripts; the server goes through the engine)."""
        return self.generate_batch([req], None, model.entry.name if model else None)[0]
