"""`orch up --model`: the instance pulls its models itself from the bucket, by hash."""

from __future__ import annotations


import httpx
import pytest
from PIL import Image

from remote.server.demo_model import ensure_demo_model

from tests.helpers.s3server import SECRET_KEY

pytestmark = pytest.mark.slow


def test_up_pulls_the_model_on_the_instance_and_never_twice(s3, orch, orch_home, tmp_path):
    # A diffusers folder, as a user would keep one in their bucket.
    model = ensure_demo_model(tmp_path / "laptop-models")
    target = tmp_path / "laptop-models" / "my-model"
    model.rename(target)
    total = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    orch("sync", "push", str(target), "s3://bkt/models/my-model", "--json")

    up = orch("up", "m", "--model", "s3://bkt/models/my-model", "--detach", "--json")
    data = up.json
    disk = orch_home / "local" / data["instance_id"] / "disk"
    pulled = disk / ".orch" / "models" / "my-model"
    assert (pulled / "model_index.json").exists()
    assert f"{total:,} bytes pulled" in up.stderr

    headers = {"Authorization": f"Bearer {data['token']}"}
    names = [m["model_name"] for m in httpx.get(f"{data['url']}/sdapi/v1/sd-models", headers=headers).json()]
    assert "my-model" in names
    gen = orch("gen", "a boat", "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "o"), "--json").json
    assert "Model: my-model" in Image.open(gen["images"][0]).info["parameters"]

    # Down and up again: the instance already holds every byte.
    orch("down", "m")
    again = orch("up", "m", "--model", "s3://bkt/models/my-model", "--detach", "--json")
    assert f"0 bytes pulled, {total:,} already there" in again.stderr

    # The instance's processes see only what orch hands them (the key travels over SSH stdin to
    # the pull, never in an environment): the laptop's AWS_SECRET_ACCESS_KEY reaches none of them.
    from orchestrator.providers.local import instance_processes

    procs = instance_processes(data["instance_id"])
    assert len(procs) >= 3, "agent, supervisor and server at least"
    for proc in procs:
        env = proc.environ()
        assert "AWS_SECRET_ACCESS_KEY" not in env and SECRET_KEY not in " ".join([*env.values(), *proc.cmdline()]), proc.cmdline()

    # The secret never lands in a log, on the laptop or on the instance.
    for path in list(orch_home.rglob("*.log")) + list(disk.rglob("*.log")) + [orch_home / "state.db"]:
        assert SECRET_KEY not in path.read_text(errors="replace"), path
    orch("down", "m", "--terminate")


def test_a_model_that_is_not_in_the_bucket_fails_up_and_stops_the_instance(s3, orch, orch_home):
    r = orch("up", "bad", "--model", "s3://bkt/models/nope", "--detach", "--json", check=False)
    assert r.returncode == 1 and "nothing at s3://bkt/models/nope" in r.json["error"]
    status = orch("status", "bad", "--json").json
    assert status["status"] in ("FAILED", "STOPPED")
    from orchestrator.providers.local import instance_processes

    assert instance_processes(status["instance_id"]) == []
