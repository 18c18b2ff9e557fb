"""up / down / status / extend / gc / gen: a thin facade over the phase modules.

Each public method reads top to bottom as numbered phases; the phases live in their own
modules (provision, remote, bootstrap, model_sync, serve, tunnels, teardown, reconcile,
generate) and take a Ctx. Nothing here branches on a provider's name: what differs
between providers is in their Capabilities, capability protocols and RemoteRuntime.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .. import inputs
from ..config import Settings, orch_home
from ..errors import ConfigError, LifecycleError, NotRunning, OrchError, StateError
from ..providers import registry
from ..providers.base import InstanceStatus, Offer, Provider
from ..providers.capabilities import BootBackstop
from ..providers.registry import AVAILABLE
from ..ssh import SshSession
from ..state import InstanceRecord, State
from . import attach, bootstrap, model_sync, options, provision, reconcile, serve, status, teardown, tunnels
from .context import Ctx, PhaseTimer, Progress, no_progress
from .generate import generate, save_images
from .options import UpOptions
from .remote import Remote, connect, heartbeat_interval, open_session
from .results import DownResult, ExtendResult, GcResult, StatusRow, UpResult
from .states import BILLING_STATES, LifecycleState

S = LifecycleState

__all__ = ["Orchestrator", "UpOptions", "UpResult", "save_images", "run_tunnel_daemon"]


class Orchestrator:
    """Every lifecycle operation, over one State and the configured providers."""

    def __init__(self, settings: Settings, state: State | None = None, home: Path | None = None,
                 provider_factory: Callable[[str], Provider] | None = None, progress: Progress = no_progress):
        self.settings = settings
        self.home = home or orch_home()
        self.state = state or State(self.home / "state.db")
        self.ctx = Ctx(settings, self.home, self.state, progress, provider_factory)

    def _with(self, progress: Progress | None) -> Ctx:
        if progress is not None:
            self.ctx.progress = progress
        return self.ctx

    def provider(self, name: str) -> Provider:
        return self.ctx.provider(name)

    # -- up ------------------------------------------------------------------------------

    def up(self, opts: UpOptions, progress: Progress | None = None) -> UpResult:
        ctx = self._with(progress)
        timer = PhaseTimer()
        # 1. what exists under this name, in line with what its provider says
        record = self._existing(opts.name)
        if record and opts.provider and opts.provider != record.provider:
            raise ConfigError(f"instance {opts.name} exists on provider {record.provider}; pick another name or "
                              f"`orch down {opts.name} --terminate` first")
        names = [record.provider] if record else provision.provider_names(self.settings, opts.provider)
        providers = [ctx.provider(n) for n in names]
        # 2. every input checked before anything is created
        opts = options.check(opts, self.settings, providers)
        found = reconcile.live(ctx, record) if record else None
        if found is not None and found.status.is_gone:
            found = None
        if record and found is None:
            ctx.progress(f"{opts.name}: the provider no longer has instance {record.instance_id}; creating a new one")
            self.state.delete(opts.name)
            record = None
        if record and found and found.status == InstanceStatus.RUNNING and record.state == S.RUNNING:
            return self._attach(ctx, record, opts, timer)
        if record and opts.create_only:
            raise ConfigError(f"instance {opts.name} exists: {', '.join(opts.create_only)} apply only when an instance is "
                              f"created; `orch down {opts.name} --terminate` first, or pick another name")
        for provider in providers:
            if not provider.capabilities.self_stop:
                ctx.progress(f"warning: on {provider.name}, {provider.capabilities.why_not('self_stop')}: if this laptop goes "
                             f"away, nothing stops {opts.name} by itself; only `orch down {opts.name}` (or `orch gc`) ends its billing")
        # 3. a new instance (failing over between offers), or the stopped one started again
        attempts: list[provision.Attempt] = []
        try:
            with timer.phase("create"):
                if record and found:
                    if opts.from_image:
                        raise ConfigError(f"instance {opts.name} exists: --from-image applies to a new instance; "
                                          f"`orch down {opts.name} --terminate` first, or pick another name")
                    record = provision.restart(ctx, record, found, opts)
                    strategy = bootstrap.choose(record)
                else:
                    opts = options.with_settings_defaults(opts, self.settings)
                    record, attempts = provision.create(ctx, opts, provision.choose_offers(ctx, names, opts))
                    if opts.from_image:
                        record = self.state.update(record.name, image=opts.from_image)
                    strategy = bootstrap.choose(record, opts.from_image)
            # 4.-7. SSH, bootstrap, models, server
            record = self._bring_up(ctx, record, opts, timer, strategy)
        except BaseException as e:
            created = self._fail_and_stop(ctx, opts.name, e)
            if created and isinstance(e, OrchError) and not isinstance(e, ConfigError):
                raise LifecycleError(f"{opts.name}: up failed and the instance was stopped so nothing bills: {e}\n"
                                     f"`orch up {opts.name}` tries again; `orch down {opts.name} --terminate` removes it.") from e
            raise
        # 8. the tunnel
        with timer.phase("tunnel"):
            result = self._open_tunnel(ctx, record, opts)
        result.phases, result.attempts = timer.seconds, attempts
        return result

    def _existing(self, name: str) -> InstanceRecord | None:
        record = self.state.get(name)
        if record and record.state == S.TERMINATED:
            self.state.delete(name)
            return None
        return reconcile.reconcile(self.ctx, record) if record else None

    def _bring_up(self, ctx: Ctx, record: InstanceRecord, opts: UpOptions, timer: PhaseTimer,
                  strategy: bootstrap.BootstrapStrategy) -> InstanceRecord:
        name = record.name
        # 4. SSH, the host key pinned on first contact
        with timer.phase("ssh"):
            ctx.move(name, S.WAITING_SSH)
            ctx.progress(f"{name}: waiting for SSH")
            remote = connect(ctx, record)
        # Heartbeats from here on: the agent counts them from its arming (by the boot recipe or below).
        with remote, remote.heartbeats(f"up-{os.getpid()}", heartbeat_interval(record)):
            # 5. bootstrap (the agent is armed first)
            with timer.phase("bootstrap"):
                record = ctx.move(name, S.BOOTSTRAPPING)
                strategy.prepare(ctx, remote, record)
            # 6. models, pulled by the instance itself
            with timer.phase("sync"):
                model_sync.sync_models(ctx, remote, ctx.record(name))
            # 7. the server, its model loaded
            with timer.phase("server"):
                ctx.move(name, S.STARTING_SERVER)
                info = serve.start_server(ctx, remote, record, opts.server_timeout)
                remote.boot_done()
        return ctx.move(name, S.RUNNING, f"server on port {info['port']}", server_port=info["port"], started_at=time.time(),
                        stop_reason=None, owner=None)

    def _fail_and_stop(self, ctx: Ctx, name: str, error: BaseException) -> bool:
        """Stop what a failed `up` created; True when there was an instance."""
        try:
            record = self.state.get(name)
        except StateError:
            record = None
        if record is None or not record.instance_id:
            return False
        ctx.progress(f"{name}: failed ({type(error).__name__}: {error}); stopping the instance")
        final = None
        try:
            final = teardown.stop_instance(ctx, ctx.provider(record.provider), name, record.instance_id, terminate=False)
        except Exception as stop_error:  # report both; the reconciler finds it again
            ctx.progress(f"{name}: could not stop the instance after the failure: {stop_error}")
        try:
            ctx.state.transition(name, S.FAILED.value, f"{type(error).__name__}: {error}", owner=None)
            if final is not None:
                ctx.state.transition(name, final.value, "stopped after the failure; confirmed by the provider",
                                     stop_reason=f"up failed: {str(error).splitlines()[0][:200] if str(error) else type(error).__name__}")
        except StateError as state_error:
            ctx.progress(f"{name}: {state_error}")
        return True

    def _attach(self, ctx: Ctx, record: InstanceRecord, opts: UpOptions, timer: PhaseTimer) -> UpResult:
        """`orch up NAME` on a running NAME: repair what died, apply new deadlines, open a tunnel if none is open."""
        with timer.phase("check"):
            record, notes = attach.check_and_repair(ctx, record, opts)
        if tunnels.tunnel_alive(record):
            return UpResult(record, attached=True, phases=timer.seconds, notes=notes)
        with timer.phase("tunnel"):
            result = self._open_tunnel(ctx, record, opts)
        result.attached, result.phases, result.notes = True, timer.seconds, notes
        return result

    def _open_tunnel(self, ctx: Ctx, record: InstanceRecord, opts: UpOptions) -> UpResult:
        preferred = opts.tunnel_port or self.settings.tunnel_port
        if opts.detach:
            port, pid = tunnels.spawn_tunnel_process(self.home, record.name, preferred)
            record = self.state.update(record.name, local_port=port, tunnel_pid=pid)
            return UpResult(record, attached=False, phases={})
        tunnel = tunnels.make_tunnel(ctx, record, preferred, f"up-{socket.gethostname()}-{os.getpid()}").start()
        if tunnel.port != preferred:
            ctx.progress(f"port {preferred} is taken; using {tunnel.port}")
        record = self.state.update(record.name, local_port=tunnel.port, tunnel_pid=os.getpid())
        return UpResult(record, attached=False, phases={}, tunnel=tunnel)

    def release_foreground_tunnel(self, name: str) -> None:
        record = self.state.get(name)
        if record and record.tunnel_pid == os.getpid():
            self.state.update(name, tunnel_pid=None, local_port=None)

    # -- down ----------------------------------------------------------------------------

    def down(self, name: str | None, terminate: bool = False, progress: Progress | None = None,
             save_image: str | None = None) -> DownResult:
        """Stop (or terminate) and wait for the provider to confirm. Stopping comes first:
        a state database that cannot be written is reported after, never before. With
        save_image, the environment is saved first (nothing stops if that fails), and the
        provider's own image of the stopped instance after, where it has one."""
        ctx = self._with(progress)
        if save_image:
            from ..images import save as images
            from ..images.store import images_url

            images_url(self.settings, "--save-image")  # a missing bucket is named before an instance is looked up
            images.save(ctx, self.resolve(name, want_running=True), save_image)
            result = self.down(name, terminate=False, progress=progress)
            try:
                images.save_native(ctx, self.resolve(result.name, want_running=False), save_image)
            except OrchError as e:
                ctx.progress(f"{result.name}: the provider's own image was not saved ({e}); the portable image {save_image} is complete")
            return self.down(result.name, terminate=True) if terminate else result
        unrecorded: list[str] = []

        def record_it(fn: Callable[[], Any]) -> None:
            try:
                fn()
            except StateError as e:
                unrecorded.append(str(e))

        # 1. the instance, and its tunnel (a process: ending it writes nothing)
        record = self.resolve(name, want_running=False)
        tunnels.kill_tunnel(record)
        record_it(lambda: self.state.update(record.name, tunnel_pid=None, local_port=None))
        provider = ctx.provider(record.provider)
        final = S(record.state)
        if record.state != S.TERMINATED and (terminate or record.state != S.STOPPED or self._still_billing(record)):
            if not record.instance_id:
                final = S.TERMINATED
            else:
                # 2. the server, then the instance, confirmed by the provider
                record_it(lambda: ctx.state.transition(record.name, S.STOPPING.value, "down --terminate" if terminate else "down"))
                teardown.stop_server(ctx, record)
                final = teardown.stop_instance(ctx, provider, record.name, record.instance_id, terminate)
            # 3. recorded (after: nothing above depends on it)
            record_it(lambda: ctx.state.transition(record.name, final.value, "confirmed by the provider", owner=None))
        if unrecorded:
            raise StateError(f"{record.name} is {final.value.lower()} (confirmed by the provider: its compute no longer "
                             f"bills), but orch could not record that: {unrecorded[0]}")
        current = self.state.get(record.name) or record
        return DownResult(current.name, current.state, current.instance_id, current.provider,
                          reconcile.cost(ctx, current), current.currency)

    def _still_billing(self, record: InstanceRecord) -> bool:
        found = reconcile.live(self.ctx, record)
        return found is not None and found.status not in (InstanceStatus.STOPPED, InstanceStatus.TERMINATED)

    # -- status, extend, gc --------------------------------------------------------------

    def status(self, name: str | None = None, with_deadlines: bool = True, progress: Progress | None = None) -> list[StatusRow]:
        ctx = self._with(progress)
        records = [self.resolve(name, want_running=False)] if name else self.state.all()
        now = time.time()
        return [status.row(ctx, record, now, with_deadlines) for record in records]

    def extend(self, name: str | None, changes: dict[str, float], progress: Progress | None = None) -> ExtendResult:
        """Change deadlines of a running instance (its agent picks them up within a tick)."""
        ctx = self._with(progress)
        record = reconcile.reconcile(ctx, self.resolve(name, want_running=True))
        if record.state != S.RUNNING:
            raise NotRunning(f"instance {record.name} is {record.state.lower()}; `orch up {record.name} --idle ...` sets deadlines at start")
        with connect(ctx, record, timeout=30) as remote:
            rearmed = not remote.agent_status().get("armed")
            if rearmed:
                serve.ensure_agent(ctx, remote, record)
            result = remote.agent_set(changes)
            provider = ctx.provider(record.provider)
            if "max_lifetime" in changes and isinstance(provider, BootBackstop):
                # The provider's own backstop would still fire at the old deadline.
                remote.run(provider.backstop_command(record.created_at + changes["max_lifetime"]), timeout=60)
        deadlines = replace(record.deadlines, **changes)
        self.state.update(record.name, deadlines=deadlines)
        return ExtendResult(record.name, deadlines.as_json(), result.get("left", {}), rearmed)

    def strays(self) -> list[reconcile.Stray]:
        return reconcile.strays(self.ctx)

    def gc(self, strays: list[reconcile.Stray], terminate: bool = False, progress: Progress | None = None) -> GcResult:
        """Stop what bills unseen; with terminate, also remove the disks of stopped strays."""
        ctx = self._with(progress)
        done = []
        for s in strays:
            if not s.billing and not terminate:
                continue
            ctx.progress(f"{'terminating' if terminate else 'stopping'} {s.provider}:{s.instance_id} ({s.reason})")
            record = self.state.get(s.name)
            if record and record.instance_id == s.instance_id:
                done.append({**s.as_json(), "status": self.down(record.name, terminate=terminate).status})
                continue
            provider = ctx.provider(s.provider)
            final = teardown.stop_instance(ctx, provider, s.name, s.instance_id, terminate=terminate)
            done.append({**s.as_json(), "status": final.value})
        return GcResult(strays, done)

    # -- gen, offers ---------------------------------------------------------------------

    def gen(self, name: str | None, payload: dict[str, Any], out_dir: Path, progress: Progress | None = None,
            timeout: float = 3600) -> dict[str, Any]:
        ctx = self._with(progress)
        record = reconcile.reconcile(ctx, self.resolve(name, want_running=True))
        if record.state != S.RUNNING:
            reason = f" ({record.stop_reason})" if record.stop_reason else ""
            raise NotRunning(f"instance {record.name} is {record.state.lower()}{reason}; start it with `orch up {record.name}`")
        return generate(ctx, record, payload, out_dir, timeout)

    def offers(self, provider: str | None, gpu: str | None = None, region: str | None = None,
               max_price: float | None = None, spot: bool = False) -> tuple[list[Offer], dict[str, str]]:
        """Offers of one provider, a comma list, or (None) every configured provider; cheapest first."""
        if max_price is not None:
            inputs.max_price(max_price)
        names = provision.provider_names(self.settings, provider) if provider else \
            [n for n in AVAILABLE if registry.configured(n, self.settings)]
        return provision.gather_offers(self.ctx, names, gpu, region, max_price, spot)

    # -- lookups -------------------------------------------------------------------------

    def resolve(self, name: str | None, want_running: bool) -> InstanceRecord:
        if name:
            record = self.state.get(name)
            if record is None:
                known = ", ".join(r.name for r in self.state.all()) or "none"
                raise LifecycleError(f"no instance named {name!r} (known: {known}); `orch up {name}` creates it")
            return record
        records = [r for r in self.state.all() if r.state != S.TERMINATED]
        running = [r for r in records if r.state == S.RUNNING]
        pool = running if want_running or len(running) == 1 else records
        if len(pool) == 1:
            return pool[0]
        if not pool:
            raise LifecycleError("no instance; `orch up` creates one")
        raise LifecycleError(f"several instances ({', '.join(r.name for r in pool)}); name one")

    def connect(self, record: InstanceRecord, timeout: float = 300.0) -> SshSession:
        return open_session(self.ctx, record, timeout)

    def remote(self, record: InstanceRecord, timeout: float = 300.0) -> Remote:
        return connect(self.ctx, record, timeout)

    def forget_host_key(self, name: str) -> None:
        self.resolve(name, want_running=False)
        self.state.update(name, host_key=None)

    def cost(self, record: InstanceRecord, now: float | None = None) -> float:
        return reconcile.cost(self.ctx, record, now)

    def billing(self, record: InstanceRecord) -> bool:
        return record.state in BILLING_STATES


def run_tunnel_daemon(orch: Orchestrator, name: str, preferred_port: int | None) -> None:
    tunnels.run_tunnel_daemon(orch.ctx, name, preferred_port)
