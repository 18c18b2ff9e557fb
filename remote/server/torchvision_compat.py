"""torchvision's PyPI wheel beside a CPU-only torch (CI, a CPU box): importable, without its C ops.

PyPI's Linux torchvision wheels are built against the CUDA torch: their C ops (_C.so) need
libtorch_cuda.so and libc10_cuda.so, which a CPU-only torch (torch==2.13.0+cpu) lacks, so they do
not load. torchvision then fails at import (0.28: registering a fake kernel for torchvision::nms,
an op that does not exist without _C.so; pytorch/vision#9085), and so does everything that
imports it when it is installed: transformers (and through it diffusers and peft), timm,
controlnet_aux. orch needs none of torchvision's C ops (nms, roi_align, deform_conv...: detection
models), only its Python parts (transforms; timm's and the annotators' models). Declaring the two
ops that torchvision's import registers fakes for lets it import; calling one still fails (no kernel).

Nothing changes where torch has its CUDA libraries (GPU images: torchvision's ops load), where
torchvision is not installed, or where its ops load (a torchvision built for the CPU torch).
Called from remote/server/__init__.py, so before anything of the server imports torchvision.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_fragment = None  # the torch.library fragment declaring the ops; kept alive (a freed one unregisters them)


def allow_import_without_ops() -> bool:
    """Declare torchvision::nms and ::qnms when torchvision's C ops cannot load beside this torch.
    True when it did (now or before). Imports torch only in that case (a CPU torch beside torchvision)."""
    global _fragment
    if _fragment is not None:
        return True
    tv, th = importlib.util.find_spec("torchvision"), importlib.util.find_spec("torch")
    if tv is None or th is None or not tv.origin or not th.origin:
        return False
    if any((Path(th.origin).parent / "lib").glob("libtorch_cuda*")):
        return False  # a CUDA torch: the wheel's ops load
    ops = next(Path(tv.origin).parent.glob("_C.*"), None)
    if ops is None:
        return False
    import torch

    try:
        torch.ops.load_library(str(ops))
        return False  # they load (a torchvision built for this torch): nothing to do
    except OSError:
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return False
    fragment = torch.library.Library("torchvision", "FRAGMENT")
    fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    fragment.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment = fragment
    return True
