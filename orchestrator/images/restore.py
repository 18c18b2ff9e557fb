"""`orch up --from-image IMG`: a bootstrap strategy that brings a saved environment back.

In order: what a fresh install does first (the boot recipe awaited, orch's code, the agent
armed), then the environment from its archive (no package installed) where the Python and
machine match, else the install from the lock; the models by hash (0 bytes where the instance
or the bucket's cache already has them); the compiled graphs and bytecode where the GPU and
torch match (the first image then needs no compile); the user paths. Everything is pulled by
the instance itself, straight from the bucket.
"""

from __future__ import annotations

import json
from dataclasses import replace

from ..lifecycle.bootstrap import arm, ensure_multi_gpu, install_server_env, upload_code, wait_for_boot_recipe
from ..lifecycle.context import Ctx
from ..lifecycle.remote import Remote
from ..providers.base import RemoteRuntime
from ..state import InstanceRecord
from .manifest import ImageMeta
from .save import run_json, store_credentials
from .store import ImageStore, images_url


class PortableRestore:
    name = "portable-restore"

    def __init__(self, image: str, store: ImageStore | None = None):
        self.image = image
        self._store = store

    def store(self, ctx: Ctx) -> ImageStore:
        if self._store is None:
            self._store = ImageStore(images_url(ctx.settings))
        return self._store

    def prepare(self, ctx: Ctx, remote: Remote, record: InstanceRecord) -> RemoteRuntime:
        store = self.store(ctx)
        meta = store.check_usable(self.image)
        # 1. as a fresh install: boot recipe, code, the agent armed before anything slow
        wait_for_boot_recipe(ctx, remote, record)
        upload_code(ctx, remote)
        arm(ctx, remote, record)
        creds = store_credentials(ctx, store.url)
        home = remote.runtime.home
        pull = lambda part, dst: self._pull(ctx, remote, store.part_url(self.image, part), dst, creds)  # noqa: E731
        # 2. the environment: unpacked where it can run, else installed
        here = self._probe(remote, light=True)
        if "env" in meta.parts and self._same_interpreter(meta, here):
            pull("env", f"{home}/image-staging/env")
            result = run_json(remote, remote.python_cmd("remote.image", "--home", home, "unpack-env",
                                                       f"{home}/image-staging/env/venv.tar"), "unpacking the environment")
            remote.run(f"rm -rf {home}/image-staging", check=False)
            if result.get("restored"):
                remote.runtime = replace(remote.runtime, python=result["python"])
                ctx.state.update(record.name, remote_python=result["python"])
                ctx.progress(f"{record.name}: environment restored from image {self.image} (no package installed)")
            else:
                ctx.progress(f"{record.name}: the image's environment cannot run here ({result.get('reason')}); installing")
        elif "env" in meta.parts:
            ctx.progress(f"{record.name}: the image's environment is for Python {meta.platform.get('python')} on "
                         f"{meta.platform.get('machine')}; this instance has {here.get('python')} on {here.get('machine')}: installing")
        deps = remote.check_deps()
        if deps["missing"]:
            ctx.progress(f"{record.name}: installing orch[server] on the instance (missing: {', '.join(deps['missing'])})")
            install_server_env(ctx, remote, record)
        ensure_multi_gpu(ctx, remote, record, deps)
        # 3. models, by hash
        if "models" in meta.parts:
            pull("models", f"{home}/models")
        # 4. compiled graphs and bytecode, where they are valid
        here = self._probe(remote) if "compiled" in meta.parts or "pycache" in meta.parts else {}
        key = meta.platform.get("platform_key")
        if "compiled" in meta.parts and key == here.get("platform_key"):
            pull(f"compiled/{key}", f"{home}/compile-cache")
        elif "compiled" in meta.parts:
            ctx.progress(f"{record.name}: the image's compiled graphs are for {key}; this instance is {here.get('platform_key')}: "
                         f"they compile again at the first image")
        if "pycache" in meta.parts and key == here.get("platform_key"):
            pull(f"pycache/{key}", f"{home}/pycache")
        # 5. user paths, where they were
        for i, path in enumerate(meta.parts.get("user", {}).get("paths", [])):
            if store.store.read_manifest(store.prefix(self.image, f"user/{i}")) is not None:
                pull(f"user/{i}", path)
        # 6. the server's token
        remote.put_bytes((record.token or "").encode(), f"{home}/token")
        return remote.runtime

    def _probe(self, remote: Remote, light: bool = False) -> dict:
        args = ("probe", "--light") if light else ("probe",)
        return run_json(remote, remote.python_cmd("remote.image", "--home", remote.runtime.home, *args), "probing the instance",
                        timeout=300)

    @staticmethod
    def _same_interpreter(meta: ImageMeta, here: dict) -> bool:
        minor = lambda v: ".".join(str(v or "").split(".")[:2])  # noqa: E731
        return minor(meta.platform.get("python")) == minor(here.get("python")) and meta.platform.get("machine") == here.get("machine")

    @staticmethod
    def _pull(ctx: Ctx, remote: Remote, url: str, dst: str, creds: dict[str, str]) -> None:
        home = remote.runtime.home
        command = remote.python_cmd("orchestrator.storage", "pull", url, dst, "--cache", f"{home}/transfers.db", "--creds-stdin")
        done = run_json(remote, command, f"pulling {url}", stdin=json.dumps(creds).encode())
        ctx.progress(f"{remote.name}: {url}: {done['bytes_transferred']:,} bytes pulled, {done['bytes_skipped']:,} already there")
