"""Make a fresh instance an orch instance: its code, the agent armed, the server's packages.

A bootstrap is a strategy chosen per instance (`choose`): today `FreshInstall`; the images
work adds restore strategies here without touching the others. Every strategy arms the
agent before anything slow, and returns the runtime the later phases use.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ..config import Deadlines
from remote import protocol

from ..errors import ConfigError, LifecycleError
from ..providers.base import Provider, RemoteRuntime
from ..providers.capabilities import SelfStopCredentials
from ..ssh import RemoteCommandFailed, sh_path
from ..state import InstanceRecord
from .context import Ctx, Progress
from . import boot_recipe
from .remote import Remote


class BootstrapStrategy(Protocol):
    name: str

    def prepare(self, ctx: Ctx, remote: Remote, record: InstanceRecord) -> RemoteRuntime:
        """Bring the instance to where the server can start; return how orch's code runs there."""
        ...


def choose(record: InstanceRecord, from_image: str | None = None) -> BootstrapStrategy:
    """A new instance from an image restores it; anything else (a restart keeps its disk) installs what is missing."""
    if from_image:
        from ..images.restore import PortableRestore

        return PortableRestore(from_image)
    return FreshInstall()


class FreshInstall:
    """orch's code uploaded where missing, the agent armed, orch[server] installed into a venv if missing."""

    name = "fresh-install"

    def prepare(self, ctx: Ctx, remote: Remote, record: InstanceRecord) -> RemoteRuntime:
        # 0. the boot recipe (images/bootstrap.sh) may still be installing: wait for it, use its interpreter
        wait_for_boot_recipe(ctx, remote, record)
        # 1. orch's instance code, where the host lacks it
        upload_code(ctx, remote)
        # 2. the agent, before anything slow (where the startup script armed it, this keeps its clocks)
        arm(ctx, remote, record)
        # 3. the server's packages
        deps = remote.check_deps()
        if deps["missing"]:
            ctx.progress(f"{record.name}: installing orch[server] on the instance (missing: {', '.join(deps['missing'])})")
            install_server_env(ctx, remote, record)
        ensure_multi_gpu(ctx, remote, record, deps)
        # 4. the server's token
        remote.put_bytes((record.token or "").encode(), f"{remote.runtime.home}/token")
        return remote.runtime


def arm(ctx: Ctx, remote: Remote, record: InstanceRecord) -> None:
    """The agent armed with this record's deadlines: where the boot script armed it already (with the
    deadlines of the instance's creation), those of this `up` are set on the running agent."""
    provider = ctx.provider(record.provider)
    hand_over_stop_credentials(provider, remote, record.name)
    result = remote.arm_agent(agent_config(provider, record.name, record.price_per_hour, record.deadlines, record.created_at))
    if result.get("already_running"):
        d = record.deadlines
        changes = {"idle": d.idle, "boot_timeout": d.boot_timeout, "max_lifetime": d.max_lifetime,
                   "heartbeat_timeout": d.heartbeat_timeout}
        if d.budget is not None:
            changes["budget"] = d.budget
        changes["price_per_hour"] = record.price_per_hour or 0.0  # the running agent's budget counts at this price
        remote.agent_set(changes)


RECIPE_START_GRACE_S = 30.0


def wait_for_boot_recipe(ctx: Ctx, remote: Remote, record: InstanceRecord) -> None:
    """Until the instance's boot recipe is done (a venv install can take minutes); a failed one is reported."""
    status_file = f"{remote.runtime.home}/boot-recipe.json"
    deadline = time.monotonic() + record.deadlines.boot_timeout
    # A container's sshd may answer before its start command wrote the status file: give it a moment.
    absent_until = time.monotonic() + (RECIPE_START_GRACE_S if remote.runtime.rearm else 0)
    said = False
    while True:
        out = remote.run(f"cat {sh_path(status_file)} 2>/dev/null || true", timeout=30).stdout.strip()
        try:
            status = json.loads(out) if out else {}
        except ValueError:
            status = {}  # being written
        state = status.get("status")
        if state is None and time.monotonic() < absent_until:
            time.sleep(1)
            continue
        if state in (None, "done"):
            python = status.get("python")
            if python and python != remote.runtime.python and not remote.runtime.code_on_path:
                remote.runtime = replace(remote.runtime, python=python)
                ctx.state.update(record.name, remote_python=python)
            return
        if state == "failed":
            tail = remote.run(f"tail -c 2000 {sh_path(remote.runtime.home)}/logs/boot-recipe.log 2>/dev/null || true").stdout
            raise LifecycleError(f"{record.name}: the instance's boot recipe failed: {status.get('error')}\n{tail}")
        if not said:
            ctx.progress(f"{record.name}: the instance is still running its boot recipe (installing the server's packages)")
            said = True
        if time.monotonic() > deadline:
            raise LifecycleError(f"{record.name}: the boot recipe did not finish within boot_timeout")
        time.sleep(2)


def hand_over_stop_credentials(provider: Provider, remote: Remote, name: str) -> None:
    """What the agent's stop command needs to stop the instance through the provider's API."""
    if not isinstance(provider, SelfStopCredentials):
        return
    env = provider.self_stop_credentials(name)
    if env:
        lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        remote.put_bytes(lines.encode(), f"{remote.runtime.home}/agent/stop.env", mode=0o600)


def upload_code(ctx: Ctx, remote: Remote) -> None:
    runtime = remote.runtime
    if runtime.code_on_path:
        return
    bundle, version = code_bundle()
    app = f"{runtime.home}/app"
    found = remote.run(f"cat {sh_path(app)}/.version 2>/dev/null || true").stdout.strip()
    if found == version:
        return
    ctx.progress(f"{remote.name}: uploading orch's instance code")
    # Unpacked beside the old code, then swapped in: the agent the boot recipe started runs from app/
    # (and writes its bytecode there), so removing app/ in place races with it.
    new, old = sh_path(f"{app}.new"), sh_path(f"{app}.old")
    script = (f"rm -rf {new} && {{ rm -rf {old} 2>/dev/null; true; }} && mkdir -p {new} && tar -xzf - -C {new} && echo {version} > {new}/.version && "
              f"{{ [ ! -e {sh_path(app)} ] || mv {sh_path(app)} {old}; }} && mv {new} {sh_path(app)} && "
              f"{{ rm -rf {old} 2>/dev/null; true; }}")  # a process still writing bytecode there: the next upload removes it
    remote.run(f"sh -c {shlex.quote(script)}", stdin=bundle)


def install_server_env(ctx: Ctx, remote: Remote, record: InstanceRecord) -> None:
    runtime = remote.runtime
    venv = f"{runtime.home}/venv"
    reqs = " ".join(shlex.quote(r) for r in boot_recipe.lock_requirements() or server_requirements())
    # --system-site-packages sees the base interpreter's packages, not those of a venv the image's python
    # lives in (the Deep Learning AMI's /opt/pytorch): a .pth adds that venv's site-packages too, so
    # its PyTorch is used instead of downloaded again.
    inherit = ("import site, sys; "
               "open(sys.argv[1], 'w').write(chr(10).join(site.getsitepackages()) + chr(10)) if sys.prefix != sys.base_prefix else None")
    script = (f"{shlex.quote(runtime.python)} -m venv --system-site-packages {sh_path(venv)} && "
              f"{shlex.quote(runtime.python)} -c {shlex.quote(inherit)} "
              f"\"$({sh_path(venv)}/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/_orch_image_python.pth\" && "
              f"{sh_path(venv)}/bin/python -m pip install --quiet {reqs}")
    try:
        remote.run(f"sh -c {shlex.quote(script)}", timeout=3600)
    except RemoteCommandFailed as e:
        raise LifecycleError(f"installing the server's packages on the instance failed: {e}") from None
    python = remote.run(f"sh -c {shlex.quote(f'cd {sh_path(venv)} && pwd')}").stdout.strip() + "/bin/python"
    ctx.state.update(record.name, remote_python=python)
    remote.runtime = replace(runtime, python=python)
    missing = remote.check_deps()["missing"]
    if missing:
        raise LifecycleError(f"after installing, the instance still lacks: {', '.join(missing)}")


def ensure_multi_gpu(ctx: Ctx, remote: Remote, record: InstanceRecord, deps: protocol.DepsCheck) -> None:
    """Ray Serve installed where the server will serve several GPUs (remote/server/replicas/); checked first:
    asking for more GPUs than the instance has fails here, with the count, not in the server's log."""
    have = int(deps.get("gpus") or 0)
    if record.gpus is not None and record.gpus > max(1, have):
        raise ConfigError(f"--gpus {record.gpus}: instance {record.name} has {have} GPU(s); `orch down {record.name}` then "
                          f"`orch up {record.name} --gpus {max(1, have)}`, or leave --gpus out for all it has")
    serving = have if record.gpus is None else record.gpus
    if serving > 1 and not deps.get("ray", False):
        ctx.progress(f"{record.name}: {have} GPUs: installing Ray Serve to serve them all behind one URL")
        install_ray(remote, f"`orch up {record.name} --gpus 1` serves one GPU without it")


def ensure_ray(remote: Remote, name: str, progress: Progress) -> None:
    """Ray Serve on an instance that joins a cluster of the job's instances (orchestrator/batch/cluster.py)."""
    if not remote.check_deps().get("ray", False):
        progress(f"{name}: installing Ray Serve to serve in a cluster of the job's instances")
        install_ray(remote, "the instance can serve its own URL without it")


def install_ray(remote: Remote, otherwise: str) -> None:
    requirement = next((r for r in multigpu_requirements()), "ray[serve]")
    try:
        remote.run(f"{shlex.quote(remote.runtime.python)} -m pip install --quiet {shlex.quote(requirement)}", timeout=1800)
    except RemoteCommandFailed as e:
        raise LifecycleError(f"installing Ray Serve on the instance failed: {e}; {otherwise}") from None


def multigpu_requirements() -> list[str]:
    """orch[multigpu]'s requirements, as this installation declares them."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("orch") or []
    except PackageNotFoundError:
        reqs = []
    return [r.split(";")[0].strip() for r in reqs if "extra == \"multigpu\"" in r or "extra == 'multigpu'" in r]


def agent_config(provider: Provider, name: str, price_per_hour: float, deadlines: Deadlines, created_at: float) -> dict[str, Any]:
    return {**deadlines.as_json(), "price_per_hour": price_per_hour, "created_at": created_at,
            "stop_command": provider.self_stop_command(name)}


def server_requirements() -> list[str]:
    """orch[server]'s requirements, as this installation declares them."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("orch") or []
    except PackageNotFoundError:
        reqs = []
    server = [r.split(";")[0].strip() for r in reqs if "extra == \"server\"" in r or "extra == 'server'" in r]
    return server or ["torch>=2.2", "diffusers>=0.30", "transformers>=4.40", "safetensors>=0.4", "accelerate>=0.30",
                      "fastapi>=0.110", "uvicorn>=0.29", "pillow>=10"]


def code_bundle() -> tuple[bytes, str]:
    """The instance's code as a tar.gz, and a version string that changes with its content.

    The instance needs `remote` and the storage sync (it pulls models itself), nothing laptop-only.
    """
    import remote

    root = Path(remote.__file__).parent
    package_root = root.parent / "orchestrator"
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files += [package_root / "__init__.py", package_root / "errors.py"]
    files += sorted(p for p in (package_root / "storage").rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in files:
            rel = p.relative_to(root.parent)
            data = p.read_bytes()
            digest.update(str(rel).encode() + b"\0" + data)
            info = tarfile.TarInfo(str(rel))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), digest.hexdigest()[:16]
