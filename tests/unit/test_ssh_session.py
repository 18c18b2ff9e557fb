"""SshSession's failures are orch's errors, saying what was being done."""

from __future__ import annotations

import paramiko


def test_a_dropped_connection_is_an_orch_error_not_a_traceback():
    """`orch up` ended in paramiko's own exception (exit 2, a traceback in the log) when the instance's
    SSH session dropped while it waited for the boot recipe: it is an SshError that names what ran."""
    from types import SimpleNamespace

    import pytest

    from orchestrator.errors import OrchError
    from orchestrator.ssh import SshSession

    def gone(timeout):
        raise paramiko.SSHException("SSH session not active")

    session = SshSession(SimpleNamespace(open_session=gone), SimpleNamespace(host="127.0.0.1", port=2222))
    with pytest.raises(OrchError, match=r"SSH connection to 127.0.0.1:2222 was lost .*SSH session not active.* before: cat x"):
        session.run("cat x")
