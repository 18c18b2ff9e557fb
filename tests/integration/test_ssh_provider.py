"""The `ssh` provider against a real OpenSSH sshd on 127.0.0.1, with generated keys."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow


def _marked_pids(name: str) -> list[int]:
    """Processes on this host that belong to ssh-provider instance `name`."""
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if f"ORCH_SSH_INSTANCE={name}".encode() in env and stat.rsplit(")", 1)[-1].split()[0] != "Z":
            found.append(int(p.name))
    return found


def test_up_gen_down_on_an_openssh_host(sshd, orch, orch_home, tmp_path):
    workdir = tmp_path / "remote-work"
    (orch_home / "orch.yaml").write_text(yaml.safe_dump({
        "provider": "ssh",
        "ssh": {"host": "127.0.0.1", "port": sshd.port, "user": getpass.getuser(), "key": str(sshd.root / "user_key"),
                "python": sys.executable, "workdir": str(workdir)},
    }))
    up = orch("up", "gpu-box", "--detach", "--json").json
    assert up["provider"] == "ssh" and up["status"] == "RUNNING"
    # The instance code was uploaded (the host is not assumed to have orch installed).
    assert (workdir / "gpu-box" / "app" / "remote" / "ctl.py").exists()
    assert _marked_pids("gpu-box"), "the server runs on the host, marked as the instance's"

    gen = orch("gen", "a lighthouse", "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "o"), "--json").json
    img = Image.open(gen["images"][0])
    assert "a lighthouse" in img.info["parameters"]

    down = orch("down", "gpu-box", "--json").json
    assert down["status"] == "STOPPED"
    assert _marked_pids("gpu-box") == [], "down ends every orch process on the host"
    assert sshd.proc.poll() is None, "the host itself keeps running: orch never powers it off"
    assert (workdir / "gpu-box").exists(), "stop keeps the instance's files"

    # Up again on the same host, then terminate: the directory goes.
    orch("up", "gpu-box", "--detach", "--json")
    assert orch("down", "gpu-box", "--terminate", "--json").json["status"] == "TERMINATED"
    assert not (workdir / "gpu-box").exists()
    assert _marked_pids("gpu-box") == []


def test_a_host_whose_key_changed_is_refused(sshd, orch, orch_home, tmp_path):
    (orch_home / "orch.yaml").write_text(yaml.safe_dump({
        "provider": "ssh",
        "ssh": {"host": "127.0.0.1", "port": sshd.port, "user": getpass.getuser(), "key": str(sshd.root / "user_key"),
                "python": sys.executable, "workdir": str(tmp_path / "w")},
    }))
    orch("up", "h", "--detach", "--json")
    orch("down", "h", "--json")
    sshd.stop()
    sshd.new_host_key()
    sshd.start()
    refused = orch("up", "h", "--detach", "--json", check=False)
    assert refused.returncode == 1
    assert "changed" in refused.json["error"] and "SHA256:" in refused.json["error"]
    assert _marked_pids("h") == []
