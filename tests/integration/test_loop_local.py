"""The whole loop on the embedded default, through the real CLI in subprocesses."""

from __future__ import annotations

import socket
import sqlite3

import psutil
import pytest
from PIL import Image

from orchestrator.providers.local import instance_processes
from tests.helpers.net import free_port

pytestmark = pytest.mark.slow


def test_up_gen_down_leaves_pngs_and_nothing_running(orch, orch_home, tmp_path):
    port = free_port()
    up = orch("up", "box", "--detach", "--port", str(port), "--json").json
    assert up["status"] == "RUNNING" and up["provider"] == "local"
    assert up["url"] == f"http://127.0.0.1:{port}"
    assert up["token"] and len(up["token"]) >= 32
    instance_id = up["instance_id"]
    assert instance_processes(instance_id), "a running instance has processes"

    out = tmp_path / "imgs"
    gen = orch("gen", "a cat on a castle", "-n", "2", "--steps", "3", "--seed", "1234", "--width", "128",
               "--height", "96", "--negative", "blurry", "-o", str(out), "--json").json
    assert gen["seeds"] == [1234, 1235]
    assert len(gen["images"]) == 2
    for path, seed in zip(gen["images"], gen["seeds"]):
        img = Image.open(path)
        img.load()
        assert img.format == "PNG" and img.size == (128, 96)
        params = img.info["parameters"]
        lines = params.split("\n")
        assert lines[0] == "a cat on a castle"
        assert lines[1] == "Negative prompt: blurry"
        assert lines[2].startswith("Steps: 3, Sampler: Euler a, ")
        assert f"Seed: {seed}," in lines[2] and "Size: 128x96" in lines[2] and "Model: orch-demo-tiny-sd15" in lines[2]

    status = orch("status", "box", "--json").json
    assert status["status"] == "RUNNING" and status["url"] == up["url"]

    down = orch("down", "box", "--json").json
    assert down["status"] == "STOPPED"
    assert instance_processes(instance_id) == [], "down leaves no process of the instance"
    tunnels = [p for p in psutil.process_iter(["cmdline"]) if "tunnel-daemon" in " ".join(p.info["cmdline"] or []) and "box" in (p.info["cmdline"] or [])]
    assert [p for p in tunnels if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the tunnel's port is closed"
    assert orch("status", "box", "--json").json["status"] == "STOPPED"

    # gen against a stopped instance says so, and how to start it.
    refused = orch("gen", "x", "--name", "box", check=False)
    assert refused.returncode == 1
    assert "stopped" in refused.stderr and "orch up box" in refused.stderr

    # Every transition was recorded with its time, and survives the CLI processes.
    db = sqlite3.connect(orch_home / "state.db")
    states = [r[0] for r in db.execute("SELECT to_state FROM events WHERE name = 'box' ORDER BY id")]
    assert states == ["PROVISIONING", "WAITING_SSH", "BOOTSTRAPPING", "STARTING_SERVER", "RUNNING", "STOPPING", "STOPPED"]

    # The stopped instance starts again with its disk (the demo model is not rebuilt).
    again = orch("up", "box", "--detach", "--json").json
    assert again["instance_id"] == instance_id and again["status"] == "RUNNING"
    orch("down", "box", "--terminate", "--json")
    assert not (orch_home / "local" / instance_id).exists()


def test_up_twice_attaches_and_taken_port_is_replaced(orch, orch_home):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        first = orch("up", "one", "--detach", "--port", str(taken), "--json").json
        assert first["url"] != f"http://127.0.0.1:{taken}", "a taken port is replaced by a free one"
        second = orch("up", "one", "--detach", "--json").json
        assert second["attached"] is True
        assert second["instance_id"] == first["instance_id"]
        assert second["url"] == first["url"]
        assert len(list((orch_home / "local").iterdir())) == 1, "attaching creates no second instance"
    orch("down", "one", "--terminate")


def test_gen_opens_its_own_tunnel_when_none_is_open(orch, tmp_path):
    up = orch("up", "solo", "--detach", "--json").json
    # Kill the detached tunnel: gen must still reach the running instance.
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "tunnel-daemon" in cmd and "solo" in cmd:
            p.kill()
            p.wait(5)
    gen = orch("gen", "a tree", "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "o"), "--json").json
    assert len(gen["images"]) == 1
    Image.open(gen["images"][0]).verify()
    orch("down", "solo", "--terminate")
    assert instance_processes(up["instance_id"]) == []
