"""Run the image server: `python -m remote.server --home DIR [--port 0]`.

Binds 127.0.0.1 only (never a public address: the laptop reaches it through the SSH
tunnel), writes the chosen port to HOME/server.json, then serves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m remote.server")
    parser.add_argument("--home", required=True, help="orch's directory on the instance (token, models, state)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--device", default=None, help="cuda or cpu; default: cuda where present")
    parser.add_argument("--gpus", default="all",
                        help="GPUs to serve from, one replica each, behind the one port (Ray Serve); 'all' (default) "
                             "or a number. With --device cpu, N replicas share the CPU (tests)")
    parser.add_argument("--cluster-address", default=None, metavar="IP",
                        help="this instance's private address: other instances' Ray may join this server's "
                             "(python -m remote.server.replicas.worker), and their GPUs serve behind this URL too")
    args = parser.parse_args()
    if args.cluster_address is not None:
        import ipaddress

        try:
            args.cluster_address = str(ipaddress.ip_address(args.cluster_address))
        except ValueError:
            parser.error(f"--cluster-address: expected this instance's private IP address, got {args.cluster_address!r}")

    home = Path(os.path.expanduser(args.home))
    # torch.compile's caches live on the instance disk (and so in saved images): a restart
    # loads compiled kernels instead of compiling again. Set before torch is imported.
    cache = home / "compile-cache"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    # Whole compiled graphs that load without re-tracing (remote/server/precompiled.py); "0": off.
    if os.environ.get("ORCH_PRECOMPILED_DIR") != "0":
        os.environ.setdefault("ORCH_PRECOMPILED_DIR", str(cache / "precompiled"))
    else:
        del os.environ["ORCH_PRECOMPILED_DIR"]
    # Models load from disk only: no Hugging Face Hub calls, even for a missing config.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from .startup import prepare

    prepare(home)  # bytecode and package-metadata caches; before torch and diffusers are imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = (home / "token").read_text().strip()
    if not token:
        raise SystemExit(f"{home / 'token'} is empty")

    import uvicorn

    from .app import create_app
    from .settings import ServerSettings

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, a keep-alive client (requests.Session,
    # what A1111 clients use) waits ~40 ms per response on Nagle + delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    info = home / "server.json"
    tmp = info.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": port}))
    tmp.replace(info)

    replicas = replica_count(args.gpus, args.device)
    on_ray = replicas > 1 or args.cluster_address is not None  # a cluster's head serves through Ray even with one GPU
    if on_ray:
        from .replicas import cluster, registry
        from .replicas.ingress import Ingress, create_ingress

        registry.clear(home)
        max_batch = ServerSettings.from_env(token=token, models_dir=home / "models", state_dir=home).max_batch
        deployed = cluster.start(home, replicas, args.device, max_ongoing_requests=max_batch,
                                 cluster_address=args.cluster_address)
        ingress = Ingress(home, deployed.handle, replicas, cluster=deployed.cluster)
        if deployed.cluster:
            deployed.follow(on_change=ingress.resized)
        app = create_ingress(ingress)
    else:
        app = create_app(ServerSettings.from_env(token=token, models_dir=home / "models", state_dir=home, device=args.device))
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    from .agent_guard import start_agent_guard

    start_agent_guard(home, shutting_down=lambda: server.should_exit)  # re-arms a killed auto-shutdown agent
    try:
        server.run(sockets=[sock])
    finally:
        if on_ray:
            cluster.stop()


def replica_count(gpus: str, device: str | None) -> int:
    """How many replicas to run: 1 means this process serves the app itself (no Ray in the path)."""
    from .replicas.cluster import visible_gpus

    if gpus == "all":
        return max(1, visible_gpus()) if device != "cpu" else 1
    try:
        wanted = int(gpus)
    except ValueError:
        raise SystemExit(f"--gpus: expected 'all' or a number, got {gpus!r}") from None
    if wanted < 1:
        raise SystemExit(f"--gpus: at least 1, got {wanted}")
    if device != "cpu":
        available = visible_gpus()
        if wanted > max(1, available):
            raise SystemExit(f"--gpus {wanted}: this instance has {available} GPU(s); ask for at most {max(1, available)}")
    return wanted


if __name__ == "__main__":
    main()
