"""What `orch up` was asked for, checked in full before anything is created."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .. import inputs
from ..config import Deadlines, Settings
from ..errors import ConfigError
from ..providers.base import Provider
from . import model_sync


@dataclass(frozen=True)
class UpOptions:
    name: str = "default"
    provider: str | None = None
    gpu: str | None = None
    region: str | None = None
    max_price: float | None = None
    models: tuple[str, ...] | None = None  # None: not given (orch.yaml's `models` apply to a new instance)
    deadlines: Deadlines = field(default_factory=Deadlines)
    # The deadline flags the user gave: applied to an instance that already runs (as `orch extend`).
    deadline_changes: dict[str, float] = field(default_factory=dict)
    price_per_hour: float | None = None
    detach: bool = False
    tunnel_port: int | None = None
    from_image: str | None = None
    spot: bool = False  # interruptible (spot) offers only; on-demand otherwise
    server_timeout: float = 900.0
    # An attempt whose instance is not RUNNING in this long is terminated and the next offer tried.
    provision_timeout: float = 600.0
    # From --from-image: the provider's own images of it, by (provider, region): an offer there boots from one.
    native_images: dict[tuple[str, str], str] = field(default_factory=dict)
    gpus: int | None = None  # the server's replicas, one per GPU; None: all the instance has

    @property
    def create_only(self) -> dict[str, object]:
        """Options that choose a new instance's hardware: meaningless for one that exists."""
        given = {"--gpu": self.gpu, "--region": self.region, "--max-price": self.max_price, "--spot": self.spot or None}
        return {flag: value for flag, value in given.items() if value is not None}


def check(opts: UpOptions, settings: Settings, providers: list[Provider]) -> UpOptions:
    """Every input of `up`, before anything is created; a ConfigError names what to fix."""
    inputs.instance_name(opts.name)
    if opts.gpus is not None:
        inputs.gpu_count(opts.gpus, what="--gpus")
    if opts.tunnel_port is not None:
        inputs.port(opts.tunnel_port, what="--port")
    if opts.max_price is not None:
        inputs.max_price(opts.max_price, what="--max-price")
    if opts.price_per_hour is not None:
        inputs.price_per_hour(opts.price_per_hour, what="--price-per-hour")
        for provider in providers:
            if not provider.capabilities.user_sets_price:
                raise ConfigError(f"--price-per-hour: provider {provider.name} prices its instances itself; "
                                  f"the flag is for local and ssh instances (what the machine costs you)")
    if opts.from_image is not None:
        from ..images.store import ImageStore, images_url

        inputs.instance_name(opts.from_image, what="--from-image")
        meta = ImageStore(images_url(settings, "--from-image")).check_usable(opts.from_image)
        opts = replace(opts, native_images={(n["provider"], n["region"]): n["image_id"] for n in meta.native})
    if opts.deadlines.budget is not None:
        inputs.budget(opts.deadlines.budget, what="--budget")
        for provider in providers:
            if provider.capabilities.currency != "USD":
                raise ConfigError(f"--budget: budgets are in USD and {provider.name} prices in {provider.capabilities.currency}; "
                                  f"orch does not convert between them: leave the budget out there (the other deadlines apply)")
    models = opts.models if opts.models is not None else settings.models
    model_sync.resolve(models, settings.storage)
    return opts


def with_settings_defaults(opts: UpOptions, settings: Settings) -> UpOptions:
    """The orch.yaml values where the flags said nothing (for a new instance)."""
    return replace(
        opts,
        gpu=opts.gpu or settings.gpu,
        region=opts.region or settings.region,
        max_price=opts.max_price if opts.max_price is not None else settings.max_price,
        models=opts.models if opts.models is not None else settings.models,
    )
