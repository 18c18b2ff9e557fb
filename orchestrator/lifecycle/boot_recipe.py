"""The boot script every instance runs at power-on: images/bootstrap.sh behind a prologue.

The prologue carries what this instance needs before anything of orch is installed: the
agent's code (standard library only) and configuration, the provider's backstop, who orch
logs in as, where models go. EC2 caps user-data at 16 KB, so only the stdlib programs in
remote/ travel here; the rest of orch's instance code arrives over SSH.
"""

from __future__ import annotations

import ast
import base64
import gzip
import io
import json
import shlex
import sys
import tarfile
from pathlib import Path
from typing import Any

from ..errors import OrchError
from ..providers.base import Provider, RemoteRuntime

RECIPE = "bootstrap.sh"
LOCK = "requirements.lock"
USER_DATA_LIMIT = 16 * 1024


def images_dir() -> Path:
    """images/ in a source checkout, or where the wheel installed it (share/orch/images)."""
    here = Path(__file__).resolve().parents[2] / "images"
    if (here / RECIPE).exists():
        return here
    installed = Path(sys.prefix) / "share" / "orch" / "images"
    if (installed / RECIPE).exists():
        return installed
    raise OrchError(f"orch's boot recipe ({RECIPE}) is missing from this installation (looked in {here} and {installed}); "
                    f"reinstall orch")


# What must run before anything else of orch is on the instance: the agent (the rest arrives over SSH).
BOOT_MODULES = ("__init__.py", "_files.py", "agent.py")


def agent_bundle() -> bytes:
    """The standard-library programs of remote/ the boot needs (BOOT_MODULES) as a tar.gz, without
    their comments and docstrings (a third of the bytes, and user-data is capped; the full source
    arrives over SSH and replaces them)."""
    import remote

    root = Path(remote.__file__).parent
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tar:
        for p in sorted(root / name for name in BOOT_MODULES):
            data = _minified(p.read_text()).encode()
            info = tarfile.TarInfo(f"remote/{p.name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _minified(source: str) -> str:
    """The same program, as the ast module prints it back: no comments, no docstrings."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n" if tree.body else ""


def script(provider: Provider, runtime: RemoteRuntime, agent_config: dict[str, Any]) -> str:
    variables = {
        "ORCH_HOME_SPEC": runtime.home,
        "ORCH_RUN_AS": runtime.run_as,
        "ORCH_PYTHON": "" if runtime.python in ("python3", "python") else runtime.python,
        "ORCH_AGENT_TGZ": base64.b64encode(agent_bundle()).decode(),
        "ORCH_AGENT_CONFIG": base64.b64encode(json.dumps(agent_config).encode()).decode(),
        "ORCH_MODELS_DIR": runtime.models_dir,
        "ORCH_REARM": runtime.rearm,
    }
    prologue = "#!/bin/sh\n# orch boot script: the variables images/bootstrap.sh reads, then the recipe itself\n"
    prologue += "".join(f"export {k}={shlex.quote(v)}\n" for k, v in variables.items())
    # The recipe travels gzipped (user-data is capped at 16 KB), written to a file and run from there:
    # a script piped into sh would hand its own remaining lines to any command that reads stdin.
    recipe = gzip.compress(_without_comments((images_dir() / RECIPE).read_text()).encode(), 9, mtime=0)
    text = prologue + (f"ORCH_RECIPE_SH=$(mktemp) && echo {base64.b64encode(recipe).decode()} | base64 -d | gunzip "
                       f'> "$ORCH_RECIPE_SH" && exec sh "$ORCH_RECIPE_SH"\n')
    if len(text.encode()) > USER_DATA_LIMIT:
        raise OrchError(f"the boot script is {len(text.encode())} bytes, over the 16 KB providers accept as user-data")
    return text


def _without_comments(recipe: str) -> str:
    """The recipe without its comment lines and blank lines (they are documentation, and bytes
    count against the user-data limit); the shebang goes too (the prologue has one)."""
    return "".join(line + "\n" for line in recipe.splitlines()[1:] if line.strip() and not line.lstrip().startswith("#"))


def lock_requirements() -> list[str] | None:
    """The pinned server environment (images/requirements.lock), or None where it does not ship."""
    try:
        text = (images_dir() / LOCK).read_text()
    except (OSError, OrchError):
        return None
    reqs = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [r for r in reqs if r] or None
