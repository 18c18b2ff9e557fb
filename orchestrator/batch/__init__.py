"""`orch batch`: a file of txt2img requests run across K instances, results streamed to a
directory or a bucket, resumable, every instance stopped at the end.

    jobs.py      the JSONL file: every line checked, each request keyed by a hash of its canonical JSON
    results.py   where results go (a directory, s3://bucket/prefix): atomic writes, what is done already
    dispatch.py  the laptop hands requests out over each instance's tunnel, pulled, a few in flight per GPU
    fleet.py     the instances: started with the lifecycle's `up`, stopped (confirmed) with its `down`
    runner.py    the whole job, start to end

Laptop dispatch over SSH tunnels on every provider; no Ray cluster across instances (not built).
"""

from typing import Any

__all__ = ["BatchOptions", "BatchResult", "run"]


def __getattr__(name: str) -> Any:
    # The runner (and with it the lifecycle, SSH, the providers) only when asked for: the dispatcher
    # and result store import without them (the multi-GPU bench runs them on a bare GPU host).
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
