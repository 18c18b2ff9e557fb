"""Making a loaded model fast on a GPU: memory layout, fused projections, compiled graphs.

reduce-overhead: CUDA graphs remove the per-kernel launch cost that dominates SD at batch 1
(max-autotune compiled for minutes without finishing). Compiling, or with a warm cache
re-tracing, happens on the GPU worker: cudagraph trees are thread-local.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .. import graphed, precompiled
from .residency import LoadedModel

log = logging.getLogger(__name__)


def optimize(pipe, cudnn_benchmark: bool = False) -> None:
    """fp16 + SDPA are already on; add channels_last and fused QKV (compiling comes later)."""
    import torch

    # cuDNN's own heuristics, not its benchmark: on an H100 (SD1.5 512², Inductor graphs,
    # whose convolutions go to cuDNN) the benchmark made no image faster (batch 1: 0.233 vs
    # 0.229 s, batch 8: 1.175 vs 1.171 s) and added ~2 s to every start, run again per shape.
    torch.backends.cudnn.benchmark = cudnn_benchmark
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    try:
        pipe.fuse_qkv_projections()
    except Exception as e:  # not every pipeline or attention processor supports it
        log.info("fused QKV not available: %s", e)


@dataclass
class Compiler:
    """torch.compile of the UNet and VAE decoder, through saved standalone graphs when there is a store."""

    enabled: bool | None = None  # None: on a GPU only
    backend: str = "inductor"  # tests use "eager": Dynamo without code generation
    precompiled_dir: Path | None = None  # where standalone compiled graphs are kept (precompiled.py)

    def enabled_for(self, model: LoadedModel) -> bool:
        return self.enabled is True or (self.enabled is None and model.device == "cuda")

    def _compile_fn(self, fn):
        import torch

        if self.backend == "inductor":
            import torch._inductor.config as inductor_config

            # (coordinate_descent_tuning was tried: on an H100 the SD1.5 UNet at batch 1 had
            # not finished compiling after 9 minutes.)
            inductor_config.conv_1x1_as_mm = True
            # dynamic=False: each batch size gets its own static graph. (Automatic dynamic
            # shapes made the second batch size a symbolic-shape graph, slower to run.)
            return torch.compile(fn, mode="reduce-overhead", dynamic=False)
        return torch.compile(fn, backend=self.backend, dynamic=False)

    def _precompiling(self) -> bool:
        return self.precompiled_dir is not None and self.backend == "inductor"

    def compile(self, model: LoadedModel) -> None:
        """Put the compiled UNet and VAE decoder in place (on the worker); they compile, or load, at their first run."""
        unet = model.pipeline.unet
        if self._precompiling():
            if model.device == "cuda":
                import torch

                model.graph_pool = torch.cuda.graph_pool_handle()  # one memory pool for all of the model's graphs
            precompiled.install_unet(unet, self.precompiled_dir, self._compile_fn(unet.forward), model.graph_pool)
        else:
            model.pipeline.unet = self._compile_fn(unet)
        self.compile_vae_decode(model, model.builtin_vae)
        if model.device == "cuda":
            for name in ("text_encoder", "text_encoder_2"):  # eager, replayed as CUDA graphs (graphed.py)
                encoder = getattr(model.pipeline, name, None)
                if encoder is not None and not isinstance(encoder.forward, graphed.GraphedForward):
                    graphed.install(encoder, model.graph_pool)
        model.compiled = True

    def compile_vae_decode(self, model: LoadedModel, vae) -> None:
        if self._precompiling():
            precompiled.install_vae_decode(vae, self.precompiled_dir, self._compile_fn(vae.decode), model.graph_pool)
        else:
            vae.decode = self._compile_fn(vae.decode)
