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

from ..config import Settings, check_provider
from ..errors import ConfigError, LifecycleError, OrchError
from ..providers import registry
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
    QuotaExceeded,
)
from ..providers.registry import AVAILABLE
from ..ssh import public_key_line
from ..state import InstanceRecord
from . import boot_recipe
from .bootstrap import agent_config
from .context import Ctx, this_process
from .options import UpOptions
from .states import LifecycleState
from .teardown import POLL_S, stop_instance


@dataclass(frozen=True)
class Attempt:
    provider: str
    gpu: str
    region: str
    error: str

    def as_json(self) -> dict[str, str]:
        return {"provider": self.provider, "gpu": self.gpu, "region": self.region, "error": self.error}


def provider_names(settings: Settings, requested: str | None) -> list[str]:
    """The providers an `up` (or `offers`) may use: one name, a comma list, or `auto` (every
    configured provider but the local machine)."""
    spec = (requested or settings.provider).strip()
    if spec == "auto":
        names = [n for n in AVAILABLE if registry.entry(n).rented and registry.configured(n, settings)]
        if not names:
            raise ConfigError("provider auto: no provider is configured (set a provider's credentials, or ssh.host in orch.yaml)")
        return names
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        check_provider(name)
    return names or [settings.provider]


def gather_offers(ctx: Ctx, names: list[str], gpu: str | None, region: str | None, max_price: float | None,
                  spot: bool = False) -> tuple[list[Offer], dict[str, str]]:
    """Every matching offer of these providers, cheapest first (USD, then each other currency
    apart: never converted); and why a provider gave none, where it failed."""
    offers: list[Offer] = []
    failures: dict[str, str] = {}
    for name in names:
        try:
            found = ctx.provider(name).offers(gpu=gpu, region=region, max_price=max_price)
        except OrchError as e:
            if len(names) == 1:
                raise
            failures[name] = str(e)
            continue
        offers += [o for o in found if o.interruptible == spot]
    offers.sort(key=lambda o: (o.currency != "USD", o.currency, o.price_per_hour is None, o.price_per_hour or 0.0,
                               o.available is False))
    return offers, failures


def choose_offers(ctx: Ctx, names: list[str], opts: UpOptions) -> list[Offer]:
    offers, failures = gather_offers(ctx, names, opts.gpu, opts.region, opts.max_price, opts.spot)
    offers = [o for o in offers if o.available is not False]
    if not offers:
        why = "".join(f"; {name}: {error}" for name, error in failures.items())
        kind = "spot " if opts.spot else ""
        raise LifecycleError(f"no {kind}offer on {', '.join(names)} matches gpu={opts.gpu} region={opts.region} "
                             f"max_price={opts.max_price}{why}; `orch offers` lists what there is")
    if opts.price_per_hour is not None:
        offers = [replace(o, price_per_hour=opts.price_per_hour) for o in offers]
    return offers


def create(ctx: Ctx, opts: UpOptions, offers: list[Offer]) -> tuple[InstanceRecord, list[Attempt]]:
    """Record the intent (with its run id), then create on the first offer that has capacity.

    Each attempt is time-boxed: an instance that does not reach RUNNING within
    opts.provision_timeout is terminated (confirmed) before the next offer is tried. A quota
    error is not retried in that provider's region.
    """
    now = time.time()
    run_id = secrets.token_hex(8)
    ctx.state.insert(InstanceRecord(name=opts.name, provider=offers[0].provider, state=LifecycleState.PROVISIONING.value,
                                    created_at=now, updated_at=now, token=secrets.token_urlsafe(32), run_id=run_id,
                                    owner=this_process(), deadlines=opts.deadlines, models=tuple(opts.models or ()),
                                    gpus=opts.gpus),
                     detail=f"up: create (run {run_id})")
    key = ctx.key()
    attempts: list[Attempt] = []
    over_quota: set[tuple[str, str]] = set()
    for offer in offers:
        if (offer.provider, offer.region) in over_quota:
            continue
        provider = ctx.provider(offer.provider)
        if ctx.record(opts.name).provider != provider.name:
            ctx.state.update(opts.name, provider=provider.name)  # reconcile looks for the run id there
        price = f"{offer.price_per_hour:.2f} {offer.currency}/h" if offer.price_per_hour is not None else "price known after create"
        ctx.progress(f"{opts.name}: creating on {provider.name} ({offer.gpu}, {offer.region}, {price})")
        config = agent_config(provider, opts.name, offer.price_per_hour or 0.0, opts.deadlines, now)
        native = opts.native_images.get((offer.provider, offer.region)) or opts.native_images.get((offer.provider, ""))
        if native:
            ctx.progress(f"{opts.name}: booting from {provider.name}'s own image {native} of {opts.from_image} (same provider and region)")
        spec = InstanceSpec(name=opts.name, offer=offer, ssh_public_key=public_key_line(key), image_id=native,
                            tags={ORCH_TAG: "1", NAME_TAG: opts.name, RUN_TAG: run_id},
                            startup_script=boot_recipe.script(provider, provider.runtime(opts.name), config),
                            deadline=now + opts.deadlines.max_lifetime)
        try:
            instance = provider.create(spec)
        except InsufficientCapacity as e:
            # Nothing was created: the next offer is safe to try.
            if isinstance(e, QuotaExceeded):
                over_quota.add((offer.provider, offer.region))
            ctx.progress(f"{opts.name}: {offer.provider} {offer.gpu} in {offer.region}: {e}; trying the next offer")
            attempts.append(Attempt(provider.name, offer.gpu, offer.region, str(e)))
            continue
        except BaseException as e:
            # The create may have happened even though it failed (a lost answer, a kill): find it by its tag.
            found = find_by_run(provider, run_id)
            if found is not None:
                ctx.state.update(opts.name, instance_id=found.instance_id)
            ctx.move(opts.name, LifecycleState.FAILED, f"create failed: {type(e).__name__}: {e}")
            if isinstance(e, Exception) and not isinstance(e, LifecycleError):
                raise LifecycleError(f"creating {opts.name} on {provider.name} failed: {e}") from e
            raise
        ctx.state.update(opts.name, instance_id=instance.instance_id)
        problem = wait_running(ctx, provider, instance, opts.provision_timeout)
        if problem:
            ctx.progress(f"{opts.name}: {provider.name} {offer.gpu} in {offer.region}: {problem}; terminating it, trying the next offer")
            stop_instance(ctx, provider, opts.name, instance.instance_id, terminate=True)
            ctx.state.update(opts.name, instance_id=None)
            attempts.append(Attempt(provider.name, offer.gpu, offer.region, problem))
            continue
        record = ctx.state.update(opts.name, price_per_hour=_price(instance, offer), currency=offer.currency,
                                  gpu=instance.gpu or offer.gpu, region=instance.region or offer.region)
        return record, attempts
    ctx.move(opts.name, LifecycleState.FAILED, "no capacity in any offer")
    summary = "; ".join(f"{a.provider} {a.gpu} in {a.region}: {a.error}" for a in attempts)
    raise NoCapacity(f"no offer had capacity ({summary}); try another --gpu, --region or --provider", attempts)


def wait_running(ctx: Ctx, provider: Provider, instance: Instance, timeout: float) -> str | None:
    """None once the provider reports the instance RUNNING; else what went wrong, in words."""
    deadline = time.monotonic() + timeout
    current = instance
    while current.status != InstanceStatus.RUNNING:
        if current.status in (InstanceStatus.ERROR, InstanceStatus.STOPPED) or current.status.is_gone:
            return f"the instance went {current.raw_status!r} instead of running"
        if time.monotonic() > deadline:
            return f"not running after {timeout:.0f}s (still {current.raw_status!r})"
        time.sleep(POLL_S)
        current = provider.get(instance.instance_id)
    return None


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
    if opts.gpus is not None:
        changes["gpus"] = opts.gpus
    ctx.move(record.name, LifecycleState.PROVISIONING, "up: start", **changes)
    if live.status != InstanceStatus.RUNNING:
        if not provider.capabilities.can_start:
            raise LifecycleError(f"{record.name}: {provider.capabilities.why_not('can_start')}; "
                                 f"`orch down {record.name} --terminate` removes it, then `orch up {record.name}` makes a new one")
        ctx.progress(f"{record.name}: starting instance {record.instance_id}")
        provider.start(record.instance_id or "")
    return ctx.record(record.name)
