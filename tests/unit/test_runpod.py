"""RunPod through its simulator's in-memory transport (no socket, no process): offers and filters,
status from the runtime, RunPod's problem answers, rate limits, retries, and where the keys may
and may not go. Every request the provider sends and every answer it reads is checked against
the vendored spec (openapi-v2.json)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from orchestrator.config import load_settings
from orchestrator.errors import ConfigError
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
from orchestrator.providers.capabilities import NativeImages, ReportsStopReason, SelfStopCredentials
from orchestrator.providers.runpod import RunPodProvider, Settings, configured
from orchestrator.providers.runpod.api import RunPodApi, ratelimit_windows
from orchestrator.providers.runpod.provider import START_MARK, STOP_MARK, pod_status, short_name, split_count
from tests.simulators.runpod_api import LAPTOP_KEY, RunPodSimulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXjb3JjaC11bml0LXRlc3Qta2V5LWJ5dGVzLTEyMzQ orch"
URL = "http://127.0.0.1/v2"


@pytest.fixture
def sim():
    s = RunPodSimulator(hosts=False, provision_delay=0.0, pull_delay=0.0, restart_pull_delay=0.0)
    yield s
    s.assert_clean()


def make(sim: RunPodSimulator, *, key: str | None = LAPTOP_KEY, environ: dict | None = None, sleep=lambda s: None,
         **settings) -> RunPodProvider:
    return RunPodProvider(Settings(api_url=URL, **settings), Path("/nonexistent"), api_key=key, environ=environ or {},
                          transport=sim.transport(), sleep=sleep)


def spec(provider: RunPodProvider, name: str = "box", gpu: str = "RTX 4090", region: str | None = None,
         run: str = "run1", script: str = "#!/bin/sh\necho armed\n") -> InstanceSpec:
    offer = next(o for o in provider.offers(gpu=gpu) if region in (None, o.region))
    return InstanceSpec(name=name, offer=offer, ssh_public_key=PUBLIC_KEY, tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: run},
                        startup_script=script)


def wait(provider: RunPodProvider, pod_id: str, status: InstanceStatus, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while (got := provider.get(pod_id)).status != status:
        assert time.monotonic() < deadline, f"{pod_id}: {got.status} ({got.raw_status}), not {status}"
        time.sleep(0.02)
    return got


def creates(sim: RunPodSimulator) -> list[int]:
    return [status for _, method, path, status in sim.log if method == "POST" and path == "/pods"]


# -- offers ------------------------------------------------------------------------------


def test_offers_are_gpu_types_in_the_data_centers_with_stock(sim):
    offers = make(sim).offers()
    seen = [(o.gpu, o.gpu_count, o.region, o.price_per_hour, o.offer_id) for o in offers]
    assert seen == [("RTX 4090", 1, "EU-RO-1", 0.69, "NVIDIA GeForce RTX 4090"), ("RTX 4090", 1, "US-KS-2", 0.69, "NVIDIA GeForce RTX 4090"),
                    ("A100 PCIe", 1, "US-TX-3", 1.64, "NVIDIA A100 80GB PCIe"), ("A100 SXM", 1, "US-KS-2", 1.74, "NVIDIA A100-SXM4-80GB"),
                    ("H100 PCIe", 1, "EU-RO-1", 2.39, "NVIDIA H100 PCIe"), ("H100 SXM", 1, "US-TX-3", 2.69, "NVIDIA H100 80GB HBM3")]
    assert all(o.provider == "runpod" and o.available is True and o.currency == "USD" and not o.interruptible for o in offers)
    assert {o.details["cloud"] for o in offers} == {"SECURE"}
    assert "L40S" not in {o.gpu for o in offers}, "catalogued, but no stock anywhere: no offer"
    assert "RTX A5000" not in {o.gpu for o in offers}, "its only data center's hosts have CUDA 12.6, below the image's 12.8"
    assert [o.region for o in make(sim, min_cuda_version="").offers(gpu="A5000")] == ["EU-SE-1"]
    sim.set_capacity("NVIDIA L40S", "EU-RO-1", 1)
    assert [(o.region, o.details["availability"]) for o in make(sim).offers(gpu="L40S")] == [("EU-RO-1", "LOW")]


def test_community_cloud_and_both(sim):
    assert [(o.region, o.price_per_hour) for o in make(sim, cloud="COMMUNITY").offers(gpu="4090")] == [("CA-MTL-1", 0.34)]
    both = make(sim, cloud="ALL").offers(gpu="4090")
    assert [(o.region, o.details["cloud"]) for o in both] == [("CA-MTL-1", "COMMUNITY"), ("EU-RO-1", "SECURE"), ("US-KS-2", "SECURE")]


@pytest.mark.parametrize("wanted,ids", [
    ("4090", {"NVIDIA GeForce RTX 4090"}), ("rtx 4090", {"NVIDIA GeForce RTX 4090"}),
    ("NVIDIA GeForce RTX 4090", {"NVIDIA GeForce RTX 4090"}), ("A100", {"NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB"}),
    ("A100 SXM", {"NVIDIA A100-SXM4-80GB"}), ("h100", {"NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3"}),
])
def test_a_gpu_is_asked_for_as_users_say_it(sim, wanted, ids):
    assert {o.offer_id for o in make(sim).offers(gpu=wanted)} == ids


def test_several_gpus_on_one_pod(sim):
    offers = make(sim).offers(gpu="2x H100")
    assert [(o.gpu, o.gpu_count, o.region, o.price_per_hour) for o in offers] == [("H100 SXM", 2, "US-TX-3", 5.38)], \
        "the PCIe H100 has one free GPU: no offer of two"
    assert split_count("2xH100") == (2, "H100") and split_count("A100") == (1, "A100")


def test_region_and_price_filters(sim):
    provider = make(sim)
    assert {(o.gpu, o.region) for o in provider.offers(region="us-ks-2")} == {("RTX 4090", "US-KS-2"), ("A100 SXM", "US-KS-2")}
    assert {o.region for o in provider.offers(region="EUROPE")} == {"EU-RO-1"}, "a continent takes its data centers"
    assert {o.gpu for o in provider.offers(max_price=1.7)} == {"RTX 4090", "A100 PCIe"}
    assert provider.offers(gpu="H100 SXM", region="US-KS-2") == [], "a known region without stock: no offer, no error"


def test_an_unknown_gpu_or_region_is_an_error_listing_the_valid_ones(sim):
    provider = make(sim)
    with pytest.raises(ConfigError, match=r"no GPU 'Z80'; valid GPUs: A100 PCIe, A100 SXM, .*RTX 4090"):
        provider.offers(gpu="Z80")
    with pytest.raises(ConfigError, match=r"no region 'mars-1'; valid regions: AP-JP-1, CA-MTL-1, .*US-TX-3.*EUROPE"):
        provider.offers(region="mars-1")
    launched = len(sim.pods)
    assert len(sim.pods) == launched


def test_gpu_names_from_ids():
    assert short_name("NVIDIA GeForce RTX 4090") == "RTX 4090"
    assert short_name("NVIDIA H100 80GB HBM3") == "H100 80GB HBM3"
    assert short_name("AMD Instinct MI300X OAM") == "Instinct MI300X OAM"


# -- status from the runtime -------------------------------------------------------------


RUNNING_PORTS = {"ports": [{"private": 22, "public": 34446, "type": "tcp", "ip": "195.26.233.3"}], "uptime": 5}
DIRECT = {"proxy": {"host": "ssh.runpod.io", "port": 22, "username": "x-1", "command": ""},
          "direct": {"host": "195.26.233.3", "port": 34446, "username": "root", "command": ""}}


@pytest.mark.parametrize("pod,status,words,endpoint", [
    ({"status": "PROVISIONING", "runtime": None}, InstanceStatus.PENDING, "PROVISIONING", None),
    ({"status": "STARTING", "runtime": None}, InstanceStatus.PENDING, "STARTING", None),
    # a pod pulling a 20 GB image whose status word already says RUNNING: not running yet
    ({"status": "RUNNING", "runtime": None}, InstanceStatus.PENDING, "RUNNING, no runtime yet (pulling the image or starting "
                                                                    "the container)", None),
    ({"status": "RUNNING", "runtime": {"uptime": 1, "ports": []}}, InstanceStatus.PENDING, "RUNNING, no public port for 22/tcp yet",
     None),
    ({"status": "RUNNING", "runtime": RUNNING_PORTS, "ssh": {"proxy": None, "direct": None}}, InstanceStatus.RUNNING, "RUNNING",
     ("195.26.233.3", 34446)),
    ({"status": "RUNNING", "runtime": {"uptime": 1}, "ssh": DIRECT}, InstanceStatus.RUNNING, "RUNNING", ("195.26.233.3", 34446)),
    # an exited pod's ports are stale: no endpoint
    ({"status": "EXITED", "runtime": RUNNING_PORTS, "ssh": DIRECT}, InstanceStatus.STOPPED, "EXITED", None),
    ({"status": "ERROR", "runtime": None}, InstanceStatus.ERROR, "ERROR", None),
    ({"status": "TERMINATED", "runtime": None}, InstanceStatus.TERMINATED, "TERMINATED", None),
    ({"status": "SOMETHING_NEW", "runtime": None}, InstanceStatus.UNKNOWN, "SOMETHING_NEW", None),
])
def test_status_comes_from_the_runtime_not_only_the_status_word(pod, status, words, endpoint):
    got, said, ssh = pod_status(pod)
    assert (got, said) == (status, words)
    assert (None if ssh is None else (ssh.host, ssh.port)) == endpoint
    assert ssh is None or ssh.user == "root"


def test_a_pod_pulling_its_image_is_pending_until_it_runs(sim):
    provider = make(sim)
    pending = spec(provider)
    sim.stuck_pulling(pending.offer.offer_id, pending.offer.region)  # shown RUNNING, no runtime, forever
    created = provider.create(pending)
    sim.wait_status(created.instance_id, "STARTING")
    got = provider.get(created.instance_id)
    assert got.status == InstanceStatus.PENDING and got.ssh is None and got.raw_status.startswith("RUNNING, no runtime")
    assert provider.get(created.instance_id).status.is_billing_compute
    provider.terminate(created.instance_id)


def test_an_exited_pod_reporting_stale_ports_is_stopped_without_ssh(sim):
    sim.stale_ports = True
    provider = make(sim)
    created = provider.create(spec(provider))
    running = wait(provider, created.instance_id, InstanceStatus.RUNNING)
    assert running.ssh is not None and running.ssh.port == sim.ssh_port
    provider.stop(created.instance_id)
    raw = json.loads(sim.handle("GET", f"{URL}/pods/{created.instance_id}", {"Authorization": f"Bearer {LAPTOP_KEY}"}, b"")[2])
    assert raw["status"] == "EXITED" and raw["runtime"]["ports"] and raw["ssh"]["direct"], "the answer still shows old ports"
    stopped = provider.get(created.instance_id)
    assert stopped.status == InstanceStatus.STOPPED and stopped.ssh is None and not stopped.status.is_billing_compute
    provider.terminate(created.instance_id)


# -- create, get, list, stop, start, terminate ---------------------------------------------


def test_create_sends_a_pod_orch_can_reach_and_find_again():
    # Its own simulator, whose pods take a second to place: with no delay the pod could be RUNNING
    # before create's answer was written, and this test checks that a fresh pod reads PENDING.
    sim = RunPodSimulator(hosts=False, provision_delay=1.0, pull_delay=0.0, restart_pull_delay=0.0)
    provider = make(sim)
    created = provider.create(spec(provider))
    assert created.status == InstanceStatus.PENDING and created.run_id == "run1" and created.price_per_hour == 0.69
    pod = sim.pods[created.instance_id]
    assert pod.ports == ["22/tcp"], "direct SSH (the proxy cannot forward ports), nothing else published"
    assert pod.env["PUBLIC_KEY"] == PUBLIC_KEY
    assert json.loads(pod.env["ORCH_TAGS"]) == {"orch": "1", "orch-name": "box", "orch-run": "run1"}
    assert pod.args.startswith("sh -c ") and "stop.env" in pod.args and "authorized_keys" in pod.args
    assert pod.mount == {"persistent": {"size": 50, "path": "/workspace"}} and pod.disk == 40
    assert pod.cloud == "SECURE" and pod.dc == created.region and pod.image.startswith("runpod/pytorch:")
    import base64
    import gzip

    assert gzip.decompress(base64.b64decode(pod.env["ORCH_BOOT"])).decode() == "#!/bin/sh\necho armed\n"
    got = wait(provider, created.instance_id, InstanceStatus.RUNNING)
    assert got.gpu == "RTX 4090" and got.region == pod.dc and got.price_per_hour == 0.69 and got.tags == created.tags
    assert [i.instance_id for i in provider.list()] == [created.instance_id]
    provider.terminate(created.instance_id)
    sim.assert_clean()


def test_stop_start_terminate_and_repeats_are_harmless(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    assert provider.stop(created.instance_id).status == InstanceStatus.STOPPED
    assert provider.stop(created.instance_id).status == InstanceStatus.STOPPED, "a second stop (409) is fine"
    assert [i.status for i in provider.list()] == [InstanceStatus.STOPPED], "a stopped pod is still listed"
    assert sim.pods[created.instance_id].billing_since is None, "no GPU billing while stopped"
    provider.start(created.instance_id)
    assert provider.start(created.instance_id).status in (InstanceStatus.PENDING, InstanceStatus.RUNNING), "a second start is fine"
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    assert provider.terminate(created.instance_id).status == InstanceStatus.TERMINATED
    with pytest.raises(NotFound):
        provider.get(created.instance_id)
    with pytest.raises(NotFound):
        provider.terminate(created.instance_id)
    assert provider.list() == []


@pytest.mark.parametrize("operation", ["get", "stop", "start", "terminate"])
def test_an_unknown_id_is_not_found(sim, operation):
    with pytest.raises(NotFound):
        getattr(make(sim), operation)("nosuchpod12345")


def test_list_holds_only_orchs_pods(sim):
    provider = make(sim)
    provider.create(spec(provider))
    theirs = {"name": "mine", "image": "runpod/pytorch:x", "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1}}
    status, _, _ = sim.handle("POST", f"{URL}/pods", {"Authorization": f"Bearer {LAPTOP_KEY}", "content-type": "application/json"},
                              json.dumps(theirs).encode())
    assert status == 201 and len(sim.live()) == 2
    assert [i.name for i in provider.list()] == ["box"], "the user's own pod is not orch's"
    for pod in sim.live():
        provider.terminate(pod.id)


def test_capabilities_runtime_and_protocols(sim):
    provider = make(sim)
    caps = provider.capabilities
    assert caps.can_stop and caps.can_start and caps.self_stop and caps.port_forwarding and caps.prices_before_create
    assert "cannot snapshot" in caps.why_not("native_images")
    assert not isinstance(provider, NativeImages) and isinstance(provider, ReportsStopReason)
    assert not isinstance(provider, SelfStopCredentials), "the pod's own key is RunPod's: the laptop hands nothing over"
    runtime = provider.runtime("box")
    assert (runtime.run_as, runtime.rearm, runtime.home, runtime.models_dir) == ("", "cron", "~/.orch", "/workspace/orch-models")
    assert make(sim, volume_path="/data").runtime("box").models_dir == "/data/orch-models"


def test_the_stop_reason_is_read_from_the_container_log_since_the_last_start(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    pod_id = created.instance_id
    sim.console[pod_id] = [f"{START_MARK} 2026-11-20T10:00:00Z", "orch: start command done",
                           STOP_MARK + json.dumps({"reason": "idle 15m", "at": 1.0})]
    assert provider.stop_reason(pod_id) == "idle 15m"
    sim.console[pod_id].append(f"{START_MARK} 2026-11-20T11:00:00Z")
    assert provider.stop_reason(pod_id) is None, "an older stop's reason is not this one's"
    sim.console[pod_id].append(STOP_MARK + json.dumps({"reason": "max_lifetime 8h reached", "at": 2.0}))
    assert provider.stop_reason(pod_id) == "max_lifetime 8h reached"
    provider.terminate(pod_id)


# -- faults and RunPod's answers -------------------------------------------------------------


def test_no_capacity_is_insufficient_capacity_and_creates_nothing(sim):
    provider = make(sim)
    full = spec(provider)
    sim.set_capacity(full.offer.offer_id, full.offer.region, 0)
    with pytest.raises(InsufficientCapacity, match="could not place it: There are no longer any instances"):
        provider.create(full)
    sim.capacity_race("NVIDIA GeForce RTX 4090", "US-KS-2")
    with pytest.raises(InsufficientCapacity):
        provider.create(spec(provider, region="US-KS-2"))
    assert sim.live() == []


def test_the_spend_limit_is_quota_exceeded_and_no_balance_is_insufficient_funds(sim):
    sim.spend_limit = 1.0
    provider = make(sim)
    with pytest.raises(QuotaExceeded, match="spend limit"):
        provider.create(spec(provider, gpu="H100 SXM"))
    assert issubclass(QuotaExceeded, InsufficientCapacity), "so failover moves on to the next offer"
    sim.balance_ok = False
    with pytest.raises(InsufficientFunds, match="balance"):
        provider.create(spec(provider))
    assert sim.live() == []


def test_a_start_on_a_full_host_is_insufficient_capacity(sim):
    provider = make(sim)
    created = provider.create(spec(provider, region="EU-RO-1"))
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    provider.stop(created.instance_id)
    sim.set_capacity("NVIDIA GeForce RTX 4090", "EU-RO-1", 0)  # someone else took the GPUs of its host
    with pytest.raises(InsufficientCapacity, match="not enough free GPUs"):
        provider.start(created.instance_id)
    provider.terminate(created.instance_id)


def test_a_refused_key_is_an_auth_error_naming_the_variable_not_the_key(sim):
    with pytest.raises(AuthError, match="RUNPOD_API_KEY") as e:
        make(sim, key="not-a-real-key").offers()
    assert "not-a-real-key" not in str(e.value) and "401" in str(e.value)
    sim.fail_next("GET", "/pods", 403)
    with pytest.raises(AuthError, match="RUNPOD_API_KEY"):
        make(sim).list()


def test_a_missing_key_is_a_message_naming_the_variable(sim):
    provider = make(sim, key=None, environ={})  # constructing it needs no key: `orch status` of other providers works
    with pytest.raises(AuthError, match="set RUNPOD_API_KEY"):
        provider.offers()
    assert make(sim, key=None, environ={"RUNPOD_API_KEY": LAPTOP_KEY}).offers()


def test_5xx_is_retried_for_reads_and_repeatable_actions_never_for_a_create(sim):
    waits: list[float] = []
    provider = make(sim, sleep=waits.append)
    sim.fail_next("GET", "/pods", 503, times=2)
    assert provider.list() == [] and len(waits) == 2
    sim.fail_next("GET", "/catalog/gpus", 500, times=4)
    with pytest.raises(ProviderUnavailable):
        provider.offers()
    offer_spec = spec(provider)
    sim.fail_next("POST", "/pods", 500)
    with pytest.raises(ProviderUnavailable):
        provider.create(offer_spec)
    assert creates(sim) == [500] and sim.live() == [], "a create is never retried blindly"
    created = provider.create(offer_spec)
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    sim.fail_next("POST", f"/pods/{created.instance_id}/action", 502)
    assert provider.stop(created.instance_id).status == InstanceStatus.STOPPED
    sim.fail_next("DELETE", f"/pods/{created.instance_id}", 503)
    provider.terminate(created.instance_id)
    assert sim.pods[created.instance_id].status == "TERMINATED"


@pytest.mark.parametrize("body", [b"<html>down for maintenance</html>", b'{"pods": "none"}', b'{"pods": [{"id": 7}]}',
                                  b'{"data": []}', b"", b'{"success": false, "error": "deprecated_endpoint"}'])
def test_a_list_that_cannot_be_read_is_bad_response_never_empty(sim, body):
    sim.fail_next("GET", "/pods", 200, body=body, off_spec=True)
    with pytest.raises(BadResponse):
        make(sim).list()


def test_rest_v1_answers_410_and_is_refused_in_the_settings(sim, tmp_path):
    status, _, answer = sim.handle("GET", "http://127.0.0.1/v1/pods", {"Authorization": f"Bearer {LAPTOP_KEY}"}, b"")
    assert status == 410 and "retired" in json.loads(answer)["detail"]
    api = RunPodApi("http://127.0.0.1/v1", LAPTOP_KEY, transport=sim.transport(), sleep=lambda s: None)
    with pytest.raises(ProviderError, match="410 Gone.*retired REST v1 on 2026-11-15.*api.runpod.io/v2"):
        api.pods()
    path = tmp_path / "orch.yaml"
    for url in ("https://rest.runpod.io/v1", "https://api.runpod.io/graphql"):
        path.write_text(f"runpod:\n  api_url: {url}\n")
        with pytest.raises(ConfigError, match="retired on 2026-11-15"):
            load_settings(path, environ={})


# -- rate limits ---------------------------------------------------------------------------


def _sleeping(waits: list[float]):
    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    return sleep


def test_ratelimit_headers_are_read():
    assert ratelimit_windows('"minute";r=0;t=42, "hour";r=2950;t=1800') == [("minute", 0, 42.0), ("hour", 2950, 1800.0)]
    assert ratelimit_windows("garbage") == [("garbage", None, None)] and ratelimit_windows("") == []


def test_a_429_is_waited_out_for_its_retry_after(sim):
    waits: list[float] = []
    provider = make(sim, sleep=waits.append)
    sim.fail_next("GET", "/pods", 429, headers={"retry-after": "3", "ratelimit": '"minute";r=0;t=3'},
                  body=json.dumps({"title": "Too Many Requests", "status": 429, "detail": "Rate limit exceeded"}).encode())
    assert provider.list() == []
    assert waits == [3.0], "told to wait 3 s (Retry-After), it waited, then it was answered"


def test_a_used_up_window_is_waited_for_before_the_next_call(sim):
    sim.rate_quota, sim.rate_window = 3, 1.0
    waits: list[float] = []
    provider = make(sim, sleep=_sleeping(waits))
    t0 = time.monotonic()
    for _ in range(5):
        provider.list()
    assert sim.rate_limited == 0, "the RateLimit header said r=0: the client waited for the reset instead of hitting 429"
    assert waits and time.monotonic() - t0 >= 0.9


def test_a_429_from_another_client_of_the_account_is_retried(sim):
    sim.rate_quota, sim.rate_window = 2, 1.0
    waits: list[float] = []
    other, provider = make(sim), make(sim, sleep=_sleeping(waits))
    other.list()
    other.list()  # the account's window is used up by someone else (another orch, the pod's agent)
    assert provider.list() == []
    assert sim.rate_limited == 1 and waits == [1.0]


def test_rate_limited_carries_the_wait():
    import httpx

    from orchestrator.providers.runpod.api import classify

    request = httpx.Request("GET", "http://127.0.0.1/v2/pods")
    answer = httpx.Response(429, headers={"ratelimit": '"minute";r=0;t=7, "hour";r=0;t=30'}, json={"detail": "slow down"},
                            request=request)
    error = classify(answer)
    assert isinstance(error, RateLimited) and error.retry_after == 30.0


# -- the keys -----------------------------------------------------------------------------


def test_a_pods_own_key_can_only_stop_that_pod(sim):
    provider = make(sim)
    mine, other = provider.create(spec(provider, "a")), provider.create(spec(provider, "b", run="run2"))
    for created in (mine, other):
        wait(provider, created.instance_id, InstanceStatus.RUNNING)
    pod_key = sim.pods[mine.instance_id].pod_key
    api = RunPodApi(URL, pod_key, transport=sim.transport(), sleep=lambda s: None)
    for forbidden in (lambda: api.action(other.instance_id, "stop"), lambda: api.action(mine.instance_id, "terminate"),
                      lambda: api.pod(mine.instance_id), api.pods, lambda: api.delete_pod(mine.instance_id)):
        with pytest.raises(AuthError):
            forbidden()
    api.action(mine.instance_id, "stop")
    assert sim.pods[mine.instance_id].status == "EXITED" and sim.pods[other.instance_id].status == "RUNNING"
    assert sim.pods[mine.instance_id].stop_requests[-1][1] == f"pod:{mine.instance_id}"
    provider.terminate(mine.instance_id)
    provider.terminate(other.instance_id)


def test_the_keys_never_reach_logs_errors_commands_or_the_pod(sim, caplog):
    caplog.set_level(logging.DEBUG)
    provider = make(sim)
    created = provider.create(spec(provider))
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    provider.list()
    provider.stop(created.instance_id)
    pod_key = sim.pods[created.instance_id].pod_key
    errors = []
    for bad in (lambda: make(sim, key="wrong-key-123").list(), lambda: provider.get("nope")):
        with pytest.raises(ProviderError) as e:
            bad()
        errors.append(str(e.value))
    command = provider.self_stop_command("box")
    answers = [sim.handle("GET", f"{URL}/pods/{created.instance_id}", {"Authorization": f"Bearer {LAPTOP_KEY}"}, b"")[2].decode(),
               sim.handle("GET", f"{URL}/pods", {"Authorization": f"Bearer {LAPTOP_KEY}"}, b"")[2].decode()]
    pod = sim.pods[created.instance_id]
    written = [repr(provider.settings), command, json.dumps(pod.env), pod.args, *errors, caplog.text, *answers]
    assert not [w for w in written if LAPTOP_KEY in w or "wrong-key-123" in w], "the account key stays on the laptop"
    assert not [w for w in answers if pod_key in w], "RunPod's answers never show the pod's own key"
    assert "stop.env" in command and "runpod-stop.py" in command
    provider.terminate(created.instance_id)


def test_settings_from_orch_yaml(tmp_path, monkeypatch):
    path = tmp_path / "orch.yaml"
    path.write_text("provider: runpod\nrunpod:\n  api_url: http://127.0.0.1:9/v2\n  cloud: community\n  volume_gb: 100\n"
                    "  min_cuda_version: '12.9'\n")
    section = load_settings(path, environ={}).provider_settings("runpod")
    assert (section.api_url, section.cloud, section.volume_gb, section.min_cuda_version) == ("http://127.0.0.1:9/v2", "COMMUNITY", 100, "12.9")
    assert Settings().api_url == "https://api.runpod.io/v2" and Settings().volume_path == "/workspace"
    for bad, message in (("api_url: http://api.example.com/v2", "https"), ("cloud: cheap", "SECURE, COMMUNITY, ALL"),
                         ("volume_path: workspace", "absolute path"), ("volume_path: /root", "absolute path"),
                         ("volume_gb: 5", "from 10"), ("min_cuda_version: twelve", "major.minor"), ("api_key: x", "unknown key")):
        path.write_text(f"runpod:\n  {bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_settings(path, environ={})
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    assert configured(Settings()) is False
    monkeypatch.setenv("RUNPOD_API_KEY", "k")
    assert configured(Settings()) is True
