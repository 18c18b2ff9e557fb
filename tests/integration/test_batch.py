"""`orch batch` through the real CLI on the embedded local provider: two instances (bt-1, bt-2)
shared by the module (created once, stopped after each job and started again by the next), the
demo model, results to a directory and to a real S3 endpoint (rclone serve s3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from PIL import Image

from orchestrator.providers.local import instance_processes
from tests.conftest import OrchResult, _stop_everything

pytestmark = pytest.mark.slow

PRICE = 36.0  # USD/h: a cent a second, so the job's cost is visible
RESUME = 14  # requests of the resume test: enough that a job killed part way has work left for both instances


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    home = root / "orch-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORCH_CONFIG"}
    env["ORCH_HOME"] = str(home)

    def argv(*args: str) -> list[str]:
        return [sys.executable, "-m", "orchestrator", *args]

    def orch(*args: str, timeout: float = 400, extra_env: dict | None = None) -> OrchResult:
        return OrchResult(subprocess.run(argv(*args), capture_output=True, text=True, timeout=timeout, cwd=root,
                                         env={**env, **(extra_env or {})}))

    def popen(*args: str) -> subprocess.Popen:
        return subprocess.Popen(argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env)

    yield SimpleNamespace(root=root, home=home, orch=orch, popen=popen)
    _stop_everything(home)


def request(tag: str, i: int, **more) -> dict:
    return {"prompt": f"a lighthouse, {tag} {i}", "steps": 2, "width": 64, "height": 64, "seed": 1000 + i, **more}


def write_jobs(path: Path, requests: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in requests) + "".join(line + "\n" for line in extra_lines))
    return path


def keys_of(path: Path) -> dict[str, dict]:
    from orchestrator.batch.jobs import request_key

    return {request_key(json.loads(line)): json.loads(line) for line in path.read_text().splitlines() if line.strip()}


def statuses(box) -> dict[str, dict]:
    out = box.orch("status", "--json")
    assert out.returncode == 0, out.stderr
    return {i["name"]: i for i in out.json["instances"]}


def assert_all_stopped(box, names=("bt-1", "bt-2")) -> None:
    found = statuses(box)
    for name in names:
        assert found[name]["status"] == "STOPPED", (name, found[name])
        assert instance_processes(found[name]["instance_id"]) == [], f"{name} left processes running"
    assert [p for p in orch_processes(box) if "batch" in p.cmdline()] == [], "no `orch batch` process is left"


def orch_processes(box) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("ORCH_HOME") == str(box.home) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"orch batch ended ({proc.returncode}) before {what}:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.2)


def answered_by(out: Path, name: str, besides: set[str] = frozenset()) -> bool:
    """A result from instance `name` is in out (leaving out the files named in besides)."""
    for p in out.glob("*.json") if out.exists() else []:
        if p.name in besides:
            continue
        try:
            if json.loads(p.read_text())["instance"] == name:
                return True
        except (ValueError, OSError):
            continue
    return False


def done_files(out: Path) -> dict[str, int]:
    """Every result file with its mtime (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()} if out.exists() else {}


def test_bad_input_is_refused_naming_the_line_and_nothing_is_created(orch, orch_home, tmp_path):
    bad = tmp_path / "jobs.jsonl"
    bad.write_text('{"prompt": "a cat", "steps": 2}\n{"prompt": "a dog", "batch_size": 0}\n')
    r = orch("batch", str(bad), "-k", "2", "-o", str(tmp_path / "out"), check=False)
    assert r.returncode == 1
    assert f"{bad}:2: " in r.stderr and '"batch_size" is 0; write a whole number of at least 1' in r.stderr
    assert "Traceback" not in r.stderr
    as_json = orch("batch", str(bad), "-o", str(tmp_path / "out"), "--json", check=False)
    assert as_json.returncode == 1 and f"{bad}:2: " in as_json.json["error"]
    bad.write_text('{"prompt": "a cat"}\n[1, 2]\n')
    assert "a JSON array, not a JSON object" in orch("batch", str(bad), check=False).stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = orch("batch", str(empty), check=False)
    assert r.returncode == 1 and "has no requests" in r.stderr
    good = write_jobs(tmp_path / "good.jsonl", [request("x", 1)])
    afile = tmp_path / "afile"
    afile.write_text("")
    r = orch("batch", str(good), "-o", str(afile), check=False)
    assert r.returncode == 1 and "a file, not a directory" in r.stderr
    r = orch("batch", str(good), "-o", "s3://Not_A_Bucket/x", check=False)
    assert r.returncode == 1 and "is not an S3 bucket name" in r.stderr
    # Nothing was created, and no output directory either.
    assert orch("status", "--json").json["instances"] == []
    assert not (orch_home / "local").exists() and not (tmp_path / "out").exists()


def test_a_job_over_two_instances_completes_on_both_and_stops_both(box):
    good = [request("first", i) for i in range(7)] + [request("first", 7, batch_size=2)]
    refused = request("first", 99, steps=5000)
    jobs = write_jobs(box.root / "first.jsonl", [*good, refused], extra_lines=(json.dumps(good[0]),))
    out = box.root / "out-first"
    t0 = time.monotonic()
    r = box.orch("batch", str(jobs), "-k", "2", "--name", "bt", "--price-per-hour", str(PRICE), "-o", str(out), "--json")
    wall = time.monotonic() - t0
    assert r.returncode == 1, r.stderr  # one request was refused
    data = r.json
    assert (data["done"], data["failed"], data["skipped"], data["total"], data["duplicates"]) == (8, 1, 0, 9, 1), data
    assert data["images"] == 9 and data["output"] == str(out)
    (failure,) = data["failures"]
    assert failure["line"] == 9 and "(422)" in failure["error"] and "steps" in failure["error"]
    by_name = {i["name"]: i for i in data["instances"]}
    assert sorted(by_name) == ["bt-1", "bt-2"]
    for name, inst in by_name.items():
        assert inst["status"] == "STOPPED" and inst["stop_error"] is None and inst["start_error"] is None
        assert inst["requests"] >= 1, f"{name} took no request: {data['instances']}"
        assert inst["gpus"] == 1 and inst["price_per_hour"] == PRICE
        # Billing from create to the verified stop: more than the few seconds of a start, less than the whole command.
        assert 5 * PRICE / 3600 < inst["cost_usd"] < wall * PRICE / 3600, inst
    assert sum(i["requests"] for i in data["instances"]) == 9
    assert data["cost_usd"] == pytest.approx(sum(i["cost_usd"] for i in data["instances"]), abs=1e-5)
    assert data["images_per_s"] > 0 and 0 < data["generation_seconds"] < data["seconds"]
    # What the job cost is what `orch status` counts for these instances (they did nothing before it).
    for name, row in statuses(box).items():
        assert row["cost"] == pytest.approx(by_name[name]["cost_usd"], abs=2e-4)

    keys = keys_of(jobs)
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".")], "no temporary file is left"
    for key, req in keys.items():
        if req == refused:
            assert f"{key}.json" not in names and f"{key}.png" not in names
            continue
        record = json.loads((out / f"{key}.json").read_text())
        assert record["request"] == req and record["key"] == key and record["instance"] in by_name
        count = req.get("batch_size", 1)
        pngs = [f"{key}.png"] if count == 1 else [f"{key}-{n}.png" for n in range(count)]
        assert record["info"]["all_seeds"] == [req["seed"] + n for n in range(count)]
        for n, png in enumerate(pngs):
            img = Image.open(out / png)
            img.load()
            assert img.format == "PNG" and img.size == (64, 64)
            params = img.info["parameters"].split("\n")
            assert params[0] == req["prompt"]
            assert f"Seed: {req['seed'] + n}," in params[-1] and "Steps: 2," in params[-1] and "Size: 64x64" in params[-1]
            assert img.info["parameters"] == record["info"]["infotexts"][n]
    assert len(names) == 2 * 7 + 3  # seven requests: png + json; the batch of two: two pngs + json
    assert_all_stopped(box)


def test_a_killed_job_resumes_skipping_what_is_done(box):
    jobs = write_jobs(box.root / "resume.jsonl", [request("resume", i) for i in range(RESUME)])
    out = box.root / "out-resume"
    args = ("batch", str(jobs), "-k", "2", "--name", "bt", "-o", str(out), "--json")

    def results() -> int:
        return sum(1 for n in os.listdir(out) if n.endswith(".json")) if out.exists() else 0

    # 1. SIGTERM part way: the job stops handing out work and stops both instances before it exits.
    proc = box.popen(*args)
    wait_for(lambda: results() >= 2, 300, "two results", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and "interrupted" in stderr
    assert {i["status"] for i in summary["instances"]} == {"STOPPED"}
    assert_all_stopped(box)
    first = done_files(out)
    done_first = {n for n in first if n.endswith(".json")}
    assert 2 <= len(done_first) < RESUME and summary["done"] == len(done_first)

    # 2. SIGKILL once both serve (no chance to clean up): the instances keep running (their agents guard them).
    proc = box.popen(*args)
    wait_for(lambda: answered_by(out, "bt-1", done_first) and answered_by(out, "bt-2", done_first), 300,
             "a result from each instance", proc)
    proc.kill()
    proc.communicate(timeout=30)
    running = statuses(box)
    assert {running["bt-1"]["status"], running["bt-2"]["status"]} == {"RUNNING"}
    second = done_files(out)
    assert not [n for n in second if n.startswith(".") and not n.endswith(".tmp")]

    # 3. The re-run attaches, skips everything done (nothing regenerated), does the rest, stops both.
    r = box.orch(*args)
    assert r.returncode == 0, r.stderr
    data = r.json
    done_second = {n for n in second if n.endswith(".json")}
    assert data["skipped"] == len(done_second) and data["done"] == RESUME - len(done_second) and data["failed"] == 0
    assert sum(i["requests"] for i in data["instances"]) == data["done"], "no request sent again"
    # Both were running: the re-run used them (or stopped the one the work left did not need).
    assert {i["name"] for i in data["instances"]} == {"bt-1", "bt-2"}
    assert {i["status"] for i in data["instances"]} == {"STOPPED"}
    final = done_files(out)
    assert {n for n in final if n.endswith(".json")} == {f"{k}.json" for k in keys_of(jobs)}
    for name, mtime in second.items():
        if not name.startswith("."):
            assert final[name] == mtime, f"{name} was written again"
    assert not [n for n in final if n.startswith(".")], "the killed run's temporary files are cleared"
    assert_all_stopped(box)

    # 4. Once more: everything is there; no instance is started.
    again = box.orch(*args).json
    assert (again["done"], again["skipped"], again["instances"]) == (0, RESUME, [])


def test_an_instance_that_dies_mid_job_hands_its_requests_to_the_other(box):
    # Enough left after the kill that bt-1 is still busy when the dispatcher gives bt-2 up (with 24,
    # on a fast machine bt-1 finished the rest while bt-2's /healthz was read, and the job ended first).
    total = 48
    jobs = write_jobs(box.root / "death.jsonl", [request("death", i) for i in range(total)])
    out = box.root / "out-death"
    proc = box.popen("batch", str(jobs), "-k", "2", "--name", "bt", "-o", str(out), "--json")
    wait_for(lambda: answered_by(out, "bt-2"), 300, "a result from bt-2", proc)
    # More work is left than both instances hold in flight: bt-2 takes more, and finds its server dead.
    assert len(list(out.glob("*.json"))) < total - 6, "the job went too fast for this test: give it more requests"
    instance_id = statuses(box)["bt-2"]["instance_id"]
    servers = [p for p in instance_processes(instance_id) if "remote.server" in " ".join(p.cmdline())]
    assert servers, "bt-2's image server is running"
    for p in servers:
        p.kill()
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr
    data = json.loads(stdout)
    assert data["done"] == total and data["failed"] == 0
    by_name = {i["name"]: i for i in data["instances"]}
    assert by_name["bt-2"]["given_up"] and "bt-2: given up" in stderr, stderr
    assert data["retries"] >= 1 and "bt-2 did not answer" in stderr and "back in the queue" in stderr
    assert "Secsh channel" not in stderr, "paramiko's own lines are not shown"
    assert by_name["bt-1"]["given_up"] is None and by_name["bt-1"]["requests"] >= 1
    assert {f"{k}.json" for k in keys_of(jobs)} <= set(os.listdir(out))
    assert_all_stopped(box)


def test_results_go_to_s3_and_a_rerun_skips_them_there(box, s3):
    jobs = write_jobs(box.root / "s3.jsonl", [request("s3", i) for i in range(3)])
    env = s3.env()
    url = "s3://bkt/runs/first"
    r = box.orch("batch", str(jobs), "-k", "1", "--name", "bt", "-o", url, "--json", extra_env=env)
    assert r.returncode == 0, r.stderr
    data = r.json
    assert (data["done"], data["skipped"], data["output"]) == (3, 0, url)
    client = s3.client()
    listed = {o["Key"] for o in client.list_objects_v2(Bucket="bkt", Prefix="runs/first/").get("Contents", [])}
    keys = keys_of(jobs)
    assert listed == {f"runs/first/{k}.{ext}" for k in keys for ext in ("png", "json")}, "no probe or temporary object left"
    import io

    for key, req in keys.items():
        body = client.get_object(Bucket="bkt", Key=f"runs/first/{key}.png")["Body"].read()
        img = Image.open(io.BytesIO(body))
        assert img.info["parameters"].split("\n")[0] == req["prompt"]
        record = json.loads(client.get_object(Bucket="bkt", Key=f"runs/first/{key}.json")["Body"].read())
        assert record["request"] == req
    assert_all_stopped(box, names=("bt-1",))
    again = box.orch("batch", str(jobs), "-k", "1", "--name", "bt", "-o", url, "--json", extra_env=env).json
    assert (again["done"], again["skipped"], again["instances"]) == (0, 3, [])
    # A bucket that is not there is named before anything is created.
    r = box.orch("batch", str(jobs), "--name", "nob", "-o", "s3://no-such-bucket/x", extra_env=env)
    assert r.returncode == 1 and "-o s3://no-such-bucket/x" in r.stderr
    assert "nob-1" not in statuses(box)


def test_a_full_disk_fails_the_write_and_leaves_no_file_under_a_real_name(tmp_path):
    from orchestrator.batch.results import DirResults
    from orchestrator.errors import StorageError
    from tests.helpers.small_disk import fill, mount_tmpfs, unmount, why_not_mountable

    reason = why_not_mountable()
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 1)
    try:
        store = DirResults(disk / "out")
        store.check()
        fill(disk)
        with pytest.raises(StorageError, match="cannot write .*0123456789abcdef"):
            store.put("0123456789abcdef", [os.urandom(256 * 1024)], {"key": "0123456789abcdef"})
        assert os.listdir(disk / "out") == [] and store.done_keys() == set()
    finally:
        unmount(disk)


def test_a_second_run_of_a_job_that_is_running_is_refused_and_touches_nothing(box):
    jobs = write_jobs(box.root / "twice.jsonl", [request("twice", i) for i in range(4)])
    out = box.root / "out-twice"
    args = ("batch", str(jobs), "-k", "1", "--name", "bt", "-o", str(out), "--json")
    first = box.popen(*args)
    wait_for(lambda: statuses(box).get("bt-1", {}).get("status") not in (None, "STOPPED"), 120, "bt-1 starting", first)
    second = box.orch(*args)
    assert second.returncode == 1 and "another `orch batch` is running this job's instances bt-1..1" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert second.json["error"].startswith("another `orch batch`")
    stdout, stderr = first.communicate(timeout=400)
    assert first.returncode == 0, stderr
    assert json.loads(stdout)["done"] == 4, "the first run went on undisturbed"
    assert_all_stopped(box, names=("bt-1",))
    # The lock went with the run: the job can run again (everything is done: nothing starts).
    again = box.orch(*args)
    assert again.returncode == 0 and (again.json["done"], again.json["skipped"]) == (0, 4)
