"""The watchdog on the instance: the billing guarantee.

    python -m remote.agent --home DIR arm --config-b64 B64   # at boot, before anything slow
    python -m remote.agent --home DIR boot-done              # the laptop: bootstrap+sync+load finished
    python -m remote.agent --home DIR set KEY=VALUE...       # `orch extend`
    python -m remote.agent --home DIR status                 # time left before each deadline
    python -m remote.agent --home DIR ensure                 # re-arm a dead watchdog, keeping its clocks

`arm` starts a supervisor (a respawning wrapper) that keeps `run`, the watchdog loop,
alive. The loop stops the instance, the provider's way (config's stop_command), when any
of these holds: boot not done within boot_timeout; no generation request for `idle`
counted from the end of boot; max_lifetime since creation; price x running time >= budget;
no heartbeat from any attached orch for heartbeat_timeout. Configuration and clocks live
on the instance disk (DIR/agent/), so a restarted agent continues the same deadlines.
Standard library only: it runs before anything is installed, and survives the server.

What keeps it working when things go wrong:
- A full disk: each tick decides and stops before it writes anything; every write is best
  effort and draws on a small preallocated reserve (DIR/agent/reserve); the log never raises.
- A crashed server: its in-flight requests are leases (its pid, its start time, a beat
  while it serves), so a dead server's requests stop counting as busy at once.
- Killed processes: the supervisor restarts a killed watchdog within a second; the server
  (remote/server/agent_guard.py) re-arms agent and supervisor killed together (`ensure`).
  Whether a watchdog runs is known from a lock it holds (DIR/agent/agent.lock), not a pid file.
- Bad numbers: NaN, infinities and absurd durations are refused by `arm` and `set`, and
  replaced by safe defaults (and reported) when found in the config file.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ._files import HeldLock, Reserve, append_line, lock_held, process_start, read_json, same_process, write_json

TICK_S = 1.0
STOP_RETRY_S = 10.0
RESERVE_CHECK_S = 30.0
STOP_WRITE_WAIT_S = 2.0  # the stop never waits longer than this for the disk
EXIT_DUPLICATE = 3  # `run` found another watchdog holding the lock

DEADLINE_KEYS = ("idle", "boot_timeout", "max_lifetime", "heartbeat_timeout", "budget")
DURATION_KEYS = ("idle", "boot_timeout", "max_lifetime", "heartbeat_timeout")
# The price too: where the provider names it only once the instance exists, the boot script armed the agent without it.
SETTABLE_KEYS = (*DEADLINE_KEYS, "price_per_hour")
# What an unreadable value in the config file falls back to (DESIGN.md's defaults): never "forever".
DEFAULTS = {"idle": 15 * 60.0, "boot_timeout": 30 * 60.0, "max_lifetime": 8 * 3600.0, "heartbeat_timeout": 10 * 60.0}
MAX_DURATION_S = 366 * 86400.0  # a deadline beyond a year is a mistake, not a plan
MAX_USD = 1e6  # budget and price per hour
TICK_RANGE = (0.05, 15.0)  # DESIGN.md: checked at least every 15 s

# The server's in-flight requests (remote/server/activity.py) are leases: they count as
# busy only while the server that took them lives and renews them.
LEASE_S = 30.0  # no beat from a busy server for this long: its requests no longer count
REQUEST_MAX_S = 3600.0  # one request running longer than this no longer counts as busy


class ConfigError(ValueError):
    """A setting the agent refuses; the message names the key and what to write instead."""


# ---------------------------------------------------------------------------------------
# Configuration: checked where it comes in (arm, set) and again where it is read


def _finite(key: str, value, low: float, high: float, unit: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if not low < number <= high:
        raise ConfigError(f"{key}: {value!r} is out of range; give a value above {low:g} and at most {high:g}{unit}")
    return number


def _check_value(key: str, value, now: float):
    """The value to keep, or ConfigError. None turns a deadline off, as the laptop sends it."""
    if key in DURATION_KEYS:
        return None if value is None else _finite(key, value, 0, MAX_DURATION_S, " seconds (366 days)")
    if key == "budget":
        return None if value is None else _finite(key, value, 0, MAX_USD, " USD")
    if key == "price_per_hour":
        if value is None or value == 0:
            return 0.0
        return _finite(key, value, 0, MAX_USD, " USD")
    if key == "created_at":
        return _finite(key, value, 0, now + 86400, " (a Unix time, not in the future)")
    if key == "stop_command":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"stop_command: {value!r} is not a shell command string")
        return value
    if key == "tick":
        if value is None:
            return None
        return max(TICK_RANGE[0], _finite(key, value, 0, TICK_RANGE[1], " seconds"))
    return value  # keys this agent does not know are kept as they are


def check_config(raw: dict, now: float | None = None) -> dict:
    """The config with every value checked; ConfigError names the first bad one (arm, set)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the agent's config must be a JSON object, not {type(raw).__name__}")
    now = now or time.time()
    return {key: _check_value(key, value, now) for key, value in raw.items()}


def load_config(raw: dict, now: float | None = None) -> tuple[dict, list[str]]:
    """The config file as the watchdog uses it: a bad value never disables a deadline.

    A bad duration falls back to its default, a bad created_at to now (max_lifetime then
    counts from this boot), a bad budget or price to none; each is reported.
    """
    now = now or time.time()
    clean: dict = {}
    errors: list[str] = []
    for key, value in (raw if isinstance(raw, dict) else {}).items():
        try:
            clean[key] = _check_value(key, value, now)
        except ConfigError as e:
            fallback = {**DEFAULTS, "created_at": now, "price_per_hour": 0.0}.get(key)
            clean[key] = fallback
            errors.append(f"{e}; using {fallback!r}")
    return clean, errors


# ---------------------------------------------------------------------------------------


def _fmt(seconds: float) -> str:
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    return f"{s}s"


def _num(value, default: float = 0.0) -> float:
    """A number read from a file another process wrote: anything odd is the default."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def _bounded(fn, seconds: float) -> None:
    """Run fn, but wait for it at most `seconds` (a write to a hung disk must not hold up a stop)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)


def _scrub(text: str, secret_source: str) -> str:
    """Text with every long word of secret_source (say, a key inside the stop command) masked."""
    for word in set(re.findall(r"[A-Za-z0-9_\-+/=.]{16,}", secret_source or "")):
        text = text.replace(word, "***")
    return text


class Agent:
    def __init__(self, home: Path):
        self.home = home
        self.dir = home / "agent"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        self.reserve = Reserve(self.dir / "reserve")
        self._config: dict = {}
        self._boot: dict = {}
        self.config_errors: list[str] = []
        self.watching = False  # True in the watchdog loop (`run`)

    # -- files -------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """config.json, checked; the last good one when the file cannot be read."""
        raw = read_json(self.dir / "config.json")
        if raw is not None:
            cfg, errors = load_config(raw)
            if errors and errors != self.config_errors and self.watching:  # logged once, by the watchdog
                for e in errors:
                    self.log(f"config.json: {e}")
            self._config, self.config_errors = cfg, errors
        return self._config

    @property
    def boot(self) -> dict:
        raw = read_json(self.dir / "boot.json")
        if raw is not None:
            self._boot = raw
        return self._boot

    def write(self, name: str, data: dict) -> bool:
        """Best effort: a full disk draws on the reserve, and never raises."""
        return write_json(self.dir / name, data, self.reserve)

    def log(self, msg: str) -> None:
        """Never raises: the watchdog must not die of its own logging."""
        try:
            append_line(self.dir / "agent.log", f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", self.reserve)
        except Exception:
            pass

    def last_heartbeat(self) -> float | None:
        beats = self.home / "heartbeats"
        latest = None
        try:
            entries = list(beats.iterdir()) if beats.exists() else []
        except OSError:
            entries = []
        for f in entries:
            if f.name.startswith("."):
                continue
            try:
                t = float(f.read_text().strip())
            except (OSError, ValueError):
                continue
            if math.isfinite(t):
                latest = t if latest is None else max(latest, t)
        return latest

    def activity(self) -> dict:
        return read_json(self.home / "activity.json") or {}

    def activities(self) -> list[dict]:
        """The server's activity.json; with several GPUs, each replica's activity-ID.json too."""
        return [self.activity(), *(read_json(f) or {} for f in sorted(self.home.glob("activity-*.json")))]

    # -- clocks ------------------------------------------------------------------------

    def running_seconds(self, now: float) -> float:
        boot = self.boot
        return _num(boot.get("previous_seconds")) + max(0.0, now - _num(boot.get("boot_started_at"), now))

    @staticmethod
    def requests(act: dict, now: float) -> tuple[bool, float]:
        """(is a generation request in flight, the last sign of one) from the server's activity.json.

        In-flight requests are leases: they count only while the server that took them lives
        (same pid and start time) and beats. A server that died while serving was last seen
        at its last beat; a live one that stopped renewing, or serves one request for longer
        than REQUEST_MAX_S, no longer counts as busy.
        """
        last = _num(act.get("last_request"))
        if _num(act.get("in_flight")) <= 0:
            return False, last
        beat = max(last, _num(act.get("beat")))
        pid = act.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            # No lease (a server older than leases): a request counts for at most REQUEST_MAX_S.
            return now - last < REQUEST_MAX_S, last
        start = act.get("pid_start")
        if not same_process(pid, start if isinstance(start, int) else None):
            return False, beat  # the server died mid-request (or its pid is another process's now)
        if now - beat > LEASE_S:
            return False, last  # alive but no longer renewing: hung
        leases = [_num(t, now) for t in act.get("leases") or [] if isinstance(t, (int, float))]
        return (not leases or now - min(leases) < REQUEST_MAX_S), last

    def evaluate(self, now: float | None = None) -> tuple[str | None, dict]:
        """(reason to stop or None, time left before each deadline). Reads only: never writes."""
        now = now or time.time()
        cfg, boot = self.config, self.boot
        left: dict[str, float] = {}
        reasons: list[str] = []
        started = _num(boot.get("boot_started_at"), now)
        done = _num(boot.get("boot_done_at")) or None

        if cfg.get("max_lifetime"):
            left["max_lifetime"] = _num(cfg.get("created_at"), started) + cfg["max_lifetime"] - now
            if left["max_lifetime"] <= 0:
                reasons.append(f"max_lifetime {_fmt(cfg['max_lifetime'])} reached")
        if cfg.get("boot_timeout") and not done:
            left["boot_timeout"] = started + cfg["boot_timeout"] - now
            if left["boot_timeout"] <= 0:
                reasons.append(f"boot not finished within boot_timeout {_fmt(cfg['boot_timeout'])}")
        if cfg.get("idle") and done:
            seen = [self.requests(act, now) for act in self.activities()]
            busy, last_request = any(b for b, _ in seen), max(t for _, t in seen)
            if busy:
                left["idle"] = cfg["idle"]
            else:
                left["idle"] = max(done, last_request) + cfg["idle"] - now
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
        """Run the stop command. Never raises; the disk can delay it by STOP_WRITE_WAIT_S at most."""
        now = time.time()
        record = {"reason": reason, "at": now, "running_seconds": self.running_seconds(now)}

        def note() -> None:
            # The reason goes first, because the stop may end this very process; but it is
            # best effort: on a full disk the reserve pays for it, on a hung disk nobody waits.
            self.write("stopped.json", record)
            self.log(f"stopping the instance: {reason}")

        _bounded(note, STOP_WRITE_WAIT_S)
        cmd = self._config.get("stop_command")
        if not cmd:
            self.log("no stop_command configured; nothing to run")
            return
        try:
            proc = subprocess.run(["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=600)
            out = _scrub(f"{proc.stdout[-500:]}{proc.stderr[-500:]}", cmd)
            self.log(f"stop_command exited {proc.returncode}: {out}")
        except Exception as e:  # a missing shell, a timeout: try again at the next round
            self.log(f"stop_command failed: {type(e).__name__}: {_scrub(str(e), cmd)}")

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        lock = HeldLock(self.dir / "agent.lock")
        if not lock.acquire(timeout=2.0):
            self.log("another watchdog holds agent.lock; leaving it to that one")
            sys.exit(EXIT_DUPLICATE)
        self.reserve.ensure()
        self.write("agent.json", {"pid": os.getpid(), "start": process_start(os.getpid()), "started_at": time.time()})
        self.log("watchdog running")
        self.watching = True
        failures = 0
        reserve_checked = time.monotonic()
        while True:
            now = time.time()
            try:
                # Decide and act first: nothing before the stop needs the disk to have room.
                reason, status = self.evaluate(now)
                if reason:
                    self.stop(reason)
                    # Stopping should have ended us; if it did not, try again in a while.
                    time.sleep(STOP_RETRY_S)
                    continue
                # Bookkeeping only once nothing is due, and best effort: status.json is the
                # published view (and its "at" the last moment this boot was seen running).
                self.write("status.json", {"at": now, **status})
                if time.monotonic() - reserve_checked > RESERVE_CHECK_S:
                    self.reserve.ensure()  # refilled once the disk has room again
                    reserve_checked = time.monotonic()
                failures = 0
            except Exception as e:  # a broken file must never silence the watchdog
                failures += 1
                if failures <= 3 or failures % 60 == 0:
                    self.log(f"tick failed ({failures}): {type(e).__name__}: {e}")
            time.sleep(self._config.get("tick") or TICK_S)


# ---------------------------------------------------------------------------------------
# Keeping the loop alive


def watchdog_state(home: Path) -> dict:
    """Which of the agent's processes run now, from the locks they hold (exact, no pid files)."""
    d = home / "agent"
    agent, supervisor = lock_held(d / "agent.lock"), lock_held(d / "supervisor.lock")
    return {"agent": agent, "supervisor": supervisor, "armed": agent or supervisor}


def _spawn(home: Path, command: str, log_name: str) -> subprocess.Popen:
    """Start `python -m remote.agent --home HOME COMMAND` in its own session, importable from anywhere."""
    code_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH", "")) if p)
    try:
        log = open(home / "agent" / log_name, "ab")
    except OSError:
        log = None
    try:
        return subprocess.Popen([sys.executable, "-m", "remote.agent", "--home", str(home), command], cwd=str(home),
                                env=env, stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=command == "supervise")
    finally:
        if log:
            log.close()


def supervise(home: Path) -> None:
    """Keep `run` alive: a killed or crashed watchdog is back within a second. Never raises."""
    agent = Agent(home)
    lock = HeldLock(agent.dir / "supervisor.lock")
    if not lock.acquire(timeout=2.0):
        return  # another supervisor runs
    agent.write("supervisor.json", {"pid": os.getpid(), "start": process_start(os.getpid()), "started_at": time.time()})
    child: subprocess.Popen | None = None

    def _term(signum, frame):
        if child and child.poll() is None:
            child.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _term)
    while True:
        try:
            child = _spawn(home, "run", "agent.log")
            code = child.wait()
            if code == EXIT_DUPLICATE:
                time.sleep(1.0)  # a watchdog whose supervisor died still runs: take over when it ends
            else:
                agent.log(f"watchdog exited with {code}; restarting")
        except Exception as e:  # out of processes or memory: keep trying
            agent.log(f"could not start the watchdog: {type(e).__name__}: {e}")
            time.sleep(2.0)
        time.sleep(0.5)


def _wait_armed(home: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if watchdog_state(home)["agent"]:
            return True
        time.sleep(0.02)
    return False


def arm(home: Path, config: dict) -> dict:
    """Start the agent for this boot, unless it already runs (then its clocks are kept)."""
    agent = Agent(home)
    if watchdog_state(home)["armed"]:
        sup = read_json(agent.dir / "supervisor.json") or {}
        return {"armed": True, "already_running": True, "pid": sup.get("pid")}
    now = time.time()
    config = check_config(config, now)  # the laptop's numbers: refused here too, naming the key
    existing, _ = load_config(read_json(agent.dir / "config.json") or {}, now)
    # The creation time is set once: max_lifetime counts from it across every boot.
    created = existing.get("created_at") or config.get("created_at") or now
    merged = {**existing, **config, "created_at": created}
    if not agent.write("config.json", merged):
        raise SystemExit(f"cannot write {agent.dir / 'config.json'} (is the disk full?); the agent is NOT armed")
    old = agent.boot
    previous = _num(old.get("previous_seconds"))
    if old.get("boot_started_at"):
        # The last moment the previous boot was seen running: its last tick.
        seen = max(_num(old.get("last_tick")), _num((read_json(agent.dir / "status.json") or {}).get("at")))
        previous += max(0.0, seen - _num(old["boot_started_at"]))
    agent.write("boot.json", {"boot_started_at": now, "boot_done_at": None, "previous_seconds": previous})
    try:
        (agent.dir / "stopped.json").unlink(missing_ok=True)
    except OSError:
        pass
    agent.reserve.ensure()
    proc = _spawn(home, "supervise", "supervisor.log")
    armed = _wait_armed(home, 10)
    return {"armed": armed, "already_running": False, "pid": proc.pid}


def rearm_if_dead(home: Path, by: str) -> subprocess.Popen | None:
    """Start a supervisor when the instance was armed once (config.json) and no watchdog runs now.

    Keeps the config and the clocks: unlike `arm`, the boot is not started again. The
    spawned process, or None when there was nothing to do.
    """
    if not (home / "agent" / "config.json").exists() or watchdog_state(home)["armed"]:
        return None
    proc = _spawn(home, "supervise", "supervisor.log")
    Agent(home).log(f"no watchdog was running; re-armed by {by} (supervisor pid {proc.pid})")
    return proc


def ensure(home: Path, by: str = "the ensure command") -> dict:
    """Re-arm a dead watchdog (agent and supervisor both gone), keeping its config and clocks.

    The second mechanism beside the supervisor: the server calls it every few seconds
    (remote/server/agent_guard.py), and so can cron or a systemd timer.
    """
    proc = rearm_if_dead(home, by)
    configured = (home / "agent" / "config.json").exists()
    return {"configured": configured, "rearmed": proc is not None,
            "armed": proc is not None or watchdog_state(home)["armed"]}


def boot_done(home: Path) -> dict:
    agent = Agent(home)
    boot = agent.boot
    if not boot.get("boot_done_at"):
        boot["boot_done_at"] = time.time()
        if not agent.write("boot.json", boot):
            raise SystemExit(f"cannot write {agent.dir / 'boot.json'} (is the disk full?)")
        # Refresh the published view now, not at the next tick: the idle clock starts here.
        _, st = agent.evaluate()
        agent.write("status.json", {"at": time.time(), **st})
    armed = ensure(home, by="boot-done")["armed"]
    return {"boot_done_at": boot["boot_done_at"], "armed": armed}


def set_config(home: Path, assignments: list[str]) -> dict:
    agent = Agent(home)
    cfg = dict(read_json(agent.dir / "config.json") or {})
    for item in assignments:
        key, _, value = item.partition("=")
        if key not in SETTABLE_KEYS:
            raise SystemExit(f"unknown setting {key!r}; valid: {', '.join(SETTABLE_KEYS)}")
        try:
            number = float(value)
        except ValueError:
            raise SystemExit(f"{key}: {value!r} is not a number; give seconds (or USD for budget)") from None
        try:
            cfg[key] = _check_value(key, number, time.time())
        except ConfigError as e:
            raise SystemExit(str(e)) from None
    if not agent.write("config.json", cfg):
        raise SystemExit(f"cannot write {agent.dir / 'config.json'} (is the disk full?); nothing changed")
    return status(home)


def status(home: Path) -> dict:
    agent = Agent(home)
    reason, st = agent.evaluate()
    watchdog = watchdog_state(home)
    return {"config": agent.config, "boot": agent.boot, "armed": watchdog["armed"], "stop_due": reason,
            "stopped": read_json(agent.dir / "stopped.json"), **st,
            "watchdog": {"agent": watchdog["agent"], "supervisor": watchdog["supervisor"],
                         "reserve_bytes": agent.reserve.held()},
            "config_errors": agent.config_errors}


def _decode_config(b64: str) -> dict:
    try:
        config = json.loads(base64.b64decode(b64, validate=True))
    except (binascii.Error, ValueError) as e:
        raise SystemExit(f"--config-b64 is not base64 of a JSON object: {e}") from None
    return config


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
    sub.add_parser("ensure")
    p = sub.add_parser("set")
    p.add_argument("assignments", nargs="+")
    args = parser.parse_args(argv)
    home = Path(os.path.expanduser(args.home))
    home.mkdir(parents=True, exist_ok=True)
    try:
        if args.command == "run":
            Agent(home).run()
        elif args.command == "supervise":
            supervise(home)
        elif args.command == "arm":
            print(json.dumps(arm(home, _decode_config(args.config_b64))))
        elif args.command == "boot-done":
            print(json.dumps(boot_done(home)))
        elif args.command == "set":
            print(json.dumps(set_config(home, args.assignments)))
        elif args.command == "status":
            print(json.dumps(status(home)))
        elif args.command == "ensure":
            print(json.dumps(ensure(home)))
    except ConfigError as e:
        raise SystemExit(f"the agent's config: {e}") from None


if __name__ == "__main__":
    main()
