from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load_settings
from orchestrator.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("8h", 28800), ("1h30m", 5400), ("2d", 172800), ("1.5h", 5400), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5m", "", "abc", "15x", "m15", "10m junk"])
def test_bad_durations_are_errors_never_forever(text):
    with pytest.raises(DurationError):
        parse_duration(text, what="--idle")


def test_format_duration():
    assert format_duration(5400) == "1h30m" and format_duration(59) == "59s" and format_duration(600) == "10m"


def test_yaml_and_env(tmp_path):
    cfg = tmp_path / "orch.yaml"
    cfg.write_text("provider: ssh\nssh: {host: box, user: me}\ndeadlines: {idle: 5m, budget: 3}\nmodels: [s3://b/m.safetensors]\n")
    s = load_settings(cfg, environ={})
    assert s.provider == "ssh" and s.provider_settings("ssh").host == "box" and s.deadlines.idle == 300 and s.deadlines.budget == 3
    assert s.models == ("s3://b/m.safetensors",)
    assert load_settings(cfg, environ={"ORCH_PROVIDER": "local"}).provider == "local"


@pytest.mark.parametrize(
    "text, message",
    [
        ("provider: nimbus\n", "valid providers: local, ssh"),
        ("provder: local\n", "unknown key(s) provder"),
        ("ssh: {hots: x}\n", "valid keys:"),
        ("deadlines: {idle: 0}\n", "not positive"),
        ("deadlines: {budget: -2}\n", "not positive"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_what_to_fix(tmp_path, text, message):
    cfg = tmp_path / "orch.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={})
    assert message in str(e.value)


def test_cli_rejects_unknown_provider_and_bad_durations(orch):
    bad = orch("up", "--provider", "nimbus", "--json", check=False)
    assert bad.returncode == 1 and "valid providers: local, ssh, aws" in bad.json["error"]
    for flag, value in (("--idle", "0"), ("--max-lifetime", "-1h"), ("--heartbeat-timeout", "soon")):
        r = orch("up", flag, value, "--json", check=False)
        assert r.returncode == 1 and flag in r.json["error"]
    unknown_flag = orch("up", "--gpux", "A100", check=False)
    assert unknown_flag.returncode != 0 and "--gpux" in unknown_flag.stderr
    # Nothing was created by any of these.
    assert orch("status", "--json").json == {"instances": []}
