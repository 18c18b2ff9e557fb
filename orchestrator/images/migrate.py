"""`orch migrate NAME --provider P`: save → up elsewhere from that image → verify → down the old one.

Until the new instance has answered one generation with the same model, nothing of the old
one is touched. A failed step undoes what that step made (a new instance is stopped, never
left billing) and the result says exactly where things stand: which instance runs, which
image exists, what to run next. Steps are injectable so each failure path is tested.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Callable

from ..errors import LifecycleError, OrchError
from ..lifecycle.options import UpOptions
from ..lifecycle.states import LifecycleState


@dataclass
class Step:
    step: str
    status: str  # done | failed | skipped | undone
    seconds: float = 0.0
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "status": self.status, "seconds": round(self.seconds, 3), "detail": self.detail}


@dataclass
class MigrateResult:
    name: str  # the new instance
    source: str
    image: str
    url: str | None
    steps: list[Step] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "from": self.source, "image": self.image, "url": self.url,
                "steps": [s.as_json() for s in self.steps]}


class MigrateFailed(LifecycleError):
    def __init__(self, message: str, result: MigrateResult):
        super().__init__(message)
        self.result = result


def current_model(orch, name: str) -> str | None:
    """The model the instance serves now, from one generation's infotext (what verify compares)."""
    with TemporaryDirectory() as tmp:
        out = orch.gen(name, {"prompt": "orch migrate check", "steps": 1, "width": 64, "height": 64, "seed": 1,
                              "batch_size": 1, "n_iter": 1}, Path(tmp))
    return (out.get("info") or {}).get("sd_model_name") or _model_from_infotext(out.get("info") or {})


def _model_from_infotext(info: dict[str, Any]) -> str | None:
    for text in info.get("infotexts") or []:
        for part in text.split(", "):
            if part.startswith("Model: "):
                return part[len("Model: "):]
    return None


def migrate(orch, name: str, provider: str, region: str | None = None, gpu: str | None = None, new_name: str | None = None,
            image: str | None = None, save: Callable | None = None, verify: Callable | None = None) -> MigrateResult:
    from .save import save as save_image

    save = save or save_image
    verify = verify or current_model
    old = orch.resolve(name, want_running=False)
    if old.state != LifecycleState.RUNNING:
        raise LifecycleError(f"{name} is {old.state.lower()}: migrate moves a running instance; `orch up {name}` first")
    image = image or f"{name}-migrate-{time.strftime('%Y%m%d-%H%M%S')}"
    new_name = new_name or f"{name}-{provider.replace(',', '-')}"
    if orch.state.get(new_name) is not None:
        raise LifecycleError(f"an instance named {new_name} exists; pass --as NEW_NAME")
    result = MigrateResult(new_name, name, image, None)

    def step(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            value = fn()
        except BaseException as e:
            result.steps.append(Step(label, "failed", time.monotonic() - t0, str(e).splitlines()[0] if str(e) else type(e).__name__))
            raise
        result.steps.append(Step(label, "done", time.monotonic() - t0))
        return value

    # 1. save the old one (it keeps running)
    try:
        expected = step("check", lambda: verify(orch, name))
        step("save", lambda: save(orch.ctx, orch.resolve(name, False), image))
    except BaseException as e:
        raise MigrateFailed(f"migrate stopped at {result.steps[-1].step}: {e}. {name} keeps running, untouched.", result) from None
    # 2. the new one, from the image
    try:
        up = step("up", lambda: orch.up(UpOptions(name=new_name, provider=provider, region=region, gpu=gpu, from_image=image,
                                                   deadlines=old.deadlines, detach=True)))
        result.url = up.record.url
    except BaseException as e:
        where = orch.state.get(new_name)
        left = f"{new_name} is {where.state.lower()} (`orch down {new_name} --terminate` removes it); " if where else ""
        raise MigrateFailed(f"migrate stopped at up: {e}. {name} keeps running, untouched; {left}image {image} is kept "
                            f"(`orch up NEW --from-image {image}` tries again).", result) from None
    # 3. verify: one generation, the same model
    try:
        got = step("verify", lambda: verify(orch, new_name))
        if got != expected:
            result.steps[-1].status = "failed"
            raise LifecycleError(f"{new_name} serves model {got!r}, {name} served {expected!r}")
    except BaseException as e:
        _undo_new(orch, new_name, result)
        raise MigrateFailed(f"migrate stopped at verify: {e}. {name} keeps running, untouched; {new_name} was stopped; "
                            f"image {image} is kept.", result) from None
    # 4. only now: the old one stops
    try:
        step("down", lambda: orch.down(name))
    except BaseException as e:
        raise MigrateFailed(f"migrate: {new_name} is up and verified at {result.url}, but stopping {name} failed: {e}; "
                            f"`orch down {name}` stops it.", result) from None
    return result


def _undo_new(orch, new_name: str, result: MigrateResult) -> None:
    t0 = time.monotonic()
    try:
        orch.down(new_name)
        result.steps.append(Step("undo up", "done", time.monotonic() - t0, f"{new_name} stopped"))
    except OrchError as e:
        result.steps.append(Step("undo up", "failed", time.monotonic() - t0, f"{e}; `orch down {new_name}` stops it"))


__all__ = ["MigrateFailed", "MigrateResult", "Step", "migrate"]
