"""Model files as users bring them (LoRAs, VAEs, single-file checkpoints), made from local pipelines."""

from __future__ import annotations

from pathlib import Path

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj", "proj_in", "proj_out", "ff.net")


def write_kohya_lora(pipe, path: Path, seed: int = 1, rank: int = 4, alpha: float = 2.0) -> Path:
    """A LoRA in kohya's layout (lora_down/lora_up/alpha), random but fixed, named as sd-scripts names it:
    SD1/2: lora_unet_<diffusers name>, lora_te_; SDXL: UNet layers by their LDM names, lora_te1_/lora_te2_."""
    import torch
    from safetensors.torch import save_file

    from remote.server.ldm_names import unet_key

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    targets = [("lora_unet", pipe.unet)]
    targets += [("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)] if sdxl else [("lora_te", pipe.text_encoder)]
    has_attn = ["CrossAttn" in t for t in pipe.unet.config.up_block_types]
    state = {}
    g = torch.Generator().manual_seed(seed)
    for prefix, model in targets:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not any(t in name for t in LORA_TARGETS):
                continue
            if prefix == "lora_unet":
                if sdxl:
                    name = unet_key(name + ".weight", has_attn, pipe.unet.config.layers_per_block).removesuffix(".weight")
            elif not name.startswith("text_model."):
                name = "text_model." + name  # kohya names CLIP's layers with the text_model prefix
            key = f"{prefix}_{name.replace('.', '_')}"
            state[key + ".lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.2
            state[key + ".lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.2
            state[key + ".alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_ldm_vae(vae, path: Path) -> Path:
    """A VAE as A1111 users download it (LDM key names, no prefix)."""
    from safetensors.torch import save_file

    from remote.server.ldm_names import vae_state_dict_to_ldm

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vae_state_dict_to_ldm(vae), str(path))
    return path


def build_tiny_sdxl(seed: int = 0):
    """An SDXL-shaped pipeline (two text encoders, text_time conditioning) with tiny random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from remote.server.demo_model import _byte_level_vocab, _tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        sample_size=64, scaling_factor=0.13025)
    vocab = _byte_level_vocab()
    text = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab),
                max_position_embeddings=77, projection_dim=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
                                     tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), scheduler=scheduler)


def write_tiny_esrgan(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """An ESRGAN (RRDBNet) upscaler with tiny random weights, in the layout spandrel recognises."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
