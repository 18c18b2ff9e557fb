"""Tiling (A1111's "tiling"): every convolution pads circularly, so the image wraps at its edges.

Compiled graphs have the zero padding baked in, so a tiling request runs the model's eager
modules (the compiled ones stay for the other requests).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def circular(*modules):
    import torch

    convs = [m for module in modules if module is not None for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    saved = [c.padding_mode for c in convs]
    for c in convs:
        c.padding_mode = "circular"
    try:
        yield
    finally:
        for c, mode in zip(convs, saved):
            c.padding_mode = mode


@contextlib.contextmanager
def eager(pipe):
    """The pipeline's UNet and VAE decoder run uncompiled inside the block."""
    unet, vae = pipe.unet, pipe.vae
    restore = []
    if hasattr(unet, "_orig_mod"):  # torch.compile'd module
        pipe.unet = unet._orig_mod
        restore.append(lambda: setattr(pipe, "unet", unet))
    module = pipe.unet
    if hasattr(module.forward, "original"):  # a precompiled stand-in (precompiled.py)
        forward = module.forward
        module.forward = forward.original
        restore.append(lambda: setattr(module, "forward", forward))
    decode = vae.decode
    original = getattr(decode, "original", None) or getattr(decode, "_torchdynamo_orig_callable", None)
    if original is not None:
        vae.decode = original
        restore.append(lambda: setattr(vae, "decode", decode))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()
