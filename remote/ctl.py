"""orch's control program on the instance: `python -m remote.ctl --home DIR COMMAND`.

The laptop drives the instance through these few commands over SSH, so that process
management happens where the processes live. Standard library only: it runs before
anything is installed, and must never import laptop-side modules.
Each command prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import protocol
from ._files import pid_alive as _pid_alive
from ._files import read_json as _read_json
from ._files import write_private

SERVER_DEPS = ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "PIL", "safetensors", "blake3", "boto3")


def spawn_detached(argv: list[str], log_path: Path, cwd: Path) -> int:
    """Start argv in its own session, immune to the SSH channel closing; return its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def server_info(home: Path) -> protocol.ServerInfo:
    info = _read_json(home / "server.json") or {}
    pid = info.get("pid")
    alive = bool(pid) and _pid_alive(pid)
    result: protocol.ServerInfo = {"alive": alive, "pid": pid if alive else None, "port": info.get("port") if alive else None, "health": None}
    if alive and info.get("port"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{info['port']}/healthz", timeout=5) as r:
                result["health"] = json.loads(r.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            result["health"] = None
    return result


def cmd_check_deps(home: Path, args) -> dict:
    missing = [m for m in SERVER_DEPS if importlib.util.find_spec(m) is None]
    return {"python": sys.executable, "version": sys.version.split()[0], "missing": missing, "gpus": gpu_count(),
            "ray": importlib.util.find_spec("ray") is not None}


def gpu_count() -> int:
    """NVIDIA GPUs here, by `nvidia-smi -L` (no CUDA initialised, nothing imported)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def cmd_start_server(home: Path, args) -> dict:
    current = server_info(home)
    if current["alive"]:
        return {**current, "started": False}
    (home / "server.json").unlink(missing_ok=True)
    stop_worker(home)  # serving by itself again: no longer lending its GPUs to another instance's server
    argv = [sys.executable, "-m", "remote.server", "--home", str(home)]
    if args.device:
        argv += ["--device", args.device]
    if args.gpus:
        argv += ["--gpus", args.gpus]
    if getattr(args, "cluster_address", None):
        argv += ["--cluster-address", args.cluster_address]
    if getattr(args, "port", None):
        argv += ["--port", str(args.port)]
    pid = spawn_detached(argv, home / "logs" / "server.log", home)
    (home / "server.pid").write_text(str(pid))
    return {"started": True, "pid": pid}


def cmd_wait_server(home: Path, args) -> dict:
    """Until the model is loaded; fails with the server log's tail when it dies or errs."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        info = server_info(home)
        pid_file = home / "server.pid"
        if not info["alive"] and pid_file.exists() and not _pid_alive(int(pid_file.read_text() or 0)):
            return _fail(home, "the server exited during start")
        health = info.get("health") or {}
        if health.get("status") == "ready":
            return info
        if health.get("status") == "error":
            return _fail(home, f"the server could not load a model: {health.get('error')}")
        time.sleep(0.2)
    return _fail(home, f"the server was not ready within {args.timeout:.0f}s")


def _fail(home: Path, message: str) -> dict:
    log = home / "logs" / "server.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    print(json.dumps({"error": message, "log_tail": tail}))
    sys.exit(1)


def cmd_stop_server(home: Path, args) -> dict:
    info = _read_json(home / "server.json") or {}
    pids = {p for p in (info.get("pid"), _int((home / "server.pid").read_text()) if (home / "server.pid").exists() else None) if p}
    stopped = end_process_groups(pids)
    (home / "server.json").unlink(missing_ok=True)
    return {"stopped": stopped}


def end_process_groups(pids) -> list[int]:
    """SIGTERM to each live pid's process group (the pid alone if it leads none), SIGKILL to what
    is left after 15 s; the pids that were alive."""
    stopped = []
    for pid in pids:
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
            stopped.append(pid)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_pid_alive(p) for p in stopped):
        time.sleep(0.1)
    for pid in stopped:
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return stopped


def cmd_cluster_head(home: Path, args) -> dict:
    """The server again, as a Ray cluster's head on this instance's private address (other
    instances join it: cluster-join). Prints where they join, and the Ray token they need."""
    stop_worker(home)
    # On the port it had: the laptop's tunnel forwards there.
    args.port = (_read_json(home / "server.json") or {}).get("port")
    cmd_stop_server(home, args)
    cmd_start_server(home, args)
    info = cmd_wait_server(home, args)
    ray = home / "ray"
    try:
        address, token = (ray / "address").read_text().strip(), (ray / "auth_token").read_text().strip()
    except OSError:
        return _fail(home, "the server started without a Ray cluster (no HOME/ray/address)")
    return {**info, "address": address, "ray_token": token}


def cmd_cluster_join(home: Path, args) -> dict:
    """This instance's GPUs to the head at --join: its server stops, a Ray worker node starts
    (remote/server/replicas/worker.py). The head's Ray token comes on stdin, never a command line."""
    token = sys.stdin.read().strip()
    if not token:
        return _fail(home, "cluster-join: the head's Ray token was not given on stdin")
    write_private(home / "ray" / "cluster_token", token)
    stop_worker(home)
    cmd_stop_server(home, args)
    argv = [sys.executable, "-m", "remote.server.replicas.worker", "--home", str(home), "--join", args.join,
            "--node-address", args.node_address]
    if args.device:
        argv += ["--device", args.device]
    if args.gpus and args.gpus != "all":
        argv += ["--slots", args.gpus]
    pid = spawn_detached(argv, home / "logs" / "worker.log", home)
    (home / "worker.pid").write_text(str(pid))
    time.sleep(3)  # a bad address or token ends it at once: say so here, with its log
    if not _pid_alive(pid):
        log = home / "logs" / "worker.log"
        print(json.dumps({"error": "the Ray worker exited at once", "log_tail": log.read_text(errors="replace")[-3000:]
                          if log.exists() else ""}))
        sys.exit(1)
    return {"pid": pid}


def stop_worker(home: Path) -> list[int]:
    """A Ray worker node this instance ran for a cluster (cluster-join): ended with its process group."""
    pid = _int((home / "worker.pid").read_text()) if (home / "worker.pid").exists() else None
    stopped = end_process_groups({pid} if pid else set())
    (home / "worker.pid").unlink(missing_ok=True)
    return stopped


def _int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def cmd_heartbeat(home: Path, args) -> dict:
    beats = home / "heartbeats"
    beats.mkdir(parents=True, exist_ok=True)
    now = time.time()
    tmp = beats / f".{args.client}.tmp"
    tmp.write_text(str(now))
    tmp.replace(beats / args.client)
    return {"client": args.client, "at": now}


def cmd_server_info(home: Path, args) -> dict:
    return server_info(home)


COMMANDS = {
    protocol.CHECK_DEPS: cmd_check_deps,
    protocol.START_SERVER: cmd_start_server,
    protocol.WAIT_SERVER: cmd_wait_server,
    protocol.STOP_SERVER: cmd_stop_server,
    protocol.SERVER_INFO: cmd_server_info,
    protocol.HEARTBEAT: cmd_heartbeat,
    protocol.CLUSTER_HEAD: cmd_cluster_head,
    protocol.CLUSTER_JOIN: cmd_cluster_join,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m remote.ctl")
    parser.add_argument("--home", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(protocol.CHECK_DEPS)
    p = sub.add_parser(protocol.START_SERVER)
    p.add_argument("--device", default=None)
    p.add_argument("--gpus", default=None, help="'all' or a number (python -m remote.server --gpus)")
    p.add_argument("--port", type=int, default=None, help="on this port (one a tunnel forwards to); default: a free one")
    p = sub.add_parser(protocol.WAIT_SERVER)
    p.add_argument("--timeout", type=float, default=600)
    sub.add_parser(protocol.STOP_SERVER)
    sub.add_parser(protocol.SERVER_INFO)
    p = sub.add_parser(protocol.HEARTBEAT)
    p.add_argument("client")
    p = sub.add_parser(protocol.CLUSTER_HEAD)
    p.add_argument("--cluster-address", required=True, help="this instance's private IP address")
    p.add_argument("--device", default=None)
    p.add_argument("--gpus", default=None)
    p.add_argument("--timeout", type=float, default=600)
    p = sub.add_parser(protocol.CLUSTER_JOIN)
    p.add_argument("--join", required=True, help="the head's Ray address (cluster-head's `address`)")
    p.add_argument("--node-address", required=True, help="this instance's private IP address")
    p.add_argument("--device", default=None)
    p.add_argument("--gpus", default=None, help="GPUs to lend: 'all' or a number")
    args = parser.parse_args(argv)
    home = Path(os.path.expanduser(args.home))
    home.mkdir(parents=True, exist_ok=True)
    print(json.dumps(COMMANDS[args.command](home, args)))


if __name__ == "__main__":
    main()
