"""The instance's side of `orch image`: what this machine is, and its environment packed or unpacked.

    python -m remote.image --home DIR probe              # platform: python, machine, torch, CUDA, GPU arch, venv
    python -m remote.image --home DIR pack-env OUTDIR    # DIR/venv as OUTDIR/venv.tar (no venv: nothing)
    python -m remote.image --home DIR unpack-env ARCHIVE # ARCHIVE into DIR/venv, re-pointed at this interpreter

Standard library only (torch is imported by `probe` where it is installed, to name the GPU).
Each command prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path


def probe(home: Path, light: bool = False) -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "torch": None, "cuda": None,
            "gpu_arch": "cpu", "gpu": None, "venv": (home / "venv" / "pyvenv.cfg").exists()}
    if light:  # the interpreter only: importing torch takes seconds
        return info
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            info["gpu_arch"] = f"sm_{major}{minor}"
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def platform_key(info: dict) -> str:
    """What compiled graphs are valid for: the GPU architecture and the torch build."""
    return f"{info['gpu_arch']}-torch{info['torch'] or 'none'}-py{'.'.join(info['python'].split('.')[:2])}-{info['machine']}"


def pack_env(home: Path, out: Path) -> dict:
    venv = home / "venv"
    out.mkdir(parents=True, exist_ok=True)
    if not (venv / "pyvenv.cfg").exists():
        return {"packed": False, "reason": "no venv on this instance (its interpreter has the packages)"}
    archive = out / "venv.tar"
    tmp = out / ".venv.tar.tmp"
    # Uncompressed: the wheels inside are already compressed, and gzip at any level costs minutes for a CUDA torch.
    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in member.name.split("/"):
            return None
        if member.issym() and os.path.isabs(member.linkname):
            return None  # bin/python -> this machine's interpreter: `python -m venv` makes it again where it lands
        return member

    with tarfile.open(tmp, "w") as tar:
        tar.add(venv, arcname="venv", filter=keep)
    os.replace(tmp, archive)
    return {"packed": True, "bytes": archive.stat().st_size, "system_site_packages": _system_site(venv)}


def _system_site(venv: Path) -> bool:
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "include-system-site-packages":
            return value.strip().lower() == "true"
    return False


def unpack_env(home: Path, archive: Path) -> dict:
    """The saved venv in place, then re-pointed at this machine's interpreter (`python -m venv` over it:
    pyvenv.cfg and bin/ are rewritten, site-packages kept). No package is installed."""
    target = home / "venv"
    staging = home / ".venv-restore"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    restored = staging / "venv"
    site = sorted((restored / "lib").glob("python3.*"))
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not site or site[0].name != want:
        shutil.rmtree(staging, ignore_errors=True)
        return {"restored": False, "reason": f"the saved environment is for {site[0].name if site else 'an unknown python'}, "
                                              f"this instance runs {want}"}
    flags = ["--system-site-packages"] if _system_site(restored) else []
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, str(restored)], check=True, capture_output=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(restored, target)
    shutil.rmtree(staging, ignore_errors=True)
    python = target / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    if check.returncode != 0:
        return {"restored": False, "reason": f"the restored environment does not start: {check.stderr[-500:]}"}
    return {"restored": True, "python": str(python)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m remote.image")
    parser.add_argument("--home", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--light", action="store_true", help="python and machine only (no torch import)")
    p = sub.add_parser("pack-env")
    p.add_argument("out")
    p = sub.add_parser("unpack-env")
    p.add_argument("archive")
    args = parser.parse_args(argv)
    home = Path(os.path.expanduser(args.home))
    if args.command == "probe":
        info = probe(home, light=args.light)
        result = {**info, "platform_key": platform_key(info)}
    elif args.command == "pack-env":
        result = pack_env(home, Path(os.path.expanduser(args.out)))
    else:
        result = unpack_env(home, Path(os.path.expanduser(args.archive)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
