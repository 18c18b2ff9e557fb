"""The image server: an A1111-compatible API over diffusers, for the instance's 127.0.0.1.

Existing A1111 clients talk to it unchanged through the tunnel. Every route but /healthz
needs the instance's token, as `Authorization: Bearer TOKEN` or HTTP Basic `orch:TOKEN`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import lora, samplers
from .activity import Activity
from .pipelines import GenerationRequest, ModelManager, ModelNotFound, RequestError

log = logging.getLogger("orch.server")

MAX_SIDE = 2048


@dataclass
class ServerConfig:
    token: str
    models_dir: Path
    state_dir: Path  # ~/.orch on the instance: activity file for the agent
    device: str | None = None
    max_side: int = MAX_SIDE


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: its defaults; unknown fields are ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=16)
    steps: int = Field(50, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64)
    height: int = Field(512, ge=64)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}; nearest: {v - v % 8} or {v - v % 8 + 8})")
        return v


def _error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": HTTPStatusName.get(status, "Error"), "detail": detail, **extra})


HTTPStatusName = {401: "Unauthorized", 404: "NotFound", 422: "ValidationError", 500: "InternalError", 503: "ServiceUnavailable"}


def process_age() -> float:
    """Seconds since this process started (Linux /proc; the interpreter's own start-up included)."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in clock ticks after boot
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()


def encode_png(image, infotext: str) -> bytes:
    """Base64 PNG (ASCII bytes) with A1111's `parameters` text chunk, deflated on several cores (png.py)."""
    from .png import encode_png as png_bytes

    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    return base64.b64encode(png_bytes(image, {"parameters": infotext}))


def images_json(images: list[bytes], **rest: Any) -> bytes:
    """The JSON object {"images": [...], **rest}, images given as base64 bytes.

    Base64 needs no escaping in JSON, so the megabytes of images are joined as bytes and only
    the small rest goes through json.dumps, which took 25 ms for one 1.4 MB image string on an
    H100 host (a tenth of an SD1.5 image's time, with the GIL held)."""
    for image in images:  # what would break the JSON string (base64 has none of it); memchr-fast
        if not image.isascii() or b'"' in image or b"\\" in image or b"\n" in image:
            raise ValueError("images_json takes base64 only")
    body = b'{"images":[' + b",".join(b'"' + image + b'"' for image in images) + b"]"
    if rest:
        body += b"," + json.dumps(rest, ensure_ascii=False, allow_nan=False, separators=(",", ":"))[1:].encode()
        return body
    return body + b"}"


class PngInfoRequest(BaseModel):
    image: str


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionImg2ImgProcessingAPI (the fields clients rely on)."""

    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None
    inpainting_fill: int = 0
    mask_blur: int = 4
    inpaint_full_res: bool = False
    resize_mode: int = 0


def decode_image(b64: str, field: str):
    """A base64 image, with or without a data: prefix; a bad one names its field."""
    from PIL import Image, UnidentifiedImageError

    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[-1]
    try:
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=False)))
        img.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise HTTPException(status_code=422, detail=f"{field}: not a base64-encoded image ({type(e).__name__})") from None
    return img


def create_app(config: ServerConfig) -> FastAPI:
    from .engine import Engine, Job

    app = FastAPI(title="orch image server (A1111-compatible)", version="0.1.0")
    models = ModelManager(config.models_dir, device=config.device)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    activity = Activity(config.state_dir)
    status: dict[str, Any] = {"status": "loading", "started_at": time.time()}
    options: dict[str, Any] = {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png"}
    started = time.monotonic()
    counters = {"requests_total": 0, "errors_total": 0, "images_total": 0, "steps_total": 0, "gen_seconds_total": 0.0}

    def execute(jobs: list[Job], engine: Engine) -> list[Any]:
        head = jobs[0]
        reqs = [j.payload["request"] for j in jobs]
        def answer(index: int, result: Any) -> None:  # a request whose images are ready goes out now
            jobs[index].future.set_result(result)

        return models.generate_batch(reqs, engine, head.payload.get("model"), head.payload.get("kind", "txt2img"),
                                     head.payload.get("extra"), answer=answer)

    engine = Engine(execute, max_batch=int(os.environ.get("ORCH_MAX_BATCH", "8")))
    from concurrent.futures import ThreadPoolExecutor

    png_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="png")
    app.state.models = models
    app.state.status = status
    app.state.engine = engine

    def mark(phase: str) -> None:
        """When each start-up phase ended, in seconds since the process started (as /healthz shows)."""
        status.setdefault("startup_seconds", {})[phase] = round(process_age(), 3)

    def load_default() -> None:
        try:
            mark("server_up")
            models.prefetch_default()
            t_import = time.monotonic()
            # Most of a start-up on a GPU host (torch, diffusers, transformers): measured apart.
            import torch  # noqa: F401
            from diffusers import StableDiffusionPipeline  # noqa: F401

            status["import_seconds"] = round(time.monotonic() - t_import, 3)
            mark("imports")
            loaded = engine.call(models.load)
            mark("model_loaded")
            status.update(status="warming-up", model=loaded.entry.name, demo=loaded.entry.is_demo, device=loaded.device,
                          load_seconds=round(loaded.load_seconds, 3))
            sizes, batches = _warmup_plan(loaded)
            shapes = [(size, b) for size in sizes for b in batches]
            # Compiled before "ready", on the worker. (Serving uncompiled meanwhile was tried on
            # an H100: the uncompiled model crawled behind the compiling thread's GIL, and
            # Inductor's FX tracing patches nn.Module calls process-wide, which broke it.)
            if shapes and models.compile_enabled(loaded):
                engine.set_batch_sizes(batches)
                engine.call(lambda: models.compile(loaded))
                status["compiled"] = "done"
                mark("compile_set_up")
            if shapes:
                # The first shape before "ready"; the rest warm up behind it on the worker,
                # so the first user waits for one compile, not all of them.
                status["warmup_seconds"] = round(engine.call(lambda: models.warm_up(sizes[:1], batches[:1])), 3)
            status["status"] = "ready"
            status["ready_seconds"] = round(time.monotonic() - started, 3)
            mark("ready")
            rest = shapes[1:]
            if rest:
                # One background job per shape: a user request waits for at most one of them.
                status["background_warmup"] = "running"
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
                        if _is_out_of_memory(f.exception()):
                            _free_gpu_memory()
                    if all(x.done() for x in futures):
                        status.update(background_warmup="failed: " + "; ".join(failed) if failed else "done",
                                      background_warmup_seconds=round(time.monotonic() - t_rest, 3))

                for f in futures:
                    f.add_done_callback(done)
        except Exception as e:  # reported by /healthz; the process stays up to say why
            log.exception("model load failed")
            status.update(status="error", error=f"{type(e).__name__}: {e}")

    @app.on_event("startup")
    def _start_loading() -> None:
        threading.Thread(target=load_default, name="model-load", daemon=True).start()

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            given = password if user == "orch" else ""
        if not given or not secrets.compare_digest(given.encode(), config.token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong token: send 'Authorization: Bearer TOKEN' or HTTP Basic orch:TOKEN (orch status --json shows it)",
                headers={"WWW-Authenticate": 'Basic realm="orch"'},
            )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        messages = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            field = ".".join(loc) or "body"
            msg = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                msg = f"malformed JSON: {err.get('ctx', {}).get('error', msg)}"
                field = "body"
            messages.append(f"{field}: {msg.removeprefix('Value error, ')}")
        return _error(422, "; ".join(messages), errors=jsonable_encoder(exc.errors(), custom_encoder={Exception: str}))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed: %s %s", request.method, request.url.path)
        counters["errors_total"] += 1
        return _error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if status.get("compiled") == "done" and models.precompiled_dir is not None:
            from .precompiled import STATS

            # How the compiled graphs came: loaded from disk (a warm start) or traced and compiled here.
            extra["precompiled"] = {"loaded": STATS.loaded, "compiled": STATS.compiled, "fallback_calls": STATS.fallback_calls,
                                    "load_seconds": round(STATS.load_seconds, 3),
                                    "compile_seconds": round(STATS.compile_seconds, 3), "errors": STATS.errors[-5:]}
        return {**status, **extra, "uptime": round(time.time() - status["started_at"], 3)}

    auth = [Depends(require_token)]

    def model_rows() -> list[dict[str, Any]]:
        return [
            {"title": f"{e.name} [{e.short_hash}]", "model_name": e.model_name, "hash": e.short_hash, "sha256": None,
             "filename": str(e.path), "config": None}
            for e in models.list_models()
        ]

    @app.get("/sdapi/v1/sd-models", dependencies=auth)
    def sd_models() -> list[dict[str, Any]]:
        return model_rows()

    @app.post("/sdapi/v1/refresh-checkpoints", dependencies=auth)
    def refresh_checkpoints() -> dict[str, Any]:
        return {"models": len(model_rows())}

    @app.get("/sdapi/v1/sd-vae", dependencies=auth)
    def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": p.name, "filename": str(p)} for p in models.vae_files()]

    @app.post("/sdapi/v1/refresh-vae", dependencies=auth)
    def refresh_vae() -> dict[str, Any]:
        return {"vae": len(sd_vae())}

    @app.get("/sdapi/v1/loras", dependencies=auth)
    def loras() -> list[dict[str, Any]]:
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in models.loras.files()]

    @app.post("/sdapi/v1/refresh-loras", dependencies=auth)
    def refresh_loras() -> dict[str, Any]:
        return {"loras": len(loras())}

    @app.get("/sdapi/v1/samplers", dependencies=auth)
    def list_samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in samplers.available_samplers()]

    @app.get("/sdapi/v1/schedulers", dependencies=auth)
    def list_schedulers() -> list[dict[str, Any]]:
        return [{"name": k.lower(), "label": k, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for k in samplers.SCHEDULES]

    def current_options() -> dict[str, Any]:
        current = models.current
        checkpoint = f"{current.entry.name} [{current.entry.short_hash}]" if current else None
        return {**options, "sd_model_checkpoint": checkpoint, "sd_checkpoint_hash": current.entry.short_hash if current else None}

    @app.get("/sdapi/v1/options", dependencies=auth)
    def get_options() -> dict[str, Any]:
        return current_options()

    @app.post("/sdapi/v1/options", dependencies=auth)
    def set_options(body: dict[str, Any]) -> JSONResponse:
        # Clients post the whole dict back: unknown keys are kept, the checkpoint is switched.
        checkpoint = body.get("sd_model_checkpoint")
        if "sd_vae" in body:
            try:
                models.find_vae(body["sd_vae"], None)
            except RequestError as e:
                return _error(422, str(e))
        if "sd_checkpoints_limit" in body:
            limit = body["sd_checkpoints_limit"]
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                return _error(422, f"sd_checkpoints_limit: must be a whole number >= 1 (got {limit!r})")
            models.max_resident = limit
        if checkpoint:
            try:
                entry = models.find(str(checkpoint))
            except ModelNotFound as e:
                return _error(422, f"sd_model_checkpoint: {e}")
            if not models.current or models.current.entry.path != entry.path:
                try:
                    loaded = engine.call(lambda: models.load(entry.name))
                except RequestError as e:
                    return _error(422, str(e))
                status.update(model=loaded.entry.name, demo=loaded.entry.is_demo)
        options.update({k: v for k, v in body.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")})
        return JSONResponse(None)

    @app.get("/sdapi/v1/progress", dependencies=auth)
    def progress() -> dict[str, Any]:
        data = engine.progress.as_a1111()
        if not engine.busy and engine.queue_depth == 0:
            data.update(progress=0.0, eta_relative=0.0)
        data["state"]["job_count"] = engine.queue_depth + (1 if engine.busy else 0)
        return data

    @app.post("/sdapi/v1/interrupt", dependencies=auth)
    def interrupt() -> JSONResponse:
        engine.interrupt()
        return JSONResponse(None)

    @app.post("/sdapi/v1/skip", dependencies=auth)
    def skip() -> JSONResponse:
        engine.progress.skipped = True
        engine.interrupt()
        return JSONResponse(None)

    @app.get("/sdapi/v1/memory", dependencies=auth)
    def memory() -> dict[str, Any]:
        import psutil  # installed with accelerate

        vm = psutil.virtual_memory()
        out: dict[str, Any] = {"ram": {"free": vm.available, "used": vm.used, "total": vm.total}, "cuda": {"error": "no CUDA"}}
        try:
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                out["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                               "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
                               "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()}}
        except Exception as e:
            out["cuda"] = {"error": str(e)}
        return out

    @app.get("/sdapi/v1/scripts", dependencies=auth)
    def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info", dependencies=auth)
    def script_info() -> list:
        return []

    for empty in ("upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):
        app.add_api_route(f"/sdapi/v1/{empty}", lambda: [], methods=["GET"], dependencies=auth)

    @app.get("/sdapi/v1/embeddings", dependencies=auth)
    def embeddings() -> dict[str, Any]:
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/cmd-flags", dependencies=auth)
    def cmd_flags() -> dict[str, Any]:
        return {"api": True, "api_auth": "orch:***", "listen": False}

    @app.post("/sdapi/v1/png-info", dependencies=auth)
    def png_info(body: PngInfoRequest) -> dict[str, Any]:
        img = decode_image(body.image, "image")
        text = img.info.get("parameters", "")
        return {"info": text, "items": {k: v for k, v in img.info.items() if isinstance(v, str)}, "parameters": parse_infotext(text)}

    @app.get("/metrics", dependencies=auth)
    def metrics():
        from fastapi.responses import PlainTextResponse

        gen_s = counters["gen_seconds_total"]
        lines = [
            "# TYPE orch_requests_total counter", f"orch_requests_total {counters['requests_total']}",
            "# TYPE orch_errors_total counter", f"orch_errors_total {counters['errors_total']}",
            "# TYPE orch_images_total counter", f"orch_images_total {counters['images_total']}",
            "# TYPE orch_queue_depth gauge", f"orch_queue_depth {engine.queue_depth}",
            "# TYPE orch_batches_total counter", f"orch_batches_total {engine.batches}",
            "# TYPE orch_iterations_per_second gauge",
            f"orch_iterations_per_second {counters['steps_total'] / gen_s if gen_s else 0:.4f}",
            "# TYPE orch_model_load_seconds gauge",
        ]
        lines += [f'orch_model_load_seconds{{model="{name}"}} {sec:.3f}' for name, sec in models.load_times.items()]
        lines += ["# TYPE orch_prompt_cache_hits_total counter", "# TYPE orch_prompt_cache_misses_total counter"]
        for loaded in models.resident:
            name = loaded.entry.name
            lines += [f'orch_prompt_cache_hits_total{{model="{name}"}} {loaded.prompts.hits}',
                      f'orch_prompt_cache_misses_total{{model="{name}"}} {loaded.prompts.misses}']
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def check_ready() -> JSONResponse | None:
        if status["status"] in ("loading", "warming-up"):
            return _error(503, "the model is still loading; retry in a few seconds", retry_after=5)
        if status["status"] == "error":
            return _error(503, f"no model could be loaded: {status.get('error')}")
        return None

    def run_generation(body: Txt2ImgRequest, kind: str, extra: dict[str, Any] | None) -> JSONResponse:
        entered = time.perf_counter()
        not_ready = check_ready()
        if not_ready:
            return not_ready
        for field in ("width", "height"):
            if getattr(body, field) > config.max_side:
                return _error(422, f"{field}: {getattr(body, field)} is larger than this server allows ({config.max_side})")
        checkpoint = body.override_settings.get("sd_model_checkpoint")
        vae = body.override_settings.get("sd_vae", options.get("sd_vae"))
        try:
            model_name = models.find(checkpoint).name if checkpoint else None
            spec, schedule = samplers.resolve(body.sampler_name or body.sampler_index, body.scheduler)
            _, loras = lora.parse_prompt(body.prompt)
            for name, _weight in loras:
                models.loras.find(name)
            models.find_vae(vae, None)
        except ModelNotFound as e:
            return _error(422, f"override_settings.sd_model_checkpoint: {e}")
        except (samplers.UnknownSampler, lora.LoraError, RequestError) as e:
            return _error(422, str(e))
        req = GenerationRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, cfg_scale=body.cfg_scale,
            width=body.width, height=body.height, seed=body.seed, batch_size=body.batch_size, n_iter=body.n_iter,
            sampler_name=body.sampler_name or body.sampler_index, scheduler=body.scheduler, loras=loras, vae=vae,
        )
        current = models.current
        key = (kind, model_name or (current.entry.name if current else None), req.width, req.height, req.steps, req.cfg_scale,
               spec.name, schedule, loras, vae) if kind == "txt2img" else (kind, id(body))
        job = Job(kind="txt2img" if kind == "txt2img" else "img2img", key=key, images=req.batch_size * req.n_iter,
                  payload={"request": req, "model": model_name, "kind": kind, "extra": extra})
        counters["requests_total"] += 1
        activity.begin()
        try:
            result = engine.submit(job).result()
            queued = job.started - job.enqueued
        except RequestError as e:
            counters["errors_total"] += 1
            return _error(422, str(e))
        except Exception as e:
            counters["errors_total"] += 1
            if _is_out_of_memory(e):
                _free_gpu_memory()
                return _error(503, "out of GPU memory: lower width/height or batch_size, or use a larger GPU")
            raise
        finally:
            activity.end()
        counters["images_total"] += len(result.images)
        counters["steps_total"] += req.steps * (1 + (result.extra.get("batch_images", 1) > 1))
        counters["gen_seconds_total"] += result.seconds
        # PNG encoding happens here, on the HTTP thread, while the GPU runs the next batch.
        t_encode = time.perf_counter()
        if not body.send_images:
            images = []
        elif len(result.images) > 1:
            # zlib releases the GIL: a batch's PNGs encode side by side.
            images = list(png_pool.map(encode_png, result.images, result.infotexts))
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
        return Response(images_json(images, parameters=parameters, info=json.dumps(info)), media_type="application/json")

    @app.post("/sdapi/v1/txt2img", dependencies=auth)
    def txt2img(body: Txt2ImgRequest) -> JSONResponse:
        return run_generation(body, "txt2img", None)

    @app.post("/sdapi/v1/img2img", dependencies=auth)
    def img2img(body: Img2ImgRequest) -> JSONResponse:
        if not body.init_images:
            return _error(422, "init_images: give at least one base64 image")
        init = decode_image(body.init_images[0], "init_images.0").convert("RGB").resize((body.width, body.height))
        extra: dict[str, Any] = {"image": init, "strength": body.denoising_strength}
        kind = "img2img"
        if body.mask:
            mask = decode_image(body.mask, "mask").convert("L").resize((body.width, body.height))
            extra.update(mask_image=mask, width=body.width, height=body.height)
            kind = "inpaint"
        return run_generation(body, kind, extra)

    # A plain ASGI wrapper (not BaseHTTPMiddleware, which re-streams every body): adds the
    # agent's time left before each deadline to every response.
    inner = app.build_middleware_stack

    def build_stack():
        asgi = inner()

        async def with_time_left(scope, receive, send):
            if scope["type"] != "http":
                return await asgi(scope, receive, send)

            async def send_with_header(message):
                if message["type"] == "http.response.start":
                    left = _time_left(config.state_dir)
                    if left:
                        message["headers"] = [*message.get("headers", []), (b"x-orch-time-left", left.encode())]
                await send(message)

            await asgi(scope, receive, send_with_header)

        return with_time_left

    app.build_middleware_stack = build_stack  # type: ignore[method-assign]
    return app


def _warmup_plan(loaded) -> tuple[list[tuple[int, int]], list[int]]:
    """What to run at boot so compiling is done before the first user request.

    ORCH_WARMUP="512x512,768x512:1,8" names sizes and batch sizes; default on CUDA:
    default_warmup(); on CPU nothing (no compile there).
    """
    spec = os.environ.get("ORCH_WARMUP")
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


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext back into fields: Prompt, Negative prompt, and each 'Key: value'."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 and ":" in lines[-1] else ""
    body = lines[:-1] if params_line else lines
    prompt_lines, negative = [], []
    target = prompt_lines
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:"):].strip()
        target.append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative)}
    for part in params_line.split(", "):
        key, _, value = part.partition(": ")
        if key and value:
            out[key.strip()] = value.strip()
    return out


def _time_left(state_dir: Path) -> str:
    """The agent's latest view, e.g. 'idle=14m59s; max_lifetime=7h58m; heartbeat=9m31s'."""
    try:
        status = json.loads((state_dir / "agent" / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    age = time.time() - status.get("at", 0)
    parts = []
    for key, value in sorted(status.get("left", {}).items()):
        if key == "budget_usd":
            parts.append(f"budget=${value:.2f}")
        else:
            parts.append(f"{key}={_short(value - age)}")
    return "; ".join(parts)


def _short(seconds: float) -> str:
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _is_out_of_memory(e: Exception) -> bool:
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return "out of memory" in str(e).lower()


def _free_gpu_memory() -> None:
    try:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def config_as_dict(config: ServerConfig) -> dict[str, Any]:
    data = asdict(config)
    data["token"] = "***"
    return data
