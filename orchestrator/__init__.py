"""orch: rent a GPU, run Stable Diffusion on it, never pay for a minute you did not use."""

__version__ = "0.1.0"
