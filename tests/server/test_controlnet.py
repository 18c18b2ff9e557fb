"""ControlNet through the extension's API (issue 19), on the demo model with tiny random-weight ControlNets.

Every model is built here (nothing downloaded); one is a diffusers folder, one a single file in
the original layout, loaded with the Hub switched off.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import TOKEN, b64_png, image_of, wait_ready

pytestmark = pytest.mark.slow


def shapes_image(size: int = 64):
    """A picture with edges: a bright square and a bar on a dark ground."""
    img = Image.new("RGB", (size, size), (20, 20, 30))
    img.paste((230, 220, 200), (size // 4, size // 4, size * 3 // 4, size * 3 // 4))
    img.paste((40, 200, 90), (0, size - 12, size, size - 6))
    return img


@pytest.fixture(scope="module")
def cn_home(tmp_path_factory):
    from remote.server.demo_model import build_demo_pipeline, ensure_demo_model
    from tests.helpers.model_files import build_tiny_controlnet, write_ldm_controlnet

    home = tmp_path_factory.mktemp("controlnet")
    models = home / "models"
    ensure_demo_model(models)
    unet = build_demo_pipeline().unet
    build_tiny_controlnet(unet, seed=1).save_pretrained(models / "ControlNet" / "tiny_canny")
    write_ldm_controlnet(build_tiny_controlnet(unet, seed=2), models / "ControlNet" / "tiny_depth_sd15.safetensors")
    return home


@pytest.fixture(scope="module")
def cn(cn_home):
    import os

    from fastapi.testclient import TestClient

    from remote.server.app import ServerSettings, create_app

    os.environ["HF_HUB_OFFLINE"] = "1"  # a config fetch would fail the test
    app = create_app(ServerSettings(token=TOKEN, models_dir=cn_home / "models", state_dir=cn_home / ".orch", device="cpu",
                                    max_side=512))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client


def unit(**kw):
    return {"enabled": True, "module": "canny", "model": "tiny_canny", "image": b64_png(shapes_image()), "processor_res": 64,
            "threshold_a": 100, "threshold_b": 200, **kw}


def gen(cn, path="/sdapi/v1/txt2img", expect=200, units=None, **body):
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler", **body}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    r = cn.post(path, json=body)
    assert r.status_code == expect, r.text
    if expect != 200:
        return r.json()["detail"]
    data = r.json()
    return json.loads(data["info"]), [np.asarray(image_of(b).convert("RGB"), dtype=np.int16) for b in data["images"]]


def canny_map(size: int = 64):
    import cv2

    edges = cv2.Canny(np.asarray(shapes_image(size)), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=2))


def reference(controlnets, images, scales, **kw):
    """diffusers' own ControlNet pipeline on the same weights, scheduler and seed as orch's request."""
    import torch
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline

    from remote.server import samplers
    from remote.server.demo_model import build_demo_pipeline

    base = build_demo_pipeline()
    nets = [ControlNetModel.from_pretrained(p) if p.is_dir() else None for p in controlnets]
    net = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in base.components.items() if k != "image_encoder"}, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.build_scheduler(dict(pipe.scheduler.config), samplers.resolve("Euler")[0], "Uniform", sdxl=False)
    out = pipe("a cat", image=images[0] if len(images) == 1 else images, num_inference_steps=2, width=64, height=64,
               guidance_scale=7.0, generator=[torch.Generator("cpu").manual_seed(7)],
               controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales, **kw).images[0]
    return np.asarray(out, dtype=np.int16)


def test_a_canny_unit_changes_the_image_and_equals_diffusers(cn, cn_home):
    _, (plain,) = gen(cn)
    info, (steered,) = gen(cn, units=[unit()])
    assert np.abs(steered - plain).mean() > 1, "the unit changes the image"
    ref = reference([cn_home / "models" / "ControlNet" / "tiny_canny"], [canny_map()], [1.0])
    assert np.abs(steered - ref).max() <= 1, "orch's ControlNet image is diffusers' own"
    text = info["infotexts"][0]
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in text
    assert ("Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 64, Threshold A: 100.0, Threshold B: 200.0, "
            "Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced\"") in text


def test_two_units_equal_diffusers_multicontrolnet(cn, cn_home):
    folder = cn_home / "models" / "ControlNet" / "tiny_canny"
    _, (two,) = gen(cn, units=[unit(), unit(module="invert", weight=0.5)])
    inverted = Image.fromarray(255 - np.asarray(shapes_image()))
    ref = reference([folder, folder], [canny_map(), inverted], [1.0, 0.5])
    assert np.abs(two - ref).max() <= 1
    _, (one,) = gen(cn, units=[unit()])
    assert np.abs(two - one).mean() > 0.5


def test_guidance_window_is_honoured_and_an_empty_one_is_no_unit(cn):
    _, (plain,) = gen(cn, steps=4)
    info, (empty,) = gen(cn, steps=4, units=[unit(guidance_start=0.5, guidance_end=0.5)])
    assert np.array_equal(empty, plain) and any("acts on no step" in w for w in info["warnings"])
    _, (full,) = gen(cn, steps=4, units=[unit()])
    _, (late,) = gen(cn, steps=4, units=[unit(guidance_start=0.5, guidance_end=1.0)])
    assert np.abs(late - plain).mean() > 0.2 and np.abs(late - full).mean() > 0.2
    assert "guidance_start (0.8) and guidance_end (0.2)" in gen(cn, expect=422, units=[unit(guidance_start=0.8, guidance_end=0.2)])


def test_control_modes_by_name_and_number(cn, cn_home):
    import cv2  # noqa: F401

    _, (balanced,) = gen(cn, units=[unit(control_mode="Balanced")])
    _, (zero,) = gen(cn, units=[unit(control_mode=0)])
    assert np.array_equal(balanced, zero)
    _, (prompt,) = gen(cn, units=[unit(control_mode="My prompt is more important")])
    _, (one,) = gen(cn, units=[unit(control_mode=1)])
    assert np.array_equal(prompt, one) and np.abs(prompt - balanced).mean() > 0.2
    info, (control,) = gen(cn, units=[unit(control_mode=2)])
    ref = reference([cn_home / "models" / "ControlNet" / "tiny_canny"], [canny_map()], [1.0], guess_mode=True)
    assert np.abs(control - ref).max() <= 1, "ControlNet is more important = diffusers' guess_mode"
    assert any("guess_mode" in w for w in info["warnings"])
    assert "control_mode" in gen(cn, expect=422, units=[unit(control_mode="Loud")])


def test_webuiapi_controlnetunit_payload_works_unchanged(cn):
    webuiapi = pytest.importorskip("webuiapi")
    u = webuiapi.ControlNetUnit(image=shapes_image(), module="canny", model="tiny_canny", processor_res=64, threshold_a=100,
                                threshold_b=200)
    payload = u.to_dict()
    assert payload["resize_mode"] == "Resize and Fill" and payload["mask"] is None and payload["enabled"] is True
    r = cn.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7,
                                            "alwayson_scripts": {"ControlNet": {"args": [payload]}}})
    assert r.status_code == 200, r.text
    assert "Resize Mode: Resize and Fill" in json.loads(r.json()["info"])["infotexts"][0]


def test_disabled_and_unset_units_are_skipped(cn):
    _, (plain,) = gen(cn)
    _, (off,) = gen(cn, units=[unit(enabled=False)])
    no_flag = unit()
    del no_flag["enabled"]
    info, (unset,) = gen(cn, units=[no_flag, None], extra_field_of_a_client=1)
    assert np.array_equal(off, plain) and np.array_equal(unset, plain)
    assert any("`enabled` not given" in w for w in info["warnings"])
    _, (ignored,) = gen(cn, units=[unit(some_future_field=3, hr_option="Both", low_vram=True)])
    assert ignored.shape == (64, 64, 3)


def test_img2img_and_inpaint_with_a_unit(cn):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"init_images": [b64_png(init)], "denoising_strength": 0.8, "steps": 3}
    _, (plain,) = gen(cn, "/sdapi/v1/img2img", **body)
    _, (steered,) = gen(cn, "/sdapi/v1/img2img", units=[unit()], **body)
    assert np.abs(steered - plain).mean() > 0.5
    info, (painted,) = gen(cn, "/sdapi/v1/img2img", units=[unit(module="inpaint_only", image=None)], mask=b64_png(mask),
                           inpaint_full_res=False, mask_blur=0, **body)
    original = np.asarray(init, dtype=np.int16)
    assert np.array_equal(painted[:12], original[:12]), "outside the mask: the original"
    assert np.abs(painted[24:40, 24:40] - original[24:40, 24:40]).mean() > 5
    assert 'ControlNet 0: "Module: inpaint_only' in info["infotexts"][0]


def test_detect_returns_cv2_canny_and_other_maps(cn):
    import cv2

    img = shapes_image()
    r = cn.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64_png(img)],
                                            "controlnet_processor_res": 64, "controlnet_threshold_a": 100,
                                            "controlnet_threshold_b": 200})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "Success"
    got = np.asarray(image_of(r.json()["images"][0]).convert("L"))
    assert np.array_equal(got, cv2.Canny(np.asarray(img), 100, 200))
    r = cn.post("/controlnet/detect", json={"controlnet_module": "invert (from white bg & black line)",
                                            "controlnet_input_images": ["data:image/png;base64," + b64_png(img)]})
    assert np.array_equal(np.asarray(image_of(r.json()["images"][0]).convert("RGB")), 255 - np.asarray(img))


def test_missing_things_are_a_422_naming_them(cn, cn_home):
    detail = gen(cn, expect=422, units=[unit(model="control_v11p_sd15_openpose")])
    assert "control_v11p_sd15_openpose" in detail and "tiny_canny [" in detail
    detail = gen(cn, expect=422, units=[unit(module="sharpen")])
    assert "'sharpen'" in detail and "canny" in detail and "scribble_xdog" in detail
    r = cn.post("/controlnet/detect", json={"controlnet_module": "openpose", "controlnet_input_images": [b64_png(shapes_image())]})
    assert r.status_code == 422 and "body_pose_model.pth" in r.json()["detail"]
    annotators = cn_home / "models" / "Annotators"
    annotators.mkdir(parents=True, exist_ok=True)
    (annotators / "ControlNetHED.pth").write_bytes(b"x")
    detail = gen(cn, expect=422, units=[unit(module="softedge_hed")])
    import importlib.util

    if importlib.util.find_spec("controlnet_aux") is None:
        assert "orch[annotators]" in detail
    detail = gen(cn, expect=422, units=[unit(module="seg_ofade20k")])
    assert "no implementation on orch" in detail


def test_single_file_controlnet_loads_offline_and_matches_its_folder_form(cn, cn_home, tmp_path):
    """The .safetensors in the original layout loads through the derived config, with the same weights."""
    import torch

    from remote.server.controlnet import catalog
    from remote.server.demo_model import build_demo_pipeline
    from tests.helpers.model_files import build_tiny_controlnet

    unet = build_demo_pipeline().unet
    path = cn_home / "models" / "ControlNet" / "tiny_depth_sd15.safetensors"
    net = catalog.load(catalog.ControlModel("tiny_depth_sd15", path), unet, tmp_path, torch.float32, "cpu")
    expected = build_tiny_controlnet(unet, seed=2).state_dict()
    got = net.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    info, (image,) = gen(cn, units=[unit(model="tiny_depth_sd15", module="none", image=b64_png(canny_map()))])
    assert "Model: tiny_depth_sd15 [" in info["infotexts"][0]


def test_routes_have_the_extensions_shapes(cn):
    assert cn.get("/controlnet/version").json() == {"version": 3}
    models = cn.get("/controlnet/model_list", params={"update": True}).json()["model_list"]
    assert [m.split(" [")[0] for m in models] == ["tiny_canny", "tiny_depth_sd15"]
    mods = cn.get("/controlnet/module_list").json()
    assert mods["module_list"][0] == "none" and {"canny", "invert", "depth", "openpose"} <= set(mods["module_list"])
    assert mods["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]
    aliases = cn.get("/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
    assert "depth_midas" in aliases and "invert (from white bg & black line)" in aliases
    assert cn.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    assert cn.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    assert cn.get("/controlnet/version", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_sdxl_shaped_controlnet_equals_diffusers(tmp_path, monkeypatch):
    """An SDXL-shaped model with an SDXL-shaped ControlNet: the ModelManager's image is diffusers' own."""
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline

    from remote.server import samplers
    from remote.server.controlnet import units as cn_units
    from remote.server.models import GenerationRequest, ModelManager
    from tests.helpers.model_files import build_tiny_controlnet, build_tiny_sdxl

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sdxl = build_tiny_sdxl()
    sdxl.save_pretrained(tmp_path / "models" / "tiny-xl")
    build_tiny_controlnet(sdxl.unet, seed=3).save_pretrained(tmp_path / "models" / "ControlNet" / "xl_canny")
    manager = ModelManager(tmp_path / "models", device="cpu")
    warnings: list[str] = []
    units = cn_units.read_units([unit(model="xl_canny")], manager.control, manager.annotators_dir, 64, 64, warnings)
    result = manager.generate(GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=5, sampler_name="Euler",
                                                control=units))
    got = np.asarray(result.images[0], dtype=np.int16)
    net = build_tiny_controlnet(sdxl.unet, seed=3)
    pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in build_tiny_sdxl().components.items()
                                                  if k not in ("image_encoder", "feature_extractor")}, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = samplers.build_scheduler(dict(pipe.scheduler.config), samplers.resolve("Euler")[0], "Uniform", sdxl=True)
    ref = pipe("a cat", image=canny_map(), num_inference_steps=2, width=64, height=64, guidance_scale=7.0,
               generator=[torch.Generator("cpu").manual_seed(5)]).images[0]
    assert np.abs(got - np.asarray(ref, dtype=np.int16)).max() <= 1


def test_requests_with_other_control_images_share_a_batch_and_keep_their_own(cn_home):
    """The batch key ignores the maps: two requests, one pipeline call, each image steered by its own map."""
    import dataclasses

    from remote.server.controlnet import units as cn_units
    from remote.server.models import GenerationRequest, ModelManager
    from remote.server.service import GenerationService

    manager = ModelManager(cn_home / "models", device="cpu")
    reqs = []
    for image in (shapes_image(), Image.new("RGB", (64, 64), (20, 20, 30))):  # edges, and none
        units = cn_units.read_units([unit(image=b64_png(image))], manager.control, manager.annotators_dir, 64, 64, [])
        reqs.append(GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=9, sampler_name="Euler", control=units))
    assert GenerationService._batch_key(reqs[0], "txt2img", None) == GenerationService._batch_key(reqs[1], "txt2img", None)
    together = manager.generate_batch(reqs)
    assert together[0].extra["batch_images"] == 2
    for req, result in zip(reqs, together):
        alone = manager.generate(dataclasses.replace(req))
        assert np.abs(np.asarray(alone.images[0], np.int16) - np.asarray(result.images[0], np.int16)).max() <= 1
    # Same seed, so only the maps tell them apart (had the batch used the first request's map for both, they would be equal).
    assert not np.array_equal(np.asarray(together[0].images[0]), np.asarray(together[1].images[0]))


def test_hires_fix_with_a_unit_steers_the_first_pass_and_says_so(cn):
    for upscaler in ("Latent", "Lanczos"):
        info, (image,) = gen(cn, units=[unit()], enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, denoising_strength=0.5)
        assert image.shape == (96, 96, 3)
        assert any("first pass only" in w for w in info["warnings"])


def test_a_controlnet_pipeline_leaves_the_served_weights_as_they_are():
    """diffusers' from_pipe casts every shared component to fp32: the served fp16 model became
    fp32 after the first ControlNet request, and every later request ran 4x slower on the GPU."""
    import torch

    from remote.server import samplers
    from remote.server.demo_model import build_demo_pipeline
    from remote.server.models.residency import LoadedModel
    from remote.server.models.run import pipeline_for
    from tests.helpers.model_files import build_tiny_controlnet

    base = build_demo_pipeline()
    net = build_tiny_controlnet(base.unet, seed=1).to(torch.float16)
    base.unet.to(torch.float16)
    base.text_encoder.to(torch.float16)  # the VAE stays fp32, as an upcast VAE beside an fp16 UNet does
    model = LoadedModel(entry=None, pipeline=base, scheduler_config=dict(base.scheduler.config), device="cpu", load_seconds=0)
    spec = samplers.resolve("Euler")[0]
    for kind in ("txt2img", "img2img", "inpaint"):
        pipe = pipeline_for(model, spec, "Uniform", kind, controlnet=net)
        assert pipe.unet is base.unet and pipe.vae is base.vae and pipe.controlnet is net
        assert pipe.config.requires_safety_checker == base.config.requires_safety_checker
    assert base.unet.dtype == torch.float16 and base.text_encoder.dtype == torch.float16 and net.dtype == torch.float16
    assert base.vae.dtype == torch.float32
