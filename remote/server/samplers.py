"""A1111's samplers and schedule types, mapped to diffusers schedulers and sigma schedules.

A1111 clients send `sampler_name` ("DPM++ 2M") and `scheduler` ("Karras"); older ones fold
the schedule into the name ("DPM++ 2M Karras"). Both are accepted. "Automatic" is the
sampler's own default schedule, as in A1111 (Karras for DPM++ 2M, Exponential for the
multistep SDE samplers, Uniform for Euler...); an unknown schedule type falls back to
Automatic (with a warning in the answer). Each request gets its own scheduler, copied from
a template made once from the model's scheduler config: schedulers keep per-run state.

Every A1111 1.10 schedule type is computed here from the model's own sigma table, with
A1111's formulas, and handed to the diffusers scheduler through its Karras hook (the method
diffusers calls to turn the model's sigmas into a step schedule), so one mechanism serves
every sigma-based scheduler. DDIM, PLMS and LCM step on timesteps, not sigmas: as in A1111
a schedule type does not apply to them.

Three of A1111's 20 samplers cannot be built from diffusers schedulers: DPM adaptive
(chooses its own step sizes as it goes), Restart (steps back up the noise schedule with
fresh noise, several model calls per step) and DDIM CFG++ (needs the unguided prediction
apart from the guided one). They are listed in ABSENT with the nearest one, and a request
for them gets a 422 naming it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
from dataclasses import dataclass, field
from typing import Any


class UnknownSampler(ValueError):
    pass


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    class_name: str
    options: dict[str, Any] = field(default_factory=dict)  # scheduler config
    aliases: tuple[str, ...] = ()
    default_schedule: str = "Uniform"  # what "Automatic" means for it (A1111's sampler option "scheduler")
    needs: str | None = None  # a module the scheduler imports
    brownian: bool = False  # noise from a Brownian tree, seeded per image
    sigma_based: bool = True  # schedule types apply (False: DDIM, PLMS, LCM step on timesteps)
    uses_eta: bool = False  # the pipeline's `eta` reaches it (DDIM)

    def a1111_options(self) -> dict[str, Any]:
        """What A1111's /samplers shows under "options"."""
        out: dict[str, Any] = {}
        if self.default_schedule not in ("Uniform", "Automatic") and self.sigma_based:
            out["scheduler"] = SCHEDULES[self.default_schedule].name
        if self.brownian:
            out["brownian_noise"] = True
        return out


_SDE = {"algorithm_type": "sde-dpmsolver++"}
SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m",),
                default_schedule="Karras"),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde",), default_schedule="Karras", needs="torchsde",
                brownian=True),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 2, "solver_type": "midpoint"},
                ("k_dpmpp_2m_sde",), default_schedule="Exponential"),
    SamplerSpec("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 2, "solver_type": "heun"},
                ("k_dpmpp_2m_sde_heun",), default_schedule="Exponential"),
    SamplerSpec("DPM++ 2S a", "DPMSolverSinglestepScheduler", {**_SDE, "solver_order": 2, "lower_order_final": True},
                ("k_dpmpp_2s_a",),
                default_schedule="Karras"),
    SamplerSpec("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}, ("k_dpmpp_3m_sde",),
                default_schedule="Exponential"),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral", "Euler Ancestral")),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, ("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, ("k_lms",), needs="scipy"),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, ("k_heun",)),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",), default_schedule="Karras"),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",), default_schedule="Karras"),
    # k-diffusion's DPM fast: DPM-Solver, orders 3/2/1 spread over the steps, log-SNR-uniform steps.
    SamplerSpec("DPM fast", "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                           "lower_order_final": True},
                ("k_dpm_fast",), default_schedule="Exponential"),
    SamplerSpec("DDIM", "DDIMScheduler", {}, ("ddim",), sigma_based=False, uses_eta=True),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",), sigma_based=False),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, ("unipc",)),
    SamplerSpec("LCM", "LCMScheduler", {}, ("lcm", "k_lcm"), sigma_based=False),
)

# A1111 samplers diffusers cannot run, with the nearest one that it can.
ABSENT: dict[str, tuple[str, str]] = {
    "DPM adaptive": ("DPM fast", "it picks its own step sizes while it runs; diffusers steps on a fixed schedule"),
    "Restart": ("Heun", "it steps back up the noise schedule with fresh noise, which diffusers' schedulers cannot"),
    "DDIM CFG++": ("DDIM", "it needs the unguided prediction apart from the guided one, which diffusers does not pass"),
}
ABSENT_ALIASES = {"k_dpm_ad": "DPM adaptive", "restart": "Restart", "ddim_cfgpp": "DDIM CFG++"}

DEFAULT_SAMPLER = "Euler"


# -- schedule types: sigmas from the model's table, A1111's formulas ------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    name: str  # A1111's id ("karras")
    label: str  # what users see ("Karras")
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: tuple[str, ...] = ()


SCHEDULES: dict[str, ScheduleSpec] = {s.label: s for s in (
    ScheduleSpec("automatic", "Automatic"),
    ScheduleSpec("uniform", "Uniform", need_inner_model=True),
    ScheduleSpec("karras", "Karras", default_rho=7.0),
    ScheduleSpec("exponential", "Exponential"),
    ScheduleSpec("polyexponential", "Polyexponential", default_rho=1.0),
    ScheduleSpec("sgm_uniform", "SGM Uniform", need_inner_model=True, aliases=("SGMUniform",)),
    ScheduleSpec("kl_optimal", "KL Optimal"),
    ScheduleSpec("align_your_steps", "Align Your Steps"),
    ScheduleSpec("simple", "Simple", need_inner_model=True),
    ScheduleSpec("normal", "Normal", need_inner_model=True),
    ScheduleSpec("ddim", "DDIM", need_inner_model=True),
    ScheduleSpec("beta", "Beta", need_inner_model=True),
)}

# Align Your Steps' published 10-step sigmas (NVIDIA), for SD1.x and SDXL.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
BETA_ALPHA = BETA_BETA = 0.6  # A1111's beta_dist_alpha / beta_dist_beta defaults


def model_sigmas(alphas_cumprod) -> Any:
    """The model's sigma for each training timestep, ascending (k-diffusion's model_wrap.sigmas)."""
    import numpy as np

    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return ((1 - a) / a) ** 0.5


def _t_to_sigma(t, log_sigmas):
    import numpy as np

    t = np.clip(np.asarray(t, dtype=np.float64), 0, len(log_sigmas) - 1)
    low = np.floor(t).astype(int)
    high = np.minimum(low + 1, len(log_sigmas) - 1)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def _loglinear_interp(values, n: int):
    import numpy as np

    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


def schedule_sigmas(label: str, n: int, table, sdxl: bool = False):
    """The n sigmas (highest first, without the final 0) of an A1111 schedule type for n steps."""
    import numpy as np

    sigmas = np.asarray(table, dtype=np.float64)
    log_sigmas = np.log(sigmas)
    smin, smax = float(sigmas[0]), float(sigmas[-1])
    t_max = len(sigmas) - 1
    if label == "Uniform":
        out = _t_to_sigma(np.linspace(t_max, 0, n), log_sigmas)
    elif label == "Karras":
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        out = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    elif label == "Exponential":
        out = np.exp(np.linspace(math.log(smax), math.log(smin), n))
    elif label == "Polyexponential":
        ramp = np.linspace(1, 0, n) ** 1.0
        out = np.exp(ramp * (math.log(smax) - math.log(smin)) + math.log(smin))
    elif label == "SGM Uniform":
        out = _t_to_sigma(np.linspace(t_max, 0, n + 1)[:-1], log_sigmas)
    elif label == "Normal":
        out = _t_to_sigma(np.linspace(t_max, 0, n), log_sigmas)
    elif label == "KL Optimal":
        steps = np.arange(n + 1) / n
        out = np.tan(steps * math.atan(smin) + (1 - steps) * math.atan(smax))[:-1]
    elif label == "Align Your Steps":
        preset = AYS_SDXL if sdxl else AYS_SD15
        out = np.asarray(preset) if n == len(preset) else _loglinear_interp(preset, n)
    elif label == "Simple":
        ss = len(sigmas) / n
        out = np.array([sigmas[-(1 + int(x * ss))] for x in range(n)])
    elif label == "DDIM":
        ss = max(len(sigmas) // n, 1)
        out = np.array([sigmas[1 + ss * i] for i in range(n)])[::-1]
    elif label == "Beta":
        from scipy import stats

        x = stats.beta.ppf(1 - np.linspace(0, 1, n), BETA_ALPHA, BETA_BETA)
        out = smin + x * (smax - smin)
    else:
        raise ValueError(f"no sigma schedule for {label!r}")
    return np.asarray(out, dtype=np.float64)


class _Scheduled:
    """Mixed into a diffusers scheduler class: its Karras hook returns the A1111 schedule named
    by `orch_schedule` (diffusers then derives the timesteps and appends the final sigma)."""

    orch_schedule: str = "Karras"
    orch_sdxl: bool = False

    def _convert_to_karras(self, in_sigmas, num_inference_steps=None):
        n = int(num_inference_steps or self.num_inference_steps)
        return schedule_sigmas(self.orch_schedule, n, model_sigmas(self.alphas_cumprod), self.orch_sdxl)


class _ScheduledAncestral(_Scheduled):
    """Euler a has no Karras hook in diffusers: the schedule replaces its sigmas after set_timesteps."""

    def set_timesteps(self, num_inference_steps, device=None):
        import numpy as np
        import torch

        super().set_timesteps(num_inference_steps, device=device)
        table = model_sigmas(self.alphas_cumprod)
        sigmas = schedule_sigmas(self.orch_schedule, num_inference_steps, table, self.orch_sdxl)
        log_sigmas = np.log(table)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas], dtype=np.float32)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device)


def _sigma_to_t(sigma: float, log_sigmas) -> float:
    import numpy as np

    log_sigma = np.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), 0, len(log_sigmas) - 2))
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return float((1 - w) * low + w * high)


@functools.cache
def _scheduled_class(class_name: str):
    import diffusers

    base = getattr(diffusers, class_name)
    mixin = _ScheduledAncestral if class_name == "EulerAncestralDiscreteScheduler" else _Scheduled
    return type(base.__name__, (mixin, base), {"__module__": base.__module__, "__qualname__": base.__qualname__})


# -- resolving a request's names --------------------------------------------------------------


def available_samplers() -> list[SamplerSpec]:
    return [s for s in SAMPLERS if s.needs is None or importlib.util.find_spec(s.needs) is not None]


def _lookup(name: str) -> SamplerSpec | None:
    key = name.strip().lower()
    for spec in available_samplers():
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    return None


def accepted_names() -> list[str]:
    """Every sampler spelling a request may use: names, aliases, and A1111's older "name schedule" form."""
    names = [spec.name for spec in available_samplers()]
    for spec in available_samplers():
        names += list(spec.aliases)
    for spec in available_samplers():
        names += [f"{spec.name} {label}" for label in SCHEDULES]
    return list(dict.fromkeys(names))


def find_schedule(name: str | None) -> str | None:
    """The label of a schedule type given by label, id or alias (case-insensitive); None if unknown."""
    key = (name or "Automatic").strip().lower()
    for spec in SCHEDULES.values():
        if key in (spec.label.lower(), spec.name, *(a.lower() for a in spec.aliases)):
            return spec.label
    return None


@dataclass(frozen=True)
class Resolved:
    spec: SamplerSpec
    schedule: str  # the schedule that runs: "Automatic" resolved; "Automatic" for samplers without one
    warnings: tuple[str, ...] = ()


def resolve_request(sampler_name: str | None, schedule: str | None = None) -> Resolved:
    """The sampler and schedule a request runs with, and what it asked that cannot be done as asked."""
    name = (sampler_name or DEFAULT_SAMPLER).strip()
    asked = (schedule or "Automatic").strip()
    spec = _lookup(name)
    if spec is None:  # old style: "DPM++ 2M Karras"
        for label in sorted(SCHEDULES, key=len, reverse=True):
            if name.lower().endswith(" " + label.lower()):
                spec = _lookup(name[: -len(label) - 1])
                if spec is not None:
                    asked = label
                    break
    if spec is None:
        absent = ABSENT_ALIASES.get(name.lower(), next((a for a in ABSENT if a.lower() == name.lower()), None))
        if absent:
            nearest, why = ABSENT[absent]
            raise UnknownSampler(f"sampler_name: {absent!r} is not available on orch ({why}); the nearest is {nearest!r}")
        valid = ", ".join(s.name for s in available_samplers())
        raise UnknownSampler(f"sampler_name: unknown sampler {sampler_name!r}; valid samplers: {valid}")
    warnings: list[str] = []
    label = find_schedule(asked)
    if label is None:
        warnings.append(f"scheduler: unknown schedule type {schedule!r}; used Automatic (valid: {', '.join(SCHEDULES)})")
        label = "Automatic"
    if not spec.sigma_based:
        if label != "Automatic":
            warnings.append(f"scheduler: {label} does not apply to {spec.name}, which steps on timesteps (as in A1111)")
        return Resolved(spec, "Automatic", tuple(warnings))
    if label == "Automatic":
        label = spec.default_schedule
    return Resolved(spec, label, tuple(warnings))


def resolve(sampler_name: str | None, schedule: str | None = None) -> tuple[SamplerSpec, str]:
    """(sampler, schedule type) for a request; raises UnknownSampler naming the valid choices."""
    r = resolve_request(sampler_name, schedule)
    return r.spec, r.schedule


def make_scheduler(base_config: dict[str, Any], spec: SamplerSpec, schedule: str, sdxl: bool = False):
    """A fresh scheduler for one request, from the model's own scheduler config: a copy of a
    never-used one made once (from_config took 0.7 ms, and 36 ms for DPM++ SDE; a copy 0.15 ms)."""
    key = (json.dumps(base_config, sort_keys=True, default=str), spec.name, schedule, sdxl)
    template = _templates.get(key)
    if template is None:
        template = build_scheduler(base_config, spec, schedule, sdxl)
        if len(_templates) >= 64:
            _templates.pop(next(iter(_templates)))
        _templates[key] = template
    return copy.deepcopy(template)


def build_scheduler(base_config: dict[str, Any], spec: SamplerSpec, schedule: str, sdxl: bool = False):
    """A new scheduler of the sampler's class, with the schedule type applied."""
    import diffusers

    config = {k: v for k, v in base_config.items() if k not in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")}
    if spec.sigma_based and schedule != "Automatic":
        cls = _scheduled_class(spec.class_name)
        options: dict[str, Any] = {**spec.options}
        if spec.class_name != "EulerAncestralDiscreteScheduler":
            options["use_karras_sigmas"] = True  # the hook that _Scheduled answers
        scheduler = cls.from_config(config, **options)
        scheduler.orch_schedule = schedule
        scheduler.orch_sdxl = sdxl
        return scheduler
    return getattr(diffusers, spec.class_name).from_config(config, **spec.options)


_templates: dict[tuple, Any] = {}
