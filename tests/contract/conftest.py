"""Providers under contract: each one a fixture case that the same tests run against.

A case gives the provider (configured against real loopback parts, or a simulator of its
API whose instances are real local instances), an offer it can serve, one it cannot (its
create must raise InsufficientCapacity and leave nothing), and the key that opens SSH to its
instances. A new provider adds one function here and one name to PROVIDERS.
"""

from __future__ import annotations

import getpass
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from orchestrator.providers.base import Offer, Provider
from orchestrator.ssh import ensure_user_key, public_key_line


@dataclass
class Case:
    provider: Provider
    offer: Offer
    unavailable: Offer
    key: Path  # private key that opens SSH to the provider's instances
    public_key: str


def _local(tmp_path: Path, request) -> Case:
    from orchestrator.providers.local import LocalProvider

    key = ensure_user_key(tmp_path / "home")
    provider = LocalProvider(tmp_path / "local", price_per_hour=0.5)
    offer = provider.offers()[0]
    return Case(provider, offer, replace(offer, gpu="no-such-gpu"), key, public_key_line(key))


def _ssh(tmp_path: Path, request) -> Case:
    from orchestrator.providers.ssh import Settings, SshHostProvider

    sshd = request.getfixturevalue("sshd")
    settings = Settings(host="127.0.0.1", port=sshd.port, user=getpass.getuser(), key=str(sshd.root / "user_key"),
                        python=sys.executable, workdir=str(tmp_path / "ssh-work"), price_per_hour=0.5)
    provider = SshHostProvider(settings, known_hosts=tmp_path / "known_hosts")
    offer = provider.offers()[0]
    key = sshd.root / "user_key"
    return Case(provider, offer, replace(offer, offer_id="nobody@elsewhere:22"), key, public_key_line(key))


def _lambda(tmp_path: Path, request) -> Case:
    from orchestrator.providers.lambda_cloud import LambdaProvider, Settings
    from tests.simulators.lambda_api import shared_simulator

    sim = shared_simulator()  # one per test process, its instances real local hosts; every request checked against the spec

    def clean() -> None:  # after the case's own teardown has terminated what the test left
        sim.wait_all_terminated()
        sim.assert_clean()

    request.addfinalizer(clean)
    settings = Settings(api_url=sim.url, self_terminate_key="sim-terminate-key", request_interval=sim.request_interval,
                        launch_interval=sim.launch_interval)
    provider = LambdaProvider(settings, tmp_path / "home", api_key="sim-laptop-key", environ={})
    key = ensure_user_key(tmp_path / "home")
    offer = provider.offers(gpu="A10")[0]
    sim.set_capacity(offer.offer_id, "europe-central-1", 0)
    return Case(provider, offer, replace(offer, region="europe-central-1"), key, public_key_line(key))


def _aws(tmp_path: Path, request) -> Case:
    """AWS EC2 against tests/simulators/aws.py (moto's API, real local hosts), one simulator per module."""
    from orchestrator.providers.aws import AwsProvider, Settings
    from tests.simulators.aws import module_simulator

    sim = module_simulator(request)
    sim.fail("us-east-1", "g5.48xlarge")  # the offer it cannot serve: no capacity in any zone
    monkeypatch = request.getfixturevalue("monkeypatch")
    for k, v in sim.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    provider = AwsProvider(Settings(ssh_cidr="127.0.0.0/8", python=sys.executable, regions=("us-east-1",)))
    offer = next(o for o in provider.offers(gpu="A10G") if o.offer_id == "g5.xlarge" and not o.interruptible)
    key = ensure_user_key(tmp_path / "home")
    return Case(provider, offer, replace(offer, offer_id="g5.48xlarge"), key, public_key_line(key))


def _runpod(tmp_path: Path, request) -> Case:
    from orchestrator.providers.runpod import RunPodProvider, Settings
    from tests.simulators.runpod_api import LAPTOP_KEY, shared_simulator

    sim = shared_simulator()  # one per test process, its pods real local containers; every request checked against the spec

    def clean() -> None:  # after the case's own teardown has terminated what the test left
        sim.wait_all_terminated()
        sim.assert_clean()

    request.addfinalizer(clean)
    # The pod's volume is a directory of this test (the simulator's containers share this machine's filesystem).
    provider = RunPodProvider(Settings(api_url=sim.url, volume_path=str(tmp_path / "workspace")), tmp_path / "home",
                              api_key=LAPTOP_KEY, environ={})
    key = ensure_user_key(tmp_path / "home")
    offer = provider.offers(gpu="RTX 4090")[0]
    return Case(provider, offer, replace(offer, region="AP-JP-1"), key, public_key_line(key))  # listed, no stock there


def _autodl(tmp_path: Path, request) -> Case:
    from orchestrator.providers.autodl import AutoDLProvider, Settings
    from tests.simulators.autodl_api import TOKEN, shared_simulator

    sim = shared_simulator()  # one per test process, its instances real local hosts; every request checked against its schema

    def clean() -> None:  # after the case's own teardown has released what the test left
        sim.release_everything()
        sim.assert_clean()

    request.addfinalizer(clean)
    settings = Settings(api_url=sim.url, data_disk=str(tmp_path / "autodl-tmp"), poll_interval=0.2, request_interval=0.0)
    provider = AutoDLProvider(settings, tmp_path / "home", token=TOKEN, environ={})
    key = ensure_user_key(tmp_path / "home")
    offer = provider.offers(gpu="RTX 4090D", region="westDC3")[0]
    sim.set_stock("4090D", "beijingDC2", 0)
    return Case(provider, offer, replace(offer, region="beijingDC2"), key, public_key_line(key))


def _vast(tmp_path: Path, request) -> Case:
    from orchestrator.providers.vast import Settings, VastProvider
    from tests.simulators.vast_api import LAPTOP_KEY, shared_simulator

    sim = shared_simulator()  # one per test process, its instances real local containers; every request checked against the spec

    def clean() -> None:  # after the case's own teardown has destroyed what the test left
        sim.wait_all_destroyed()
        sim.assert_clean()

    request.addfinalizer(clean)
    # The models' volume is a directory of this test (the simulator's containers share this machine's filesystem).
    settings = Settings(api_url=sim.url, volume_path=str(tmp_path / "workspace"), request_interval=sim.min_interval)
    provider = VastProvider(settings, tmp_path / "home", api_key=LAPTOP_KEY, environ={})
    key = ensure_user_key(tmp_path / "home")
    offer = provider.offers(gpu="RTX 4090")[0]
    return Case(provider, offer, replace(offer, offer_id="4999"), key, public_key_line(key))  # an ask nobody lists


PROVIDERS = {"local": _local, "ssh": _ssh, "lambda": _lambda, "aws": _aws, "runpod": _runpod, "autodl": _autodl,
             "vast": _vast}


@pytest.fixture(params=sorted(PROVIDERS))
def case(request, tmp_path):
    built = PROVIDERS[request.param](tmp_path, request)
    yield built
    # Whatever a failed test left behind is terminated.
    for inst in built.provider.list():
        try:
            built.provider.terminate(inst.instance_id)
        except Exception:
            pass
