"""An A1111 request, read as A1111 reads it: a GenerationRequest, and what it asked that orch does not do.

Nothing a client asks for is dropped silently: what orch cannot do is either A1111's own
error (an unknown script: 422) or a warning in the answer's info ("warnings").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import hires, inpaint, lora, samplers
from ..encoding import decode_image
from ..images import flatten
from ..infotext import parse_infotext
from ..models import GenerationRequest, ModelNotFound, RequestError
from ..models.types import ImageInputs
from ..upscalers import LATENT_MODES, UnknownUpscaler

# override_settings / options keys that change what orch generates.
APPLIED_OPTIONS = {"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "samples_format", "eta_ddim", "tiling",
                   "face_restoration", "sd_checkpoints_limit", "live_previews_enable", "show_progress_every_n_steps"}
# Fields an infotext may fill in, and where they go.
INFOTEXT_FIELDS = {"Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Sampler": "sampler_name",
                   "Schedule type": "scheduler", "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width",
                   "Size-2": "height", "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
                   "Seed resize from-1": "seed_resize_from_w", "Seed resize from-2": "seed_resize_from_h",
                   "Denoising strength": "denoising_strength", "Hires upscale": "hr_scale", "Hires steps": "hr_second_pass_steps",
                   "Hires upscaler": "hr_upscaler", "Hires resize-1": "hr_resize_x", "Hires resize-2": "hr_resize_y",
                   "Hires sampler": "hr_sampler_name", "Hires prompt": "hr_prompt", "Hires negative prompt": "hr_negative_prompt",
                   "Mask blur": "mask_blur"}


@dataclass
class Translated:
    request: GenerationRequest
    model_name: str | None  # None: the current model
    warnings: list[str] = field(default_factory=list)
    override_options: dict[str, Any] = field(default_factory=dict)


def apply_infotext(body) -> list[str]:
    """Fill the fields this request does not set from its `infotext` (A1111 1.8+)."""
    if not body.infotext:
        return []
    params = parse_infotext(body.infotext)
    given = body.model_fields_set
    applied = []
    for key, name in INFOTEXT_FIELDS.items():
        if key in params and name in type(body).model_fields and name not in given:
            value = params[key]
            if "Hires" in key:
                body.enable_hr = True if "enable_hr" not in given else body.enable_hr
            try:
                setattr(body, name, type(getattr(body, name))(value) if getattr(body, name) is not None else value)
            except (TypeError, ValueError):
                continue
            applied.append(name)
    if "Clip skip" in params and params["Clip skip"] != 1:
        settings = dict(body.override_settings or {})
        settings.setdefault("CLIP_stop_at_last_layers", params["Clip skip"])
        body.override_settings = settings
    return applied


def translate(body, kind: str, models, options: dict[str, Any], max_side: int, scripts: list[str]) -> Translated:
    """The GenerationRequest for an A1111 txt2img / img2img body (kind "txt2img" or "img2img")."""
    warnings: list[str] = []
    apply_infotext(body)
    overrides = dict(body.override_settings or {})
    merged = {**options, **overrides}
    # Scripts: A1111's own errors.
    if body.script_name:
        raise RequestError(f"script_name: Script '{body.script_name}' not found (scripts on orch: {', '.join(scripts) or 'none'})")
    for name in body.alwayson_scripts or {}:
        raise RequestError(f"alwayson_scripts: always on script {name} not found (orch runs no A1111 scripts)")
    # Names against what the instance has.
    checkpoint = overrides.get("sd_model_checkpoint")
    try:
        model_name = models.find(str(checkpoint)).name if checkpoint else None
    except ModelNotFound as e:
        raise RequestError(f"override_settings.sd_model_checkpoint: {e}") from None
    vae = merged.get("sd_vae", "Automatic")
    models.find_vae(vae, None)
    sampler_name = body.sampler_name or body.sampler_index
    try:
        resolved = samplers.resolve_request(sampler_name, body.scheduler)
    except samplers.UnknownSampler as e:
        raise RequestError(str(e)) from None
    warnings += resolved.warnings
    try:
        _, loras = lora.parse_prompt(body.prompt)
    except lora.LoraError as e:
        raise RequestError(str(e)) from None
    found = []
    for name, weight in loras:
        try:
            models.loras.find(name)
            found.append((name, weight))
        except lora.LoraError as e:
            warnings.append(f"{e}: generated without it (as A1111 does)")
    clip_skip = _int_option(merged, "CLIP_stop_at_last_layers", 1, 1, 12)
    tiling = bool(body.tiling if body.tiling is not None else merged.get("tiling", False))
    # Sizes: multiples of 8 (the validator rounded them down), within the server's limit.
    width, height = body.width, body.height
    if kind == "txt2img" and (body.firstphase_width or body.firstphase_height):  # A1111's old hires fields
        width, height = body.firstphase_width or width, body.firstphase_height or height
        width, height = width - width % 8, height - height % 8
    for name, value in (("width", width), ("height", height)):
        if value > max_side:
            raise RequestError(f"{name}: {value} is larger than this server allows ({max_side})")
    warnings += _unsupported(body, kind, merged, overrides, resolved.spec)
    plan = _hires_plan(body, width, height, max_side, models, warnings) if kind == "txt2img" and body.enable_hr else None
    if kind == "txt2img" and (body.firstphase_width or body.firstphase_height) and plan is None:
        warnings.append("firstphase_width/firstphase_height: used only with enable_hr")
    extra_params: list[tuple[str, Any]] = []
    inputs = None
    if kind == "img2img":
        inputs, extra_params = _image_inputs(body, width, height, models, warnings)
        extra_params.insert(0, ("Denoising strength", body.denoising_strength))
    if plan is not None:
        extra_params += _hires_params(body, plan, sampler_name)
    eta = body.eta if body.eta is not None else (merged.get("eta_ddim") if resolved.spec.uses_eta else None)
    previews = bool(merged.get("live_previews_enable", True))
    every = _int_option(merged, "show_progress_every_n_steps", 10, -1, 1000) if previews else 0
    req = GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, cfg_scale=body.cfg_scale,
        width=width, height=height, seed=body.seed, batch_size=body.batch_size, n_iter=body.n_iter,
        sampler_name=resolved.spec.name, scheduler=resolved.schedule,
        loras=tuple(found), vae=vae, subseed=body.subseed, subseed_strength=body.subseed_strength,
        seed_resize_from_w=body.seed_resize_from_w, seed_resize_from_h=body.seed_resize_from_h, clip_skip=clip_skip,
        tiling=tiling, eta=eta, hires=plan, inputs=inputs, preview_every=max(every, 0), extra_params=tuple(extra_params),
    )
    return Translated(req, model_name, warnings, overrides)


def _int_option(values: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or not low <= value <= high:
        raise RequestError(f"{key}: must be a whole number from {low} to {high} (got {value!r})")
    return int(value)


def _unsupported(body, kind: str, merged: dict[str, Any], overrides: dict[str, Any], spec) -> list[str]:
    """Warnings for what the request asks that orch accepts but does not do."""
    out = []
    if body.restore_faces or (body.restore_faces is None and merged.get("face_restoration")):
        out.append("restore_faces: face restoration is not available on orch; the images are not face-restored")
    if body.styles:
        out.append(f"styles: no prompt styles exist on orch; not applied: {', '.join(body.styles)}")
    if body.refiner_checkpoint not in (None, "", "None", "none"):
        out.append("refiner_checkpoint: the refiner is not supported on orch; the base model made the whole image")
    if body.firstpass_image:
        out.append("firstpass_image: not supported on orch; the first pass was generated")
    if body.eta is not None and not spec.uses_eta and body.eta != 1.0:
        out.append(f"eta: {spec.name} takes no eta on orch (diffusers' ancestral samplers use 1); not applied")
    for name in ("s_churn", "s_tmin", "s_tmax", "s_min_uncond"):
        if getattr(body, name) not in (None, 0, 0.0):
            out.append(f"{name}: not supported on orch; not applied")
    if body.s_noise not in (None, 1, 1.0):
        out.append("s_noise: not supported on orch; not applied")
    if kind == "txt2img" and body.enable_hr and body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        out.append("hr_checkpoint_name: the second pass uses the same checkpoint on orch")
    if kind == "img2img":
        if body.initial_noise_multiplier not in (None, 1, 1.0):
            out.append("initial_noise_multiplier: not supported on orch; not applied")
        if body.latent_mask:
            out.append("latent_mask: not supported on orch; the mask was used")
    ignored = sorted(k for k in overrides if k not in APPLIED_OPTIONS)
    if ignored:
        out.append(f"override_settings: no effect on orch: {', '.join(ignored)}")
    extra = sorted(body.model_extra or {})
    if extra:
        out.append(f"unknown fields ignored: {', '.join(extra)}")
    return out


def _hires_plan(body, width: int, height: int, max_side: int, models, warnings: list[str]) -> hires.HiresPlan:
    to_x, to_y, tx, ty = hires.target_size(width, height, body.hr_scale, body.hr_resize_x, body.hr_resize_y)
    to_x, to_y = to_x - to_x % 8, to_y - to_y % 8
    if to_x > max_side or to_y > max_side:
        raise RequestError(f"hr_scale: the hires fix would make {to_x}x{to_y}, larger than this server allows ({max_side})")
    if to_x < 64 or to_y < 64:
        raise RequestError(f"hr_scale: the hires fix would make {to_x}x{to_y}; at least 64x64")
    name = body.hr_upscaler or "Latent"
    if name not in LATENT_MODES:
        try:
            name = models.upscalers.find(name, "hr_upscaler").name
        except UnknownUpscaler as e:
            raise RequestError(str(e)) from None
    sampler = None
    if body.hr_sampler_name and body.hr_sampler_name not in ("Use same sampler",):
        try:
            sampler = samplers.resolve_request(body.hr_sampler_name, body.hr_scheduler).spec.name
        except samplers.UnknownSampler as e:
            raise RequestError(str(e).replace("sampler_name", "hr_sampler_name")) from None
    scheduler = body.hr_scheduler if body.hr_scheduler not in (None, "", "Use same scheduler") else None
    if scheduler is not None:
        label = samplers.find_schedule(scheduler)
        if label is None:
            warnings.append(f"hr_scheduler: unknown schedule type {scheduler!r}; used Automatic")
        scheduler = label
    return hires.HiresPlan(upscaler=name, target_width=to_x, target_height=to_y, truncate_x=tx, truncate_y=ty,
                           steps=body.hr_second_pass_steps, sampler_name=sampler, scheduler=scheduler,
                           prompt=body.hr_prompt or None, negative_prompt=body.hr_negative_prompt or None,
                           denoising_strength=body.denoising_strength)


def _hires_params(body, plan: hires.HiresPlan, sampler_name) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [("Denoising strength", body.denoising_strength)]
    if body.hr_resize_x or body.hr_resize_y:
        out.append(("Hires resize", f"{body.hr_resize_x}x{body.hr_resize_y}"))
    else:
        out.append(("Hires upscale", f"{body.hr_scale:g}"))
    if plan.steps:
        out.append(("Hires steps", plan.steps))
    out.append(("Hires upscaler", plan.upscaler))
    if plan.sampler_name and plan.sampler_name != sampler_name:
        out.append(("Hires sampler", plan.sampler_name))
    if plan.scheduler:
        out.append(("Hires schedule type", plan.scheduler))
    if plan.prompt and plan.prompt != body.prompt:
        out.append(("Hires prompt", plan.prompt))
    if plan.negative_prompt and plan.negative_prompt != body.negative_prompt:
        out.append(("Hires negative prompt", plan.negative_prompt))
    return out


def _image_inputs(body, width: int, height: int, models, warnings: list[str]) -> tuple[ImageInputs, list[tuple[str, Any]]]:
    """img2img's init images (and mask), decoded and prepared as A1111 prepares them."""
    from ..images import resize_image

    if not body.init_images:
        raise RequestError("init_images: give at least one base64 image")
    images = [decode_image(b64, f"init_images.{i}") for i, b64 in enumerate(body.init_images)]
    if len(images) > 1 and len(images) > body.batch_size:
        raise RequestError(f"init_images: {len(images)} images for batch_size {body.batch_size}; give one, or at most batch_size")
    if len(images) > 1:
        body.batch_size = len(images)  # one image each (A1111)
    params: list[tuple[str, Any]] = []
    if body.mask:
        mask = decode_image(body.mask, "mask")
        blur_x = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
        blur_y = body.mask_blur if body.mask_blur is not None else body.mask_blur_y
        opts = inpaint.InpaintOptions(mask_blur_x=blur_x, mask_blur_y=blur_y, inpainting_fill=body.inpainting_fill,
                                      full_res=body.inpaint_full_res, full_res_padding=body.inpaint_full_res_padding,
                                      invert=bool(body.inpainting_mask_invert))
        prepared = inpaint.prepare(images, mask, width, height, opts, body.resize_mode)
        params += [("Mask blur", blur_x)] if blur_x == blur_y else [("Mask blur x", blur_x), ("Mask blur y", blur_y)]
        if body.inpainting_mask_invert:
            params.append(("Mask mode", "Inpaint not masked"))
        params.append(("Masked content", ("fill", "original", "latent noise", "latent nothing")[body.inpainting_fill]))
        if body.inpaint_full_res:
            params += [("Inpaint area", "Only masked"), ("Masked area padding", body.inpaint_full_res_padding)]
        return ImageInputs(images=tuple(prepared.images), denoising_strength=body.denoising_strength,
                           resize_mode=body.resize_mode, inpaint=prepared, inpainting_fill=body.inpainting_fill), params
    flat = [flatten(img) for img in images]
    if body.resize_mode != 3:
        flat = [resize_image(body.resize_mode, img, width, height) for img in flat]
    if body.resize_mode:
        params.append(("Resize mode", ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")[body.resize_mode]))
    return ImageInputs(images=tuple(flat), denoising_strength=body.denoising_strength, resize_mode=body.resize_mode), params
