"""Lend this instance's GPUs to another instance's server: join its Ray as a worker node.

    python -m remote.server.replicas.worker --home DIR --join HEAD_ADDRESS --node-address IP [--device cpu] [--slots N]

HEAD_ADDRESS is the head server's Ray address (its HOME/ray/address, written by cluster.py when
it was started with --cluster-address); IP is this instance's private address, where the head
reaches it. The head's Ray token must be in HOME/ray/cluster_token (mode 600): the head's Ray
answers nobody without it. This instance runs no server of its own: the head's deployment
places one replica on each GPU that joins (on the CPU, --slots replicas), and those serve from
this instance's home (its models; its activity files, which its own agent reads).

The process becomes `ray start --block`: ending it (a signal to its process group) takes the
node and its replicas with it, and the head's deployment shrinks to the GPUs left. When the head
goes away, Ray's node gives up on it and this process ends.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path


def parse_join(value: str) -> str:
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host)
        valid = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"expected the head's Ray address as IP:PORT (its HOME/ray/address), got {value!r}")
    return value


def parse_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected this instance's private IP address, got {value!r}") from None


def ray_start_argv(join: str, node_address: str, device: str | None, slots: int | None) -> list[str]:
    from .cluster import SLOT, visible_gpus

    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={join}", f"--node-ip-address={node_address}",
            f"--num-cpus={max(2, os.cpu_count() or 2)}", f"--object-store-memory={256 * 1024 * 1024}", "--block",
            "--disable-usage-stats"]
    if device == "cpu":
        argv += ["--num-gpus=0", f"--resources={json.dumps({SLOT: slots or 1})}"]
    else:
        # As the head counts its own (__main__.replica_count): a machine without a visible GPU still serves one replica.
        argv.append(f"--num-gpus={slots or max(1, visible_gpus())}")
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m remote.server.replicas.worker")
    parser.add_argument("--home", required=True, help="orch's directory on this instance")
    parser.add_argument("--join", required=True, type=parse_join, help="the head's Ray address, IP:PORT")
    parser.add_argument("--node-address", required=True, type=parse_ip, help="this instance's private IP address")
    parser.add_argument("--device", default=None, help="cpu: replicas on the CPU (tests); default: this instance's GPUs")
    parser.add_argument("--slots", type=int, default=None, help="GPUs to lend (default: all); on the CPU, replicas")
    args = parser.parse_args(argv)
    if args.slots is not None and args.slots < 1:
        parser.error(f"--slots: at least 1, got {args.slots}")
    home = Path(os.path.expanduser(args.home))
    token = home / "ray" / "cluster_token"
    if not token.is_file() or not token.read_text().strip():
        raise SystemExit(f"{token}: the head's Ray token is not there (copy the head's HOME/ray/auth_token, mode 600)")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "ORCH_NODE_HOME": str(home)}
    env.pop("RAY_AUTH_TOKEN", None)
    started = home / "worker.json"
    tmp = started.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "join": args.join, "node_address": args.node_address}))
    tmp.replace(started)
    command = ray_start_argv(args.join, args.node_address, args.device, args.slots)
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    main()
