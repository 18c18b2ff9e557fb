"""Write images/requirements.lock: the server environment orch[server] resolves to here, pinned.

    python images/make_lock.py            # after `pip install -e '.[server]'` in a clean venv

Every distribution orch[server] pulls in, transitively, at the version installed in this
environment. PyTorch and its CUDA libraries are left to the image (a GPU image ships the
build that matches its driver; pinning the CPU build here would replace it): the lock says
`torch>=` the version it was made with. No hashes: they would pin one wheel per platform,
and the instance's platform is not this one.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

IMAGE_OWNED = re.compile(r"^(torch|triton|nvidia-.*|torchvision|torchaudio)$")


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _applies(requirement: str, extras: set[str]) -> bool:
    if ";" not in requirement:
        return True
    from packaging.markers import Marker

    marker = Marker(requirement.split(";", 1)[1])
    return any(marker.evaluate({"extra": e}) for e in extras or {""})


def resolve(root: str, extras: set[str]) -> dict[str, str]:
    pinned: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for req in dist.requires or []:
            if not _applies(req, wanted):
                continue
            dep = _name(req)
            extra_match = re.search(r"\[([^\]]+)\]", req.split(";")[0])
            dep_extras = set(extra_match.group(1).split(",")) if extra_match else set()
            if dep in pinned:
                continue
            try:
                pinned[dep] = distribution(dep).version
            except PackageNotFoundError:
                continue
            todo.append((dep, dep_extras))
    return pinned


INSTANCE_EXTRAS = {"server", "upscalers"}


def main() -> None:
    pinned = resolve("orch", INSTANCE_EXTRAS)
    lines = ["# orch[server]'s environment, pinned (images/make_lock.py). PyTorch comes from the image.",
             f"# made with Python {sys.version.split()[0]}"]
    for name in sorted(pinned):
        if IMAGE_OWNED.match(name):
            if name == "torch":
                lines.append(f"torch>={pinned[name].split('+')[0]}")
            continue
        lines.append(f"{name}=={pinned[name]}")
    # An instance extra not installed here (upscalers beside a CPU torch): its declared range.
    for req in distribution("orch").requires or []:
        if ";" in req and any(f'extra == "{e}"' in req for e in INSTANCE_EXTRAS) and _name(req) not in pinned:
            lines.append(req.split(";")[0].strip())
    out = Path(__file__).with_name("requirements.lock")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(lines) - 2} requirements)")


if __name__ == "__main__":
    main()
