"""Names in the original (LDM / A1111) checkpoint layout for diffusers' module names.

Used to resolve kohya-style LoRA names (SDXL LoRAs name UNet layers as LDM does:
lora_unet_input_blocks_4_1_...), and by tests to write single-file checkpoints from
pipelines built locally (nothing may be downloaded). Written from the two layouts'
definitions; loading single files goes the other way through diffusers' own conversion.
"""

from __future__ import annotations

import re
from pathlib import Path

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _inner(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key(key: str, up_block_has_attention: list[bool], layers_per_block: int = 2) -> str:
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
              "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"}
    for old, new in simple.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{per_down * i + j + 1}.0.{_inner(rest, _RESNET_UNET)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{per_down * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_down * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_inner(m[2], _RESNET_UNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{per_up * int(m[1]) + int(m[2])}.0.{_inner(m[3], _RESNET_UNET)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{per_up * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{per_up * i + per_up - 1}.{2 if up_block_has_attention[i] else 1}.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key(key: str, blocks: int) -> str:
    for side in ("encoder", "decoder"):
        if key.startswith(side + "."):
            rest = key[len(side) + 1:]
            break
    else:
        return key  # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.down.{m[1]}.block.{m[2]}.{_inner(m[3], _RESNET_VAE)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
        return f"{side}.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{_inner(m[3], _RESNET_VAE)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        return f"{side}.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{_inner(m[2], _RESNET_VAE)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        return f"{side}.mid.attn_1.{_inner(m[1], _ATTN_VAE)}"
    return f"{side}.{rest}"


def vae_state_dict_to_ldm(vae, prefix: str = "") -> dict:
    blocks = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = vae_key(key, blocks)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        out[prefix + new] = value.contiguous()
    return out


def pipeline_to_ldm(pipe) -> dict:
    unet = pipe.unet
    has_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    state = {f"model.diffusion_model.{unet_key(k, has_attn, unet.config.layers_per_block)}": v.contiguous()
             for k, v in unet.state_dict().items()}
    state.update(vae_state_dict_to_ldm(pipe.vae, "first_stage_model."))
    # LDM files name the text tower "transformer.text_model.*" (transformers >= 5.6 dropped the inner prefix).
    state.update({f"cond_stage_model.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v.contiguous()
                  for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")})
    return state


def save_ldm_checkpoint(pipe, path: Path, dtype=None) -> Path:
    from safetensors.torch import save_file

    state = pipeline_to_ldm(pipe)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(path))
    return path


def controlnet_to_ldm(net, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNetModel's weights under the original (ControlNet 1.x) names, as users download them."""
    blocks = 2 * (len(net.config.conditioning_embedding_out_channels) - 1)
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            if rest.startswith("conv_in."):
                new = "input_hint_block.0." + rest[len("conv_in."):]
            elif rest.startswith("conv_out."):
                new = f"input_hint_block.{2 * (blocks + 1)}." + rest[len("conv_out."):]
            else:
                m = re.match(r"blocks\.(\d+)\.(.*)", rest)
                new = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            new = f"zero_convs.{m[1]}.0.{m[2]}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key[len("controlnet_mid_block."):]
        else:
            new = unet_key(key, [], net.config.layers_per_block)
        out[prefix + new] = value.contiguous()
    return out
