"""A1111 parity (issue 16): what A1111 clients ask is done, or the answer says it is not.

In-process app on the demo model (real diffusers pipelines, tiny random weights, CPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import b64_png, image_of

pytestmark = pytest.mark.slow


def gen(api, path: str = "/sdapi/v1/txt2img", expect: int = 200, **body):
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7, **body}
    r = api.post(path, json=body)
    assert r.status_code == expect, r.text
    if expect != 200:
        return r.json()
    data = r.json()
    return data, json.loads(data["info"]), [image_of(b) for b in data["images"]]


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


RED = (200, 30, 30)


def red_and_mask():
    img = Image.new("RGB", (64, 64), RED)
    for x in range(64):  # a gradient, so that "fill" and "original" differ
        for y in range(0, 64, 8):
            img.putpixel((x, y), (x * 4, 100, 255 - x * 4))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    return img, mask


# -- bugs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, denoise", [(1, 0.75), (4, 0.2), (3, 0.0)])
def test_img2img_with_less_than_one_whole_step_still_makes_an_image(api, steps, denoise):
    img, mask = red_and_mask()
    for extra in ({}, {"mask": b64_png(mask)}):
        _, info, images = gen(api, "/sdapi/v1/img2img", init_images=[b64_png(img)], steps=steps, denoising_strength=denoise, **extra)
        assert len(images) == 1 and images[0].size == (64, 64)
        assert info["denoising_strength"] == denoise


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "cfg_scale": NaN}', b'{"prompt": "x", "steps": 2, "override_settings": {"a": Infinity}}',
                                 b'{"prompt": "x", "denoising_strength": -Infinity}'])
def test_nan_and_infinity_are_a_422_that_names_the_field(api, raw):
    r = api.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "NaN and Infinity" in r.json()["detail"] or "finite" in r.json()["detail"]


def test_sde_sampler_batch_images_are_the_single_images_of_their_seeds(api):
    _, info, batch = gen(api, sampler_name="DPM++ SDE", seed=100, batch_size=2, steps=3)
    assert info["all_seeds"] == [100, 101]
    for seed, image in zip((100, 101), batch):
        _, _, (alone,) = gen(api, sampler_name="DPM++ SDE", seed=seed, steps=3)
        assert np.abs(px(alone) - px(image)).mean() < 2.0, f"seed {seed}: the batch image is its seed's picture"
    _, _, (again,) = gen(api, sampler_name="DPM++ SDE", seed=100, steps=3)
    assert np.array_equal(px(again), px(gen(api, sampler_name="DPM++ SDE", seed=100, steps=3)[2][0])), "same seed, same image"


def test_inpainting_keeps_every_pixel_outside_the_blurred_mask(api):
    img, mask = red_and_mask()
    for full_res in (False, True):
        _, info, (out,) = gen(api, "/sdapi/v1/img2img", init_images=[b64_png(img)], mask=b64_png(mask), denoising_strength=1.0,
                              steps=3, mask_blur=2, inpaint_full_res=full_res, inpaint_full_res_padding=4)
        a, b = px(out), px(img)
        assert out.size == (64, 64)
        assert np.array_equal(a[:16], b[:16]) and np.array_equal(a[48:], b[48:]), "outside the mask: the original"
        assert np.abs(a[28:36, 28:36] - b[28:36, 28:36]).mean() > 5, "inside the mask: generated"
        text = info["infotexts"][0]
        assert "Mask blur: 2" in text and ("Inpaint area: Only masked" in text) == full_res
    # Inverted: the square is kept, the rest repainted.
    _, _, (inv,) = gen(api, "/sdapi/v1/img2img", init_images=[b64_png(img)], mask=b64_png(mask), denoising_strength=1.0, steps=3,
                       mask_blur=0, inpainting_mask_invert=1, inpaint_full_res=False)
    assert np.array_equal(px(inv)[26:38, 26:38], px(img)[26:38, 26:38])
    assert np.abs(px(inv)[:16] - px(img)[:16]).mean() > 5


def test_the_four_masked_contents_differ_and_are_named(api):
    img, mask = red_and_mask()
    seen = []
    for fill in range(4):
        _, info, (out,) = gen(api, "/sdapi/v1/img2img", init_images=[b64_png(img)], mask=b64_png(mask), denoising_strength=0.5,
                              steps=4, inpainting_fill=fill, inpaint_full_res=False, mask_blur=0)
        seen.append(px(out)[24:40, 24:40])
        name = ("fill", "original", "latent noise", "latent nothing")[fill]
        assert f"Masked content: {name}" in info["infotexts"][0]
    assert all(np.abs(seen[i] - seen[j]).mean() > 0.5 for i in range(4) for j in range(i + 1, 4))


def test_inpaint_fill_paints_the_hole_with_the_colors_around_it():
    from remote.server import inpaint

    img = Image.new("RGB", (32, 32), (10, 200, 30))
    img.paste((255, 255, 255), (8, 8, 24, 24))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    filled = np.asarray(inpaint.fill(img, mask), dtype=np.int16)
    assert np.abs(filled[16, 16] - (10, 200, 30)).max() <= 6, "the white hole takes the green around it"


def test_an_inpainting_checkpoint_inpaints_and_keeps_the_rest(tmp_path):
    """A 9-channel model gets the masked image as conditioning; the original is pasted back around it."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from fastapi.testclient import TestClient

    from remote.server.app import ServerSettings, create_app
    from remote.server.demo_model import build_demo_pipeline
    from tests.server.conftest import wait_ready

    demo = build_demo_pipeline()
    config = dict(demo.unet.config, in_channels=9)
    torch.manual_seed(0)
    StableDiffusionInpaintPipeline(**{**demo.components, "unet": UNet2DConditionModel.from_config(config)}).save_pretrained(
        tmp_path / "models" / "tiny-inpaint")
    app = create_app(ServerSettings(token="t", models_dir=tmp_path / "models", state_dir=tmp_path / ".orch", device="cpu"))
    img, mask = red_and_mask()
    with TestClient(app) as c:
        wait_ready(c)
        c.headers["Authorization"] = "Bearer t"
        r = c.post("/sdapi/v1/img2img", json={"init_images": [b64_png(img)], "mask": b64_png(mask), "steps": 3, "width": 64,
                                               "height": 64, "denoising_strength": 1.0, "inpaint_full_res": False, "mask_blur": 0})
        assert r.status_code == 200, r.text
        out = px(image_of(r.json()["images"][0]))
        assert np.array_equal(out[:20], px(img)[:20])
        assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-inpaint"
        txt = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
        assert txt.status_code == 422 and "inpainting model" in txt.json()["detail"]


# -- hires fix and upscalers ----------------------------------------------------------------------


def test_hires_fix_upscales_and_runs_a_second_pass(api):
    _, base, (low,) = gen(api, seed=3)
    _, info, images = gen(api, seed=3, enable_hr=True, hr_scale=2, hr_second_pass_steps=3, denoising_strength=0.6,
                          hr_sampler_name="Euler a", hr_prompt="a dog", batch_size=2)
    assert [im.size for im in images] == [(128, 128)] * 2 and (info["width"], info["height"]) == (128, 128)
    text = info["infotexts"][0]
    for part in ("Size: 64x64", "Hires upscale: 2", "Hires steps: 3", "Hires upscaler: Latent", "Hires sampler: Euler a",
                 "Hires prompt: a dog", "Denoising strength: 0.6"):
        assert part in text, (part, text)
    _, by_size, (resized,) = gen(api, enable_hr=True, hr_resize_x=96, hr_resize_y=80, hr_upscaler="Latent (bicubic antialiased)")
    assert resized.size == (96, 80) and "Hires resize: 96x80" in by_size["infotexts"][0]
    _, lanczos, (lz,) = gen(api, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos")
    assert lz.size == (96, 96) and "Hires upscaler: Lanczos" in lanczos["infotexts"][0]
    bad = gen(api, expect=422, enable_hr=True, hr_upscaler="Nope")
    assert "hr_upscaler" in bad["detail"] and "Lanczos" in bad["detail"]
    too_big = gen(api, expect=422, enable_hr=True, hr_scale=16)
    assert "hr_scale" in too_big["detail"]


def test_upscalers_list_what_is_there_and_a_model_upscaler_runs(api):
    pytest.importorskip("spandrel", reason="orch[upscalers] is not installed (spandrel needs torchvision, which has no build "
                                           "beside this machine's CPU torch)")
    names = [u["name"] for u in api.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "4x-tiny" in names
    tiny = next(u for u in api.get("/sdapi/v1/upscalers").json() if u["name"] == "4x-tiny")
    assert tiny["scale"] == 4 and tiny["model_path"].endswith("ESRGAN/4x-tiny.pth")
    assert [m["name"] for m in api.get("/sdapi/v1/latent-upscale-modes").json()][:2] == ["Latent", "Latent (antialiased)"]
    src = Image.new("RGB", (24, 16), (10, 120, 240))
    r = api.post("/sdapi/v1/extra-single-image", json={"image": b64_png(src), "upscaler_1": "4x-tiny", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    assert image_of(r.json()["image"]).size == (48, 32) and "4x-tiny" in r.json()["html_info"]
    batch = api.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64_png(src), "name": "a"}] * 2,
                                                           "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 40,
                                                           "upscaling_resize_h": 40, "upscaling_crop": True})
    assert batch.status_code == 200 and [image_of(b).size for b in batch.json()["images"]] == [(40, 40)] * 2
    _, info, (hr,) = gen(api, enable_hr=True, hr_scale=2, hr_upscaler="4x-tiny")
    assert hr.size == (128, 128) and "Hires upscaler: 4x-tiny" in info["infotexts"][0]
    unknown = api.post("/sdapi/v1/extra-single-image", json={"image": b64_png(src), "upscaler_1": "ESRGAN_4x"})
    assert unknown.status_code == 422 and "4x-tiny" in unknown.json()["detail"]


# -- samplers, schedules, seeds -------------------------------------------------------------------


def test_every_a1111_sampler_runs_or_names_the_nearest(api):
    listed = api.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in listed]
    a1111 = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "Euler", "LMS",
             "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"]
    absent = {"DPM adaptive": "DPM fast", "Restart": "Heun", "DDIM CFG++": "DDIM"}
    assert set(names) == set(a1111) - set(absent)
    assert next(s for s in listed if s["name"] == "DPM++ 2M")["options"] == {"scheduler": "karras"}
    for name in names:
        _, info, images = gen(api, sampler_name=name, steps=3)
        assert info["sampler_name"] == name and len(images) == 1
    for name, nearest in absent.items():
        detail = gen(api, expect=422, sampler_name=name)["detail"]
        assert name in detail and repr(nearest) in detail


def test_every_a1111_schedule_type_and_unknown_ones_fall_back_to_automatic(api):
    labels = [s["label"] for s in api.get("/sdapi/v1/schedulers").json()]
    assert labels == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                      "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
    images = {}
    for label in labels[1:]:
        _, info, (image,) = gen(api, sampler_name="Euler", scheduler=label, steps=4)
        assert info["scheduler"] == label and f"Schedule type: {label}" in info["infotexts"][0]
        images[label] = px(image)
    assert np.abs(images["Karras"] - images["Exponential"]).mean() > 0.5
    _, info, _ = gen(api, sampler_name="DPM++ 2M", scheduler="sgm_uniform")  # A1111's ids work too
    assert info["scheduler"] == "SGM Uniform"
    _, info, _ = gen(api, sampler_name="DPM++ 2M", scheduler="Wavy")
    assert info["scheduler"] == "Karras", "Automatic: DPM++ 2M's own schedule"
    assert any("Wavy" in w for w in info["warnings"])
    _, info, _ = gen(api, sampler_name="DPM++ 2M Karras")  # the old folded names
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")


def test_schedule_sigmas_follow_a1111():
    from remote.server import samplers
    from remote.server.demo_model import build_demo_pipeline

    config = dict(build_demo_pipeline().scheduler.config)
    s = samplers.make_scheduler(config, samplers.resolve("Euler", "Align Your Steps")[0], "Align Your Steps")
    s.set_timesteps(11)  # the preset's own length: its sigmas as published, then 0 (other lengths: log-linear in between)
    assert np.allclose(s.sigmas.numpy()[:-1], samplers.AYS_SD15, rtol=1e-4) and s.sigmas[-1] == 0
    table = samplers.model_sigmas(s.alphas_cumprod)
    k = samplers.make_scheduler(config, samplers.resolve("Euler a", "Karras")[0], "Karras")
    k.set_timesteps(5)
    assert abs(float(k.sigmas[0]) - table[-1]) < 1e-3 and abs(float(k.sigmas[-2]) - table[0]) < 1e-4, "sigma_max .. sigma_min"


def test_variation_seeds_and_seed_resize(api):
    _, _, (plain,) = gen(api, sampler_name="Euler", seed=11)
    _, info, (half, _) = gen(api, sampler_name="Euler", seed=11, subseed=12, subseed_strength=0.5, batch_size=2)
    assert info["all_seeds"] == [11, 11] and info["all_subseeds"] == [12, 13] and info["subseed_strength"] == 0.5
    assert "Variation seed: 12, Variation seed strength: 0.5" in info["infotexts"][0]
    assert np.abs(px(half) - px(plain)).mean() > 1
    _, _, (full,) = gen(api, sampler_name="Euler", seed=11, subseed=12, subseed_strength=1.0)
    _, _, (other,) = gen(api, sampler_name="Euler", seed=12)
    assert np.abs(px(full) - px(other)).mean() < 1.0, "strength 1: the variation seed's own picture"
    _, info, (resized,) = gen(api, sampler_name="Euler", seed=11, seed_resize_from_w=32, seed_resize_from_h=32)
    assert "Seed resize from: 32x32" in info["infotexts"][0] and np.abs(px(resized) - px(plain)).mean() > 1


def test_clip_skip_per_request_and_through_options(api):
    _, info1, (one,) = gen(api, seed=5)
    _, info2, (two,) = gen(api, seed=5, override_settings={"CLIP_stop_at_last_layers": 2})
    assert info1["clip_skip"] == 1 and info2["clip_skip"] == 2 and "Clip skip: 2" in info2["infotexts"][0]
    assert np.abs(px(one) - px(two)).mean() > 0.5
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    try:
        _, info3, (three,) = gen(api, seed=5)
        assert info3["clip_skip"] == 2 and np.array_equal(px(three), px(two))
    finally:
        api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    assert np.array_equal(px(gen(api, seed=5)[2][0]), px(one)), "back to the last layer, the same image"


def test_tiling_pads_circularly_for_that_request_only(api):
    _, _, (plain,) = gen(api, seed=9)
    _, info, (tiled,) = gen(api, seed=9, tiling=True)
    assert "Tiling: True" in info["infotexts"][0] and np.abs(px(plain) - px(tiled)).mean() > 0.5
    assert np.array_equal(px(gen(api, seed=9)[2][0]), px(plain)), "the next request pads with zeros again"


# -- what orch does not do, it says ---------------------------------------------------------------


def test_what_orch_does_not_do_is_a_warning_or_a1111s_error(api):
    _, info, images = gen(api, restore_faces=True, styles=["cinematic"], s_churn=0.5, refiner_checkpoint="xl-refiner",
                          some_field_from_a_newer_client=1, override_settings={"sd_vae": "Automatic", "emphasis": "No norm"})
    warnings = " | ".join(info["warnings"])
    for word in ("restore_faces", "styles", "s_churn", "refiner_checkpoint", "some_field_from_a_newer_client", "emphasis"):
        assert word in warnings, (word, warnings)
    assert len(images) == 1
    assert gen(api, expect=422, script_name="X/Y/Z plot")["detail"].startswith("script_name: Script 'X/Y/Z plot' not found")
    assert "always on script controlnet not found" in gen(api, expect=422, alwayson_scripts={"controlnet": {"args": []}})["detail"]
    _, info, _ = gen(api, prompt="a cat <lora:missing:0.5>")
    assert any("unknown LoRA 'missing'" in w for w in info["warnings"])


def test_limits_are_the_instances_not_fixed_numbers(api):
    _, info, (odd,) = gen(api, width=100, height=72)
    assert odd.size == (96, 72) and (info["width"], info["height"]) == (96, 72), "rounded down to multiples of 8, as A1111"
    _, info, images = gen(api, steps=151, cfg_scale=31, batch_size=17, width=64, height=64, sampler_name="Euler")
    assert len(images) == 17 and info["steps"] == 151
    huge = gen(api, expect=422, width=512, height=512, batch_size=10**7)
    assert "GiB" in huge["detail"] and "batch_size" in huge["detail"]
    assert "larger than this server allows" in gen(api, expect=422, width=1024)["detail"]
    entry = api.get("/sdapi/v1/sd-models").json()[0]
    _, info, _ = gen(api, override_settings={"sd_model_checkpoint": entry["hash"]})
    assert info["sd_model_hash"] == entry["hash"], "a checkpoint named by its short hash"


def test_infotext_fills_in_what_the_request_leaves_out(api):
    text = "a fox in snow\nNegative prompt: blur\nSteps: 3, Sampler: Heun, CFG scale: 4.5, Seed: 321, Size: 72x64"
    r = api.post("/sdapi/v1/txt2img", json={"infotext": text, "prompt": "the request's own prompt wins", "steps": 2})
    info = json.loads(r.json()["info"])
    assert info["steps"] == 2 and info["sampler_name"] == "Heun" and info["seed"] == 321 and info["cfg_scale"] == 4.5
    assert image_of(r.json()["images"][0]).size == (72, 64) and info["prompt"] == "the request's own prompt wins"
    assert info["negative_prompt"] == "blur"


# -- options, png-info, progress ------------------------------------------------------------------


def test_options_are_a1111s_with_its_defaults_and_are_stored(api):
    opts = api.get("/sdapi/v1/options").json()
    assert len(opts) > 250
    for key, value in {"send_seed": True, "samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0,
                       "show_progress_every_n_steps": 10, "live_previews_enable": True, "face_restoration": False}.items():
        assert opts[key] == value, key
    assert api.post("/sdapi/v1/options", json={"send_seed": False}).status_code == 200
    assert api.get("/sdapi/v1/options").json()["send_seed"] is False
    api.post("/sdapi/v1/options", json={"send_seed": True})
    bad = api.post("/sdapi/v1/options", json={"send_seed": "yes"})
    assert bad.status_code == 422 and "send_seed" in bad.json()["detail"]
    flags = api.get("/sdapi/v1/cmd-flags").json()
    assert len(flags) > 30 and flags["api"] is True


def test_samples_format_jpeg_and_png_info_reads_it_back(api):
    assert api.post("/sdapi/v1/options", json={"samples_format": "jpg"}).status_code == 200
    try:
        data, info, (image,) = gen(api, seed=42)
        assert image.format == "JPEG"
        parsed = api.post("/sdapi/v1/png-info", json={"image": data["images"][0]}).json()
        assert parsed["info"] == info["infotexts"][0] and parsed["parameters"]["Seed"] == 42
    finally:
        api.post("/sdapi/v1/options", json={"samples_format": "png"})


def test_png_info_gives_sizes_and_numbers_as_a1111(api):
    data, info, _ = gen(api, seed=77, width=72, height=64, cfg_scale=6.5)
    params = api.post("/sdapi/v1/png-info", json={"image": data["images"][0]}).json()["parameters"]
    assert params["Seed"] == 77 and params["Steps"] == 2 and params["CFG scale"] == 6.5
    assert (params["Size-1"], params["Size-2"]) == (72, 64) and params["Clip skip"] == 1
    assert info["sd_vae_name"] is None and "sd_vae_hash" in info


def test_vae_name_and_hash_in_info(tmp_path):
    import torch
    from fastapi.testclient import TestClient

    from remote.server.app import ServerSettings, create_app
    from remote.server.demo_model import build_demo_pipeline
    from tests.helpers.model_files import write_ldm_vae
    from tests.server.conftest import wait_ready

    vae = build_demo_pipeline(seed=3).vae
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.1)
    write_ldm_vae(vae, tmp_path / "models" / "VAE" / "alt.safetensors")
    app = create_app(ServerSettings(token="t", models_dir=tmp_path / "models", state_dir=tmp_path / ".orch", device="cpu"))
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/sdapi/v1/txt2img", headers={"Authorization": "Bearer t"},
                   json={"prompt": "x", "steps": 1, "width": 64, "height": 64, "override_settings": {"sd_vae": "alt.safetensors"}})
        info = json.loads(r.json()["info"])
        assert info["sd_vae_name"] == "alt.safetensors" and len(info["sd_vae_hash"]) == 8


def test_unload_and_reload_checkpoint_and_interrogate(api):
    assert api.post("/sdapi/v1/unload-checkpoint").status_code == 200
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] is None
    assert api.post("/sdapi/v1/reload-checkpoint").status_code == 200
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("orch-demo-tiny-sd15 [")
    r = api.post("/sdapi/v1/interrogate", json={"image": b64_png(Image.new("RGB", (8, 8))), "model": "clip"})
    assert r.status_code == 404 and "Model not found" in r.json()["detail"]


def test_progress_shows_the_state_and_a_live_preview(api):
    import threading
    import time

    api.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 2})
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", api.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "steps": 60, "width": 128, "height": 128, "seed": 1})))
    t.start()
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and t.is_alive():
        p = api.get("/sdapi/v1/progress").json()
        assert "stopping_generation" in p["state"]
        if p["current_image"]:
            seen = image_of(p["current_image"])
            break
        time.sleep(0.05)
    api.post("/sdapi/v1/interrupt")
    t.join(120)
    api.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 10})
    assert seen is not None and seen.size == (16, 16), "the cheap preview, at latent size"
    assert done["r"].status_code == 200


def test_the_openapi_document_tells_the_truth(api):
    spec = api.get("/openapi.json").json()
    t2i = spec["paths"]["/sdapi/v1/txt2img"]["post"]
    assert t2i["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    fields = spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert fields["width"]["maximum"] == 512 and fields["width"]["minimum"] == 64 and "multiple of 8" in fields["width"]["description"]
    accepted = fields["sampler_name"]["anyOf"][0]["enum"]
    assert accepted[:2] == ["DPM++ 2M", "DPM++ SDE"] and "DPM++ 2M Karras" in accepted and "k_euler_a" in accepted
    i2i = spec["components"]["schemas"]["Img2ImgRequest"]["properties"]
    assert (i2i["inpainting_fill"]["minimum"], i2i["inpainting_fill"]["maximum"]) == (0, 3)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_img2img_resize_modes_several_init_images_and_include_init_images(api):
    a, b = Image.new("RGB", (48, 40), (200, 10, 10)), Image.new("RGB", (40, 48), (10, 10, 200))
    for mode in range(4):
        data, info, images = gen(api, "/sdapi/v1/img2img", init_images=[b64_png(a), b64_png(b)], batch_size=2, resize_mode=mode,
                                 denoising_strength=0.5, steps=2)
        assert [im.size for im in images] == [(64, 64)] * 2
        assert ("Resize mode" in info["infotexts"][0]) == (mode > 0)
        assert "init_images" not in data["parameters"], "A1111 leaves them out unless include_init_images"
    data, _, _ = gen(api, "/sdapi/v1/img2img", init_images=[b64_png(a)], include_init_images=True)
    assert data["parameters"]["init_images"] == [b64_png(a)]
    too_many = gen(api, "/sdapi/v1/img2img", expect=422, init_images=[b64_png(a)] * 3, batch_size=2)
    assert "init_images" in too_many["detail"]
