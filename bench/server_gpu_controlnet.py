"""server_gpu.py --controlnet: one ControlNet unit, plain diffusers vs orch's server over HTTP, in one run.

A random-weight SD1.5 and a random-weight SD1.5 ControlNet (speed does not depend on weights),
512x512, 30 steps, CFG 7, fp16, one unit (a canny map given as the image, module "none", so
both sides run the same network on the same map):
  - plain diffusers: StableDiffusionControlNetPipeline, fp16, defaults, s/image at batch 1;
  - orch: txt2img with alwayson_scripts.controlnet, end to end over HTTP, s/image at batch 1
    (after two warm-up requests: the first compiles the UNet with residuals and the ControlNet).
Goal (issue 19): orch >= 3x plain. --smoke: the demo model and a tiny ControlNet on the CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import time
from pathlib import Path


def _controlnet_for(unet, seed: int = 0):
    """A ControlNet shaped for this UNet, random weights (its zero convolutions too, or it would do nothing)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.02)
    return net


def _control_image(side: int):
    import numpy as np
    from PIL import Image

    img = np.zeros((side, side, 3), np.uint8)
    img[side // 4: side * 3 // 4, side // 4] = 255
    img[side // 4: side * 3 // 4, side * 3 // 4] = 255
    img[side // 4, side // 4: side * 3 // 4] = 255
    img[side * 3 // 4, side // 4: side * 3 // 4] = 255
    return Image.fromarray(img)


def run(args, Server, log, token: str) -> dict:
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    smoke = args.smoke
    cuda = torch.cuda.is_available() and not smoke
    steps, side = (3, 64) if smoke else (30, 512)
    n = 3 if smoke else args.requests
    import tempfile

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="orch-bench-controlnet-"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(token)
    models = home / "models"
    dtype = torch.float16 if cuda else torch.float32
    if smoke:
        from remote.server.demo_model import ensure_demo_model

        model_dir = ensure_demo_model(models)
    else:
        from remote.server.architectures import build_random_pipeline

        model_dir = models / "sd15-random"
        build_random_pipeline("sd15", dtype=torch.float16, device="cuda").save_pretrained(model_dir)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    cn_dir = models / "ControlNet" / "bench_canny"
    _controlnet_for(unet).to(dtype).save_pretrained(cn_dir)
    del unet
    results: dict = {"case": "controlnet", "arch": "demo" if smoke else "sd15", "size": side, "steps": steps,
                     "device": torch.cuda.get_device_name() if cuda else "cpu"}
    control = _control_image(side)

    # Plain diffusers, the peer.
    net = ControlNetModel.from_pretrained(cn_dir, torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(model_dir, controlnet=net, torch_dtype=dtype,
                                                             safety_checker=None).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)

    def plain_once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(prompt="a cat on a castle", image=control, num_inference_steps=steps, guidance_scale=7.0, width=side, height=side)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(2):
        plain_once()
    results["plain_s_per_image"] = statistics.median(plain_once() for _ in range(n))
    log(f"plain diffusers ControlNet: {results['plain_s_per_image']:.3f}s/image")
    pipe = net = None
    if cuda:
        torch.cuda.empty_cache()

    # orch's server over HTTP.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if smoke:
        env.update(ORCH_COMPILE="0", ORCH_WARMUP="0")
    else:
        env["ORCH_WARMUP"] = f"{side}x{side}:1"
    buf = io.BytesIO()
    control.save(buf, format="PNG")
    body = {"prompt": "a cat on a castle", "steps": steps, "width": side, "height": side, "cfg_scale": 7.0,
            "sampler_name": "Euler", "seed": 1,
            "alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "module": "none", "model": "bench_canny",
                                                          "image": base64.b64encode(buf.getvalue()).decode()}]}}}
    server = Server(home, env)
    try:
        server.wait_ready(1800)
        plain_body = {k: v for k, v in body.items() if k != "alwayson_scripts"}

        def plain_requests(tag: str) -> float:
            times = []
            for i in range(min(n, 3)):
                t = time.perf_counter()
                server.txt2img({**plain_body, "prompt": f"{body['prompt']}, {tag} {i}", "seed": 200 + i})
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        server.txt2img(plain_body)
        results["server_without_unit_before_s_per_image"] = plain_requests("before")  # the baseline of this server
        t = time.perf_counter()
        server.txt2img(body)
        results["server_first_controlnet_request_s"] = time.perf_counter() - t  # loads and compiles the ControlNet path
        server.txt2img({**body, "seed": 2})
        import httpx

        def precompiled_stats() -> dict:
            return httpx.get(f"{server.base}/healthz", timeout=5).json().get("precompiled") or {}

        before = precompiled_stats()
        seq, inside = [], []
        for i in range(n):
            t = time.perf_counter()
            r = server.txt2img({**body, "prompt": f"{body['prompt']}, take {i}", "seed": 100 + i})
            seq.append(time.perf_counter() - t)
            inside.append(json.loads(r["info"])["orch_seconds"])
        after = precompiled_stats()
        # Where the time goes: the UNet calls the standalone artifacts could not serve, and the
        # same server's plain txt2img (no unit) for comparison.
        results["precompiled_fallback_calls_per_image"] = (after.get("fallback_calls", 0) - before.get("fallback_calls", 0)) / n
        results["server_without_unit_s_per_image"] = plain_requests("after")
    finally:
        server.stop()
    results["server_s_per_image"] = statistics.median(seq)
    results["server_pipeline_s_per_image"] = statistics.median(inside)
    results["speedup_vs_plain"] = results["plain_s_per_image"] / results["server_s_per_image"]
    print()
    print(f"{results['device']}, {results['arch']} {side}x{side}, {steps} steps, CFG 7, batch 1, one ControlNet unit")
    print(f"{'plain diffusers ControlNet s/image':<44}{results['plain_s_per_image']:>10.3f}")
    print(f"{'orch server s/image (HTTP, end to end)':<44}{results['server_s_per_image']:>10.3f}")
    print(f"{'  of which in the pipeline':<44}{results['server_pipeline_s_per_image']:>10.3f}")
    print(f"{'orch first ControlNet request (s)':<44}{results['server_first_controlnet_request_s']:>10.1f}")
    print(f"{'ratio (plain / orch)':<44}{results['speedup_vs_plain']:>10.2f}x")
    print(f"{'orch, same server, no unit, before, s/image':<44}{results['server_without_unit_before_s_per_image']:>10.3f}")
    print(f"{'orch, same server, no unit, after, s/image':<44}{results['server_without_unit_s_per_image']:>10.3f}")
    print(f"{'UNet calls the artifacts passed on, /image':<44}{results['precompiled_fallback_calls_per_image']:>10.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"server_gpu_controlnet_{results['arch']}.json").write_text(json.dumps(results, indent=1))
    return results
