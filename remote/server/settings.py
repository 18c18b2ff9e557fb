"""The server's settings: read once, from argv and ORCH_* environment variables, in __main__.py.

Nothing below __main__ reads the environment: create_app() gets a ServerSettings and passes
what each part needs down to it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MAX_SIDE = 2048


@dataclass(frozen=True)
class ServerSettings:
    token: str
    models_dir: Path
    state_dir: Path  # ~/.orch on the instance: activity file for the agent
    device: str | None = None  # cuda or cpu; None: cuda where present
    max_side: int = MAX_SIDE  # the largest width or height a request may ask for
    max_batch: int = 8  # images in one pipeline call (ORCH_MAX_BATCH)
    warmup: str | None = None  # ORCH_WARMUP: "512x512,768x512:1,8"; None: the default plan; "0": none
    compile: bool | None = None  # ORCH_COMPILE: None: on a GPU only
    compile_backend: str = "inductor"  # ORCH_COMPILE_BACKEND ("eager" in tests: Dynamo without codegen)
    resident_models: int = 3  # ORCH_RESIDENT_MODELS (A1111's sd_checkpoints_limit)
    precompiled_dir: Path | None = None  # ORCH_PRECOMPILED_DIR: saved standalone compiled graphs
    cudnn_benchmark: bool = False  # ORCH_CUDNN_BENCHMARK
    keep_outputs: bool = True  # ORCH_KEEP_OUTPUTS=0: generated images are not kept under state_dir/outputs (the gallery)
    activity_name: str = "activity.json"  # under state_dir; a GPU replica writes its own (replicas/replica.py)

    @property
    def outputs_dir(self) -> Path:
        return self.state_dir / "outputs"

    @classmethod
    def from_env(cls, token: str, models_dir: Path, state_dir: Path, device: str | None = None,
                 environ: Mapping[str, str] = os.environ, activity_name: str = "activity.json") -> ServerSettings:
        compile_flag = environ.get("ORCH_COMPILE")
        precompiled = environ.get("ORCH_PRECOMPILED_DIR")
        return cls(
            token=token, models_dir=models_dir, state_dir=state_dir, device=device,
            max_batch=int(environ.get("ORCH_MAX_BATCH", "8")),
            warmup=environ.get("ORCH_WARMUP"),
            compile=None if compile_flag is None else compile_flag != "0",
            compile_backend=environ.get("ORCH_COMPILE_BACKEND", "inductor"),
            resident_models=int(environ.get("ORCH_RESIDENT_MODELS") or 3),
            precompiled_dir=Path(precompiled) if precompiled else None,
            cudnn_benchmark=environ.get("ORCH_CUDNN_BENCHMARK") == "1",
            keep_outputs=environ.get("ORCH_KEEP_OUTPUTS", "1") != "0",
            activity_name=activity_name,
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["token"] = "***"
        return data


ServerConfig = ServerSettings  # the name before the split
