"""Ray and Ray Serve on this instance only, with one replica of the server per GPU.

Ray starts here, as a child of the server process, and shares its fate: when the server
exits or is killed, Ray's processes and the replicas go with it (Ray's head processes watch
the driver that started them). No dashboard, no Serve HTTP proxy (the ingress is orch's own),
no usage statistics sent anywhere.

Ray's own ports (its GCS, raylet, workers) listen on every interface of the instance: Ray
2.60 binds them so whatever node address it is given, and has no setting to keep them on
loopback. They answer only a caller that presents this server's Ray token: token
authentication is set here, not left to Ray's default, with a fresh random token for each
start in HOME/ray/auth_token (mode 600; Ray's default is ~/.ray/auth_token, readable by
every user). The agent's heartbeat and the API stay on 127.0.0.1 behind the SSH tunnel.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("orch.server")

APP = "orch"
DEPLOYMENT = "gpu"


class RayMissing(RuntimeError):
    pass


def visible_gpus() -> int:
    """GPUs this process may use, without importing torch (the ingress never touches CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int()
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    except OSError:
        return 0


SLOT = "orch_replica"  # the resource a replica takes on the CPU (tests); on a GPU it takes the GPU
LOOPBACK_NODE = "127.0.1.1"  # Ray turns "127.0.0.1" into the host's own address; another loopback one it keeps
FOLLOW_S = 2.0


def start(home: Path, replicas: int, device: str | None, max_ongoing_requests: int = 8,
          cluster_address: str | None = None) -> "Replicas":
    """Start Ray and the deployment; returns the replicas (they load their model in the background).

    max_ongoing_requests is the engine's largest batch: a replica takes no more requests than
    fit in one batch, and the rest wait at Ray's router for the first replica with room. Without
    the cap, 16 clients on two GPUs settled as 9 + 7 (one GPU running batches of 8 and of 1, the
    other batches of 7 padded to 8): 8.9 images/s on two H200s where one gave 6.5.

    cluster_address: this instance's private address, where other instances' Ray joins this one
    (worker.py); the deployment then follows the GPUs the cluster has (Replicas.follow)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the instance
    os.environ["RAY_AUTH_MODE"] = "token"  # its ports are on every interface: nobody without the token (module doc)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(new_auth_token(home))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # an inherited token would win over the file
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # A request that finds every replica full waits at Ray's router, which looks again after a
    # backoff growing from 25 ms to 500 ms: a GPU that freed a slot could idle half a second before
    # it got the request (a batch job, 10 requests in flight per GPU: 11.2 images/s on two H200s
    # where 16 clients got 12.3). Looking again every 2-20 ms costs the ingress next to nothing.
    os.environ.setdefault("RAY_SERVE_ROUTER_RETRY_INITIAL_BACKOFF_S", "0.002")
    os.environ.setdefault("RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S", "0.02")
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise RayMissing(f"serving several GPUs needs Ray Serve (pip install 'ray[serve]'): {e}") from None

    from .replica import GpuReplica

    on_gpu = device != "cpu"
    here = str(Path(__file__).resolve().parents[3])  # the folder that holds remote/
    env = {k: v for k, v in os.environ.items() if k.startswith(("ORCH_", "TORCH", "TRITON_", "HF_", "TRANSFORMERS_",
                                                                  "DIFFUSERS_", "PYTORCH_", "NCCL_", "RAY_"))}
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    # address="local": a new Ray of this server's own, never one a `ray start` left on this host.
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), num_gpus=replicas if on_gpu else 0,
             resources=None if on_gpu else {SLOT: replicas}, include_dashboard=False,
             _node_ip_address=cluster_address or LOOPBACK_NODE, namespace="orch", log_to_driver=True,
             configure_logging=False, object_store_memory=256 * 1024 * 1024, runtime_env={"env_vars": env})
    address = home / "ray" / "address"  # the GCS address: where workers join, and `ray status --address`
    address.with_suffix(".tmp").write_text(ray.get_runtime_context().gcs_address + "\n")
    address.with_suffix(".tmp").replace(address)
    token, roster = None, None
    if cluster_address:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from . import registry

        here_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # Held by Replicas: an actor nobody holds a handle to is ended by Ray, name or not.
        roster = ray.remote(registry.Roster).options(name=registry.ROSTER, num_cpus=0,
                                                     scheduling_strategy=here_node).remote()
        token = (home / "token").read_text().strip()  # the other hosts' replicas answer with this server's token
    serve.start(http_options={"location": "NoServer"}, logging_config={"log_level": "WARNING"})
    deployment = serve.deployment(
        GpuReplica, name=DEPLOYMENT, num_replicas=replicas,
        ray_actor_options={"num_gpus": 1, "num_cpus": 0} if on_gpu else {"num_cpus": 0, "resources": {SLOT: 1}},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    args = (str(home), device, token)
    handle = serve.run(deployment.bind(*args), name=APP, route_prefix=None)
    log.info("Ray Serve: %d replicas of the server (%s), python %s%s", replicas, "one GPU each" if on_gpu else "CPU",
             sys.version.split()[0], f"; other instances join at {ray.get_runtime_context().gcs_address}"
             if cluster_address else "")
    return Replicas(handle, deployment, args, replicas, "GPU" if on_gpu else SLOT, roster=roster)


class Replicas:
    """The deployment's handle and size. In a cluster its size follows the GPUs of the nodes that
    joined or left (an instance stopped): one replica per GPU, wherever Ray finds it."""

    def __init__(self, handle, deployment, args: tuple, count: int, slot: str, roster=None):
        self.handle, self._deployment, self._args = handle, deployment, args
        self.count, self._slot, self.roster = count, slot, roster
        self.cluster = roster is not None

    def slots(self) -> int:
        import ray

        return int(ray.cluster_resources().get(self._slot, 0))

    def resize(self, n: int) -> None:
        from ray import serve

        # Only num_replicas changes: Ray Serve adds or removes replicas and keeps the others serving.
        serve.run(self._deployment.options(num_replicas=n).bind(*self._args), name=APP, route_prefix=None)
        self.count = n

    def follow(self, on_change=lambda n: None, stop: threading.Event | None = None) -> threading.Thread:
        """Resize to the cluster's slots whenever they change (checked every FOLLOW_S), on a thread."""
        stop = stop or threading.Event()

        def loop() -> None:
            while not stop.wait(FOLLOW_S):
                try:
                    n = max(1, self.slots())
                    if n != self.count:
                        log.info("the cluster has %d %s slot(s): %d replicas (were %d)", n, self._slot, n, self.count)
                        on_change(n)
                        self.resize(n)
                except Exception as e:  # Ray going down with the server, or a resize Ray refused: say it, try again
                    log.warning("following the cluster's size: %s", e)

        thread = threading.Thread(target=loop, name="cluster-follow", daemon=True)
        thread.start()
        return thread


def new_auth_token(home: Path) -> Path:
    """A fresh random token for this start's Ray, readable by this user only; its path."""
    import secrets

    from ..._files import write_private

    path = home / "ray" / "auth_token"
    write_private(path, secrets.token_hex(32))
    return path


def stop() -> None:
    try:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    except Exception as e:  # shutting down: say it, then let the process end (Ray's processes share its fate)
        log.warning("Ray shutdown: %s", e)
