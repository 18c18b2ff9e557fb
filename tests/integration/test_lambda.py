"""Lambda Cloud end to end: the real CLI in subprocesses against the Lambda simulator on
127.0.0.1, whose instances are real local hosts (SSH on port 22 of their own loopback address)
running what Lambda would run. Every request and answer is checked against the vendored spec.
A live smoke test (read-only) runs only where LAMBDA_API_KEY is set for the whole run."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from tests.helpers.net import free_port
from tests.simulators.lambda_api import LAPTOP_KEY, TERMINATE_KEY, LambdaSimulator

pytestmark = pytest.mark.slow
LIVE_KEY = os.environ.get("LAMBDA_API_KEY")  # read at import: the tests below set the simulator's key per test
INTERVAL, LAUNCH_INTERVAL = 0.2, 1.0  # Lambda's 1 s and 10 s, scaled down; the simulator enforces them with 429s


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = LambdaSimulator(tmp_path_factory.mktemp("lambda-sim"), request_interval=INTERVAL, launch_interval=LAUNCH_INTERVAL)
    s.keep_terminated_disks = True
    s.start()
    yield s
    s.close()
    s.assert_clean()


@pytest.fixture
def lam(sim, orch_home, monkeypatch):
    """orch configured for the simulator; returns a writer of the `lambda:` section."""
    monkeypatch.setenv("LAMBDA_API_KEY", LAPTOP_KEY)
    monkeypatch.delenv("LAMBDA_SELF_TERMINATE_KEY", raising=False)

    def configure(**extra: object) -> None:
        lines = [f"  api_url: {sim.url}", f"  request_interval: {INTERVAL}", f"  launch_interval: {LAUNCH_INTERVAL}"]
        lines += [f"  {k}: {v}" for k, v in extra.items()]
        (orch_home / "orch.yaml").write_text("lambda:\n" + "\n".join(lines) + "\n")

    configure()
    yield configure
    sim.assert_clean()


class ArgvWatch:
    """Every process's command line, sampled while the test runs: a key must never be on one."""

    def __init__(self, secrets: tuple[str, ...]):
        self.secrets, self.seen, self.samples = secrets, [], 0
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
                if any(s in line for s in self.secrets):
                    self.seen.append(line[:200])
            self.samples += 1
            self._stop.wait(0.2)


def _files_holding(root: Path, secrets: tuple[str, ...], allowed: set[Path] = frozenset()) -> list[str]:
    found = []
    for p in root.rglob("*"):
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
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_up_gen_then_the_agent_terminates_it_through_the_api(orch, orch_home, lam, sim, tmp_path, capsys):
    lam(self_terminate_key=TERMINATE_KEY)
    idle = 20.0  # room for `up` to return and `gen` to start on a loaded CI machine before it fires
    with ArgvWatch((LAPTOP_KEY, TERMINATE_KEY)) as argv:
        t0 = time.monotonic()
        up = orch("up", "lam", "--provider", "lambda", "--gpu", "A10", "--detach", "--port", str(free_port()),
                  "--idle", f"{idle:.0f}s", "--json")
        up_seconds = time.monotonic() - t0
        result = up.json
        assert result["status"] == "RUNNING" and result["provider"] == "lambda" and result["price_per_hour"] == 0.75
        assert "warning" not in up.stderr, "with a self-terminate key the billing guarantee is whole"
        inst = sim.instances[result["instance_id"]]
        assert inst.status == "active" and inst.tags[0] == {"key": "orch", "value": "1"} and inst.user_data.startswith("#!/bin/sh")
        disk = sim.host_dir(inst.id) / "disk"
        stop_env = disk / ".orch" / "agent" / "stop.env"
        assert stat.S_IMODE(stop_env.stat().st_mode) == 0o600
        assert f"ORCH_LAMBDA_INSTANCE_ID={inst.id}" in stop_env.read_text() and TERMINATE_KEY in stop_env.read_text()

        # The URL answers, and gen makes a PNG through it.
        models = httpx.get(f"{result['url']}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {result['token']}"}, timeout=30)
        assert models.status_code == 200
        gen = orch("gen", "a lighthouse", "--name", "lam", "--steps", "2", "--width", "64", "--height", "64",
                   "-o", str(tmp_path / "out"), "--json").json
        image = Image.open(gen["images"][0])
        image.load()
        assert image.format == "PNG" and image.size == (64, 64)
        assert orch("status", "lam", "--json").json["auto_shutdown"] == "armed"

        # Nobody asks for more: the agent's idle deadline fires and it terminates the instance with its key.
        _wait(lambda: inst.status == "terminated", idle + 60, "the simulator reports the instance terminated")
    assert inst.terminated_by == "self-terminate", "terminated by the agent, through the API, not by the laptop"
    disk = sim.host_dir(inst.id) / "disk"  # kept aside by the simulator after terminate, for this inspection
    stop_env = disk / ".orch" / "agent" / "stop.env"
    agent = disk / ".orch" / "agent"
    boot = json.loads((agent / "boot.json").read_text())
    activity = json.loads((disk / ".orch" / "activity.json").read_text())
    stopped = json.loads((agent / "stopped.json").read_text())
    deadline = max(boot["boot_done_at"], activity.get("last_request", 0.0)) + idle
    assert stopped["reason"] == f"idle {idle:.0f}s"
    status = _wait(lambda: (s := orch("status", "lam", "--json").json)["status"] == "TERMINATED" and s, 30, "orch status shows it")
    assert status["url"] is None

    # The keys: in stop.env on the instance (mode 600) and nowhere else (state, logs, the instance's disk), never on a
    # command line.
    assert argv.samples > 10 and argv.seen == []
    assert _files_holding(orch_home, (LAPTOP_KEY, TERMINATE_KEY), {orch_home / "orch.yaml"}) == [], "where the user wrote it, only"
    assert _files_holding(sim.host_dir(inst.id), (LAPTOP_KEY, TERMINATE_KEY), {stop_env}) == []
    assert not list(Path("/tmp").glob("orch-startup.*")), "the user-data wrapper removed its copy of the script"

    leak = {"deadline_to_terminate_request_s": round(inst.terminate_requested_at - deadline, 2),
            "deadline_to_terminated_s": round(inst.terminated_at - deadline, 2),
            "agent_fired_after_deadline_s": round(stopped["at"] - deadline, 2)}
    with capsys.disabled():
        print(f"\nlambda simulator: orch up {up_seconds:.1f}s, phases {result['phases']}; leak {leak}; "
              f"429s so far {sim.rate_limited}")
    assert leak["deadline_to_terminate_request_s"] < 10


def test_without_a_key_up_warns_first_fails_over_and_down_terminates_in_words(orch, orch_home, lam, sim, monkeypatch):
    sim.capacity_race("gpu_1x_a10", "us-east-1")  # the cheapest A10 offer: listed with capacity, gone at launch
    monkeypatch.setattr(sim, "accepts_user_data", False)  # an API that refuses user_data: the bootstrap over SSH arms the agent
    up = orch("up", "nokey", "--provider", "lambda", "--gpu", "A10", "--detach", "--port", str(free_port()), "--json")
    result = up.json
    warning = up.stderr.find("Lambda Cloud bills an instance until it is terminated")
    creating = up.stderr.find("creating on lambda")
    assert 0 <= warning < creating, f"the warning comes before anything is created:\n{up.stderr}"
    assert "lambda.self_terminate_key" in up.stderr and "nothing stops nokey by itself" in " ".join(up.stderr.split())
    assert [(a["provider"], a["gpu"], a["region"]) for a in result["attempts"]] == [("lambda", "A10", "us-east-1")]
    assert "capacity" in result["attempts"][0]["error"]
    inst = sim.instances[result["instance_id"]]
    assert inst.region == "us-west-1" and result["status"] == "RUNNING" and inst.user_data == ""
    assert not (sim.host_dir(inst.id) / "disk" / ".orch" / "agent" / "stop.env").exists(), "no key: nothing handed over"

    status = orch("status", "nokey", "--json")
    assert status.json["auto_shutdown"] == "partial"
    assert any("auto-shutdown is partial" in w for w in status.json["warnings"])

    down = orch("down", "nokey", "--json")
    said = " ".join(down.stderr.split())
    assert "Lambda Cloud cannot stop an instance" in said and "terminating instead" in said
    assert said.find("terminating instead") < said.find(f"terminating instance {inst.id}")
    assert down.json["status"] == "TERMINATED"
    assert inst.status == "terminated" and inst.terminated_by == "laptop"
    assert orch("status", "nokey", "--json").json["status"] == "TERMINATED"


def test_bad_input_is_refused_before_anything_is_created(orch, lam, sim, monkeypatch):
    launched = len(sim.instances)
    bad_gpu = orch("up", "x", "--provider", "lambda", "--gpu", "Z80", "--json", check=False)
    assert bad_gpu.returncode == 1 and "valid GPUs: A10, A100, GH200, H100" in bad_gpu.json["error"]
    bad_region = orch("up", "x", "--provider", "lambda", "--region", "mars-1", "--json", check=False)
    assert bad_region.returncode == 1 and "valid regions:" in bad_region.json["error"] and "us-east-1" in bad_region.json["error"]
    offers = orch("offers", "--provider", "lambda", "--gpu", "A100", "--json").json["offers"]
    assert {(o["gpu"], o["region"], o["price_per_hour"], o["available"]) for o in offers} >= {("A100", "us-south-1", 1.29, True)}
    monkeypatch.delenv("LAMBDA_API_KEY")
    no_key = orch("up", "x", "--provider", "lambda", "--json", check=False)
    assert no_key.returncode == 1 and "set LAMBDA_API_KEY" in no_key.json["error"]
    assert len(sim.instances) == launched


@pytest.mark.skipif(not LIVE_KEY, reason="LAMBDA_API_KEY is not set: the live smoke test talks to cloud.lambda.ai")
def test_live_smoke_read_only(tmp_path):
    """Against the real API, reading only (nothing is launched): the offers and orch's instances parse."""
    from orchestrator.providers.lambda_cloud import LambdaProvider, Settings

    provider = LambdaProvider(Settings(), tmp_path, api_key=LIVE_KEY)
    offers = provider.offers()
    assert all(o.provider == "lambda" and o.price_per_hour and o.offer_id for o in offers)
    provider.list()


def test_a_power_off_from_inside_does_not_end_the_bill(sim, tmp_path):
    """As on Lambda: the machine stops, the instance stays (unhealthy) and billed; only the API ends it."""
    from orchestrator.providers.base import NAME_TAG, ORCH_TAG, RUN_TAG, InstanceSpec, InstanceStatus
    from orchestrator.providers.lambda_cloud import LambdaProvider, Settings
    from orchestrator.ssh import SshSession, ensure_user_key, public_key_line

    provider = LambdaProvider(Settings(api_url=sim.url, request_interval=INTERVAL, launch_interval=LAUNCH_INTERVAL),
                              tmp_path, api_key=LAPTOP_KEY, environ={})
    key = ensure_user_key(tmp_path)
    offer = provider.offers(gpu="A100")[0]
    created = provider.create(InstanceSpec(name="off", offer=offer, ssh_public_key=public_key_line(key),
                                           tags={ORCH_TAG: "1", NAME_TAG: "off", RUN_TAG: "r-off"}))
    inst = sim.instances[created.instance_id]
    running = _wait(lambda: (i := provider.get(created.instance_id)).status == InstanceStatus.RUNNING and i, 60, "active")
    with SshSession.connect(running.ssh, key, None) as session:
        session.run("nohup poweroff > /dev/null 2>&1 &", timeout=30)
    _wait(lambda: inst.status == "unhealthy", 30, "the host powered off")
    assert not sim.pool.running(inst.id)
    got = provider.get(created.instance_id)
    assert got.status == InstanceStatus.UNKNOWN and got.status.is_billing_compute and got.raw_status == "unhealthy"
    billed = inst.billed_seconds()
    time.sleep(0.5)
    assert inst.terminate_requested_at is None and inst.billed_seconds() > billed, "still billed"
    provider.terminate(created.instance_id)
    _wait(lambda: inst.status == "terminated", 30, "terminated through the API")


def test_the_stop_command_without_a_key_says_only_orch_down_can_end_the_bill(tmp_path):
    import subprocess

    from orchestrator.providers.lambda_cloud import LambdaProvider, Settings

    command = LambdaProvider(Settings(), tmp_path, api_key="", environ={}).self_stop_command("x")
    proc = subprocess.run(["/bin/sh", "-c", command], env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "only `orch down`" in proc.stderr
