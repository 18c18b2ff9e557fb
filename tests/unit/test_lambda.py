"""Lambda Cloud through its simulator's in-memory transport (no socket, no process): offers and
filters, Lambda's error codes, rate limits, retries, and where the keys may and may not go.
Every request the provider sends and every answer it reads is checked against the vendored spec."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from orchestrator.config import load_settings
from orchestrator.errors import ConfigError
from orchestrator.providers.base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    AuthError,
    BadResponse,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    UnsupportedOperation,
)
from orchestrator.providers.capabilities import SelfStopCredentials
from orchestrator.providers.lambda_cloud import LambdaProvider, Settings
from orchestrator.providers.lambda_cloud.provider import gpu_of
from tests.simulators.lambda_api import LAPTOP_KEY, TERMINATE_KEY, LambdaSimulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXjb3JjaC11bml0LXRlc3Qta2V5LWJ5dGVzLTEyMzQ orch"


@pytest.fixture
def sim():
    s = LambdaSimulator(hosts=False)
    yield s
    s.assert_clean()


def make(sim: LambdaSimulator, *, key: str | None = LAPTOP_KEY, terminate_key: str = "", environ: dict | None = None,
         sleep=lambda s: None, **settings) -> LambdaProvider:
    base = {"request_interval": 0.0, "launch_interval": 0.0, **settings}
    return LambdaProvider(Settings(api_url="http://127.0.0.1/api/v1", self_terminate_key=terminate_key, **base),
                          Path("/nonexistent"), api_key=key, environ=environ or {}, transport=sim.transport(), sleep=sleep)


def spec(provider: LambdaProvider, name: str = "box", gpu: str = "A10", region: str | None = None, run: str = "run1") -> InstanceSpec:
    offer = next(o for o in provider.offers(gpu=gpu) if region in (None, o.region))
    return InstanceSpec(name=name, offer=offer, ssh_public_key=PUBLIC_KEY, tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: run},
                        startup_script="#!/bin/sh\necho armed\n")


def launches(sim: LambdaSimulator) -> list[int]:
    return [status for _, method, path, status in sim.log if path == "/instance-operations/launch"]


# -- offers ------------------------------------------------------------------------------


def test_offers_are_instance_types_in_the_regions_that_have_capacity(sim):
    offers = make(sim).offers()
    seen = [(o.gpu, o.gpu_count, o.region, o.price_per_hour, o.offer_id) for o in offers]
    assert seen == [("A10", 1, "us-east-1", 0.75, "gpu_1x_a10"), ("A10", 1, "us-west-1", 0.75, "gpu_1x_a10"),
                    ("A100", 1, "us-east-1", 1.29, "gpu_1x_a100_sxm4"), ("A100", 1, "us-south-1", 1.29, "gpu_1x_a100_sxm4"),
                    ("H100", 1, "us-west-1", 2.49, "gpu_1x_h100_pcie"), ("H100", 8, "us-south-1", 23.92, "gpu_8x_h100_sxm5")]
    assert all(o.provider == "lambda" and o.available is True and o.currency == "USD" for o in offers)
    assert "GH200" not in {o.gpu for o in offers}, "a type with no capacity anywhere has no offer"
    sim.set_capacity("gpu_1x_gh200", "us-east-1", 1)
    assert [o.region for o in make(sim).offers(gpu="gh200")] == ["us-east-1"]


@pytest.mark.parametrize("wanted,types", [
    ("a100", {"gpu_1x_a100_sxm4"}), ("H100", {"gpu_1x_h100_pcie", "gpu_8x_h100_sxm5"}), ("H100 SXM5", {"gpu_8x_h100_sxm5"}),
    ("8xH100", {"gpu_8x_h100_sxm5"}), ("gpu_1x_h100_pcie", {"gpu_1x_h100_pcie"}),
])
def test_a_gpu_is_asked_for_as_users_say_it(sim, wanted, types):
    assert {o.offer_id for o in make(sim).offers(gpu=wanted)} == types


def test_region_and_price_filters(sim):
    provider = make(sim)
    assert {(o.gpu, o.region) for o in provider.offers(region="us-west-1")} == {("A10", "us-west-1"), ("H100", "us-west-1")}
    assert {o.gpu for o in provider.offers(max_price=1.5)} == {"A10", "A100"}
    assert provider.offers(gpu="H100", region="us-east-1") == [], "a known region without capacity: no offer, no error"


def test_an_unknown_gpu_or_region_is_an_error_listing_the_valid_ones(sim):
    provider = make(sim)
    with pytest.raises(ConfigError, match=r"no GPU 'Z80'; valid GPUs: A10, A100, GH200, H100 .*gpu_1x_a10"):
        provider.offers(gpu="Z80")
    with pytest.raises(ConfigError, match=r"no region 'mars-1'; valid regions: .*europe-central-1.*us-east-1"):
        provider.offers(region="mars-1")


def test_gpu_names_from_instance_type_names():
    assert gpu_of("gpu_8x_h100_sxm5") == ("H100", "SXM5", 8)
    assert gpu_of("gpu_1x_a10") == ("A10", "", 1)
    assert gpu_of("gpu_2x_rtx6000") == ("RTX6000", "", 2)
    assert gpu_of("cpu_4x_general") == ("cpu_4x_general", "", None)


# -- create, get, list, terminate ---------------------------------------------------------


def test_create_get_list_terminate_and_no_stop(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    assert created.status == InstanceStatus.PENDING and created.run_id == "run1" and created.price_per_hour == 0.75
    inst = sim.instances[created.instance_id]
    assert inst.tags == [{"key": "orch", "value": "1"}, {"key": "orch-name", "value": "box"}, {"key": "orch-run", "value": "run1"}]
    assert "echo armed" in inst.user_data and inst.name == "box"
    got = provider.get(created.instance_id)
    assert got.status == InstanceStatus.RUNNING and got.ssh.port == 22 and got.ssh.user == "ubuntu" and got.gpu == "A10"
    assert [i.instance_id for i in provider.list()] == [created.instance_id]
    with pytest.raises(UnsupportedOperation, match="cannot stop"):
        provider.stop(created.instance_id)
    with pytest.raises(UnsupportedOperation, match="cannot start"):
        provider.start(created.instance_id)
    assert provider.terminate(created.instance_id).status in (InstanceStatus.TERMINATING, InstanceStatus.TERMINATED)
    sim.wait_all_terminated(5)
    assert provider.terminate(created.instance_id).status == InstanceStatus.TERMINATED, "terminating twice is harmless"
    with pytest.raises(NotFound):
        provider.get(created.instance_id)
    assert provider.list() == []
    assert inst.billed_seconds() == pytest.approx(inst.terminate_requested_at - inst.launched_at)


def test_an_instance_lambda_still_shows_as_terminated_reads_terminated(sim):
    sim.terminated_visible_s = 60
    provider = make(sim)
    created = provider.create(spec(provider))
    provider.terminate(created.instance_id)
    sim.wait_all_terminated(5)
    gone = provider.get(created.instance_id)
    assert gone.status == InstanceStatus.TERMINATED and gone.ssh is None and not gone.status.is_billing_compute


@pytest.mark.parametrize("operation", ["get", "stop", "start", "terminate"])
def test_an_unknown_id_is_not_found(sim, operation):
    with pytest.raises(NotFound):
        getattr(make(sim), operation)("0123456789abcdef0123456789abcdef")


def test_capabilities_say_down_terminates_in_words(sim):
    caps = make(sim).capabilities
    assert not caps.can_stop and not caps.can_start
    assert "cannot stop an instance" in caps.why_not("can_stop") and "bills until it is terminated" in caps.why_not("can_stop")


def test_list_holds_only_orchs_instances(sim):
    provider = make(sim)
    provider.create(spec(provider))
    sim.handle("POST", "http://sim/api/v1/instance-operations/launch", {"Authorization": f"Bearer {LAPTOP_KEY}"},
               b'{"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["%s"]}'
               % provider._ssh_key_name(PUBLIC_KEY).encode())
    assert len(sim.live()) == 2
    assert [i.name for i in provider.list()] == ["box"], "the user's own instance is not orch's"


def test_orchs_ssh_key_is_registered_once_and_found_again_by_its_public_key(sim):
    provider = make(sim)
    provider.create(spec(provider, "a"))
    provider.create(spec(provider, "b"))
    assert [m for _, m, p, _ in sim.log if p == "/ssh-keys" and m == "POST"] == ["POST"]
    again = make(sim)  # another process: finds the key by its public key, registers nothing
    again.create(spec(again, "c"))
    assert [m for _, m, p, _ in sim.log if p == "/ssh-keys" and m == "POST"] == ["POST"]
    assert len({i.ssh_key_name for i in sim.instances.values()}) == 1


def test_an_api_without_user_data_gets_the_launch_again_without_it(sim):
    sim.accepts_user_data = False
    provider = make(sim)
    created = provider.create(spec(provider))
    assert launches(sim) == [400, 200] and len(sim.live()) == 1
    assert sim.instances[created.instance_id].user_data == "", "the bootstrap over SSH arms the agent instead"


def test_the_boot_recipe_arms_the_agent_as_the_ssh_user_with_a_systemd_timer(sim):
    """cloud-init runs user-data as root: the runtime tells the recipe whose ~/.orch it is and how to re-arm."""
    runtime = make(sim).runtime("box")
    assert runtime.run_as == "ubuntu" and runtime.rearm == "systemd" and runtime.home == "~/.orch"


# -- faults and Lambda's error codes --------------------------------------------------------


def test_no_capacity_is_insufficient_capacity_and_creates_nothing(sim):
    provider = make(sim)
    full = spec(provider)
    sim.set_capacity(full.offer.offer_id, full.offer.region, 0)
    with pytest.raises(InsufficientCapacity, match="no capacity"):
        provider.create(full)
    sim.capacity_race("gpu_1x_a10", "us-west-1")
    with pytest.raises(InsufficientCapacity):
        provider.create(spec(provider, region="us-west-1"))
    assert sim.live() == []


def test_a_used_up_quota_is_quota_exceeded(sim):
    sim.quota = 0
    provider = make(sim)
    with pytest.raises(QuotaExceeded, match="quota"):
        provider.create(spec(provider))
    assert issubclass(QuotaExceeded, InsufficientCapacity), "so failover moves on to the next offer"


def test_a_refused_key_is_an_auth_error_naming_the_variable_not_the_key(sim):
    with pytest.raises(AuthError, match="LAMBDA_API_KEY") as e:
        make(sim, key="not-a-real-key").offers()
    assert "not-a-real-key" not in str(e.value) and "invalid-api-key" in str(e.value)
    sim.fail_next("GET", "/instances", 403, body=b'{"error": {"code": "global/account-inactive", "message": "Account inactive."}}')
    with pytest.raises(AuthError, match="LAMBDA_API_KEY"):
        make(sim).list()


def test_a_missing_key_is_a_message_naming_the_variable(sim):
    provider = make(sim, key=None, environ={})  # constructing it needs no key: `orch status` of other providers works
    with pytest.raises(AuthError, match="set LAMBDA_API_KEY"):
        provider.offers()
    assert make(sim, key=None, environ={"LAMBDA_API_KEY": LAPTOP_KEY}).offers()


def test_5xx_is_retried_for_reads_and_terminate_never_for_a_launch(sim):
    waits: list[float] = []
    provider = make(sim, sleep=waits.append)
    sim.fail_next("GET", "/instances", 503, times=2)
    assert provider.list() == [] and len(waits) == 2
    sim.fail_next("GET", "/instance-types", 500, times=4)
    with pytest.raises(ProviderUnavailable):
        provider.offers()
    offer_spec = spec(provider)
    sim.fail_next("POST", "/instance-operations/launch", 500)
    with pytest.raises(ProviderUnavailable):
        provider.create(offer_spec)
    assert launches(sim) == [500], "a launch is never retried blindly" and sim.live() == []
    created = provider.create(offer_spec)
    sim.fail_next("POST", "/instance-operations/terminate", 503)
    provider.terminate(created.instance_id)
    assert sim.instances[created.instance_id].terminate_requested_at is not None


@pytest.mark.parametrize("body", [b"<html>down for maintenance</html>", b'{"data": "nothing"}', b'{"data": [{"id": 7}]}',
                                  b'{"instances": []}'])
def test_a_list_that_cannot_be_read_is_bad_response_never_empty(sim, body):
    sim.fail_next("GET", "/instances", 200, body=body, off_spec=True)
    with pytest.raises(BadResponse):
        make(sim).list()


# -- rate limits ---------------------------------------------------------------------------


def _sleeping(waits: list[float]):
    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    return sleep


def test_a_429_is_waited_out_for_its_retry_after(sim):
    sim.request_interval = 0.3
    waits: list[float] = []
    provider = make(sim, sleep=_sleeping(waits))  # a client that ignores the limit
    provider.offers()
    provider.list()
    assert sim.rate_limited == 1 and waits == [1.0], "told to wait 1 s (Retry-After), it waited, then it was answered"


def test_the_client_keeps_to_about_one_request_a_second_and_one_launch_per_interval(sim):
    sim.request_interval, sim.launch_interval = 0.2, 0.6
    provider = make(sim, sleep=_sleeping([]), request_interval=0.2, launch_interval=0.6)
    t0 = time.monotonic()
    for _ in range(4):
        provider.list()
    assert time.monotonic() - t0 >= 0.55
    provider.create(spec(provider, "a"))
    provider.create(spec(provider, "b"))
    assert sim.rate_limited == 0, "the simulator enforces the limits; the client never hit them"
    times = [t for t, _, path, _ in sim.log if path == "/instance-operations/launch"]
    assert times[1] - times[0] >= 0.55


def test_a_launch_too_soon_is_refused_with_429_and_retried(sim):
    sim.launch_interval = 0.5
    waits: list[float] = []
    provider = make(sim, sleep=_sleeping(waits))
    provider.create(spec(provider, "a"))
    provider.create(spec(provider, "b"))
    assert launches(sim) == [200, 429, 200] and len(sim.live()) == 2, "a 429'd launch created nothing and was sent again"


# -- the keys -----------------------------------------------------------------------------


def test_self_stop_follows_the_opt_in_key(sim):
    without = make(sim)
    assert without.capabilities.self_stop is False
    assert "lambda.self_terminate_key" in without.capabilities.why_not("self_stop")
    assert isinstance(without, SelfStopCredentials) and without.self_stop_credentials("box") == {}
    assert make(sim, terminate_key=TERMINATE_KEY).capabilities.self_stop is True
    assert make(sim, environ={"LAMBDA_SELF_TERMINATE_KEY": TERMINATE_KEY}).capabilities.self_stop is True


def test_the_stop_credentials_name_this_instance(sim):
    provider = make(sim, terminate_key=TERMINATE_KEY)
    created = provider.create(spec(provider))
    env = provider.self_stop_credentials("box")
    assert env == {"ORCH_LAMBDA_API_URL": "http://127.0.0.1/api/v1", "ORCH_LAMBDA_INSTANCE_ID": created.instance_id,
                   "ORCH_LAMBDA_TERMINATE_KEY": TERMINATE_KEY}
    assert make(sim, terminate_key=TERMINATE_KEY).self_stop_credentials("box") == env, "another process finds it by its tag"
    with pytest.raises(NotFound):
        provider.self_stop_credentials("nobody")


def test_the_keys_never_reach_logs_errors_commands_or_the_instance(sim, caplog):
    caplog.set_level(logging.DEBUG)
    laptop, terminate = LAPTOP_KEY, TERMINATE_KEY
    provider = make(sim, terminate_key=terminate)
    created = provider.create(spec(provider))
    provider.get(created.instance_id)
    provider.list()
    provider.terminate(created.instance_id)
    errors = []
    for bad in (lambda: make(sim, key="wrong").list(), lambda: provider.get("nope")):
        with pytest.raises(ProviderError) as e:
            bad()
        errors.append(str(e.value))
    command = provider.self_stop_command("box")
    written = [repr(provider.settings), command, sim.instances[created.instance_id].user_data, *errors, caplog.text]
    assert not [w for w in written if laptop in w or terminate in w]
    assert "stop.env" in command and "python3 -c" in command


def test_settings_from_orch_yaml(tmp_path):
    path = tmp_path / "orch.yaml"
    path.write_text("provider: lambda\nlambda:\n  api_url: http://127.0.0.1:9/api/v1\n  self_terminate_key: k-123\n"
                    "  request_interval: 0.25\n")
    section = load_settings(path, environ={}).provider_settings("lambda")
    assert section.api_url == "http://127.0.0.1:9/api/v1" and section.request_interval == 0.25 and section.launch_interval == 10.0
    assert "k-123" not in repr(section)
    assert Settings().api_url == "https://cloud.lambda.ai/api/v1"
    for bad, message in (("api_url: http://api.example.com/v1", "https"), ("request_interval: -1", "out of range"),
                         ("ssh_key: x", "unknown key")):
        path.write_text(f"lambda:\n  {bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_settings(path, environ={})
