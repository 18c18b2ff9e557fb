"""AWS EC2 end to end against tests/simulators/aws.py: moto's EC2 API on 127.0.0.1 whose instances are
real local hosts (SSH on port 22 of their own loopback address, the user-data run at power-on).

The CLI runs in subprocesses through the same lifecycle a laptop runs; one simulator serves the
module, and the CLI loop boots one instance (twice). The provider-level tests boot small hosts only
(no bootstrap). A live smoke test runs against real AWS only with ORCH_LIVE_AWS=1 and credentials.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import replace

import httpx
import pytest
from PIL import Image

from orchestrator.providers.aws import AwsProvider, Settings
from orchestrator.providers.aws.provider import CREATED_TAG
from orchestrator.providers.base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    InstanceSpec,
    InstanceStatus,
    QuotaExceeded,
)
from orchestrator.ssh import SshSession, ensure_user_key, public_key_line
from tests.simulators.aws import AwsSimulator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    # A simulated minute is 1 s, so `shutdown -h +N` (the max_lifetime backstop) fires within the test.
    with AwsSimulator(tmp_path_factory.mktemp("aws-hosts"), minute_seconds=1.0) as simulator:
        yield simulator


@pytest.fixture
def aws_env(sim, monkeypatch):
    for k, v in sim.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return sim


@pytest.fixture
def aws_home(aws_env, orch_home):
    """orch.yaml for the simulator: SSH open to loopback only; the image's python3 has the server's packages."""
    (orch_home / "orch.yaml").write_text("provider: aws\naws:\n  regions: [us-east-1]\n  ssh_cidr: 127.0.0.0/8\n  python: python3\n")
    return orch_home


@pytest.fixture
def provider(aws_env):
    return AwsProvider(Settings(ssh_cidr="127.0.0.0/8", python="python3", regions=("us-east-1",)))


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)


def _spec(provider, tmp_path, name: str, spot: bool = False, script: str = "") -> InstanceSpec:
    offer = next(o for o in provider.offers(gpu="L4", region="us-east-1") if o.offer_id == "g6.xlarge" and o.interruptible == spot)
    key = ensure_user_key(tmp_path / "key")
    return InstanceSpec(name=name, offer=offer, ssh_public_key=public_key_line(key), startup_script=script,
                        tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: uuid.uuid4().hex[:8]})


def test_up_fails_over_gen_idle_stop_status_restart_down(sim, aws_home, orch, tmp_path):
    """orch up → URL → gen → the agent's idle deadline → EC2 says stopped (and status says why) → up → down."""
    # 1. No g5.xlarge capacity anywhere in us-east-1: up moves to the next A10G offer.
    sim.fail("us-east-1", "g5.xlarge")
    try:
        up = orch("up", "box", "--provider", "aws", "--gpu", "A10G", "--region", "us-east-1", "--detach", "--json",
                  timeout=600).json
    finally:
        sim.heal("us-east-1", "g5.xlarge")
    print(f"\norch up phases (s): {json.dumps(up['phases'])}")
    assert up["status"] == "RUNNING" and up["provider"] == "aws"
    iid = up["instance_id"]
    assert iid.endswith("@us-east-1") and sim.instance(iid).instance_type == "g5.2xlarge"
    assert [a["gpu"] for a in up["attempts"]] == ["A10G"]
    assert "InsufficientInstanceCapacity" in up["attempts"][0]["error"]
    assert up["price_per_hour"] == 1.212
    assert sim.instance(iid).instance_initiated_shutdown_behavior == "stop"

    # 2. The URL answers, through the tunnel, with the token.
    models = httpx.get(f"{up['url']}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {up['token']}"}, timeout=30)
    assert models.status_code == 200 and models.json()
    gen = orch("gen", "a cat on a castle", "--steps", "2", "--width", "64", "--height", "64", "--seed", "7",
               "-o", str(tmp_path / "out"), "--json").json
    image = Image.open(gen["images"][0])
    image.load()
    assert image.format == "PNG" and image.size == (64, 64)

    # 3. The agent's idle deadline fires (made short now), the machine powers off, EC2 stops it.
    orch("extend", "box", "--idle", "2s", "--json")
    _wait(lambda: sim.state(iid) == "stopped", 90, "EC2 to report the instance stopped")
    # The agent ticks every second: it fires within a second of its deadline, and writes when it did.
    fired = json.loads((sim.host_dir(iid) / "disk" / ".orch" / "agent" / "stopped.json").read_text())
    print(f"leak: agent fired -> EC2 stopping {sim.entered(iid, 'stopping') - fired['at']:.2f} s, "
          f"-> EC2 stopped {sim.entered(iid, 'stopped') - fired['at']:.2f} s (+ at most one 1 s tick from the deadline)")
    assert fired["reason"].startswith("idle")
    assert sim.instance(iid).state_reason.code == "Client.InstanceInitiatedShutdown"

    status = orch("status", "box", "--json").json
    assert status["status"] == "STOPPED"
    assert "idle" in status["stop_reason"], (status, sim.console(iid))

    # 4. up again starts the same instance, with its disk; down --terminate removes it.
    again = orch("up", "box", "--detach", "--json", timeout=600).json
    print(f"orch up (restart) phases (s): {json.dumps(again['phases'])}")
    assert again["instance_id"] == iid and again["status"] == "RUNNING"
    armed = (sim.host_dir(iid) / "disk" / ".orch" / "logs" / "boot-recipe.log").read_text()
    assert armed.count("agent armed") == 2, "the user-data armed the agent at each boot, before the laptop's SSH session"
    down = orch("down", "box", "--terminate", "--json").json
    assert down["status"] == "TERMINATED"
    assert sim.state(iid) == "terminated" and not sim.host_dir(iid).exists()


def test_offers_and_bad_input_name_what_is_valid(aws_home, orch):
    offers = orch("offers", "--provider", "aws", "--gpu", "l4", "--json").json["offers"]
    on_demand = [o for o in offers if not o["interruptible"]]
    assert [o["offer_id"] for o in on_demand] == ["g6.xlarge", "g6.2xlarge", "g6.12xlarge"]
    assert {o["region"] for o in offers} == {"us-east-1"} and on_demand[0]["price_per_hour"] == 0.8048
    assert all(o["interruptible"] for o in offers[len(on_demand):]), "spot offers come after every on-demand one"
    capped = orch("offers", "--provider", "aws", "--gpu", "A10G", "--region", "us-west-2", "--max-price", "1.1", "--json").json
    assert [(o["offer_id"], o["region"], o["interruptible"]) for o in capped["offers"]][0] == ("g5.xlarge", "us-west-2", False)

    bad_gpu = orch("offers", "--provider", "aws", "--gpu", "RTX4090", "--json", check=False)
    assert bad_gpu.returncode == 1 and "A10G" in bad_gpu.json["error"] and "H100" in bad_gpu.json["error"]
    bad_region = orch("offers", "--provider", "aws", "--region", "mars-north-1", "--json", check=False)
    assert bad_region.returncode == 1 and "us-west-2" in bad_region.json["error"]


def test_spot_interruption_is_the_stop_reason(sim, provider, tmp_path):
    created = provider.create(_spec(provider, tmp_path, "spotty", spot=True))
    assert sim.instance(created.instance_id).lifecycle == "spot"
    assert sim.instance(created.instance_id).instance_initiated_shutdown_behavior == "terminate"
    _wait(lambda: provider.get(created.instance_id).status == InstanceStatus.RUNNING, 60, "the spot instance to run")
    sim.interrupt(created.instance_id)
    gone = _wait(lambda: (i := provider.get(created.instance_id)).status == InstanceStatus.TERMINATED and i, 60, "interruption")
    assert "Server.SpotInstanceTermination" in gone.raw_status
    assert provider.stop_reason(created.instance_id).startswith("spot interruption")


def test_an_ami_of_an_instance_boots_a_new_one_and_is_removed_with_its_snapshots(sim, provider, tmp_path):
    """The native half of `orch image`: create_image, launch from it, deregister with its snapshots."""
    import boto3

    created = provider.create(_spec(provider, tmp_path, "imaged"))
    _wait(lambda: provider.get(created.instance_id).status == InstanceStatus.RUNNING, 60, "the instance to run")
    image = provider.save_image(created.instance_id, "env1")
    ami, region = image.image_id.split("@")
    assert region == "us-east-1" and image.name == "env1"
    assert [i.image_id for i in provider.list_images() if i.name == "env1"] == [image.image_id]
    ec2 = boto3.client("ec2", region_name=region)
    snapshots = [m["Ebs"]["SnapshotId"] for m in ec2.describe_images(ImageIds=[ami])["Images"][0]["BlockDeviceMappings"]
                 if "Ebs" in m]
    assert snapshots, "an AMI is backed by snapshots"
    again = provider.create(replace(_spec(provider, tmp_path, "from-ami"), image_id=image.image_id))
    assert sim.instance(again.instance_id).image_id == ami, "booted from the instance's own image"
    provider.delete_image(image.image_id)
    assert ec2.describe_images(Owners=["self"], ImageIds=[]).get("Images", []) == [] or \
        ami not in [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]]
    left = [s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]]
    assert not set(snapshots) & set(left), "its snapshots went with it (they would bill on their own)"
    for inst in (created, again):
        provider.terminate(inst.instance_id)


def test_stopping_a_spot_instance_terminates_it(sim, provider, tmp_path):
    """EC2 cannot stop a one-time spot instance; `stop` ends its billing the only way there is."""
    created = provider.create(_spec(provider, tmp_path, "spot-down", spot=True))
    _wait(lambda: provider.get(created.instance_id).status == InstanceStatus.RUNNING, 60, "the spot instance to run")
    provider.stop(created.instance_id)
    _wait(lambda: provider.get(created.instance_id).status == InstanceStatus.TERMINATED, 60, "termination")


def test_max_lifetime_backstop_powers_off_and_ec2_stops_it(sim, provider, tmp_path):
    """The user-data's `shutdown -h +N` (N from the deadline at each boot) stops the instance without the agent."""
    spec = _spec(provider, tmp_path, "backstop")
    created = provider._create(spec, deadline=time.time() + 2)  # `shutdown -h +1`: one simulated minute (1 s)
    _wait(lambda: provider.get(created.instance_id).status == InstanceStatus.STOPPED, 60, "the backstop to stop it")
    assert "backstop" in provider.stop_reason(created.instance_id)
    provider.terminate(created.instance_id)


def test_a_throttled_launch_is_retried_and_a_full_zone_moves_to_the_next(sim, provider, tmp_path):
    """RequestLimitExceeded (HTTP 503) on RunInstances is retried (same ClientToken); no capacity in the first zone
    moves to the next zone of the same offer; one instance results, on orch's key pair and SSH-only group."""
    spec = _spec(provider, tmp_path, "throttled")
    sim.throttle_launches(1)
    sim.fail("us-east-1a", "g6.xlarge")
    try:
        created = provider.create(spec)
    finally:
        sim.heal("us-east-1a")
    assert sim.instance(created.instance_id).placement.zone == "us-east-1b"
    assert [i.instance_id for i in provider.list() if i.run_id == spec.tags[RUN_TAG]] == [created.instance_id]
    assert created.tags[CREATED_TAG] and created.price_per_hour == 0.8048
    ec2 = provider.ec2
    groups = ec2.call("us-east-1", "describe_security_groups", Filters=[{"Name": "group-name", "Values": ["orch-ssh-127.0.0.0/8"]}])
    rules = groups["SecurityGroups"][0]["IpPermissions"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"], [x["CidrIp"] for x in r["IpRanges"]]) for r in rules] == \
        [("tcp", 22, 22, ["127.0.0.0/8"])], "only SSH, only from the configured range"
    keys = ec2.call("us-east-1", "describe_key_pairs")["KeyPairs"]
    assert [k["KeyName"] for k in keys if k["KeyName"] == sim.instance(created.instance_id).key_name]
    volumes = ec2.call("us-east-1", "describe_volumes", Filters=[{"Name": f"tag:{RUN_TAG}", "Values": [spec.tags[RUN_TAG]]}])
    assert volumes["Volumes"], "the instance's volume carries orch's tags too"
    provider.terminate(created.instance_id)


def test_a_quota_error_is_quota_exceeded_and_creates_nothing(sim, provider, tmp_path):
    spec = _spec(provider, tmp_path, "quota")
    sim.fail("us-east-1", "g6.xlarge", code="VcpuLimitExceeded")
    try:
        with pytest.raises(QuotaExceeded, match="Service Quotas"):
            provider.create(spec)
    finally:
        sim.heal("us-east-1", "g6.xlarge")
    assert [i for i in provider.list() if i.run_id == spec.tags[RUN_TAG]] == []


@pytest.mark.skipif(os.environ.get("ORCH_LIVE_AWS") != "1", reason="live AWS: set ORCH_LIVE_AWS=1 and AWS credentials")
def test_live_smoke(tmp_path, monkeypatch):
    """Real EC2 (it costs a few cents): the cheapest offer of the default region, SSH, self-stop, terminate."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
        monkeypatch.delenv(var, raising=False)
    provider = AwsProvider(Settings(ssh_cidr=os.environ.get("ORCH_LIVE_AWS_CIDR", "0.0.0.0/0"), python=sys.executable))
    provider.ec2.credential_source()  # skips nothing: a missing credential fails here with a message naming it
    offer = next(o for o in provider.offers() if not o.interruptible)
    key = ensure_user_key(tmp_path / "key")
    name = f"live-{uuid.uuid4().hex[:6]}"
    spec = InstanceSpec(name=name, offer=offer, ssh_public_key=public_key_line(key),
                        tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: uuid.uuid4().hex[:8]})
    created = provider.create(spec)
    try:
        running = _wait(lambda: (i := provider.get(created.instance_id)).status == InstanceStatus.RUNNING and i, 600,
                        "the instance to run", interval=5)
        session = _wait(lambda: _try_ssh(running, key), 600, "SSH", interval=5)
        with session:
            assert session.run("echo ok").stdout.strip() == "ok"
            session.run(f"nohup setsid sh -c {shlex.quote(provider.self_stop_command(name))} >/dev/null 2>&1 </dev/null &")
        _wait(lambda: provider.get(created.instance_id).status == InstanceStatus.STOPPED, 600, "EC2 to stop it", interval=5)
        assert provider.stop_reason(created.instance_id)
    finally:
        provider.terminate(created.instance_id)


def _try_ssh(instance, key):
    try:
        return SshSession.connect(replace(instance.ssh, key_path=str(key)), key, None)
    except Exception:
        return None
