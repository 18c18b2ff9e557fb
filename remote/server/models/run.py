"""One pipeline call on a loaded model: the request's scheduler, its seeds, its images.

The model's components are shared by a pipeline object per kind (txt2img, img2img,
inpaint); each call gets a fresh scheduler. Images come back as PIL images; with
`on_image`, txt2img batches also hand each image over as soon as it is decoded.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

from .. import samplers
from .decode_stream import DecodeStream, to_8_bits
from .residency import LoadedModel
from .types import GenerationRequest, JobCancelled


@functools.cache
def _served(cls: type) -> type:
    """cls, with the execution device given (`orch_device`). diffusers searches every submodule
    of every component for offloading hooks to find it (none here: models stay on the GPU),
    once per call: thousands of attribute misses, milliseconds of CPU while the GPU waits."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "_execution_device": property(lambda self: self.orch_device)})


def on_components(cls, base, **extra):
    """A `cls` pipeline on `base`'s own components, as they are.

    Not `cls.from_pipe(base)`: diffusers' DiffusionPipeline.from_pipe ends with
    `.to(dtype=torch_dtype or float32)`, which turned a served fp16 model (UNet, VAE, text
    encoders, shared with every other kind) into fp32 in place: after the first ControlNet
    request every request ran 4x slower, on weights the compiled graphs were not made for."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in base.components.items() if k in accepted}
    # The base's own settings that the new class also takes (force_zeros_for_empty_prompt, ...).
    settings = {k: v for k, v in base.config.items() if k in accepted and k not in components and not k.startswith("_")}
    return cls(**{**components, **settings, **extra})


def pipeline_for(model: LoadedModel, spec, schedule: str, kind: str = "txt2img", controlnet=None):
    """The model's components with a fresh scheduler: shared weights, private sampler state.

    One pipeline object per kind is kept and given the request's scheduler (requests run
    one at a time on the worker): building one was ~3 ms of CPU before the GPU could start.
    With `controlnet`, the kind's ControlNet pipeline (controlnet/apply.py), on the same components."""
    import torch

    base = model.pipeline
    scheduler = samplers.make_scheduler(model.scheduler_config, spec, schedule, sdxl=is_sdxl(base))
    key = kind if controlnet is None else f"{kind}+controlnet"
    pipe = model.pipelines.get(key)
    if pipe is None:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        if controlnet is not None:
            from ..controlnet.apply import pipeline_class

            pipe = on_components(pipeline_class(kind, is_sdxl(base)), base, controlnet=controlnet)
        elif kind == "txt2img":
            pipe = base.__class__(**base.components)
        elif kind == "img2img":
            pipe = AutoPipelineForImage2Image.from_pipe(base)
        else:
            pipe = AutoPipelineForInpainting.from_pipe(base)
        pipe.__class__ = _served(type(pipe))
        pipe.orch_device = torch.device(model.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.encode_prompt = model.prompts.wrap(pipe.encode_prompt, lambda: (model.lora.version, model.clip_skip))
        model.pipelines[key] = pipe
    for name, component in base.components.items():  # a VAE chosen, or the UNet compiled, since
        if name != "scheduler" and getattr(pipe, name, None) is not component:
            setattr(pipe, name, component)
    pipe.scheduler = scheduler
    return pipe


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


def a1111_strength(strength: float, steps: int) -> float:
    """diffusers' strength that runs A1111's number of img2img steps: int(min(strength, 0.999) * steps) + 1.

    diffusers runs int(steps * strength) of them, none at all for a low strength or few steps
    (the pipeline then failed on an empty batch of latents); A1111 always runs at least one."""
    t_enc = int(min(strength, 0.999) * steps)
    return min(1.0, (t_enc + 1 + 1e-4) / steps)


@contextlib.contextmanager
def first_noise(pipe, noise):
    """The pipeline's first draw of noise of that shape is `noise` (variation seeds in img2img,
    whose pipelines take no starting noise)."""
    import sys

    module = sys.modules[type(pipe).__module__]
    original = module.randn_tensor
    used = [False]

    def patched(shape, generator=None, device=None, dtype=None, layout=None):
        if not used[0] and tuple(shape) == tuple(noise.shape):
            used[0] = True
            return noise.to(device=device, dtype=dtype)
        return original(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    module.randn_tensor = patched
    try:
        yield
    finally:
        module.randn_tensor = original


@contextlib.contextmanager
def clip_skipped(pipe, model: LoadedModel, clip_skip: int):
    """A1111's clip skip on SD1/SD2 text encoders: the last clip_skip - 1 layers are left out and
    the final layer norm applied to what comes before (the penultimate layer's output for 2).
    Graphed encoders (graphed.py) run eagerly meanwhile: their graphs hold every layer."""
    model.clip_skip = clip_skip
    encoder = pipe.text_encoder
    if clip_skip <= 1 or encoder is None:
        yield
        return
    layers = encoder.encoder.layers if hasattr(encoder, "encoder") else encoder.text_model.encoder.layers
    owner = encoder.encoder if hasattr(encoder, "encoder") else encoder.text_model.encoder
    forward = encoder.forward
    eager = getattr(forward, "original", None)
    keep = max(1, len(layers) - (clip_skip - 1))
    owner.layers = layers[:keep]
    if eager is not None:
        encoder.forward = eager
    try:
        yield
    finally:
        owner.layers = layers
        if eager is not None:
            encoder.forward = forward
        model.clip_skip = 1


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


class _Steps:
    """The callback the pipeline calls after each step: timing, progress, interrupt, cancel, previews."""

    def __init__(self, engine, clock: PhaseClock, total: int, preview_every: int, sdxl: bool):
        self.engine, self.clock, self.total = engine, clock, total
        self.offset = 0
        self.preview_every, self.sdxl = preview_every, sdxl

    def __call__(self, p, i, t, kwargs):
        self.clock.mark("first_step" if i == 0 and self.offset == 0 else "last_step")
        step = self.offset + i + 1
        if self.engine is not None:
            if self.engine.cancelled():
                raise JobCancelled("the client went away")
            if self.engine.step(step, self.total):
                p._interrupt = True  # skip the remaining steps; what is done so far is decoded
            if self.preview_every > 0 and step % self.preview_every == 0 and "latents" in kwargs:
                self.engine.preview.capture(kwargs["latents"], self.sdxl, step)
        return kwargs


def run(model: LoadedModel, req: GenerationRequest, prompts: list[str], negatives: list[str], seeds: list[int],
        engine, kind: str = "txt2img", rows: list[int] | None = None, subseeds: list[int] | None = None,
        on_image: Callable[[int, Any], None] | None = None, controls: list[tuple] | None = None,
        nets: list[Any] | None = None) -> tuple[list[Any], dict[str, float]]:
    """Generate; with on_image, txt2img images are also handed over one by one as each is decoded.

    `rows`: each image's position in its request (which init image it starts from); `controls`: each
    image's ControlNet units (their maps), `nets` the units' networks (controlnet/apply.py).
    Returns the images and where the call's time went (PhaseClock.phases)."""
    import torch

    from .. import noise, tiling

    spec, schedule = samplers.resolve(req.sampler_name, req.scheduler)
    pipe = pipeline_for(model, spec, schedule, kind, nets[0] if req.control else None)
    sdxl = is_sdxl(pipe)
    if spec.brownian:
        pipe.scheduler.noise_sampler_seed = list(seeds)  # each image its own Brownian tree, as alone
    hires = req.hires if kind == "txt2img" else None
    hr_steps = (hires.steps or req.steps) if hires else 0
    clock = PhaseClock(model.device)
    steps_cb = _Steps(engine, clock, _steps_run(req, kind) + (_img2img_steps(hires.denoising_strength, hr_steps) if hires else 0),
                      req.preview_every, sdxl)
    # CPU generators: the same seed gives the same image on any device, as in A1111.
    gens = noise.generators(seeds)
    args: dict[str, Any] = dict(
        prompt=prompts, negative_prompt=negatives if any(negatives) else None, num_inference_steps=req.steps,
        guidance_scale=req.cfg_scale, generator=gens, callback_on_step_end=steps_cb,
    )
    if req.clip_skip > 1 and sdxl:
        args["clip_skip"] = req.clip_skip - 1  # diffusers counts the layers skipped
    if spec.uses_eta and req.eta is not None:
        args["eta"] = req.eta
    custom = noise.needs_custom_noise(req.subseed_strength, req.seed_resize_from_w, req.seed_resize_from_h)
    dtype = pipe.unet.dtype
    latent_shape = (pipe.unet.config.in_channels if kind == "txt2img" and pipe.unet.config.in_channels == 4 else 4,
                    req.height // 8, req.width // 8)
    start_noise = None
    if custom:
        start_noise = noise.initial_noise(gens, latent_shape, dtype, subseeds, req.subseed_strength,
                                          (req.seed_resize_from_w, req.seed_resize_from_h))
    stream = None
    post = None
    if kind == "txt2img":
        args.update(width=req.width, height=req.height)
        if start_noise is not None:
            args["latents"] = start_noise
        if on_image is not None and hires is None and getattr(pipe, "watermark", None) is None and len(seeds) > 1:
            stream = DecodeStream(pipe, on_image)
    else:
        post = _image_inputs(pipe, model, req, kind, args, rows or list(range(len(seeds))), seeds, gens)
    if req.control:
        from ..controlnet.apply import control_args

        args.update(control_args(pipe, nets, req.control, controls or [req.control] * len(seeds), kind, req.cfg_scale > 1))
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if not sdxl:
            stack.enter_context(clip_skipped(pipe, model, req.clip_skip))
        if req.tiling:
            stack.enter_context(tiling.eager(pipe))
            stack.enter_context(tiling.circular(pipe.unet, pipe.vae))
        if start_noise is not None and kind != "txt2img":
            stack.enter_context(first_noise(pipe, start_noise))
        clock.mark("start")
        if stream is not None:
            with stream:
                pipe(**args, output_type="pt")
                clock.mark("end")
            images = [stream.images[i] for i in range(len(seeds))]
        elif hires is not None:
            latents = pipe(**args, output_type="latent").images
            images = _second_pass(model, req, hires, latents, prompts, negatives, seeds, steps_cb)
            clock.mark("end")
        else:
            pixels = to_8_bits(pipe(**args, output_type="pt").images)
            clock.mark("end")
            images = _to_pil(pixels)
    if post is not None:
        images = [post(i, image) for i, image in enumerate(images)]
    return images, clock.phases()


def _to_pil(pixels) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(p) for p in pixels.cpu().numpy()]


def _img2img_steps(strength: float, steps: int) -> int:
    return int(min(strength, 0.999) * steps) + 1


def _steps_run(req: GenerationRequest, kind: str) -> int:
    if kind == "txt2img":
        return req.steps
    return min(req.steps, _img2img_steps(req.inputs.denoising_strength, req.steps))


def _encode(pipe, pixels, gens):
    """Scaled latents of images in [-1, 1] (the pipeline's own encoder: its scaling and upcasting)."""
    if hasattr(pipe, "_encode_vae_image"):
        return pipe._encode_vae_image(pixels, generator=gens)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    return retrieve_latents(pipe.vae.encode(pixels.to(pipe.vae.dtype)), generator=gens[0]) * pipe.vae.config.scaling_factor


def _image_inputs(pipe, model: LoadedModel, req: GenerationRequest, kind: str, args: dict[str, Any], rows: list[int],
                  seeds: list[int], gens) -> Callable[[int, Any], Any] | None:
    """img2img / inpaint arguments for this call; returns what to do to each output image (the paste-back)."""
    import torch

    inputs = req.inputs
    prepared = inputs.inpaint
    pool = prepared.images if prepared is not None else inputs.images
    row_images = [pool[r % len(pool)] for r in rows]
    args["strength"] = a1111_strength(inputs.denoising_strength, req.steps)
    device, dtype = model.device, pipe.unet.dtype
    if kind == "img2img":
        if inputs.resize_mode == 3:  # "Just resize (latent upscale)": encoded at its own size, the latents resized
            latents = []
            for image, g in zip(row_images, gens):
                x = pipe.image_processor.preprocess(image).to(device, dtype)
                z = _encode(pipe, x, [g])
                latents.append(torch.nn.functional.interpolate(z.float(), size=(req.height // 8, req.width // 8),
                                                               mode="bilinear").to(dtype))
            args["image"] = torch.cat(latents)
        else:
            args["image"] = row_images
        return None
    from .. import inpaint, noise

    if req.control:  # diffusers' ControlNet inpaint pipeline encodes the images itself
        args.update(image=row_images, mask_image=prepared.mask, width=req.width, height=req.height)
        return lambda i, image: inpaint.paste_back(image, prepared.overlays[rows[i] % len(prepared.overlays)], prepared.paste_to)
    x = pipe.image_processor.preprocess(row_images, height=req.height, width=req.width).to(device, dtype)
    latents = _encode(pipe, x, gens)
    to_generate = inpaint.latent_mask_tensor(prepared.mask, req.height // 8, req.width // 8, device, latents.dtype)
    if inputs.inpainting_fill == 2:  # latent noise
        fresh = noise.initial_noise(noise.generators(seeds), tuple(latents.shape[1:]), latents.dtype).to(device)
        latents = latents * (1 - to_generate) + fresh * to_generate
    elif inputs.inpainting_fill == 3:  # latent nothing
        latents = latents * (1 - to_generate)
    if model.inpainting:  # the inpainting model's conditioning: the image with the masked area blanked
        mask_px = inpaint.latent_mask_tensor(prepared.mask, req.height, req.width, device, x.dtype)
        masked = _encode(pipe, x * (1 - mask_px), gens)
    else:
        masked = latents
    args.update(image=latents, mask_image=prepared.mask, masked_image_latents=masked, width=req.width, height=req.height)

    def paste(i: int, image):
        return inpaint.paste_back(image, prepared.overlays[rows[i] % len(prepared.overlays)], prepared.paste_to)

    return paste


def _second_pass(model: LoadedModel, req: GenerationRequest, plan, latents, prompts, negatives, seeds, steps_cb) -> list[Any]:
    """The hires fix's upscale and img2img pass (hires.py)."""
    import torch

    from .. import hires, noise
    from ..upscalers import LATENT_MODES

    first_pipe = model.pipelines["txt2img+controlnet" if req.control else "txt2img"]
    if plan.upscaler in LATENT_MODES:
        image = hires.upscale_latents(latents, plan)
    else:
        vae = first_pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        lowres = _to_pil(to_8_bits(first_pipe.image_processor.denormalize(decoded)))
        upscalers = model.upscalers
        up = upscalers.find(plan.upscaler, "hr_upscaler")
        image = []
        for img in lowres:
            big = upscalers.upscale(img, up, plan.target_width, plan.target_height, model.device)
            left, top = (plan.truncate_x * 8) // 2, (plan.truncate_y * 8) // 2
            image.append(big.crop((left, top, left + plan.final_width, top + plan.final_height)))
    spec, schedule = samplers.resolve(plan.sampler_name or req.sampler_name, plan.scheduler or req.scheduler)
    pipe = pipeline_for(model, spec, schedule, "img2img")
    if spec.brownian:
        pipe.scheduler.noise_sampler_seed = list(seeds)
    steps = plan.steps or req.steps
    steps_cb.offset = req.steps
    hr_prompts = [plan.prompt] * len(prompts) if plan.prompt else prompts
    hr_negatives = [plan.negative_prompt] * len(negatives) if plan.negative_prompt else negatives
    args: dict[str, Any] = dict(
        prompt=hr_prompts, negative_prompt=hr_negatives if any(hr_negatives) else None, image=image,
        num_inference_steps=steps, strength=a1111_strength(plan.denoising_strength, steps), guidance_scale=req.cfg_scale,
        generator=noise.generators(seeds), callback_on_step_end=steps_cb,
    )
    if req.clip_skip > 1 and is_sdxl(pipe):
        args["clip_skip"] = req.clip_skip - 1
    with torch.inference_mode():
        return _to_pil(to_8_bits(pipe(**args, output_type="pt").images))
