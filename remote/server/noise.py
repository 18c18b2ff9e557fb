"""Each image's starting noise from its own seed, as A1111 draws it.

An image's noise comes from a CPU generator seeded with its seed, so the same seed gives the
same picture alone or anywhere in a batch, on any device. Variation seeds (subseed,
subseed_strength) blend in a second noise by spherical interpolation; "resize seed from"
draws the noise at another size and places it in the middle, so a picture keeps its
composition at a new size. The generators go on to the pipeline, which draws the noise of
later steps (ancestral and SDE samplers) from them, image by image.
"""

from __future__ import annotations

from typing import Any


def generators(seeds: list[int]):
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def slerp(t: float, low, high):
    """Spherical interpolation from `low` (t=0) to `high` (t=1), over the whole tensor."""
    import torch

    a, b = low.flatten().double(), high.flatten().double()
    dot = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return ((torch.sin((1 - t) * omega) / so) * low.double() + (torch.sin(t * omega) / so) * high.double()).to(low.dtype)


def needs_custom_noise(subseed_strength: float, resize_w: int, resize_h: int) -> bool:
    """Whether the noise differs from what each image's generator would draw by itself."""
    return subseed_strength > 0 or (resize_w > 0 and resize_h > 0)


def initial_noise(gens: list[Any], shape: tuple[int, int, int], dtype, subseeds: list[int] | None = None,
                  subseed_strength: float = 0.0, resize_from: tuple[int, int] | None = None):
    """(N, C, H, W) noise, one image per generator (each advanced as the pipeline would advance it)."""
    import torch

    c, h, w = shape
    from_h, from_w = (resize_from[1] // 8, resize_from[0] // 8) if resize_from and resize_from[0] > 0 and resize_from[1] > 0 else (h, w)
    out = []
    for i, g in enumerate(gens):
        if (from_h, from_w) == (h, w):
            noise = torch.randn((1, c, h, w), generator=g, dtype=dtype)
        else:
            small = torch.randn((1, c, from_h, from_w), generator=torch.Generator("cpu").manual_seed(g.initial_seed()),
                                dtype=dtype)
            noise = torch.randn((1, c, h, w), generator=g, dtype=dtype)
            # The small noise in the middle (cropped to fit when it is the larger one).
            dy, dx = (h - from_h) // 2, (w - from_w) // 2
            th, tw = min(h, from_h), min(w, from_w)
            ty, tx = max(dy, 0), max(dx, 0)
            sy, sx = max(-dy, 0), max(-dx, 0)
            noise[:, :, ty:ty + th, tx:tx + tw] = small[:, :, sy:sy + th, sx:sx + tw]
        if subseeds is not None and subseed_strength > 0:
            sub = torch.randn(noise.shape, generator=torch.Generator("cpu").manual_seed(int(subseeds[i])), dtype=dtype)
            noise = slerp(subseed_strength, noise, sub)
        out.append(noise)
    return torch.cat(out)
