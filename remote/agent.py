"""The watchdog on the instance: the billing guarantee.

    python -m remote.agent --home DIR arm --config-b64 B64   # at boot, before anything slow
    python -m remote.agent --home DIR boot-done              # the laptop: bootstrap+sync+load finished
    python -m remote.agent --home DIR set KEY=VALUE...       # `orch extend`
    python -m remote.agent --home DIR status                 # time left before each deadline

`arm` starts a supervisor (a respawning wrapper) that keeps `run`, the watchdog loop,
alive. The loop stops the instance, the provider's way (config's stop_command), when any
of these holds: boot not done within boot_timeout; no generation request for `idle`
counted from the end of boot; max_lifetime since creation; price x running time >= budget;
no heartbeat from any attached orch for heartbeat_timeout. Configuration and clocks live
on the instance disk (DIR/agent/), so a restarted agent continues the same deadlines.
Standard library only: it runs before anything is installed, and survives the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ._files import pid_alive as _alive
from ._files import read_json as _read

TICK_S = 1.0
DEADLINE_KEYS = ("idle", "boot_timeout", "max_lifetime", "heartbeat_timeout", "budget")


def _write(path: Path, data: dict) -> None:
    """Atomic: a crash mid-write never leaves a torn file that would lose the clocks."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _fmt(seconds: float) -> str:
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    return f"{s}s"


class Agent:
    def __init__(self, home: Path):
        self.home = home
        self.dir = home / "agent"
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- files -------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        return _read(self.dir / "config.json") or {}

    @property
    def boot(self) -> dict:
        return _read(self.dir / "boot.json") or {}

    def last_heartbeat(self) -> float | None:
        beats = self.home / "heartbeats"
        latest = None
        if beats.exists():
            for f in beats.iterdir():
                if f.name.startswith("."):
                    continue
                try:
                    t = float(f.read_text().strip())
                except (OSError, ValueError):
                    continue
                latest = t if latest is None else max(latest, t)
        return latest

    def activity(self) -> dict:
        return _read(self.home / "activity.json") or {}

    # -- clocks ------------------------------------------------------------------------

    def running_seconds(self, now: float) -> float:
        boot = self.boot
        return boot.get("previous_seconds", 0.0) + max(0.0, now - boot.get("boot_started_at", now))

    def evaluate(self, now: float | None = None) -> tuple[str | None, dict]:
        """(reason to stop or None, time left before each deadline)."""
        now = now or time.time()
        cfg, boot = self.config, self.boot
        left: dict[str, float] = {}
        reasons: list[str] = []
        started = boot.get("boot_started_at", now)
        done = boot.get("boot_done_at")

        if cfg.get("max_lifetime"):
            left["max_lifetime"] = cfg["created_at"] + cfg["max_lifetime"] - now
            if left["max_lifetime"] <= 0:
                reasons.append(f"max_lifetime {_fmt(cfg['max_lifetime'])} reached")
        if cfg.get("boot_timeout") and not done:
            left["boot_timeout"] = started + cfg["boot_timeout"] - now
            if left["boot_timeout"] <= 0:
                reasons.append(f"boot not finished within boot_timeout {_fmt(cfg['boot_timeout'])}")
        if cfg.get("idle") and done:
            act = self.activity()
            if act.get("in_flight", 0) > 0:
                left["idle"] = cfg["idle"]
            else:
                last = max(done, act.get("last_request", 0.0))
                left["idle"] = last + cfg["idle"] - now
                if left["idle"] <= 0:
                    reasons.append(f"idle {_fmt(cfg['idle'])}")
        if cfg.get("heartbeat_timeout"):
            last_beat = max(started, self.last_heartbeat() or 0.0)
            left["heartbeat"] = last_beat + cfg["heartbeat_timeout"] - now
            if left["heartbeat"] <= 0:
                reasons.append(f"no heartbeat from orch for {_fmt(cfg['heartbeat_timeout'])}")
        price = cfg.get("price_per_hour") or 0.0
        spent = price * self.running_seconds(now) / 3600
        if cfg.get("budget"):
            left["budget_usd"] = cfg["budget"] - spent
            if price > 0:
                left["budget"] = (cfg["budget"] - spent) / price * 3600
            if spent >= cfg["budget"]:
                reasons.append(f"budget ${cfg['budget']:.2f} reached")
        return (reasons[0] if reasons else None), {"left": left, "spent_usd": spent}

    # -- stopping ----------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        now = time.time()
        _write(self.dir / "stopped.json", {"reason": reason, "at": now, "running_seconds": self.running_seconds(now)})
        self._log(f"stopping the instance: {reason}")
        cmd = self.config.get("stop_command")
        if not cmd:
            self._log("no stop_command configured; nothing to run")
            return
        # The stop may end this very process; the reason is on disk before it runs.
        proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=600)
        self._log(f"stop_command exited {proc.returncode}: {proc.stdout[-500:]}{proc.stderr[-500:]}")

    def _log(self, msg: str) -> None:
        with open(self.dir / "agent.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}\n")

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        _write(self.dir / "agent.json", {"pid": os.getpid(), "started_at": time.time()})
        self._log("watchdog running")
        failures = 0
        while True:
            now = time.time()
            try:
                reason, status = self.evaluate(now)
                boot = self.boot
                boot["last_tick"] = now
                _write(self.dir / "boot.json", boot)
                _write(self.dir / "status.json", {"at": now, **status})
                if reason:
                    self.stop(reason)
                    # Stopping should have ended us; if it did not, try again in a while.
                    time.sleep(max(TICK_S, 10))
                failures = 0
            except Exception as e:  # a broken file must never silence the watchdog
                failures += 1
                self._log(f"tick failed ({failures}): {type(e).__name__}: {e}")
            time.sleep(self.config.get("tick", TICK_S))


def supervise(home: Path) -> None:
    """Keep `run` alive: a killed or crashed watchdog is back within a second."""
    agent = Agent(home)
    _write(agent.dir / "supervisor.json", {"pid": os.getpid(), "started_at": time.time()})
    child: subprocess.Popen | None = None

    def _term(signum, frame):
        if child and child.poll() is None:
            child.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _term)
    while True:
        with open(agent.dir / "agent.log", "ab") as log:
            child = subprocess.Popen([sys.executable, "-m", "remote.agent", "--home", str(home), "run"],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        code = child.wait()
        agent._log(f"watchdog exited with {code}; restarting")
        time.sleep(0.5)


def arm(home: Path, config: dict) -> dict:
    """Start the agent for this boot, unless it already runs (then its clocks are kept)."""
    agent = Agent(home)
    sup = _read(agent.dir / "supervisor.json") or {}
    if _alive(sup.get("pid")):
        return {"armed": True, "already_running": True, "pid": sup["pid"]}
    existing = agent.config
    # The creation time is set once: max_lifetime counts from it across every boot.
    merged = {**existing, **config, "created_at": existing.get("created_at", config.get("created_at", time.time()))}
    _write(agent.dir / "config.json", merged)
    old = agent.boot
    previous = old.get("previous_seconds", 0.0)
    if old.get("boot_started_at"):
        previous += max(0.0, old.get("last_tick", old["boot_started_at"]) - old["boot_started_at"])
    _write(agent.dir / "boot.json", {"boot_started_at": time.time(), "boot_done_at": None, "previous_seconds": previous})
    (agent.dir / "stopped.json").unlink(missing_ok=True)
    with open(agent.dir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "remote.agent", "--home", str(home), "supervise"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _read(agent.dir / "agent.json"):
        time.sleep(0.02)
    return {"armed": True, "already_running": False, "pid": proc.pid}


def boot_done(home: Path) -> dict:
    agent = Agent(home)
    boot = agent.boot
    if not boot.get("boot_done_at"):
        boot["boot_done_at"] = time.time()
        _write(agent.dir / "boot.json", boot)
        # Refresh the published view now, not at the next tick: the idle clock starts here.
        _, st = agent.evaluate()
        _write(agent.dir / "status.json", {"at": time.time(), **st})
    return {"boot_done_at": boot["boot_done_at"]}


def set_config(home: Path, assignments: list[str]) -> dict:
    agent = Agent(home)
    cfg = agent.config
    for item in assignments:
        key, _, value = item.partition("=")
        if key not in DEADLINE_KEYS:
            raise SystemExit(f"unknown setting {key!r}; valid: {', '.join(DEADLINE_KEYS)}")
        number = float(value)
        if number <= 0:
            raise SystemExit(f"{key} must be positive")
        cfg[key] = number
    _write(agent.dir / "config.json", cfg)
    return status(home)


def status(home: Path) -> dict:
    agent = Agent(home)
    reason, st = agent.evaluate()
    sup = _read(agent.dir / "supervisor.json") or {}
    return {"config": agent.config, "boot": agent.boot, "armed": _alive(sup.get("pid")), "stop_due": reason,
            "stopped": _read(agent.dir / "stopped.json"), **st}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m remote.agent")
    parser.add_argument("--home", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("arm")
    p.add_argument("--config-b64", required=True)
    sub.add_parser("run")
    sub.add_parser("supervise")
    sub.add_parser("boot-done")
    sub.add_parser("status")
    p = sub.add_parser("set")
    p.add_argument("assignments", nargs="+")
    args = parser.parse_args(argv)
    home = Path(os.path.expanduser(args.home))
    home.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        Agent(home).run()
    elif args.command == "supervise":
        supervise(home)
    elif args.command == "arm":
        print(json.dumps(arm(home, json.loads(base64.b64decode(args.config_b64)))))
    elif args.command == "boot-done":
        print(json.dumps(boot_done(home)))
    elif args.command == "set":
        print(json.dumps(set_config(home, args.assignments)))
    elif args.command == "status":
        print(json.dumps(status(home)))


if __name__ == "__main__":
    main()
