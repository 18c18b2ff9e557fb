"""`orch cost`: totals from the recorded price and the recorded running intervals; stopped time is
not charged; days split at midnight; currencies kept apart; --since cuts the intervals."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time

import pytest

from orchestrator.lifecycle import access
from orchestrator.state import InstanceRecord, State

H = 3600.0


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def at(day: int, hour: float) -> float:
    return dt.datetime(2026, 11, day, tzinfo=dt.timezone.utc).timestamp() + hour * H


def record(state: State, name: str, price: float, currency: str, events: list[tuple[float, str]], created: float | None = None,
           provider: str = "local") -> None:
    """An instance with exactly these transitions (time, to_state)."""
    created = events[0][0] if created is None else created
    state.insert(InstanceRecord(name=name, provider=provider, state=events[-1][1], created_at=created, updated_at=created,
                                instance_id=f"id-{name}", price_per_hour=price, currency=currency))
    db = sqlite3.connect(state.path)
    db.execute("DELETE FROM events WHERE name = ?", (name,))
    prev = None
    for ts, to in events:
        db.execute("INSERT INTO events (ts, name, from_state, to_state, detail) VALUES (?, ?, ?, ?, '')", (ts, name, prev, to))
        prev = to
    db.commit()
    db.close()


def box_events():
    # Up at 21:50 on the 1st (10 min booting), running across midnight, stopped by its agent at 02:00 on the 2nd,
    # started again at 10:00, stopped at 11:00 and terminated at noon.
    return [(at(1, 21 + 50 / 60), "PROVISIONING"), (at(1, 21 + 55 / 60), "WAITING_SSH"), (at(1, 22), "RUNNING"),
            (at(2, 2), "STOPPED"), (at(2, 10), "PROVISIONING"), (at(2, 10), "RUNNING"), (at(2, 11), "STOPPING"),
            (at(2, 11 + 1 / 60), "STOPPED"), (at(2, 12), "TERMINATED")]


def test_stopped_time_is_not_charged_and_days_split_at_midnight(tmp_path):
    state = State(tmp_path / "state.db")
    record(state, "box", 2.0, "USD", box_events())
    report = access.cost_report(state, now=at(5, 0))
    hours = 10 / 60 + 4 + 1 + 1 / 60  # booting counts (the provider bills it); stopped does not
    assert report.totals == {"USD": pytest.approx(2.0 * hours)}
    (inst,) = report.instances
    assert (inst.name, inst.seconds) == ("box", pytest.approx(hours * H))
    days = {d["date"]: d["cost"] for d in report.days}
    assert days == {"2026-11-01": pytest.approx(2.0 * (2 + 10 / 60), abs=1e-5),
                    "2026-11-02": pytest.approx(2.0 * (2 + 1 + 1 / 60), abs=1e-5)}
    # The same seconds orch status and orch down report.
    from orchestrator.lifecycle import reconcile

    class Ctx:
        pass

    ctx = Ctx()
    ctx.state = state
    assert reconcile.billed_seconds(ctx, state.get("box"), now=at(5, 0)) == pytest.approx(inst.seconds)


def test_currencies_are_kept_apart_and_a_running_instance_counts_until_now(tmp_path):
    state = State(tmp_path / "state.db")
    record(state, "box", 2.0, "USD", box_events())
    record(state, "cn", 3.5, "CNY", [(at(3, 8), "PROVISIONING"), (at(3, 8.5), "RUNNING")], provider="autodl")
    report = access.cost_report(state, now=at(3, 12))
    assert set(report.totals) == {"USD", "CNY"}
    assert report.totals["CNY"] == pytest.approx(3.5 * 4)
    assert [(d["date"], d["currency"]) for d in report.days] == [("2026-11-01", "USD"), ("2026-11-02", "USD"), ("2026-11-03", "CNY")]
    out = report.as_json()
    json.dumps(out, allow_nan=False)
    assert out["totals"]["CNY"] == pytest.approx(14.0) and {i["currency"] for i in out["instances"]} == {"USD", "CNY"}


def test_since_cuts_the_intervals_and_an_earlier_instance_of_the_name_is_left_out(tmp_path):
    state = State(tmp_path / "state.db")
    # Events before created_at belong to an earlier instance that had the same name (and another price).
    events = [(at(1, 0), "PROVISIONING"), (at(1, 5), "STOPPED"), (at(2, 0), "PROVISIONING"), (at(2, 6), "STOPPED")]
    record(state, "again", 1.0, "USD", events, created=at(2, 0))
    assert access.cost_report(state, now=at(4, 0)).totals == {"USD": pytest.approx(6.0)}
    since = access.cost_report(state, since=at(2, 4), now=at(4, 0))
    assert since.totals == {"USD": pytest.approx(2.0)}
    assert access.cost_report(state, since=at(3, 0), now=at(4, 0)).instances == []


def test_since_accepts_dates_today_and_times_ago_and_names_the_mistake():
    now = at(10, 15)
    assert access.parse_since("2026-11-03", now) == at(3, 0)
    assert access.parse_since("today", now) == at(10, 0)
    assert access.parse_since("7d", now) == now - 7 * 24 * H
    assert access.parse_since("12h", now) == now - 12 * H
    assert access.parse_since("2w", now) == now - 14 * 24 * H
    for bad in ("yesterday-ish", "-3d", "0d", "2026-13-01", ""):
        with pytest.raises(Exception) as e:
            access.parse_since(bad, now)
        assert "--since" in str(e.value) and "7d" in str(e.value)


def test_the_bar_chart_scales_to_the_largest_day():
    from orchestrator.cli.person import bar

    assert bar(10, 10, 40) == "█" * 40
    assert bar(5, 10, 40) == "█" * 20
    assert bar(0.001, 10, 40) == "▏", "a day that cost something shows"
    assert bar(0, 10, 40) == "" and bar(1, 0, 40) == ""


def test_orch_cost_prints_one_json_object_and_a_chart(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    home = tmp_path / "home"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.delenv("ORCH_CONFIG", raising=False)
    state = State(home / "state.db")
    record(state, "box", 2.0, "USD", box_events())
    state.close()
    runner = CliRunner()
    result = runner.invoke(app, ["cost", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["totals"]["USD"] == pytest.approx(2.0 * (4 + 10 / 60 + 1 + 1 / 60), abs=1e-4)
    assert [d["date"] for d in data["days"]] == ["2026-11-01", "2026-11-02"]
    human = runner.invoke(app, ["cost"])
    assert human.exit_code == 0 and "2026-11-02" in human.stdout and "█" in human.stdout and "USD" in human.stdout
    bad = runner.invoke(app, ["cost", "--since", "soon", "--json"])
    assert bad.exit_code == 1 and "--since" in json.loads(bad.stdout.strip().splitlines()[-1])["error"]
