"""Getting an instance: offers, create with failover, or start a stopped one again.

Every create carries orch's run id as a tag (`orch-run`), recorded before the provider is
called, so an instance whose `orch up` died mid-create is found again by reconcile.py.
A create is never retried blindly: capacity and quota errors (nothing was created) move on
to the next offer; any other error is reconciled by tag before it is reported.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace

from ..errors import LifecycleError
from ..providers.base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    Offer,
    Provider,
)
from ..ssh import public_key_line
from ..state import InstanceRecord
from . import boot_recipe
from .bootstrap import agent_config
from .context import Ctx, this_process
from .options import UpOptions
from .states import LifecycleState


@dataclass(frozen=True)
class Attempt:
    provider: str
    gpu: str
    region: str
    error: str

    def as_json(self) -> dict[str, str]:
        return {"provider": self.provider, "gpu": self.gpu, "region": self.region, "error": self.error}


def choose_offers(ctx: Ctx, provider: Provider, opts: UpOptions) -> list[Offer]:
    offers = provider.offers(gpu=opts.gpu, region=opts.region, max_price=opts.max_price)
    if not offers:
        raise LifecycleError(f"provider {provider.name} has no offer matching gpu={opts.gpu} region={opts.region} "
                             f"max_price={opts.max_price}; `orch offers --provider {provider.name}` lists what it has")
    if opts.price_per_hour is not None:
        offers = [replace(o, price_per_hour=opts.price_per_hour) for o in offers]
    return offers


def create(ctx: Ctx, provider: Provider, opts: UpOptions, offers: list[Offer]) -> tuple[InstanceRecord, list[Attempt]]:
    """Record the intent (with its run id), then create on the first offer that has capacity."""
    now = time.time()
    run_id = secrets.token_hex(8)
    ctx.state.insert(InstanceRecord(name=opts.name, provider=provider.name, state=LifecycleState.PROVISIONING.value,
                                    created_at=now, updated_at=now, token=secrets.token_urlsafe(32), run_id=run_id,
                                    owner=this_process(), deadlines=opts.deadlines, models=tuple(opts.models or ())),
                     detail=f"up: create (run {run_id})")
    key = ctx.key()
    attempts: list[Attempt] = []
    for offer in offers:
        price = f"{offer.price_per_hour:.2f} {offer.currency}/h" if offer.price_per_hour is not None else "price known after create"
        ctx.progress(f"{opts.name}: creating on {provider.name} ({offer.gpu}, {offer.region}, {price})")
        config = agent_config(provider, opts.name, offer.price_per_hour or 0.0, opts.deadlines, now)
        spec = InstanceSpec(name=opts.name, offer=offer, ssh_public_key=public_key_line(key),
                            tags={ORCH_TAG: "1", NAME_TAG: opts.name, RUN_TAG: run_id},
                            startup_script=boot_recipe.script(provider, provider.runtime(opts.name), config,
                                                              opts.deadlines.max_lifetime))
        try:
            instance = provider.create(spec)
        except InsufficientCapacity as e:
            # Nothing was created: the next offer is safe to try.
            ctx.progress(f"{opts.name}: {offer.gpu} in {offer.region}: {e}; trying the next offer")
            attempts.append(Attempt(provider.name, offer.gpu, offer.region, str(e)))
            continue
        except BaseException as e:
            # The create may have happened even though it failed (a lost answer, a kill): find it by its tag.
            found = find_by_run(provider, run_id)
            detail = f"create failed: {type(e).__name__}: {e}"
            if found is not None:
                ctx.state.update(opts.name, instance_id=found.instance_id)
            ctx.move(opts.name, LifecycleState.FAILED, detail)
            if isinstance(e, Exception) and not isinstance(e, LifecycleError):
                raise LifecycleError(f"creating {opts.name} on {provider.name} failed: {e}") from e
            raise
        record = ctx.state.update(opts.name, instance_id=instance.instance_id, price_per_hour=_price(instance, offer),
                                  currency=offer.currency, gpu=instance.gpu or offer.gpu, region=instance.region or offer.region)
        return record, attempts
    ctx.move(opts.name, LifecycleState.FAILED, "no capacity in any offer")
    summary = "; ".join(f"{a.gpu} in {a.region}: {a.error}" for a in attempts)
    raise NoCapacity(f"no offer on {provider.name} had capacity ({summary}); try another --gpu or --region", attempts)


class NoCapacity(LifecycleError):
    def __init__(self, message: str, attempts: list[Attempt]):
        super().__init__(message)
        self.attempts = attempts


def _price(instance: Instance, offer: Offer) -> float:
    # A price the user set (local, ssh) or the offer's; the instance's where only it knows (priced after create).
    if offer.price_per_hour is not None:
        return offer.price_per_hour
    return instance.price_per_hour


def find_by_run(provider: Provider, run_id: str) -> Instance | None:
    try:
        instances = provider.list()
    except Exception:
        return None
    return next((i for i in instances if i.run_id == run_id and i.status != InstanceStatus.TERMINATED), None)


def restart(ctx: Ctx, record: InstanceRecord, live: Instance, opts: UpOptions) -> InstanceRecord:
    """Start a stopped (or failed) instance again with its disk, under this `up`'s deadlines."""
    provider = ctx.provider(record.provider)
    if record.state not in (LifecycleState.STOPPED, LifecycleState.FAILED):
        to = LifecycleState.STOPPED if live.status == InstanceStatus.STOPPED else LifecycleState.FAILED
        ctx.move(record.name, to, f"found {live.status.value}")
    changes: dict[str, object] = {"deadlines": opts.deadlines, "owner": this_process()}
    if opts.models is not None:
        changes["models"] = tuple(opts.models)
    if opts.price_per_hour is not None:
        changes["price_per_hour"] = opts.price_per_hour
    ctx.move(record.name, LifecycleState.PROVISIONING, "up: start", **changes)
    if live.status != InstanceStatus.RUNNING:
        if not provider.capabilities.can_start:
            raise LifecycleError(f"{record.name}: {provider.capabilities.why_not('can_start')}; "
                                 f"`orch down {record.name} --terminate` removes it, then `orch up {record.name}` makes a new one")
        ctx.progress(f"{record.name}: starting instance {record.instance_id}")
        provider.start(record.instance_id or "")
    return ctx.record(record.name)
