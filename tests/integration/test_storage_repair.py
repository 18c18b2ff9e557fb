"""A damaged bucket can be repaired: `orch sync verify` names the damaged blobs, a push uploads
them again (automatically once they are known damaged, or with --repair), and the pull is
byte-identical afterwards. Against a real S3 endpoint (rclone serve s3) and a directory store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.storage import hash_file
from orchestrator.storage.stores import blob_key, damaged_key

from tests.integration.test_storage import MIB, _random_file


def _corrupt(blob: Path, at: int = 1000) -> None:
    data = bytearray(blob.read_bytes())
    data[at] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.fixture(params=["s3", "dir"])
def store(request, tmp_path):
    """(URL, the folder on disk where its blobs live, delete(key): a blob lost from the store)."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        # Through the S3 API: rclone's directory cache would still list a file deleted behind its back.
        return "s3://bkt/models", s3.root / "bkt", lambda key: s3.client().delete_object(Bucket="bkt", Key=key)
    root = tmp_path / "store"
    (root / ".orch").mkdir(parents=True)
    (root / ".orch" / "store.json").write_text('{"version": 1}\n')  # a store whose root is root: models/ is a prefix
    return str(root / "models"), root, lambda key: (root / key).unlink()


def test_verify_names_the_damage_a_push_repairs_it_and_the_pull_is_identical(store, orch, tmp_path):
    url, root, delete = store
    src = tmp_path / "src"
    big = _random_file(src / "ckpt" / "model.safetensors", 40 * MIB, seed=11)  # several ranges
    small = _random_file(src / "vae.bin", 3 * MIB, seed=12)
    (src / "notes.txt").write_text("hello")
    orch("sync", "push", str(src), url, "--json")
    ok = orch("sync", "verify", url, "--json").json
    assert ok == {**ok, "ok": True, "blobs": 3, "bytes_checked": 43 * MIB + 5, "damaged": []}

    _corrupt(root / blob_key(hash_file(big)), at=33 * MIB)  # in a late range
    delete(blob_key(hash_file(small)))
    r = orch("sync", "verify", url, "--json", check=False)
    assert r.returncode == 1
    report = r.json
    assert report["ok"] is False and report["blobs"] == 3
    damaged = {d["names"][0]: d for d in report["damaged"]}
    assert set(damaged) == {"models/ckpt/model.safetensors", "models/vae.bin"}
    assert damaged["models/ckpt/model.safetensors"]["problem"].startswith("its bytes hash to ")
    assert damaged["models/ckpt/model.safetensors"]["blake3"] == hash_file(big)
    assert damaged["models/vae.bin"]["problem"] == "missing"
    human = orch("sync", "verify", url, check=False)
    assert human.returncode == 1 and "model.safetensors" in human.stdout and "orch sync push" in human.stderr

    # The damage is now known to the store: a plain push uploads exactly those two blobs again.
    fixed = orch("sync", "push", str(src), url, "--json").json
    assert fixed["bytes_transferred"] == 43 * MIB and sorted(fixed["repaired"]) == ["ckpt/model.safetensors", "vae.bin"]
    assert orch("sync", "verify", url, "--json").json["ok"] is True
    assert not (root / damaged_key(hash_file(big))).exists(), "the mark is gone with the damage"
    again = orch("sync", "push", str(src), url, "--json").json
    assert again["bytes_transferred"] == 0 and again["repaired"] == []

    dst = tmp_path / "dst"
    orch("sync", "pull", url, str(dst), "--json")
    for rel in ("ckpt/model.safetensors", "vae.bin", "notes.txt"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()


def test_push_repair_reads_back_without_a_verify_first(store, orch, tmp_path):
    url, root, delete = store
    f = _random_file(tmp_path / "m.safetensors", 9 * MIB, seed=13)
    orch("sync", "push", str(f), url + "/", "--json")
    _corrupt(root / blob_key(hash_file(f)))
    plain = orch("sync", "push", str(f), url + "/", "--json").json
    assert plain["bytes_transferred"] == 0, "without --repair nor a verify, the store's word is taken"
    repaired = orch("sync", "push", str(f), url + "/", "--repair", "--json").json
    assert repaired["bytes_transferred"] == 9 * MIB and repaired["repaired"] == ["m.safetensors"]
    dst = tmp_path / "dst"
    orch("sync", "pull", url, str(dst), "--json")
    assert (dst / "m.safetensors").read_bytes() == f.read_bytes()


def test_a_pull_that_finds_corruption_marks_it_so_the_advised_push_repairs_it(store, orch, tmp_path):
    url, root, delete = store
    f = _random_file(tmp_path / "m.safetensors", 6 * MIB, seed=14)
    orch("sync", "push", str(f), url + "/", "--json")
    _corrupt(root / blob_key(hash_file(f)))
    r = orch("sync", "pull", url, str(tmp_path / "dst"), "--json", check=False)
    assert r.returncode == 1 and "corrupt" in r.json["error"] and "orch sync push" in r.json["error"]
    assert json.loads((root / damaged_key(hash_file(f))).read_text())["problem"]
    # The advice in that message, followed literally: push the file again.
    assert orch("sync", "push", str(f), url + "/", "--json").json["bytes_transferred"] == 6 * MIB
    orch("sync", "pull", url, str(tmp_path / "dst"), "--json")
    assert (tmp_path / "dst" / "m.safetensors").read_bytes() == f.read_bytes()


def test_verify_of_one_file_and_of_nothing(s3, orch, tmp_path):
    f = _random_file(tmp_path / "one.bin", 2 * MIB, seed=15)
    orch("sync", "push", str(f), "s3://bkt/p/", "--json")
    one = orch("sync", "verify", "s3://bkt/p/one.bin", "--json").json
    assert one["ok"] and one["blobs"] == 1 and one["bytes_checked"] == 2 * MIB
    r = orch("sync", "verify", "s3://bkt/nothing-here", "--json", check=False)
    assert r.returncode == 1 and "orch models" in r.json["error"]


@pytest.fixture
def moto_s3(free_port):
    """moto's S3 in server mode on 127.0.0.1 (rclone's serve s3 has no UploadPartCopy)."""
    from moto.server import ThreadedMotoServer

    from orchestrator.storage import make_s3_client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port)
    server.start()
    endpoint = f"http://127.0.0.1:{free_port}"
    factory = lambda: make_s3_client(endpoint=endpoint, credentials={"access_key": "testing", "secret_key": "testing"})  # noqa: E731
    factory().create_bucket(Bucket="bkt")
    yield factory
    server.stop()


def test_a_staged_upload_over_the_copy_limit_is_copied_in_parts(moto_s3, tmp_path, monkeypatch):
    """The slow-disk push (hash while uploading, then a server-side copy to the blob key) above
    the single-copy limit: a multipart copy (here with the limit lowered to 5 MiB)."""
    from orchestrator.storage import TransferCache, stores
    from orchestrator.storage.sync import push

    monkeypatch.setattr(stores, "COPY_PART", 5 * MIB)
    monkeypatch.setenv("ORCH_SYNC_PREHASH", "never")
    monkeypatch.setenv("ORCH_SYNC_PART_SIZE", str(5 * MIB))
    f = _random_file(tmp_path / "big.bin", 23 * MIB, seed=16)
    result = push(f, "s3://bkt/staged/", TransferCache(tmp_path / "t.db"), client_factory=moto_s3)
    assert result.bytes_transferred == 23 * MIB
    client = moto_s3()
    assert client.get_object(Bucket="bkt", Key=blob_key(hash_file(f)))["Body"].read() == f.read_bytes()
    assert not client.list_objects_v2(Bucket="bkt", Prefix=".orch/uploads/").get("Contents"), "the staging key is gone"


def test_a_store_without_part_copies_says_what_to_do(s3, tmp_path, monkeypatch):
    from orchestrator.storage import StorageError, TransferCache, stores
    from orchestrator.storage.sync import push

    monkeypatch.setattr(stores, "COPY_PART", 5 * MIB)
    monkeypatch.setenv("ORCH_SYNC_PREHASH", "never")
    monkeypatch.setenv("ORCH_SYNC_PART_SIZE", str(5 * MIB))
    f = _random_file(tmp_path / "big.bin", 12 * MIB, seed=17)
    with pytest.raises(StorageError, match="ORCH_SYNC_PREHASH=always"):
        push(f, "s3://bkt/staged/", TransferCache(tmp_path / "t.db"), client_factory=s3.client)
    monkeypatch.setenv("ORCH_SYNC_PREHASH", "always")
    assert push(f, "s3://bkt/staged/", TransferCache(tmp_path / "t.db"), client_factory=s3.client).files == 1
