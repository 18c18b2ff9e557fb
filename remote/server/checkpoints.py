"""Single-file checkpoints (the .safetensors A1111 users download), loaded with no network.

A1111 looks at a checkpoint's keys to pick one of the configs it ships; so does this module:
diffusers' own detector names the architecture, and diffusers gets a diffusers-format config
folder written from the configs below, so `from_single_file` never asks the Hub. The CLIP
tokenizer's vocabulary ships with orch (model_configs/bpe_simple_vocab_16e6.txt.gz, MIT,
from OpenAI's CLIP by way of open_clip); the files the tokenizer reads are built from it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
BPE_VOCAB = Path(__file__).parent / "model_configs" / "bpe_simple_vocab_16e6.txt.gz"
CONFIG_VERSION = "1"  # bump when a config below changes: written folders are rebuilt


class UnsupportedCheckpoint(ValueError):
    pass


# -- the configs: diffusers' own for the Hub's reference repos ---------------------------

_SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
                  clip_sample=False, set_alpha_to_one=False)
_VAE = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
            latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
_CLIP_L = dict(_class_name="CLIPTextModel", architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408,
               hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
               hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD2's OpenCLIP ViT-H text tower, without its last layer (SD2 reads the penultimate one).
_OPENCLIP_H = dict(_CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512)
_OPENCLIP_BIGG = dict(_CLIP_L, _class_name="CLIPTextModelWithProjection", architectures=["CLIPTextModelWithProjection"],
                      hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
                      projection_dim=1280)
_UNET_SD1 = dict(_class_name="UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
_UNET_SD2 = dict(_UNET_SD1, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
_UNET_SDXL = dict(_class_name="UNet2DConditionModel", sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[320, 640, 1280], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
                  attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@dataclass(frozen=True)
class Architecture:
    name: str  # orch's name, shown to users
    pipeline: str  # diffusers pipeline class
    components: dict[str, dict[str, Any]]  # subfolder -> config
    tokenizers: dict[str, str]  # subfolder -> pad token
    inpainting: bool = False

    @property
    def native_side(self) -> int:
        return int(self.components["unet"]["sample_size"]) * 8


def _sd(name: str, unet: dict, text: dict, pad: str, pipeline: str, vae_side: int, prediction: str = "epsilon",
        inpainting: bool = False) -> Architecture:
    return Architecture(name, pipeline, {"unet": unet, "vae": dict(_VAE, sample_size=vae_side), "text_encoder": text,
                                         "scheduler": dict(_SCHEDULER, prediction_type=prediction)},
                        {"tokenizer": pad}, inpainting)


def _sdxl(name: str, unet: dict, pipeline: str, inpainting: bool = False) -> Architecture:
    return Architecture(name, pipeline, {"unet": unet, "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                                         "text_encoder": _CLIP_L, "text_encoder_2": _OPENCLIP_BIGG, "scheduler": _SCHEDULER},
                        {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}, inpainting)


# Keys: diffusers' names for what infer_diffusers_model_type detects.
ARCHITECTURES: dict[str, Architecture] = {
    "v1": _sd("sd1", _UNET_SD1, _CLIP_L, "<|endoftext|>", "StableDiffusionPipeline", 512),
    "inpainting": _sd("sd1-inpainting", dict(_UNET_SD1, in_channels=9), _CLIP_L, "<|endoftext|>", "StableDiffusionInpaintPipeline",
                      512, inpainting=True),
    # SD2.x 768 (v-prediction), as diffusers assumes; SD2 base (512, epsilon) needs a diffusers folder.
    "v2": _sd("sd2-768-v", _UNET_SD2, _OPENCLIP_H, "!", "StableDiffusionPipeline", 768, prediction="v_prediction"),
    "inpainting_v2": _sd("sd2-inpainting", dict(_UNET_SD2, sample_size=64, in_channels=9), _OPENCLIP_H, "!",
                         "StableDiffusionInpaintPipeline", 512, inpainting=True),
    "xl_base": _sdxl("sdxl", _UNET_SDXL, "StableDiffusionXLPipeline"),
    "xl_inpaint": _sdxl("sdxl-inpainting", dict(_UNET_SDXL, in_channels=9), "StableDiffusionXLInpaintPipeline", inpainting=True),
}


# -- reading a checkpoint without loading it ------------------------------------------------


class _ShapeOnly:
    def __init__(self, shape):
        self.shape = tuple(shape)


class CheckpointKeys:
    """Key names and shapes of a checkpoint, read from the safetensors header alone."""

    def __init__(self, path: Path):
        self.path = path
        self._shapes: dict[str, tuple[int, ...]] = {}
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            state = state.get("state_dict", state)
            self._shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __getitem__(self, key: str) -> _ShapeOnly:
        return _ShapeOnly(self._shapes[key])

    def keys(self):
        return self._shapes.keys()

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


_CHECKPOINT_LOOKS: dict[tuple[str, int, int], bool] = {}


def looks_like_checkpoint(path: Path) -> bool:
    """A .safetensors file holding a diffusion model (not a LoRA or VAE left in the wrong folder).

    Reads the header only; remembered per (path, size, mtime). Other formats are assumed to be.
    """
    if path.suffix.lower() != ".safetensors":
        return True
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CHECKPOINT_LOOKS:
        try:
            _CHECKPOINT_LOOKS[key] = _has_diffusion_model(CheckpointKeys(path))
        except Exception:
            _CHECKPOINT_LOOKS[key] = False
    return _CHECKPOINT_LOOKS[key]


def _has_diffusion_model(keys) -> bool:
    return any(k.startswith("model.diffusion_model.") for k in keys)


def detect(path: Path) -> Architecture:
    """Which architecture a single-file checkpoint is, or a clear error saying what it is not."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        keys = CheckpointKeys(path)
    except Exception as e:
        raise UnsupportedCheckpoint(f"{path.name}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not _has_diffusion_model(keys):
        hint = " (it looks like a LoRA: put it under models/Lora)" if any("lora" in k for k in list(keys)[:50]) else ""
        raise UnsupportedCheckpoint(f"{path.name}: not a Stable Diffusion checkpoint (no model.diffusion_model.* weights){hint}")
    kind = infer_diffusers_model_type(keys)
    if kind not in ARCHITECTURES:
        supported = ", ".join(a.name for a in ARCHITECTURES.values())
        raise UnsupportedCheckpoint(f"{path.name}: architecture {kind!r} is not supported for single files; supported: {supported}")
    return ARCHITECTURES[kind]


def short_hash(path: Path) -> str:
    """A1111's legacy "model hash": sha256 of 64 KiB at offset 1 MiB, 8 hex digits (instant, unlike a full sha256)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# -- the config folder diffusers reads ------------------------------------------------------


def _byte_symbols() -> list[str]:
    from .demo_model import _byte_level_vocab

    return [s for s in _byte_level_vocab() if len(s) == 1]


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    """vocab.json + merges.txt exactly as CLIP's tokenizer builds them from its BPE file."""
    lines = gzip.open(BPE_VOCAB).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                              "do_lower_case": True, "errors": "replace"}))


def _library(config: dict[str, Any]) -> str:
    return "transformers" if config["_class_name"].startswith("CLIP") else "diffusers"


def config_folder(arch: Architecture, cache_dir: Path) -> Path:
    """The diffusers-format config folder for `arch` (no weights), written once under cache_dir."""
    target = cache_dir / f"{arch.name}-v{CONFIG_VERSION}"
    if (target / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch.name}-", dir=cache_dir))
    try:
        index: dict[str, Any] = {"_class_name": arch.pipeline, "_diffusers_version": "0.42.1"}
        for sub, config in arch.components.items():
            (tmp / sub).mkdir()
            name = "scheduler_config.json" if sub == "scheduler" else "config.json"
            (tmp / sub / name).write_text(json.dumps(config, indent=1))
            index[sub] = [_library(config), config["_class_name"]]
        for sub, pad in arch.tokenizers.items():
            write_clip_tokenizer(tmp / sub, pad)
            index[sub] = ["transformers", "CLIPTokenizer"]
        if arch.pipeline.startswith("StableDiffusionXL"):
            index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                         requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_single_file(path: Path, cache_dir: Path, dtype):
    """A diffusers pipeline from one checkpoint file, offline; returns (pipeline, architecture)."""
    import diffusers

    arch = detect(path)
    config = config_folder(arch, cache_dir)
    pipeline_class = getattr(diffusers, arch.pipeline)
    pipe = pipeline_class.from_single_file(str(path), config=str(config), torch_dtype=dtype, local_files_only=True)
    return pipe, arch


def load_vae_file(path: Path, vae_config: dict[str, Any], cache_dir: Path, dtype):
    """A VAE override from a file (A1111's models/VAE/*.safetensors), shaped like the model's own VAE."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        return AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    config = {k: v for k, v in dict(vae_config).items() if not k.startswith("_") or k == "_class_name"}
    config["_class_name"] = "AutoencoderKL"
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir / f"vae-{digest}"
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".config-{os.getpid()}.json"
        tmp.write_text(json.dumps(config))
        tmp.replace(folder / "config.json")
    return AutoencoderKL.from_single_file(str(path), config=str(folder), torch_dtype=dtype, local_files_only=True)
