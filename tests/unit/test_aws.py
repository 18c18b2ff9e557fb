"""The AWS provider's own logic, without processes or network: the offer table and its filters (over
moto's in-process EC2), EC2's errors as orch's, retries, answers that cannot be read, credentials'
messages, the user-data and the self-stop command."""

from __future__ import annotations

import json
import time

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from orchestrator.errors import ConfigError
from orchestrator.providers.aws import AwsProvider, Settings, boot, prices
from orchestrator.providers.aws.ec2 import Ec2
from orchestrator.providers.base import (
    AuthError,
    BadResponse,
    InsufficientCapacity,
    InvalidState,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
)

SECRET = "wJalrXUtnFEMI-never-print-this"


@pytest.fixture
def creds(monkeypatch):
    """Fake credentials in the environment, nothing else of AWS's configuration (no network is touched)."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


@pytest.fixture
def moto_ec2(creds):
    from moto import mock_aws

    with mock_aws():
        yield


# -- the table and the offers ---------------------------------------------------------------


def test_the_price_table_agrees_with_ec2s_gpu_info(moto_ec2):
    import boto3

    described = boto3.client("ec2").describe_instance_types(InstanceTypes=list(prices.TYPES))["InstanceTypes"]
    for item in described:
        row, gpu = prices.TYPES[item["InstanceType"]], item["GpuInfo"]["Gpus"][0]
        assert (row.gpu, row.gpu_count, row.vcpus) == (gpu["Name"], gpu["Count"], item["VCpuInfo"]["DefaultVCpus"])
        assert abs(row.gpu_memory_gb * 1024 / gpu["MemoryInfo"]["SizeInMiB"] - 1) < 0.1, row  # marketing GB vs MiB
    assert {i["InstanceType"] for i in described} == set(prices.TYPES)
    assert all(set(table) == set(prices.TYPES) for table in prices.ON_DEMAND.values()), "every type has a price in every region"
    assert prices.PRICES_DATE[:4].isdigit(), "the table says its date"


def test_offers_filter_by_gpu_region_and_price_on_demand_before_spot(moto_ec2):
    provider = AwsProvider(Settings())
    offers = provider.offers(gpu="a10g", region="us-west-2", max_price=1.1)
    on_demand = [o for o in offers if not o.interruptible]
    assert [(o.offer_id, o.gpu, o.region, o.price_per_hour) for o in on_demand] == [("g5.xlarge", "A10G", "us-west-2", 1.006)]
    assert offers[: len(on_demand)] == on_demand and all(o.interruptible for o in offers[len(on_demand):])
    assert all(o.price_per_hour <= 1.1 and o.currency == "USD" and o.available is None for o in offers)
    assert {(o.gpu, o.region) for o in offers if o.interruptible} == {("A10G", "us-west-2")}  # moto's spot prices: tiny
    # An instance type names itself; the default region is AWS_DEFAULT_REGION's.
    assert {(o.offer_id, o.region) for o in provider.offers(gpu="g6e.xlarge")} == {("g6e.xlarge", "us-east-1")}
    assert {o.gpu_count for o in provider.offers(gpu="H100")} == {8}


def test_unknown_gpu_or_region_lists_the_valid_ones(creds, monkeypatch):
    provider = AwsProvider(Settings())
    with pytest.raises(ConfigError) as gpu:
        provider.offers(gpu="RTX 4090")
    assert all(name in str(gpu.value) for name in prices.GPUS) and "g5.xlarge" in str(gpu.value)
    with pytest.raises(ConfigError) as region:
        provider.offers(region="eu-west-9")
    assert all(name in str(region.value) for name in prices.REGIONS)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-2")
    with pytest.raises(ConfigError, match="AWS_DEFAULT_REGION"):
        AwsProvider(Settings()).offers()
    with pytest.raises(ConfigError, match="aws.regions"):
        AwsProvider(Settings(regions=("us-east-1", "sa-east-1"))).offers()


def test_settings_check_regions_and_the_ssh_range():
    from orchestrator.config import parse_section

    s = parse_section(Settings, {"regions": ["us-east-1", "us-west-2"], "ssh_cidr": "203.0.113.7/32"}, "aws")
    assert s.regions == ("us-east-1", "us-west-2") and s.ssh_cidr == "203.0.113.7/32"
    with pytest.raises(ConfigError, match="region"):
        parse_section(Settings, {"regions": ["useast1"]}, "aws")
    with pytest.raises(ConfigError, match="address range"):
        parse_section(Settings, {"ssh_cidr": "my laptop"}, "aws")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_section(Settings, {"secret_access_key": "x"}, "aws")


def test_ssh_open_to_anyone_is_warned_once(caplog):
    provider = AwsProvider(Settings())
    with caplog.at_level("WARNING"):
        provider._warn_open_ssh()
        provider._warn_open_ssh()
        AwsProvider(Settings(ssh_cidr="203.0.113.7/32"))._warn_open_ssh()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "0.0.0.0/0" in warned[0] and "aws.ssh_cidr" in warned[0]


def test_capabilities_declare_only_regions_and_gpus():
    caps = AwsProvider.capabilities
    assert caps.can_stop and caps.can_start and caps.self_stop and caps.prices_before_create and not caps.user_sets_price
    assert caps.regions == prices.REGIONS and caps.gpus == prices.GPUS and not caps.reasons


# -- EC2's errors as orch's -------------------------------------------------------------------


def _client_error(code: str, status: int = 400, operation: str = "RunInstances") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} said EC2"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       operation)


@pytest.mark.parametrize("code,status,operation,expected", [
    ("InsufficientInstanceCapacity", 500, "run_instances", InsufficientCapacity),
    ("InsufficientHostCapacity", 500, "run_instances", InsufficientCapacity),
    ("Unsupported", 400, "run_instances", InsufficientCapacity),  # the type is not in that zone
    ("VcpuLimitExceeded", 400, "run_instances", QuotaExceeded),
    ("MaxSpotInstanceCountExceeded", 400, "run_instances", QuotaExceeded),
    ("InstanceLimitExceeded", 400, "run_instances", QuotaExceeded),
    ("AuthFailure", 401, "describe_instances", AuthError),
    ("UnauthorizedOperation", 403, "run_instances", AuthError),
    ("OptInRequired", 403, "describe_instances", AuthError),
    ("InvalidInstanceID.NotFound", 400, "describe_instances", NotFound),
    ("InvalidInstanceID.Malformed", 400, "stop_instances", NotFound),
    ("IncorrectInstanceState", 400, "start_instances", InvalidState),
    ("RequestLimitExceeded", 503, "describe_instances", RateLimited),
    ("InternalError", 500, "describe_instances", ProviderUnavailable),
    ("SomethingNew", 400, "describe_instances", ProviderError),
])
def test_ec2_errors_become_orchs(creds, code, status, operation, expected):
    error = Ec2(Settings()).translate(_client_error(code, status), operation, "us-east-1")
    assert type(error) is expected and error.aws_code == code and code in str(error)
    if expected is QuotaExceeded:
        assert "Service Quotas" in str(error)


def test_a_refused_credential_names_its_source_never_its_value(creds):
    message = str(Ec2(Settings()).translate(_client_error("AuthFailure", 401), "describe_instances", "us-east-1"))
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment" in message
    assert SECRET not in message and "AKIATESTING" not in message


def test_missing_credentials_name_the_variables_and_files(creds, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AuthError) as e:
        AwsProvider(Settings(regions=("us-east-1",))).get("i-0123456789abcdef0@us-east-1")
    assert "AWS_ACCESS_KEY_ID" in str(e.value) and "AWS_PROFILE" in str(e.value) and "/dev/null" in str(e.value)
    with pytest.raises(AuthError, match=r"profile 'nope' \(aws.profile in orch.yaml\)"):
        AwsProvider(Settings(profile="nope")).list()
    monkeypatch.setenv("AWS_PROFILE", "gone")
    with pytest.raises(AuthError, match=r"profile 'gone' \(AWS_PROFILE\)"):
        AwsProvider(Settings()).list()


def test_an_id_that_is_not_ec2s_is_not_found_without_asking(creds):
    with pytest.raises(NotFound):
        AwsProvider(Settings()).get("orch-no-such-instance")


# -- retries ---------------------------------------------------------------------------------

THROTTLED = (b'<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>'
             b'</Error></Errors><RequestID>r</RequestID></Response>')
NO_CAPACITY = (b'<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>none left</Message>'
               b'</Error></Errors><RequestID>r</RequestID></Response>')
EMPTY = b'<DescribeInstancesResponse><requestId>r</requestId><reservationSet/></DescribeInstancesResponse>'


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **kwargs):
        yield self.body


def _answers(client, operation: str, answers: list[tuple[int, bytes]]) -> list[int]:
    """Answer `operation` with these (status, body) in turn, before anything is sent; returns the calls seen."""
    seen: list[int] = []

    def send(request, **kwargs):
        status, body = answers[min(len(seen), len(answers) - 1)]
        seen.append(status)
        return AWSResponse(request.url, status, {}, _Raw(body))

    client.meta.events.register(f"before-send.ec2.{operation}", send)
    return seen


def test_request_limit_exceeded_is_retried_by_botocore(creds, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    ec2 = Ec2(Settings())
    seen = _answers(ec2.client("us-east-1"), "DescribeInstances", [(503, THROTTLED), (503, THROTTLED), (200, EMPTY)])
    assert ec2.call("us-east-1", "describe_instances")["Reservations"] == []
    assert seen == [503, 503, 200]
    assert ec2.client("us-east-1").meta.config.retries == {"mode": "standard", "total_max_attempts": 8}


def test_a_launch_is_retried_on_throttling_never_on_no_capacity(creds, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    ec2 = Ec2(Settings())
    seen = _answers(ec2.client("us-east-1", launch=True), "RunInstances", [(500, NO_CAPACITY)])
    with pytest.raises(InsufficientCapacity):
        ec2.launch("us-east-1", "run_instances", ImageId="ami-1", InstanceType="g5.xlarge", MinCount=1, MaxCount=1)
    assert seen == [500], "EC2 says 'no capacity' with HTTP 500; asking again in place only delays the next offer"
    ec2 = Ec2(Settings())
    seen = _answers(ec2.client("us-east-1", launch=True), "RunInstances", [(503, THROTTLED), (500, NO_CAPACITY)])
    with pytest.raises(InsufficientCapacity):
        ec2.launch("us-east-1", "run_instances", ImageId="ami-1", InstanceType="g5.xlarge", MinCount=1, MaxCount=1)
    assert seen == [503, 500]


# -- answers orch cannot read -----------------------------------------------------------------


def test_a_list_answer_that_cannot_be_read_is_bad_response_never_none(creds):
    provider = AwsProvider(Settings(regions=("us-east-1",)))
    provider._list_regions = lambda: ("us-east-1",)
    with Stubber(provider.ec2.client("us-east-1")) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"ReservationId": "r-1"}]})  # no Instances
        with pytest.raises(BadResponse):
            provider.list()
        stub.add_response("describe_instances", {})  # no Reservations at all
        with pytest.raises(BadResponse):
            provider.list()
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [{"InstanceId": "i-0123456789abcdef0"}]}]})
        with pytest.raises(BadResponse):  # an instance without a state
            provider.list()


# -- what runs on the instance ----------------------------------------------------------------


def test_user_data_carries_the_boot_script_as_is_and_the_backstop_when_given():
    script = "#!/bin/sh\necho \"$HOME\" '$(not expanded)' `here`\n"
    text = boot.user_data(script, "ubuntu")
    assert script in text and "shutdown -h" not in text
    end = text.split("cat <<'", 1)[1].split("'", 1)[0]
    assert text.count(f"\n{end}\n") == 1, "the boot script sits in a quoted here-document"
    assert boot.PER_BOOT in text and "runuser" not in text, "run as root: the runtime tells the recipe whose home it is"
    deadline = time.time() + 3600
    backstop = boot.user_data(script, "ubuntu", deadline=deadline)
    assert f"left=$(( ({int(deadline)} - $(date +%s) + 59) / 60 ))" in backstop and 'shutdown -h "+$left"' in backstop
    with pytest.raises(ConfigError, match="16384"):
        boot.user_data("#" * 17000, "ubuntu")


def test_self_stop_writes_the_reason_to_the_console_then_powers_off():
    command = boot.self_stop_command("~/.orch")
    assert '"$HOME"/.orch/agent/stopped.json' in command and command.endswith("sudo -n poweroff 2>/dev/null || poweroff")
    assert "AWS_" not in command, "no credentials on the instance"
    console = ("[  OK  ] Started cloud-final.\n" + boot.CONSOLE_MARK + json.dumps({"reason": "idle 15m", "at": 1}) + "\n"
               + "reboot: Power down\n")
    assert boot.reason_from_console(console) == "idle 15m"
    assert boot.reason_from_console("Linux version 6.8\n") is None
    assert boot.reason_from_console(console + boot.BOOT_MARK + "1795977000\n") is None, "that reason was an earlier boot's"
    assert boot.BOOT_MARK in boot.user_data("#!/bin/sh\n", "ubuntu")


def test_the_boot_recipe_runs_as_root_for_the_login_user_with_a_systemd_re_arm():
    from orchestrator.providers.aws import AwsProvider, Settings

    settings = Settings()
    provider = AwsProvider.__new__(AwsProvider)
    provider.settings = settings
    runtime = provider.runtime("box")
    assert runtime.run_as == settings.ssh_user and runtime.rearm == "systemd" and runtime.home == "~/.orch"


def test_extending_max_lifetime_moves_ec2s_backstop():
    deadline = time.time() + 7200
    command = boot.backstop_command(deadline)
    assert command.startswith("sudo -n sh -c ") and "shutdown -c" in command and str(int(deadline)) in command
