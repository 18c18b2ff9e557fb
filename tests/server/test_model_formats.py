"""What A1111 users bring: single-file checkpoints, VAE overrides, LoRAs in the prompt, several models.

All files are made here from pipelines built locally (nothing is downloaded); loading runs
with the Hub switched off, so any attempt to fetch a config would fail the test.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers.model_files import build_tiny_sdxl, write_kohya_lora, write_ldm_vae
from remote.server import checkpoints, lora
from remote.server.models import GenerationRequest, ModelManager, RequestError

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def req(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 11, **kw})


def peft_reference(pipe, lora_file, weight: float) -> np.ndarray:
    """The oracle for LoRA: diffusers + PEFT load the file as an adapter; the same request as req()."""
    import torch

    from remote.server import samplers

    pipe.set_progress_bar_config(disable=True)
    # The schedule orch runs for Euler (A1111's Uniform: Euler's Automatic).
    pipe.scheduler = samplers.build_scheduler(dict(pipe.scheduler.config), samplers.resolve("Euler")[0], "Uniform",
                                              sdxl=getattr(pipe, "text_encoder_2", None) is not None)
    pipe.load_lora_weights(str(lora_file), adapter_name="reference")
    pipe.set_adapters(["reference"], [weight])
    image = pipe("a cat ", num_inference_steps=2, width=64, height=64, guidance_scale=7.0,
                 generator=[torch.Generator("cpu").manual_seed(11)]).images[0]
    return np.asarray(image, dtype=np.int16)


# -- single-file checkpoints ---------------------------------------------------------------


def test_bundled_configs_are_the_real_architectures(tmp_path):
    """Parameter counts of each bundled config equal the published models' (built on the meta device)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    published = {
        "v1": {"unet": 859_520_964, "text_encoder": 123_060_480},
        "v2": {"unet": 865_910_724, "text_encoder": 340_387_840},
        "xl_base": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    }
    for kind, counts in published.items():
        arch = checkpoints.ARCHITECTURES[kind]
        for sub, expected in {**counts, "vae": 83_653_863}.items():
            config = arch.components[sub]
            with torch.device("meta"):
                if config["_class_name"] == "UNet2DConditionModel":
                    model = UNet2DConditionModel.from_config(config)
                elif config["_class_name"] == "AutoencoderKL":
                    model = AutoencoderKL.from_config(config)
                else:
                    cls = CLIPTextModelWithProjection if "Projection" in config["_class_name"] else CLIPTextModel
                    model = cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
            assert sum(p.numel() for p in model.parameters()) == expected, (kind, sub)
    folder = checkpoints.config_folder(checkpoints.ARCHITECTURES["xl_base"], tmp_path)
    # CLIP's real vocabulary: the ids every SD checkpoint was trained with.
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tok("a photo of an astronaut riding a horse").input_ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert len(tok) == 49408
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    assert tok2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]  # pads with "!"


def _fake_checkpoint(path, shapes: dict[str, tuple]):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


def test_architecture_detection_and_clear_errors(tmp_path):
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    sd1 = _fake_checkpoint(tmp_path / "a.safetensors", {unet_in: (1, 4, 1, 1)})
    inpaint = _fake_checkpoint(tmp_path / "b.safetensors", {unet_in: (1, 9, 1, 1)})
    sd2 = _fake_checkpoint(tmp_path / "c.safetensors", {
        unet_in: (1, 4, 1, 1), "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (1, 1024)})
    xl = _fake_checkpoint(tmp_path / "d.safetensors", {
        unet_in: (1, 4, 1, 1), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1,)})
    assert [checkpoints.detect(p).name for p in (sd1, inpaint, sd2, xl)] == ["sd1", "sd1-inpainting", "sd2-768-v", "sdxl"]
    a_lora = _fake_checkpoint(tmp_path / "e.safetensors", {"lora_unet_x.lora_down.weight": (1, 1)})
    with pytest.raises(checkpoints.UnsupportedCheckpoint, match="models/Lora"):
        checkpoints.detect(a_lora)
    junk = tmp_path / "f.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.UnsupportedCheckpoint, match="not a readable checkpoint"):
        checkpoints.detect(junk)


def test_a1111_single_file_sd15_loads_offline_bit_exact(tmp_path):
    """A full-size SD1.5 in A1111's file layout: found, detected, loaded with the bundled config, same weights."""
    import torch

    from remote.server.architectures import build_random_pipeline
    from remote.server.ldm_names import pipeline_to_ldm

    source = build_random_pipeline("sd15", dtype=torch.float16)
    models = tmp_path / "models"
    target = models / "Stable-diffusion" / "my-finetune.safetensors"
    target.parent.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(pipeline_to_ldm(source), str(target))
    (models / "Lora").mkdir()
    write_kohya_lora(source, models / "Lora" / "not-a-model.safetensors", rank=1)  # must not be listed as a checkpoint

    manager = ModelManager(models, device="cpu")
    assert [e.name for e in manager.list_models()] == ["my-finetune.safetensors"]
    entry = manager.find("my-finetune.safetensors [whatever]")
    assert entry.model_name == "my-finetune" and len(entry.short_hash) == 8
    loaded = manager.load("my-finetune")
    assert loaded.architecture.name == "sd1"
    for component in ("unet", "vae", "text_encoder"):
        want = getattr(source, component).state_dict()
        got = getattr(loaded.pipeline, component).state_dict()
        assert set(want) <= set(got), component
        for key, value in want.items():
            assert torch.equal(value.float(), got[key].float().reshape(value.shape)), f"{component}.{key}"
    assert loaded.pipeline.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]
    result = manager.generate(req(steps=1))
    assert result.images[0].size == (64, 64) and "Model: my-finetune," in result.infotexts[0]


# -- VAE override, LoRA, several models (the tiny demo model) -------------------------------


@pytest.fixture
def demo_models(tmp_path):
    """models/ with the demo model, a second copy of it, a LoRA and a VAE made from it."""
    import torch

    from remote.server.demo_model import build_demo_pipeline, ensure_demo_model

    models = tmp_path / "models"
    demo = ensure_demo_model(models)
    shutil.copytree(demo, models / "second-model")
    pipe = build_demo_pipeline()
    write_kohya_lora(pipe, models / "Lora" / "ink.safetensors")
    other_vae = build_demo_pipeline(seed=5).vae  # same shape, other weights
    with torch.no_grad():
        for p in other_vae.parameters():
            p.mul_(1.5)
    write_ldm_vae(other_vae, models / "VAE" / "alt.safetensors")
    return models, other_vae


def test_vae_override_is_used_and_automatic_restores_the_models_own(demo_models):
    models, other_vae = demo_models
    manager = ModelManager(models, device="cpu")
    base = pixels(manager.generate(req()))
    with_alt = manager.generate(req(vae="alt.safetensors"))
    assert "VAE: alt.safetensors" in with_alt.infotexts[0]
    assert np.abs(pixels(with_alt) - base).max() > 10
    # The oracle: the same pipeline with that VAE set directly.
    from remote.server.demo_model import build_demo_pipeline

    oracle = build_demo_pipeline()
    oracle.vae = other_vae
    oracle_manager = ModelManager(models, device="cpu")
    loaded = oracle_manager.load()
    loaded.pipeline.vae = other_vae
    assert np.abs(pixels(oracle_manager.generate(req())) - pixels(with_alt)).max() <= 1
    assert np.array_equal(pixels(manager.generate(req(vae="Automatic"))), base)
    assert np.array_equal(pixels(manager.generate(req(vae="None"))), base)
    with pytest.raises(RequestError, match=r"sd_vae: unknown VAE 'nope'.*alt\.safetensors"):
        manager.generate(req(vae="nope"))


def test_lora_in_the_prompt_matches_peft_and_is_undone_exactly(demo_models):
    models, _ = demo_models
    manager = ModelManager(models, device="cpu")
    base = pixels(manager.generate(req()))
    prompt = "a cat <lora:ink:0.7>"
    clean, loras = lora.parse_prompt(prompt)
    assert clean == "a cat " and loras == (("ink", 0.7),)
    with_lora = manager.generate(req(prompt=prompt, loras=loras))
    assert 'Lora weights: "ink: 0.7"' in with_lora.infotexts[0] and with_lora.infotexts[0].startswith(prompt)
    # The oracle: diffusers + PEFT loading the same file as an adapter at weight 0.7.
    from remote.server.demo_model import build_demo_pipeline

    expected = peft_reference(build_demo_pipeline(), models / "Lora" / "ink.safetensors", 0.7)
    assert np.abs(expected - pixels(with_lora)).max() <= 2
    assert np.abs(pixels(with_lora) - base).max() > 10
    # Back to the base model bit for bit, and a weight of 0 is no LoRA.
    assert np.array_equal(pixels(manager.generate(req())), base)
    assert lora.parse_prompt("a cat <lora:ink:0>")[1] == ()
    # A file replaced under the same name is read again, not served from the first read.
    write_kohya_lora(build_demo_pipeline(), models / "Lora" / "ink.safetensors", seed=7)
    replaced = pixels(manager.generate(req(prompt=prompt, loras=loras)))
    assert np.abs(replaced - pixels(with_lora)).max() > 10


def test_sdxl_lora_with_kohya_ldm_names_matches_peft(tmp_path):
    """SDXL LoRAs (most of what users have) name UNet layers as the original code did: input_blocks_4_1_..."""
    models = tmp_path / "models"
    build_tiny_sdxl().save_pretrained(models / "tiny-xl")
    write_kohya_lora(build_tiny_sdxl(), models / "Lora" / "xl-style.safetensors", seed=2)
    manager = ModelManager(models, device="cpu")
    base = pixels(manager.generate(req()))
    ours = pixels(manager.generate(req(prompt="a cat <lora:xl-style:0.8>", loras=(("xl-style", 0.8),))))
    expected = peft_reference(build_tiny_sdxl(), models / "Lora" / "xl-style.safetensors", 0.8)
    assert np.abs(expected - ours).max() <= 2
    assert np.abs(ours - base).max() > 10
    # Every layer of the file found its place: UNet by LDM name, both text encoders.
    (layers,) = manager.current.lora.cache.values()
    assert {comp for comp, *_ in layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert np.array_equal(pixels(manager.generate(req())), base)


def test_lora_merges_into_fused_qkv_projections(demo_models):
    """On GPUs the attention projections are fused: the update must land in the fused weights."""
    models, _ = demo_models
    plain = ModelManager(models, device="cpu")
    expected = pixels(plain.generate(req(prompt="a cat <lora:ink:1>", loras=(("ink", 1.0),))))
    fused = ModelManager(models, device="cpu")
    fused.load().pipeline.fuse_qkv_projections()
    got = fused.generate(req(prompt="a cat <lora:ink:1>", loras=(("ink", 1.0),)))
    assert np.abs(pixels(got) - expected).max() <= 1
    base = pixels(plain.generate(req()))
    assert np.abs(pixels(fused.generate(req())) - base).max() <= 1


def test_bad_lora_tags_are_clear_errors(demo_models):
    models, _ = demo_models
    manager = ModelManager(models, device="cpu")
    with pytest.raises(lora.LoraError, match=r"unknown LoRA 'nope'; LoRAs on this instance: ink"):
        manager.loras.find("nope")
    with pytest.raises(lora.LoraError, match=r"<lora:ink:heavy>.*not a number"):
        lora.parse_prompt("x <lora:ink:heavy>")
    (models / "Lora" / "zz-broken.safetensors").write_bytes(b"\x00" * 16)
    base = pixels(manager.generate(req()))
    with pytest.raises(RequestError, match="zz-broken.safetensors: not a readable LoRA file"):
        manager.generate(req(loras=(("ink", 1.0), ("zz-broken", 1.0))))  # ink merges first, then the broken one fails
    # The failed request left nothing merged.
    assert manager.current.lora.applied == ()
    assert np.array_equal(pixels(manager.generate(req())), base)


def test_a_lora_at_the_top_of_the_models_folder_is_not_taken_for_a_model(demo_models):
    from remote.server.demo_model import build_demo_pipeline

    models, _ = demo_models
    write_kohya_lora(build_demo_pipeline(), models / "aaa-first-by-name.safetensors")
    manager = ModelManager(models, device="cpu")
    assert "aaa-first-by-name.safetensors" not in [e.name for e in manager.list_models()]
    assert manager.default_entry().name == "second-model"


def test_several_models_stay_resident_up_to_the_limit(demo_models):
    models, _ = demo_models
    manager = ModelManager(models, device="cpu", max_resident=2)
    first = manager.load("orch-demo-tiny-sd15")
    second = manager.load("second-model")
    assert manager.load("orch-demo-tiny-sd15").pipeline is first.pipeline  # switched back without loading
    assert [m.entry.name for m in manager.resident] == ["second-model", "orch-demo-tiny-sd15"]
    manager.max_resident = 1  # A1111's sd_checkpoints_limit, lowered: the least recently used goes
    manager.load("orch-demo-tiny-sd15")
    assert [m.entry.name for m in manager.resident] == ["orch-demo-tiny-sd15"]
    again = manager.load("second-model")  # it had been unloaded: loaded again, and the other one goes
    assert again.pipeline is not second.pipeline and [m.entry.name for m in manager.resident] == ["second-model"]


# -- the same through the A1111 API ---------------------------------------------------------


def test_api_lora_vae_and_checkpoint_limit(demo_models):
    from fastapi.testclient import TestClient

    from remote.server.app import ServerSettings, create_app

    models, _ = demo_models
    home = models.parent
    app = create_app(ServerSettings(token="t0ken", models_dir=models, state_dir=home / ".orch", device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        import time

        for _ in range(600):
            if client.get("/healthz").json()["status"] == "ready":
                break
            time.sleep(0.1)
        client.headers["Authorization"] = "Bearer t0ken"
        assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["ink"]
        assert [x["model_name"] for x in client.get("/sdapi/v1/sd-vae").json()] == ["alt.safetensors"]
        body = {"prompt": "a cat <lora:ink:0.7>", "steps": 2, "width": 64, "height": 64, "seed": 3}
        ok = client.post("/sdapi/v1/txt2img", json=body)
        assert ok.status_code == 200, ok.text
        text = Image.open(io.BytesIO(base64.b64decode(ok.json()["images"][0]))).info["parameters"]
        assert text.startswith("a cat <lora:ink:0.7>") and 'Lora weights: "ink: 0.7"' in text
        missing = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:nope:1>"})
        warnings = json.loads(missing.json()["info"])["warnings"]  # A1111 warns and generates without it
        assert missing.status_code == 200 and any("unknown LoRA 'nope'" in w and "ink" in w for w in warnings)
        bad_vae = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "missing.pt"}})
        assert bad_vae.status_code == 422 and "sd_vae" in bad_vae.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"sd_vae": "alt.safetensors"}).status_code == 200
        with_vae = client.post("/sdapi/v1/txt2img", json=body).json()
        assert "VAE: alt.safetensors" in json.loads(with_vae["info"])["infotexts"][0]
        assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 0}).status_code == 422
        assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 2}).status_code == 200


def test_inpainting_models_serve_inpaint_and_explain_txt2img(tmp_path):
    """A 9-channel (inpainting) model: masks work; txt2img says what to use instead."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from remote.server.demo_model import build_demo_pipeline

    demo = build_demo_pipeline()
    config = dict(demo.unet.config)
    config["in_channels"] = 9
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    pipe = StableDiffusionInpaintPipeline(**{**demo.components, "unet": unet})
    models = tmp_path / "models"
    pipe.save_pretrained(models / "tiny-inpaint")
    manager = ModelManager(models, device="cpu")
    with pytest.raises(RequestError, match="inpainting model: use img2img with a mask"):
        manager.generate(req())
    from PIL import Image as PILImage

    image = PILImage.new("RGB", (64, 64), (200, 30, 30))
    mask = PILImage.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    from remote.server import inpaint
    from remote.server.models.types import ImageInputs

    prepared = inpaint.prepare([image], mask, 64, 64, inpaint.InpaintOptions(full_res=False))
    inputs = ImageInputs(images=tuple(prepared.images), denoising_strength=1.0, inpaint=prepared, inpainting_fill=0)
    (result,) = manager.generate_batch([req(inputs=inputs)], kind="inpaint")
    out = np.asarray(result.images[0], dtype=np.int16)
    assert out.shape == (64, 64, 3)


def test_an_sdxl_vae_that_diffusers_upcasts_stays_in_float32_and_draws_the_same(tmp_path):
    """The stock SDXL VAE (float16, force_upcast) was converted to float32 and back at every
    call: new weight tensors, so its compiled CUDA graph was captured again for each image."""
    import torch
    from diffusers import AutoPipelineForImage2Image

    from remote.server.demo_model import build_demo_pipeline
    from remote.server.models import vae_in_float32

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        txt = pipe("a cat", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(1),
                   output_type="np").images
        img = AutoPipelineForImage2Image.from_pipe(pipe)(
            "a dog", image=torch.full((1, 3, 64, 64), 0.25, dtype=torch.float16), strength=0.6, num_inference_steps=3,
            generator=torch.Generator().manual_seed(2), output_type="np").images
        return txt, img

    stock = build_tiny_sdxl().to(torch.float16)
    assert stock.vae.config.force_upcast
    expected = run(stock)

    ours = build_tiny_sdxl().to(torch.float16)
    vae_in_float32(ours, ours.vae)
    weight = ours.vae.decoder.conv_in.weight
    address = weight.data_ptr()
    for _ in range(2):
        got = run(ours)
        # diffusers divides the latents by the VAE's scale after its cast to float32, here before
        # (in float16): within one 8-bit level of its pixels.
        for a, b in zip(got, expected):
            assert np.abs(np.round(a * 255) - np.round(b * 255)).max() <= 1
    assert weight.dtype == torch.float32 and weight.data_ptr() == address, "converted once, never again"
    assert ours.unet.dtype == torch.float16

    # SD1.5 pipelines never upcast: their float16 VAE is left as it is.
    sd15 = build_demo_pipeline().to(torch.float16)
    vae_in_float32(sd15, sd15.vae)
    assert sd15.vae.dtype == torch.float16
