"""Compiled graphs saved on the instance disk and loaded at the next start without Dynamo.

Real Inductor code generation on the CPU (a C++ compiler builds the kernels) for the demo
model: the same path a GPU takes, minus the CUDA graphs.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "precompiled-token-0123"

# One process = one start: build the demo pipeline, put the precompiled stand-ins in place,
# draw two images, report what happened.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from remote.server import precompiled
    from remote.server.demo_model import build_demo_pipeline

    pipe = build_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def draw():
        with torch.inference_mode():
            gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
            return pipe(prompt=["a cat", "a dog"], num_inference_steps=3, width=64, height=64, generator=gens,
                        output_type="np").images

    from diffusers import DDIMScheduler

    euler = pipe.scheduler
    ddim = DDIMScheduler.from_config(euler.config)

    def draw_ddim():  # int64 timesteps where Euler's are float32
        pipe.scheduler = ddim
        try:
            return draw()
        finally:
            pipe.scheduler = euler

    eager, eager_ddim = draw(), draw_ddim()
    fallback_calls = []
    store = Path(sys.argv[1])
    unet_forward = pipe.unet.forward
    precompiled.install_unet(pipe.unet, store, lambda *a, **k: fallback_calls.append(1) or unet_forward(*a, **k))
    precompiled.install_vae_decode(pipe.vae, store, pipe.vae.decode)
    images = draw()
    images_ddim = draw_ddim()
    with torch.no_grad():  # not inference mode: not what was compiled, so the fallback serves it
        pipe.unet(torch.zeros(1, 4, 8, 8), torch.tensor(1.0), encoder_hidden_states=torch.zeros(1, 77, 32))
    s = precompiled.STATS
    print("RESULT " + json.dumps({
        "loaded": s.loaded, "compiled": s.compiled, "errors": s.errors, "fallback_calls": len(fallback_calls),
        "dynamo_graphs": torch._dynamo.utils.counters["stats"].get("unique_graphs", 0),
        "max_diff_to_eager": float(np.abs(images - eager).max()),
        "max_diff_to_eager_ddim": float(np.abs(images_ddim - eager_ddim).max()), "images": images.tobytes().hex()}))
""")


def start(store: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(store.parent / "inductor")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(store)], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.fixture(scope="module")
def first_start(tmp_path_factory):
    store = tmp_path_factory.mktemp("compile-cache") / "precompiled"
    return store, start(store)


def test_first_start_compiles_and_saves_then_a_restart_loads_without_tracing(first_start):
    store, first = first_start
    # Two graphs (UNet, VAE decoder), though two samplers ran: DDIM's int64 timesteps share Euler's graph.
    assert first["compiled"] == 2 and first["loaded"] == 0, first
    assert first["max_diff_to_eager"] < 1e-3, "compiled graphs must draw what the model draws"
    assert first["max_diff_to_eager_ddim"] < 1e-3
    assert len(list(store.glob("unet-*/artifact.bin"))) == 1 and len(list(store.glob("vae-decode-*/artifact.bin"))) == 1
    assert first["fallback_calls"] == 1, "a call outside inference mode is served by the fallback"

    again = start(store)
    assert again["loaded"] == 2 and again["compiled"] == 0, again
    assert again["dynamo_graphs"] == 0, "a restart must not re-trace the model with Dynamo"
    assert again["images"] == first["images"], "the loaded graphs draw exactly what the compiled ones drew"


def test_a_damaged_artifact_is_compiled_again_and_nothing_is_lost(first_start):
    store, first = first_start
    artifact = next(store.glob("unet-*/artifact.bin"))
    artifact.write_bytes(artifact.read_bytes()[:1000])  # a disk that filled up mid-write, say
    result = start(store)
    assert result["loaded"] == 1 and result["compiled"] == 1, result
    assert any("load unet-" in e for e in result["errors"]), result["errors"]
    assert result["images"] == first["images"]
    assert artifact.stat().st_size > 1000, "the artifact was written again, whole"


def test_the_server_restarted_loads_its_compiled_graphs(tmp_path, first_start):
    """What a user sees: `python -m remote.server` compiles once; started again it loads."""
    home = tmp_path / "instance"
    home.mkdir()
    (home / "token").write_text(TOKEN)
    # Inductor's kernel cache from the starts above (only to save CI time: the artifacts are not shared).
    inductor_cache = str(first_start[0].parent / "inductor")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_COMPILE": "1", "ORCH_WARMUP": "64x64:1",
           "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
    env.pop("ORCH_PRECOMPILED_DIR", None)
    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
    seen = []
    for _ in range(2):
        (home / "server.json").unlink(missing_ok=True)
        with open(home / "server.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "remote.server", "--home", str(home), "--device", "cpu"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 600
            health: dict = {}
            while time.monotonic() < deadline:
                assert proc.poll() is None, (home / "server.log").read_text()[-4000:]
                if (home / "server.json").exists():
                    port = json.loads((home / "server.json").read_text())["port"]
                    try:
                        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
                    except httpx.HTTPError:
                        health = {}
                    if health.get("status") in ("ready", "error"):
                        break
                time.sleep(0.3)
            assert health.get("status") == "ready", health
            r = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=600,
                           headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, r.text
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
            seen.append((health["precompiled"], base64.b64decode(r.json()["images"][0])))
        finally:
            proc.terminate()
            proc.wait(30)
    (first, image1), (second, image2) = seen
    assert first["compiled"] >= 2 and first["loaded"] == 0, first
    assert second["loaded"] >= 2 and second["compiled"] == 0, second
    assert list((home / "compile-cache" / "precompiled").glob("unet-*")), "kept on the instance disk (and so in saved images)"
    assert image1 == image2
