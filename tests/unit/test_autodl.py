"""AutoDL through its simulator's in-memory transport (no socket, no process): offers from the dated
GPU table, AutoDL's error codes in HTTP-200 answers, money in thousandths of a yuan, query-string
GETs, the power-off/save/release sequences, tags in the instance name, and where the token and the
root password may and may not go. Every request the provider sends and every answer it reads is
checked against tests/simulators/autodl_schema.json."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.config import load_settings
from orchestrator.errors import ConfigError
from orchestrator.lifecycle.provision import find_by_run
from orchestrator.providers.autodl import AutoDLProvider, Settings, configured, provider as autodl_provider
from orchestrator.providers.autodl.api import AutoDLApi, InvalidParameters, to_cny
from orchestrator.providers.autodl.gpus import GPU_SPECS, PRO_REGIONS, TABLE_DATE, find
from orchestrator.providers.autodl.provider import instance_name, start_command, tags_of, when
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
    InvalidState,
    NotFound,
    ProviderUnavailable,
    UnsupportedOperation,
)
from orchestrator.providers.capabilities import NativeImages, ReportsStopReason
from tests.simulators.autodl_api import PRO, SPECS, TOKEN, AutoDLSimulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXjb3JjaC11bml0LXRlc3Qta2V5LWJ5dGVzLTEyMzQ orch"


@pytest.fixture
def sim():
    s = AutoDLSimulator(hosts=False, shutdown_delay=0.0, release_delay=0.0, image_seconds=0.05)
    yield s
    s.wait_settled()
    s.assert_clean()


class Keys:
    """The key installer's stand-in: what create hands it (the root password, once)."""

    def __init__(self):
        self.calls: list[tuple[str, int, str, str, str]] = []

    def __call__(self, endpoint, password, public_key, timeout):
        self.calls.append((endpoint.host, endpoint.port, endpoint.user, password, public_key))


def make(sim: AutoDLSimulator, *, token: str | None = TOKEN, keys: Keys | None = None, transport=None, **settings) -> AutoDLProvider:
    base = {"api_url": "http://127.0.0.1:1", "poll_interval": 0.01, "request_interval": 0.0, **settings}
    return AutoDLProvider(Settings(**base), Path("/nonexistent"), token=token, environ={},
                          transport=transport or sim.transport(), sleep=lambda s: time.sleep(min(s, 0.01)),
                          key_installer=keys or Keys())


def spec(provider: AutoDLProvider, name: str = "box", gpu: str = "RTX 4090D", region: str | None = None,
         run: str = "0123456789abcdef") -> InstanceSpec:
    offer = next(o for o in provider.offers(gpu=gpu) if region in (None, o.region))
    return InstanceSpec(name=name, offer=offer, ssh_public_key=PUBLIC_KEY, tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: run},
                        startup_script="#!/bin/sh\necho armed\n")


def calls(sim: AutoDLSimulator) -> list[tuple[str, str]]:
    return [(method, path.removeprefix(PRO).removeprefix("/api/v1/dev")) for _, method, path, _ in sim.log]


# -- offers and the GPU table -------------------------------------------------------------


def test_offers_are_the_table_in_the_pro_data_centers_priced_after_create(sim):
    offers = make(sim).offers()
    assert [(o.gpu, o.region) for o in offers[:2]] == [("RTX 4090 48GB", "westDC3"), ("RTX 4090D", "westDC3")]
    assert {o.region for o in offers} == set(PRO_REGIONS) and len(offers) == len(GPU_SPECS) * 2
    assert all(o.provider == "autodl" and o.price_per_hour is None and o.currency == "CNY" and o.gpu_count == 1 for o in offers)
    assert {o.offer_id for o in offers} == {s.spec_uuid for s in GPU_SPECS}, "the offer id is AutoDL's gpu_spec_uuid"
    assert all(o.available is True and o.details["table_date"] == TABLE_DATE for o in offers)
    assert offers[0].as_json()["price_per_hour"] is None


def test_stock_says_which_offers_have_idle_gpus_and_is_only_a_hint(sim):
    sim.set_stock("5090-p", "westDC3", 0)
    offers = make(sim).offers(gpu="5090")
    assert [(o.region, o.available, o.details["idle_gpus"]) for o in offers] == [("westDC3", False, 0), ("beijingDC2", True, 4)]
    sim.fail_next("/api/v1/dev/machine/region/gpu_stock", "http-502", times=8)
    assert {o.available for o in make(sim).offers(gpu="5090")} == {None}, "no answer: unknown, not unavailable"
    assert {o.available for o in make(sim, stock=False).offers(gpu="5090")} == {None}
    sim.faults.clear()


@pytest.mark.parametrize("wanted,spec_uuid", [
    ("RTX 4090", "v-48g"), ("4090", "v-48g"), ("4090-48G", "v-48g"), ("rtx 4090d", "4090D"), ("4090D", "4090D"),
    ("3090", "v-48g-350w"), ("4080S", "v-32g-p"), ("5090-p", "5090-p"), ("PRO6000-96G", "pro6000-p"), ("H800", "h800"),
])
def test_a_gpu_is_asked_for_as_users_say_it_and_becomes_a_spec_id(sim, wanted, spec_uuid):
    assert {o.offer_id for o in make(sim).offers(gpu=wanted)} == {spec_uuid}


def test_the_table_is_dated_unique_and_matches_autodls_stock_names():
    assert len(TABLE_DATE) == 7 and TABLE_DATE[4] == "-"
    assert len({s.spec_uuid for s in GPU_SPECS}) == len({s.name for s in GPU_SPECS}) == len(GPU_SPECS)
    for s in GPU_SPECS:
        assert find(s.name) is s and find(s.spec_uuid) is s and all(find(a) is s for a in s.aliases)
        assert SPECS[s.spec_uuid][1] == s.stock_name, "the simulator's stock names are the table's"


def test_orch_yaml_adds_specs_newer_than_the_table(sim):
    provider = make(sim, gpu_specs={"RTX 5090 D": "5090d-p"})
    [offer] = provider.offers(gpu="RTX 5090 D", region="westDC3")
    assert offer.offer_id == "5090d-p" and "RTX 5090 D" in provider.capabilities.gpus


def test_unknown_gpu_or_region_is_an_error_listing_the_valid_ones(sim):
    provider = make(sim, token="")  # checked before any call: no token needed to be told
    with pytest.raises(ConfigError, match=rf"no GPU 'Z80'; valid GPUs: RTX 4090 48GB \(v-48g\), .*H800 \(h800\) .*{TABLE_DATE}"):
        provider.offers(gpu="Z80")
    with pytest.raises(ConfigError, match=r"no region 'mars-1'; valid regions: westDC3 \(西北B区\), beijingDC2 \(北京B区\)"):
        provider.offers(region="mars-1")
    with pytest.raises(ConfigError, match=r"neimengDC1 .* only elastic deployments; .* westDC3"):
        provider.offers(region="neimengDC1")
    assert [o.region for o in make(sim).offers(gpu="5090", region="北京B区")] == ["beijingDC2"], "the console name works too"


def test_a_price_cap_cannot_be_checked_before_create_and_says_so(sim):
    with pytest.raises(ConfigError, match="prices an instance only once it exists"):
        make(sim).offers(max_price=2.0)


# -- create, get, list --------------------------------------------------------------------


def test_create_puts_orchs_key_on_with_the_password_once_and_reports_the_price_in_cny(sim):
    keys = Keys()
    provider = make(sim, keys=keys)
    created = provider.create(spec(provider))
    inst = sim.instances[created.instance_id]
    assert created.status == InstanceStatus.RUNNING and created.run_id == "0123456789abcdef" and created.name == "box"
    assert (created.price_per_hour, created.currency) == (1.88, "CNY") and created.gpu == "RTX 4090D"
    assert created.ssh.user == "root" and created.ssh.key_path == ""
    assert keys.calls == [(created.ssh.host, created.ssh.port, "root", inst.password, PUBLIC_KEY)]
    assert inst.name == "orch.0123456789abcdef.box" and inst.spec == "4090D" and inst.data_center == "westDC3"
    assert inst.image_uuid == "base-image-l2t43iu6uk" and inst.expand_gb == 0
    assert "armed" not in inst.start_command, "the script travels packed"
    got = provider.get(created.instance_id)
    assert got.status == InstanceStatus.RUNNING and got.tags == created.tags and got.region == "westDC3"
    assert [i.instance_id for i in provider.list()] == [created.instance_id]


def test_create_is_never_retried_and_a_failed_create_is_found_by_its_run_id(sim):
    provider = make(sim)
    sim.fail_next(f"{PRO}/create", "after-create-502")
    with pytest.raises(ProviderUnavailable, match="502"):
        provider.create(spec(provider, run="feedfacecafebeef"))
    assert calls(sim).count(("POST", "/create")) == 1
    found = find_by_run(provider, "feedfacecafebeef")
    assert found is not None and found.status.is_billing_compute and found.name == "box"
    sim.fail_next(f"{PRO}/create", "after-create-error")  # an error envelope, yet it was created
    with pytest.raises(Exception, match="系统繁忙"):
        provider.create(spec(provider, name="b2", run="0000111122223333"))
    assert find_by_run(provider, "0000111122223333") is not None


def test_no_stock_is_insufficient_capacity_and_creates_nothing(sim):
    sim.set_stock("4090D", "westDC3", 0)
    provider = make(sim)
    with pytest.raises(InsufficientCapacity, match="no GPU of this spec free"):
        provider.create(spec(provider, region="westDC3"))
    assert sim.instances == {} and provider.list() == []


def test_a_failed_instance_is_returned_for_the_lifecycle_to_end(sim, monkeypatch):
    provider = make(sim)
    real = sim._create

    def fails(body):
        uuid = real(body)
        sim._set(sim.instances[uuid], "failed")
        return uuid

    monkeypatch.setattr(sim, "_create", fails)
    created = provider.create(spec(provider))
    assert created.status == InstanceStatus.ERROR and created.raw_status == "failed"


def test_an_instance_that_runs_only_after_creates_wait_gets_the_key_at_the_first_get(sim, monkeypatch):
    keys = Keys()
    provider = make(sim, keys=keys, boot_timeout=0.05)
    real = sim._create

    def slow(body):
        uuid = real(body)
        sim._set(sim.instances[uuid], "starting")
        return uuid

    monkeypatch.setattr(sim, "_create", slow)
    created = provider.create(spec(provider))
    assert created.status == InstanceStatus.PENDING and keys.calls == []
    sim._set(sim.instances[created.instance_id], "running")
    assert provider.get(created.instance_id).ssh is not None and len(keys.calls) == 1
    provider.get(created.instance_id)
    assert len(keys.calls) == 1, "once"


def test_a_list_that_cannot_be_read_is_bad_response_never_empty(sim):
    provider = make(sim)
    provider.create(spec(provider))
    for kind in ("unreadable", "garbage"):
        sim.fail_next(f"{PRO}/list", kind)
        with pytest.raises(BadResponse):
            provider.list()


def test_the_list_is_read_across_pages_and_holds_only_orchs_instances(sim, monkeypatch):
    monkeypatch.setattr("orchestrator.providers.autodl.api.PAGE_SIZE", 2)
    provider = make(sim)
    ours = [provider.create(spec(provider, name=f"n{i}", run=f"{i:016x}")).instance_id for i in range(3)]
    AutoDLApi("http://127.0.0.1:1", TOKEN, transport=sim.transport(), request_interval=0).create(
        {"req_gpu_amount": 1, "expand_system_disk_by_gb": 0, "gpu_spec_uuid": "h800", "image_uuid": "base-image-l2t43iu6uk",
         "cuda_v_from": 118, "instance_name": "someone else's"})
    assert sorted(i.instance_id for i in provider.list()) == sorted(ours)
    assert calls(sim).count(("POST", "/list")) >= 2


@pytest.mark.parametrize("operation", ["get", "stop", "start", "terminate", "save_image"])
def test_an_unknown_id_is_not_found(sim, operation):
    provider = make(sim)
    args = ("pro-000000000000", "img") if operation == "save_image" else ("857546be50-4fdafb0e",)
    with pytest.raises(NotFound):
        getattr(provider, operation)(*args)


# -- AutoDL's quirks ----------------------------------------------------------------------


def test_gets_send_the_query_string_and_the_bare_token(sim):
    seen: list[httpx.Request] = []
    inner = sim.transport()

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return inner.handle_request(request)

    provider = make(sim, transport=httpx.MockTransport(record))
    created = provider.create(spec(provider))
    gets = [r for r in seen if r.method == "GET"]
    assert gets and all(r.content == b"" and r.url.params["instance_uuid"] == created.instance_id for r in gets)
    assert {r.headers["authorization"] for r in seen} == {TOKEN}, "AutoDL's header: the token as it is, no Bearer"


def test_a_get_with_a_json_body_is_refused_as_autodl_refuses_it(sim):
    """What the documentation's own examples do: AutoDL answers RequestParameterIsWrong (seen live)."""
    answer = httpx.Client(transport=sim.transport()).request(
        "GET", "http://sim/api/v1/dev/instance/pro/status", json={"instance_uuid": "pro-abcdef123456"}, headers={"Authorization": TOKEN})
    assert answer.status_code == 200 and answer.json()["code"] == "RequestParameterIsWrong"
    assert sim.violations and "query string" in sim.violations[0]
    sim.violations.clear()


def test_money_is_thousandths_of_a_yuan(sim):
    assert to_cny(1880) == 1.88 and to_cny(0) == 0.0 and to_cny(-2500) == -2.5
    with pytest.raises(BadResponse):
        to_cny("1.88")
    provider = make(sim)
    balance = provider.api.balance()
    assert balance["assets"] == 500_000 and to_cny(balance["assets"]) == 500.0


@pytest.mark.parametrize("setup,error,words", [
    (lambda s: setattr(s, "real_name", False), AuthError, "complete real-name verification"),
    (lambda s: setattr(s, "assets_milli", 0), InsufficientFunds, "top it up"),
    (lambda s: s.set_stock("4090D", "westDC3", 0), InsufficientCapacity, "暂无库存"),
])
def test_autodls_error_codes_become_typed_errors_with_what_to_do(sim, setup, error, words):
    setup(sim)
    provider = make(sim)
    with pytest.raises(error, match=words):
        provider.create(spec(provider, region="westDC3"))
    assert sim.instances == {}


def test_a_refused_token_is_an_auth_error_naming_the_variable_not_the_token(sim):
    provider = make(sim, token="wrong-token-value")
    with pytest.raises(AuthError, match="set AUTODL_TOKEN") as refused:
        provider.list()
    assert "wrong-token-value" not in str(refused.value)
    with pytest.raises(AuthError, match="set AUTODL_TOKEN to your AutoDL developer token"):
        make(sim, token="").list()
    for status in (401, 403):
        transport = httpx.MockTransport(lambda r, status=status: httpx.Response(status, text="no"))
        with pytest.raises(AuthError, match="AUTODL_TOKEN"):
            make(sim, transport=transport).list()


def test_an_answer_in_the_wrong_shape_is_bad_response_and_a_502_is_retried_only_for_reads(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    sim.fail_next(f"{PRO}/status", "http-502", times=2)
    assert provider.get(created.instance_id).status == InstanceStatus.RUNNING, "a read is retried"
    sim.fail_next(f"{PRO}/status", "garbage")
    with pytest.raises(BadResponse):
        provider.get(created.instance_id)
    with pytest.raises(InvalidParameters):
        provider.api.create({"req_gpu_amount": 1, "expand_system_disk_by_gb": 0, "gpu_spec_uuid": "v-99g",
                             "image_uuid": "base-image-l2t43iu6uk", "cuda_v_from": 118})


def test_the_start_command_is_quote_free_and_runs_the_script(tmp_path):
    out = tmp_path / "ran"
    script = f"#!/bin/sh\n# it's \"quoted\" and $dollar'd\nprintf '%s' \"$((6*7))\" > '{out}'\n" + "# padding\n" * 500
    command = start_command(script)
    assert not set("'\"\\`") & set(command) and len(command) < len(script)
    subprocess.run(["/bin/sh", "-c", command], check=True, timeout=30)
    assert out.read_text() == "42"
    assert start_command("") == ""


def test_tags_ride_in_the_instance_name():
    tags = {ORCH_TAG: "1", NAME_TAG: "my-box", RUN_TAG: "0123456789abcdef"}
    assert instance_name(tags, "my-box") == "orch.0123456789abcdef.my-box"
    assert tags_of("orch.0123456789abcdef.my-box") == tags
    long = instance_name({**tags, NAME_TAG: "n" * 63}, "x")
    assert len(long) == 64 and tags_of(long)[RUN_TAG] == "0123456789abcdef", "the run id survives a cut"
    assert tags_of("my notebook") == {} and tags_of(None) == {} and tags_of("orch") == {}


def test_times_in_autodls_forms():
    assert when("2026-09-01T12:00:00+08:00") == when("2026-09-01T04:00:00Z") == 1788235200.0
    assert when({"Time": "2026-09-01T04:00:00Z", "Valid": True}) == 1788235200.0
    assert when({"Time": "0001-01-01T00:00:00Z", "Valid": False}) is None
    assert when(None) is None and when("") is None and when("soon") is None


# -- stop, start, terminate, the agent's shutdown -----------------------------------------


def test_terminate_powers_off_waits_for_shutdown_then_releases(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    before = len(sim.log)
    gone = provider.terminate(created.instance_id)
    ops = [c for c in calls(sim)[before:] if c[1] != "/status"]
    assert ops == [("POST", "/power_off"), ("POST", "/release")], "release only once AutoDL shows it off"
    assert gone.status.is_gone and sim.instances[created.instance_id].billing_since is None


def test_a_power_off_lost_while_starting_is_sent_again(sim, monkeypatch):
    monkeypatch.setattr(autodl_provider, "POWER_OFF_RESEND_S", 0.05)
    provider = make(sim)
    created = provider.create(spec(provider))
    inst = sim.instances[created.instance_id]
    sim._set(inst, "starting")
    threading.Timer(0.3, lambda: sim._set(inst, "running")).start()
    stopped = provider.stop(created.instance_id)
    assert stopped.status in (InstanceStatus.STOPPING, InstanceStatus.STOPPED)
    assert calls(sim).count(("POST", "/power_off")) >= 2 and any("lost" in e for _, e in inst.events)


def test_stop_then_start_powers_on_with_the_gpu_and_a_stopped_one_reports_why_and_when_it_is_released(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    assert provider.stop(created.instance_id).status in (InstanceStatus.STOPPING, InstanceStatus.STOPPED)
    sim.wait_settled()
    assert provider.get(created.instance_id).status == InstanceStatus.STOPPED
    inst = sim.instances[created.instance_id]
    assert isinstance(provider, ReportsStopReason)
    assert "powered off outside orch at" in provider.stop_reason(created.instance_id)
    assert provider.release_at(created.instance_id) == pytest.approx(inst.stopped_at + 15 * 24 * 3600, abs=1)
    started = provider.start(created.instance_id)
    assert started.status in (InstanceStatus.PENDING, InstanceStatus.RUNNING) and inst.boots == 0
    assert provider.release_at(created.instance_id) is None and provider.stop_reason(created.instance_id) is None
    sim.set_stock("4090D", "westDC3", 0)
    provider.stop(created.instance_id)
    sim.wait_settled()
    sim.set_stock("4090D", "westDC3", 0)
    with pytest.raises(InsufficientCapacity):
        provider.start(created.instance_id)


def test_the_runtime_is_root_with_cron_and_models_on_the_data_disk(sim):
    provider = make(sim, data_disk="/root/autodl-tmp")
    runtime = provider.runtime("box")
    assert (runtime.run_as, runtime.rearm, runtime.models_dir, runtime.home) == ("", "cron", "/root/autodl-tmp/orch-models", "~/.orch")
    assert provider.self_stop_command("box") == "shutdown -h now"
    caps = provider.capabilities
    assert caps.can_stop and caps.can_start and caps.self_stop and not caps.prices_before_create
    assert "15 days" in caps.why_not("stopped_retention") and "powered-off" in caps.why_not("save_image")


# -- images -------------------------------------------------------------------------------


def test_save_image_powers_off_saves_and_polls_until_finished(sim):
    provider = make(sim)
    assert isinstance(provider, NativeImages)
    created = provider.create(spec(provider))
    before = len(sim.log)
    image = provider.save_image(created.instance_id, "sd-env")
    ops = [c for c in calls(sim)[before:] if c[1] != "/status"]
    assert ops[:2] == [("POST", "/power_off"), ("POST", "/image/save")] and ops[-1] == ("POST", "/image/private/list")
    assert image.provider == "autodl" and image.name == "sd-env" and image.image_id.startswith("image-")
    assert sim.images[image.image_id]["status"] == "finished" and sim.instances[created.instance_id].status == "shutdown"
    assert [i.image_id for i in provider.list_images()] == [image.image_id]
    again = provider.create(InstanceSpec(name="from-image", offer=spec(provider).offer, ssh_public_key=PUBLIC_KEY,
                                         image_id=image.image_id, tags={ORCH_TAG: "1", NAME_TAG: "from-image", RUN_TAG: "r2"}))
    assert sim.instances[again.instance_id].image_uuid == image.image_id
    with pytest.raises(UnsupportedOperation, match="cannot delete an image"):
        provider.delete_image(image.image_id)


def test_autodl_refuses_to_save_a_running_instance(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    with pytest.raises(InvalidState, match="关机"):
        provider.api.save_image(created.instance_id, "too-soon")
    with pytest.raises(InvalidState):
        provider.api.release(created.instance_id)


def test_an_image_still_being_saved_is_not_listed(sim):
    provider = make(sim)
    created = provider.create(spec(provider))
    provider.stop(created.instance_id)
    sim.wait_settled()
    sim.image_seconds = 5.0
    provider.api.save_image(created.instance_id, "slow")
    assert provider.list_images() == []


# -- the token and the password -----------------------------------------------------------


def test_the_token_and_the_root_password_never_reach_logs_errors_or_the_provider(sim, caplog):
    caplog.set_level(logging.DEBUG)
    keys = Keys()
    provider = make(sim, keys=keys)
    created = provider.create(spec(provider))
    password = sim.instances[created.instance_id].password
    errors = []
    for fault in ("http-502", "garbage"):
        sim.fail_next(f"{PRO}/create", fault)
        try:
            provider.create(spec(provider, name="x"))
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
    provider.terminate(created.instance_id)
    kept = [repr(provider.settings), repr(provider.__dict__), repr(created), str(provider._meta), *errors, caplog.text]
    assert not any(TOKEN in text or password in text for text in kept)
    assert keys.calls[0][3] == password, "handed to the key installer once, and not kept"


def test_settings_from_orch_yaml_and_configured(tmp_path, monkeypatch):
    path = tmp_path / "orch.yaml"
    path.write_text("autodl:\n  cuda_v_from: '12.1'\n  expand_system_disk_gb: 50\n  gpu_specs: {RTX 5090 D: 5090d-p}\n")
    section = load_settings(path, environ={}).provider_settings("autodl")
    assert (section.cuda_v_from, section.expand_system_disk_gb, section.gpu_specs) == (121, 50, {"RTX 5090 D": "5090d-p"})
    for bad, words in [("api_url: http://api.autodl.com", "https"), ("expand_system_disk_gb: 600", "0 to 500"),
                       ("data_disk: autodl-tmp", "absolute path"), ("cuda_v_from: cuda", "CUDA version"), ("token: x", "unknown key")]:
        path.write_text(f"autodl:\n  {bad}\n")
        with pytest.raises(ConfigError, match=words):
            load_settings(path, environ={})
    monkeypatch.delenv("AUTODL_TOKEN", raising=False)
    assert not configured(Settings())
    monkeypatch.setenv("AUTODL_TOKEN", "t")
    assert configured(Settings())
