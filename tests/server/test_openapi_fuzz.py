"""The OpenAPI document against the running server: a schema fuzzer (schemathesis) sends what the
document allows, and every answer must be documented and match it (no 5xx but the documented
503s, no undocumented status, no body off its schema). Runs where schemathesis is installed."""

from __future__ import annotations

import socket
import threading
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    import httpx
    import uvicorn

    from remote.server.app import ServerSettings, create_app

    home = tmp_path_factory.mktemp("fuzz")
    app = create_app(ServerSettings(token=TOKEN, models_dir=home / "models", state_dir=home / ".orch", device="cpu", max_side=64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").json()["status"] == "ready":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    yield base
    server.should_exit = True
    thread.join(10)


def test_a_schema_fuzzer_finds_no_server_error_and_no_schema_mismatch(base_url, tmp_path):
    import hypothesis
    import hypothesis.configuration
    from schemathesis import checks

    hypothesis.configuration.set_hypothesis_home_dir(str(tmp_path / "hypothesis"))  # nothing left in the work tree

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    wanted = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
              checks.response_schema_conformance]
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(max_examples=8, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def run(case):
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
            try:
                case.validate_response(response, checks=wanted)
            except Exception as e:  # collected: one report for all operations
                failures.append(f"{operation.label}: {type(e).__name__}: {str(e)[:300]}")

        run()
    assert not failures, "\n".join(failures[:20])
