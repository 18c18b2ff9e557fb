"""One GPU vs every GPU behind the one URL (issue 18), in one run on a multi-GPU machine.

Run on a machine with 2+ GPUs: python bench/server_gpu_multi.py [--gpus 2] [--out DIR]
CPU smoke (CI): python bench/server_gpu_multi.py --smoke (two CPU replicas of the demo model)

A random-weight SD1.5 (speed does not depend on weights), 512x512, 30 steps, CFG 7, fp16:
  1. `python -m remote.server --gpus 1` (no Ray in the path): images/s with 16 concurrent clients;
  2. `python -m remote.server --gpus N` (Ray Serve, one replica per GPU, the same home, so the
     replicas load the graphs the first server compiled): the same clients; the ratio (goal >= 1.9x
     with 2 GPUs);
  3. a batch job of 200 requests handed out by orch batch's dispatcher (orchestrator/batch/) to
     each server as it would be through a tunnel: images/s, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from server_gpu import TOKEN, Server, log, run_clients


def batch_images_per_s(server: Server, body: dict, n: int, out: Path) -> tuple[float, dict]:
    """n requests through orch batch's dispatcher (as `orch batch` hands them to an instance through
    its tunnel), the results written to a folder as `orch batch` writes them."""
    from orchestrator.batch.dispatch import Dispatcher, Endpoint, gpus_from_health, read_health
    from orchestrator.batch.jobs import load
    from orchestrator.batch.results import DirResults

    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**body, "prompt": f"{body['prompt']}, batch item {i}", "seed": 5000 + i}) + "\n"
                               for i in range(n)))
    jobs = load(prompts).jobs
    results = DirResults(out / "results")
    results.check()
    dispatcher = Dispatcher(jobs, results)
    gpus = gpus_from_health(read_health(server.base))
    t = time.perf_counter()
    dispatcher.expect(1)
    dispatcher.add(Endpoint(name="bench", url=server.base, token=TOKEN, gpus=gpus))
    while not dispatcher.wait(5):
        pass
    elapsed = time.perf_counter() - t
    stats = dispatcher.stats()
    dispatcher.close()
    if dispatcher.error:
        raise SystemExit(f"the batch failed: {dispatcher.error}")
    return stats["images"] / elapsed, {**stats, "gpus": gpus, "seconds": round(elapsed, 2)}


def wait_background_warmup(server: Server, timeout: float = 1200) -> None:
    """Until every replica has compiled its other batch sizes (they run uncompiled meanwhile)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(f"{server.base}/healthz", timeout=10).json()
        if all(r.get("background_warmup") != "running" for r in [h, *h.get("replicas", [])]):
            return
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="demo model, two CPU replicas, a few steps (CI)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10, help="requests each client sends, one after another (the steady state, not the ramp)")
    parser.add_argument("--batch", type=int, default=200, help="requests in the batch job; 0 skips it")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--home")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also run the N-GPU server with these environment settings (Ray's, say), same clients")
    parser.add_argument("--skip-one-gpu", action="store_true", help="comparing variants only: no 1-GPU run, no ratios")
    args = parser.parse_args()

    import torch

    smoke = args.smoke
    steps, side = (2, 64) if smoke else (30, 512)
    clients, rounds, n_batch = (4, 2, min(args.batch, 8)) if smoke else (args.clients, args.rounds, args.batch)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="orch-bench-multi-"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(TOKEN)
    if smoke:
        from remote.server.demo_model import ensure_demo_model

        ensure_demo_model(home / "models")
    else:
        from remote.server.architectures import build_random_pipeline

        build_random_pipeline("sd15", dtype=torch.float16, device="cuda").save_pretrained(home / "models" / "sd15-random")
        torch.cuda.empty_cache()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.update({"ORCH_COMPILE": "0", "ORCH_WARMUP": "0"} if smoke else {"ORCH_WARMUP": f"{side}x{side}:1,8"})
    device = ("--device", "cpu") if smoke else ()
    body = {"prompt": "a cat on a castle", "steps": steps, "width": side, "height": side, "cfg_scale": 7.0,
            "sampler_name": "Euler", "send_images": True}
    results: dict = {"device": "cpu" if smoke else torch.cuda.get_device_name(), "gpus": args.gpus, "size": side,
                     "steps": steps, "clients": clients, "rounds": rounds}

    runs = [] if args.skip_one_gpu else [("one_gpu", 1, {})]
    runs.append(("all_gpus", args.gpus, {}))
    for variant in args.variant:
        name, _, settings = variant.partition(":")
        runs.append((f"variant_{name}", args.gpus, dict(kv.split("=", 1) for kv in settings.split(",") if kv)))
    for label, gpus, overrides in runs:
        t = time.perf_counter()
        server = Server(home, {**env, **overrides}, (*device, "--gpus", str(gpus)))
        try:
            health = server.wait_ready(1800)
            if not smoke:
                server.wait_compiled(1800)
                wait_background_warmup(server)
            results[f"{label}_start_to_ready_s"] = round(time.perf_counter() - t, 1)
            for i in range(2):  # warm: every replica has seen a request
                server.txt2img({**body, "seed": i})
            run = run_clients(server, body, clients, rounds)
            ips = run.images_per_s
            extra = {"errors": run.errors[:3], "error_count": len(run.errors), "served": run.served,
                     "batch_sizes": run.batch_sizes, "gpu_idle_before_batch_median_s": run.gpu_idle_median_s,
                     "way_in_median_s": run.way_in_median_s, "way_out_median_s": run.way_out_median_s,
                     "client_turn_median_s": run.client_turn_median_s}
            results[f"{label}_images_per_s"] = ips
            results[f"{label}_steady_images_per_s"] = run.steady_images_per_s
            results[f"{label}_clients"] = extra
            log(f"{label} ({gpus} GPU, {len(health.get('replicas', [])) or 1} replica(s)): {ips:.2f} images/s, {extra}")
            if n_batch and not label.startswith("variant_"):
                bps, stats = batch_images_per_s(server, body, n_batch, home / f"batch-{label}")
                results[f"{label}_batch_images_per_s"] = bps
                results[f"{label}_batch"] = stats
                log(f"{label}: batch of {n_batch}: {bps:.2f} images/s ({stats})")
        finally:
            server.stop()

    for label, _, overrides in runs[1:] if not args.skip_one_gpu else runs:
        c = results[f"{label}_clients"]
        print(f"{label:<24}{results[f'{label}_images_per_s']:>7.2f} images/s, while all send "
              f"{results[f'{label}_steady_images_per_s'] or 0:>6.2f}; way in {c['way_in_median_s'] * 1000:.1f} ms, "
              f"out {c['way_out_median_s'] * 1000:.1f} ms, GPU idle {c['gpu_idle_before_batch_median_s'] * 1000:.1f} ms {overrides}")
    if args.skip_one_gpu:
        save(args.out, smoke, results)
        return
    results["ratio_clients"] = results["all_gpus_images_per_s"] / results["one_gpu_images_per_s"]
    if results["one_gpu_steady_images_per_s"] and results["all_gpus_steady_images_per_s"]:
        results["ratio_clients_steady"] = results["all_gpus_steady_images_per_s"] / results["one_gpu_steady_images_per_s"]
    if n_batch:
        results["ratio_batch"] = results["all_gpus_batch_images_per_s"] / results["one_gpu_batch_images_per_s"]
    print()
    print(f"{results['device']}, SD1.5 {side}x{side}, {steps} steps, CFG 7; {clients} concurrent clients x {rounds} requests")
    print(f"{'images/s, 1 GPU (no Ray)':<44}{results['one_gpu_images_per_s']:>10.2f}")
    print(f"{f'images/s, {args.gpus} GPUs through one URL (Ray Serve)':<44}{results['all_gpus_images_per_s']:>10.2f}")
    print(f"{'ratio':<44}{results['ratio_clients']:>10.2f}x")
    if "ratio_clients_steady" in results:
        print(f"{'  while all clients send, images/s, 1 GPU':<44}{results['one_gpu_steady_images_per_s']:>10.2f}")
        print(f"{f'  while all clients send, {args.gpus} GPUs':<44}{results['all_gpus_steady_images_per_s']:>10.2f}")
        print(f"{'  ratio':<44}{results['ratio_clients_steady']:>10.2f}x")
    if n_batch:
        print(f"{f'batch of {n_batch}, images/s, 1 GPU':<44}{results['one_gpu_batch_images_per_s']:>10.2f}")
        print(f"{f'batch of {n_batch}, images/s, {args.gpus} GPUs':<44}{results['all_gpus_batch_images_per_s']:>10.2f}")
        print(f"{'ratio':<44}{results['ratio_batch']:>10.2f}x")
    save(args.out, smoke, results)


def save(out: str | None, smoke: bool, results: dict) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"server_gpu_multi_{'smoke' if smoke else 'sd15'}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
