"""What goes wrong for a new user, and what orch does then: refuse before creating anything,
stop before recording, find what an interrupted `up` left, repair what died on the instance."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.providers.local import instance_processes

pytestmark = pytest.mark.slow


def _nothing_created(orch, orch_home: Path) -> None:
    assert orch("status", "--json").json == {"instances": []}
    local = orch_home / "local"
    assert not local.exists() or list(local.iterdir()) == []


@pytest.mark.parametrize("args, says", [
    (["--port", "99999"], "--port"),
    (["--port", "-1"], "--port"),
    (["--price-per-hour", "nan"], "--price-per-hour"),
    (["--price-per-hour", "-1"], "--price-per-hour"),
    (["--budget", "nan"], "--budget"),
    (["--budget", "inf"], "--budget"),
    (["--max-price", "0"], "--max-price"),
    (["--idle", "100000000000000000000h"], "--idle"),
    (["--idle", "nan"], "--idle"),
    (["--model", "my-model"], "--model my-model"),
    (["--from-image", "img"], "--from-image"),
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "two"], "--gpus"),
    (["--gpus", "1.5"], "--gpus"),
    (["--gpus", "1000"], "--gpus"),
])
def test_bad_up_input_is_refused_before_anything_is_created(orch, orch_home, args, says):
    r = orch("up", "x", *args, "--detach", "--json", check=False)
    assert r.returncode == 1 and says in r.json["error"], r.stderr
    assert "Traceback" not in r.stderr
    _nothing_created(orch, orch_home)


@pytest.mark.parametrize("name", ["a/b", "../../x", "x" * 300, ".hidden", "sp ace"])
def test_a_name_that_is_not_a_plain_word_is_refused(orch, orch_home, name):
    r = orch("up", name, "--detach", "--json", check=False)
    assert r.returncode == 1 and "instance name" in r.json["error"] and "Traceback" not in r.stderr
    _nothing_created(orch, orch_home)


@pytest.mark.parametrize("env, says", [({"ORCH_PRICE_PER_HOUR": "-3"}, "ORCH_PRICE_PER_HOUR"),
                                       ({"ORCH_PRICE_PER_HOUR": "nan"}, "ORCH_PRICE_PER_HOUR"),
                                       ({"ORCH_TUNNEL_PORT": "http"}, "ORCH_TUNNEL_PORT")])
def test_bad_environment_is_refused(orch_home, env, says):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "up", "--detach", "--json"], capture_output=True, text=True,
                          env={**os.environ, "ORCH_HOME": str(orch_home), **env}, timeout=60)
    assert proc.returncode == 1 and says in json.loads(proc.stdout)["error"] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, says", [
    (["status", "nope"], "no instance named 'nope'"),
    (["down", "nope"], "no instance named 'nope'"),
    (["gen", "x"], "no instance"),
    (["extend", "--idle", "5m"], "no instance"),
    (["extend", "x"], "nothing to change"),
    (["offers", "--provider", "runpod"], "RUNPOD_API_KEY"),
    (["offers", "--max-price", "nan"], "--max-price"),
    (["up", "--provider", "nimbus"], "valid providers"),
    (["up", "--provider", "ssh"], "ssh.host"),
    (["sync", "push", "/no/such/dir", "file:///tmp/x"], "/no/such/dir"),
    (["forget-host-key", "nope"], "no instance named 'nope'"),
    (["down", "--save-image", "img"], "--save-image"),
])
def test_user_errors_are_one_line_never_a_traceback(orch, argv, says):
    r = orch(*argv, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert says in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("config, says", [
    ("tunnel_port: abc\n", "tunnel_port"),
    ("max_price: .nan\n", "max_price"),
    ("local: {price_per_hour: -1}\n", "local.price_per_hour"),
    ("ssh: {port: 99999}\n", "ssh.port"),
    ("deadlines: {idle: .inf}\n", "deadlines.idle"),
    ("provider: [local]\n", "provider"),
    ("local: 3\n", "local"),
])
def test_a_bad_orch_yaml_is_one_line_naming_the_key(orch, orch_home, config, says):
    (orch_home / "orch.yaml").write_text(config)
    r = orch("status", "--json", check=False)
    assert r.returncode == 1 and says in r.json["error"] and "Traceback" not in r.stderr


def test_an_up_killed_during_create_is_found_and_stopped_by_the_next_command(orch, orch_home):
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "up", "cut", "--detach"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "ORCH_HOME": str(orch_home)})
    deadline = time.monotonic() + 60
    metas: list[Path] = []
    while time.monotonic() < deadline and not metas and proc.poll() is None:
        metas = list((orch_home / "local").glob("*/meta.json")) if (orch_home / "local").exists() else []
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the laptop dies while the provider creates the instance
    proc.wait()
    assert metas, "the provider had started creating the instance"
    instance_id = metas[0].parent.name
    row = sqlite3.connect(orch_home / "state.db").execute("SELECT state FROM instances WHERE name = 'cut'").fetchone()
    assert row[0] == "PROVISIONING"

    status = orch("status", "cut", "--json")
    assert status.json["instance_id"] == instance_id, "the interrupted create was found by its run id"
    assert status.json["status"] == "STOPPED" and "interrupted" in status.json["stop_reason"]
    assert "interrupted" in status.stderr
    assert instance_processes(instance_id) == [], "nothing of it runs (or bills)"
    assert orch("gc", "--json").json["strays"] == [], "not a stray: orch knows it"
    again = orch("up", "cut", "--detach", "--json").json
    assert again["instance_id"] == instance_id and again["status"] == "RUNNING"
    orch("down", "cut", "--terminate")


def test_a_stray_that_only_keeps_a_disk_is_reported_and_gc_terminate_removes_it(orch, orch_home):
    up = orch("up", "disk", "--detach", "--json").json
    orch("down", "disk", "--json")
    db = sqlite3.connect(orch_home / "state.db")
    db.execute("DELETE FROM instances WHERE name = 'disk'")
    db.commit()
    warned = orch("status")
    assert up["instance_id"] in warned.stderr and "orch gc --terminate" in warned.stderr
    listed = orch("gc", "--yes", "--json").json
    assert [s["instance_id"] for s in listed["strays"]] == [up["instance_id"]] and listed["stopped"] == []
    removed = orch("gc", "--yes", "--terminate", "--json").json
    assert removed["stopped"][0]["status"] == "TERMINATED"
    assert not (orch_home / "local" / up["instance_id"]).exists()


def test_more_gpus_than_the_instance_has_is_refused_and_nothing_bills(orch, orch_home):
    r = orch("up", "many", "--gpus", "2", "--detach", "--json", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--gpus 2" in r.json["error"] and "has 0 GPU(s)" in r.json["error"] and "orch up many --gpus 1" in r.json["error"]
    status = orch("status", "many", "--json").json
    assert status["status"] == "STOPPED"
    assert instance_processes(status["instance_id"]) == [], "nothing of it runs (or bills)"
    orch("down", "many", "--terminate")


def _kill_agent(orch_home: Path, instance_id: str) -> None:
    agent = orch_home / "local" / instance_id / "disk" / ".orch" / "agent"
    pids = [json.loads((agent / f).read_text())["pid"] for f in ("supervisor.json", "agent.json")]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def test_attaching_repairs_what_died_and_applies_the_flags_it_was_given(orch, orch_home, tmp_path):
    up = orch("up", "fix", "--detach", "--json").json
    # 1. Deadline flags on a running instance apply (as `orch extend` would); hardware flags are refused.
    applied = orch("up", "fix", "--idle", "1h", "--detach", "--json")
    assert applied.json["attached"] is True and "idle 1h" in applied.stderr
    assert orch("status", "fix", "--json").json["deadlines"]["idle"].startswith(("59m", "1h"))
    refused = orch("up", "fix", "--gpu", "H100", "--json", check=False)
    assert refused.returncode == 1 and "--gpu" in refused.json["error"] and "orch down fix" in refused.json["error"]
    refused = orch("up", "fix", "--gpus", "2", "--json", check=False)  # the running server keeps its GPUs
    assert refused.returncode == 1 and "--gpus" in refused.json["error"] and "orch down fix" in refused.json["error"]

    # 2. The server dies: gen says so in one line; `up` starts it again and gen works.
    server = json.loads((orch_home / "local" / up["instance_id"] / "disk" / ".orch" / "server.json").read_text())["pid"]
    os.kill(server, signal.SIGKILL)
    time.sleep(0.5)
    broken = orch("gen", "x", "--steps", "1", "--width", "64", "--height", "64", "-o", str(tmp_path / "o"), check=False)
    assert broken.returncode == 1 and "orch up fix" in broken.stderr and "Traceback" not in broken.stderr
    repaired = orch("up", "fix", "--detach", "--json")
    assert "started again" in repaired.stderr
    gen = orch("gen", "x", "--steps", "1", "--width", "64", "--height", "64", "-o", str(tmp_path / "o"), "--json").json
    assert len(gen["images"]) == 1

    # 3. The agent and its supervisor die together (and the server, which would re-arm them
    #    itself within seconds): status says so; extend and up arm it again.
    server = json.loads((orch_home / "local" / up["instance_id"] / "disk" / ".orch" / "server.json").read_text())["pid"]
    os.kill(server, signal.SIGKILL)
    _kill_agent(orch_home, up["instance_id"])
    st = orch("status", "fix", "--json")
    assert st.json["auto_shutdown"] == "NOT armed" and st.json["deadlines"] is None
    assert "auto-shutdown NOT armed" in st.stderr
    ext = orch("extend", "fix", "--idle", "30m", "--json").json
    assert ext["rearmed"] is True
    assert orch("status", "fix", "--json").json["auto_shutdown"] == "armed"
    _kill_agent(orch_home, up["instance_id"])
    rearmed = orch("up", "fix", "--detach", "--json")
    assert "armed again" in rearmed.stderr
    st = orch("status", "fix", "--json").json
    assert st["auto_shutdown"] == "armed" and st["deadlines"]["idle"].startswith(("29m", "30m"))
    orch("down", "fix", "--terminate")


def _fill(path: Path, block: int) -> None:
    """Write until the file system says it is full."""
    try:
        with open(path, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * block)
    except OSError:
        pass


def _mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small file system for ORCH_HOME")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_down_stops_the_instance_even_when_the_state_cannot_be_written(tmp_path, fault):
    home = tmp_path / "home"
    _mount_tmpfs(home, "256m")
    # The instances' disks on a file system of their own: the laptop's disk fills, not the
    # instance's (whose agent would give back its reserve to write, freeing space for the laptop too).
    _mount_tmpfs(home / "local", "256m")
    env = {**os.environ, "ORCH_HOME": str(home)}

    def orch(*args):
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    try:
        up = orch("up", "full", "--detach", "--json")
        assert up.returncode == 0, up.stderr
        instance_id = json.loads(up.stdout)["instance_id"]
        if fault == "disk full":
            _fill(home / "filler", 1 << 20)
            _fill(home / "filler2", 512)  # the last few KiB too
        else:
            # The database file alone, read-only (as on a read-only file system): open handles stay as they were.
            db = str(home / "state.db")
            subprocess.run(["mount", "--bind", db, db], check=True)
            subprocess.run(["mount", "-o", "remount,ro,bind", db], check=True)
        down = orch("down", "full", "--json")
        assert instance_processes(instance_id) == [], "the instance was stopped"
        assert down.returncode == 1 and "Traceback" not in down.stderr
        error = json.loads(down.stdout)["error"]
        assert "full is stopped (confirmed by the provider" in error and "could not record" in error
        # Space back: the next command brings the record in line.
        if fault == "disk full":
            (home / "filler").unlink()
            (home / "filler2").unlink(missing_ok=True)
        else:
            subprocess.run(["umount", str(home / "state.db")], check=True)
        status = orch("status", "full", "--json")
        assert json.loads(status.stdout)["status"] == "STOPPED", status.stderr
    finally:
        subprocess.run([sys.executable, "-c", f"from tests.conftest import _stop_everything; from pathlib import Path; "
                        f"_stop_everything(Path({str(home)!r}))"], cwd=Path(__file__).resolve().parents[2])
        subprocess.run(["umount", "-l", str(home / "state.db")], stderr=subprocess.DEVNULL)
        subprocess.run(["umount", "-l", str(home / "local")])
        subprocess.run(["umount", "-l", str(home)])
