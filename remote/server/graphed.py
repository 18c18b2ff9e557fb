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


class CudaGraph:
    """fn(*inputs) replayed as a CUDA graph: the inputs at `arg_positions` are copied into
    static buffers at each call (the others, weights, are used where they are); the outputs
    (any nesting of tensors, as torch's pytree knows it) come back as copies."""

    def __init__(self, fn: Callable[..., Any], inputs: list, arg_positions: list[int], pool: Any) -> None:
        import torch

        self.static = list(inputs)
        for i in arg_positions:
            self.static[i] = inputs[i].clone()
        self.arg_positions = arg_positions
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy kernel loading, cuBLAS handles and workspaces happen outside the capture
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.static)

    def __call__(self, inputs: list) -> Any:
        import torch
        from torch.utils._pytree import tree_map

        for i in self.arg_positions:
            self.static[i].copy_(inputs[i])
        self.graph.replay()
        # Copies: the next replay (of this or another graph in the same pool) overwrites them.
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.outputs)


class _Graph:
    """One signature of a forward: its positional and keyword arguments as one flat list."""

    def __init__(self, forward: Callable[..., Any], args: tuple, kwargs: dict, pool: Any) -> None:
        import torch

        self.positional = len(args)
        self.names = list(kwargs)
        flat = self._flat(args, kwargs)
        tensors = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor)]

        def call(*values: Any) -> Any:
            return forward(*values[: self.positional], **dict(zip(self.names, values[self.positional :])))

        self.graph = CudaGraph(call, flat, tensors, pool)

    def _flat(self, args: tuple, kwargs: dict) -> list:
        return [*args, *(kwargs[name] for name in self.names)]

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        return self.graph(self._flat(args, kwargs))
