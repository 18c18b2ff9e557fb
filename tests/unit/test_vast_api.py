"""Vast.ai's answers and limits through the simulator's in-memory transport: its error bodies (a bad
key is a 404 `auth_error`; an offer gone; no credit; an account limit), the per-endpoint rate limit
(429 with a threshold and no Retry-After), the spacing orch keeps, which calls are retried on 5xx,
and where the keys may and may not go. Every request and answer is checked against the vendored spec."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.providers.base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    AuthError,
    BadResponse,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    InsufficientFunds,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
)
from orchestrator.providers.vast import Settings, VastProvider
from orchestrator.providers.vast.api import VastApi, classify, endpoint, threshold
from tests.simulators.vast_api import LAPTOP_KEY, VastSimulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXjb3JjaC11bml0LXRlc3Qta2V5LWJ5dGVzLTEyMzQ orch"
URL = "http://127.0.0.1"


@pytest.fixture
def sim():
    s = VastSimulator(hosts=False, provision_delay=0.0, pull_delay=0.0, restart_pull_delay=0.0, log_delay=0.0)
    yield s
    s.assert_clean()


def make(sim: VastSimulator, *, key: str | None = LAPTOP_KEY, environ: dict | None = None, sleep=lambda s: None,
         request_interval: float = 0.0, **settings) -> VastProvider:
    return VastProvider(Settings(api_url=URL, request_interval=request_interval, **settings), Path("/nonexistent"),
                        api_key=key, environ=environ or {}, transport=sim.transport(), sleep=sleep)


def spec(provider: VastProvider, name: str = "box", run: str = "run1") -> InstanceSpec:
    offer = provider.offers(gpu="RTX 4090")[0]
    return InstanceSpec(name=name, offer=offer, ssh_public_key=PUBLIC_KEY, tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: run},
                        startup_script="#!/bin/sh\necho armed\n")


def running(provider: VastProvider, instance_id: str) -> None:
    deadline = time.monotonic() + 5
    while provider.get(instance_id).status != InstanceStatus.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def creates(sim: VastSimulator) -> list[int]:
    return [status for _, method, path, status in sim.log if method == "PUT" and path.startswith("/api/v0/asks/")]


def _sleeping(waits: list[float]):
    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    return sleep


# -- Vast's error bodies -------------------------------------------------------------------


def test_a_bad_key_is_a_404_auth_error_and_an_auth_error_naming_the_variable_not_the_key(sim):
    status, _, answer = sim.handle("GET", f"{URL}/api/v0/instances/1/", {"Authorization": "Bearer nope"}, b"")
    assert status == 404 and json.loads(answer) == {"success": False, "error": "auth_error", "msg": "Invalid user key"}
    for call in (lambda p: p.offers(), lambda p: p.list(), lambda p: p.get("31000001"), lambda p: p.stop("31000001")):
        with pytest.raises(AuthError, match="VAST_API_KEY") as e:
            call(make(sim, key="not-a-real-key"))
        assert "not-a-real-key" not in str(e.value) and "Invalid user key" in str(e.value)


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_auth_errors(sim, status):
    sim.fail_next("GET", "/api/v1/instances", status, body=json.dumps({"success": False, "error": "unauthorized",
                                                                       "msg": "Unauthorized"}).encode())
    with pytest.raises(AuthError, match="VAST_API_KEY"):
        make(sim).list()


def test_a_missing_key_is_a_message_naming_the_variable(sim):
    provider = make(sim, key=None, environ={})  # constructing it needs no key: `orch status` of other providers works
    with pytest.raises(AuthError, match="set VAST_API_KEY"):
        provider.offers()
    assert make(sim, key=None, environ={"VAST_API_KEY": LAPTOP_KEY}).offers()


def test_an_offer_gone_between_search_and_create_is_insufficient_capacity_and_creates_nothing(sim):
    provider = make(sim)
    wanted = spec(provider)
    sim.offer_race(int(wanted.offer.offer_id))
    with pytest.raises(InsufficientCapacity, match="offer is gone.*no_such_ask"):
        provider.create(wanted)
    assert creates(sim) == [404] and sim.live() == []
    # 410 (cancel_unavail: it cannot start at once) says the same
    sim.fail_next("PUT", "/api/v0/asks/", 410, body=json.dumps({"success": False, "error": "no_such_ask", "msg": "error 410/3907: "
                                                                 "no_such_ask Instance type 5102 is no longer available.",
                                                                 "ask_id": 5102}).encode())
    with pytest.raises(InsufficientCapacity):
        provider.create(spec(provider))
    assert sim.live() == []


def test_no_credit_is_insufficient_funds_and_an_account_limit_quota_exceeded(sim):
    provider = make(sim)
    sim.balance_ok = False
    with pytest.raises(InsufficientFunds, match="credit"):
        provider.create(spec(provider))
    sim.balance_ok, sim.max_instances = True, 0
    with pytest.raises(QuotaExceeded, match="maximum number of instances"):
        provider.create(spec(provider))
    assert issubclass(QuotaExceeded, InsufficientCapacity), "so failover moves on to the next offer"
    assert sim.live() == []


def test_a_refusal_answered_with_200_is_still_a_refusal(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    sim.fail_next("PUT", f"/api/v0/instances/{created.instance_id}", 200,
                  body=json.dumps({"success": False, "error": "invalid_args", "msg": "state transition not allowed"}).encode())
    with pytest.raises(ProviderError, match="state transition not allowed"):
        provider.stop(created.instance_id)
    provider.terminate(created.instance_id)


def test_classify_reads_vasts_bodies():
    def answer(method: str, path: str, status: int, body: object, content: bytes | None = None) -> httpx.Response:
        request = httpx.Request(method, f"{URL}{path}", json={"state": "running"} if method == "PUT" else None)
        if content is not None:
            return httpx.Response(status, content=content, request=request)
        return httpx.Response(status, json=body, request=request)

    assert isinstance(classify(answer("GET", "/api/v0/instances/1/", 404, {"error": "auth_error", "msg": "Invalid user key"})),
                      AuthError)
    assert isinstance(classify(answer("GET", "/api/v0/instances/1/", 404, {"error": "not_found", "msg": "Instance not found"})),
                      NotFound)
    assert isinstance(classify(answer("GET", "/api/v0/instances/", 410, {"success": False, "error": "deprecated_endpoint"})),
                      BadResponse)
    limited = classify(answer("PUT", "/api/v0/instances/1/", 429, {"detail": "API requests too frequent endpoint threshold=1.5"}))
    assert isinstance(limited, RateLimited) and limited.retry_after == 1.5
    plain = classify(answer("GET", "/api/v1/instances/", 429, None, b"API requests too frequent endpoint threshold=3.0"))
    assert isinstance(plain, RateLimited) and plain.retry_after == 3.0, "Vast's 429 may be plain text"
    assert classify(answer("GET", "/api/v1/instances/", 503, {"error": "x"})) is None, "5xx: left to the status code"
    assert isinstance(classify(answer("PUT", "/api/v0/instances/1/", 400, {"error": "insufficient_credit",
                                                                           "msg": "not enough credit"})), InsufficientFunds)
    assert threshold(httpx.Response(429, json={"msg": "no number"})) is None
    assert endpoint("put", "/api/v0/instances/31000001/") == "PUT /api/v0/instances/{id}/"
    assert endpoint("PUT", "/api/v0/asks/5101/") == "PUT /api/v0/asks/{id}/"


# -- rate limits and spacing ----------------------------------------------------------------


def test_a_429_is_waited_out_for_its_threshold_and_that_endpoint_spaced_from_then_on(sim):
    waits: list[float] = []
    provider = make(sim, sleep=_sleeping(waits))
    created = provider.create(spec(provider))
    sim.thresholds["GET /api/v0/instances/{id}/"] = 0.3
    provider.get(created.instance_id)
    provider.get(created.instance_id)  # too soon: 429 "threshold=0.3", waited, answered
    assert sim.rate_limited == 1 and waits == [0.3]
    provider.get(created.instance_id)  # spaced by what Vast said: no second 429
    assert sim.rate_limited == 1 and len(waits) == 2 and 0 < waits[1] <= 0.3
    provider.list(), provider.list()  # another endpoint keeps its own (here: no) spacing
    assert sim.rate_limited == 1
    provider.terminate(created.instance_id)


def test_calls_of_one_endpoint_are_spaced_request_interval_apart(sim):
    sim.min_interval = 0.25  # every endpoint, as Vast's thresholds of 1-4.5 s, scaled down
    waits: list[float] = []
    provider = make(sim, sleep=_sleeping(waits), request_interval=0.25)
    t0 = time.monotonic()
    for _ in range(3):
        provider.list()
    assert sim.rate_limited == 0, "orch waited instead of hitting 429"
    assert time.monotonic() - t0 >= 0.45 and len(waits) == 2
    offers = provider.offers()  # a different endpoint: not held up by the list's spacing
    assert offers and len(waits) == 2


def test_a_429_from_another_client_of_the_key_is_retried(sim):
    sim.min_interval = 0.3
    waits: list[float] = []
    other, provider = make(sim), make(sim, sleep=_sleeping(waits))
    other.list()  # the same key's window used by someone else (another orch process, a tunnel daemon)
    assert provider.list() == []
    assert sim.rate_limited == 1 and waits == [0.3]


# -- retries ---------------------------------------------------------------------------------


def test_5xx_is_retried_for_reads_and_repeatable_calls_never_for_a_create(sim):
    waits: list[float] = []
    provider = make(sim, sleep=waits.append)
    sim.fail_next("GET", "/api/v1/instances", 503, times=2)
    assert provider.list() == [] and len(waits) == 2
    sim.fail_next("POST", "/api/v0/bundles", 502)
    assert provider.offers(), "the search is a read: retried"
    sim.fail_next("POST", "/api/v0/bundles", 500, times=4)
    with pytest.raises(ProviderUnavailable):
        provider.offers()
    wanted = spec(provider)
    sim.fail_next("PUT", "/api/v0/asks/", 500)
    with pytest.raises(ProviderUnavailable):
        provider.create(wanted)
    assert creates(sim) == [500] and sim.live() == [], "a create is never retried blindly"
    created = provider.create(wanted)
    running(provider, created.instance_id)
    sim.fail_next("PUT", f"/api/v0/instances/{created.instance_id}", 502)
    assert provider.stop(created.instance_id).status == InstanceStatus.STOPPED
    sim.fail_next("DELETE", f"/api/v0/instances/{created.instance_id}", 503)
    provider.terminate(created.instance_id)
    assert sim.instances[int(created.instance_id)].gone


def test_a_failed_key_attach_does_not_fail_the_create(sim, caplog):
    provider = make(sim)
    sim.fail_next("POST", "/api/v0/instances/", 500)
    created = provider.create(spec(provider))
    assert created.instance_id and "its start command installs it" in caplog.text
    provider.terminate(created.instance_id)


# -- the keys -----------------------------------------------------------------------------


def test_an_instances_own_key_can_only_stop_that_instance(sim):
    provider = make(sim)
    mine, other = provider.create(spec(provider, "a")), provider.create(spec(provider, "b", run="run2"))
    for created in (mine, other):
        running(provider, created.instance_id)
    key = sim.instances[int(mine.instance_id)].container_key
    api = VastApi(URL, key, transport=sim.transport(), sleep=lambda s: None, request_interval=0)
    for forbidden in (lambda: api.manage(int(other.instance_id), {"state": "stopped"}),
                      lambda: api.manage(int(mine.instance_id), {"state": "running", "label": "x"}),
                      lambda: api.destroy(int(mine.instance_id)), api.instances, lambda: api.search_offers({}),
                      lambda: api.request_logs(int(mine.instance_id))):
        with pytest.raises(AuthError):
            forbidden()
    assert api.instance(int(mine.instance_id))["id"] == int(mine.instance_id), "it may read its own instance"
    api.manage(int(mine.instance_id), {"state": "stopped"})
    assert sim.instances[int(mine.instance_id)].intended == "stopped" and sim.instances[int(other.instance_id)].actual == "running"
    assert sim.instances[int(mine.instance_id)].stop_requests[-1][1] == f"instance:{mine.instance_id}"
    provider.terminate(mine.instance_id)
    provider.terminate(other.instance_id)
    with pytest.raises(AuthError):
        api.instance(int(mine.instance_id))  # destroyed: its key is gone with it


def test_the_keys_never_reach_logs_errors_commands_or_answers(sim, caplog):
    caplog.set_level(logging.DEBUG)
    provider = make(sim)
    created = provider.create(spec(provider))
    running(provider, created.instance_id)
    provider.list()
    provider.stop(created.instance_id)
    container_key = sim.instances[int(created.instance_id)].container_key
    errors = []
    for bad in (lambda: make(sim, key="wrong-key-123").list(), lambda: provider.get("31999999"),
                lambda: make(sim, key="wrong-key-123").get(created.instance_id)):
        with pytest.raises(ProviderError) as e:
            bad()
        errors.append(str(e.value))
    command = provider.self_stop_command("box")
    headers = {"Authorization": f"Bearer {LAPTOP_KEY}"}
    answers = [sim.handle("GET", f"{URL}/api/v0/instances/{created.instance_id}/", headers, b"")[2].decode(),
               sim.handle("GET", f"{URL}/api/v1/instances/", headers, b"")[2].decode()]
    inst = sim.instances[int(created.instance_id)]
    written = [repr(provider.settings), command, json.dumps(inst.env), inst.onstart, inst.label, *errors, caplog.text, *answers]
    assert not [w for w in written if LAPTOP_KEY in w or "wrong-key-123" in w], "the account key stays on the laptop"
    assert not [w for w in answers if container_key in w], "Vast's answers never show the instance's own key"
    assert "stop.env" in command and "vast-stop.py" in command and "CONTAINER_API_KEY" not in command
    provider.terminate(created.instance_id)


def test_the_registry_token_goes_only_in_the_snapshot_request(sim, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    provider = VastProvider(Settings(api_url=URL, request_interval=0, snapshot_repo="alice/orch", snapshot_user="alice"),
                            tmp_path, api_key=LAPTOP_KEY, environ={"VAST_REGISTRY_TOKEN": "dckr_pat_secret"},
                            transport=sim.transport(), sleep=lambda s: None)
    created = provider.create(spec(provider))
    running(provider, created.instance_id)
    image = provider.save_image(created.instance_id, "img")
    assert "dckr_pat_secret" not in caplog.text + repr(provider.settings) + image.image_id
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"dckr_pat_secret" in p.read_bytes()]
    provider.terminate(created.instance_id)
