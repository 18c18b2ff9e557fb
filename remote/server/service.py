"""The generation service: what txt2img and img2img do between the HTTP request and its answer.

Routes hand it a validated request; it resolves the request against what the instance has
(models, samplers, LoRAs, VAEs), builds the engine job and its batch key, waits for the
images, maps out-of-memory, counts, and encodes the PNGs. No HTTP here: errors are
RequestError (422), NotReady and OutOfMemory (503).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from . import lora, samplers
from .engine import Job
from .encoding import encode_png
from .errors import OutOfMemory, is_out_of_memory
from .models import GenerationRequest, ModelNotFound, RequestError
from .models.residency import free_memory
from .state import ServerState


@dataclass
class GenerationOutput:
    images: list[bytes]  # base64 PNGs
    parameters: dict[str, Any]
    info: str  # JSON text, as A1111 sends it


class GenerationService:
    def __init__(self, state: ServerState):
        self.state = state

    def run(self, body, kind: str, extra: dict[str, Any] | None) -> GenerationOutput:
        """# 1. check readiness and limits  # 2. resolve names  # 3. submit and wait  # 4. encode and describe."""
        entered = time.perf_counter()
        state, models = self.state, self.state.models
        # 1. Readiness and limits.
        state.check_ready()
        for field in ("width", "height"):
            if getattr(body, field) > state.settings.max_side:
                raise RequestError(f"{field}: {getattr(body, field)} is larger than this server allows ({state.settings.max_side})")
        # 2. Names against what the instance has.
        checkpoint = body.override_settings.get("sd_model_checkpoint")
        vae = body.override_settings.get("sd_vae", state.options.get("sd_vae"))
        try:
            model_name = models.find(checkpoint).name if checkpoint else None
            spec, schedule = samplers.resolve(body.sampler_name or body.sampler_index, body.scheduler)
            _, loras = lora.parse_prompt(body.prompt)
            for name, _weight in loras:
                models.loras.find(name)
            models.find_vae(vae, None)
        except ModelNotFound as e:
            raise RequestError(f"override_settings.sd_model_checkpoint: {e}") from None
        except (samplers.UnknownSampler, lora.LoraError) as e:
            raise RequestError(str(e)) from None
        req = GenerationRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, cfg_scale=body.cfg_scale,
            width=body.width, height=body.height, seed=body.seed, batch_size=body.batch_size, n_iter=body.n_iter,
            sampler_name=body.sampler_name or body.sampler_index, scheduler=body.scheduler, loras=loras, vae=vae,
        )
        # 3. The engine job: requests with equal keys may share a batch.
        current = models.current
        key = (kind, model_name or (current.entry.name if current else None), req.width, req.height, req.steps, req.cfg_scale,
               spec.name, schedule, loras, vae) if kind == "txt2img" else (kind, id(body))
        job = Job(kind="txt2img" if kind == "txt2img" else "img2img", key=key, images=req.batch_size * req.n_iter,
                  payload={"request": req, "model": model_name, "kind": kind, "extra": extra})
        counters = state.counters
        counters.requests_total += 1
        state.activity.begin()
        try:
            result = state.engine.submit(job).result()
            queued = job.started - job.enqueued
        except RequestError:
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
        # 4. PNG encoding happens here, on the HTTP thread, while the GPU runs the next batch.
        t_encode = time.perf_counter()
        if not body.send_images:
            images = []
        elif len(result.images) > 1:
            # zlib releases the GIL: a batch's PNGs encode side by side.
            images = list(state.png_pool.map(encode_png, result.images, result.infotexts))
        else:
            images = [encode_png(result.images[0], result.infotexts[0])]
        encode_seconds = time.perf_counter() - t_encode
        info = {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(result.seeds),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(result.seeds),
            "seed": result.seeds[0],
            "all_seeds": result.seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(result.seeds),
            "subseed_strength": 0,
            "width": req.width,
            "height": req.height,
            "sampler_name": result.sampler_name,
            "scheduler": result.schedule,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "n_iter": req.n_iter,
            "restore_faces": False,
            "sd_model_name": result.model.model_name,
            "sd_model_hash": result.model.short_hash,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": (extra or {}).get("strength"),
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": result.infotexts,
            "styles": body.styles,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": "orch",
            "orch_demo_model": result.model.is_demo,
            "orch_seconds": round(result.seconds, 4),
            "orch_batch_images": result.extra.get("batch_images", 1),
            "orch_queue_seconds": round(queued, 4),
            "orch_gpu_idle_before_seconds": round(job.gpu_idle_before, 4),
            "orch_phase_seconds": result.extra.get("phases", {}),
            "orch_encode_seconds": round(encode_seconds, 4),
        }
        # From the handler's start to here: the rest of a client's wait is HTTP and JSON.
        info["orch_request_seconds"] = round(time.perf_counter() - entered, 4)
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return GenerationOutput(images=images, parameters=parameters, info=json.dumps(info))

    def execute(self, jobs: list[Job], engine) -> list[Any]:
        """The engine's batch executor: one batch of compatible jobs on the GPU worker."""
        head = jobs[0]
        reqs = [j.payload["request"] for j in jobs]

        def answer(index: int, result: Any) -> None:  # a request whose images are ready goes out now
            jobs[index].future.set_result(result)

        return self.state.models.generate_batch(reqs, engine, head.payload.get("model"), head.payload.get("kind", "txt2img"),
                                                head.payload.get("extra"), answer=answer)
