"""AutoDL end to end: the real CLI in subprocesses against the AutoDL simulator on 127.0.0.1, whose
instances are real local hosts (a root password and no key, SSH on a mapped port of their own
loopback address) running the start command at every power-on. Every request and answer is
checked against tests/simulators/autodl_schema.json. A live smoke test (read-only) runs only
where AUTODL_TOKEN is set for the whole run."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from remote.server.demo_model import ensure_demo_model
from tests.helpers.net import free_port
from tests.simulators.autodl_api import PRO, TOKEN, AutoDLSimulator

pytestmark = pytest.mark.slow
LIVE_TOKEN = os.environ.get("AUTODL_TOKEN")  # read at import: the tests below set the simulator's token per test


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = AutoDLSimulator(tmp_path_factory.mktemp("autodl-sim"), shutdown_delay=0.2, release_delay=0.2).start()
    yield s
    s.release_everything()
    s.close()
    s.assert_clean()


@pytest.fixture
def adl(sim, orch_home, monkeypatch, tmp_path):
    """orch configured for the simulator (its data disk a directory of this test); returns that directory."""
    monkeypatch.setenv("AUTODL_TOKEN", TOKEN)
    data_disk = tmp_path / "autodl-tmp"
    (orch_home / "orch.yaml").write_text(f"autodl:\n  api_url: {sim.url}\n  data_disk: {data_disk}\n  poll_interval: 0.2\n"
                                         f"  request_interval: 0\n")
    yield data_disk
    sim.assert_clean()


class ArgvWatch:
    """Every process's command line, sampled while the test runs: a secret must never be on one."""

    def __init__(self, secrets):
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
                if any(s in line for s in self.secrets()):
                    self.seen.append(line[:200])
            self.samples += 1
            self._stop.wait(0.2)


def _files_holding(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
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


def test_up_fails_over_gen_self_stop_status_up_again_and_down_terminate(s3, orch, orch_home, adl, sim, tmp_path, capsys):
    # A model in the bucket, pulled by the instance onto its data disk.
    model = ensure_demo_model(tmp_path / "laptop-models")
    target = model.rename(tmp_path / "laptop-models" / "my-model")
    total = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    orch("sync", "push", str(target), "s3://bkt/models/my-model", "--json")
    before = {i.uuid for i in sim.instances.values()}
    sim.pro_sold_out.add(("4090D", "westDC3"))  # the stock endpoint lists idle GPUs there; Pro create finds none
    idle = 20.0  # room for `up` to return and `gen` to start on a loaded CI machine before it fires
    passwords = lambda: [i.password for i in sim.instances.values()]  # noqa: E731
    with ArgvWatch(lambda: [TOKEN, *passwords()]) as argv:
        t0 = time.monotonic()
        up = orch("up", "adl", "--provider", "autodl", "--gpu", "RTX 4090D", "--model", "s3://bkt/models/my-model",
                  "--detach",
                  "--port", str(free_port()), "--idle", f"{idle:.0f}s", "--json")
        up_seconds = time.monotonic() - t0
        result = up.json
        assert result["status"] == "RUNNING" and result["provider"] == "autodl"
        assert (result["price_per_hour"], result["currency"]) == (1.88, "CNY"), "the price read after create, in yuan"
        assert "price known after create" in up.stderr
        # No stock in the first offer: the next one (another data center) is tried, nothing was created there.
        assert [(a["gpu"], a["region"]) for a in result["attempts"]] == [("RTX 4090D", "westDC3")]
        assert "no GPU of this spec free" in result["attempts"][0]["error"]
        sim.pro_sold_out.clear()
        [uuid] = {i.uuid for i in sim.instances.values()} - before
        inst = sim.instances[uuid]
        assert result["instance_id"] == uuid and inst.spec == "4090D" and inst.data_center == "beijingDC2"
        assert inst.name.startswith("orch.") and inst.name.endswith(".adl"), "orch's tags ride in the instance's name"
        assert "'" not in inst.start_command and '"' not in inst.start_command, "quote-free: AutoDL re-parses it"
        disk = sim.host_dir(uuid) / "disk"
        keys = (disk / ".ssh" / "authorized_keys").read_text()
        assert (orch_home / "keys" / "id_ed25519.pub").read_text().split()[1] in keys, "orch's key, put there with the password"
        assert "my-model" in os.listdir(adl / "orch-models"), "models on the data disk"
        assert (disk / ".orch" / "models").resolve() == (adl / "orch-models").resolve()
        assert f"{total:,} bytes pulled" in up.stderr
        assert "remote.agent" in (disk / ".crontab").read_text(), "no systemd in the container: cron re-arms the agent"

        # The URL answers, and gen makes a PNG through it with the model.
        models = httpx.get(f"{result['url']}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {result['token']}"}, timeout=30)
        assert models.status_code == 200 and "my-model" in [m["model_name"] for m in models.json()]
        gen = orch("gen", "a lighthouse", "--name", "adl", "--steps", "2", "--width", "64", "--height", "64",
                   "-o", str(tmp_path / "out"), "--json").json
        image = Image.open(gen["images"][0])
        image.load()
        assert image.format == "PNG" and image.size == (64, 64) and "Model: my-model" in image.info["parameters"]
        assert orch("status", "adl", "--json").json["auto_shutdown"] == "armed"

        # Nobody asks for more: the agent's idle deadline fires and it runs `shutdown` in the container;
        # AutoDL powers the instance off and stops billing it.
        _wait(lambda: inst.status == "shutdown", idle + 60, "the simulator reports the instance shut down")
    assert inst.shutdown_from_inside_at is not None and inst.power_off_requested_at is None, "by the agent, not the laptop"
    assert inst.billing_since is None, "billing stopped"
    agent = disk / ".orch" / "agent"
    boot = json.loads((agent / "boot.json").read_text())
    activity = json.loads((disk / ".orch" / "activity.json").read_text())
    stopped = json.loads((agent / "stopped.json").read_text())
    deadline = max(boot["boot_done_at"], activity.get("last_request", 0.0)) + idle
    assert stopped["reason"] == f"idle {idle:.0f}s"
    leak = {"deadline_to_shutdown_reported_s": round(inst.shutdown_from_inside_at - deadline, 2),
            "deadline_to_billing_stopped_s": round(inst.stopped_at - deadline, 2),
            "agent_fired_after_deadline_s": round(stopped["at"] - deadline, 2)}

    status = _wait(lambda: (s := orch("status", "adl", "--json").json)["status"] == "STOPPED" and s, 30, "orch status shows it")
    assert "powered off outside orch" in status["stop_reason"] and "15 days" in status["stop_reason"]
    assert status["url"] is None

    # Up again: AutoDL powers it on (the start command re-arms the agent); the models on the data disk are all there.
    t1 = time.monotonic()
    again = orch("up", "adl", "--detach", "--port", str(free_port()), "--json")
    again_seconds = time.monotonic() - t1
    assert again.json["status"] == "RUNNING" and again.json["instance_id"] == uuid and inst.boots == 2
    assert f"0 bytes pulled, {total:,} already there" in again.stderr
    # Neither the token nor the root password on the instance's disk (orch never sends the token there).
    assert _files_holding(disk, [TOKEN, inst.password]) == []

    # Down --terminate: power_off, shutdown, release.
    down = orch("down", "adl", "--terminate", "--json").json
    assert down["status"] == "TERMINATED" and down["currency"] == "CNY"
    assert inst.status in ("releasing", "released") and inst.billing_since is None and inst.power_off_requested_at
    assert [e for _, e in inst.events][-2:] in (["shutdown", "releasing"], ["releasing", "released"])

    # The token and the root password: never on a command line, in orch's files or the instance's.
    assert argv.samples > 10 and argv.seen == []
    assert _files_holding(orch_home, [TOKEN, inst.password]) == []
    with capsys.disabled():
        print(f"\nautodl simulator: orch up {up_seconds:.1f}s, phases {result['phases']}; up again {again_seconds:.1f}s, "
              f"phases {again.json['phases']}; leak {leak}")
    assert leak["deadline_to_billing_stopped_s"] < 10


def test_a_create_answered_with_an_error_after_it_billed_is_found_and_stopped(orch, adl, sim):
    sim.fail_next(f"{PRO}/create", "after-create-502")  # the instance exists and bills; the answer is lost
    before, logged = set(sim.instances), len(sim.log)
    up = orch("up", "lost", "--provider", "autodl", "--gpu", "RTX 5090", "--detach", "--json", check=False)
    assert up.returncode == 1 and "502" in up.json["error"]
    [uuid] = set(sim.instances) - before
    inst = sim.instances[uuid]
    _wait(lambda: inst.status == "shutdown", 60, "the instance that create made is powered off")
    assert inst.billing_since is None
    creates = [e for e in sim.log[logged:] if e[2] == f"{PRO}/create"]
    assert len(creates) == 1, "never retried"
    status = orch("status", "lost", "--json").json
    assert status["instance_id"] == uuid and status["status"] in ("STOPPED", "FAILED")
    assert orch("down", "lost", "--terminate", "--json").json["status"] == "TERMINATED"
    _wait(lambda: inst.status == "released", 30, "released")


def test_bad_input_and_accounts_are_refused_before_anything_is_created(orch, adl, sim, monkeypatch):
    created = len(sim.instances)
    bad_gpu = orch("up", "x", "--provider", "autodl", "--gpu", "Z80", "--json", check=False)
    assert bad_gpu.returncode == 1 and "valid GPUs: RTX 4090 48GB (v-48g)" in bad_gpu.json["error"]
    bad_region = orch("up", "x", "--provider", "autodl", "--region", "mars-1", "--json", check=False)
    assert bad_region.returncode == 1 and "valid regions: westDC3 (西北B区), beijingDC2 (北京B区)" in bad_region.json["error"]
    elastic = orch("up", "x", "--provider", "autodl", "--region", "neimengDC1", "--json", check=False)
    assert elastic.returncode == 1 and "only elastic deployments" in elastic.json["error"]
    offers = orch("offers", "--provider", "autodl", "--gpu", "5090", "--json").json["offers"]
    assert {(o["gpu"], o["region"], o["price_per_hour"], o["currency"], o["available"]) for o in offers} == {
        ("RTX 5090", "westDC3", None, "CNY", True), ("RTX 5090", "beijingDC2", None, "CNY", True)}
    monkeypatch.setattr(sim, "real_name", False)
    unverified = orch("up", "x", "--provider", "autodl", "--gpu", "5090", "--json", check=False)
    assert unverified.returncode == 1 and "complete real-name verification" in unverified.json["error"]
    monkeypatch.setattr(sim, "real_name", True)
    monkeypatch.setenv("AUTODL_TOKEN", "not-the-token")
    refused = orch("up", "x", "--provider", "autodl", "--gpu", "5090", "--json", check=False)
    assert refused.returncode == 1 and "set AUTODL_TOKEN" in refused.json["error"]
    monkeypatch.delenv("AUTODL_TOKEN")
    missing = orch("up", "x", "--provider", "autodl", "--json", check=False)
    assert missing.returncode == 1 and "set AUTODL_TOKEN" in missing.json["error"]
    assert len(sim.instances) == created


@pytest.mark.skipif(not LIVE_TOKEN, reason="AUTODL_TOKEN is not set: the live smoke test talks to api.autodl.com")
def test_live_smoke_read_only(tmp_path):
    """Against the real API, reading only (nothing is created): balance, stock-backed offers and orch's instances parse."""
    from orchestrator.providers.autodl import AutoDLProvider, Settings

    provider = AutoDLProvider(Settings(), tmp_path, token=LIVE_TOKEN)
    assert isinstance(provider.api.balance()["assets"], int)
    offers = provider.offers()
    assert offers and all(o.provider == "autodl" and o.price_per_hour is None and o.currency == "CNY" for o in offers)
    provider.list()
    provider.list_images()
