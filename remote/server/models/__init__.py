"""Models on the instance: find them (catalog), load them (loading), keep several resident
(residency), make them fast (optimize), run them (run, batching), behind ModelManager (manager)."""

from .catalog import ModelEntry
from .loading import vae_in_float32
from .manager import ModelManager
from .residency import LoadedModel
from .types import GenerationRequest, GenerationResult, ModelNotFound, RequestError

__all__ = ["GenerationRequest", "GenerationResult", "LoadedModel", "ModelEntry", "ModelManager", "ModelNotFound",
           "RequestError", "vae_in_float32"]
