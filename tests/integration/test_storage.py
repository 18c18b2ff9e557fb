"""Storage sync against a real S3 endpoint on 127.0.0.1 (rclone serve s3) and a directory store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.storage import hash_file
from orchestrator.storage.stores import blob_key

from tests.helpers.s3server import SECRET_KEY

MIB = 1024 * 1024


def _random_file(path: Path, size: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(rng.randbytes(n))
            left -= n
    return path


def test_skips_by_content_and_pull_is_identical(s3, orch, tmp_path):
    src = tmp_path / "src"
    _random_file(src / "ckpt" / "model.safetensors", 12 * MIB, seed=1)
    _random_file(src / "lora" / "style.safetensors", 3 * MIB, seed=2)
    (src / "notes.txt").write_text("hello")
    total = 12 * MIB + 3 * MIB + 5

    first = orch("sync", "push", str(src), "s3://bkt/models", "--json").json
    assert first == {**first, "files": 3, "bytes_transferred": total, "bytes_skipped": 0}

    again = orch("sync", "push", str(src), "s3://bkt/models", "--json").json
    assert again["bytes_transferred"] == 0 and again["bytes_skipped"] == total

    os.utime(src / "ckpt" / "model.safetensors")  # touched: same bytes, new mtime
    touched = orch("sync", "push", str(src), "s3://bkt/models", "--json").json
    assert touched["bytes_transferred"] == 0

    # The same checkpoint under another name and path is never uploaded twice.
    shutil.copy(src / "ckpt" / "model.safetensors", tmp_path / "renamed.safetensors")
    renamed = orch("sync", "push", str(tmp_path / "renamed.safetensors"), "s3://bkt/elsewhere/x.safetensors", "--json").json
    assert renamed["bytes_transferred"] == 0 and renamed["bytes_skipped"] == 12 * MIB

    dst = tmp_path / "dst"
    pulled = orch("sync", "pull", "s3://bkt/models", str(dst), "--json").json
    assert pulled["bytes_transferred"] == total
    for rel in ("ckpt/model.safetensors", "lora/style.safetensors", "notes.txt"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert not list(dst.rglob("*.orch-part*")), "no partial files left behind"
    assert orch("sync", "pull", "s3://bkt/models", str(dst), "--json").json["bytes_transferred"] == 0

    # A single file, into a directory.
    one = orch("sync", "pull", "s3://bkt/elsewhere/x.safetensors", str(tmp_path / "one") + "/", "--json").json
    assert one["files"] == 1 and (tmp_path / "one" / "x.safetensors").read_bytes() == (src / "ckpt" / "model.safetensors").read_bytes()

    listed = orch("models", "s3://bkt", "--json").json["models"]
    assert {m["prefix"]: m["files"] for m in listed} == {"models": 3, "elsewhere": 1}


def test_a_fresh_laptop_uploads_nothing_the_bucket_has(s3, orch, tmp_path, monkeypatch):
    f = _random_file(tmp_path / "a.safetensors", 20 * MIB, seed=3)
    orch("sync", "push", str(f), "s3://bkt/m/", "--json")
    # Another ORCH_HOME: no hash cache; the bucket already holds a blob of this size, so orch hashes first.
    other_home = tmp_path / "other-home"
    out = subprocess.run([sys.executable, "-m", "orchestrator", "sync", "push", str(f), "s3://bkt/n/", "--json"],
                         capture_output=True, text=True, env={**os.environ, "ORCH_HOME": str(other_home)}, check=True)
    assert json.loads(out.stdout)["bytes_transferred"] == 0


def test_a_third_party_client_reads_the_blob(s3, orch, tmp_path):
    f = _random_file(tmp_path / "m.bin", 7 * MIB, seed=4)
    orch("sync", "push", str(f), "s3://bkt/p/", "--json")
    key = blob_key(hash_file(f))
    aws = shutil.which("aws")
    assert aws, "aws-cli is installed by the dev extra"
    got = tmp_path / "via-aws"
    subprocess.run([aws, "s3", "cp", f"s3://bkt/{key}", str(got), "--endpoint-url", s3.endpoint], check=True,
                   capture_output=True, env={**os.environ})
    assert got.read_bytes() == f.read_bytes()


def _run_until(args: list[str], env: dict, done) -> None:
    """Start `orch ARGS`, SIGKILL it once done() is true (or fail if it finished first)."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if done():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("never reached the point to kill it")


@pytest.mark.parametrize("prehash", ["auto", "never"])  # never: the single read pass that hashes while uploading
def test_kill_during_push_then_rerun_resumes(s3, orch, orch_home, tmp_path, prehash):
    size = 120 * MIB
    f = _random_file(tmp_path / "big.safetensors", size, seed=5)
    env = {**os.environ, "ORCH_HOME": str(orch_home), "ORCH_SYNC_PART_SIZE": str(5 * MIB), "ORCH_SYNC_PREHASH": prehash}
    client = s3.client()

    def uploads() -> list[dict]:
        try:
            return client.list_multipart_uploads(Bucket="bkt").get("Uploads", [])
        except client.exceptions.NoSuchUpload:  # rclone's answer when there is none
            return []

    def some_parts_uploaded() -> bool:
        for up in uploads():
            try:
                if len(client.list_parts(Bucket="bkt", Key=up["Key"], UploadId=up["UploadId"]).get("Parts", [])) >= 4:
                    return True
            except client.exceptions.NoSuchUpload:
                continue
        return False

    _run_until(["sync", "push", str(f), "s3://bkt/big/"], env, some_parts_uploaded)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "sync", "push", str(f), "s3://bkt/big/", "--json"],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout)
    assert 0 < result["bytes_transferred"] < size, result
    assert result["bytes_transferred"] + result["bytes_skipped"] == size
    digest = hash_file(f)
    body = client.get_object(Bucket="bkt", Key=blob_key(digest))["Body"].read()
    assert len(body) == size and body == f.read_bytes()
    assert uploads() == [], "no multipart upload left open"


def test_kill_during_pull_then_rerun_resumes(s3, orch, orch_home, tmp_path):
    size = 120 * MIB
    f = _random_file(tmp_path / "big.safetensors", size, seed=6)
    orch("sync", "push", str(f), "s3://bkt/big/", "--json")
    dst = tmp_path / "dst"
    note = dst / ".big.safetensors.orch-part.json"
    env = {**os.environ, "ORCH_HOME": str(orch_home), "ORCH_SYNC_PART_SIZE": str(5 * MIB)}

    def some_chunks_done() -> bool:
        try:
            return len(json.loads(note.read_text())["done"]) >= 4
        except (OSError, ValueError, KeyError):
            return False

    _run_until(["sync", "pull", "s3://bkt/big", str(dst)], env, some_chunks_done)
    assert not (dst / "big.safetensors").exists(), "nothing half-written in place of the file"
    out = subprocess.run([sys.executable, "-m", "orchestrator", "sync", "pull", "s3://bkt/big", str(dst), "--json"],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout)
    assert 0 < result["bytes_transferred"] < size, result
    assert (dst / "big.safetensors").read_bytes() == f.read_bytes()
    assert not note.exists() and not (dst / ".big.safetensors.orch-part").exists()


def test_a_corrupt_blob_is_detected_and_never_installed(s3, orch, tmp_path):
    f = _random_file(tmp_path / "m.safetensors", 6 * MIB, seed=7)
    orch("sync", "push", str(f), "s3://bkt/c/", "--json")
    blob = s3.root / "bkt" / blob_key(hash_file(f))
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.write_bytes(bytes(data))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "m.safetensors").write_bytes(b"the user's old good file")
    r = orch("sync", "pull", "s3://bkt/c", str(dst), "--json", check=False)
    assert r.returncode == 1 and "corrupt" in r.json["error"]
    assert (dst / "m.safetensors").read_bytes() == b"the user's old good file"
    assert not list(dst.glob(".*orch-part*"))


def test_clear_errors_for_credentials_bucket_and_source(s3, orch, tmp_path, monkeypatch):
    f = _random_file(tmp_path / "x.bin", 1000)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    r = orch("sync", "push", str(f), "s3://bkt/x/", "--json", check=False)
    assert r.returncode == 1 and "refused the credentials" in r.json["error"]
    assert "wrong-secret" not in r.stdout + r.stderr
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    r = orch("sync", "push", str(f), "s3://no-such-bucket/x/", "--json", check=False)
    assert r.returncode == 1 and "no-such-bucket" in r.json["error"]
    r = orch("sync", "push", str(tmp_path / "missing"), "s3://bkt/x/", "--json", check=False)
    assert r.returncode == 1 and "does not exist" in r.json["error"]
    r = orch("sync", "pull", "s3://bkt/nothing-here", str(tmp_path / "d"), "--json", check=False)
    assert r.returncode == 1 and "orch models" in r.json["error"]


def test_directory_store_roundtrip_and_dedup(orch, tmp_path):
    store = tmp_path / "store"
    src = tmp_path / "src"
    _random_file(src / "a.bin", 3 * MIB, seed=8)
    shutil.copy(src / "a.bin", src / "b.bin")
    first = orch("sync", "push", str(src), str(store), "--json").json
    assert first["files"] == 2
    assert len(list((store / ".orch" / "blobs").rglob("*"))) == 2, "one blob (in its fan-out folder) for two names"
    later = orch("sync", "push", str(src / "a.bin"), f"file://{store}/other/", "--json").json
    assert later["bytes_transferred"] == 0
    dst = tmp_path / "dst"
    orch("sync", "pull", f"file://{store}", str(dst), "--json")
    assert (dst / "a.bin").read_bytes() == (src / "a.bin").read_bytes() == (dst / "b.bin").read_bytes()


def test_a_pull_reads_without_a_botocore_client_and_odd_names_round_trip(s3, orch, tmp_path):
    """With keys and an endpoint in the environment, a pull's reads go through s3light, signed
    by botocore's signer (no botocore client is built); names with spaces, unicode and '+'
    survive the signing."""
    src = tmp_path / "src"
    _random_file(src / "a dir" / "modèle + v2.safetensors", 17 * MIB, seed=20)
    (src / "notes 100%.txt").write_text("odd")
    orch("sync", "push", str(src), "s3://bkt/odd prefix/x", "--json")
    dst = tmp_path / "dst"
    code = ("import sys, json; from pathlib import Path; from orchestrator.storage import TransferCache, pull; "
            "r = pull('s3://bkt/odd prefix/x', sys.argv[1], TransferCache(Path(sys.argv[2]))); "
            "print(json.dumps({'files': r.files, 'client': 'botocore.client' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code, str(dst), str(tmp_path / "t.db")], capture_output=True, text=True,
                         env={**os.environ}, check=True)
    assert json.loads(out.stdout) == {"files": 2, "client": False}
    for rel in ("a dir/modèle + v2.safetensors", "notes 100%.txt"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
