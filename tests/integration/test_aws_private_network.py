"""AWS's PrivateNetwork (a Ray cluster's members on one VPC) against tests/simulators/aws.py: moto's
EC2 on 127.0.0.1, its instances real local hosts whose private address is their own loopback one.

Every assertion reads EC2's state back (describe_instances, describe_security_groups), never what
orch's calls returned. One simulator and three small hosts serve the module (two in us-east-1,
one in us-east-2); the close test boots a fourth it terminates. No diffusers, no bootstrap.
"""

from __future__ import annotations

import functools
import socket
import sys
import time
import uuid
from typing import Any

import boto3
import pytest

from orchestrator.providers.autodl import AutoDLProvider
from orchestrator.providers.aws import AwsProvider, Settings
from orchestrator.providers.base import NAME_TAG, ORCH_TAG, RUN_TAG, InstanceSpec, InstanceStatus, InvalidState, ProviderError
from orchestrator.providers.capabilities import PrivateNetwork
from orchestrator.providers.lambda_cloud import LambdaProvider
from orchestrator.providers.local import LocalProvider
from orchestrator.providers.runpod import RunPodProvider
from orchestrator.providers.ssh import SshHostProvider
from orchestrator.providers.vast import VastProvider
from orchestrator.ssh import ensure_user_key, public_key_line
from tests.simulators.aws import AwsSimulator

pytestmark = pytest.mark.slow  # it boots small local hosts (about a second for the module's three)

SSH_GROUP = "orch-ssh-127.0.0.0/8"
CLUSTER_GROUP = "orch-cluster"
SSH_ONLY = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": ["127.0.0.0/8"]}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with AwsSimulator(tmp_path_factory.mktemp("aws-hosts")) as simulator, pytest.MonkeyPatch.context() as mp:
        for k, v in simulator.env().items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        yield simulator


@pytest.fixture(scope="module")
def provider(sim) -> AwsProvider:
    return AwsProvider(Settings(ssh_cidr="127.0.0.0/8", python=sys.executable, regions=("us-east-1", "us-east-2")))


@pytest.fixture(scope="module")
def members(sim, provider, tmp_path_factory) -> tuple[str, str, str]:
    """(a, b) running in us-east-1, c running in us-east-2."""
    key = tmp_path_factory.mktemp("key")
    ids = [_create(provider, key, name, region) for name, region in (("a", "us-east-1"), ("b", "us-east-1"), ("c", "us-east-2"))]
    for i in ids:
        _wait_running(provider, i)
    return ids[0], ids[1], ids[2]


def _create(provider: AwsProvider, key_dir: Any, name: str, region: str) -> str:
    offer = next(o for o in provider.offers(gpu="L4", region=region) if o.offer_id == "g6.xlarge" and not o.interruptible)
    spec = InstanceSpec(name=name, offer=offer, ssh_public_key=public_key_line(ensure_user_key(key_dir)),
                        tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: uuid.uuid4().hex[:8]})
    return provider.create(spec).instance_id


def _wait_running(provider: AwsProvider, instance_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while provider.get(instance_id).status != InstanceStatus.RUNNING:
        assert time.monotonic() < deadline, f"{instance_id} did not run within {timeout}s"
        time.sleep(0.05)


# -- EC2's state, read back -------------------------------------------------------------------


def _ec2(sim: AwsSimulator, instance_id: str) -> tuple[Any, str]:
    """A client of the simulator independent of orch's, for the instance's region; and its EC2 id."""
    iid, _, region = instance_id.partition("@")
    return _client(sim.url, region), iid


@functools.cache
def _client(url: str, region: str) -> Any:  # a boto3 client takes a tenth of a second to make
    return boto3.client("ec2", region_name=region, endpoint_url=url, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _described(sim: AwsSimulator, instance_id: str) -> dict[str, Any]:
    ec2, iid = _ec2(sim, instance_id)
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def _groups(sim: AwsSimulator, instance_id: str) -> dict[str, str]:
    """{group name: id} of the instance, as EC2 says it twice: the instance's groups and its primary interface's."""
    d = _described(sim, instance_id)
    on_instance = {g["GroupName"]: g["GroupId"] for g in d["SecurityGroups"]}
    primary = next(n for n in d["NetworkInterfaces"] if n["Attachment"]["DeviceIndex"] == 0)
    assert {g["GroupName"]: g["GroupId"] for g in primary["Groups"]} == on_instance
    return on_instance


def _rules(sim: AwsSimulator, instance_id: str, group_id: str) -> list[dict[str, Any]]:
    """The group's inbound rules, reduced to what admits whom (sources as CIDRs or group ids)."""
    ec2, _ = _ec2(sim, instance_id)
    rules = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]
    out = []
    for r in rules:
        sources = {"IpRanges": [x["CidrIp"] for x in r.get("IpRanges") or []],
                   "Ipv6Ranges": [x["CidrIpv6"] for x in r.get("Ipv6Ranges") or []],
                   "UserIdGroupPairs": [x["GroupId"] for x in r.get("UserIdGroupPairs") or []],
                   "PrefixListIds": [x["PrefixListId"] for x in r.get("PrefixListIds") or []]}
        out.append({"IpProtocol": r["IpProtocol"], "FromPort": r.get("FromPort"), "ToPort": r.get("ToPort"),
                    **{k: v for k, v in sources.items() if v}})
    return out


def _cluster_groups(sim: AwsSimulator, instance_id: str) -> list[dict[str, Any]]:
    ec2, _ = _ec2(sim, instance_id)
    vpc = _described(sim, instance_id)["VpcId"]
    return ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [CLUSTER_GROUP]},
                                                 {"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]


def _members_only(group_id: str) -> list[dict[str, Any]]:
    return [{"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "UserIdGroupPairs": [group_id]}]


# -- the capability -----------------------------------------------------------------------------


def test_only_aws_claims_a_private_network():
    assert isinstance(AwsProvider(Settings()), PrivateNetwork)
    others = (LambdaProvider, RunPodProvider, VastProvider, AutoDLProvider, LocalProvider, SshHostProvider)
    assert [cls.__name__ for cls in others if issubclass(cls, PrivateNetwork)] == []


def test_private_addresses_are_the_hosts_own_and_reach_each_other(sim, provider, members):
    a, b, c = members
    address_a, address_b = provider.private_address(a), provider.private_address(b)
    assert (address_a, address_b) == (_described(sim, a)["PrivateIpAddress"], _described(sim, b)["PrivateIpAddress"])
    assert (address_a, address_b) == (sim.hosts.address(a.partition("@")[0])[0], sim.hosts.address(b.partition("@")[0])[0])
    assert address_a != address_b
    vpc = _described(sim, a)["VpcId"]
    assert provider.network_of(a) == provider.network_of(b) == f"aws:us-east-1:{vpc}"
    assert provider.network_of(c) == f"aws:us-east-2:{_described(sim, c)['VpcId']}" != provider.network_of(a)

    # What a Ray member does: listen on its own private address; another member dials it from its own.
    with socket.create_server((address_a, 0)) as server:
        server.settimeout(5)
        with socket.socket() as client:
            client.settimeout(5)
            client.bind((address_b, 0))
            client.connect(server.getsockname())
            conn, peer = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping" and peer[0] == address_b


def test_open_adds_the_cluster_group_beside_ssh_and_again_changes_nothing(sim, provider, members):
    a, b, _ = members
    ssh_group = _groups(sim, a)[SSH_GROUP]
    provider.open_private_network([a, b])
    opened = {i: _groups(sim, i) for i in (a, b)}
    assert all(set(g) == {SSH_GROUP, CLUSTER_GROUP} for g in opened.values()), opened
    cluster = opened[a][CLUSTER_GROUP]
    assert opened[b][CLUSTER_GROUP] == cluster and opened[a][SSH_GROUP] == ssh_group
    assert _rules(sim, a, cluster) == _members_only(cluster)
    assert _rules(sim, a, ssh_group) == SSH_ONLY
    (described,) = _cluster_groups(sim, a)
    assert {"Key": ORCH_TAG, "Value": "1"} in described.get("Tags", [])

    provider.open_private_network([a, b])
    assert {i: _groups(sim, i) for i in (a, b)} == opened
    assert [g["GroupId"] for g in _cluster_groups(sim, a)] == [cluster]
    assert _rules(sim, a, cluster) == _members_only(cluster) and _rules(sim, a, ssh_group) == SSH_ONLY


def test_a_rule_someone_added_to_the_cluster_group_is_taken_out(sim, provider, members):
    a, b, _ = members
    provider.open_private_network([a, b])
    cluster = _groups(sim, a)[CLUSTER_GROUP]
    ec2, _ = _ec2(sim, a)
    ec2.authorize_security_group_ingress(GroupId=cluster, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert len(_rules(sim, a, cluster)) == 2
    provider.open_private_network([a, b])
    assert _rules(sim, a, cluster) == _members_only(cluster)


def test_the_ssh_groups_hygiene_leaves_the_cluster_rule_alone(sim, provider, members):
    a, b, _ = members
    provider.open_private_network([a, b])
    groups = _groups(sim, a)
    ec2, _ = _ec2(sim, a)
    ec2.authorize_security_group_ingress(GroupId=groups[SSH_GROUP], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    # What every `orch up` in this VPC runs: a provider without the group cached checks the SSH group's rules.
    fresh = AwsProvider(provider.settings)
    assert fresh._security_group("us-east-1", _described(sim, a)["VpcId"]) == groups[SSH_GROUP]
    assert _rules(sim, a, groups[SSH_GROUP]) == SSH_ONLY, "the SSH group's hygiene ran"
    assert _rules(sim, a, groups[CLUSTER_GROUP]) == _members_only(groups[CLUSTER_GROUP])
    assert _groups(sim, a) == groups


def test_instances_of_two_regions_are_refused_before_anything_changes(sim, provider, members):
    a, _, c = members
    provider.close_private_network([a])
    before = {i: _groups(sim, i) for i in (a, c)}
    assert CLUSTER_GROUP not in before[a]
    with pytest.raises(ProviderError) as refused:
        provider.open_private_network([a, c])
    message = str(refused.value)
    assert all(part in message for part in (a.partition("@")[0], c.partition("@")[0], "us-east-1", "us-east-2")), message
    assert {i: _groups(sim, i) for i in (a, c)} == before
    assert _cluster_groups(sim, c) == []


def test_close_takes_the_group_off_and_skips_a_terminated_instance(sim, provider, members, tmp_path):
    a, b, _ = members
    d = _create(provider, tmp_path, "d", "us-east-1")
    _wait_running(provider, d)
    provider.open_private_network([a, b, d])
    assert CLUSTER_GROUP in _groups(sim, d)
    provider.terminate(d)
    deadline = time.monotonic() + 30
    while sim.state(d) != "terminated":
        assert time.monotonic() < deadline, "the simulator did not terminate d"
        time.sleep(0.05)

    provider.close_private_network([a, b, d])
    assert {i: set(_groups(sim, i)) for i in (a, b)} == {a: {SSH_GROUP}, b: {SSH_GROUP}}
    provider.close_private_network([a, b, d])  # closing twice is fine
    assert {i: set(_groups(sim, i)) for i in (a, b)} == {a: {SSH_GROUP}, b: {SSH_GROUP}}

    for ask in (provider.private_address, provider.network_of):
        with pytest.raises(InvalidState, match=d.partition("@")[0]):
            ask(d)
