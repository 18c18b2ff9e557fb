"""A1111's wire models, requests and responses, in one place (as A1111's modules/api/models.py).

Request models keep A1111's field names and defaults; unknown fields are accepted and ignored,
as A1111 clients send whole dicts.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# -- requests ----------------------------------------------------------------------------------

MAX_SEED = 2**32 - 1
MAX_STEPS = 1000  # an SD model's training timesteps: no schedule has more steps than that


def _reject_non_finite(value: Any, path: str = "body") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: {value} is not a number JSON can carry (NaN and Infinity are refused)")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_non_finite(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_non_finite(v, f"{path}.{i}")


class _Request(BaseModel):
    """Unknown fields are accepted (A1111 clients send whole dicts) and named in the answer's warnings."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        _reject_non_finite(data)
        return data


class GenerationFields(_Request):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing), with A1111's defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = Field(None, description="Prompt styles: none exist on orch (a warning says so)")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed; -1: random")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="Variation strength: 0 none, 1 the subseed's picture")
    seed_resize_from_h: int = Field(-1, ge=-1, le=8192, description="Draw the noise at this height (0 or -1: off)")
    seed_resize_from_w: int = Field(-1, ge=-1, le=8192)
    sampler_name: str | None = Field(None, description="A name from /sdapi/v1/samplers")
    scheduler: str | None = Field(None, description="A schedule type from /sdapi/v1/schedulers; unknown: Automatic")
    batch_size: int = Field(1, ge=1, description="Images per batch (a request that cannot fit in memory is a 422)")
    n_iter: int = Field(1, ge=1, description="Batches, one after another")
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0)
    width: int = Field(512, ge=64, description="Rounded down to a multiple of 8, as A1111 does; at most the server's limit")
    height: int = Field(512, ge=64, description="Rounded down to a multiple of 8, as A1111 does; at most the server's limit")
    restore_faces: bool | None = Field(None, description="Not available on orch: a warning says so")
    tiling: bool | None = Field(None, description="Circular padding: the image tiles seamlessly")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM's eta")
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(None, description="Options for this request only (see /sdapi/v1/options)")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    sampler_index: str | None = Field("Euler", description="Older name of sampler_name, used when sampler_name is not given")
    script_name: str | None = Field(None, description="A script from /sdapi/v1/scripts (none on orch: any name is a 422)")
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = Field(None, description="Parameters text: fills in the fields this request does not set")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        return v - v % 8


class Txt2ImgRequest(GenerationFields):
    """A1111's StableDiffusionTxt2ImgProcessingAPI."""

    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, description="The hires fix's second pass")
    enable_hr: bool = Field(False, description="The hires fix: a first pass, an upscale, a second pass")
    firstphase_width: int = Field(0, ge=0, le=8192)
    firstphase_height: int = Field(0, ge=0, le=8192)
    hr_scale: float = Field(2.0, gt=0.0, le=16.0)
    hr_upscaler: str | None = Field(None, description="A latent mode or an upscaler (/sdapi/v1/latent-upscale-modes, /upscalers)")
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS, description="0: the same as steps")
    hr_resize_x: int = Field(0, ge=0, le=8192)
    hr_resize_y: int = Field(0, ge=0, le=8192)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationFields):
    """A1111's StableDiffusionImg2ImgProcessingAPI."""

    init_images: list[str] | None = Field(None, description="Base64 images; one is used for the whole batch, or one per image")
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="Base64 mask: white (or opaque) is repainted")
    mask_blur_x: int = Field(4, ge=0, le=256)
    mask_blur_y: int = Field(4, ge=0, le=256)
    mask_blur: int | None = Field(None, ge=0, le=256, description="Both mask_blur_x and mask_blur_y")
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="Only masked: generate the masked area (and padding) at full size")
    inpaint_full_res_padding: int = Field(0, ge=0, le=8192)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = Field(False, description="Echo init_images and mask in `parameters`")


class PngInfoRequest(BaseModel):
    image: str = Field(title="Image", description="The base64 encoded PNG image")


# -- responses ---------------------------------------------------------------------------------


class TextToImageResponse(BaseModel):
    images: list[str] | None = Field(default=None, title="Image", description="The generated images in base64 format.")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seeds, infotexts, and orch's timings (orch_*)")


class ImageToImageResponse(TextToImageResponse):
    pass


class PNGInfoResponse(BaseModel):
    info: str = Field(title="Image info", description="A string with the parameters used to generate the image")
    items: dict[str, Any] = Field(title="Items", description="A dictionary containing all the other fields the image had")
    parameters: dict[str, Any] = Field(title="Parameters", description="A dictionary with parsed generation info fields")


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any] = Field(default_factory=dict)
    skipped: dict[str, Any] = Field(default_factory=dict)


class MemoryResponse(BaseModel):
    ram: dict[str, Any] = Field(description="System memory stats")
    cuda: dict[str, Any] = Field(description="CUDA memory stats")


class ProgressResponse(BaseModel):
    progress: float = Field(description="The progress with a range of 0 to 1")
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class CountResponse(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- extras (upscaling), interrogate --------------------------------------------------------------


class ExtrasBaseRequest(_Request):
    resize_mode: int = Field(0, ge=0, le=1, description="0: upscale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="Not available on orch (a warning in html_info)")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="Not available on orch (a warning in html_info)")
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=8192)
    upscaling_resize_h: int = Field(512, ge=1, le=8192)
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", description="A name from /sdapi/v1/upscalers")
    upscaler_2: str = Field("None", description="A name from /sdapi/v1/upscalers, blended in at extras_upscaler_2_visibility")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="Base64 image")


class FileData(BaseModel):
    data: str = Field(description="Base64 image")
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="Base64 images")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description="What was done, and warnings")
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class InterrogateRequest(_Request):
    image: str = ""
    model: str = "clip"


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class ScriptInfo(BaseModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[dict[str, Any]] = Field(default_factory=list)


class NamedItem(BaseModel):
    """hypernetworks, face-restorers, realesrgan-models, prompt-styles: none on orch (empty lists)."""

    model_config = ConfigDict(extra="allow")

    name: str
