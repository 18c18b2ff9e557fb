"""What a provider can fail with, translated from its vendor's errors at the edge.

    ProviderError                 (an OrchError)
     ├── AuthError                credentials refused: the message names the variable or file
     ├── NotFound                 the instance, image or offer does not exist (any more)
     ├── InsufficientCapacity     no machine of this kind right now; another offer may have one
     ├── QuotaExceeded            the account's quota for this kind/region is used up; not retried there
     ├── InsufficientFunds        the balance does not cover it
     ├── RateLimited              too many requests; retry_after says when to try again
     ├── InvalidState             not possible in the instance's current status
     ├── UnsupportedOperation     the provider cannot do this at all (its Capabilities say why)
     ├── ProviderUnavailable      the provider's API failed (5xx, timeout): safe to retry idempotent calls
     └── BadResponse              an answer orch cannot read: never taken for "nothing there"

The failover in lifecycle/provision.py moves to the next offer only on InsufficientCapacity
and QuotaExceeded: those mean nothing was created.
"""

from __future__ import annotations

from ..errors import OrchError


class ProviderError(OrchError):
    """Base of every error a provider raises."""


class AuthError(ProviderError):
    """The credentials were refused."""


class NotFound(ProviderError):
    """The instance, image or offer does not exist (any more)."""


class InsufficientCapacity(ProviderError):
    """The provider has no machine of this kind right now; another offer may."""


class QuotaExceeded(InsufficientCapacity):
    """The account's quota for this kind or region is used up: another region or provider may work."""


class InsufficientFunds(ProviderError):
    """The account's balance does not cover this."""


class RateLimited(ProviderError):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class InvalidState(ProviderError):
    """The operation does not apply to the instance in its current status."""


class UnsupportedOperation(ProviderError):
    """The provider cannot do this at all (see its Capabilities)."""


class ProviderUnavailable(ProviderError):
    """The provider's API failed or timed out; an idempotent call may be retried."""


class BadResponse(ProviderError):
    """The provider answered something orch cannot read."""


__all__ = [
    "AuthError", "BadResponse", "InsufficientCapacity", "InsufficientFunds", "InvalidState", "NotFound",
    "ProviderError", "ProviderUnavailable", "QuotaExceeded", "RateLimited", "UnsupportedOperation",
]
