"""Compiled UNet and VAE graphs kept on the instance disk and run without re-tracing.

torch.compile with a warm cache still re-traces the model's Python with Dynamo at every
start (about 11 s for the SD1.5 UNet on an H100 host) before it can use its cached kernels.
Here each (function, input signature) is traced once, compiled by Inductor into a
standalone artifact (`torch._inductor.standalone_compile`) and saved beside the other
compile caches; a later start loads the artifact and calls it directly with the module's
weights and the call's tensors in the recorded order: no Dynamo at all. On a GPU the
artifact then runs inside a CUDA graph of our own (what mode="reduce-overhead" adds),
captured for each input signature; graphs of one model share a memory pool.

What the saved artifact may assume (Dynamo would have guarded it) is in its file name:
torch and diffusers versions, the module's class and config, the layout of every weight
(name, shape, dtype, strides) and the signature of the call (each tensor's shape, dtype,
strides; every other argument's value). Weights are read from their current addresses at
each call, so LoRA merged in place is seen; a call that does not fit (another shape, no
inference mode, a graph break) goes to `fallback`: ordinary torch.compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .graphed import CudaGraph

log = logging.getLogger("orch.server")

FORMAT = 1  # bump when what an artifact assumes changes


class NotPrecompilable(Exception):
    """This call cannot run from a standalone artifact; the fallback serves it."""


@dataclass
class Stats:
    loaded: int = 0  # artifacts read from disk
    compiled: int = 0  # artifacts traced and compiled here (then saved)
    fallback_calls: int = 0
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


STATS = Stats()
_lock = threading.Lock()


def _flatten(args: tuple, kwargs: dict, ignore: frozenset[str]) -> list[tuple[str, Any]]:
    """(path, value) for each leaf of the call: positional as '0', '1'; keywords by name; dicts as 'name.key'."""
    leaves: list[tuple[str, Any]] = []

    def walk(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value):
                walk(f"{path}.{k}", value[k])
        elif isinstance(value, (list, tuple)) and not _is_tensor(value):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)
        else:
            leaves.append((path, value))

    for i, a in enumerate(args):
        walk(str(i), a)
    for k in sorted(kwargs):
        if k not in ignore:
            walk(k, kwargs[k])
    return leaves


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _signature(leaves: list[tuple[str, Any]]) -> tuple:
    sig = []
    for path, v in leaves:
        if _is_tensor(v):
            sig.append((path, "tensor", tuple(v.shape), str(v.dtype), tuple(v.stride()), v.device.type))
        elif v is None or isinstance(v, (bool, int, float, str)):
            sig.append((path, "value", repr(v)))
        else:
            raise NotPrecompilable(f"argument {path} is a {type(v).__name__}")
    return tuple(sig)


def module_digest(module) -> str:
    """What a compiled graph of this module bakes in, apart from the call: class, config, weight layout."""
    import diffusers
    import torch

    h = hashlib.sha256()
    h.update(f"{FORMAT} {torch.__version__} {diffusers.__version__} {type(module).__module__}.{type(module).__qualname__}".encode())
    config = getattr(module, "config", None)
    if config is not None:
        # Keys with "_" are bookkeeping (_name_or_path; _use_default_values comes from a set, in any order).
        h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name} {tuple(t.shape)} {t.dtype} {tuple(t.stride())} {t.device.type}\n".encode())
    # Attention processors decide the graph (fused QKV or not, SDPA or not).
    procs = getattr(module, "attn_processors", None)
    if procs:
        h.update(" ".join(sorted({type(p).__name__ for p in procs.values()})).encode())
    return h.hexdigest()[:24]


@dataclass
class _Entry:
    compiled: Callable[..., Any]  # the Inductor artifact: flat tensors in, list of tensors out
    order: list[tuple[str, str]]  # ("param", name) or ("arg", path) for each input
    graph: Any = None  # graphed.CudaGraph once captured
    pointers: tuple[int, ...] = ()  # weight addresses the graph was captured with


class PrecompiledFunction:
    """Stands in for `module.forward` (or a method such as `vae.decode`)."""

    def __init__(self, module, original: Callable[..., Any], name: str, store: Path, fallback: Callable[..., Any],
                 wrap_output: Callable[[Any, dict], Any], ignore: tuple[str, ...] = (), pool: Any = None,
                 prepare: Callable[[tuple, dict], tuple[tuple, dict]] | None = None) -> None:
        self.module = module
        self.prepare = prepare
        self.original = original
        self.name = name
        self.store = store
        self.fallback = fallback
        self.wrap_output = wrap_output
        self.ignore = frozenset(ignore)
        self.pool = pool
        self.digest = module_digest(module)
        self._entries: dict[tuple, _Entry | None] = {}  # None: this signature uses the fallback
        self._weights: dict[str, Any] | None = None

    # -- the call -------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.prepare is not None:
            args, kwargs = self.prepare(args, kwargs)
        try:
            if not torch.is_inference_mode_enabled():
                raise NotPrecompilable("not in inference mode")
            leaves = _flatten(args, kwargs, self.ignore)
            sig = _signature(leaves)
        except NotPrecompilable:
            STATS.fallback_calls += 1
            return self.fallback(*args, **kwargs)
        if sig not in self._entries:
            self._entries[sig] = self._prepare(sig, args, kwargs)
        entry = self._entries[sig]
        if entry is None:
            STATS.fallback_calls += 1
            return self.fallback(*args, **kwargs)
        values = dict(leaves)
        weights = self._weights_by_name()
        inputs = [weights[key] if kind == "param" else values[key] for kind, key in entry.order]
        outputs = self._run(entry, inputs)
        return self.wrap_output(outputs[0], kwargs)

    def _run(self, entry: _Entry, inputs: list) -> list:
        device = inputs[0].device if inputs else None
        if device is None or device.type != "cuda":
            return list(entry.compiled(*inputs))
        pointers = tuple(x.data_ptr() for (kind, _), x in zip(entry.order, inputs) if kind == "param")
        if entry.graph is None or entry.pointers != pointers:
            arg_positions = [i for i, (kind, _) in enumerate(entry.order) if kind == "arg"]
            entry.graph = CudaGraph(entry.compiled, inputs, arg_positions, self.pool)
            entry.pointers = pointers
        return entry.graph(inputs)

    def _weights_by_name(self) -> dict[str, Any]:
        if self._weights is None:
            self._weights = dict(self.module.named_parameters())
            self._weights.update(self.module.named_buffers())
        return self._weights

    # -- load or build an artifact ---------------------------------------------------------------

    def _path(self, sig: tuple) -> Path:
        key = hashlib.sha256(repr((self.digest, sig)).encode()).hexdigest()[:24]
        return self.store / f"{self.name}-{self.digest[:12]}-{key}"

    def _prepare(self, sig: tuple, args: tuple, kwargs: dict) -> _Entry | None:
        path = self._path(sig)
        try:
            if (path / "artifact.bin").exists():
                return self._load(path)
        except Exception as e:  # a stale or damaged artifact: build it again
            log.warning("precompiled %s unusable (%s: %s); compiling again", path.name, type(e).__name__, e)
            STATS.errors.append(f"load {path.name}: {type(e).__name__}: {e}")
        try:
            return self._compile_and_save(path, args, kwargs)
        except Exception as e:
            log.warning("%s: no standalone artifact for this call (%s: %s); torch.compile serves it", self.name,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            STATS.errors.append(f"compile {self.name}: {type(e).__name__}: {str(e)[:300]}")
            return None

    def _load(self, path: Path) -> _Entry:
        from torch._inductor import CompiledArtifact

        started = time.monotonic()
        order = [tuple(x) for x in json.loads((path / "inputs.json").read_text())]
        with _lock:
            compiled = CompiledArtifact.load(path=str(path / "artifact.bin"), format="binary")
        seconds = time.monotonic() - started
        STATS.loaded += 1
        STATS.load_seconds += seconds
        log.info("precompiled %s loaded in %.1fs", path.name, seconds)
        return _Entry(compiled=compiled, order=order)  # type: ignore[arg-type]

    def _compile_and_save(self, path: Path, args: tuple, kwargs: dict) -> _Entry:
        import torch

        started = time.monotonic()
        gm, example_inputs = _trace(self.original, args, kwargs)
        order = self._input_order(example_inputs, _flatten(args, kwargs, self.ignore))
        outputs = [n for n in gm.graph.find_nodes(op="output")[0].args[0]]
        if len(outputs) != 1:
            raise NotPrecompilable(f"the graph has {len(outputs)} outputs, one expected")
        with _lock:
            artifact = torch._inductor.standalone_compile(gm, example_inputs, dynamic_shapes="from_example_inputs")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written to a temporary folder and renamed: a crash never leaves half an artifact under the real name.
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        artifact.save(path=str(tmp / "artifact.bin"), format="binary")
        (tmp / "inputs.json").write_text(json.dumps(order))
        if path.exists():  # a damaged or stale artifact under this name: out of the way first
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            os.replace(path, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process saved it meanwhile; use ours, drop the copy
            shutil.rmtree(tmp, ignore_errors=True)
        seconds = time.monotonic() - started
        STATS.compiled += 1
        STATS.compile_seconds += seconds
        log.info("precompiled %s compiled and saved in %.1fs", path.name, seconds)
        return _Entry(compiled=artifact, order=order)

    def _input_order(self, example_inputs: list, leaves: list[tuple[str, Any]]) -> list[tuple[str, str]]:
        by_id = {id(t): ("param", name) for name, t in self._weights_by_name().items()}
        by_id.update({id(v): ("arg", path) for path, v in leaves if _is_tensor(v)})
        order = []
        for x in example_inputs:
            if id(x) not in by_id:
                raise NotPrecompilable(f"a graph input is neither a weight nor an argument: {type(x).__name__} "
                                       f"{tuple(getattr(x, 'shape', ()))}")
            order.append(by_id[id(x)])
        return order


_trace_count = 0


def _trace(fn: Callable[..., Any], args: tuple, kwargs: dict):
    """Dynamo's graph of one call of fn, and the inputs it was traced with (weights included)."""
    import torch

    global _trace_count
    captured: dict[str, Any] = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    # A fresh code object per trace: Dynamo's cache entries (and its recompile limit) are per
    # code object, so this trace neither counts against nor disturbs the fallback's.
    _trace_count += 1
    shim_code = _call_through.__code__.replace(co_name=f"orch_trace_{_trace_count}")
    shim = types.FunctionType(shim_code, _call_through.__globals__, shim_code.co_name)
    traced = torch.compile(shim, backend=backend, fullgraph=True, dynamic=False)
    traced(fn, args, kwargs)
    if "gm" not in captured:
        raise NotPrecompilable("Dynamo did not trace the call")
    return captured["gm"], captured["inputs"]


def _call_through(fn, args, kwargs):
    return fn(*args, **kwargs)


# -- the two functions the server precompiles --------------------------------------------------------


def unet_output(sample, kwargs: dict):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)


def timestep_as_float32(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The UNet reads its timestep only through `.float()` (the sinusoidal embedding), so any
    sampler's timestep (int64 for DPM++ 2M, DDIM, UniPC; float32 for Euler; float64 for DPM++
    SDE) as float32 gives the same result, and all samplers share one compiled graph."""
    import torch

    def as_float(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype != torch.float32 else t

    if len(args) > 1:
        args = (args[0], as_float(args[1]), *args[2:])
    elif "timestep" in kwargs:
        kwargs = {**kwargs, "timestep": as_float(kwargs["timestep"])}
    return args, kwargs


def decoder_output(sample, kwargs: dict):
    from diffusers.models.autoencoders.vae import DecoderOutput

    return DecoderOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)


def install(module, method: str, name: str, store: Path, fallback: Callable[..., Any], wrap_output, ignore=(), pool=None,
            prepare=None):
    """Replace module.<method> with its precompiled stand-in (the original stays reachable as .original)."""
    original = getattr(module, method)
    wrapper = PrecompiledFunction(module, original, name, store, fallback, wrap_output, ignore=ignore, pool=pool,
                                  prepare=prepare)
    setattr(module, method, wrapper)
    return wrapper


def install_unet(unet, store: Path, fallback: Callable[..., Any], pool=None) -> PrecompiledFunction:
    return install(unet, "forward", "unet", store, fallback, unet_output, ignore=("return_dict",), pool=pool,
                   prepare=timestep_as_float32)


def install_vae_decode(vae, store: Path, fallback: Callable[..., Any], pool=None) -> PrecompiledFunction:
    # decode() takes a generator it does not use; return_dict only shapes the output.
    return install(vae, "decode", "vae-decode", store, fallback, decoder_output, ignore=("return_dict", "generator"),
                   pool=pool)
