"""Progress and control of the running job, and memory."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import AUTH, StateDep
from ..errors import ERROR_RESPONSES, ApiRoute
from .protocol import MemoryResponse, ProgressResponse

router = APIRouter(prefix="/sdapi/v1", tags=["progress and control"], dependencies=AUTH, responses=ERROR_RESPONSES,
                   route_class=ApiRoute)


@router.get("/progress", response_model=ProgressResponse)
def progress(state: StateDep, skip_current_image: bool = False) -> dict[str, Any]:
    """The running job's step, how many jobs run or wait, and a live preview (every
    show_progress_every_n_steps steps while live_previews_enable is on)."""
    engine = state.engine
    data = engine.progress.as_a1111()
    busy = engine.busy or engine.queue_depth > 0
    if not busy:
        data.update(progress=0.0, eta_relative=0.0)
    data["state"]["job_count"] = engine.queue_depth + (1 if engine.busy else 0)
    if busy and not skip_current_image:
        data["current_image"] = engine.preview.png_base64()
    return data


@router.post("/interrupt")
def interrupt(state: StateDep) -> JSONResponse:
    """Stop the running job after its current step; what is done so far is returned."""
    state.engine.interrupt()
    return JSONResponse(None)


@router.post("/skip")
def skip(state: StateDep) -> JSONResponse:
    """As interrupt (orch runs a request's images as one job)."""
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
