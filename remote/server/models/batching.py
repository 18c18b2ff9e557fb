"""Several compatible requests as few pipeline calls as possible, and each answered as soon as it can be.

Seeds fan out per image (seed, seed+1, ...); chunks are at most the engine's max batch and
padded to a compiled batch size; a request whose images are all decoded is answered
before the rest of the batch ends.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from typing import Any

from .. import lora, samplers
from ..infotext import format_infotext
from .residency import LoadedModel
from .run import run
from .types import MAX_SEED, GenerationRequest, GenerationResult


def image_seeds(req: GenerationRequest) -> tuple[list[int], list[int]]:
    """Each image's seed and variation seed, as A1111 numbers them: seed, seed+1, ... (with a
    variation strength, one seed for all and subseed, subseed+1, ...); -1 picks at random."""
    n = req.batch_size * req.n_iter
    first = random.randint(0, MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
    sub = random.randint(0, MAX_SEED) if req.subseed is None or req.subseed < 0 else int(req.subseed)
    varied = req.subseed_strength > 0
    seeds = [(first + (0 if varied else i)) % (MAX_SEED + 1) for i in range(n)]
    return seeds, [(sub + i) % (MAX_SEED + 1) for i in range(n)]


def vae_hash(path) -> str:
    """A1111's VAE hash: sha256 of the file, first 8 hex digits (cached per path, size and time)."""
    import hashlib

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _VAE_HASHES:
        h = hashlib.sha256()
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(path).encode())
        _VAE_HASHES[key] = h.hexdigest()[:8]
    return _VAE_HASHES[key]


_VAE_HASHES: dict[tuple, str] = {}


def generate_batch(model: LoadedModel, requests: list[GenerationRequest], engine=None, kind: str = "txt2img",
                   answer: Callable[[int, GenerationResult], None] | None = None) -> tuple[list[GenerationResult], dict]:
    """Run the requests (their model, VAE and LoRAs are in place); returns the results and the last call's phases."""
    head = requests[0]
    spec, schedule = samplers.resolve(head.sampler_name, head.scheduler)
    per_request_seeds, per_request_subseeds = [], []
    flat: list[tuple[int, str, str, int, int, int]] = []  # (request, prompt, negative prompt, seed, subseed, row)
    for r_index, req in enumerate(requests):
        seeds, subseeds = image_seeds(req)
        per_request_seeds.append(seeds)
        per_request_subseeds.append(subseeds)
        prompt = lora.parse_prompt(req.prompt)[0]  # the tags were read into req.loras
        flat.extend((r_index, prompt, req.negative_prompt, s, sub, row) for row, (s, sub) in enumerate(zip(seeds, subseeds)))
    max_batch = getattr(engine, "max_batch", 8) if engine is not None else 8
    pad_to = getattr(engine, "pad_to", None) if engine is not None else None
    started = time.monotonic()
    phases: dict[str, float] = {}  # filled when the batch ends (a result answered earlier may not show them)

    def result_for(r_index: int, images: list[Any]) -> GenerationResult:
        req, seeds, subseeds = requests[r_index], per_request_seeds[r_index], per_request_subseeds[r_index]
        infotexts = [format_infotext(req, s, spec.name, schedule, model.entry, model.vae_path, sub) for s, sub in zip(seeds, subseeds)]
        return GenerationResult(images=images, seeds=seeds, infotexts=infotexts, sampler_name=spec.name,
                                schedule=schedule, model=model.entry, seconds=time.monotonic() - started,
                                extra={"batch_images": len(flat), "phases": phases, "inpainting_model": model.inpainting},
                                subseeds=subseeds,
                                vae_name=model.vae_path.name if model.vae_path else None,
                                vae_hash=vae_hash(model.vae_path) if model.vae_path else None)

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
    last_phases: dict[str, float] = {}
    for i in range(0, len(flat), max_batch):
        chunk = flat[i : i + max_batch]
        # Padding to a compiled batch size; the padded images are dropped.
        padding = [(0, "", "", 0, 0, 0)] * (pad_to - len(chunk)) if pad_to and len(chunk) < pad_to and kind == "txt2img" else []
        rows = chunk + padding
        out, last_phases = run(model, head, [c[1] for c in rows], [c[2] for c in rows], [c[3] for c in rows], engine, kind,
                               rows=[c[5] for c in rows], subseeds=[c[4] for c in rows],
                               on_image=chunk_delivery(i, len(chunk)) if answer else None)
        images.extend(out[: len(chunk)])
    phases.update(last_phases)
    return [early.get(r) or result_for(r, images[starts[r] : starts[r + 1]]) for r in range(len(requests))], last_phases
