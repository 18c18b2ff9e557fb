"""The `aws:` section of orch.yaml. Credentials are never here: they come the AWS way.

Credentials and the default region come from boto3's own chain: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_PROFILE or `profile:` below naming a profile
in ~/.aws/credentials or ~/.aws/config, SSO, an instance role; AWS_DEFAULT_REGION / AWS_REGION
or the profile's region. AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_EC2, or `endpoint:` below)
points EC2 elsewhere (tests: a simulator on 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError

REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d")


def regions(value: Any, *, what: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(r, str) for r in items):
        raise ConfigError(f"{what}: expected a list of region names like [us-east-1, us-west-2]")
    out = tuple(r.strip() for r in items if r.strip())
    bad = [r for r in out if not REGION_RE.fullmatch(r)]
    if bad:
        raise ConfigError(f"{what}: {', '.join(bad)} is not an AWS region name (like us-east-1)")
    return out


def cidr(value: Any, *, what: str) -> str:
    try:
        return str(ipaddress.ip_network(str(value).strip(), strict=False))
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an address range; write one like 203.0.113.7/32 "
                          f"(your address) or 0.0.0.0/0 (anyone)") from None


@dataclass(frozen=True)
class Settings:
    # A named profile of ~/.aws/config / ~/.aws/credentials (default: AWS_PROFILE, then boto3's chain).
    profile: str = ""
    # The regions orch looks in when --region is not given (default: the profile's / AWS_DEFAULT_REGION's).
    regions: tuple[str, ...] = field(default=(), metadata={"check": regions})
    # EC2's endpoint (default: AWS_ENDPOINT_URL_EC2 / AWS_ENDPOINT_URL / AWS itself).
    endpoint: str = ""
    # Who may reach the instances' SSH port (22): the only port orch opens. Default: anyone (warned).
    ssh_cidr: str = field(default="0.0.0.0/0", metadata={"check": cidr})
    # The image's login user and the interpreter that has PyTorch (the Deep Learning AMI's).
    ssh_user: str = "ubuntu"
    python: str = "/opt/pytorch/bin/python"
    # The image: an AMI id (regional), else the newest image of `ami_owner` whose name matches `ami_name`.
    ami: str = ""
    ami_owner: str = "amazon"
    ami_name: str = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 24.04) *"
    # A subnet to launch in (its VPC's security group is used); default: a default subnet of the
    # region's default VPC in each availability zone that has the instance type.
    subnet_id: str = ""
