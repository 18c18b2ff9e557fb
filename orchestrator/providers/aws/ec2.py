"""EC2 through boto3: a client per region, and EC2's errors translated into orch's at this edge.

Retries: every call but the two that launch capacity goes through botocore's `standard` retry
mode (RequestLimitExceeded, throttling and 5xx answers are retried with backoff, within
botocore's retry quota). RunInstances and StartInstances are the exception: EC2 answers "no
capacity" with HTTP 500, which botocore would retry in place (the "reached max retries"
messages people see), delaying the move to the next zone or offer; so those two go through
`launch`, which retries throttling and transient errors itself and never a capacity error.
RunInstances carries a ClientToken, so a retried launch cannot create a second instance.

Credentials are never read, printed or logged here beyond asking boto3 where they came from
(`credential_source`), which names a variable or a file, never a value.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable

from ...errors import ConfigError
from ..errors import (
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
from .settings import Settings

CAPACITY = frozenset({
    "InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity", "InsufficientCapacityOnHost", "InsufficientAddressCapacity",
    "InsufficientFreeAddressesInSubnet", "SpotMaxPriceTooLow",
})
QUOTA = frozenset({
    "VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded", "MaxSpotFleetRequestCountExceeded",
    "ResourceLimitExceeded",
})
AUTH = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken",
    "RequestExpired", "AccessDenied", "Blocked", "PendingVerification", "OptInRequired", "UnrecognizedClientException",
})
NOT_FOUND = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
STATE = frozenset({"IncorrectInstanceState", "IncorrectState", "IncorrectSpotRequestState"})
THROTTLING = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"})
TRANSIENT = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"})

QUOTA_HINT = ("raise it in the Service Quotas console (EC2: 'Running On-Demand G and VT instances' or "
              "'Running On-Demand P instances', counted in vCPUs; for spot: 'All G and VT Spot Instance Requests' / "
              "'All P Spot Instance Requests'), or try another --region or provider")
LAUNCH_ATTEMPTS = 5


def _message(err: Any) -> tuple[str, str]:
    error = getattr(err, "response", {}).get("Error", {}) if hasattr(err, "response") else {}
    return str(error.get("Code", "")), str(error.get("Message", ""))[:400]


class Ec2:
    """boto3 clients for EC2, one per region, and `call` that returns EC2's answer or raises orch's error."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._session: Any = None
        self._clients: dict[tuple[str, bool], Any] = {}

    # -- session, credentials, region ----------------------------------------------------

    def session(self) -> Any:
        if self._session is None:
            import boto3
            import botocore.exceptions

            try:
                self._session = boto3.Session(profile_name=self.settings.profile or None)
            except botocore.exceptions.ProfileNotFound:
                name = self.settings.profile or os.environ.get("AWS_PROFILE", "")
                where = "aws.profile in orch.yaml" if self.settings.profile else "AWS_PROFILE"
                raise AuthError(f"AWS profile {name!r} ({where}) is not in {_config_file()} or {_credentials_file()}; "
                                f"`aws configure --profile {name}` makes it") from None
        return self._session

    def default_region(self) -> str | None:
        return self.session().region_name

    def credential_source(self) -> str:
        """Where boto3 found credentials, in words: a variable or a file, never a value."""
        import botocore.exceptions

        try:
            creds = self.session().get_credentials()
        except botocore.exceptions.BotoCoreError as e:
            raise AuthError(f"AWS credentials could not be loaded: {e}") from None
        if creds is None:
            raise AuthError(missing_credentials_message(self.settings.profile))
        method = getattr(creds, "method", "") or ""
        profile = self.settings.profile or os.environ.get("AWS_PROFILE") or "default"
        if method == "env":
            return "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment"
        if method == "shared-credentials-file":
            return f"profile {profile!r} in {_credentials_file()}"
        if method in ("config-file", "custom-process", "sso", "assume-role", "assume-role-with-web-identity"):
            return f"profile {profile!r} in {_config_file()} ({method})"
        return f"boto3's credential chain ({method or 'unknown source'})"

    def client(self, region: str, launch: bool = False) -> Any:
        key = (region, launch)
        if key not in self._clients:
            from botocore.config import Config

            retries = {"mode": "standard", "total_max_attempts": 1 if launch else 8}
            config = Config(region_name=region, retries=retries, connect_timeout=10, read_timeout=60,
                            user_agent_extra="orch")
            kwargs: dict[str, Any] = {"config": config}
            if self.settings.endpoint:
                kwargs["endpoint_url"] = self.settings.endpoint
            self._clients[key] = self.session().client("ec2", **kwargs)
        return self._clients[key]

    # -- calls -------------------------------------------------------------------------------

    def call(self, region: str, operation: str, **params: Any) -> dict[str, Any]:
        """One EC2 call (botocore retries throttling); EC2's errors raised as orch's."""
        return self._call(self.client(region), region, operation, params)

    def paginate(self, region: str, operation: str, key: str, **params: Any) -> list[Any]:
        """Every item under `key` across pages; a page without it is a BadResponse, never 'none'."""
        items: list[Any] = []
        token: str | None = None
        while True:
            page = self.call(region, operation, **params, **({"NextToken": token} if token else {}))
            if not isinstance(page.get(key), list):
                raise BadResponse(f"EC2 {operation} in {region} answered without a {key} list; orch cannot tell what exists")
            items.extend(page[key])
            token = page.get("NextToken")
            if not token:
                return items

    def launch(self, region: str, operation: str, **params: Any) -> dict[str, Any]:
        """RunInstances / StartInstances: throttling and transient errors retried here, capacity errors never."""
        client = self.client(region, launch=True)
        for attempt in range(1, LAUNCH_ATTEMPTS + 1):
            try:
                return self._call(client, region, operation, params)
            except (RateLimited, ProviderUnavailable):
                if attempt == LAUNCH_ATTEMPTS:
                    raise
                time.sleep(min(20.0, random.uniform(0.5, 1.0) * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def _call(self, client: Any, region: str, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        import botocore.exceptions as bx
        from botocore.parsers import ResponseParserError

        method: Callable[..., dict[str, Any]] = getattr(client, operation)
        try:
            answer = method(**params)
        except bx.ClientError as e:
            raise self.translate(e, operation, region) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError):
            raise AuthError(missing_credentials_message(self.settings.profile)) from None
        except bx.ProfileNotFound:
            raise AuthError(f"AWS profile {self.settings.profile or os.environ.get('AWS_PROFILE')!r} is not in "
                            f"{_config_file()} or {_credentials_file()}") from None
        except (bx.TokenRetrievalError, bx.CredentialRetrievalError, bx.SSOError) as e:
            raise AuthError(f"AWS credentials could not be loaded ({e}); `aws sso login` or check the profile") from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError) as e:
            raise ProviderUnavailable(f"EC2 in {region} did not answer {operation}: {e}") from None
        except ResponseParserError as e:  # not EC2's XML (a proxy's page, a broken answer)
            raise BadResponse(f"EC2 {operation} in {region} answered something orch cannot read: {str(e)[:300]}") from None
        if not isinstance(answer, dict):
            raise BadResponse(f"EC2 {operation} in {region} answered {type(answer).__name__}, not a document")
        return answer

    def translate(self, err: Exception, operation: str, region: str) -> Exception:
        """EC2's error as orch's; the vendor's code stays on it as `aws_code`."""
        code, message = _message(err)
        translated = self._translate(err, code, message, operation, region)
        translated.aws_code = code  # type: ignore[attr-defined]
        return translated

    def _translate(self, err: Exception, code: str, message: str, operation: str, region: str) -> Exception:
        said = f"EC2 {operation} in {region}: {code}: {message}" if code else f"EC2 {operation} in {region}: {err}"
        if code in CAPACITY or (code == "Unsupported" and operation == "run_instances"):
            return InsufficientCapacity(said)
        if code in QUOTA:
            return QuotaExceeded(f"{said}; your account's quota is used up: {QUOTA_HINT}")
        if code in AUTH:
            if code == "OptInRequired":
                return AuthError(f"{said}; enable region {region} for your account (AWS console, Account > AWS Regions) "
                                 f"or use another --region")
            try:
                source = self.credential_source()
            except AuthError:
                source = "boto3's credential chain"
            return AuthError(f"{said}; AWS refused the credentials from {source}: check them, or that their IAM "
                             f"policy allows ec2:{_camel(operation)}")
        if code in NOT_FOUND:
            return NotFound(said)
        if code in STATE:
            return InvalidState(said)
        if code in THROTTLING:
            return RateLimited(f"{said} (after botocore's retries); try again in a minute")
        status = getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in TRANSIENT or (isinstance(status, int) and status >= 500):
            return ProviderUnavailable(said)
        if code.startswith("InvalidAMIID"):
            return ConfigError(f"{said}; set aws.ami to an image of region {region}, or leave it empty for the "
                               f"Deep Learning AMI")
        return ProviderError(said)


def _camel(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))


def _credentials_file() -> str:
    return os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"


def _config_file() -> str:
    return os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"


def missing_credentials_message(profile: str = "") -> str:
    where = f"profile {profile!r} (aws.profile) has none" if profile else "none were found"
    return (f"no AWS credentials: {where}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
            f"temporary ones), or AWS_PROFILE / aws.profile in orch.yaml naming a profile in {_credentials_file()} or "
            f"{_config_file()} (`aws configure` writes one)")


__all__ = ["Ec2", "missing_credentials_message"]
