"""The lifecycle's decisions with an in-memory provider: failover, tags, reconcile, stop first."""

from __future__ import annotations

import time
import pytest

from orchestrator.config import Settings
from orchestrator.errors import ConfigError, LifecycleError, StateError
from orchestrator.lifecycle import Orchestrator, UpOptions
from orchestrator.lifecycle import provision
from orchestrator.lifecycle.context import Ctx
from orchestrator.providers.base import RUN_TAG, Capabilities, Instance, InstanceStatus
from orchestrator.state import InstanceRecord, State


@pytest.fixture
def orch(tmp_path, fake_provider):
    settings = Settings(provider="fake")
    return Orchestrator(settings, state=State(tmp_path / "state.db"), home=tmp_path, provider_factory=lambda name: fake_provider)


def test_failover_moves_on_after_a_capacity_error_and_tags_the_create(orch, fake_provider):
    fake_provider.no_capacity = {"A100"}
    ctx: Ctx = orch.ctx
    opts = UpOptions(name="box")
    record, attempts = provision.create(ctx, opts, fake_provider.offers())
    assert [c for c in fake_provider.calls if c[0] == "create"] == [("create", "A100"), ("create", "H100")]
    assert [(a.gpu, a.error) for a in attempts] == [("A100", "no A100 left")]
    assert record.gpu == "H100" and record.instance_id == "fake-1"
    created = fake_provider.get("fake-1")
    assert created.tags[RUN_TAG] == record.run_id and created.tags["orch-name"] == "box", "the create carries orch's run id"


def test_no_capacity_anywhere_fails_with_every_reason_and_creates_nothing(orch, fake_provider):
    fake_provider.no_capacity = {"A100", "H100"}
    with pytest.raises(provision.NoCapacity) as e:
        provision.create(orch.ctx, UpOptions(name="box"), fake_provider.offers())
    assert "fake A100 in fake-1: no A100 left" in str(e.value) and "fake H100 in fake-1: no H100 left" in str(e.value)
    assert [a.gpu for a in e.value.attempts] == ["A100", "H100"]
    assert fake_provider.instances == {} and orch.state.get("box").state == "FAILED"


def test_a_create_whose_answer_was_lost_is_found_by_its_tag_and_stopped(orch, fake_provider):
    fake_provider.gpus = ("A100",)
    fake_provider.lose_answer = {"A100"}
    with pytest.raises(LifecycleError, match="stopped so nothing bills"):
        orch.up(UpOptions(name="box"))
    record = orch.state.get("box")
    assert record.instance_id == "fake-1", "adopted by its run id"
    assert fake_provider.get("fake-1").status == InstanceStatus.STOPPED
    assert record.state == "STOPPED" and record.stop_reason.startswith("up failed")


def test_an_up_that_died_mid_create_is_adopted_and_stopped_by_the_next_command(orch, fake_provider):
    # What a killed `orch up` leaves: the intent recorded with its run id, an instance tagged with it, no id recorded.
    now = time.time()
    orch.state.insert(InstanceRecord(name="box", provider="fake", state="PROVISIONING", created_at=now, updated_at=now,
                                     run_id="run-1", owner="999999999:1.0"))
    fake_provider.instances["fake-9"] = Instance("fake", "fake-9", "box", InstanceStatus.RUNNING, "running",
                                                 tags={"orch": "1", "orch-name": "box", RUN_TAG: "run-1"})
    messages = []
    rows = orch.status(progress=messages.append)
    assert rows[0].record.instance_id == "fake-9" and rows[0].record.state == "STOPPED"
    assert fake_provider.get("fake-9").status == InstanceStatus.STOPPED
    assert any("interrupted" in m for m in messages)
    assert orch.strays() == []


def test_an_interrupted_up_that_created_nothing_is_marked_failed(orch, fake_provider):
    now = time.time()
    orch.state.insert(InstanceRecord(name="box", provider="fake", state="PROVISIONING", created_at=now, updated_at=now,
                                     run_id="run-2", owner="999999999:1.0"))
    row = orch.status()[0]
    assert row.record.state == "FAILED" and "created nothing" in orch.state.events("box")[-1]["detail"]


def test_down_stops_first_and_reports_a_state_it_could_not_write(orch, fake_provider, monkeypatch):
    record, _ = provision.create(orch.ctx, UpOptions(name="box"), fake_provider.offers())
    orch.state.transition("box", "RUNNING", "test", owner=None)

    def refuse(*a, **k):
        raise StateError("cannot record the change in state.db: database or disk is full")

    monkeypatch.setattr(State, "transaction", refuse)
    with pytest.raises(StateError, match="box is stopped .*could not record that: .*disk is full"):
        orch.down("box")
    assert fake_provider.get(record.instance_id).status == InstanceStatus.STOPPED, "billing stopped anyway"


def test_a_provider_that_cannot_stop_is_terminated_and_says_why(orch, fake_provider):
    fake_provider.capabilities = Capabilities(can_stop=False, can_start=False,
                                              reasons={"can_stop": "Lambda instances cannot be stopped, only terminated"})
    provision.create(orch.ctx, UpOptions(name="box"), fake_provider.offers())
    orch.state.transition("box", "RUNNING", "test", owner=None)
    messages = []
    result = orch.down("box", progress=messages.append)
    assert result.status == "TERMINATED" and ("terminate", "fake-1") in fake_provider.calls
    assert any("Lambda instances cannot be stopped, only terminated: terminating instead" in m for m in messages)


def test_a_price_flag_is_refused_where_the_provider_sets_prices(orch, fake_provider):
    with pytest.raises(ConfigError, match="--price-per-hour: provider fake prices its instances itself"):
        orch.up(UpOptions(name="box", price_per_hour=1.0))
    assert fake_provider.calls == [] and orch.state.get("box") is None


def test_cost_counts_only_billing_time_of_this_instance(orch, fake_provider):
    now = time.time()
    orch.state.insert(InstanceRecord(name="old", provider="fake", state="RUNNING", created_at=now - 100, updated_at=now - 100,
                                     price_per_hour=3600.0))
    orch.state.delete("old")  # an earlier instance of the same name: its events stay
    record = InstanceRecord(name="old", provider="fake", state="PROVISIONING", created_at=time.time(), updated_at=time.time(),
                            price_per_hour=3600.0)
    orch.state.insert(record)
    assert orch.cost(orch.state.get("old")) < 5, "the earlier instance's 100 s are not charged again"


@pytest.fixture
def two_clouds(tmp_path, fake_provider):
    """`fake` (cheaper) and `fake2`, both in the registry, behind one orchestrator."""
    from orchestrator.providers import registry
    from tests.helpers.fake_provider import FakeProvider

    other = FakeProvider(name="fake2", price=3.0, region="fake2-1")
    registry.REGISTRY["fake2"] = registry.ProviderEntry("fake2", "another in-memory provider", None)
    providers = {"fake": fake_provider, "fake2": other}
    orch = Orchestrator(Settings(provider="fake,fake2"), state=State(tmp_path / "state.db"), home=tmp_path,
                        provider_factory=providers.__getitem__)
    yield orch, fake_provider, other
    registry.REGISTRY.pop("fake2", None)


def test_failover_crosses_providers_cheapest_first(two_clouds):
    orch, cheap, dear = two_clouds
    cheap.no_capacity = {"A100", "H100"}
    offers = provision.choose_offers(orch.ctx, ["fake", "fake2"], UpOptions(name="box"))
    assert [(o.provider, o.gpu) for o in offers] == [("fake", "A100"), ("fake", "H100"), ("fake2", "A100"), ("fake2", "H100")]
    record, attempts = provision.create(orch.ctx, UpOptions(name="box"), offers)
    assert record.provider == "fake2" and record.gpu == "A100" and record.price_per_hour == 3.0
    assert [(a.provider, a.gpu) for a in attempts] == [("fake", "A100"), ("fake", "H100")]


def test_a_quota_error_is_not_retried_in_that_region(two_clouds):
    orch, cheap, dear = two_clouds
    cheap.over_quota = {"A100"}
    record, attempts = provision.create(orch.ctx, UpOptions(name="box"), provision.choose_offers(orch.ctx, ["fake", "fake2"], UpOptions(name="box")))
    assert [c for c in cheap.calls if c[0] == "create"] == [("create", "A100")], "H100 in the same region is not tried"
    assert record.provider == "fake2" and [a.error for a in attempts] == ["quota for A100 used up"]


def test_an_instance_that_never_runs_is_terminated_before_the_next_offer(two_clouds, monkeypatch):
    from orchestrator.lifecycle import teardown

    orch, cheap, dear = two_clouds
    cheap.gpus = ("A100",)
    cheap.stuck = {"A100"}
    monkeypatch.setattr(teardown, "POLL_S", 0.01)
    monkeypatch.setattr(provision, "POLL_S", 0.01)
    opts = UpOptions(name="box", provision_timeout=0.2)
    record, attempts = provision.create(orch.ctx, opts, provision.choose_offers(orch.ctx, ["fake", "fake2"], opts))
    assert cheap.get("fake-1").status == InstanceStatus.TERMINATED, "the stuck one was terminated, not left billing"
    assert record.provider == "fake2" and "not running after" in attempts[0].error


def test_offers_are_cheapest_first_with_currencies_kept_apart(two_clouds):
    orch, cheap, dear = two_clouds
    dear.currency, dear.price = "CNY", 1.0
    offers, failures = orch.offers("fake,fake2")
    assert [(o.provider, o.currency) for o in offers][:2] == [("fake", "USD"), ("fake", "USD")]
    assert {o.currency for o in offers[2:]} == {"CNY"}, "CNY offers come after, not converted"
    assert failures == {}


def test_status_warns_before_the_provider_releases_a_stopped_instance(orch, fake_provider):
    fake_provider.capabilities = Capabilities(stopped_release_days=15)
    provision.create(orch.ctx, UpOptions(name="box"), fake_provider.offers())
    fake_provider.stop("fake-1")
    orch.state.transition("box", "STOPPED", "test")
    assert orch.status("box")[0].warnings == [], "just stopped: nothing to say yet"
    db = orch.state._db
    db.execute("UPDATE events SET ts = ts - 13 * 86400 WHERE name = 'box' AND to_state = 'STOPPED'")
    warnings = orch.status("box")[0].warnings
    assert len(warnings) == 1 and "releases instances stopped for 15 days" in warnings[0] and "in 2.0 days" in warnings[0]


def test_a_usd_budget_is_refused_where_the_provider_prices_in_another_currency(orch, fake_provider):
    from orchestrator.config import Deadlines

    fake_provider.capabilities = Capabilities(currency="CNY")
    with pytest.raises(ConfigError, match="budgets are in USD and fake prices in CNY"):
        orch.up(UpOptions(name="box", deadlines=Deadlines(budget=5.0)))
    assert fake_provider.calls == [] and orch.state.get("box") is None


def test_an_offer_where_the_image_has_a_native_copy_boots_from_it(two_clouds):
    orch, cheap, dear = two_clouds
    cheap.no_capacity = {"A100", "H100"}  # so the attempts reach fake2, where the native image is
    opts = UpOptions(name="box", from_image="env", native_images={("fake2", "fake2-1"): "ami-123@fake2-1"})
    provision.create(orch.ctx, opts, provision.choose_offers(orch.ctx, ["fake", "fake2"], opts))
    assert [s.image_id for s in cheap.specs] == [None, None], "another provider: the portable image"
    assert dear.specs[0].image_id == "ami-123@fake2-1"
