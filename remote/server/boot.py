"""Start-up: load the default model, compile it, warm up the shapes users will ask for.

Runs on a thread started by the app's lifespan; /healthz reports each phase as it ends.
"""

from __future__ import annotations

import logging
import time

from .errors import is_out_of_memory
from .models.residency import free_memory
from .state import ServerState

log = logging.getLogger(__name__)


def load_default(state: ServerState) -> None:
    models, engine, readiness = state.models, state.engine, state.readiness
    try:
        readiness.mark("server_up")
        models.prefetch_default()
        t_import = time.monotonic()
        # Most of a start-up on a GPU host (torch, diffusers, transformers): measured apart.
        import torch  # noqa: F401
        from diffusers import StableDiffusionPipeline  # noqa: F401

        readiness.update(import_seconds=round(time.monotonic() - t_import, 3))
        readiness.mark("imports")
        loaded = engine.call(models.load)
        readiness.mark("model_loaded")
        readiness.update(status="warming-up", model=loaded.entry.name, demo=loaded.entry.is_demo, device=loaded.device,
                         load_seconds=round(loaded.load_seconds, 3))
        sizes, batches = warmup_plan(state.settings.warmup, loaded)
        shapes = [(size, b) for size in sizes for b in batches]
        # Compiled before "ready", on the worker. (Serving uncompiled meanwhile was tried on
        # an H100: the uncompiled model crawled behind the compiling thread's GIL, and
        # Inductor's FX tracing patches nn.Module calls process-wide, which broke it.)
        if shapes and models.compile_enabled(loaded):
            engine.set_batch_sizes(batches)
            engine.call(lambda: models.compile(loaded))
            readiness.update(compiled="done")
            readiness.mark("compile_set_up")
        if shapes:
            # The first shape before "ready"; the rest warm up behind it on the worker,
            # so the first user waits for one compile, not all of them.
            readiness.update(warmup_seconds=round(engine.call(lambda: models.warm_up(sizes[:1], batches[:1])), 3))
        readiness.update(status="ready", ready_seconds=round(time.monotonic() - state.started, 3))
        readiness.mark("ready")
        if shapes[1:]:
            _warm_up_the_rest(state, shapes[1:])
    except Exception as e:  # reported by /healthz; the process stays up to say why
        log.exception("model load failed")
        readiness.update(status="error", error=f"{type(e).__name__}: {e}")


def _warm_up_the_rest(state: ServerState, rest: list) -> None:
    """One background job per shape: a user request waits for at most one of them."""
    models, engine, readiness = state.models, state.engine, state.readiness
    readiness.update(background_warmup="running")
    t_rest = time.monotonic()
    futures = [engine.call_in_background(lambda size=size, b=b: models.warm_up([size], [b])) for size, b in rest]
    failed: list[str] = []

    def done(f) -> None:
        size, b = rest[futures.index(f)]
        if f.exception() is not None:
            # Out of memory at batch 8 on a small GPU, say: users must not get that
            # batch size then (it would fail for them too); it stops being used.
            log.warning("warm-up of %dx%d at batch %d failed (%s); that batch size is not used", size[0],
                        size[1], b, f.exception())
            failed.append(f"{size[0]}x{size[1]} batch {b}: {type(f.exception()).__name__}: {f.exception()}"[:300])
            if b > 1:
                engine.set_batch_sizes([x for x in engine.batch_sizes if x != b])
            if is_out_of_memory(f.exception()):
                free_memory()
        if all(x.done() for x in futures):
            readiness.update(background_warmup="failed: " + "; ".join(failed) if failed else "done",
                             background_warmup_seconds=round(time.monotonic() - t_rest, 3))

    for f in futures:
        f.add_done_callback(done)


def warmup_plan(spec: str | None, loaded) -> tuple[list[tuple[int, int]], list[int]]:
    """What to run at boot so compiling is done before the first user request.

    spec (ORCH_WARMUP) "512x512,768x512:1,8" names sizes and batch sizes; None on CUDA:
    default_warmup(); on CPU nothing (no compile there)."""
    if spec is None:
        if loaded.device != "cuda":
            return [], []
        import torch

        return default_warmup(loaded.pipeline, torch.cuda.get_device_properties(0).total_memory)
    if not spec.strip() or spec.strip() == "0":
        return [], []
    sizes_part, _, batches_part = spec.partition(":")
    sizes = []
    for item in sizes_part.split(","):
        w, _, h = item.strip().partition("x")
        sizes.append((int(w), int(h or w)))
    batches = [int(b) for b in batches_part.split(",")] if batches_part else [1]
    return sizes, batches


def default_warmup(pipe, gpu_memory_bytes: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The model's native size at batch 1 (before "ready"), and at batch 8 in the background
    when the GPU has room for it, so concurrent clients share batches without any setting.
    (SD1.5 at batch 8 with its CUDA graphs needs ~10 GB beyond the weights; SDXL at 1024x1024,
    ~4x the pixels, stays at batch 1 unless ORCH_WARMUP asks.)"""
    side = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    batches = [1, 8] if side <= 768 and gpu_memory_bytes >= (20 << 30) else [1]
    return [(side, side)], batches
