"""Errors the CLI shows as a message (importing this module costs nothing: no paramiko, no boto3)."""


class LifecycleError(Exception):
    pass


class NotRunning(LifecycleError):
    pass


class SshError(Exception):
    pass


class HostKeyMismatch(SshError):
    pass
