"""Models, samplers and options: what the instance has, and A1111's settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .. import samplers
from ..deps import AUTH, StateDep
from ..errors import ERROR_RESPONSES, ApiRoute
from ..models import ModelNotFound, RequestError
from ..upscalers import LATENT_MODES
from .options import FLAGS, check_types
from .protocol import (EmbeddingsResponse, LatentUpscalerModeItem, LoraItem, NamedItem, SamplerItem, SchedulerItem, ScriptInfo,
                       ScriptsList, SDModelItem, SDVaeItem, UpscalerItem)

router = APIRouter(prefix="/sdapi/v1", tags=["models and options"], dependencies=AUTH, responses=ERROR_RESPONSES,
                   route_class=ApiRoute)


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
    return [SamplerItem(name=s.name, aliases=list(s.aliases), options=s.a1111_options()) for s in samplers.available_samplers()]


@router.get("/schedulers", response_model=list[SchedulerItem])
def list_schedulers() -> list[SchedulerItem]:
    """Schedule types (A1111's `scheduler` field)."""
    return [SchedulerItem(name=s.name, label=s.label, aliases=list(s.aliases) or None, default_rho=s.default_rho,
                          need_inner_model=s.need_inner_model) for s in samplers.SCHEDULES.values()]


def current_options(state) -> dict[str, Any]:
    current = state.models.current
    checkpoint = current.entry.title if current else None
    return {**state.options.all(), "sd_model_checkpoint": checkpoint, "sd_checkpoint_hash": current.entry.short_hash if current else None,
            "sd_checkpoints_limit": state.models.max_resident}


@router.get("/options")
def get_options(state: StateDep) -> dict[str, Any]:
    """A1111's options."""
    return current_options(state)


@router.post("/options")
def set_options(body: dict[str, Any], state: StateDep) -> JSONResponse:
    """Clients post the whole dict back: unknown keys are kept, the checkpoint is switched."""
    models = state.models
    problem = check_types(body)
    if problem:
        raise RequestError(problem)
    checkpoint = body.get("sd_model_checkpoint")
    if "sd_vae" in body:
        models.find_vae(body["sd_vae"], None)
    if "sd_checkpoints_limit" in body:
        limit = body["sd_checkpoints_limit"]
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise RequestError(f"sd_checkpoints_limit: must be a whole number >= 1 (got {limit!r})")
        models.max_resident = limit
    if "samples_format" in body and str(body["samples_format"]).lower() not in ("png", "jpg", "jpeg", "webp"):
        raise RequestError(f"samples_format: {body['samples_format']!r} is not one of png, jpg, webp")
    if "CLIP_stop_at_last_layers" in body and not 1 <= int(body["CLIP_stop_at_last_layers"]) <= 12:
        raise RequestError("CLIP_stop_at_last_layers: must be a whole number from 1 to 12")
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
    """A1111 scripts on this server: none (a request naming one is a 422)."""
    return ScriptsList(txt2img=[], img2img=[])


@router.get("/script-info", response_model=list[ScriptInfo])
def script_info() -> list[ScriptInfo]:
    return []


@router.get("/embeddings", response_model=EmbeddingsResponse)
def embeddings() -> EmbeddingsResponse:
    """Textual-inversion embeddings: none are loaded on orch."""
    return EmbeddingsResponse()


@router.get("/cmd-flags")
def cmd_flags() -> dict[str, Any]:
    """A1111's command-line flags, as orch's server stands."""
    return dict(FLAGS)


@router.get("/upscalers", response_model=list[UpscalerItem])
def upscalers(state: StateDep) -> list[UpscalerItem]:
    """Upscalers for the hires fix and extras: None, Lanczos, Nearest, and the model files under
    models/ESRGAN, RealESRGAN, DAT, SwinIR, ScuNET, HAT."""
    return [UpscalerItem(name=u.name, model_name=u.path.stem if u.path else None, model_path=str(u.path) if u.path else None,
                         model_url=None, scale=u.scale) for u in state.models.upscalers.available()]


@router.get("/latent-upscale-modes", response_model=list[LatentUpscalerModeItem])
def latent_upscale_modes() -> list[LatentUpscalerModeItem]:
    """The hires fix's latent upscalers (no weights)."""
    return [LatentUpscalerModeItem(name=name) for name in LATENT_MODES]


@router.post("/unload-checkpoint")
def unload_checkpoint(state: StateDep) -> JSONResponse:
    """Unload every model from memory; the next request loads its model again."""
    def unload() -> None:
        while state.models.resident:
            state.models.residency.evict()

    state.engine.call(unload)
    return JSONResponse(None)


@router.post("/reload-checkpoint")
def reload_checkpoint(state: StateDep) -> JSONResponse:
    """Load the selected model again (after unload-checkpoint)."""
    entry = state.models.current.entry if state.models.current else None
    name = entry.name if entry else state.readiness.get("model")
    loaded = state.engine.call(lambda: state.models.load(name))
    state.readiness.update(model=loaded.entry.name, demo=loaded.entry.is_demo)
    return JSONResponse(None)


for _empty in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):
    router.add_api_route(f"/{_empty}", lambda: [], methods=["GET"], response_model=list[NamedItem],
                         summary=f"{_empty}: none on orch")
