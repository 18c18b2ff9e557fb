"""One pipeline call on a loaded model: the request's scheduler, its seeds, its images.

The model's components are shared by a pipeline object per kind (txt2img, img2img,
inpaint); each call gets a fresh scheduler. Images come back as PIL images; with
`on_image`, txt2img batches also hand each image over as soon as it is decoded.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import samplers
from .residency import LoadedModel
from .types import GenerationRequest


def to_8_bits(images):
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8 on the same device, the arithmetic of
    diffusers' PIL output (float32 x 255, rounded). Done on the GPU: a quarter of the bytes to
    copy and no float pass over the pixels on the CPU (~30 ms for eight 512x512 images)."""
    import torch

    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@functools.cache
def _served(cls: type) -> type:
    """cls, with the execution device given (`orch_device`). diffusers searches every submodule
    of every component for offloading hooks to find it (none here: models stay on the GPU),
    once per call: thousands of attribute misses, milliseconds of CPU while the GPU waits."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "_execution_device": property(lambda self: self.orch_device)})


def pipeline_for(model: LoadedModel, spec, schedule: str, kind: str = "txt2img"):
    """The model's components with a fresh scheduler: shared weights, private sampler state.

    One pipeline object per kind is kept and given the request's scheduler (requests run
    one at a time on the worker): building one was ~3 ms of CPU before the GPU could start."""
    import torch

    scheduler = samplers.make_scheduler(model.scheduler_config, spec, schedule)
    base = model.pipeline
    pipe = model.pipelines.get(kind)
    if pipe is None:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        if kind == "txt2img":
            pipe = base.__class__(**base.components)
        elif kind == "img2img":
            pipe = AutoPipelineForImage2Image.from_pipe(base)
        else:
            pipe = AutoPipelineForInpainting.from_pipe(base)
        pipe.__class__ = _served(type(pipe))
        pipe.orch_device = torch.device(model.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.encode_prompt = model.prompts.wrap(pipe.encode_prompt, lambda: model.lora.version)
        model.pipelines[kind] = pipe
    for name, component in base.components.items():  # a VAE chosen, or the UNet compiled, since
        if name != "scheduler" and getattr(pipe, name, None) is not component:
            setattr(pipe, name, component)
    pipe.scheduler = scheduler
    return pipe


class DecodeStream:
    """During one txt2img call, the VAE decodes the batch image by image and each image is
    handed to `on_image` as soon as it is on the host, while the GPU decodes the next: its
    client gets its PNG while the rest of the batch decodes, instead of all eight clients
    encoding and receiving at once after the last. Image by image costs the GPU nothing more
    (SD1.5 on an H100: 8 x 7.8 ms vs 65.7 ms for a batch of 8). The pipeline still gets the
    whole batch back and finishes as usual; pixels are the same as its own (same ops)."""

    def __init__(self, pipe, on_image: Callable[[int, Any], None]):
        self.pipe = pipe
        self.vae = pipe.vae
        self.on_image = on_image
        self.images: dict[int, Any] = {}  # what the call returns: already converted, no second copy
        self.error: BaseException | None = None

    def __enter__(self):
        import queue

        self.decode = self.vae.decode
        self.vae.decode = self._decode
        self.handoff: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._deliver, name="decode-stream", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.vae.decode = self.decode
        self.handoff.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _decode(self, z, *args, **kwargs):
        import torch

        samples = []
        for i in range(z.shape[0]):
            out = self.decode(z[i : i + 1], *args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else out.sample
            samples.append(sample)
            pixels = to_8_bits(self.pipe.image_processor.denormalize(sample))  # as postprocess() does next
            if pixels.is_cuda:
                host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
                host.copy_(pixels, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                self.handoff.put((i, host, ready))
            else:
                self.handoff.put((i, pixels, None))
        sample = torch.cat(samples)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)

    def _deliver(self) -> None:
        from PIL import Image

        while (item := self.handoff.get()) is not None:
            i, pixels, ready = item
            try:
                if ready is not None:
                    ready.synchronize()
                if self.error is None:
                    self.images[i] = Image.fromarray(pixels[0].numpy())
                    self.on_image(i, self.images[i])
            except BaseException as e:  # raised on the worker when the call ends
                self.error = e


class PhaseClock:
    """Where a pipeline call's time goes, measured on the GPU's own clock (CUDA events: no sync)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def _between(self, a: str, b: str) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b]) / 1000
        return self.marks[b] - self.marks[a]

    def phases(self) -> dict[str, float]:
        """prompt encoding + first step; the other steps; VAE decode + conversion to 8 bits (seconds)."""
        if not {"start", "first_step", "end"} <= self.marks.keys():
            return {}
        last = "last_step" if "last_step" in self.marks else "first_step"
        return {"prompt_and_first_step": round(self._between("start", "first_step"), 4),
                "other_steps": round(self._between("first_step", last), 4),
                "decode": round(self._between(last, "end"), 4)}


def run(model: LoadedModel, req: GenerationRequest, prompts: list[str], negatives: list[str], seeds: list[int],
        engine, kind: str = "txt2img", extra: dict[str, Any] | None = None,
        on_image: Callable[[int, Any], None] | None = None) -> tuple[list[Any], dict[str, float]]:
    """Generate; with on_image, txt2img images are also handed over one by one as each is decoded.

    Returns the images and where the call's time went (PhaseClock.phases)."""
    import torch

    spec, schedule = samplers.resolve(req.sampler_name, req.scheduler)
    pipe = pipeline_for(model, spec, schedule, kind)
    steps = req.steps

    clock = PhaseClock(model.device)

    def on_step(p, i, t, kwargs):
        clock.mark("first_step" if i == 0 else "last_step")
        if engine is not None and engine.step(i + 1, steps):
            p._interrupt = True  # skip the remaining steps; what is done so far is decoded
        return kwargs

    # CPU generators: the same seed gives the same image on any device, as in A1111.
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    args: dict[str, Any] = dict(
        prompt=prompts, negative_prompt=negatives if any(negatives) else None, num_inference_steps=steps,
        guidance_scale=req.cfg_scale, generator=generators, callback_on_step_end=on_step,
    )
    if kind == "txt2img":
        args.update(width=req.width, height=req.height)
    args.update(extra or {})
    stream = None
    if on_image is not None and kind == "txt2img" and getattr(pipe, "watermark", None) is None and len(seeds) > 1:
        stream = DecodeStream(pipe, on_image)
    with torch.inference_mode():
        clock.mark("start")
        if stream is not None:
            with stream:
                pipe(**args, output_type="pt")
                clock.mark("end")
        else:
            pixels = to_8_bits(pipe(**args, output_type="pt").images)
            clock.mark("end")
            pixels = pixels.cpu().numpy()
    phases = clock.phases()
    if stream is not None:
        return [stream.images[i] for i in range(len(seeds))], phases
    from PIL import Image

    return [Image.fromarray(p) for p in pixels], phases
