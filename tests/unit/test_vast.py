"""Vast.ai through its simulator's in-memory transport (no socket, no process): offers and filters,
status from actual/intended/cur (scheduling included), create, list through v1's pages, snapshots,
the start command's limits, settings and capabilities. Every request the provider sends and every
answer it reads is checked against the vendored spec (openapi.yaml, its gaps patched in vast_gaps).
Vast's error bodies, rate limits, retries and keys: test_vast_api.py."""

from __future__ import annotations

import base64
import gzip
import json
import time
from pathlib import Path

import pytest

from orchestrator.config import load_settings
from orchestrator.errors import ConfigError
from orchestrator.providers.base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    BadResponse,
    InstanceSpec,
    InstanceStatus,
    NotFound,
    UnsupportedOperation,
)
from orchestrator.providers.capabilities import NativeImages, ReportsStopReason, SelfStopCredentials
from orchestrator.providers.vast import Settings, VastProvider, configured
from orchestrator.providers.vast.provider import (
    ONSTART_LIMIT,
    START_COMMAND,
    START_MARK,
    STOP_MARK,
    STOP_PROGRAM,
    aliases,
    country,
    instance_label,
    instance_status,
    matches,
    split_count,
    tags_of,
)
from tests.simulators.vast_api import LAPTOP_KEY, SimOffer, VastSimulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXjb3JjaC11bml0LXRlc3Qta2V5LWJ5dGVzLTEyMzQ orch"
URL = "http://127.0.0.1"


@pytest.fixture
def sim():
    s = VastSimulator(hosts=False, provision_delay=0.0, pull_delay=0.0, restart_pull_delay=0.0, log_delay=0.0)
    yield s
    s.assert_clean()


def make(sim: VastSimulator, *, key: str | None = LAPTOP_KEY, environ: dict | None = None, sleep=lambda s: None,
         home: Path = Path("/nonexistent"), **settings) -> VastProvider:
    settings.setdefault("request_interval", 0.0)
    return VastProvider(Settings(api_url=URL, **settings), home, api_key=key, environ=environ or {},
                        transport=sim.transport(), sleep=sleep)


def spec(provider: VastProvider, name: str = "box", gpu: str = "RTX 4090", region: str | None = None, run: str = "run1",
         script: str = "#!/bin/sh\necho armed\n", image: str | None = None) -> InstanceSpec:
    offer = provider.offers(gpu=gpu, region=region)[0]
    return InstanceSpec(name=name, offer=offer, ssh_public_key=PUBLIC_KEY, tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: run},
                        startup_script=script, image_id=image)


def wait(provider: VastProvider, instance_id: str, status: InstanceStatus, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while (got := provider.get(instance_id)).status != status:
        assert time.monotonic() < deadline, f"{instance_id}: {got.status} ({got.raw_status}), not {status}"
        time.sleep(0.02)
    return got


def requests_to(sim: VastSimulator, method: str, prefix: str) -> list[tuple[str, int]]:
    return [(path, status) for _, m, path, status in sim.log if m == method and path.startswith(prefix)]


# -- offers ------------------------------------------------------------------------------


def test_offers_are_the_asks_that_pass_orchs_filters_cheapest_first(sim):
    offers = make(sim).offers()
    seen = [(o.gpu, o.gpu_count, o.region, o.price_per_hour, o.offer_id) for o in offers]
    assert seen == [("RTX 3090", 1, "CA", 0.2069, "5107"), ("RTX 4090", 1, "US", 0.3604, "5101"),
                    ("RTX 4090", 1, "DE", 0.3869, "5102"), ("RTX 4090", 1, "US", 0.4183, "5105"),
                    ("A100 SXM4", 1, "US", 1.1139, "5108"), ("H100 PCIE", 1, "JP", 1.8639, "5111"),
                    ("H100 SXM", 1, "SE", 2.1139, "5110")]
    assert all(o.provider == "vast" and o.available is True and o.currency == "USD" and not o.interruptible for o in offers)
    left_out = {"5103": "reliability 0.90", "5104": "unverified host", "5106": "CUDA 12.2 < the image's 12.8",
                "5109": "two GPUs", "5112": "a 30 GB disk < disk_gb 50", "5113": "50 Mbps"}
    assert not set(left_out) & {o.offer_id for o in offers}, left_out
    # The price is Vast's dph_total for the disk orch asks for: the GPU's $/h plus that disk's storage.
    ours = next(o for o in offers if o.offer_id == "5101")
    assert ours.price_per_hour == round(0.35 + 0.15 * 50 / 720, 4) and ours.details["price_includes_storage_gb"] == 50
    assert ours.details["geolocation"] == "California, US" and ours.details["reliability"] == 0.995
    assert make(sim, disk_gb=200).offers(gpu="4090")[0].price_per_hour == round(0.35 + 0.15 * 200 / 720, 4)


def test_the_search_asks_vast_for_the_filters(sim):
    sent: list[dict] = []
    transport = sim.transport()

    import httpx

    def spy(request):
        if request.url.path.endswith("/bundles/"):
            sent.append(json.loads(request.read()))
        return transport.handle_request(request)

    provider = VastProvider(Settings(api_url=URL, request_interval=0, min_vram_gb=40, datacenter_only=False),
                            Path("/nonexistent"), api_key=LAPTOP_KEY, environ={}, transport=httpx.MockTransport(spy),
                            sleep=lambda s: None)
    assert [o.gpu for o in provider.offers(gpu="A100", region="us", max_price=2.0)] == ["A100 SXM4"]
    q = sent[-1]
    assert q["gpu_name"] == {"in": ["A100 PCIE", "A100 SXM4"]} and q["geolocation"] == {"in": ["US"]}
    assert q["dph_total"] == {"lte": 2.0} and q["num_gpus"] == {"eq": 1} and q["gpu_ram"] == {"gte": 40960}
    assert q["reliability"] == {"gte": 0.98} and q["verified"] == {"eq": True} and q["disk_space"] == {"gte": 50}
    assert q["cuda_max_good"] == {"gte": 12.8} and q["inet_down"] == {"gte": 200.0} and q["direct_port_count"] == {"gte": 1}
    assert q["rentable"] == {"eq": True} and q["rented"] == {"eq": False} and q["type"] == "ondemand"
    assert q["allocated_storage"] == 50 and q["order"] == [["dph_total", "asc"], ["reliability", "desc"]]
    assert "datacenter" not in q


@pytest.mark.parametrize("wanted,names", [
    ("4090", {"RTX 4090"}), ("rtx 4090", {"RTX 4090"}), ("RTX_4090", {"RTX 4090"}), ("A100", {"A100 PCIE", "A100 SXM4"}),
    ("A100 SXM4", {"A100 SXM4"}), ("h100", {"H100 PCIE", "H100 SXM", "H100 NVL"}), ("A6000", {"RTX A6000"}),
    ("3090", {"RTX 3090"}), ("3090 Ti", {"RTX 3090 Ti"}), ("4080", {"RTX 4080"}), ("6000Ada", {"RTX 6000Ada"}),
])
def test_a_gpu_is_asked_for_as_users_say_it(wanted, names):
    from orchestrator.providers.vast.provider import GPUS

    assert {g for g in GPUS if matches(wanted, g)} == names
    assert "4090" in aliases("RTX 4090") and "4090" not in aliases("RTX 4090D")


def test_several_gpus_and_regions(sim):
    provider = make(sim)
    assert [(o.gpu, o.gpu_count, o.region, o.offer_id) for o in provider.offers(gpu="2x H100")] == [("H100 SXM", 2, "US", "5109")]
    assert split_count("2xH100") == (2, "H100") and split_count("A100") == (1, "A100")
    assert {o.region for o in provider.offers(region="us")} == {"US"}
    assert {o.region for o in provider.offers(gpu="4090", region="US, de")} == {"US", "DE"}
    assert provider.offers(gpu="H100", region="FR") == [], "a real country without offers: none, no error"
    assert {o.gpu for o in provider.offers(max_price=0.4)} == {"RTX 3090", "RTX 4090"}
    assert country("California, US") == "US" and country("Atlantis, AT") == "AT" and country("nowhere") == ""


def test_an_unknown_gpu_or_region_is_an_error_listing_the_valid_ones(sim):
    provider = make(sim)
    with pytest.raises(ConfigError, match=r"no GPU 'Z80'; valid GPUs: A10, A100 PCIE, .*RTX 4090, .*Tesla V100"):
        provider.offers(gpu="Z80")
    with pytest.raises(ConfigError, match=r"no region 'mars-1'; valid regions: two-letter country codes.*with offers now: "
                                          r"CA, DE, JP, SE, US"):
        provider.offers(region="mars-1")
    with pytest.raises(ConfigError, match="no region 'XX'"):
        provider.offers(region="XX")
    sim.add_offer(SimOffer(5200, 4000, "RTX 5880 Ada", 1, 49140, 0.9, 0.1, 0.99, "Ontario, CA"))
    assert [o.offer_id for o in provider.offers(gpu="5880 Ada")] == ["5200"], "a GPU on offer now that orch's table lacks"
    assert sim.live() == []


# -- status --------------------------------------------------------------------------------

PORTS = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}], "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41235"}]}


@pytest.mark.parametrize("row,status,words,endpoint", [
    ({"actual_status": None, "intended_status": "running", "cur_state": "running"}, InstanceStatus.PENDING, "provisioning", None),
    ({"actual_status": "loading", "intended_status": "running", "cur_state": "running"}, InstanceStatus.PENDING,
     "loading (pulling the image)", None),
    ({"actual_status": "running", "intended_status": "running", "cur_state": "running", "public_ipaddr": "203.0.113.7"},
     InstanceStatus.PENDING, "running, no public port for 22/tcp yet", None),
    ({"actual_status": "running", "intended_status": "running", "cur_state": "running", "public_ipaddr": "203.0.113.7",
      "ports": PORTS}, InstanceStatus.RUNNING, "running", ("203.0.113.7", 41234)),
    ({"actual_status": "running", "intended_status": "stopped", "cur_state": "stopped", "public_ipaddr": "203.0.113.7",
      "ports": PORTS}, InstanceStatus.STOPPING, "running, stop requested", None),
    ({"actual_status": "exited", "intended_status": "stopped", "cur_state": "stopped", "ports": PORTS}, InstanceStatus.STOPPED,
     "exited", None),
    ({"actual_status": "stopped", "intended_status": "stopped", "cur_state": "stopped"}, InstanceStatus.STOPPED, "stopped", None),
    # a restart whose GPU another renter took: "scheduling", possibly for ever: pending, so the time box applies
    ({"actual_status": "exited", "intended_status": "running", "cur_state": "stopped"}, InstanceStatus.PENDING,
     "scheduling: the start waits for its GPU, which another renter may hold, possibly for ever (orch stops waiting at "
     "its time box)", None),
    ({"actual_status": "exited", "intended_status": "running", "cur_state": "running", "status_msg": "Error: OOM"},
     InstanceStatus.ERROR, "exited: its container stopped by itself (Error: OOM)", None),
    ({"actual_status": "frozen", "intended_status": "frozen"}, InstanceStatus.UNKNOWN, "frozen (paused; Vast still bills its GPU)", None),
    ({"actual_status": "offline", "intended_status": "running"}, InstanceStatus.UNKNOWN, "offline (Vast has no heartbeat from "
                                                                                          "the host)", None),
    ({"actual_status": "running", "cur_state": "unloaded"}, InstanceStatus.TERMINATED, "unloaded", None),
    ({"actual_status": "something_new"}, InstanceStatus.UNKNOWN, "something_new", None),
])
def test_status_from_actual_intended_and_cur_state(row, status, words, endpoint):
    got, said, ssh = instance_status(row)
    assert (got, said) == (status, words)
    assert (None if ssh is None else (ssh.host, ssh.port, ssh.user)) == (None if endpoint is None else (*endpoint, "root"))


def test_a_restart_waiting_for_a_taken_gpu_is_pending_and_the_time_box_says_why(sim, monkeypatch):
    from orchestrator.lifecycle import provision

    provider = make(sim, start_wait_s=0)  # start() returns at once: the lifecycle's time box alone
    created = provider.create(spec(provider))
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    assert provider.stop(created.instance_id).status == InstanceStatus.STOPPED
    sim.take_gpu(5101)  # someone else rents the host's GPU while ours is stopped
    started = provider.start(created.instance_id)
    assert started.status == InstanceStatus.PENDING and started.raw_status.startswith("scheduling") and started.ssh is None
    monkeypatch.setattr(provision, "POLL_S", 0.02)
    problem = provision.wait_running(None, provider, started, timeout=0.2)
    assert problem.startswith("not running after 0s (still 'scheduling: the start waits for its GPU, which another renter")
    sim.free_gpu(5101)
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    provider.terminate(created.instance_id)


def test_a_start_stuck_scheduling_is_stopped_again_and_says_why(sim):
    from orchestrator.providers.base import InsufficientCapacity

    waits: list[float] = []
    provider = make(sim, start_wait_s=0.3, sleep=lambda s: (waits.append(s), time.sleep(s)))
    created = provider.create(spec(provider))
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    provider.stop(created.instance_id)
    sim.take_gpu(5101)
    with pytest.raises(InsufficientCapacity, match=r"still scheduling 0s after its start: another renter holds its host's GPU"):
        provider.start(created.instance_id)
    assert waits and provider.get(created.instance_id).status == InstanceStatus.STOPPED, "not left waiting for ever"
    # The GPU comes free while start() watches: it goes on.
    sim.free_gpu(5101)
    sim.take_gpu(5101)
    provider = make(sim, start_wait_s=5, sleep=time.sleep)
    import threading

    threading.Timer(0.3, sim.free_gpu, args=(5101,)).start()
    assert provider.start(created.instance_id).status in (InstanceStatus.PENDING, InstanceStatus.RUNNING)
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    provider.terminate(created.instance_id)


# -- create, get, list, stop, start, terminate ---------------------------------------------


def test_create_rents_the_ask_with_orchs_start_command_and_label(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    assert created.status == InstanceStatus.PENDING and created.run_id == "run1" and created.price_per_hour == 0.3604
    inst = sim.instances[int(created.instance_id)]
    assert inst.offer.ask_id == 5101 and inst.runtype == "ssh_direct" and inst.disk == 50
    assert inst.label == "orch.run1.box" and tags_of(inst.label) == {"orch": "1", "orch-name": "box", "orch-run": "run1"}
    assert inst.onstart == START_COMMAND and len(START_COMMAND) <= ONSTART_LIMIT
    assert gzip.decompress(base64.b64decode(inst.env["ORCH_BOOT"])).decode() == "#!/bin/sh\necho armed\n"
    assert base64.b64decode(inst.env["ORCH_SSH_KEY"]).decode() == PUBLIC_KEY and inst.keys == [PUBLIC_KEY]
    assert inst.env["ORCH_VAST_API"] == URL and inst.env["ORCH_VAST_VOLUME"] == "/workspace"
    assert inst.image.startswith("pytorch/pytorch:")
    got = wait(provider, created.instance_id, InstanceStatus.RUNNING)
    assert got.gpu == "RTX 4090" and got.region == "US" and got.price_per_hour == 0.3604 and got.tags == created.tags
    assert got.ssh is not None and got.ssh.user == "root"
    assert [i.instance_id for i in provider.list()] == [created.instance_id]
    assert sim.offers[5101].rented_by == created.instance_id and "5101" not in {o.offer_id for o in provider.offers()}
    provider.terminate(created.instance_id)
    assert sim.offers[5101].rented_by is None, "a destroy gives the GPU back to the market"


def test_the_onstart_fits_and_carries_the_stop_program():
    assert len(START_COMMAND) <= ONSTART_LIMIT, "Vast refuses a longer onstart"
    packed = START_COMMAND.split("echo ", 2)[2].split(" |", 1)[0]
    assert gzip.decompress(base64.b64decode(packed)).decode() == STOP_PROGRAM
    assert "CONTAINER_API_KEY" in START_COMMAND and "VAST_API_KEY" not in START_COMMAND.replace("CONTAINER_API_KEY", "")


def test_stop_start_terminate_and_repeats_are_harmless(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    assert provider.stop(created.instance_id).status == InstanceStatus.STOPPED
    assert provider.stop(created.instance_id).status == InstanceStatus.STOPPED, "a second stop is fine"
    assert [i.status for i in provider.list()] == [InstanceStatus.STOPPED], "a stopped instance is still listed"
    inst = sim.instances[int(created.instance_id)]
    assert inst.billing_since is None and sim.offers[5101].rented_by is None, "no GPU billing while stopped"
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
@pytest.mark.parametrize("instance_id", ["31999999", "orch-no-such-instance"])
def test_an_unknown_id_is_not_found(sim, operation, instance_id):
    with pytest.raises(NotFound):
        getattr(make(sim), operation)(instance_id)


def test_list_pages_through_v1_and_holds_only_orchs_instances(sim):
    for ask in range(6000, 6031):
        sim.add_offer(SimOffer(ask, ask * 10, "RTX 4090", 1, 24564, 0.5, 0.1, 0.99, "Texas, US"))
    provider = make(sim)
    made = [provider.create(spec(provider, name=f"b{n}", run=f"r{n}")).instance_id for n in range(30)]
    theirs = {"image": "vastai/base-image", "label": "my notebook", "runtype": "ssh"}
    status, _, _ = sim.handle("PUT", f"{URL}/api/v0/asks/6030/", {"Authorization": f"Bearer {LAPTOP_KEY}",
                                                                    "content-type": "application/json"}, json.dumps(theirs).encode())
    assert status == 200 and len(sim.live()) == 31
    listed = provider.list()
    assert sorted(i.instance_id for i in listed) == sorted(made), "all 30 of orch's (two pages), not the user's own"
    assert {i.name for i in listed} == {f"b{n}" for n in range(30)} and {i.run_id for i in listed} == {f"r{n}" for n in range(30)}
    pages = requests_to(sim, "GET", "/api/v1/instances")
    assert len(pages) == 2 and all(status == 200 for _, status in pages)
    assert [p for p, _ in requests_to(sim, "GET", "/api/v0/instances") if p.rstrip("/") == "/api/v0/instances"] == [], \
        "never the deprecated v0 list"
    for inst in sim.live():
        provider.terminate(str(inst.id))


def test_the_deprecated_v0_list_answers_deprecated_endpoint(sim):
    status, _, answer = sim.handle("GET", f"{URL}/api/v0/instances/", {"Authorization": f"Bearer {LAPTOP_KEY}"}, b"")
    assert status == 410 and json.loads(answer)["error"] == "deprecated_endpoint"


@pytest.mark.parametrize("status,body", [
    (200, b'{"success": false, "error": "deprecated_endpoint", "msg": "Use /api/v1/instances/ instead."}'),
    (410, b'{"success": false, "error": "deprecated_endpoint", "msg": "Use /api/v1/instances/ instead."}'),
    (200, b"<html>down for maintenance</html>"), (200, b'{"instances": "none"}'), (200, b'{"data": []}'), (200, b""),
    (200, b'{"instances": [{"id": "seven"}], "next_token": null}'), (200, b'{"instances": [], "next_token": 5}'),
    (200, b"[]"),
])
def test_a_list_in_a_shape_orch_does_not_know_is_an_error_never_no_instances(sim, status, body):
    sim.fail_next("GET", "/api/v1/instances", status, body=body, off_spec=True)
    with pytest.raises(BadResponse):
        make(sim).list()


def test_a_list_whose_next_token_repeats_is_an_error(sim):
    page = {"success": True, "instances": [], "next_token": "c2FtZQ=="}
    sim.fail_next("GET", "/api/v1/instances", 200, body=json.dumps(page).encode(), times=2)
    with pytest.raises(BadResponse, match="repeats its next_token"):
        make(sim).list()


def test_a_lost_create_answer_is_found_by_its_label(sim):
    """The create happened but its answer was lost (5xx after the fact): list finds it by the run id in its label."""
    from orchestrator.lifecycle.provision import find_by_run

    provider = make(sim)
    created = provider.create(spec(provider, run="lostrun"))
    found = find_by_run(provider, "lostrun")
    assert found is not None and found.instance_id == created.instance_id
    provider.terminate(created.instance_id)


# -- snapshots (native images) ----------------------------------------------------------------


def test_a_snapshot_goes_to_the_users_registry_and_its_reference_comes_back(sim, tmp_path):
    provider = make(sim, home=tmp_path, snapshot_repo="alice/orch-images", snapshot_user="alice",
                    environ={"VAST_REGISTRY_TOKEN": "dckr_pat_secret"})
    assert isinstance(provider, NativeImages)
    created = provider.create(spec(provider))
    wait(provider, created.instance_id, InstanceStatus.RUNNING)
    provider.stop(created.instance_id)
    image = provider.save_image(created.instance_id, "sd15 base/v1")
    assert image.image_id == "docker.io/alice/orch-images:sd15-base-v1" and image.provider == "vast"
    sent = sim.instances[int(created.instance_id)].snapshots[0]
    assert (sent["registry"], sent["repo"], sent["user"], sent["pause"]) == ("docker.io", "alice/orch-images:sd15-base-v1",
                                                                             "alice", "true")
    assert [i.image_id for i in provider.list_images()] == [image.image_id]
    assert "dckr_pat_secret" not in (tmp_path / "vast" / "snapshots.json").read_text()
    with pytest.raises(UnsupportedOperation, match="delete its tag there"):
        provider.delete_image(image.image_id)
    # A new instance from the snapshot pulls it with the registry's credentials (in the create body, nowhere else).
    again = provider.create(spec(provider, name="from-image", run="run2", image=image.image_id))
    assert sim.instances[int(again.instance_id)].image == image.image_id
    for inst in sim.live():
        provider.terminate(str(inst.id))


def test_a_snapshot_needs_the_repository_and_the_token(sim, tmp_path):
    with pytest.raises(UnsupportedOperation, match="set vast.snapshot_repo"):
        make(sim, home=tmp_path).save_image("31000001", "img")
    with pytest.raises(ConfigError, match="environment variable MY_TOKEN"):
        make(sim, home=tmp_path, snapshot_repo="alice/x", snapshot_user="alice", snapshot_token_env="MY_TOKEN").save_image(
            "31000001", "img")
    assert sim.log == [], "nothing was asked of Vast"


# -- stop reasons ------------------------------------------------------------------------------


def test_the_stop_reason_is_read_from_the_container_log_since_the_last_start(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    iid = int(created.instance_id)
    sim.console[iid] = [f"{START_MARK} 2026-11-20T10:00:00Z", "orch: start command done",
                        STOP_MARK + json.dumps({"reason": "idle 15m", "at": 1.0})]
    assert provider.stop_reason(created.instance_id) == "idle 15m"
    sim.console[iid].append(f"{START_MARK} 2026-11-20T11:00:00Z")
    assert provider.stop_reason(created.instance_id) is None, "an older stop's reason is not this one's"
    sim.console[iid].append(STOP_MARK + json.dumps({"reason": "max_lifetime 8h reached", "at": 2.0}))
    assert provider.stop_reason(created.instance_id) == "max_lifetime 8h reached"
    provider.terminate(created.instance_id)


def test_the_log_url_is_polled_until_uploaded_and_fetched_without_the_key(sim):
    sim.log_delay = 0.3
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    provider = make(sim, sleep=sleep)
    created = provider.create(spec(provider))
    sim.console[int(created.instance_id)] = [STOP_MARK + json.dumps({"reason": "budget $2.00 reached", "at": 1.0})]
    assert provider.stop_reason(created.instance_id) == "budget $2.00 reached"
    assert waits, "the first fetch found nothing yet (Vast uploads the log a moment later)"
    provider.terminate(created.instance_id)


# -- capabilities, runtime, settings --------------------------------------------------------


def test_capabilities_runtime_and_protocols(sim):
    provider = make(sim)
    caps = provider.capabilities
    assert caps.can_stop and caps.can_start and caps.self_stop and caps.port_forwarding and caps.prices_before_create
    assert caps.currency == "USD" and "RTX 4090" in caps.gpus and "on-demand" in caps.why_not("spot")
    assert isinstance(provider, NativeImages) and isinstance(provider, ReportsStopReason)
    assert not isinstance(provider, SelfStopCredentials), "the instance's own key is Vast's: the laptop hands nothing over"
    runtime = provider.runtime("box")
    assert (runtime.run_as, runtime.rearm, runtime.home, runtime.models_dir) == ("", "cron", "~/.orch", "/workspace/orch-models")
    assert make(sim, volume_path="/data").runtime("box").models_dir == "/data/orch-models"
    assert instance_label({RUN_TAG: "abc", NAME_TAG: "box"}, "box") == "orch.abc.box" and tags_of("my notebook") == {}


def test_settings_from_orch_yaml(tmp_path, monkeypatch):
    path = tmp_path / "orch.yaml"
    path.write_text("provider: vast\nvast:\n  api_url: http://127.0.0.1:9/api/v0\n  min_reliability: 0.99\n  disk_gb: 100\n"
                    "  min_cuda: '12.9'\n  snapshot_repo: alice/orch-images\n  snapshot_token_env: GHCR_TOKEN\n")
    section = load_settings(path, environ={}).provider_settings("vast")
    assert (section.api_url, section.min_reliability, section.disk_gb, section.min_cuda) == ("http://127.0.0.1:9", 0.99, 100, "12.9")
    assert (section.snapshot_repo, section.snapshot_token_env) == ("alice/orch-images", "GHCR_TOKEN")
    assert Settings().api_url == "https://console.vast.ai" and Settings().volume_path == "/workspace"
    for bad, message in (("api_url: http://console.vast.ai", "https"), ("api_url: https://x.io/other", "origin"),
                         ("min_reliability: 2", "from 0 to 1"), ("volume_path: workspace", "absolute path"),
                         ("disk_gb: 5", "from 10"), ("min_cuda: twelve", "major.minor"), ("snapshot_repo: 'A:b'", "lower case"),
                         ("snapshot_token_env: 'dckr_pat_x y'", "NAME of an environment variable"),
                         ("request_interval: -1", "from 0 to 600"), ("api_key: x", "unknown key")):
        path.write_text(f"vast:\n  {bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_settings(path, environ={})
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    assert configured(Settings()) is False
    monkeypatch.setenv("VAST_API_KEY", "k")
    assert configured(Settings()) is True
