"""Model files as users bring them (LoRAs, VAEs, single-file checkpoints), made from local pipelines."""

from __future__ import annotations

from pathlib import Path

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj", "proj_in", "proj_out", "ff.net")


def write_kohya_lora(pipe, path: Path, seed: int = 1, rank: int = 4, alpha: float = 2.0) -> Path:
    """A LoRA in kohya's layout (lora_unet_* / lora_te_*, lora_down/lora_up/alpha), random but fixed."""
    import torch
    from safetensors.torch import save_file

    state = {}
    g = torch.Generator().manual_seed(seed)
    for prefix, model in (("lora_unet", pipe.unet), ("lora_te", pipe.text_encoder)):
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not any(t in name for t in LORA_TARGETS):
                continue
            if prefix == "lora_te" and not name.startswith("text_model."):
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
