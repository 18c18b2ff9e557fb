"""A job's instances that share a private network serve as one Ray cluster, behind one URL.

Where the provider declares PrivateNetwork (AWS: one VPC), the first of the job's instances on a
network to come up becomes the cluster's head: its server starts again as a Ray head on its
private address (remote ctl `cluster-head`). Each later one on that network joins it: the
provider lets the two reach each other on their private addresses (AWS: a security group whose
members admit each other, and nobody else), the head's Ray token goes over SSH stdin, and the
instance's server stops while a Ray worker node lends its GPUs to the head's deployment
(`cluster-join`). The laptop then hands the head more requests at once; the joined instance
keeps its tunnel (its agent's heartbeat) and its own billing guarantee.

Elsewhere (a provider without PrivateNetwork, an instance on another network, a head that did
not form) each instance serves its own URL, as before. When a head is given up, the instances
that had joined it serve their own URLs again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from ..errors import OrchError
from ..lifecycle import Orchestrator
from ..lifecycle.bootstrap import ensure_ray
from ..lifecycle.context import Progress
from ..providers.capabilities import PrivateNetwork
from .dispatch import Dispatcher, Endpoint, gpus_from_health, read_health
from .fleet import Fleet, Member

JOIN_WAIT_S = 180.0  # how long the head's URL has to show a joined instance's GPUs
FAILURES = (OrchError, httpx.HTTPError, ValueError, KeyError, TimeoutError)  # what a step here can fail with


@dataclass
class Head:
    name: str
    instance_id: str
    formed: threading.Event = field(default_factory=threading.Event)
    endpoint: Endpoint | None = None  # set when formed; None: it did not form (the others serve alone)
    address: str = ""  # where Ray joins it
    ray_token: str = ""  # a secret: never logged
    gpus: int = 0
    workers: list[Member] = field(default_factory=list)


class ClusterFormer:
    def __init__(self, make_orch: Callable[[], Orchestrator], fleet: Fleet, dispatcher: Dispatcher, progress: Progress):
        self._make, self._fleet, self._dispatcher, self._progress = make_orch, fleet, dispatcher, progress
        self._lock = threading.Lock()
        self._heads: dict[str, Head] = {}  # network -> its head

    # -- the fleet's callback: an instance is serving ------------------------------------------

    def ready(self, endpoint: Endpoint) -> None:
        member = next(m for m in self._fleet.members if m.name == endpoint.name)
        orch = self._make()
        provider = orch.provider(member.provider) if member.provider else None
        if not isinstance(provider, PrivateNetwork) or not member.instance_id:
            self._dispatcher.add(endpoint)
            return
        try:
            network = provider.network_of(member.instance_id)
        except OrchError as e:
            self._progress(f"{member.name}: its private network is not known ({e}); it serves its own URL")
            self._dispatcher.add(endpoint)
            return
        with self._lock:
            head = self._heads.get(network)
            if head is None:
                head = self._heads[network] = Head(member.name, member.instance_id)
                leading = True
            else:
                leading = False
        if leading:
            self._lead(orch, provider, member, endpoint, head)
        else:
            self._join(orch, provider, member, endpoint, head)

    def _lead(self, orch: Orchestrator, provider: PrivateNetwork, member: Member, endpoint: Endpoint, head: Head) -> None:
        try:
            address = provider.private_address(member.instance_id or "")
            self._progress(f"{member.name}: the job's instances on its network will serve through it (a Ray cluster); "
                           f"restarting its server as the cluster's head on {address}")
            remote = orch.remote(orch.state.get(member.name))  # type: ignore[arg-type]
            ensure_ray(remote, member.name, self._progress)
            answer = remote.cluster_head(address, None)
            head.address, head.ray_token = str(answer["address"]), str(answer["ray_token"])
            head.gpus = gpus_from_health(read_health(endpoint.url, timeout=60))
            head.endpoint = Endpoint(endpoint.name, endpoint.url, endpoint.token, head.gpus)
        except FAILURES as e:
            self._progress(f"{member.name}: no cluster ({_first_line(e)}); every instance serves its own URL")
            head.formed.set()
            self._serve_alone(orch, member, endpoint)
            return
        head.formed.set()
        self._dispatcher.add(head.endpoint)

    def _join(self, orch: Orchestrator, provider: PrivateNetwork, member: Member, endpoint: Endpoint, head: Head) -> None:
        while not head.formed.wait(1.0):
            if self._fleet.stopping.is_set():  # the job ended while the head formed: nothing to join
                self._dispatcher.add(endpoint)
                return
        if head.endpoint is None or self._fleet.stopping.is_set():
            self._dispatcher.add(endpoint)
            return
        try:
            provider.open_private_network([head.instance_id, member.instance_id or ""])
            address = provider.private_address(member.instance_id or "")
            remote = orch.remote(orch.state.get(member.name))  # type: ignore[arg-type]
            ensure_ray(remote, member.name, self._progress)
            remote.cluster_join(head.address, address, head.ray_token, None)
            gpus = self._wait_for_gpus(head, more_than=head.gpus)
        except FAILURES as e:
            if self._fleet.stopping.is_set():
                self._dispatcher.gone(member.name, "the job ended while it joined a cluster")
                return
            self._progress(f"{member.name}: could not join {head.name}'s cluster ({_first_line(e)}); it serves its own URL")
            self._serve_alone(orch, member, endpoint)
            return
        with self._lock:
            head.workers.append(member)
            head.gpus = max(head.gpus, gpus)
        self._progress(f"{member.name}: joined {head.name}'s cluster; {head.name} now serves {gpus} GPUs")
        self._dispatcher.joined(member.name, head.name)
        self._dispatcher.grow(head.name, gpus)

    def _wait_for_gpus(self, head: Head, more_than: int) -> int:
        assert head.endpoint is not None
        deadline = time.monotonic() + JOIN_WAIT_S
        while time.monotonic() < deadline:
            if self._fleet.stopping.is_set():
                raise TimeoutError("the job ended")
            try:
                health = read_health(head.endpoint.url, timeout=15)
                gpus = gpus_from_health(health)
                if gpus > more_than and health.get("status") == "ready":
                    return gpus
            except FAILURES:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{head.name}'s server did not show the joined GPUs within {JOIN_WAIT_S:.0f}s")

    def _serve_alone(self, orch: Orchestrator, member: Member, endpoint: Endpoint) -> None:
        """Its own server again (a cluster that did not form, or whose head was given up): the
        dispatcher counts it as starting until add() or gone()."""
        try:
            record = orch.state.get(member.name)
            remote = orch.remote(record)  # type: ignore[arg-type]
            remote.start_server(None, port=record.server_port if record else None)  # where its tunnel forwards
            remote.wait_server(600)
            gpus = gpus_from_health(read_health(endpoint.url, timeout=60))
        except FAILURES as e:
            self._dispatcher.gone(member.name, f"its server did not start again: {_first_line(e)}")
            self._fleet.stop(member.name, "its server did not start again")
            return
        self._dispatcher.add(Endpoint(endpoint.name, endpoint.url, endpoint.token, gpus))

    # -- the runner's callback: an instance was given up --------------------------------------

    def given_up(self, name: str) -> None:
        """A head given up: the instances that joined it serve their own URLs again."""
        with self._lock:
            heads = [h for h in self._heads.values() if h.name == name]
            workers = [w for h in heads for w in h.workers]
            for h in heads:
                h.workers = []
        for member in workers:
            self._progress(f"{member.name}: its cluster's head {name} is gone; it serves its own URL again")
            url, token = member.url, self._token(member.name)
            if not url or not token:
                self._dispatcher.gone(member.name, "its URL or token is not known")
                continue
            threading.Thread(target=self._serve_alone, args=(self._make(), member, Endpoint(member.name, url, token)),
                             name=f"alone-{member.name}", daemon=True).start()

    def _token(self, name: str) -> str | None:
        try:
            record = self._make().state.get(name)
        except OrchError:
            return None
        return record.token if record else None


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
