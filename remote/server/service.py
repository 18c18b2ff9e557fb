"""The generation service: what txt2img and img2img do between the HTTP request and its answer.

Routes hand it a validated request; it reads it as A1111 would (a1111/translate.py), checks
that it fits in memory, builds the engine job and its batch key, waits for the images (or
for the client to go away), maps out-of-memory, counts, and encodes the images. No HTTP
here: errors are RequestError (422), NotReady and OutOfMemory (503), JobCancelled.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from . import memory
from .a1111.translate import translate
from .engine import Job
from .encoding import encode_image
from .errors import OutOfMemory, is_out_of_memory
from .models import RequestError
from .models.residency import free_memory
from .models.types import JobCancelled
from .state import ServerState

SCRIPTS: list[str] = []  # selectable A1111 scripts (script_name): none; ControlNet is always on (alwayson_scripts)


@dataclass
class GenerationOutput:
    images: list[bytes]  # base64 images (PNG, or the options' samples_format)
    parameters: dict[str, Any]
    info: str  # JSON text, as A1111 sends it
    kept: Future | None = None  # the gallery ids of the images, once on the instance disk (None: not kept)


class GenerationService:
    def __init__(self, state: ServerState):
        self.state = state

    def run(self, body, kind: str, cancel: threading.Event | None = None) -> GenerationOutput:
        """# 1. readiness  # 2. read the request  # 3. will it fit  # 4. submit and wait  # 5. encode and describe
        # 6. keep the images (in the background)."""
        entered, received_at = time.perf_counter(), time.time()
        state, models = self.state, self.state.models
        # 1. A model to serve.
        state.check_ready()
        # 2. The request as A1111 reads it (422 for what cannot be served; warnings for what orch does not do).
        options = state.options.all()
        t = translate(body, kind, models, options, state.settings.max_side, SCRIPTS)
        req = t.request
        run_kind = "inpaint" if req.inputs is not None and req.inputs.inpaint is not None else kind
        # 3. Memory, before any GPU work.
        current = models.current
        images = req.batch_size * req.n_iter
        if current is not None:
            w, h = req.output_size
            batch = min(req.batch_size * req.n_iter, state.engine.max_batch)
            streamed = run_kind == "txt2img" and req.hires is None
            problem = memory.check(current, max(w, req.width), max(h, req.height), batch, images, req.cfg_scale > 1,
                                   1 if streamed else batch)
            if problem:
                raise RequestError(f"batch_size/width/height: {problem}")
        # 4. The engine job: requests with equal keys share a batch.
        model_name = t.model_name
        job = Job(kind="txt2img" if run_kind == "txt2img" else "img2img", key=self._batch_key(req, run_kind, model_name),
                  images=images, payload={"request": req, "model": model_name, "kind": run_kind}, cancel=cancel)
        counters = state.counters
        counters.requests_total += 1
        state.activity.begin()
        try:
            result = state.engine.submit(job).result()
            queued = job.started - job.enqueued
        except (RequestError, JobCancelled):
            counters.errors_total += 1
            raise
        except Exception as e:
            counters.errors_total += 1
            if is_out_of_memory(e):
                free_memory()
                raise OutOfMemory("out of GPU memory: lower width/height or batch_size, or use a larger GPU") from None
            raise
        finally:
            state.activity.end()
        counters.images_total += len(result.images)
        counters.steps_total += req.steps * (1 + (result.extra.get("batch_images", 1) > 1))
        counters.gen_seconds_total += result.seconds
        # 5. Encoding happens here, on the HTTP thread, while the GPU runs the next batch.
        t_encode = time.perf_counter()
        fmt = str(t.override_options.get("samples_format", options.get("samples_format", "png")))
        if not body.send_images:
            encoded = []
        elif len(result.images) > 1:
            # zlib releases the GIL: a batch's PNGs encode side by side.
            encoded = list(state.png_pool.map(lambda im, text: encode_image(im, text, fmt), result.images, result.infotexts))
        else:
            encoded = [encode_image(result.images[0], result.infotexts[0], fmt)]
        encode_seconds = time.perf_counter() - t_encode
        # 6. Kept on the instance for the page's gallery, off this thread (do_not_save_samples: A1111's opt-out).
        kept = None
        if state.gallery is not None and not body.do_not_save_samples and result.images:
            kept = state.gallery.keep(result.images, encoded, result.infotexts, result.seeds, fmt, run_kind)
        warnings = list(t.warnings)
        if body.save_images and kept is None:
            warnings.append("save_images: this server keeps no images (ORCH_KEEP_OUTPUTS=0, or do_not_save_samples); "
                            "they are in this answer only")
        info = self._info(body, req, result, warnings, kind)
        info.update(orch_seconds=round(result.seconds, 4), orch_batch_images=result.extra.get("batch_images", 1),
                    orch_queue_seconds=round(queued, 4), orch_gpu_idle_before_seconds=round(job.gpu_idle_before, 4),
                    orch_phase_seconds=result.extra.get("phases", {}), orch_encode_seconds=round(encode_seconds, 4))
        # From the handler's start to here: the rest of a client's wait is HTTP and JSON.
        info["orch_request_seconds"] = round(time.perf_counter() - entered, 4)
        # Wall-clock times (Unix seconds): a client on the same host tells the way in from the way out.
        info.update(orch_received_at=round(received_at, 4), orch_answered_at=round(time.time(), 4))
        exclude = {"init_images", "mask"} if kind == "img2img" and not body.include_init_images else set()
        parameters = body.model_dump(exclude=exclude)
        return GenerationOutput(images=encoded, parameters=parameters, info=json.dumps(info), kept=kept)

    @staticmethod
    def _batch_key(req, kind: str, model_name: str | None) -> tuple:
        """Plain txt2img requests that differ only in prompts, seeds and counts may share a batch."""
        if kind != "txt2img" or req.hires is not None or req.subseed_strength > 0 or req.seed_resize_from_w > 0:
            return (kind, object())
        shared = dataclasses.replace(req, prompt="", negative_prompt="", seed=-1, subseed=-1, batch_size=1, n_iter=1)
        return (kind, model_name, shared)

    def _info(self, body, req, result, warnings: list[str], kind: str) -> dict[str, Any]:
        """A1111's Processed.js(), plus orch's keys (warnings, orch_*)."""
        n = len(result.seeds)
        w, h = req.output_size
        return {
            "prompt": req.prompt, "all_prompts": [req.prompt] * n,
            "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
            "seed": result.seeds[0], "all_seeds": result.seeds,
            "subseed": result.subseeds[0] if result.subseeds else -1, "all_subseeds": result.subseeds or [-1] * n,
            "subseed_strength": req.subseed_strength,
            "width": w, "height": h,
            "sampler_name": result.sampler_name, "scheduler": result.schedule,
            "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size, "n_iter": req.n_iter,
            "restore_faces": bool(body.restore_faces), "face_restoration_model": None,
            "sd_model_name": result.model.model_name, "sd_model_hash": result.model.short_hash,
            "sd_vae_name": result.vae_name, "sd_vae_hash": result.vae_hash,
            "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": body.denoising_strength if (kind == "img2img" or req.hires is not None) else None,
            "extra_generation_params": {k: v for k, v in req.extra_params},
            "index_of_first_image": 0, "infotexts": result.infotexts, "styles": body.styles or [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": req.clip_skip,
            "is_using_inpainting_conditioning": bool(kind == "img2img" and body.mask and result.extra.get("inpainting_model")),
            "version": "orch", "warnings": warnings, "orch_demo_model": result.model.is_demo,
        }

    def execute(self, jobs: list[Job], engine) -> list[Any]:
        """The engine's batch executor: one batch of compatible jobs on the GPU worker."""
        head = jobs[0]
        reqs = [j.payload["request"] for j in jobs]

        def answer(index: int, result: Any) -> None:  # a request whose images are ready goes out now
            jobs[index].future.set_result(result)

        return self.state.models.generate_batch(reqs, engine, head.payload.get("model"), head.payload.get("kind", "txt2img"),
                                                answer=answer)
