"""Images in a store: what a manifest must be, and removing one never takes a blob another uses."""

from __future__ import annotations

import json
import os
import time

import pytest

from orchestrator.errors import ConfigError
from orchestrator.images.manifest import SCHEMA, ImageMeta
from orchestrator.images.store import REMOVE_GRACE_S, ImageStore
from orchestrator.storage import TransferCache, push


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (root / ".orch").mkdir()
    (root / ".orch" / "store.json").write_text('{"version": 1}\n')
    return ImageStore(f"file://{root}/orch-images")


def _image(store: ImageStore, tmp_path, name: str, files: dict[str, bytes]) -> ImageMeta:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    push(src, store.part_url(name, "models"), TransferCache(tmp_path / f"cache-{name}.db"))
    meta = ImageMeta(name=name, parts={"models": {"files": len(files)}})
    store.write(meta)
    return meta


def test_an_image_is_listed_only_once_its_manifest_is_written(store, tmp_path):
    _image(store, tmp_path, "one", {"a.bin": b"a" * 100})
    assert store.names() == ["one"] and store.read("one").parts == {"models": {"files": 1}}
    assert store.check_usable("one").name == "one"


def test_removing_an_image_keeps_blobs_another_image_uses(store, tmp_path):
    _image(store, tmp_path, "one", {"shared.bin": b"s" * 1000, "own.bin": b"o" * 10})
    _image(store, tmp_path, "two", {"shared.bin": b"s" * 1000})
    later = time.time() + 2 * REMOVE_GRACE_S
    removed = store.remove("one", now=later)
    assert removed["blobs_deleted"] == 1 and removed["bytes_freed"] == 10, removed
    assert store.names() == ["two"] and store.missing_blobs("two") == [], "the shared blob stayed"
    removed = store.remove("two", now=later)
    assert removed["blobs_deleted"] == 1 and store.store.list_blobs() == []


def test_a_blob_touched_within_the_grace_period_is_not_deleted(store, tmp_path):
    """A save running at the same time that just found the blob in the store (and touched it) keeps it."""
    _image(store, tmp_path, "one", {"x.bin": b"x" * 50})
    digest = store.store.list_blobs()[0][0]
    path = next(store.loc.root.rglob(digest))
    os.utime(path, (time.time() - 3 * REMOVE_GRACE_S,) * 2)
    store.store.touch_blob(digest)  # what a concurrent push does when it reuses the blob
    removed = store.remove("one", now=time.time() + 10)
    assert removed["blobs_deleted"] == 0 and removed["blobs_waiting"] == 1
    assert store.collect_garbage(now=time.time() + 2 * REMOVE_GRACE_S)["blobs_deleted"] == 1, "a later gc frees it"


def test_a_manifest_from_a_newer_orch_a_damaged_one_and_a_missing_blob_are_clear_errors(store, tmp_path):
    _image(store, tmp_path, "ok", {"m.bin": b"m" * 64})
    newer = ImageMeta(name="newer", schema=SCHEMA + 1)
    store.store.write_manifest(store.prefix("newer", "_image"), {"version": 1, "files": {}, "image": newer.as_json()})
    with pytest.raises(ConfigError, match="made by a newer orch .* upgrade orch"):
        store.check_usable("newer")
    store.store.write_manifest(store.prefix("broken", "_image"), {"version": 1, "files": {}, "image": "garbage"})
    with pytest.raises(ConfigError, match="not an image manifest"):
        store.check_usable("broken")
    for digest, _, _ in store.store.list_blobs():
        store.store.delete_blob(digest)
    with pytest.raises(ConfigError, match="image ok .* is incomplete: the store lacks .*m.bin"):
        store.check_usable("ok")
    with pytest.raises(ConfigError, match="no image 'nope'"):
        store.check_usable("nope")


def test_a_saved_environment_unpacks_elsewhere_and_runs_without_installing_anything(tmp_path):
    import subprocess
    import sys
    import zipfile

    old_home, new_home = tmp_path / "old", tmp_path / "new"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(old_home / "venv")], check=True)
    site = next((old_home / "venv" / "lib").glob("python3.*")) / "site-packages"
    (site / "orch_env_probe.py").write_text("VALUE = 7\n")
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2])}
    packed = json.loads(subprocess.run([sys.executable, "-m", "remote.image", "--home", str(old_home), "pack-env", str(tmp_path / "out")],
                                       capture_output=True, text=True, env=env, check=True).stdout)
    assert packed["packed"] is True
    new_home.mkdir()
    result = json.loads(subprocess.run([sys.executable, "-m", "remote.image", "--home", str(new_home), "unpack-env",
                                        str(tmp_path / "out" / "venv.tar")], capture_output=True, text=True, env=env,
                                       check=True).stdout)
    assert result["restored"] is True and result["python"] == str(new_home / "venv" / "bin" / "python")
    run = subprocess.run([result["python"], "-c", "import orch_env_probe, sys; print(orch_env_probe.VALUE, sys.prefix)"],
                         capture_output=True, text=True)
    assert run.stdout.split() == ["7", str(new_home / "venv")], run.stderr
    assert not zipfile.is_zipfile(tmp_path / "out" / "venv.tar")


def test_on_s3_a_reused_blob_is_marked_by_an_empty_object_and_removal_takes_both(tmp_path, monkeypatch):
    """S3 cannot touch an object in place (and a copy onto itself fails over 5 GiB): the mark is
    an empty object beside the blob, never listed as a blob, and deleted with it."""
    import boto3
    from moto import mock_aws

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bkt")
        images = ImageStore("s3://bkt/orch-images", client_factory=lambda: client)
        src = tmp_path / "src"
        src.mkdir()
        (src / "big.bin").write_bytes(b"b" * 4096)
        push(src, images.part_url("one", "models"), TransferCache(tmp_path / "c.db"), client_factory=lambda: client)
        images.write(ImageMeta(name="one", parts={"models": {"files": 1}}))
        [(digest, size, _)] = images.store.list_blobs()
        images.store.touch_blob(digest)
        assert images.store.list_blobs()[0][:2] == (digest, size), "the mark is not a blob"
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="bkt")["Contents"]}
        assert f".orch/used/{digest}" in keys
        removed = images.remove("one", now=time.time() + 2 * REMOVE_GRACE_S)
        assert removed["blobs_deleted"] == 1
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="bkt").get("Contents", [])}
        assert not any(digest in k for k in keys), keys
