"""`orch image save IMG NAME`: the instance packs its environment and pushes every part of it
straight to the bucket (never through the laptop); the laptop writes the image's manifest last,
so an interrupted save leaves no image that looks complete."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .. import inputs
from ..errors import ConfigError, LifecycleError
from ..lifecycle.context import Ctx
from ..lifecycle.remote import Remote, connect
from ..lifecycle.states import LifecycleState
from ..ssh import sh_path
from ..state import InstanceRecord
from ..storage.sync import resolved_credentials
from .manifest import ImageMeta
from .store import ImageStore, images_url


def orch_version() -> str:
    try:
        return version("orch")
    except PackageNotFoundError:
        return "unknown"


def store_credentials(ctx: Ctx, url: str) -> dict[str, str]:
    """The laptop's S3 credentials for the instance (over SSH stdin, never logged); none for a directory store."""
    if not url.startswith("s3://"):
        return {}
    storage = ctx.settings.storage
    return resolved_credentials(storage.endpoint or None, storage.profile or None)


def run_json(remote: Remote, command: str, what: str, stdin: bytes | None = None, timeout: float = 6 * 3600) -> dict[str, Any]:
    result = remote.run(command, stdin=stdin, timeout=timeout, check=False)
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise LifecycleError(f"{remote.name}: {what} failed: {(result.stderr or result.stdout).strip()[-1500:]}") from None
    if result.exit_code != 0 or "error" in data:
        raise LifecycleError(f"{remote.name}: {what} failed: {data.get('error', result.stderr.strip()[-1500:])}")
    return data


def exists(remote: Remote, path: str) -> bool:
    return remote.run(f"test -e {sh_path(path)} && echo yes || true", timeout=30).stdout.strip() == "yes"


# The gallery's index and thumbnails (remote/server/gallery.py) are rebuilt from the images
# themselves on the restored instance; saving a live sqlite file would copy it mid-write.
GALLERY_DERIVED = (".index.db*", ".thumbs")


def push_dir(ctx: Ctx, remote: Remote, src: str, url: str, creds: dict[str, str],
             exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    home = remote.runtime.home
    excludes = [arg for pattern in exclude for arg in ("--exclude", pattern)]
    command = remote.python_cmd("orchestrator.storage", "push", src, url, "--cache", f"{home}/transfers.db", "--creds-stdin",
                                *excludes)
    return run_json(remote, command, f"pushing {src} to {url}", stdin=json.dumps(creds).encode())


def save(ctx: Ctx, record: InstanceRecord, name: str, store: ImageStore | None = None) -> ImageMeta:
    inputs.instance_name(name, what="image name")
    if record.state != LifecycleState.RUNNING:
        raise LifecycleError(f"instance {record.name} is {record.state.lower()}: an image is saved from a running instance; "
                             f"`orch up {record.name}` first (or next time `orch down {record.name} --save-image {name}`)")
    store = store or ImageStore(images_url(ctx.settings))
    if store.read(name) is not None:
        raise ConfigError(f"image {name} already exists at {store.url}; `orch image rm {name}` first, or pick another name")
    creds = store_credentials(ctx, store.url)
    meta = ImageMeta(name=name, orch_version=orch_version(),
                     source={"provider": record.provider, "instance_id": record.instance_id, "region": record.region,
                             "gpu": record.gpu, "name": record.name})
    with connect(ctx, record, timeout=60) as remote:
        home = remote.runtime.home
        image_cmd = lambda *args: remote.python_cmd("remote.image", "--home", home, *args)  # noqa: E731
        # 1. what this machine is (compiled graphs are valid only for the same GPU and torch)
        meta.platform = run_json(remote, image_cmd("probe"), "probing the instance", timeout=300)
        staging = f"{home}/image-staging"
        try:
            # 2. the environment, packed by the instance
            packed = run_json(remote, image_cmd("pack-env", f"{staging}/env"), "packing the environment")
            parts: list[tuple[str, str]] = [("env", f"{staging}/env")] if packed.get("packed") else []
            if not packed.get("packed"):
                ctx.progress(f"{record.name}: {packed.get('reason')}")
            # 3. models (already in the bucket by hash: nothing new moves), compiled graphs, user paths
            parts.append(("models", f"{home}/models"))
            key = meta.platform["platform_key"]
            parts += [(f"compiled/{key}", f"{home}/compile-cache"), (f"pycache/{key}", f"{home}/pycache")]
            user_paths = [f"{home}/outputs", *ctx.settings.images.paths]
            parts += [(f"user/{i}", path) for i, path in enumerate(user_paths)]
            for part, src in parts:
                if not exists(remote, src):
                    continue
                ctx.progress(f"{record.name}: pushing {part} ({src}) from the instance to {store.part_url(name, part)}")
                exclude = GALLERY_DERIVED if src == f"{home}/outputs" else ()
                done = push_dir(ctx, remote, src, store.part_url(name, part), creds, exclude)
                meta.parts.setdefault(part.split("/")[0], {"files": 0, "bytes": 0, "transferred": 0})
                total = meta.parts[part.split("/")[0]]
                total["files"] += done["files"]
                total["bytes"] += done["bytes_transferred"] + done["bytes_skipped"]
                total["transferred"] += done["bytes_transferred"]
                ctx.progress(f"{record.name}: {part}: {done['files']} file(s), {done['bytes_transferred']:,} bytes sent, "
                             f"{done['bytes_skipped']:,} already in the bucket")
            meta.parts.setdefault("user", {"files": 0, "bytes": 0, "transferred": 0})["paths"] = user_paths
        finally:
            remote.run(f"rm -rf {sh_path(staging)}", timeout=300, check=False)
    # 4. the manifest last: only a complete image is ever listed
    store.write(meta)
    return meta


def save_native(ctx: Ctx, record: InstanceRecord, name: str, store: ImageStore | None = None) -> dict[str, Any] | None:
    """Where the provider has its own images (AMI, AutoDL image, Vast snapshot), save one too, of the
    stopped instance, and record it in the image: restoring on the same provider and region uses it."""
    from ..providers.capabilities import NativeImages

    provider = ctx.provider(record.provider)
    if not isinstance(provider, NativeImages) or not record.instance_id:
        return None
    store = store or ImageStore(images_url(ctx.settings))
    meta = store.get(name)
    ctx.progress(f"{record.name}: saving {provider.name}'s own image of the instance too")
    native = provider.save_image(record.instance_id, name)
    # "" = usable in any region (a Vast snapshot is a docker image in the user's registry)
    entry = {"provider": provider.name, "region": native.region, "image_id": native.image_id}
    meta.native.append(entry)
    store.write(meta)
    return entry


def remove(ctx: Ctx, name: str, store: ImageStore | None = None) -> dict[str, Any]:
    """The image: the providers' own images of it first (an AMI's snapshots bill), then the bucket's part."""
    from ..errors import OrchError
    from ..providers.capabilities import NativeImages

    store = store or ImageStore(images_url(ctx.settings))
    meta = store.get(name)
    removed, kept = [], []
    for native in meta.native:
        try:
            provider = ctx.provider(native["provider"])
            if not isinstance(provider, NativeImages):
                raise LifecycleError(f"{native['provider']} cannot delete images")
            provider.delete_image(native["image_id"])
            removed.append(native["image_id"])
        except OrchError as e:
            ctx.progress(f"image {name}: {native['provider']}'s image {native['image_id']} was not deleted ({e}); "
                         f"delete it in the provider's console")
            kept.append(native["image_id"])
    return {**store.remove(name), "native_deleted": removed, "native_kept": kept}


def describe(meta: ImageMeta) -> dict[str, Any]:
    return {"name": meta.name, "created_at": meta.created_at, "orch_version": meta.orch_version, "source": meta.source,
            "platform": meta.platform, "parts": meta.parts, "bytes": meta.bytes, "native": meta.native}


__all__ = ["describe", "save"]
