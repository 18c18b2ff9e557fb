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
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import samplers
from .pipelines import GenerationRequest, ModelManager, ModelNotFound

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


def encode_png(image, infotext: str) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


class Activity:
    """When the last generation request came and ended, on the instance disk for the agent."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "activity.json"
        self.lock = threading.Lock()
        self.in_flight = 0
        self.requests = 0

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_request": time.time(), "in_flight": self.in_flight, "requests": self.requests}))
        tmp.replace(self.path)

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            self._write()

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1
            self._write()


def create_app(config: ServerConfig) -> FastAPI:
    app = FastAPI(title="orch image server (A1111-compatible)", version="0.1.0")
    models = ModelManager(config.models_dir, device=config.device)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    activity = Activity(config.state_dir)
    status: dict[str, Any] = {"status": "loading", "started_at": time.time()}
    generate_lock = threading.Lock()
    app.state.models = models
    app.state.status = status

    def load_default() -> None:
        try:
            loaded = models.load()
            status.update(status="ready", model=loaded.entry.name, demo=loaded.entry.is_demo, device=loaded.device,
                          load_seconds=round(loaded.load_seconds, 3))
        except Exception as e:  # reported by /healthz; the process stays up to say why
            log.exception("model load failed")
            status.update(status="error", error=f"{type(e).__name__}: {e}")

    @app.middleware("http")
    async def _time_left_header(request: Request, call_next):
        response = await call_next(request)
        left = _time_left(config.state_dir)
        if left:
            response.headers["X-Orch-Time-Left"] = left
        return response

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
        return _error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {**status, "uptime": round(time.time() - status["started_at"], 3)}

    auth = [Depends(require_token)]

    @app.get("/sdapi/v1/sd-models", dependencies=auth)
    def sd_models() -> list[dict[str, Any]]:
        entries = models.list_models()
        return [
            {"title": f"{e.name} [{e.short_hash}]", "model_name": e.name, "hash": e.short_hash, "sha256": None,
             "filename": str(e.path), "config": None}
            for e in entries
        ]

    @app.get("/sdapi/v1/samplers", dependencies=auth)
    def list_samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in samplers.available_samplers()]

    @app.get("/sdapi/v1/options", dependencies=auth)
    def get_options() -> dict[str, Any]:
        current = models.current
        return {"sd_model_checkpoint": f"{current.entry.name} [{current.entry.short_hash}]" if current else None}

    @app.post("/sdapi/v1/txt2img", dependencies=auth)
    def txt2img(body: Txt2ImgRequest) -> JSONResponse:
        if status["status"] == "loading":
            return _error(503, "the model is still loading; retry in a few seconds", retry_after=5)
        if status["status"] == "error":
            return _error(503, f"no model could be loaded: {status.get('error')}")
        side_limit = config.max_side
        for field in ("width", "height"):
            if getattr(body, field) > side_limit:
                return _error(422, f"{field}: {getattr(body, field)} is larger than this server allows ({side_limit})")
        checkpoint = body.override_settings.get("sd_model_checkpoint")
        try:
            model = models.load(checkpoint) if checkpoint else None
            samplers.resolve(body.sampler_name or body.sampler_index, body.scheduler)
        except ModelNotFound as e:
            return _error(422, f"override_settings.sd_model_checkpoint: {e}")
        except samplers.UnknownSampler as e:
            return _error(422, str(e))
        req = GenerationRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, cfg_scale=body.cfg_scale,
            width=body.width, height=body.height, seed=body.seed, batch_size=body.batch_size, n_iter=body.n_iter,
            sampler_name=body.sampler_name or body.sampler_index, scheduler=body.scheduler,
        )
        activity.begin()
        try:
            with generate_lock:
                result = models.generate(req, model)
        except Exception as e:
            if _is_out_of_memory(e):
                _free_gpu_memory()
                return _error(503, "out of GPU memory: lower width/height or batch_size, or use a larger GPU")
            raise
        finally:
            activity.end()
        images = [encode_png(img, text) for img, text in zip(result.images, result.infotexts)] if body.send_images else []
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
            "sd_model_name": result.model.name,
            "sd_model_hash": result.model.short_hash,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": None,
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
        }
        parameters = body.model_dump()
        return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)})

    return app


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
