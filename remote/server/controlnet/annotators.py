"""Preprocessors that need weights (openpose, depth, lineart, soft edges), through controlnet_aux.

The weights are files the user syncs under models/Annotators (the names lllyasviel/Annotators
gives them, which controlnet_aux reads from a local folder: nothing is fetched). controlnet_aux
is the optional extra `orch[annotators]`, apart from `server` because it needs torchvision
(and timm), which GPU images ship but which, beside a CPU-only torch, pulls another torch unless
pinned to that torch's own (torch 2.13: torchvision==0.28.0); PyPI's torchvision then imports
without its C ops, which no annotator uses (../torchvision_compat.py).
A missing file or library, or a file that is not the detector's, is a 422 that names it. Segmentation (seg_ofade20k, seg_ufade20k)
has no implementation in controlnet_aux: a 422 says so.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

from ..models.types import RequestError
from .preprocessors import Module, hwc3, resize_with_pad

OPENPOSE = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
LINEART = ("sk_model.pth", "sk_model2.pth")

MODULES = [
    Module("openpose", "openpose", None, annotator_files=OPENPOSE, extra={"detector": "OpenposeDetector"}),
    Module("openpose_full", "openpose_full", None, annotator_files=OPENPOSE, priority=100,
           extra={"detector": "OpenposeDetector", "call": {"include_hand": True, "include_face": True}}),
    Module("depth", "depth_midas", None, annotator_files=("dpt_hybrid-midas-501f0c75.pt",), priority=100,
           extra={"detector": "MidasDetector"}),
    Module("lineart", "lineart_realistic", None, annotator_files=LINEART, extra={"detector": "LineartDetector"}),
    Module("lineart_coarse", "lineart_coarse", None, annotator_files=LINEART,
           extra={"detector": "LineartDetector", "call": {"coarse": True}}),
    Module("hed", "softedge_hed", None, annotator_files=("ControlNetHED.pth",), extra={"detector": "HEDdetector"}),
    Module("pidinet", "softedge_pidinet", None, annotator_files=("table5_pidinet.pth",), priority=100,
           extra={"detector": "PidiNetDetector"}),
    Module("oneformer_ade20k", "seg_ofade20k", None, priority=100, extra={"detector": None}),
    Module("segmentation", "seg_ufade20k", None, extra={"detector": None}),
]

_loaded: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def library_installed() -> bool:
    return importlib.util.find_spec("controlnet_aux") is not None


def check(module: Module, annotators_dir: Path) -> None:
    """A 422 naming what this module lacks on this instance: its files, or the library."""
    detector = module.extra.get("detector")
    if detector is None:
        raise RequestError(f"module: {module.label} has no implementation on orch (controlnet_aux has no ADE20k "
                           "segmentor); send a segmentation map you made with module 'none'")
    missing = [name for name in module.annotator_files if not (annotators_dir / name).is_file()]
    if missing:
        raise RequestError(f"module: {module.label} needs the annotator file(s) {', '.join(missing)} under "
                           f"{annotators_dir} (from lllyasviel/Annotators; sync them like any model), or send a "
                           "ready map with module 'none'")
    if not library_installed():
        raise RequestError(f"module: {module.label} needs controlnet_aux, which is not installed on this instance: "
                           "install orch[annotators] (it needs torchvision matching the instance's torch), or send "
                           "a ready map with module 'none'")


def _load(module: Module, annotators_dir: Path):
    """controlnet_aux's detector for this module, its weights read from annotators_dir (a local folder:
    nothing is fetched). A library that does not import, or files that are not the detector's, are a 422."""
    name = module.extra["detector"]
    try:
        import controlnet_aux
    except Exception as e:  # installed (check() saw it) but broken: say why rather than a 500
        raise RequestError(f"module: {module.label} needs controlnet_aux, which is installed but does not import "
                           f"({type(e).__name__}: {e}); send a ready map with module 'none'") from e
    cls = getattr(controlnet_aux, name)
    files = module.annotator_files
    kwargs: dict[str, Any] = {"filename": files[0]}
    if name == "OpenposeDetector":
        kwargs.update(hand_filename=files[1], face_filename=files[2])
    elif name == "LineartDetector":
        kwargs.update(coarse_filename=files[1])
    try:
        return cls.from_pretrained(str(annotators_dir), **kwargs)
    except Exception as e:  # not a checkpoint, or another network's: the user's file, not the server
        raise RequestError(f"module: {module.label}: the annotator file(s) {', '.join(files)} under {annotators_dir} "
                           f"did not load into controlnet_aux's {name} ({type(e).__name__}: {str(e)[:300]}); they must "
                           "be lllyasviel/Annotators' files of those names") from e


def run(module: Module, image, resolution: int, annotators_dir: Path):
    """The module's map (H x W x 3 uint8) from controlnet_aux's detector, its weights read from annotators_dir.

    The image goes in as the extension's processors give it to their models: its short side at
    `resolution`, padded (edge) to multiples of 64, the padding cut off the map. controlnet_aux
    would instead round each side to a multiple of 64 (an 80x48 image at 64: a 128x64 map)."""
    import numpy as np

    check(module, annotators_dir)
    name = module.extra["detector"]
    with _lock:
        key = (name, str(annotators_dir))
        if key not in _loaded:
            _loaded[key] = _load(module, annotators_dir)
        detector = _loaded[key]
    padded, unpad = resize_with_pad(image, resolution)
    side = min(padded.shape[:2])  # multiples of 64 at this side: controlnet_aux's resize_image leaves them as they are
    out = detector(padded, detect_resolution=side, image_resolution=side, output_type="np", **module.extra.get("call", {}))
    return unpad(hwc3(np.asarray(out, dtype=np.uint8)))
