"""For operators: /healthz (public: start-up status) and /metrics (Prometheus text)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from .deps import AUTH, StateDep
from .errors import ERROR_RESPONSES, ApiRoute

router = APIRouter(tags=["ops"], route_class=ApiRoute)


@router.get("/healthz")
def healthz(state: StateDep) -> dict[str, Any]:
    """Start-up status: loading, warming-up, ready or error; when each phase ended; the model."""
    status = state.readiness.snapshot()
    extra: dict[str, Any] = {}
    if status.get("compiled") == "done" and state.models.precompiled_dir is not None:
        from .precompiled import STATS

        # How the compiled graphs came: loaded from disk (a warm start) or traced and compiled here.
        extra["precompiled"] = {"loaded": STATS.loaded, "compiled": STATS.compiled, "fallback_calls": STATS.fallback_calls,
                                "load_seconds": round(STATS.load_seconds, 3),
                                "compile_seconds": round(STATS.compile_seconds, 3), "errors": STATS.errors[-5:]}
    return {**status, **extra, "uptime": round(time.time() - status["started_at"], 3)}


@router.get("/metrics", dependencies=AUTH, response_class=PlainTextResponse,
            responses={401: ERROR_RESPONSES[401], 500: ERROR_RESPONSES[500]})
def metrics(state: StateDep) -> PlainTextResponse:
    """Counters and gauges in Prometheus' text format."""
    counters, engine, models = state.counters, state.engine, state.models
    gen_s = counters.gen_seconds_total
    lines = [
        "# TYPE orch_requests_total counter", f"orch_requests_total {counters.requests_total}",
        "# TYPE orch_errors_total counter", f"orch_errors_total {counters.errors_total}",
        "# TYPE orch_images_total counter", f"orch_images_total {counters.images_total}",
        "# TYPE orch_queue_depth gauge", f"orch_queue_depth {engine.queue_depth}",
        "# TYPE orch_batches_total counter", f"orch_batches_total {engine.batches}",
        "# TYPE orch_iterations_per_second gauge",
        f"orch_iterations_per_second {counters.steps_total / gen_s if gen_s else 0:.4f}",
        "# TYPE orch_model_load_seconds gauge",
    ]
    lines += [f'orch_model_load_seconds{{model="{name}"}} {sec:.3f}' for name, sec in models.load_times.items()]
    lines += ["# TYPE orch_prompt_cache_hits_total counter", "# TYPE orch_prompt_cache_misses_total counter"]
    for loaded in models.resident:
        name = loaded.entry.name
        lines += [f'orch_prompt_cache_hits_total{{model="{name}"}} {loaded.prompts.hits}',
                  f'orch_prompt_cache_misses_total{{model="{name}"}} {loaded.prompts.misses}']
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
