"""RunPod end to end: the real CLI in subprocesses against the RunPod simulator on 127.0.0.1, whose
pods are real local containers (SSH on the port mapped for 22/tcp of their own loopback address)
running the start command RunPod would run. Every request and answer is checked against the
vendored spec. A live smoke test (read-only) runs only where RUNPOD_API_KEY is set for the whole run."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from tests.helpers.net import free_port
from tests.simulators.runpod_api import LAPTOP_KEY, RunPodSimulator

pytestmark = pytest.mark.slow
LIVE_KEY = os.environ.get("RUNPOD_API_KEY")  # read at import: the tests below set the simulator's key per test
GPU_4090 = "NVIDIA GeForce RTX 4090"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = RunPodSimulator(tmp_path_factory.mktemp("runpod-sim"), provision_delay=0.3, pull_delay=1.0, restart_pull_delay=0.3)
    s.start()
    yield s
    s.close()
    s.assert_clean()


@pytest.fixture
def rp(sim, orch_home, tmp_path, monkeypatch):
    """orch configured for the simulator (the pod volume a directory of this test); returns the volume's path."""
    monkeypatch.setenv("RUNPOD_API_KEY", LAPTOP_KEY)
    volume = tmp_path / "workspace"
    (orch_home / "orch.yaml").write_text(f"runpod:\n  api_url: {sim.url}\n  volume_path: {volume}\n")
    yield volume
    sim.assert_clean()


class ArgvWatch:
    """Every process's command line, sampled while the test runs: a key must never be on one."""

    def __init__(self, *secrets: str):
        self.secrets, self.seen, self.samples = list(secrets), [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ArgvWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for p in psutil.process_iter(["cmdline"]):
                line = " ".join(p.info["cmdline"] or [])
                if any(s in line for s in list(self.secrets)):
                    self.seen.append(line[:200])
            self.samples += 1
            self._stop.wait(0.2)


def _files_holding(root: Path, secrets: tuple[str, ...], allowed: set[Path] = frozenset()) -> list[str]:
    found = []
    for p in root.rglob("*") if root.exists() else []:
        if p.is_file() and not p.is_symlink() and p not in allowed:
            try:
                data = p.read_bytes()
            except OSError:
                continue
            if any(s.encode() in data for s in secrets):
                found.append(str(p))
    return found


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_up_gen_self_stop_through_the_api_up_again_and_down(orch, rp, sim, tmp_path, capsys):
    idle = 20.0  # room for `up` to return and `gen` to start on a loaded CI machine before it fires
    volume = rp
    with ArgvWatch(LAPTOP_KEY) as argv:
        t0 = time.monotonic()
        up = orch("up", "rp", "--provider", "runpod", "--gpu", "RTX 4090", "--detach", "--port", str(free_port()),
                  "--idle", f"{idle:.0f}s", "--json")
        up_seconds = time.monotonic() - t0
        result = up.json
        assert result["status"] == "RUNNING" and result["provider"] == "runpod" and result["price_per_hour"] == 0.69
        assert "warning" not in up.stderr, "the pod stops itself with its own key: the billing guarantee is whole"
        pod = sim.pods[result["instance_id"]]
        argv.secrets.append(pod.pod_key)
        assert [s for _, s in pod.events][:3] == ["PROVISIONING", "STARTING", "RUNNING"]
        disk = sim.host_dir(pod.id) / "disk"
        stop_env = disk / ".orch" / "agent" / "stop.env"
        assert stat.S_IMODE(stop_env.stat().st_mode) == 0o600
        assert f"RUNPOD_POD_ID='{pod.id}'" in stop_env.read_text() and pod.pod_key in stop_env.read_text()
        assert LAPTOP_KEY not in json.dumps(pod.env) + pod.args, "the account key never goes to the pod"
        assert (disk / ".orch" / "models").resolve() == (volume / "orch-models").resolve(), "models live on the volume"
        assert json.loads((disk / ".orch" / "boot-recipe.json").read_text())["status"] == "done"

        # The URL answers, and gen makes a PNG through it.
        models = httpx.get(f"{result['url']}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {result['token']}"}, timeout=30)
        assert models.status_code == 200
        gen = orch("gen", "a lighthouse", "--name", "rp", "--steps", "2", "--width", "64", "--height", "64",
                   "-o", str(tmp_path / "out"), "--json").json
        image = Image.open(gen["images"][0])
        image.load()
        assert image.format == "PNG" and image.size == (64, 64)
        assert orch("status", "rp", "--json").json["auto_shutdown"] == "armed"
        (volume / "orch-models" / "kept.txt").write_text("on the volume")
        (disk / "container-disk.txt").write_text("on the container disk")
        assert _files_holding(disk, (LAPTOP_KEY, pod.pod_key), {stop_env}) == [], "the pod's key only in stop.env"

        # Nobody asks for more: the idle deadline fires and the agent stops the pod through the API with the pod's key.
        agent = disk / ".orch" / "agent"
        boot = _wait(lambda: (b := _read_json(agent / "boot.json")).get("boot_done_at") and b, 10, "boot done")
        activity = _wait(lambda: _read_json(disk / ".orch" / "activity.json"), 10, "the server's activity")
        deadline = max(boot["boot_done_at"], activity.get("last_request", 0.0)) + idle
        _wait(lambda: pod.stop_requests, idle + 60, "the agent asks RunPod to stop the pod")
        _wait(lambda: pod.stopped_at, 30, "the pod's processes end")
    assert pod.stop_requests[0][1] == f"pod:{pod.id}", "stopped by the pod itself, with its own key, not by the laptop"
    assert pod.status == "EXITED" and pod.billing_since is None and sim.capacity[(GPU_4090, pod.dc, "SECURE")] > 0
    status = _wait(lambda: (s := orch("status", "rp", "--json").json)["status"] == "STOPPED" and s, 30, "orch status shows it")
    assert status["stop_reason"] == f"idle {idle:.0f}s", status
    assert status["url"] is None
    log_line = next(line for line in (sim.host_dir(pod.id) / "logs" / "boot.log").read_text().splitlines()
                    if line.startswith("orch-agent: stopping this pod: "))
    said = json.loads(log_line.split(": ", 2)[2])
    leak = {"deadline_to_agent_stop_command_s": round(said["at"] - deadline, 2),
            "deadline_to_stop_request_s": round(pod.stop_requests[0][0] - deadline, 2),
            "deadline_to_exited_s": round(next(t for t, s in pod.events if s == "EXITED") - deadline, 2),
            "deadline_to_processes_gone_s": round(pod.stopped_at - deadline, 2)}
    assert not (disk / ".orch").exists() and not (disk / "container-disk.txt").exists(), "a stop wipes the container disk"
    assert (volume / "orch-models" / "kept.txt").exists(), "the volume is kept"

    # Up again: the same pod, started; its start command runs again; the models on the volume are still there.
    t1 = time.monotonic()
    again = orch("up", "rp", "--detach", "--port", str(free_port()), "--json")
    again_seconds = time.monotonic() - t1
    assert again.json["status"] == "RUNNING" and again.json["instance_id"] == pod.id
    assert (volume / "orch-models" / "kept.txt").read_text() == "on the volume"
    assert not (disk / "container-disk.txt").exists()
    assert stat.S_IMODE(stop_env.stat().st_mode) == 0o600 and pod.pod_key in stop_env.read_text()
    # What the restarted pod's agent enforces (its start command re-armed it with the create-time configuration; see
    # the report: an `arm` of a running agent keeps that configuration).
    restarted_idle = _read_json(disk / ".orch" / "agent" / "config.json").get("idle")
    gen = orch("gen", "a boat", "--name", "rp", "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "out2"),
               "--json").json
    assert Path(gen["images"][0]).exists()

    down = orch("down", "rp", "--terminate", "--json").json
    assert down["status"] == "TERMINATED" and pod.status == "TERMINATED" and pod.terminated_by == "laptop"
    _wait(lambda: not volume.exists(), 30, "the volume goes with the pod")
    assert orch("status", "rp", "--json").json["status"] == "TERMINATED"
    assert argv.samples > 10 and argv.seen == [], "no key on any command line"
    home = Path(os.environ["ORCH_HOME"])
    assert _files_holding(home, (LAPTOP_KEY, pod.pod_key)) == [], "no key in orch's state, logs or config"
    with capsys.disabled():
        print(f"\nrunpod simulator: orch up {up_seconds:.1f}s, phases {result['phases']}; up again {again_seconds:.1f}s, "
              f"phases {again.json['phases']}; self-stop leak {leak}; 429s {sim.rate_limited}; "
              f"the restarted agent's idle: {restarted_idle}s")
    assert leak["deadline_to_stop_request_s"] < 10


def test_a_pod_stuck_pulling_is_terminated_and_the_next_offer_used(rp, sim, orch_home):
    """The lifecycle's time-boxed attempt ends a pod whose status word says RUNNING but which has no runtime."""
    from orchestrator.config import load_settings
    from orchestrator.lifecycle import Orchestrator, UpOptions, provision

    orch = Orchestrator(load_settings(orch_home / "orch.yaml", environ={}), home=orch_home)
    opts = UpOptions(name="stuck", provider="runpod", gpu="RTX 4090", provision_timeout=5.0)
    offers = provision.choose_offers(orch.ctx, ["runpod"], opts)
    assert [o.region for o in offers] == ["EU-RO-1", "US-KS-2"]
    sim.stuck_pulling(GPU_4090, "EU-RO-1")  # shown RUNNING without a runtime, and never more
    record, attempts = provision.create(orch.ctx, opts, offers)
    assert [(a.provider, a.gpu, a.region) for a in attempts] == [("runpod", "RTX 4090", "EU-RO-1")]
    assert "not running after 5s (still 'RUNNING, no runtime yet" in attempts[0].error
    stuck = next(p for p in sim.pods.values() if p.name == "stuck" and p.dc == "EU-RO-1")
    assert stuck.status == "TERMINATED" and stuck.terminated_by == "laptop" and stuck.container_started_at is None
    used = sim.pods[record.instance_id]
    assert used.dc == "US-KS-2" and used.status == "RUNNING" and record.region == "US-KS-2"
    orch.provider("runpod").terminate(used.id)
    _wait(lambda: used.status == "TERMINATED", 30, "terminated")


def test_bad_input_is_refused_before_anything_is_created(orch, rp, sim, monkeypatch):
    created = len(sim.pods)
    bad_gpu = orch("up", "x", "--provider", "runpod", "--gpu", "Z80", "--json", check=False)
    assert bad_gpu.returncode == 1 and "valid GPUs: A100 PCIe, A100 SXM" in bad_gpu.json["error"]
    bad_region = orch("up", "x", "--provider", "runpod", "--region", "mars-1", "--json", check=False)
    assert bad_region.returncode == 1 and "valid regions:" in bad_region.json["error"] and "US-KS-2" in bad_region.json["error"]
    offers = orch("offers", "--provider", "runpod", "--gpu", "A100", "--json").json["offers"]
    assert {(o["gpu"], o["region"], o["price_per_hour"], o["available"]) for o in offers} == {
        ("A100 PCIe", "US-TX-3", 1.64, True), ("A100 SXM", "US-KS-2", 1.74, True)}
    monkeypatch.delenv("RUNPOD_API_KEY")
    no_key = orch("up", "x", "--provider", "runpod", "--json", check=False)
    assert no_key.returncode == 1 and "set RUNPOD_API_KEY" in no_key.json["error"]
    assert len(sim.pods) == created


def _start_command_env(tmp_path: Path, home: Path, boot: str = "") -> dict[str, str]:
    """What RunPod gives the container (as the simulator would, without its host), with fake sshd and ssh-keygen."""
    from orchestrator.providers.runpod.provider import boot_env

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sshd").write_text(f"#!/bin/sh\necho sshd \"$@\" >> {tmp_path}/sshd-calls\n")
    (bin_dir / "ssh-keygen").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -f ] && f=$2; shift; done\n'
                                        'head -c 16 /dev/urandom | base64 > "$f"; echo pub > "$f.pub"\n')
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "PUBLIC_KEY": "ssh-ed25519 AAAAtest orch",
           "RUNPOD_POD_ID": "pod123", "RUNPOD_API_KEY": "pod-scoped-secret", "ORCH_RUNPOD_API": "http://127.0.0.1:9/v2",
           "ORCH_RUNPOD_VOLUME": str(tmp_path / "volume"), "ORCH_ETC_SSH": str(tmp_path / "etc-ssh")}
    if boot:
        env["ORCH_BOOT"] = boot_env(boot)
    return env


def _run_start_command(env: dict[str, str], log: Path) -> None:
    from orchestrator.providers.runpod.provider import start_args

    argv = shlex.split(start_args())
    done = log.read_text().count("the container stays up") if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)
    try:
        _wait(lambda: log.read_text().count("the container stays up") > done, 30, "the start command is done")
        assert proc.poll() is None, "the container's main process stays up"
        argvs = []
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            try:
                argvs.append(" ".join(p.cmdline()))
            except psutil.Error:
                continue
        assert argvs and not [a for a in argvs if "pod-scoped-secret" in a]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


def test_the_start_command_in_a_real_shell(tmp_path):
    """Key, stop.env, sshd with host keys kept on the volume across a wiped container disk, the boot recipe."""
    from orchestrator.providers.runpod.provider import STOP_PROGRAM

    home = tmp_path / "root"
    (tmp_path / "volume").mkdir()
    env = _start_command_env(tmp_path, home, boot='#!/bin/sh\nenv > "$HOME/recipe-env"\n')
    log = tmp_path / "container.log"
    _run_start_command(env, log)
    assert "RUNPOD_POD_ID=pod123" in (home / "recipe-env").read_text(), "the boot recipe ran, in the container's environment"
    assert "ORCH_BOOT=" not in (home / "recipe-env").read_text(), "the recipe's carrier is not inherited by what it starts"
    stop_env = home / ".orch" / "agent" / "stop.env"
    assert stat.S_IMODE(stop_env.stat().st_mode) == 0o600
    assert stop_env.read_text() == ("export RUNPOD_POD_ID='pod123'\nexport RUNPOD_API_KEY='pod-scoped-secret'\n"
                                    "export ORCH_RUNPOD_API='http://127.0.0.1:9/v2'\n")
    assert (home / ".orch" / "agent" / "runpod-stop.py").read_text() == STOP_PROGRAM + "\n", "the agent's stop program"
    assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAAtest orch\n"
    assert stat.S_IMODE((home / ".ssh" / "authorized_keys").stat().st_mode) == 0o600
    assert "PermitRootLogin=prohibit-password" in (tmp_path / "sshd-calls").read_text()
    host_key = (tmp_path / "etc-ssh" / "ssh_host_ed25519_key").read_text()
    assert (tmp_path / "volume" / ".orch-ssh-host-keys" / "ssh_host_ed25519_key").read_text() == host_key
    first = log.read_text()
    assert first.startswith("orch: container started") and "pod-scoped-secret" not in first

    # A stop wipes the container disk (~ and /etc/ssh); the start command runs again and shows the same host key.
    import shutil

    shutil.rmtree(home)
    shutil.rmtree(tmp_path / "etc-ssh")
    _run_start_command(env, log)
    assert (tmp_path / "etc-ssh" / "ssh_host_ed25519_key").read_text() == host_key, "orch's pinned host key still matches"
    _run_start_command(env, log)
    assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAAtest orch\n", "the key once, however often"


def test_the_container_re_arms_a_dead_agent_without_systemd_or_cron(tmp_path):
    """The start command's main loop is the agent's re-arm where there is no systemd (here: every second)."""
    home = tmp_path / "root"
    app = home / ".orch" / "app" / "remote"
    app.mkdir(parents=True)
    (app / "__init__.py").write_text("")
    calls = tmp_path / "arm-calls"
    (app / "agent.py").write_text(f"import sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    (home / ".orch" / "agent").mkdir(parents=True)
    (home / ".orch" / "agent" / "config.json").write_text("{}")  # the boot recipe armed it once
    env = {**_start_command_env(tmp_path, home), "ORCH_REARM_S": "0.3"}
    from orchestrator.providers.runpod.provider import start_args

    with open(tmp_path / "container.log", "ab") as out:
        proc = subprocess.Popen(shlex.split(start_args()), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=tmp_path)  # not this checkout: `python3 -m remote.agent` must find the pod's copy
    try:
        _wait(lambda: calls.exists() and len(calls.read_text().splitlines()) >= 2, 30, "re-armed twice")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
    assert calls.read_text().splitlines()[0] == f"--home {home}/.orch arm --config-b64 e30="


def test_the_stop_command_without_a_pod_key_says_the_laptop_stops_it(tmp_path):
    from orchestrator.providers.runpod import RunPodProvider, Settings
    from orchestrator.providers.runpod.provider import STOP_PROGRAM

    command = RunPodProvider(Settings(), tmp_path, api_key="", environ={}).self_stop_command("x")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "no stop program" in proc.stderr and "orch down" in proc.stderr
    program = tmp_path / ".orch" / "agent" / "runpod-stop.py"
    program.parent.mkdir(parents=True)
    program.write_text(STOP_PROGRAM)  # what the start command writes; no stop.env (RunPod gave no pod key)
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "cannot stop itself" in proc.stderr and "orch down" in proc.stderr


@pytest.mark.skipif(not LIVE_KEY, reason="RUNPOD_API_KEY is not set: the live smoke test talks to api.runpod.io")
def test_live_smoke_read_only(tmp_path):
    """Against the real API, reading only (nothing is created): the offers and orch's pods parse."""
    from orchestrator.providers.runpod import RunPodProvider, Settings

    provider = RunPodProvider(Settings(), tmp_path, api_key=LIVE_KEY)
    offers = provider.offers()
    assert all(o.provider == "runpod" and o.price_per_hour and o.offer_id for o in offers)
    provider.list()
