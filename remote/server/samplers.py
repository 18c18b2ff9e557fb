"""A1111 sampler names and schedule types, mapped to diffusers schedulers.

A1111 clients send `sampler_name` ("DPM++ 2M") and `scheduler` ("Karras"); older ones
fold the schedule into the name ("DPM++ 2M Karras"). Both are accepted. Each request gets
its own scheduler instance, built from the model's scheduler config: schedulers keep
per-run state and are not safe to share between concurrent requests.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any


class UnknownSampler(ValueError):
    pass


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    class_name: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    needs: str | None = None  # a module the scheduler imports


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m",)),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde",), needs="torchsde"),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m_sde",)),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "Euler Ancestral")),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, ("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, ("k_lms",), needs="scipy"),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, ("k_heun",)),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",)),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",)),
    SamplerSpec("DDIM", "DDIMScheduler", {}, ("ddim",)),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",)),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, ("unipc",)),
    SamplerSpec("LCM", "LCMScheduler", {}, ("lcm",)),
)

# A1111's schedule types ("scheduler" in the API) -> diffusers sigma options.
SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
}

DEFAULT_SAMPLER = "Euler"


def available_samplers() -> list[SamplerSpec]:
    return [s for s in SAMPLERS if s.needs is None or importlib.util.find_spec(s.needs) is not None]


def _lookup(name: str) -> SamplerSpec | None:
    key = name.strip().lower()
    for spec in available_samplers():
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    return None


def resolve(sampler_name: str | None, schedule: str | None = None) -> tuple[SamplerSpec, str]:
    """(sampler, schedule type) for a request; raises UnknownSampler naming the valid choices."""
    name = (sampler_name or DEFAULT_SAMPLER).strip()
    sched = (schedule or "Automatic").strip()
    spec = _lookup(name)
    if spec is None:
        # Old style: "DPM++ 2M Karras".
        for schedule_name in SCHEDULES:
            suffix = " " + schedule_name.lower()
            if name.lower().endswith(suffix):
                spec = _lookup(name[: -len(suffix)])
                if spec is not None:
                    sched = schedule_name
                    break
    if spec is None:
        valid = ", ".join(s.name for s in available_samplers())
        raise UnknownSampler(f"sampler_name: unknown sampler {sampler_name!r}; valid samplers: {valid}")
    canonical = next((k for k in SCHEDULES if k.lower() == sched.lower()), None)
    if canonical is None:
        raise UnknownSampler(f"scheduler: unknown schedule type {schedule!r}; valid: {', '.join(SCHEDULES)}")
    return spec, canonical


def make_scheduler(base_config: dict[str, Any], spec: SamplerSpec, schedule: str):
    """A fresh scheduler for one request, from the model's own scheduler config: a copy of a
    never-used one made once (from_config took 0.7 ms, and 36 ms for DPM++ SDE; a copy 0.15 ms)."""
    key = (json.dumps(base_config, sort_keys=True, default=str), spec.name, schedule)
    template = _templates.get(key)
    if template is None:
        import diffusers

        cls = getattr(diffusers, spec.class_name)
        template = cls.from_config(base_config, **{**spec.options, **SCHEDULES[schedule]})
        if len(_templates) >= 64:
            _templates.pop(next(iter(_templates)))
        _templates[key] = template
    return copy.deepcopy(template)


_templates: dict[tuple[str, str, str], Any] = {}
