"""Models, samplers and options: what the instance has, and A1111's settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .. import samplers
from ..deps import AUTH, StateDep
from ..errors import ERROR_RESPONSES
from ..models import ModelNotFound, RequestError
from .protocol import EmbeddingsResponse, LoraItem, SamplerItem, SchedulerItem, ScriptsList, SDModelItem, SDVaeItem

router = APIRouter(prefix="/sdapi/v1", tags=["models and options"], dependencies=AUTH, responses=ERROR_RESPONSES)


def _model_rows(state) -> list[SDModelItem]:
    return [SDModelItem(title=e.title, model_name=e.model_name, hash=e.short_hash, sha256=None, filename=str(e.path), config=None)
            for e in state.models.list_models()]


@router.get("/sd-models", response_model=list[SDModelItem])
def sd_models(state: StateDep) -> list[SDModelItem]:
    """Checkpoints on the instance."""
    return _model_rows(state)


@router.post("/refresh-checkpoints")
def refresh_checkpoints(state: StateDep) -> dict[str, Any]:
    """The models folder is read at every call; answers how many there are."""
    return {"models": len(_model_rows(state))}


@router.get("/sd-vae", response_model=list[SDVaeItem])
def sd_vae(state: StateDep) -> list[SDVaeItem]:
    """VAE files under models/VAE."""
    return [SDVaeItem(model_name=p.name, filename=str(p)) for p in state.models.vae_files()]


@router.post("/refresh-vae")
def refresh_vae(state: StateDep) -> dict[str, Any]:
    return {"vae": len(state.models.vae_files())}


@router.get("/loras", response_model=list[LoraItem])
def loras(state: StateDep) -> list[LoraItem]:
    """LoRA files under models/Lora, used as <lora:name:weight> in prompts."""
    return [LoraItem(name=p.stem, alias=p.stem, path=str(p), metadata={}) for p in state.models.loras.files()]


@router.post("/refresh-loras")
def refresh_loras(state: StateDep) -> dict[str, Any]:
    return {"loras": len(state.models.loras.files())}


@router.get("/samplers", response_model=list[SamplerItem])
def list_samplers() -> list[SamplerItem]:
    """Samplers by A1111 name."""
    return [SamplerItem(name=s.name, aliases=list(s.aliases), options={}) for s in samplers.available_samplers()]


@router.get("/schedulers", response_model=list[SchedulerItem])
def list_schedulers() -> list[SchedulerItem]:
    """Schedule types (A1111's `scheduler` field)."""
    return [SchedulerItem(name=k.lower(), label=k, aliases=None, default_rho=-1, need_inner_model=False)
            for k in samplers.SCHEDULES]


def current_options(state) -> dict[str, Any]:
    current = state.models.current
    checkpoint = current.entry.title if current else None
    return {**state.options.all(), "sd_model_checkpoint": checkpoint, "sd_checkpoint_hash": current.entry.short_hash if current else None}


@router.get("/options")
def get_options(state: StateDep) -> dict[str, Any]:
    """A1111's options."""
    return current_options(state)


@router.post("/options")
def set_options(body: dict[str, Any], state: StateDep) -> JSONResponse:
    """Clients post the whole dict back: unknown keys are kept, the checkpoint is switched."""
    models = state.models
    checkpoint = body.get("sd_model_checkpoint")
    if "sd_vae" in body:
        models.find_vae(body["sd_vae"], None)
    if "sd_checkpoints_limit" in body:
        limit = body["sd_checkpoints_limit"]
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise RequestError(f"sd_checkpoints_limit: must be a whole number >= 1 (got {limit!r})")
        models.max_resident = limit
    if checkpoint:
        try:
            entry = models.find(str(checkpoint))
        except ModelNotFound as e:
            raise RequestError(f"sd_model_checkpoint: {e}") from None
        if not models.current or models.current.entry.path != entry.path:
            loaded = state.engine.call(lambda: models.load(entry.name))
            state.readiness.update(model=loaded.entry.name, demo=loaded.entry.is_demo)
    state.options.update({k: v for k, v in body.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")})
    return JSONResponse(None)


@router.get("/scripts", response_model=ScriptsList)
def scripts() -> ScriptsList:
    return ScriptsList(txt2img=[], img2img=[])


@router.get("/script-info")
def script_info() -> list:
    return []


@router.get("/embeddings", response_model=EmbeddingsResponse)
def embeddings() -> EmbeddingsResponse:
    return EmbeddingsResponse()


@router.get("/cmd-flags")
def cmd_flags() -> dict[str, Any]:
    return {"api": True, "api_auth": "orch:***", "listen": False}


for _empty in ("upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):
    router.add_api_route(f"/{_empty}", lambda: [], methods=["GET"])
