"""A module's eager forward replayed as a CUDA graph, one graph per input signature.

For the text encoders. At batch 1 the GPU waits while the CPU encodes the prompt: two eager
CLIP passes (prompt and negative prompt) are a few hundred small kernels, each launched from
Python, before the first UNet step can start. Their GPU time is tiny; replaying them as one
CUDA graph leaves only the copy of the token ids in and of the outputs out. Compiling them
(as the UNet is) would add a cold compile and a graph to load at every start for no gain the
graph does not already give.

A call runs from a graph only on CUDA, in inference mode, with tensors (and plain values)
as its arguments; anything else, and any signature whose capture failed, runs eagerly.
Weights are read at their addresses at replay, so LoRA merged in place is seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("orch.server")


class GraphedForward:
    """Stands in for `module.forward`; the original stays reachable as `.original`."""

    def __init__(self, module, pool: Any = None) -> None:
        self.module = module
        self.original: Callable[..., Any] = module.forward
        self.pool = pool
        self._graphs: dict[tuple, _Graph | None] = {}  # None: this signature runs eagerly

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        key = _key(args, kwargs)
        if key is None or not torch.is_inference_mode_enabled() or torch.cuda.is_current_stream_capturing():
            return self.original(*args, **kwargs)
        if key not in self._graphs:
            try:
                self._graphs[key] = _Graph(self.original, args, kwargs, self.pool)
            except Exception as e:  # something in the forward cannot be captured: eager from now on
                log.warning("%s: no CUDA graph for this call (%s: %s); it runs eagerly", type(self.module).__name__,
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                self._graphs[key] = None
        graph = self._graphs[key]
        if graph is None:
            return self.original(*args, **kwargs)
        return graph(args, kwargs)


def install(module, pool: Any = None) -> GraphedForward:
    graphed = GraphedForward(module, pool)
    module.forward = graphed
    return graphed


def _key(args: tuple, kwargs: dict) -> tuple | None:
    """The call's signature, or None when it is not one a graph can stand for."""
    import torch

    parts = []
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            if value.device.type != "cuda":
                return None
            parts.append((name, tuple(value.shape), value.dtype, tuple(value.stride())))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, repr(value)))
        else:
            return None
    return tuple(parts)


class _Graph:
    def __init__(self, forward: Callable[..., Any], args: tuple, kwargs: dict, pool: Any) -> None:
        import torch

        self.args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        self.kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, workspaces) outside the capture
                forward(*self.args, **self.kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = forward(*self.args, **self.kwargs)

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        import torch
        from torch.utils._pytree import tree_map

        for static, given in zip(self.args, args):
            if isinstance(static, torch.Tensor):
                static.copy_(given)
        for name, static in self.kwargs.items():
            if isinstance(static, torch.Tensor):
                static.copy_(kwargs[name])
        self.graph.replay()
        # Copies: the next replay overwrites the graph's own outputs.
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.outputs)
