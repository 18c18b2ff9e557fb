"""A1111's `parameters` text (the "infotext"): written into every PNG, read back by png-info."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def quote(value: Any) -> str:
    """A value as A1111 writes it: in JSON quotes when it holds a comma, colon or quote."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_infotext(req, seed: int, sampler: str, schedule: str, model, vae: Path | None = None, subseed: int = -1) -> str:
    """A1111's `parameters` text: prompt, negative prompt line, then 'Key: value' pairs."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    pairs: list[tuple[str, Any]] = [
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
    if req.subseed_strength:
        pairs += [("Variation seed", subseed), ("Variation seed strength", f"{req.subseed_strength:g}")]
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        pairs.append(("Seed resize from", f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"))
    if req.clip_skip > 1:
        pairs.append(("Clip skip", req.clip_skip))
    if req.tiling:
        pairs.append(("Tiling", "True"))
    pairs += list(req.extra_params)
    if req.loras:
        pairs.append(("Lora weights", '"' + ", ".join(f"{n}: {w:g}" for n, w in req.loras) + '"'))
    pairs.append(("Version", "orch"))
    lines.append(", ".join(f"{k}: {v if k == 'Lora weights' else quote(v)}" for k, v in pairs))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _typed(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext back into fields, as A1111's png-info gives them: Prompt, Negative
    prompt, each 'Key: value' (numbers as numbers), sizes also as Key-1 / Key-2, Clip skip."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 and len(_PAIR.findall(lines[-1])) >= 3 else ""
    body = lines[:-1] if params_line else lines
    prompt_lines, negative = [], []
    target = prompt_lines
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:"):].strip()
        target.append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(params_line):
        value = value.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        key = key.strip()
        size = _SIZE.match(value) if isinstance(value, str) else None
        if size:
            out[key] = value
            out[f"{key}-1"], out[f"{key}-2"] = int(size.group(1)), int(size.group(2))
        else:
            out[key] = _typed(value) if isinstance(value, str) else value
    out.setdefault("Clip skip", 1)
    return out
