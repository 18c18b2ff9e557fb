"""A1111's `parameters` text (the "infotext"): written into every PNG, read back by png-info."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_infotext(req, seed: int, sampler: str, schedule: str, model, vae: Path | None = None) -> str:
    """A1111's `parameters` text: prompt, negative prompt line, then 'Key: value' pairs."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    pairs = [
        ("Steps", req.steps),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", f"{req.cfg_scale:g}"),
        ("Seed", seed),
        ("Size", f"{req.width}x{req.height}"),
        ("Model hash", model.short_hash),
        ("Model", model.model_name),
    ]
    if vae is not None:
        pairs.append(("VAE", vae.name))
    if req.loras:
        pairs.append(("Lora weights", '"' + ", ".join(f"{n}: {w:g}" for n, w in req.loras) + '"'))
    pairs.append(("Version", "orch"))
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext back into fields: Prompt, Negative prompt, and each 'Key: value'."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 and ":" in lines[-1] else ""
    body = lines[:-1] if params_line else lines
    prompt_lines, negative = [], []
    target = prompt_lines
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:"):].strip()
        target.append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative)}
    for part in params_line.split(", "):
        key, _, value = part.partition(": ")
        if key and value:
            out[key.strip()] = value.strip()
    return out
