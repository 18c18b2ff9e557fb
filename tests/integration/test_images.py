"""Save an instance's environment, bring it back elsewhere, migrate between providers.

Real parts: local instances and an OpenSSH host on 127.0.0.1, a directory store (the same
code path as S3 for images: manifests and blobs by hash), the instance pushing and pulling
itself. A failure injected at each migrate step leaves the old instance running.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from orchestrator.config import load_settings
from orchestrator.images.migrate import MigrateFailed, migrate
from orchestrator.lifecycle import Orchestrator, UpOptions
from orchestrator.providers.local import instance_processes
from remote.server.demo_model import ensure_demo_model

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path, orch_home):
    root = tmp_path / "bucket"
    (root / ".orch").mkdir(parents=True)
    (root / ".orch" / "store.json").write_text('{"version": 1}\n')
    model = ensure_demo_model(tmp_path / "laptop")
    return root, model


def _config(orch_home: Path, root: Path, **extra) -> None:
    (orch_home / "orch.yaml").write_text(yaml.safe_dump({"storage": {"url": f"file://{root}/models"}, **extra}))


def _disk(orch_home: Path, instance_id: str) -> Path:
    return orch_home / "local" / instance_id / "disk" / ".orch"


def _api(up: dict, path: str):
    return httpx.get(f"{up['url']}{path}", headers={"Authorization": f"Bearer {up['token']}"}, timeout=30).json()


def test_save_terminate_and_restore_brings_back_models_loras_files_and_graphs(orch, orch_home, store, tmp_path):
    root, model = store
    _config(orch_home, root)
    orch("sync", "push", str(model), f"file://{root}/models/mymodel")
    up = orch("up", "a", "--model", "mymodel", "--detach", "--json").json
    disk = _disk(orch_home, up["instance_id"])
    (disk / "models" / "Lora").mkdir(parents=True, exist_ok=True)
    lora = b"not really a lora, but the user's file" * 100
    (disk / "models" / "Lora" / "mine.safetensors").write_bytes(lora)
    (disk / "outputs").mkdir(exist_ok=True)
    (disk / "outputs" / "keep.png").write_bytes(b"\x89PNG a picture")
    (disk / "compile-cache" / "precompiled").mkdir(parents=True, exist_ok=True)
    (disk / "compile-cache" / "precompiled" / "graph.bin").write_bytes(b"compiled" * 10)

    saved = orch("image", "save", "img", "a", "--json").json
    assert saved["parts"]["models"]["transferred"] == len(lora), "the model was in the bucket already: only the LoRA moved"
    assert saved["parts"]["user"]["transferred"] == len(b"\x89PNG a picture")
    assert [i["name"] for i in orch("image", "ls", "--json").json["images"]] == ["img"]
    orch("down", "a", "--terminate")

    restored = orch("up", "b", "--from-image", "img", "--model", "mymodel", "--detach", "--json")
    assert "mymodel: 0 bytes pulled" in restored.stderr, "the model pull after the restore moved nothing"
    b = restored.json
    new_disk = _disk(orch_home, b["instance_id"])
    assert "mymodel" in [m["model_name"] for m in _api(b, "/sdapi/v1/sd-models")]
    assert (new_disk / "models" / "Lora" / "mine.safetensors").read_bytes() == lora
    assert (new_disk / "outputs" / "keep.png").read_bytes() == b"\x89PNG a picture"
    assert (new_disk / "compile-cache" / "precompiled" / "graph.bin").read_bytes() == b"compiled" * 10
    assert orch("status", "b", "--json").json["image"] == "img"

    removed = orch("image", "rm", "img", "--json").json
    assert removed["manifests"] >= 3 and orch("image", "ls", "--json").json["images"] == []
    orch("down", "b", "--terminate")


@pytest.mark.parametrize("damage, says", [("newer", "newer orch"), ("missing", "incomplete"), ("absent", "no image")])
def test_a_bad_image_is_refused_before_anything_is_created(orch, orch_home, store, damage, says):
    from orchestrator.images.manifest import ImageMeta
    from orchestrator.images.store import ImageStore

    root, model = store
    _config(orch_home, root)
    images = ImageStore(f"file://{root}/orch-images")
    if damage != "absent":
        orch("sync", "push", str(model), images.part_url("bad", "models"))
        images.write(ImageMeta(name="bad", schema=99 if damage == "newer" else 1, parts={"models": {}}))
        if damage == "missing":
            for digest, _, _ in images.store.list_blobs()[:1]:
                images.store.delete_blob(digest)
    r = orch("up", "x", "--from-image", "bad", "--detach", "--json", check=False)
    assert r.returncode == 1 and says in r.json["error"] and "Traceback" not in r.stderr
    assert orch("status", "--json").json == {"instances": []}


def test_migrate_local_to_ssh_and_back(orch, orch_home, store, sshd, tmp_path):
    root, _ = store
    _config(orch_home, root, ssh={"host": "127.0.0.1", "port": sshd.port, "user": getpass.getuser(),
                                  "key": str(sshd.root / "user_key"), "python": sys.executable, "workdir": str(tmp_path / "w")})
    orch("up", "a", "--detach", "--json")
    moved = orch("migrate", "a", "--provider", "ssh", "--json").json
    assert moved["name"] == "a-ssh" and moved["from"] == "a"
    assert [s["step"] for s in moved["steps"]] == ["check", "save", "up", "verify", "down"]
    assert all(s["status"] == "done" for s in moved["steps"])
    assert orch("status", "a", "--json").json["status"] == "STOPPED"
    assert orch("status", "a-ssh", "--json").json["status"] == "RUNNING"
    back = orch("migrate", "a-ssh", "--provider", "local", "--as", "a2", "--json").json
    assert back["name"] == "a2" and orch("status", "a2", "--json").json["status"] == "RUNNING"
    assert orch("status", "a-ssh", "--json").json["status"] == "STOPPED"
    gen = orch("gen", "after two moves", "--name", "a2", "--steps", "1", "--width", "64", "--height", "64",
               "-o", str(tmp_path / "o"), "--json").json
    assert len(gen["images"]) == 1
    for name in ("a2", "a-ssh", "a"):
        orch("down", name, "--terminate")


class _DownFails(Orchestrator):
    """The old instance refuses to stop (the provider's API is down, say)."""

    def __init__(self, *a, refuse: str, **k):
        super().__init__(*a, **k)
        self.refuse = refuse

    def down(self, name, *a, **k):
        if name == self.refuse:
            from orchestrator.errors import LifecycleError

            raise LifecycleError("the provider's API did not answer")
        return super().down(name, *a, **k)


def test_a_failure_at_each_migrate_step_leaves_the_old_instance_running(orch_home, store):
    root, _ = store
    _config(orch_home, root)
    orch = _DownFails(load_settings(), refuse="old")
    orch.up(UpOptions(name="old", detach=True))

    def running(name):
        return orch.status(name)[0].record.state == "RUNNING"

    def boom(*a, **k):
        raise RuntimeError("the bucket went away")

    # 1. save fails: nothing else happens
    with pytest.raises(MigrateFailed, match="stopped at save.*old keeps running") as e:
        migrate(orch, "old", "local", new_name="new1", save=boom)
    assert running("old") and orch.state.get("new1") is None
    assert [(s.step, s.status) for s in e.value.result.steps] == [("check", "done"), ("save", "failed")]

    # 2. up fails (a provider that is not configured): the old one untouched, the image kept
    with pytest.raises(MigrateFailed, match="stopped at up.*old keeps running.*image old-m2 is kept"):
        migrate(orch, "old", "ssh", new_name="new2", image="old-m2")
    assert running("old") and orch.state.get("new2") is None

    # 3. verify fails (the new one serves another model): the new one is stopped, never left billing
    calls = []

    def verify(o, name):
        calls.append(name)
        return "model-a" if name == "old" else "model-b"

    with pytest.raises(MigrateFailed, match="stopped at verify.*new3 was stopped") as e:
        migrate(orch, "old", "local", new_name="new3", image="old-m3", verify=verify)
    assert running("old") and calls == ["old", "new3"]
    new3 = orch.state.get("new3")
    assert new3.state == "STOPPED" and instance_processes(new3.instance_id) == []
    assert ("undo up", "done") in [(s.step, s.status) for s in e.value.result.steps]

    # 4. the old one cannot be stopped: the new one is up and verified, and the message says what to run
    with pytest.raises(MigrateFailed, match="new4 is up and verified .* `orch down old` stops it"):
        migrate(orch, "old", "local", new_name="new4", image="old-m4")
    assert running("old") and running("new4")
    for name in ("new4", "new3", "old"):
        Orchestrator.down(orch, name, terminate=True)
    assert sorted((r.record.name, r.record.state) for r in orch.status()) == [
        ("new3", "TERMINATED"), ("new4", "TERMINATED"), ("old", "TERMINATED")], "nothing left running or half-made"
