"""The image server that runs on the instance (python -m remote.server)."""

from .torchvision_compat import allow_import_without_ops as _allow_torchvision_import

# Before anything of the server imports torchvision (transformers does, when it is installed): a
# CPU-only torch beside PyPI's CUDA-built torchvision would otherwise fail every diffusers import.
_allow_torchvision_import()
