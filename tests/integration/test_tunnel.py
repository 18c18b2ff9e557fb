"""The tunnel on a real local instance: survives its SSH connection being cut; heartbeats."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from orchestrator.config import load_settings
from orchestrator.lifecycle import Orchestrator, UpOptions
from orchestrator.ssh import HostKeyMismatch

pytestmark = pytest.mark.slow


def test_tunnel_reconnects_after_the_connection_is_cut(orch_home):
    orch = Orchestrator(load_settings())
    result = orch.up(UpOptions(name="tun"))
    tunnel = result.tunnel
    assert tunnel is not None
    headers = {"Authorization": f"Bearer {result.record.token}"}
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    try:
        assert httpx.post(f"{tunnel.url}/sdapi/v1/txt2img", json=body, headers=headers, timeout=60).status_code == 200

        # Cut the network under the SSH connection, as a dropped Wi-Fi would.
        session = tunnel._session
        session.transport.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 20
        while session.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session.alive

        r = httpx.post(f"{tunnel.url}/sdapi/v1/txt2img", json=body, headers=headers, timeout=60)
        assert r.status_code == 200
        assert tunnel.reconnects >= 1
        # While attached, the tunnel tells the instance a laptop is there.
        beats_dir = orch_home / "local" / result.record.instance_id / "disk" / ".orch" / "heartbeats"
        deadline = time.monotonic() + 10
        while not (beats_dir.exists() and list(beats_dir.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.2)
        beats = list(beats_dir.iterdir())
        assert beats and float(beats[0].read_text()) > time.time() - 120
    finally:
        tunnel.close()
        orch.release_foreground_tunnel("tun")
        orch.down("tun", terminate=True)


def test_a_changed_host_key_is_refused(orch_home):
    orch = Orchestrator(load_settings())
    result = orch.up(UpOptions(name="pin", detach=True))
    try:
        record = orch.state.get("pin")
        assert record.host_key and record.host_key.startswith("ssh-ed25519 ")
        # Someone else answers for the instance: a different key than the one pinned at first contact.
        import asyncssh

        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
        orch.state.update("pin", host_key=f"{other[0]} {other[1]}")
        with pytest.raises(HostKeyMismatch, match="host key of pin .*changed.*forget-host-key"):
            orch.connect(orch.state.get("pin"), timeout=10)
    finally:
        orch.state.update("pin", host_key=result.record.host_key)
        orch.down("pin", terminate=True)
