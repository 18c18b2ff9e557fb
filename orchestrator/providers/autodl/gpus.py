"""AutoDL's GPU specs and data centers: a table that ships with orch, dated.

AutoDL's Pro API has no catalog: `create` takes a `gpu_spec_uuid` (`v-48g`, `5090-p`, ...),
which is not a GPU's name, and answers nothing about prices before an instance exists. So
orch carries the table below, and says how old it is. Where AutoDL adds or renames a spec,
`autodl.gpu_specs` in orch.yaml adds rows without a new orch (`name: spec_uuid`).

Sources (read 2026-09): AutoDL's Pro API documentation (https://www.autodl.com/docs/instance_pro_api/),
its elastic-deployment documentation for the stock names and data centers, and two clients that
ran the Pro API live in 2026-08/09 (the specs, and that Pro `create` accepts only westDC3 and
beijingDC2: the other data centers answer `RequestParameterIsWrong`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TABLE_DATE = "2026-09"


@dataclass(frozen=True)
class GpuSpec:
    name: str  # as users say it: what `--gpu` matches and `orch offers` shows
    spec_uuid: str  # AutoDL's gpu_spec_uuid
    console_label: str  # what AutoDL's console calls it
    vram_gb: int
    stock_name: str  # the same GPU in the stock endpoint's names ("" where unknown)
    aliases: tuple[str, ...] = ()

    def matches(self, wanted: str) -> bool:
        w = norm(wanted)
        return w in {norm(x) for x in (self.name, self.spec_uuid, self.console_label, *self.aliases)}


GPU_SPECS: tuple[GpuSpec, ...] = (
    GpuSpec("RTX 4090 48GB", "v-48g", "4090-48G", 48, "vGPU-48GB", ("RTX 4090", "4090", "4090 48GB")),
    GpuSpec("RTX 4090D", "4090D", "4090D", 24, "RTX 4090D", ("4090D",)),
    GpuSpec("RTX 3090 48GB", "v-48g-350w", "3090-48G", 48, "vGPU-48GB-350W", ("RTX 3090", "3090", "3090 48GB")),
    GpuSpec("RTX 4080 SUPER 32GB", "v-32g-p", "4080(S)-32G", 32, "vGPU-32GB", ("RTX 4080", "4080", "4080S", "RTX 4080S")),
    GpuSpec("RTX 5090", "5090-p", "5090-32G", 32, "RTX 5090", ("5090",)),
    GpuSpec("RTX PRO 6000", "pro6000-p", "PRO6000-96G", 96, "RTX PRO 6000", ("PRO6000", "RTX PRO 6000 96GB")),
    GpuSpec("H800", "h800", "H800-80G", 80, "H800", ("H800 80GB",)),
)

# The data centers Pro `create` accepts in `data_center_list` (a region in orch's words).
PRO_REGIONS: dict[str, str] = {"westDC3": "西北B区", "beijingDC2": "北京B区"}
# AutoDL's other data centers: real, but only for elastic deployments (Pro create refuses them).
OTHER_REGIONS: dict[str, str] = {
    "westDC2": "西北企业区", "beijingDC1": "北京A区", "beijingDC3": "V100专区", "beijingDC4": "L20专区",
    "neimengDC1": "内蒙A区", "neimengDC3": "内蒙B区", "foshanDC1": "佛山区", "chongqingDC1": "重庆A区",
    "yangzhouDC1": "3090专区",
}


def norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def specs(extra: dict[str, str] | None = None) -> tuple[GpuSpec, ...]:
    """The table, plus rows from orch.yaml (`autodl.gpu_specs: {name: spec_uuid}`), which win on a clash."""
    added = tuple(GpuSpec(name, uuid, name, 0, "") for name, uuid in (extra or {}).items())
    taken = {norm(s.name) for s in added} | {s.spec_uuid for s in added}
    return added + tuple(s for s in GPU_SPECS if norm(s.name) not in taken and s.spec_uuid not in taken)


def find(wanted: str, table: tuple[GpuSpec, ...] = GPU_SPECS) -> GpuSpec | None:
    return next((s for s in table if s.matches(wanted)), None)


def by_uuid(spec_uuid: str, table: tuple[GpuSpec, ...] = GPU_SPECS) -> GpuSpec | None:
    return next((s for s in table if s.spec_uuid == spec_uuid), None)


def region_id(name_or_id: str) -> str | None:
    """A data center's id from its id or its console name (AutoDL's lists give `region_name`, 北京B区)."""
    for rid, label in {**PRO_REGIONS, **OTHER_REGIONS}.items():
        if name_or_id in (rid, label) or norm(name_or_id) == norm(rid):
            return rid
    return None


__all__ = ["GPU_SPECS", "OTHER_REGIONS", "PRO_REGIONS", "TABLE_DATE", "GpuSpec", "by_uuid", "find", "norm", "region_id", "specs"]
