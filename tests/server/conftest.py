"""Fixtures for the server tests: one in-process app on the demo model, shared by a module."""

from __future__ import annotations

import base64
import io
import time

import pytest

TOKEN = "parity-token"


def b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_of(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def wait_ready(client, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/healthz").json()["status"] in ("ready", "error"):
            break
        time.sleep(0.05)
    assert client.get("/healthz").json()["status"] == "ready"


@pytest.fixture(scope="module")
def parity_home(tmp_path_factory):
    """models/ with the demo model and a tiny ESRGAN upscaler file."""
    import importlib.util

    from tests.helpers.model_files import write_tiny_esrgan

    home = tmp_path_factory.mktemp("parity")
    if importlib.util.find_spec("spandrel") is not None:  # the server extra installs it
        write_tiny_esrgan(home / "models" / "ESRGAN" / "4x-tiny.pth", scale=4)
    return home


@pytest.fixture(scope="module")
def api(parity_home):
    from fastapi.testclient import TestClient

    from remote.server.app import ServerSettings, create_app

    app = create_app(ServerSettings(token=TOKEN, models_dir=parity_home / "models", state_dir=parity_home / ".orch",
                                    device="cpu", max_side=512))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client
