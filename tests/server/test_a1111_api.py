"""A1111 compatibility over real HTTP (uvicorn on 127.0.0.1): the webuiapi client unchanged,
batching of concurrent requests, img2img/inpaint, options, progress/interrupt, png-info, metrics."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from remote.server.app import ServerSettings, create_app
from remote.server.demo_model import ensure_demo_model

TOKEN = "tok-" + "x" * 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("inst")
    models = home / "models"
    demo = ensure_demo_model(models)
    shutil.copytree(demo, models / "second-model")  # a second model to switch to
    shutil.rmtree(demo)
    app = create_app(ServerSettings(token=TOKEN, models_dir=models, state_dir=home / ".orch", device="cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").json()["status"] == "ready":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    yield {"base": base, "port": port, "app": app, "home": home}
    srv.should_exit = True
    thread.join(10)


def H():
    return {"Authorization": f"Bearer {TOKEN}"}


def test_webuiapi_client_works_unchanged(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server["port"])
    api.set_auth("orch", TOKEN)
    assert any(n.startswith("second-model [") for n in api.util_get_model_names())
    assert "DPM++ 2M" in [s["name"] for s in api.get_samplers()]
    r = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=42, steps=2, width=64, height=64,
                    sampler_name="Euler a", batch_size=2)
    assert len(r.images) == 2 and r.images[0].size == (64, 64)
    assert r.info["all_seeds"] == [42, 43] and r.info["sampler_name"] == "Euler a"
    assert r.images[0].info["parameters"].startswith("a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a")
    i2i = api.img2img(images=[r.image], prompt="a blue fox", denoising_strength=0.5, steps=4, width=64, height=64, seed=1)
    assert len(i2i.images) == 1 and i2i.images[0].size == (64, 64)
    opts = api.get_options()
    assert opts["sd_model_checkpoint"].startswith("second-model")
    api.set_options(opts)  # posting the whole dict back is accepted
    api.interrupt()
    api.get_progress()
    assert api.get_loras() == [] and api.get_scripts() == {"txt2img": [], "img2img": []}
    api.get_memory()


def test_inpaint_with_a_mask(server):
    img = Image.new("RGB", (64, 64), (200, 10, 10))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    r = httpx.post(f"{server['base']}/sdapi/v1/img2img", headers=H(), timeout=120,
                   json={"init_images": [b64(img)], "mask": b64(mask), "prompt": "x", "steps": 4, "width": 64, "height": 64,
                         "denoising_strength": 1.0, "seed": 3})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["denoising_strength"] == 1.0
    bad = httpx.post(f"{server['base']}/sdapi/v1/img2img", headers=H(), json={"init_images": ["not-an-image"], "steps": 2,
                                                                            "width": 64, "height": 64})
    assert bad.status_code == 422 and "init_images" in bad.json()["detail"]


def test_concurrent_requests_are_batched_and_match_single_runs(server):
    body = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda seed: httpx.post(f"{server['base']}/sdapi/v1/txt2img", headers=H(), timeout=120,
                                                        json={**body, "seed": seed}).json(), range(100, 108)))
    infos = [json.loads(r["info"]) for r in results]
    assert [i["seed"] for i in infos] == list(range(100, 108))
    assert max(i["orch_batch_images"] for i in infos) > 1, "concurrent compatible requests shared a batch"
    single = httpx.post(f"{server['base']}/sdapi/v1/txt2img", headers=H(), timeout=120, json={**body, "seed": 105}).json()
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(single["images"][0]))), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(results[5]["images"][0]))), dtype=np.int16)
    assert np.abs(a - b).mean() < 2.0, "a batched image is the image its seed gives alone"


def test_switching_the_model_through_options(server):
    base = server["base"]
    current = httpx.get(f"{base}/sdapi/v1/options", headers=H()).json()["sd_model_checkpoint"]
    assert current.startswith("second-model")
    r = httpx.post(f"{base}/sdapi/v1/options", headers=H(), json={"sd_model_checkpoint": "orch-demo-tiny-sd15"}, timeout=120)
    assert r.status_code == 200
    assert httpx.get(f"{base}/sdapi/v1/options", headers=H()).json()["sd_model_checkpoint"].startswith("orch-demo-tiny-sd15")
    bad = httpx.post(f"{base}/sdapi/v1/options", headers=H(), json={"sd_model_checkpoint": "nope"})
    assert bad.status_code == 422 and "second-model" in bad.json()["detail"]
    httpx.post(f"{base}/sdapi/v1/options", headers=H(), json={"sd_model_checkpoint": "second-model"}, timeout=120)


def test_interrupt_mid_generation(server):
    base = server["base"]
    out = {}

    def long_run():
        out["r"] = httpx.post(f"{base}/sdapi/v1/txt2img", headers=H(), timeout=300,
                              json={"prompt": "x", "steps": 150, "width": 256, "height": 256, "seed": 9})

    t = threading.Thread(target=long_run)
    started = time.monotonic()
    t.start()
    step = 0
    while time.monotonic() - started < 60 and step < 3:
        step = httpx.get(f"{base}/sdapi/v1/progress", headers=H()).json()["state"]["sampling_step"]
        time.sleep(0.02)
    assert step >= 3, "progress reports the running step"
    httpx.post(f"{base}/sdapi/v1/interrupt", headers=H())
    t.join(120)
    assert out["r"].status_code == 200 and len(out["r"].json()["images"]) == 1
    # It stopped early: the next request is served at once and takes all its steps.
    r = httpx.post(f"{base}/sdapi/v1/txt2img", headers=H(), timeout=60, json={"prompt": "y", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200


def test_png_info_reads_back_the_parameters(server):
    r = httpx.post(f"{server['base']}/sdapi/v1/txt2img", headers=H(), timeout=60,
                   json={"prompt": "a castle", "negative_prompt": "fog", "steps": 2, "width": 64, "height": 64, "seed": 77})
    info = httpx.post(f"{server['base']}/sdapi/v1/png-info", headers=H(), json={"image": r.json()["images"][0]}).json()
    assert info["parameters"]["Prompt"] == "a castle" and info["parameters"]["Negative prompt"] == "fog"
    assert info["parameters"]["Seed"] == "77" and info["parameters"]["Steps"] == "2"


def test_metrics_in_prometheus_text(server):
    text = httpx.get(f"{server['base']}/metrics", headers=H()).text
    for name in ("orch_requests_total", "orch_queue_depth", "orch_iterations_per_second", "orch_model_load_seconds"):
        assert name in text
    assert httpx.get(f"{server['base']}/metrics").status_code == 401


def test_a_prompt_sent_again_is_not_encoded_again_and_draws_the_same(server):
    def hits() -> int:
        text = httpx.get(f"{server['base']}/metrics", headers=H()).text
        return sum(int(line.split()[-1]) for line in text.splitlines() if line.startswith("orch_prompt_cache_hits_total{"))

    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "rain", "steps": 2, "width": 64, "height": 64, "seed": 5}
    first = httpx.post(f"{server['base']}/sdapi/v1/txt2img", headers=H(), timeout=60, json=body).json()["images"][0]
    before = hits()
    again = httpx.post(f"{server['base']}/sdapi/v1/txt2img", headers=H(), timeout=60, json=body).json()["images"][0]
    assert hits() == before + 1, "the second request's prompt row came from the cache"
    assert again == first, "the cached encoding draws the very same image"
