"""Which models are on the instance: checkpoints, VAEs, and the default one to serve.

A model is a diffusers folder (with model_index.json) or a single-file checkpoint
(.safetensors / .ckpt, as A1111 users have them; see checkpoints.py) under the models
directory. When there is none, the demo model (a tiny random-weight pipeline built
locally) is served, and every answer says so. Layout, as A1111's: models/Lora for LoRAs,
models/VAE for VAE overrides.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoints
from ..demo_model import DEMO_MODEL_NAME, ensure_demo_model
from .types import ModelNotFound, RequestError

log = logging.getLogger(__name__)

# Subfolders of the models directory that hold other things than checkpoints (A1111's layout).
NOT_CHECKPOINTS = {"Lora", "LyCORIS", "VAE", "embeddings", "ControlNet", "hypernetworks", "ESRGAN"}
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    is_demo: bool = False

    @property
    def is_file(self) -> bool:
        return self.path.suffix.lower() in checkpoints.CHECKPOINT_SUFFIXES

    @property
    def model_name(self) -> str:
        return Path(self.name).stem if self.is_file else self.name

    @functools.cached_property
    def short_hash(self) -> str:
        """A stable short id, like A1111's model hash (of a file: A1111's legacy hash; of a folder: its index).

        Cached: every image's infotext names it, and for a file it is a disk read."""
        if self.is_file:
            return checkpoints.short_hash(self.path)
        index = self.path / "model_index.json"
        data = index.read_bytes() if index.exists() else str(self.path).encode()
        return hashlib.sha256(data).hexdigest()[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]"

    def size_bytes(self) -> int:
        if self.is_file:
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*.safetensors"))


class Catalog:
    """The models directory, read afresh at each call (files come and go while the server runs)."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir

    def list_models(self) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        if not self.models_dir.exists():
            return entries
        for index in sorted(self.models_dir.glob("**/model_index.json")):
            folder = index.parent
            if any(part.startswith(".") for part in folder.relative_to(self.models_dir).parts):
                continue  # a model being written (temporary folder)
            name = str(folder.relative_to(self.models_dir))
            entries.append(ModelEntry(name=name, path=folder, is_demo=name == DEMO_MODEL_NAME))
        folders = [e.path for e in entries]
        for path in sorted(self.models_dir.rglob("*")):
            if path.suffix.lower() not in checkpoints.CHECKPOINT_SUFFIXES or not path.is_file():
                continue
            rel = path.relative_to(self.models_dir)
            if rel.parts[0] in NOT_CHECKPOINTS or any(p.startswith(".") for p in rel.parts) or path.name.endswith((".vae.safetensors", ".vae.pt")):
                continue
            if any(folder in path.parents for folder in folders):
                continue  # a component of a diffusers folder
            if not checkpoints.looks_like_checkpoint(path):
                continue  # e.g. a LoRA pulled to the top of the models folder
            # A1111 keeps checkpoints in models/Stable-diffusion and names them from there.
            name = str(rel.relative_to("Stable-diffusion")) if rel.parts[0] == "Stable-diffusion" and len(rel.parts) > 1 else str(rel)
            entries.append(ModelEntry(name=name, path=path))
        return entries

    def vae_files(self) -> list[Path]:
        folder = self.models_dir / "VAE"
        if not folder.exists():
            return []
        files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VAE_SUFFIXES]
        folders = [p.parent for p in folder.rglob("config.json") if p.parent != folder]
        return sorted(files + folders)

    def find_vae(self, choice: str | None, entry: ModelEntry | None) -> Path | None:
        """The VAE file for an sd_vae choice; None means the model's own. Unknown names are errors."""
        if choice in (None, "", "Automatic"):
            if entry is not None and entry.is_file:
                for suffix in (".vae.safetensors", ".vae.pt"):
                    sibling = entry.path.with_name(entry.path.stem + suffix)
                    if sibling.exists():
                        return sibling
            return None
        if choice == "None":
            return None
        for path in self.vae_files():
            rel = str(path.relative_to(self.models_dir / "VAE"))
            if choice in (path.name, path.stem, rel):
                return path
        valid = ", ".join(["Automatic", "None", *(p.name for p in self.vae_files())])
        raise RequestError(f"sd_vae: unknown VAE {choice!r}; choose one of: {valid}")

    def default_entry(self) -> ModelEntry:
        real = [e for e in self.list_models() if not e.is_demo]
        if real:
            return real[0]
        path = ensure_demo_model(self.models_dir)
        log.warning("no model in %s: serving the demo model %s (tiny random weights; its images are noise)", self.models_dir, DEMO_MODEL_NAME)
        return ModelEntry(name=DEMO_MODEL_NAME, path=path, is_demo=True)

    def prefetch_default(self, precompiled_dir: Path | None = None) -> threading.Thread | None:
        """Read the default model's files (and the saved compiled graphs) into the page cache
        on a thread, while the main thread spends its ~15 s importing torch, diffusers and
        transformers: after an instance restart the cache is empty, and a 2 GB SD1.5 at the
        250 MB/s of a cloud volume is 8 s of reading that would otherwise come after."""
        real = [e for e in self.list_models() if not e.is_demo]
        if not real:
            return None
        entry = real[0]
        files = [entry.path] if entry.is_file else [p for p in entry.path.rglob("*") if p.is_file()]
        if precompiled_dir is not None and precompiled_dir.exists():
            files += [p for p in precompiled_dir.rglob("*.bin")]
        thread = threading.Thread(target=_read_through, args=(files,), name="prefetch", daemon=True)
        thread.start()
        return thread

    def find(self, name: str) -> ModelEntry:
        wanted = name.split(" [")[0].strip()  # A1111 titles look like "name [hash]"
        entries = self.list_models()
        for entry in entries:
            if wanted in (entry.name, entry.path.name, entry.model_name):
                return entry
        for entry in entries:  # A1111 also finds a checkpoint by its short hash
            if wanted.lower() == entry.short_hash.lower():
                return entry
        if wanted == DEMO_MODEL_NAME:
            return ModelEntry(name=DEMO_MODEL_NAME, path=ensure_demo_model(self.models_dir), is_demo=True)
        valid = ", ".join(e.name for e in self.list_models()) or "(none)"
        raise ModelNotFound(f"unknown model {name!r}; models on this instance: {valid}")


def _read_through(files: list[Path]) -> None:
    buffer = bytearray(8 << 20)
    for path in files:
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):  # releases the GIL while the disk works
                    pass
        except OSError:
            pass  # only a hint: the loader reports real problems
