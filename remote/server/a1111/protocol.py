"""A1111's wire models, requests and responses, in one place (as A1111's modules/api/models.py).

Request models keep A1111's field names and defaults; unknown fields are accepted and ignored,
as A1111 clients send whole dicts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# -- requests ----------------------------------------------------------------------------------


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: its defaults; unknown fields are ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=16)
    steps: int = Field(50, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64)
    height: int = Field(512, ge=64)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}; nearest: {v - v % 8} or {v - v % 8 + 8})")
        return v


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionImg2ImgProcessingAPI (the fields clients rely on)."""

    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None
    inpainting_fill: int = 0
    mask_blur: int = 4
    inpaint_full_res: bool = False
    resize_mode: int = 0


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
