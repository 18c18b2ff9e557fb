"""`orch open`, `orch ssh`, `orch logs` through the real CLI against one local instance (shared by the
module), and OpenSSH's own client through the ssh config orch writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import psutil
import pytest

from tests.conftest import OrchResult, _stop_everything

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    home = tmp_path_factory.mktemp("person") / "orch-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORCH_CONFIG"}
    env.update(ORCH_HOME=str(home), BROWSER="false")  # CI has no browser; `false` makes webbrowser say so

    def orch(*args: str, check: bool = True, timeout: float = 300, **more: str) -> OrchResult:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=timeout,
                              env={**env, **more}, cwd=home.parent)
        result = OrchResult(proc)
        if check and proc.returncode != 0:
            raise AssertionError(f"orch {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return result

    up = orch("up", "box", "--detach", "--price-per-hour", "36", "--json").json
    yield SimpleNamespace(home=home, orch=orch, up=up, env=env)
    _stop_everything(home)


def test_orch_ssh_runs_a_command_with_its_exit_code(box):
    ok = box.orch("ssh", "box", "--", "echo", "ok")
    assert ok.stdout == "ok\n"
    assert box.orch("ssh", "--", "echo", "one instance: no name needed").stdout.strip() == "one instance: no name needed"
    # As with OpenSSH's client: the words are joined by spaces for the remote shell.
    assert box.orch("ssh", "box", "--", "echo $((6 * 7))").stdout == "42\n"
    assert box.orch("ssh", "box", "--", "printf", "'%s|'", "'a b'", "c").stdout == "a b|c|"
    assert box.orch("ssh", "box", "--", "exit 3", check=False).returncode == 3
    # Without OpenSSH's client (a bare Windows laptop), a command still runs (through orch's own SSH), a shell cannot.
    assert box.orch("ssh", "box", "--", "echo ok; exit 4", check=False, PATH=str(box.home / "no-bin")).returncode == 4
    assert box.orch("ssh", "box", "--", "echo", "ok", PATH=str(box.home / "no-bin")).stdout == "ok\n"
    shell = box.orch("ssh", "box", check=False, PATH=str(box.home / "no-bin"))
    assert shell.returncode == 1 and "OpenSSH's client" in shell.stderr and "orch ssh box -- CMD" in shell.stderr
    wrong = box.orch("ssh", "box", "echo", "ok", check=False)
    assert wrong.returncode == 1 and "orch ssh box -- echo ok" in wrong.stderr
    missing = box.orch("ssh", "nope", "--", "true", check=False)
    assert missing.returncode == 1 and "no instance named 'nope'" in missing.stderr


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH's client is not installed (.ci/run installs it)")
def test_openssh_reaches_orch_name_through_orchs_config_with_the_pinned_key(box):
    cfg = box.orch("ssh", "--config", "--json").json
    assert cfg["hosts"] == {"box": "orch-box"} and cfg["include"].startswith("Include ")
    config = open(cfg["config"]).read()
    assert "Host orch-box" in config and "StrictHostKeyChecking yes" in config and "UserKnownHostsFile" in config
    assert oct(os.stat(cfg["config"]).st_mode & 0o777) == "0o600"
    import sqlite3

    pinned = sqlite3.connect(box.home / "state.db").execute("SELECT host_key FROM instances WHERE name='box'").fetchone()[0]
    assert open(cfg["known_hosts"]).read().split() == ["orch-box", *pinned.split()[:2]]
    base = ["ssh", "-F", cfg["config"], "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
    r = subprocess.run([*base, "orch-box", "echo", "ok"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    # A host presenting another key than the pinned one is refused by OpenSSH itself.
    good = open(cfg["known_hosts"]).read()
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(box.home / "other")], check=True)
        other = open(box.home / "other.pub").read().split()[:2]
        with open(cfg["known_hosts"], "w") as f:
            f.write(f"orch-box {' '.join(other)}\n")
        r = subprocess.run([*base, "orch-box", "echo", "ok"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 255 and "Host key verification failed" in r.stderr
    finally:
        with open(cfg["known_hosts"], "w") as f:
            f.write(good)


def test_orch_logs_shows_the_server_and_agent_logs_and_follows(box):
    both = box.orch("logs", "box").stdout
    assert "server.log <==" in both and "agent.log <==" in both and "watchdog running" in both
    assert "loaded orch-demo-tiny-sd15" in box.orch("logs", "box", "--server").stdout
    agent = box.orch("logs", "box", "--agent", "-n", "5").stdout
    assert "watchdog running" in agent and "server.log" not in agent
    follower = subprocess.Popen([sys.executable, "-m", "orchestrator", "logs", "box", "-f", "--server", "-n", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=box.env, text=True)
    try:
        time.sleep(2)  # the follower is attached before the line is written
        box.orch("ssh", "box", "--", "echo orch-test-marker >> ~/.orch/logs/server.log")
        deadline = time.monotonic() + 60
        seen = ""
        os.set_blocking(follower.stdout.fileno(), False)
        while "orch-test-marker" not in seen:
            assert time.monotonic() < deadline, f"not followed: {seen!r}"
            seen += follower.stdout.read() or ""
            time.sleep(0.1)
        follower.send_signal(signal.SIGINT)  # Ctrl-C ends a follow quietly
        assert follower.wait(30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()


def test_orch_open_gives_a_one_time_link_and_opens_a_tunnel_when_none_is(box):
    link = box.orch("open", "box", "--json").json
    assert link["url"] == box.up["url"] + "/" and link["tunnel_opened"] is False
    assert box.up["token"] not in link["login_url"], "the token never goes into a URL"
    with httpx.Client() as browser:
        r = browser.get(link["login_url"], follow_redirects=False)
        assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"]
        assert browser.get(link["url"]).status_code == 200, "signed in by the cookie"
        assert browser.get(link["login_url"], follow_redirects=False).status_code == 401, "a link works once"
    assert httpx.get(link["url"]).status_code == 401, "and without it the page is refused"
    # With the tunnel gone, `orch open` opens one; a person's run prints the page and the link (no browser here).
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "tunnel-daemon" in cmd and "box" in cmd and p.environ().get("ORCH_HOME") == str(box.home):
            p.kill()
            p.wait(10)
    human = box.orch("open", "box")
    url = human.stdout.strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    assert "tunnel open in the background" in human.stderr and "/ui/login?code=" in human.stderr
    assert httpx.get(url).status_code == 401
    status = json.loads(box.orch("status", "box", "--json").stdout)
    assert status["url"] + "/" == url


def test_orch_cost_counts_the_running_instance_at_its_price(box):
    status = box.orch("status", "box", "--json").json
    cost = box.orch("cost", "--json").json
    (row,) = cost["instances"]
    assert (row["name"], row["currency"], row["price_per_hour"], row["state"]) == ("box", "USD", 36.0, "RUNNING")
    assert row["cost"] == pytest.approx(36.0 * row["hours"], abs=36 * 1e-4)  # hours are rounded to 4 places
    # The same clock as `orch status` (a moment later: a little more).
    assert status["cost"] <= cost["totals"]["USD"] <= status["cost"] + 36.0 * 120 / 3600
    assert [d["currency"] for d in cost["days"]] == ["USD"] * len(cost["days"])
    human = box.orch("cost")
    assert "box" in human.stdout and "per day, USD" in human.stdout and "total" in human.stdout
