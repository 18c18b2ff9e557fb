"""LoRA through the prompt, as A1111 does it: `<lora:name:weight>`.

A LoRA is merged into the model's weights in place (W += weight * scale * up @ down) and
undone by copying back the saved originals, as A1111's built-in Lora extension does. In
place matters: compiled CUDA graphs read the weights at their fixed addresses, so a merged
LoRA takes effect with no recompiling, and a request without it gets the base model back
bit for bit. Files: kohya (lora_unet_* / lora_te*_*; SD1/2 with diffusers layer names,
SDXL with LDM ones) and diffusers/PEFT (unet.*.lora_A / lora.down). Fused QKV projections
(an optimization on GPUs) get their slice of each update.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ldm_names import unet_key

LORA_SUFFIXES = (".safetensors", ".pt")
_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


class LoraError(ValueError):
    pass


def parse_prompt(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """('a cat <lora:ink:0.8>') -> ('a cat ', (('ink', 0.8),)); a bad weight is an error naming the tag."""
    wanted: dict[str, float] = {}
    for m in _TAG.finditer(prompt):
        name, raw = m.group(1).strip(), (m.group(2) or "1").strip()
        try:
            weight = float(raw)
        except ValueError:
            raise LoraError(f"prompt: {m.group(0)}: the weight {raw!r} is not a number (write <lora:{name}:0.8>)") from None
        wanted[name] = wanted.get(name, 0.0) + weight
    clean = _TAG.sub("", prompt)
    return clean, tuple(sorted((n, w) for n, w in wanted.items() if w != 0.0))


class LoraLibrary:
    """The LoRA files under models/Lora, by name (file name without extension) or relative path."""

    def __init__(self, folder: Path):
        self.folder = folder

    def files(self) -> list[Path]:
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(self.folder).parts))

    def find(self, name: str) -> Path:
        for p in self.files():
            rel = str(p.relative_to(self.folder))
            if name in (p.stem, p.name, rel, rel.rsplit(".", 1)[0]):
                return p
        valid = ", ".join(p.stem for p in self.files()) or f"(none: put .safetensors files in {self.folder})"
        raise LoraError(f"prompt: unknown LoRA {name!r}; LoRAs on this instance: {valid}")


@dataclass
class _Update:
    param: Any
    rows: slice | None  # a fused projection's slice, or the whole weight
    down: Any
    up: Any
    scale: float


@dataclass
class LoraState:
    """What is merged into one loaded model now, and the originals to restore."""

    applied: tuple[tuple[str, float], ...] = ()
    backups: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # id(param) -> (param, original copy)
    cache: dict[str, list[tuple[str, str, Any, Any, float]]] = field(default_factory=dict)  # path -> parsed file
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, mtime) when parsed
    version: int = 0  # changes whenever the weights do (what was encoded with the old ones is stale)


def _components(pipe) -> dict[str, Any]:
    comps = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    return {name: getattr(model, "_orig_mod", model) for name, model in comps.items()}  # under torch.compile's wrapper


def _module_index(pipe) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may use for a layer -> (component, module path)."""
    import torch

    index: dict[str, tuple[str, str]] = {}
    comps = _components(pipe)
    te_prefix = {"text_encoder": "lora_te1_" if "text_encoder_2" in comps else "lora_te_", "text_encoder_2": "lora_te2_"}
    for comp, model in comps.items():
        config = getattr(model, "config", None)
        has_attn = ["CrossAttn" in t for t in getattr(config, "up_block_types", ())]
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            index[f"{comp}.{path}"] = (comp, path)
            if comp == "unet":
                index["lora_unet_" + path.replace(".", "_")] = (comp, path)
                try:
                    ldm = unet_key(path + ".weight", has_attn, config.layers_per_block).removesuffix(".weight")
                    index["lora_unet_" + ldm.replace(".", "_")] = (comp, path)
                except KeyError:
                    pass
            else:
                full = path if path.startswith("text_model.") else "text_model." + path
                index[te_prefix[comp] + full.replace(".", "_")] = (comp, path)
                index[f"{comp}.{full}"] = (comp, path)
    return index


_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))


def read_lora(path: Path, pipe) -> list[tuple[str, str, Any, Any, float]]:
    """(component, module path, down, up, alpha/rank) for each layer of a LoRA file that this model has."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoraError(f"LoRA {path.name}: not a readable LoRA file ({type(e).__name__}: {e})") from None
    index = _module_index(pipe)
    layers, unmatched = [], []
    for key in state:
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                base = key[: -len(down_suffix)]
                break
        else:
            continue
        down, up = state[key], state.get(base + up_suffix)
        if up is None:
            raise LoraError(f"LoRA {path.name}: {key} has no matching {base + up_suffix}")
        alpha = state.get(base + ".alpha")
        rank = down.shape[0]
        scale = float(alpha) / rank if alpha is not None else 1.0
        target = index.get(base) or index.get(base.removeprefix("base_model.model."))
        if target is None:
            unmatched.append(base)
            continue
        layers.append((target[0], target[1], down, up, scale))
    if not layers:
        kinds = sorted({k.rsplit(".", 2)[-2] for k in state if "." in k})[:6]
        raise LoraError(f"LoRA {path.name}: none of its {len(state)} tensors matches a layer of this model "
                        f"(made for another architecture, or an unsupported kind: {', '.join(kinds)})")
    if unmatched:
        import logging

        logging.getLogger("orch.server").warning("LoRA %s: %d layers not in this model (e.g. %s)", path.name, len(unmatched), unmatched[0])
    return layers


def _targets(model, path: str, module) -> list[tuple[Any, slice | None]]:
    """The weights a layer's update goes to: its own, plus its rows in a fused QKV/KV projection."""
    out = [(module.weight, None)]
    parent_path, _, leaf = path.rpartition(".")
    if leaf in ("to_q", "to_k", "to_v") and parent_path:
        attn = model.get_submodule(parent_path)
        rows = module.weight.shape[0]
        fused_qkv, fused_kv = getattr(attn, "to_qkv", None), getattr(attn, "to_kv", None)
        if fused_qkv is not None and getattr(attn, "fused_projections", False):
            i = ("to_q", "to_k", "to_v").index(leaf)
            out.append((fused_qkv.weight, slice(i * rows, (i + 1) * rows)))
        elif fused_kv is not None and getattr(attn, "fused_projections", False) and leaf != "to_q":
            i = ("to_k", "to_v").index(leaf)
            out.append((fused_kv.weight, slice(i * rows, (i + 1) * rows)))
    return out


def apply(pipe, state: LoraState, library: LoraLibrary, wanted: tuple[tuple[str, float], ...]) -> None:
    """Make exactly `wanted` merged into pipe's weights (restoring first whatever else was)."""
    if wanted == state.applied:
        return
    state.version += 1
    restore(state)
    if not wanted:
        return
    comps = _components(pipe)
    try:
        _merge(comps, state, library, wanted, pipe)
    except BaseException:
        restore(state)  # a half-merged set (the second LoRA failed) must not stay in the weights
        raise
    state.applied = wanted


def _merge(comps, state: LoraState, library: LoraLibrary, wanted, pipe) -> None:
    import torch

    with torch.no_grad():
        for name, weight in wanted:
            path = library.find(name)
            key = str(path)
            stamp = (path.stat().st_size, path.stat().st_mtime_ns)
            if state.stamps.get(key) != stamp:  # new, or replaced under the same name
                state.cache[key] = read_lora(path, pipe)
                state.stamps[key] = stamp
            for comp, mod_path, down, up, scale in state.cache[key]:
                model = comps[comp]
                module = model.get_submodule(mod_path)
                for param, rows in _targets(model, mod_path, module):
                    shape = param.shape if rows is None else param[rows].shape
                    delta = (up.to(param.device, torch.float32).flatten(1) @ down.to(param.device, torch.float32).flatten(1))
                    delta = (delta * (scale * weight)).reshape(shape).to(param.dtype)
                    if id(param) not in state.backups:
                        state.backups[id(param)] = (param, param.detach().clone())
                    if rows is None:
                        param.add_(delta)
                    else:
                        param[rows].add_(delta)


def restore(state: LoraState) -> None:
    import torch

    with torch.no_grad():
        for param, original in state.backups.values():
            param.copy_(original)
    state.backups.clear()
    state.applied = ()
