"""`orch batch -k 2` on AWS (tests/simulators/aws.py): two instances of one VPC serve as one Ray cluster.

The first instance up becomes the cluster's head (its server restarted as a Ray head on its private
address), the second joins it (the provider's cluster security group, the head's Ray token over SSH
stdin, a Ray worker node instead of its own server), and the laptop hands all the work to the head's
URL. The simulator's instances are real local hosts whose private addresses are their own loopback
addresses, so Ray really spans two hosts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.simulators.aws import AwsSimulator

pytestmark = pytest.mark.slow
N = 64


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with AwsSimulator(tmp_path_factory.mktemp("aws-cluster-hosts")) as simulator:
        yield simulator


@pytest.fixture
def aws_home(sim, orch_home, monkeypatch):
    for k, v in sim.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    (orch_home / "orch.yaml").write_text("provider: aws\naws:\n  regions: [us-east-1]\n  ssh_cidr: 127.0.0.0/8\n  python: python3\n")
    return orch_home


def activity_requests(home: Path) -> int:
    """Requests the replicas of an instance's home have served (their activity files, which its agent reads)."""
    total = 0
    for f in home.glob("activity-*.json"):
        try:
            total += int(json.loads(f.read_text()).get("requests", 0))
        except (ValueError, OSError):
            continue
    return total


def test_two_instances_of_one_vpc_serve_as_one_cluster_and_both_stop(sim, aws_home, orch, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    # Enough work that the second instance joins before the first has done it all: the head restarts
    # as a Ray head, then the other joins (about 45 s in all here), and the head alone needs about 90 s.
    jobs.write_text("".join(json.dumps({"prompt": f"a harbour at dawn, {i}", "steps": 150, "width": 64, "height": 64,
                                        "seed": 300 + i}) + "\n" for i in range(N)))
    out = tmp_path / "out"
    run = orch("batch", str(jobs), "-k", "2", "--name", "cl", "--provider", "aws", "--gpu", "L4", "--region", "us-east-1",
               "-o", str(out), "--json", timeout=1200, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    result = run.json
    assert result["done"] == N and not result["failures"], result
    assert len(list(out.glob("*.png"))) == N
    instances = {i["name"]: i for i in result["instances"]}
    assert set(instances) == {"cl-1", "cl-2"}
    assert all(i["status"] == "STOPPED" for i in instances.values()), instances

    # One instance led, the other joined: every answer came through the head's URL ...
    served_by = {json.loads(p.read_text())["instance"] for p in out.glob("*.json")}
    assert len(served_by) == 1, served_by
    (head,) = served_by
    worker = ({"cl-1", "cl-2"} - {head}).pop()
    assert f"{worker}: joined {head}'s cluster" in run.stderr, run.stderr[-3000:]
    # ... and the joined instance's GPU did part of the work, in its own home, where its own agent looks.
    worker_home = sim.host_dir(instances[worker]["instance_id"]) / "disk" / ".orch"
    head_home = sim.host_dir(instances[head]["instance_id"]) / "disk" / ".orch"
    assert activity_requests(worker_home) >= 1, sorted(p.name for p in worker_home.iterdir())
    assert activity_requests(head_home) >= 1
    # The laptop sent the head a cluster's worth of requests at once once the other had joined.
    assert instances[head]["gpus"] == 2 and instances[head]["requests"] == N and not instances[worker]["requests"], instances
    # The two reach each other through orch's cluster group (members admit members), SSH as before.
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sim.env()["AWS_ENDPOINT_URL"],
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    for name in (head, worker):
        described = ec2.describe_instances(InstanceIds=[instances[name]["instance_id"].split("@")[0]])
        groups = {g["GroupName"] for g in described["Reservations"][0]["Instances"][0]["SecurityGroups"]}
        assert "orch-cluster" in groups and any(g.startswith("orch-ssh-") for g in groups), (name, groups)
    assert "ray_token" not in run.stderr and (head_home / "ray" / "auth_token").read_text().strip() not in run.stderr
