"""`orch gen`: one txt2img request through the tunnel; the PNGs saved as they came."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from ..errors import LifecycleError
from ..state import InstanceRecord
from .context import Ctx
from .tunnels import make_tunnel, tunnel_alive


def generate(ctx: Ctx, record: InstanceRecord, payload: dict[str, Any], out_dir: Path, timeout: float = 3600) -> dict[str, Any]:
    tunnel = None
    url = record.url
    if not tunnel_alive(record):
        ctx.progress(f"{record.name}: no tunnel open; opening one for this request")
        tunnel = make_tunnel(ctx, record, None, f"gen-{os.getpid()}").start()
        url = tunnel.url
    try:
        response = httpx.post(f"{url}/sdapi/v1/txt2img", json=payload, headers={"Authorization": f"Bearer {record.token}"},
                              timeout=httpx.Timeout(timeout, connect=30))
    except httpx.HTTPError as e:
        raise LifecycleError(f"{record.name}: the image server did not answer ({type(e).__name__}: {e or 'connection closed'}); "
                             f"`orch up {record.name}` checks it and starts it again") from None
    finally:
        if tunnel:
            tunnel.close()
    if response.status_code != 200:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:500]
        raise LifecycleError(f"the server refused the request ({response.status_code}): {detail}")
    try:
        data = response.json()
        info = json.loads(data["info"])
        images = data["images"]
    except (ValueError, KeyError, TypeError):
        raise LifecycleError(f"{record.name}: the server's answer is not an A1111 txt2img answer: {response.text[:300]!r}") from None
    if info.get("orch_demo_model"):
        ctx.progress("note: this instance serves the demo model (random weights): its images are noise")
    return save_images(images, info, out_dir)


def save_images(images_b64: list[str], info: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write the PNGs as they came (their `parameters` chunk included), atomically."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LifecycleError(f"cannot write images to {out_dir}: {e.strerror or e}; pick another directory with -o") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    seeds = info.get("all_seeds") or []
    for i, b64 in enumerate(images_b64):
        seed = seeds[i] if i < len(seeds) else info.get("seed")
        path = out_dir / f"{stamp}-{seed}.png"
        n = 1
        while path.exists():
            path = out_dir / f"{stamp}-{seed}-{n}.png"
            n += 1
        tmp = path.with_name("." + path.name + ".tmp")
        try:
            tmp.write_bytes(base64.b64decode(b64))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise LifecycleError(f"cannot write {path}: {e.strerror or e}") from None
        paths.append(str(path))
    return {"images": paths, "seeds": seeds[: len(paths)], "info": info}
