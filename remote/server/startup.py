"""Start-up costs that belong to the host's Python environment, paid once instead of at every start.

Called by `python -m remote.server` before torch, diffusers or transformers is imported.
Measured on an H100 host whose image is typical of GPU clouds (torch 2.11, 424 entries in
site-packages, PYTHONDONTWRITEBYTECODE=1, no .pyc files shipped), warm start of SD1.5:

- No bytecode: every start compiled the sources of torch, sympy, transformers, diffusers...
  again (4,136 files; builtins.compile was 9.7 of 30 s under a profiler).
- transformers and diffusers each call importlib.metadata.packages_distributions() at import,
  which reads the file list (RECORD) of every installed distribution: twice per start.
- transformers imports scikit-learn (and with it scipy.stats, pandas) when it is installed,
  for assisted text generation, which an image server never runs: 1.7 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

# Imported by the libraries the server uses only for features it never calls.
UNUSED_PACKAGES = ("sklearn",)


def prepare(home: Path) -> None:
    keep_bytecode(home / "pycache")
    remember_package_map(home / "compile-cache" / "package-map.json")
    hide_unused_packages()


def keep_bytecode(prefix: Path, packages: tuple[str, ...] = ("torch", "transformers", "diffusers")) -> None:
    """Cache compiled bytecode under orch's own directory when Python would not keep it.

    When the image ships no bytecode for the big packages and forbids writing it
    (PYTHONDONTWRITEBYTECODE, often set to keep container layers small) or its site-packages
    are read-only, every start compiles every module again. The cache then goes under
    `prefix` (in orch's home, so kept across restarts and in saved environment images), never
    into the image's folders. Bytecode that is there (pip writes it at install) is used as it
    is: a prefix would make Python ignore it. Child processes (Inductor's compile workers)
    inherit the choice through the environment."""
    forbidden = sys.flags.dont_write_bytecode or sys.dont_write_bytecode
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        if Path(importlib.util.cache_from_source(spec.origin)).exists():
            continue  # shipped (or written by an earlier start): Python reads it
        if forbidden or not os.access(Path(spec.origin).parent, os.W_OK):
            break  # this package is compiled again at every start: keep bytecode ourselves
    else:
        return
    prefix.mkdir(parents=True, exist_ok=True)
    sys.dont_write_bytecode = False
    sys.pycache_prefix = str(prefix)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)


def _environment_key() -> str:
    """Changes when a distribution is installed, removed or upgraded on sys.path: each adds or
    removes a *.dist-info folder, which changes its parent folder's modification time."""
    h = hashlib.sha256(sys.version.encode())
    for entry in sys.path:
        try:
            stat = os.stat(entry or ".")
        except OSError:
            continue
        h.update(f"{entry}\0{stat.st_mtime_ns}\0{stat.st_ino}\n".encode())
    return h.hexdigest()


def remember_package_map(path: Path) -> None:
    """Answer importlib.metadata.packages_distributions() from a file while the installed
    distributions are unchanged; the first call of each new environment computes and saves it."""
    compute = importlib.metadata.packages_distributions
    if getattr(compute, "orch_remembered", False):
        return
    key = _environment_key()
    remembered: dict[str, list[str]] | None = None
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            remembered = {k: list(v) for k, v in saved["map"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # none yet, or damaged: computed again below

    def packages_distributions() -> dict[str, list[str]]:
        nonlocal remembered
        if remembered is None:
            remembered = {k: list(v) for k, v in compute().items()}
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key, "map": remembered}))
                tmp.replace(path)
            except OSError:
                pass  # a read-only home: computed at each start, as without this
        return {k: list(v) for k, v in remembered.items()}  # callers may change what they get

    packages_distributions.orch_remembered = True  # type: ignore[attr-defined]
    packages_distributions.__doc__ = compute.__doc__
    importlib.metadata.packages_distributions = packages_distributions  # type: ignore[assignment]


def hide_unused_packages() -> None:
    """Make libraries see these packages as not installed (import-time checks use find_spec,
    which answers None for a module set to None in sys.modules)."""
    for name in UNUSED_PACKAGES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
