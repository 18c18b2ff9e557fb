"""`orch batch`'s jobs file: every line checked (the message names the line and what to fix), keys
from the canonical request, duplicates run once; and the directory result store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.batch import jobs
from orchestrator.batch.results import DirResults, S3Results, image_names, open_results
from orchestrator.batch.runner import instance_names, job_prefix
from orchestrator.config import Settings
from orchestrator.errors import ConfigError, StorageError


def write(tmp_path, text: str | bytes):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD = '{"prompt": "a cat", "steps": 3}'


@pytest.mark.parametrize("line, expected", [
    ("{not json", "not JSON"),
    ('["a cat"]', "a JSON array, not a JSON object"),
    ('"a cat"', "a JSON string, not a JSON object"),
    ("42", "a number, not a JSON object"),
    ('{"steps": 3}', 'no "prompt"'),
    ('{"prompt": ""}', '"prompt" is empty'),
    ('{"prompt": "   "}', '"prompt" is empty'),
    ('{"prompt": 3}', '"prompt" is a number'),
    ('{"prompt": "x", "batch_size": 0}', '"batch_size" is 0; write a whole number of at least 1'),
    ('{"prompt": "x", "batch_size": 2.5}', '"batch_size" is 2.5'),
    ('{"prompt": "x", "n_iter": -1}', '"n_iter" is -1'),
    ('{"prompt": "x", "n_iter": "2"}', '"n_iter" is "2"'),
    ('{"prompt": "x", "n_iter": true}', '"n_iter" is true'),
    ('{"prompt": "x", "steps": 0}', '"steps" is 0'),
    ('{"prompt": "x", "seed": 1.5}', '"seed" is 1.5'),
    ('{"prompt": "x", "cfg_scale": "high"}', '"cfg_scale" is "high"'),
    ('{"prompt": "x", "cfg_scale": NaN}', "not JSON"),
    ('{"prompt": "x", "init_images": ["..."]}', "img2img field"),
])
def test_a_bad_line_is_named_with_what_to_fix(tmp_path, line, expected):
    path = write(tmp_path, f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(ConfigError) as e:
        jobs.load(path)
    message = str(e.value)
    assert f"{path}:3: " in message and expected in message, message
    assert "nothing was started" in message


def test_every_bad_line_is_counted_and_the_first_named(tmp_path):
    path = write(tmp_path, '{"prompt": "ok"}\n{x\n[1]\n{"prompt": ""}\n')
    message = str(pytest.raises(ConfigError, jobs.load, path).value)
    assert f"{path}:2: not JSON" in message and "(and 2 more bad line(s))" in message


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_file_says_so(tmp_path, text):
    message = str(pytest.raises(ConfigError, jobs.load, write(tmp_path, text)).value)
    assert "has no requests" in message and '{"prompt":' in message


def test_a_missing_or_binary_file_says_so(tmp_path):
    assert "no such file" in str(pytest.raises(ConfigError, jobs.load, tmp_path / "nope.jsonl").value)
    message = str(pytest.raises(ConfigError, jobs.load, write(tmp_path, b'{"prompt": "a"}\n\xff\xfe\n')).value)
    assert ":2: not UTF-8" in message


def test_keys_are_the_canonical_request_and_duplicates_run_once(tmp_path):
    a = {"prompt": "a cat", "steps": 3, "seed": 1}
    same_in_other_order = '{"seed": 1, "steps": 3, "prompt": "a cat"}'
    path = write(tmp_path, "\n".join([json.dumps(a), same_in_other_order, '{"prompt": "a dog"}', '{"prompt": "a dog"}',
                                      json.dumps({**a, "seed": 2})]) + "\n")
    loaded = jobs.load(path)
    assert [j.line for j in loaded.jobs] == [1, 3, 5]
    assert loaded.duplicates == 2 and loaded.random_duplicates == [4]  # line 2 has a fixed seed
    assert loaded.jobs[0].key == jobs.request_key(json.loads(same_in_other_order))
    assert len({j.key for j in loaded.jobs}) == 3
    assert all(len(j.key) == jobs.KEY_HEX and int(j.key, 16) >= 0 for j in loaded.jobs)
    # The key is a hash of the content: another steps, another key; a BOM and CRLF change nothing.
    assert jobs.request_key({**a, "steps": 4}) != loaded.jobs[0].key
    again = jobs.load(write(tmp_path, "\ufeff" + json.dumps(a) + "\r\n"))
    assert again.jobs[0].key == loaded.jobs[0].key
    assert jobs.Job("k", {"prompt": "x", "batch_size": 2, "n_iter": 3}, 1).images == 6


def test_instance_names_come_from_the_job_and_are_valid():
    prefix = job_prefix("ab" * 32, "/tmp/out")
    assert prefix.startswith("batch-") and len(prefix) == len("batch-") + 8
    assert prefix == job_prefix("ab" * 32, "/tmp/out") and prefix != job_prefix("ab" * 32, "/tmp/other")
    assert instance_names(prefix, 3) == [f"{prefix}-1", f"{prefix}-2", f"{prefix}-3"]
    with pytest.raises(ConfigError, match="--name"):
        instance_names("bad name", 1)


def test_output_urls_are_checked_for_form(tmp_path):
    settings = Settings()
    for bad, expected in (("s3://", "is not an S3 bucket name"), ("s3:///x", "is not an S3 bucket name"),
                          ("s3://Bad_Bucket/x", "is not an S3 bucket name"), ("s3://bkt/a//b", "empty, '.' or '..'"),
                          ("s3://bkt/../x", "empty, '.' or '..'"), ("gs://bkt/x", "only a directory or s3://"), ("  ", "empty")):
        assert expected in str(pytest.raises(ConfigError, open_results, bad, settings).value), bad
    s3 = open_results("s3://my-bucket/runs/one/", settings)
    assert isinstance(s3, S3Results) and s3.url == "s3://my-bucket/runs/one" and s3.prefix == "runs/one/"
    assert open_results("s3://my-bucket", settings).prefix == ""
    d = open_results(f"file://{tmp_path}/x", settings)
    assert isinstance(d, DirResults) and d.path == tmp_path / "x"


def test_a_directory_that_cannot_be_written_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "a file, not a directory" in str(pytest.raises(ConfigError, DirResults(afile).check).value)
    assert "cannot write there" in str(pytest.raises(ConfigError, DirResults(afile / "sub").check).value)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "cannot write there" in str(pytest.raises(ConfigError, DirResults(ro).check).value)


def test_directory_results_are_whole_and_mark_done_last(tmp_path):
    store = DirResults(tmp_path / "out")
    store.check()
    assert store.done_keys() == set() and list((tmp_path / "out").iterdir()) == [], "the probe is removed"
    key = "0123456789abcdef"
    paths = store.put(key, [b"png-1", b"png-2"], {"key": key, "info": {"seed": 1}})
    assert [os.path.basename(p) for p in paths] == image_names(key, 2) == [f"{key}-0.png", f"{key}-1.png"]
    assert image_names(key, 1) == [f"{key}.png"]
    assert json.loads((tmp_path / "out" / f"{key}.json").read_text()) == {"key": key, "info": {"seed": 1}}
    assert store.done_keys() == {key}
    # Only the JSON marks a request done: images alone (a run killed between them) do not.
    (tmp_path / "out" / "fedcba9876543210.png").write_bytes(b"x")
    assert store.done_keys() == {key}
    # A killed run's temporary file is never taken for a result, and is cleared once its process is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "out" / f".fedcba9876543210.png.{dead.stdout.strip()}-1.tmp"
    stale.write_bytes(b"half")
    mine = tmp_path / "out" / f".fedcba9876543211.json.{os.getpid()}-1.tmp"
    mine.write_bytes(b"being written")
    assert store.done_keys() == {key}
    assert not stale.exists() and mine.exists()


def test_a_write_that_fails_says_where_and_what_to_do(tmp_path):
    store = DirResults(tmp_path / "out")
    store.check()
    os.rmdir(tmp_path / "out")
    (tmp_path / "out").write_text("")  # the directory replaced under the running job
    with pytest.raises(StorageError, match=r"cannot write .*0123456789abcdef.png.*run again \(what is done is kept\)"):
        store.put("0123456789abcdef", [b"png"], {})


def test_a_rerun_prefers_the_jobs_running_instances_and_stops_the_ones_it_does_not_need():
    from types import SimpleNamespace

    from orchestrator.batch.fleet import plan
    from orchestrator.state import InstanceRecord

    def orch(**states):
        records = [InstanceRecord(name.replace("_", "-"), "local", state, 0.0, 0.0) for name, state in states.items()]
        return SimpleNamespace(state=SimpleNamespace(all=lambda: records))

    # Nothing yet: PREFIX-1..count, new.
    assert plan(orch(), "job", 3, 2) == (["job-1", "job-2"], [])
    # A killed run left job-2 and job-3 running, job-1 stopped: one request left goes to a running one; the other is stopped.
    assert plan(orch(job_1="STOPPED", job_2="RUNNING", job_3="RUNNING"), "job", 3, 1) == (["job-2"], ["job-3"])
    # A stopped instance (its disk ready) is preferred to a new one; a terminated one counts as new.
    assert plan(orch(job_1="TERMINATED", job_2="STOPPED"), "job", 2, 1) == (["job-2"], [])
    # An earlier run with a larger -k: its instance beyond K still bills, and is stopped; other jobs' are not touched.
    assert plan(orch(job_5="RUNNING", job_x="RUNNING", other_1="RUNNING", job_2="STARTING_SERVER"), "job", 2, 2) == \
        (["job-1", "job-2"], ["job-5"])
