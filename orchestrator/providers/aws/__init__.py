"""AWS EC2 (boto3): GPU instance types as offers per region, real instances, billing stopped by EC2.

    settings.py  the `aws:` section of orch.yaml (no SDK import)
    prices.py    the instance types orch offers and their on-demand prices, with the table's date
    ec2.py       boto3 clients per region; EC2's errors translated into orch's
    boot.py      the user-data around orch's boot script; the agent's self-stop (power off)
    provider.py  the Provider
"""

from __future__ import annotations

import os
from pathlib import Path

from .provider import AwsProvider
from .settings import Settings


def configured(settings: Settings) -> bool:
    """Whether AWS credentials are set up the AWS way (no network asked: the environment and ~/.aws)."""
    if any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")) or settings.profile:
        return True
    aws = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    return aws.exists() or Path(os.environ.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config").exists()


def make(settings: Settings, home: Path) -> AwsProvider:
    return AwsProvider(settings)


__all__ = ["AwsProvider", "Settings", "configured", "make"]
