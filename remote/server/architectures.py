"""The Stable Diffusion architectures orch knows, as diffusers component configs.

Used to build full-size random-weight pipelines for benchmarks (speed does not depend on
the weights) without any download. The tokenizer is the demo model's byte-level one:
the text encoder's embedding keeps CLIP's 49408 rows, so shapes and costs are real.
"""

from __future__ import annotations

from typing import Any

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

VAE = dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)

UNETS: dict[str, dict[str, Any]] = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def build_random_pipeline(arch: str, dtype=None, seed: int = 0, device: str = "cpu"):
    """A full-size SD1.5 or SDXL pipeline with random weights, built locally (on `device`: fast on a GPU)."""
    import torch

    with torch.device(device):
        return _build(arch, dtype, seed)


def _build(arch: str, dtype, seed: int):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .demo_model import _tokenizer

    torch.manual_seed(seed)
    dtype = dtype or torch.float32
    tokenizer = _tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                       steps_offset=1, timestep_spacing="leading")
    unet = UNet2DConditionModel(**UNETS[arch]).to(dtype)
    vae = AutoencoderKL(**VAE, scaling_factor=0.18215 if arch == "sd15" else 0.13025).to(dtype)
    if arch == "sd15":
        from diffusers import StableDiffusionPipeline

        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)).to(dtype)
        return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    from diffusers import StableDiffusionXLPipeline

    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)).to(dtype)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids)).to(dtype)
    return StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=_tokenizer(), scheduler=scheduler)
