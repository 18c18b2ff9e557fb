"""A restored instance's first image vs a fresh one's, on one GPU: what an image saves.

Run on a GPU machine after bench/server_gpu.py kept its home (the fresh instance):
    python bench/server_gpu.py --arch sd15 --home /tmp/fresh
    python bench/images.py --from-home /tmp/fresh [--out DIR]

The fresh home's models, compiled graphs and bytecode go into a store the way `orch image save`
puts them (orchestrator.storage push, content-addressed) and come back into a new, empty home
the way `orch up --from-image` restores them (pull), then the server starts there: seconds from
start to the first image, against the fresh home's cold start (read from server_gpu's results).
Goal (H200, SD1.5): <= 20 s to the first image after a restore (a fresh instance compiles: ~93 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from server_gpu import TOKEN, Server, log, start  # noqa: E402

from orchestrator.storage import TransferCache, pull, push  # noqa: E402

PARTS = {"models": "models", "compiled": "compile-cache", "pycache": "pycache"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--from-home", required=True, help="a home bench/server_gpu.py --home left (model + compiled graphs)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    fresh = Path(args.from_home)
    work = Path(tempfile.mkdtemp(prefix="orch-bench-images-"))
    store, restored = work / "bucket", work / "restored"
    (store / ".orch").mkdir(parents=True)
    (store / ".orch" / "store.json").write_text('{"version": 1}\n')
    restored.mkdir()
    results: dict = {}

    # 1. save: each part pushed by hash, as the instance does for `orch image save`
    t0 = time.monotonic()
    pushed = {part: push(fresh / folder, f"file://{store}/orch-images/bench/{part}", TransferCache(work / "save.db")).as_json()
              for part, folder in PARTS.items() if (fresh / folder).exists()}
    results["save_s"] = time.monotonic() - t0
    results["saved_bytes"] = {p: r["bytes_transferred"] for p, r in pushed.items()}
    # 2. restore into an empty home, as PortableRestore pulls on a new instance
    t0 = time.monotonic()
    for part, folder in PARTS.items():
        if part in pushed:
            pull(f"file://{store}/orch-images/bench/{part}", restored / folder, TransferCache(work / "restore.db"))
    (restored / "token").write_text(TOKEN)
    results["restore_pull_s"] = time.monotonic() - t0
    # 3. the server on the restored home: start -> first image
    model = next(p.name for p in (restored / "models").iterdir() if p.is_dir())
    side = 1024 if "sdxl" in model else 512
    body = {"prompt": "a cat on a castle", "steps": 30, "width": side, "height": side, "cfg_scale": 7.0,
            "sampler_name": "Euler", "seed": 1}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ORCH_WARMUP": f"{side}x{side}:1"}
    server = Server(restored, env)
    start(server, "restored", body, results)
    server.stop()
    fresh_results = next(fresh.glob("server_gpu_*.json"), None) or (Path(args.out) / "server_gpu_sd15.json" if args.out else None)
    cold = json.loads(fresh_results.read_text()).get("cold_start_to_first_image_s") if fresh_results and fresh_results.exists() else None
    results["fresh_cold_start_to_first_image_s"] = cold
    print()
    print(f"{'save (push by hash)':<44}{results['save_s']:>8.1f} s  {results['saved_bytes']}")
    print(f"{'restore (pull into an empty home)':<44}{results['restore_pull_s']:>8.1f} s")
    print(f"{'restored start -> first image':<44}{results['restored_start_to_first_image_s']:>8.1f} s")
    if cold:
        print(f"{'fresh (cold) start -> first image':<44}{cold:>8.1f} s")
        print(f"{'ratio fresh / restored':<44}{cold / results['restored_start_to_first_image_s']:>8.2f}x")
    log(f"restored health: {results['restored_health']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "images_restore.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
