"""Models onto the instance: it pulls them itself, straight from the store, by hash.

Nothing is relayed through the laptop; the store's credentials go over SSH stdin (never a
command line, a log or the state database). What the instance already holds moves 0 bytes.
"""

from __future__ import annotations

import json

from ..config import StorageSettings
from ..errors import ConfigError, LifecycleError
from ..state import InstanceRecord
from .context import Ctx
from .remote import Remote


def resolve(refs: tuple[str, ...], storage: StorageSettings) -> list[str]:
    """Store URLs for `--model` references; checked before anything is created."""
    from ..storage.sync import is_store_url, parse_location

    urls = []
    for ref in refs:
        if is_store_url(ref):
            url = ref
        elif storage.url:
            url = storage.url.rstrip("/") + "/" + ref.lstrip("/")
        else:
            raise ConfigError(f"--model {ref}: not a store URL (s3://bucket/prefix) and no storage.url in orch.yaml to resolve it against")
        try:
            parse_location(url)
        except Exception as e:
            raise ConfigError(f"--model {ref}: {e}") from None
        urls.append(url)
    return urls


def sync_models(ctx: Ctx, remote: Remote, record: InstanceRecord) -> None:
    if not record.models:
        return
    from ..storage.sync import parse_location, resolved_credentials

    storage = ctx.settings.storage
    urls = resolve(record.models, storage)
    creds = resolved_credentials(storage.endpoint or None, storage.profile or None) if any(u.startswith("s3://") for u in urls) else {}
    home = remote.runtime.home
    for url in urls:
        loc = parse_location(url)
        # The folder name it goes in: the prefix's last part; a store whose root is the model itself: its folder's name.
        name = loc.prefix.rsplit("/", 1)[-1] or (loc.root.name if loc.root is not None else loc.bucket)
        ctx.progress(f"{record.name}: the instance pulls {url}")
        command = remote.python_cmd("orchestrator.storage", "pull", url, f"{home}/models/{name}", "--cache",
                                    f"{home}/transfers.db", "--creds-stdin")
        result = remote.run(command, stdin=json.dumps(creds).encode(), timeout=6 * 3600, check=False)
        try:
            data = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise LifecycleError(f"pulling {url} on the instance failed: {result.stderr.strip()[-2000:]}") from None
        if result.exit_code != 0 or "error" in data:
            raise LifecycleError(f"pulling {url} on the instance failed: {data.get('error')}")
        ctx.progress(f"{record.name}: {url}: {data['bytes_transferred']:,} bytes pulled, {data['bytes_skipped']:,} already there")
