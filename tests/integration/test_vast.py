"""Vast.ai end to end: the real CLI in subprocesses against the Vast simulator on 127.0.0.1, whose
instances are real local containers (SSH on the host port mapped to 22/tcp of their own loopback
address) running the onstart Vast would run. Every request and answer is checked against the
vendored spec; the simulator enforces Vast's per-endpoint rate limit. A live smoke test (read-only)
runs only where VAST_API_KEY is set for the whole run."""

from __future__ import annotations

import base64
import json
import os
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
from tests.simulators.vast_api import LAPTOP_KEY, VastSimulator

pytestmark = pytest.mark.slow
LIVE_KEY = os.environ.get("VAST_API_KEY")  # read at import: the tests below set the simulator's key per test
INTERVAL = 0.2  # the simulator's minimum interval per endpoint, and orch's spacing


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = VastSimulator(tmp_path_factory.mktemp("vast-sim"), provision_delay=0.3, pull_delay=1.0, restart_pull_delay=0.3,
                      min_interval=INTERVAL)
    s.start()
    yield s
    s.close()
    s.assert_clean()


@pytest.fixture
def vast(sim, orch_home, tmp_path, monkeypatch):
    """orch configured for the simulator (the models' volume a directory of this test); returns the volume's path."""
    monkeypatch.setenv("VAST_API_KEY", LAPTOP_KEY)
    volume = tmp_path / "workspace"
    (orch_home / "orch.yaml").write_text(f"vast:\n  api_url: {sim.url}\n  volume_path: {volume}\n"
                                         f"  request_interval: {INTERVAL}\n")
    yield volume
    sim.destroy_everything()  # what a failed test left (its instances bill in the simulator's books only)
    sim.wait_all_destroyed()
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


def test_up_gen_self_stop_through_the_api_up_again_and_down(orch, vast, sim, tmp_path, capsys):
    idle = 30.0  # room for `up` to return and `gen` to start on a loaded CI machine (2 shared cores) before it fires
    volume = vast
    with ArgvWatch(LAPTOP_KEY) as argv:
        t0 = time.monotonic()
        up = orch("up", "va", "--provider", "vast", "--gpu", "RTX 4090", "--detach", "--port", str(free_port()),
                  "--idle", f"{idle:.0f}s", "--json")
        up_seconds = time.monotonic() - t0
        result = up.json
        assert result["status"] == "RUNNING" and result["provider"] == "vast"
        assert result["price_per_hour"] == 0.3604, "the cheapest verified, reliable 4090: its dph_total, storage included"
        assert "warning" not in up.stderr, "the instance stops itself with its own key: the billing guarantee is whole"
        inst = sim.instances[int(result["instance_id"])]
        argv.secrets.append(inst.container_key)
        assert inst.offer.ask_id == 5101 and inst.runtype == "ssh_direct" and inst.label.startswith("orch.")
        assert [e for _, e in inst.events][:3] == ["created", "loading/running/running", "running/running/running"]
        disk = sim.host_dir(inst.id) / "disk"
        stop_env = disk / ".orch" / "agent" / "stop.env"
        assert stat.S_IMODE(stop_env.stat().st_mode) == 0o600
        assert f"CONTAINER_ID='{inst.id}'" in stop_env.read_text() and inst.container_key in stop_env.read_text()
        assert LAPTOP_KEY not in json.dumps(inst.env) + inst.onstart, "the account key never goes to the instance"
        assert (disk / ".orch" / "models").resolve() == (volume / "orch-models").resolve(), "models live on the volume"
        assert json.loads((disk / ".orch" / "boot-recipe.json").read_text())["status"] == "done"
        assert inst.keys and inst.keys[0].startswith("ssh-"), "orch's key attached through Vast's API"

        # The URL answers, and gen makes a PNG through it.
        models = httpx.get(f"{result['url']}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {result['token']}"}, timeout=30)
        assert models.status_code == 200
        gen = orch("gen", "a lighthouse", "--name", "va", "--steps", "2", "--width", "64", "--height", "64",
                   "-o", str(tmp_path / "out"), "--json").json
        image = Image.open(gen["images"][0])
        image.load()
        assert image.format == "PNG" and image.size == (64, 64)
        assert orch("status", "va", "--json").json["auto_shutdown"] == "armed"
        (volume / "orch-models" / "kept.txt").write_text("on the volume")
        (disk / "container-disk.txt").write_text("on the container disk")
        assert _files_holding(disk, (LAPTOP_KEY, inst.container_key), {stop_env}) == [], "the instance's key only in stop.env"

        # Nobody asks for more: the idle deadline fires and the agent stops the instance through the API with its own key.
        agent = disk / ".orch" / "agent"
        boot = _wait(lambda: (b := _read_json(agent / "boot.json")).get("boot_done_at") and b, 10, "boot done")
        activity = _wait(lambda: _read_json(disk / ".orch" / "activity.json"), 10, "the server's activity")
        deadline = max(boot["boot_done_at"], activity.get("last_request", 0.0)) + idle
        _wait(lambda: inst.stop_requests, idle + 60, "the agent asks Vast to stop the instance")
        _wait(lambda: inst.stopped_at, 30, "the instance's processes end")
    assert inst.stop_requests[0][1] == f"instance:{inst.id}", "stopped by the instance itself, with its own key"
    assert inst.actual == "exited" and inst.intended == "stopped" and inst.billing_since is None
    assert inst.offer.rented_by is None, "the GPU went back to the market"
    status = _wait(lambda: (s := orch("status", "va", "--json").json)["status"] == "STOPPED" and s, 30, "orch status shows it")
    assert status["stop_reason"] == f"idle {idle:.0f}s", status
    assert status["url"] is None
    log_line = next(line for line in (sim.host_dir(inst.id) / "logs" / "boot.log").read_text().splitlines()
                    if line.startswith("orch-agent: stopping this instance: "))
    said = json.loads(log_line.split(": ", 2)[2])
    stopped_seen = next(t for t, e in inst.events if e.startswith("exited/stopped"))
    leak = {"deadline_to_agent_stop_command_s": round(said["at"] - deadline, 2),
            "deadline_to_stop_request_s": round(inst.stop_requests[0][0] - deadline, 2),
            "deadline_to_reported_stopped_s": round(stopped_seen - deadline, 2),
            "deadline_to_processes_gone_s": round(inst.stopped_at - deadline, 2)}
    assert (disk / "container-disk.txt").exists(), "Vast keeps the whole disk across a stop"
    assert (volume / "orch-models" / "kept.txt").exists()

    # Up again: the same instance, started; its onstart runs again; the models on the volume are still there.
    t1 = time.monotonic()
    again = orch("up", "va", "--detach", "--port", str(free_port()), "--json")
    again_seconds = time.monotonic() - t1
    assert again.json["status"] == "RUNNING" and again.json["instance_id"] == str(inst.id)
    assert (volume / "orch-models" / "kept.txt").read_text() == "on the volume"
    assert stat.S_IMODE(stop_env.stat().st_mode) == 0o600 and inst.container_key in stop_env.read_text()
    restarted_idle = _read_json(disk / ".orch" / "agent" / "config.json").get("idle")
    gen = orch("gen", "a boat", "--name", "va", "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "out2"),
               "--json").json
    assert Path(gen["images"][0]).exists()

    down = orch("down", "va", "--terminate", "--json").json
    assert down["status"] == "TERMINATED" and inst.gone and inst.destroyed_by == "laptop"
    _wait(lambda: not volume.exists(), 30, "the volume (on the instance's disk) goes with it")
    assert orch("status", "va", "--json").json["status"] == "TERMINATED"
    assert argv.samples > 10 and argv.seen == [], "no key on any command line"
    home = Path(os.environ["ORCH_HOME"])
    assert _files_holding(home, (LAPTOP_KEY, inst.container_key)) == [], "no key in orch's state, logs or config"
    with capsys.disabled():
        print(f"\nvast simulator: orch up {up_seconds:.1f}s, phases {result['phases']}; up again {again_seconds:.1f}s, "
              f"phases {again.json['phases']}; self-stop leak {leak}; 429s {sim.rate_limited}; "
              f"the restarted agent's idle: {restarted_idle}s")
    assert leak["deadline_to_stop_request_s"] < 10


def test_an_offer_gone_between_search_and_create_fails_over_to_the_next(vast, sim, orch_home):
    from orchestrator.config import load_settings
    from orchestrator.lifecycle import Orchestrator, UpOptions, provision

    orch = Orchestrator(load_settings(orch_home / "orch.yaml", environ={}), home=orch_home)
    before = set(sim.instances)
    opts = UpOptions(name="race", provider="vast", gpu="RTX 4090", provision_timeout=30.0)
    offers = provision.choose_offers(orch.ctx, ["vast"], opts)
    assert [o.offer_id for o in offers] == ["5101", "5102", "5105"]
    sim.offer_race(5101)  # another renter takes it after the search
    record, attempts = provision.create(orch.ctx, opts, offers)
    assert [(a.provider, a.gpu, a.region) for a in attempts] == [("vast", "RTX 4090", "US")]
    assert "offer is gone" in attempts[0].error
    used = sim.instances[int(record.instance_id)]
    assert used.offer.ask_id == 5102 and used.actual == "running" and record.region == "DE"
    assert [i for i in sim.instances if i not in before] == [used.id], "nothing was created on the offer that was gone"
    orch.provider("vast").terminate(record.instance_id)
    _wait(lambda: used.gone, 30, "destroyed")
    sim.free_gpu(5101)


def test_bad_input_is_refused_before_anything_is_created(orch, vast, sim, monkeypatch):
    created = len(sim.instances)
    bad_gpu = orch("up", "x", "--provider", "vast", "--gpu", "Z80", "--json", check=False)
    assert bad_gpu.returncode == 1 and "valid GPUs: A10, A100 PCIE" in bad_gpu.json["error"]
    bad_region = orch("up", "x", "--provider", "vast", "--region", "mars-1", "--json", check=False)
    assert bad_region.returncode == 1 and "valid regions:" in bad_region.json["error"] and "US" in bad_region.json["error"]
    offers = orch("offers", "--provider", "vast", "--gpu", "H100", "--json").json["offers"]
    assert {(o["gpu"], o["region"], o["price_per_hour"]) for o in offers} == {("H100 PCIE", "JP", 1.8639), ("H100 SXM", "SE", 2.1139)}
    monkeypatch.setenv("VAST_API_KEY", "not-a-real-key")
    bad_key = orch("offers", "--provider", "vast", "--json", check=False)
    assert bad_key.returncode == 1 and "VAST_API_KEY" in bad_key.json["error"] and "not-a-real-key" not in bad_key.stdout
    monkeypatch.delenv("VAST_API_KEY")
    no_key = orch("up", "x", "--provider", "vast", "--json", check=False)
    assert no_key.returncode == 1 and "set VAST_API_KEY" in no_key.json["error"]
    assert len(sim.instances) == created


# -- the start command, in a real shell ----------------------------------------------------


def _start_env(tmp_path: Path, home: Path, boot: str = "") -> dict[str, str]:
    """What Vast gives the container (as the simulator would, without its host)."""
    from orchestrator.providers.vast.provider import boot_env

    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CONTAINER_ID": "4242", "CONTAINER_API_KEY": "instance-scoped-secret",
           "ORCH_VAST_API": "http://127.0.0.1:9", "ORCH_VAST_VOLUME": str(tmp_path / "volume"),
           "ORCH_SSH_KEY": base64.b64encode(b"ssh-ed25519 AAAAtest orch").decode()}
    if boot:
        env["ORCH_BOOT"] = boot_env(boot)
    return env


def _run_onstart(env: dict[str, str], log: Path, cwd: Path) -> int:
    """Run the onstart as Vast does (it returns; the long part stays in the background); the background's pid."""
    from orchestrator.providers.vast.provider import START_COMMAND

    done = log.read_text().count("the re-arm loop runs") if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.run(["/bin/sh", "-c", START_COMMAND], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                              timeout=60, start_new_session=True)
    assert proc.returncode == 0
    _wait(lambda: log.read_text().count("the re-arm loop runs") > done, 30, "the start command is done")
    pid = int((Path(env["HOME"]) / ".orch" / "agent" / "console.pid").read_text())
    assert psutil.pid_exists(pid), "the background part stays up"
    argvs = []
    for p in psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]:
        try:
            argvs.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    assert argvs and not [a for a in argvs if "instance-scoped-secret" in a]
    return pid


def _end(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), 15)
    except ProcessLookupError:
        pass


def test_the_start_command_in_a_real_shell(tmp_path):
    """stop.env, the stop program, orch's key (once), the volume, the boot recipe in the container's environment."""
    from orchestrator.providers.vast.provider import STOP_PROGRAM

    home = tmp_path / "root"
    env = _start_env(tmp_path, home, boot='#!/bin/sh\nenv > "$HOME/recipe-env"\n')
    log = tmp_path / "container.log"
    pid = _run_onstart(env, log, tmp_path)
    try:
        _wait(lambda: (home / "recipe-env").exists(), 10, "the boot recipe ran")
        assert "CONTAINER_ID=4242" in (home / "recipe-env").read_text(), "the boot recipe ran, in the container's environment"
        assert "ORCH_BOOT=" not in (home / "recipe-env").read_text(), "the recipe's carrier is not inherited by what it starts"
        stop_env = home / ".orch" / "agent" / "stop.env"
        assert stat.S_IMODE(stop_env.stat().st_mode) == 0o600
        assert stop_env.read_text() == ("export CONTAINER_ID='4242'\nexport CONTAINER_API_KEY='instance-scoped-secret'\n"
                                        "export ORCH_VAST_API='http://127.0.0.1:9'\n")
        assert (home / ".orch" / "agent" / "vast-stop.py").read_text() == STOP_PROGRAM, "the agent's stop program"
        assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAAtest orch\n"
        assert stat.S_IMODE((home / ".ssh" / "authorized_keys").stat().st_mode) == 0o600
        assert (tmp_path / "volume").is_dir()
        assert json.loads((home / ".orch" / "boot-recipe.json").read_text())["status"] == "running", \
            "marked running first (the laptop waits on it); the stand-in recipe writes nothing else"
        first = log.read_text()
        assert first.startswith("orch: container started") and "instance-scoped-secret" not in first
    finally:
        _end(pid)
    # Vast keeps the disk across a stop: the onstart runs again over what it wrote, and adds the key once.
    pid = _run_onstart(env, log, tmp_path)
    _end(pid)
    assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAAtest orch\n", "the key once, however often"


def test_the_container_re_arms_a_dead_agent_without_systemd_or_cron(tmp_path):
    """The start command's background loop is the agent's re-arm where there is no systemd (here: every 0.3 s)."""
    home = tmp_path / "root"
    app = home / ".orch" / "app" / "remote"
    app.mkdir(parents=True)
    (app / "__init__.py").write_text("")
    calls = tmp_path / "arm-calls"
    (app / "agent.py").write_text(f"import sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    (home / ".orch" / "agent").mkdir(parents=True)
    (home / ".orch" / "agent" / "config.json").write_text("{}")  # the boot recipe armed it once
    env = {**_start_env(tmp_path, home), "ORCH_REARM_S": "0.3"}
    pid = _run_onstart(env, tmp_path / "container.log", tmp_path)  # not this checkout: `python3 -m remote.agent` finds the copy
    try:
        _wait(lambda: calls.exists() and len(calls.read_text().splitlines()) >= 2, 30, "re-armed twice")
    finally:
        _end(pid)
    assert calls.read_text().splitlines()[0] == f"--home {home}/.orch arm --config-b64 e30="


def test_the_stop_command_without_an_instance_key_says_the_laptop_stops_it(tmp_path):
    from orchestrator.providers.vast import Settings, VastProvider
    from orchestrator.providers.vast.provider import STOP_PROGRAM

    command = VastProvider(Settings(), tmp_path, api_key="", environ={}).self_stop_command("x")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "no stop program" in proc.stderr and "orch down" in proc.stderr
    program = tmp_path / ".orch" / "agent" / "vast-stop.py"
    program.parent.mkdir(parents=True)
    program.write_text(STOP_PROGRAM)  # what the start command writes; no stop.env (Vast gave no instance key)
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "cannot stop itself" in proc.stderr and "orch down" in proc.stderr


@pytest.mark.skipif(not LIVE_KEY, reason="VAST_API_KEY is not set: the live smoke test talks to console.vast.ai")
def test_live_smoke_read_only(tmp_path):
    """Against the real API, reading only (nothing is created): the offers and orch's instances parse."""
    from orchestrator.providers.vast import Settings, VastProvider

    provider = VastProvider(Settings(), tmp_path, api_key=LIVE_KEY)
    offers = provider.offers(gpu="RTX 4090")
    assert all(o.provider == "vast" and o.price_per_hour and o.offer_id.isdigit() for o in offers)
    provider.list()
