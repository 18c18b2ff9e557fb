"""images/bootstrap.sh, run as a provider runs it at first boot, in a throwaway home.

The system it would change is stood in for where a test cannot own it: `systemctl`,
`crontab` and `shutdown` are recording fakes on PATH, the unit directory a temp folder.
Everything else is real: the agent it arms, the venv and pip install it makes.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.config import Deadlines
from orchestrator.lifecycle import boot_recipe
from orchestrator.lifecycle.bootstrap import agent_config
from orchestrator.providers.base import Capabilities, RemoteRuntime
from remote._files import pid_alive

pytestmark = pytest.mark.slow


@dataclass
class ImageProvider:
    """Just what the recipe asks of a provider: its runtime and stop command."""

    runtime_: RemoteRuntime
    name: str = "image"
    capabilities: Capabilities = field(default_factory=Capabilities)

    def runtime(self, name: str) -> RemoteRuntime:
        return self.runtime_

    def self_stop_command(self, name: str) -> str:
        return "poweroff"


def _fakes(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir()
    for name in ("systemctl", "shutdown"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {record}\n')
    # crontab: -l prints what was installed; `crontab -` installs stdin
    (bin_dir / "crontab").write_text(f'#!/bin/sh\nif [ "$1" = -l ]; then cat {record}.cron 2>/dev/null; exit 0; fi\n'
                                     f'cat > {record}.cron\n')
    for p in bin_dir.iterdir():
        p.chmod(0o755)


def _run(tmp_path: Path, runtime: RemoteRuntime, extra_env: dict[str, str] | None = None, max_lifetime: float = 8 * 3600):
    provider = ImageProvider(runtime)
    config = agent_config(provider, "box", 1.5, Deadlines(max_lifetime=max_lifetime), time.time())
    script = tmp_path / "user-data.sh"
    script.write_text(boot_recipe.script(provider, runtime, config))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    record = tmp_path / "calls"
    if not (tmp_path / "bin").exists():
        _fakes(tmp_path / "bin", record)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(home), **(extra_env or {})}
    proc = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=300)
    orch_home = home / ".orch"
    return proc, orch_home, record


def _agent_pids(orch_home: Path) -> list[int]:
    pids = []
    for f in ("supervisor.json", "agent.json"):
        try:
            pids.append(json.loads((orch_home / "agent" / f).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
    return [p for p in pids if pid_alive(p)]


def _wait_armed(orch_home: Path, timeout: float = 20) -> list[int]:
    """The supervisor and watchdog pids once both run (arm returns before the new ones wrote their files)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _agent_pids(orch_home)
        if len(pids) == 2:
            return pids
        time.sleep(0.1)
    return _agent_pids(orch_home)


@pytest.fixture
def stop_agents():
    homes: list[Path] = []
    yield homes.append
    for home in homes:
        _wait_armed(home, timeout=3)  # a supervisor still starting would outlive the test
        for pid in _agent_pids(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_vm_boot_arms_the_agent_and_a_systemd_timer_that_re_arms_it(tmp_path, stop_agents):
    if os.geteuid() != 0:
        pytest.skip("the recipe writes systemd units only as root")
    units, running = tmp_path / "units", tmp_path / "run-systemd"
    units.mkdir()
    running.mkdir()
    runtime = RemoteRuntime(python=sys.executable, home="~/.orch", rearm="systemd")
    proc, orch_home, record = _run(tmp_path, runtime, {"ORCH_SYSTEMD_UNITS": str(units), "ORCH_SYSTEMD_RUNNING": str(running)},
                                   max_lifetime=3 * 3600)
    stop_agents(orch_home)
    assert proc.returncode == 0, proc.stderr
    status = json.loads((orch_home / "boot-recipe.json").read_text())
    assert status["status"] == "done" and status["python"] == sys.executable
    calls = record.read_text().splitlines()
    assert "systemctl daemon-reload" in calls and "systemctl enable --now orch-agent.timer" in calls
    service = (units / "orch-agent.service").read_text()
    assert f"--home {orch_home} arm --config-b64 e30=" in service and "OnUnitActiveSec=30s" in (units / "orch-agent.timer").read_text()
    config = json.loads((orch_home / "agent" / "config.json").read_text())
    assert config["max_lifetime"] == 3 * 3600 and config["price_per_hour"] == 1.5 and config["stop_command"] == "poweroff"
    assert len(_wait_armed(orch_home)) == 2, "supervisor and watchdog run"

    # Both agent processes die; the timer's command arms it again with the same clocks.
    old = _agent_pids(orch_home)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in old) and time.monotonic() < deadline:
        time.sleep(0.1)
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))[len("ExecStart="):]
    subprocess.run(exec_start.split(), env={**os.environ, "PYTHONPATH": str(orch_home / "app")}, check=True, capture_output=True)
    new = _wait_armed(orch_home)
    assert len(new) == 2 and not set(new) & set(old)
    assert json.loads((orch_home / "agent" / "config.json").read_text())["created_at"] == config["created_at"]


def test_a_container_boot_re_arms_through_cron_once(tmp_path, stop_agents):
    runtime = RemoteRuntime(python=sys.executable, home="~/.orch", rearm="cron", models_dir=str(tmp_path / "data-disk"))
    proc, orch_home, record = _run(tmp_path, runtime)
    stop_agents(orch_home)
    assert proc.returncode == 0, proc.stderr
    cron = Path(f"{record}.cron").read_text()
    assert cron.count("remote.agent") == 1 and cron.startswith("* * * * * ") and "arm --config-b64 e30=" in cron
    assert (orch_home / "models").resolve() == (tmp_path / "data-disk").resolve(), "models live on the data disk"
    # Booted again (a container restart): still one entry.
    proc, orch_home, record = _run(tmp_path, runtime)
    assert Path(f"{record}.cron").read_text().count("remote.agent") == 1


def test_a_host_that_is_not_ours_is_left_alone(tmp_path, stop_agents):
    """local and ssh: no systemd unit, no cron entry."""
    runtime = RemoteRuntime(python=sys.executable, home="~/.orch")
    proc, orch_home, record = _run(tmp_path, runtime)
    stop_agents(orch_home)
    assert proc.returncode == 0, proc.stderr
    assert not Path(f"{record}.cron").exists()
    calls = record.read_text().splitlines() if record.exists() else []
    assert [c for c in calls if c.startswith("systemctl")] == []


def _tiny_wheel(directory: Path) -> Path:
    """A real wheel of a one-module package, so pip installs it with no index and no network."""
    directory.mkdir()
    wheel = directory / "orch_recipe_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("orch_recipe_probe.py", "VALUE = 42\n")
        z.writestr("orch_recipe_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: orch-recipe-probe\nVersion: 1.0\n")
        z.writestr("orch_recipe_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("orch_recipe_probe-1.0.dist-info/RECORD", "")
    return wheel


def test_an_image_without_the_packages_gets_a_venv_from_the_lock(tmp_path, stop_agents):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    wheels = tmp_path / "wheels"
    _tiny_wheel(wheels)
    runtime = RemoteRuntime(python=str(bare / "bin" / "python"), home="~/.orch")
    lock = base64.b64encode(b"orch-recipe-probe==1.0\n").decode()
    script_env = {"ORCH_LOCK": lock, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    # The prologue sets ORCH_LOCK to nothing unless the provider sends one: send it here.
    provider = ImageProvider(runtime)
    text = boot_recipe.script(provider, runtime, agent_config(provider, "b", 0, Deadlines(), time.time()))
    text = text.replace("export ORCH_REARM=", f"export ORCH_LOCK={lock}\nexport ORCH_REARM=", 1)
    (tmp_path / "bin").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "user-data.sh").write_text(text)
    proc = subprocess.run(["sh", str(tmp_path / "user-data.sh")], capture_output=True, text=True, timeout=600,
                          env={"PATH": os.environ["PATH"], "HOME": str(home), **script_env})
    orch_home = home / ".orch"
    stop_agents(orch_home)
    log = (orch_home / "logs" / "boot-recipe.log").read_text()
    assert proc.returncode == 0, log
    status = json.loads((orch_home / "boot-recipe.json").read_text())
    venv_python = orch_home / "venv" / "bin" / "python"
    assert status == {**status, "status": "done", "python": str(venv_python)}
    probe = subprocess.run([str(venv_python), "-c", "import orch_recipe_probe; print(orch_recipe_probe.VALUE)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "42"
    assert len(_wait_armed(orch_home)) == 2, "the agent was armed with the bare interpreter, before the install"
