"""Progress and control of the running job, memory, and png-info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import AUTH, StateDep
from ..encoding import decode_image
from ..errors import ERROR_RESPONSES
from ..infotext import parse_infotext
from .protocol import MemoryResponse, PngInfoRequest, PNGInfoResponse, ProgressResponse

router = APIRouter(prefix="/sdapi/v1", tags=["progress and control"], dependencies=AUTH, responses=ERROR_RESPONSES)


@router.get("/progress", response_model=ProgressResponse)
def progress(state: StateDep) -> dict[str, Any]:
    """The running job's step, and how many jobs are running or waiting."""
    engine = state.engine
    data = engine.progress.as_a1111()
    if not engine.busy and engine.queue_depth == 0:
        data.update(progress=0.0, eta_relative=0.0)
    data["state"]["job_count"] = engine.queue_depth + (1 if engine.busy else 0)
    return data


@router.post("/interrupt")
def interrupt(state: StateDep) -> JSONResponse:
    """Stop the running job after its current step; what is done so far is returned."""
    state.engine.interrupt()
    return JSONResponse(None)


@router.post("/skip")
def skip(state: StateDep) -> JSONResponse:
    state.engine.progress.skipped = True
    state.engine.interrupt()
    return JSONResponse(None)


@router.get("/memory", response_model=MemoryResponse)
def memory() -> dict[str, Any]:
    """RAM and GPU memory."""
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


@router.post("/png-info", response_model=PNGInfoResponse)
def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """The generation parameters written into an image."""
    img = decode_image(body.image, "image")
    text = img.info.get("parameters", "")
    return {"info": text, "items": {k: v for k, v in img.info.items() if isinstance(v, str)}, "parameters": parse_infotext(text)}
