"""One error tree. Every orch error says what to do next; the CLI prints it as one line.

    OrchError
     ├── ConfigError           orch.yaml, an ORCH_* variable or a flag is wrong (names which)
     │    └── DurationError     a duration that cannot be read, or is not positive and finite
     ├── LifecycleError        an operation on an instance failed (says where things stand)
     │    └── NotRunning        the instance is not running
     ├── StateError            ORCH_HOME/state.db cannot be read or written (full disk, read-only)
     ├── SshError              the instance cannot be reached or refused a command
     │    └── HostKeyMismatch   the instance's host key changed since it was pinned
     ├── ProviderError         a provider refused or failed (tree in providers/errors.py)
     └── StorageError          object storage (tree in storage/stores.py)

Standard library only: the instance side imports it too (storage runs there).
"""

from __future__ import annotations


class OrchError(Exception):
    """Base of every error orch raises on purpose."""


class ConfigError(OrchError, ValueError):
    """Configuration or input that orch cannot use; the message names the key or flag."""


class DurationError(ConfigError):
    """A duration that cannot be read, or is not positive and finite."""


class LifecycleError(OrchError):
    pass


class NotRunning(LifecycleError):
    pass


class StateError(OrchError):
    """The state database cannot be read or written."""


class SshError(OrchError):
    pass


class HostKeyMismatch(SshError):
    pass


class StorageError(OrchError):
    """Object storage failed; the message names the URL and what to check."""
