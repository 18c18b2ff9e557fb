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
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), dtype=np.int16)
    assert np.abs(out[:4] - np.array([200, 10, 10])).max() == 0, "outside the mask, the original (A1111 pastes it back)"
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
    assert info["parameters"]["Seed"] == 77 and info["parameters"]["Steps"] == 2  # numbers as numbers, as A1111


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


def test_after_a_500_the_same_keep_alive_connection_is_answered(server, monkeypatch):
    """A 500 used to close the connection under the client: its next request got no answer."""
    import http.client

    models = server["app"].state.models
    real = models.generate_batch
    calls = {"n": 0}

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("synthetic failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "generate_batch", fails_once)
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
    body = json.dumps({"prompt": "x", "steps": 2, "width": 64, "height": 64})
    headers = {**H(), "Content-Type": "application/json"}
    conn.request("POST", "/sdapi/v1/txt2img", body, headers)
    first = conn.getresponse()
    assert first.status == 500 and b"synthetic failure" in first.read()
    conn.request("POST", "/sdapi/v1/txt2img", body, headers)  # the same connection
    second = conn.getresponse()
    assert second.status == 200 and len(json.loads(second.read())["images"]) == 1
    conn.close()


def test_a_request_whose_client_went_away_stops_at_the_next_step(server):
    base = server["base"]
    body = json.dumps({"prompt": "long", "steps": 1000, "width": 256, "height": 256, "seed": 1}).encode()
    sock = socket.create_connection(("127.0.0.1", server["port"]))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 120
    step, t0 = 0, None
    while time.monotonic() < deadline:
        step = httpx.get(f"{base}/sdapi/v1/progress", headers=H()).json()["state"]["sampling_step"]
        if step >= 2 and t0 is None:
            t0, first_step = time.monotonic(), step
        if t0 is not None and step >= first_step + 3:
            break
        time.sleep(0.02)
    per_step = (time.monotonic() - t0) / max(step - first_step, 1)
    sock.close()  # the client goes away
    started = time.monotonic()
    r = httpx.post(f"{base}/sdapi/v1/txt2img", headers=H(), timeout=600, json={"prompt": "y", "steps": 2, "width": 64, "height": 64})
    waited = time.monotonic() - started
    assert r.status_code == 200
    assert waited < per_step * (1000 - step) / 4, f"served after {waited:.1f}s: the abandoned job did not run to its end"


def test_webuiapi_hires_inpaint_upscale_pnginfo_and_options(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server["port"])
    api.set_auth("orch", TOKEN)
    hr = api.txt2img(prompt="a castle", seed=4, steps=2, width=64, height=64, enable_hr=True, hr_scale=2,
                     hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=2, denoising_strength=0.5)
    assert hr.images[0].size == (128, 128) and hr.info["width"] == 128
    img = Image.new("RGB", (64, 64), (30, 160, 90))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    inp = api.img2img(images=[img], mask_image=mask, prompt="a door", steps=3, width=64, height=64, denoising_strength=0.9,
                      inpainting_fill=1, mask_blur=0, inpaint_full_res=False, seed=2)
    out = np.asarray(inp.images[0], dtype=np.int16)
    assert np.array_equal(out[:16], np.asarray(img, dtype=np.int16)[:16]), "outside the mask: untouched"
    up = api.extra_single_image(image=img, upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert up.image.size == (128, 128)
    info = api.png_info(hr.images[0])
    assert info.parameters["Seed"] == 4 and info.parameters["Hires upscale"] == 2
    opts = api.get_options()
    assert opts["send_seed"] is True and opts["samples_format"] == "png"
    api.set_options({"send_seed": False})
    assert api.get_options()["send_seed"] is False
    api.set_options({"send_seed": True})
    assert {u["name"] for u in api.get_upscalers()} >= {"None", "Lanczos", "Nearest"}
    assert "Latent" in [m["name"] for m in api.get_latent_upscale_modes()]


# A1111's own API tests (test/test_txt2img.py, test_img2img.py, test_extras.py, test_utils.py) send these
# requests and expect a 200; orch runs them with its token. Its "sd upscale" script is the exception
# README's table lists: orch runs no scripts, and answers A1111's own 422 for them.
A1111_TXT2IMG = {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0, "firstphase_height": 0,
                 "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "", "prompt": "example prompt",
                 "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a", "seed": -1,
                 "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0,
                 "tiling": False, "width": 64}


@pytest.mark.parametrize("change", [{}, {"negative_prompt": "example negative prompt"},
                                    {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
                                    {"height": 128}, {"enable_hr": True}, {"tiling": True}, {"restore_faces": True},
                                    {"sampler_index": "PLMS"}, {"sampler_index": "DDIM"}, {"sampler_index": "UniPC"}, {"n_iter": 2},
                                    {"batch_size": 2}])
def test_a1111s_own_txt2img_requests(server, change):
    r = httpx.post(f"{server['base']}/sdapi/v1/txt2img", headers=H(), timeout=300, json={**A1111_TXT2IMG, **change})
    assert r.status_code == 200, r.text


def test_a1111s_own_img2img_extras_and_utils_requests(server):
    base = server["base"]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 90, 200)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    buf = io.BytesIO()
    mask = Image.new("RGB", (64, 64), (0, 0, 0))
    mask.paste((255, 255, 255), (16, 16, 48, 48))
    mask.save(buf, format="PNG")
    mask_b64 = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    i2i = {**{k: v for k, v in A1111_TXT2IMG.items() if k not in ("enable_hr", "firstphase_height", "firstphase_width")},
           "denoising_strength": 0.75, "include_init_images": False, "init_images": [image], "inpaint_full_res": False,
           "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None, "mask_blur": 4,
           "override_settings": {}, "resize_mode": 0}
    for change in ({}, {"mask": mask_b64}, {"mask": mask_b64, "inpainting_mask_invert": True}):
        r = httpx.post(f"{base}/sdapi/v1/img2img", headers=H(), timeout=300, json={**i2i, **change})
        assert r.status_code == 200, r.text
    script = httpx.post(f"{base}/sdapi/v1/img2img", headers=H(), timeout=300,
                        json={**i2i, "script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]})
    assert script.status_code == 422 and "Script 'sd upscale' not found" in script.json()["detail"]
    extras = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
              "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
              "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0,
              "image": image}
    for body in (extras, {"image": image}, {"image": image, "model": "clip"}):
        assert httpx.post(f"{base}/sdapi/v1/extra-single-image", headers=H(), timeout=120, json=body).status_code == 200
    pre = httpx.get(f"{base}/sdapi/v1/options", headers=H()).json()["send_seed"]
    assert httpx.post(f"{base}/sdapi/v1/options", headers=H(), json={"send_seed": not pre}).status_code == 200
    assert httpx.get(f"{base}/sdapi/v1/options", headers=H()).json()["send_seed"] == (not pre)
    httpx.post(f"{base}/sdapi/v1/options", headers=H(), json={"send_seed": pre})
    for url in ("cmd-flags", "samplers", "upscalers", "sd-models", "hypernetworks", "face-restorers", "realesrgan-models",
                "prompt-styles", "embeddings"):
        assert httpx.get(f"{base}/sdapi/v1/{url}", headers=H()).status_code == 200, url
