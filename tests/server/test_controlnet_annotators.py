"""The weighted ControlNet preprocessors run for real: controlnet_aux's networks on weights built here.

Each annotator file is the state dict of controlnet_aux's own network class, under the name
lllyasviel/Annotators gives it (and so orch and controlnet_aux look for), in the layout
controlnet_aux reads: nothing is downloaded (HF_HUB_OFFLINE=1). The weights are random (seeded),
except openpose's body network, which is built by hand to "see" a red blob as a neck and a green
one below it as nose, shoulders and hips, so that it finds a person (random weights find none:
every map would be black) and the map follows the image; and PiDiNet's classifier, scaled up (at
its init a random PiDiNet's map is a flat grey). Runs on the CPU, on small images: about a minute.

Needs the `annotators` extra (controlnet_aux, which brings torchvision and timm; matplotlib for
openpose_full); skipped when controlnet_aux is not installed. Depth by ZoeDepth or LeReS: orch
has no such modules (controlnet_aux's run offline on built weights too, ZoeDepth's far too slowly
for CI: a 1.3 GB BEiT-L at 384 px, minutes an image on two cores).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import TOKEN, b64_png, image_of, wait_ready

pytestmark = pytest.mark.slow

H, W = 48, 80  # the test images: not multiples of 64, not square
RES = 64  # processor_res: maps come back 64 x round(80 * 64 / 48) = 64 x 107, as the extension gives them
MAP = (RES, round(W * RES / H))

MODULES = ["openpose", "openpose_full", "softedge_hed", "softedge_pidinet", "lineart_realistic", "lineart_coarse",
           "depth_midas"]


def figure(x: int) -> Image.Image:
    """A red square (openpose's neck, as built below) above a green one (nose, shoulders, hips), at column x."""
    img = np.full((H, W, 3), 20, np.uint8)
    img[4:16, x:x + 12] = (220, 30, 30)
    img[28:40, x:x + 12] = (30, 220, 30)
    return Image.fromarray(img)


IMAGES = (figure(8), figure(56))  # the same figure, left and right


# -- annotator files: controlnet_aux's own classes, saved as the Annotators files are laid out ----------


def _centre(conv, pairs):
    """conv's weight zero but for out_c <- in_c taps at the kernel's centre (a pass-through of those channels)."""
    import torch

    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        k = conv.kernel_size[0] // 2
        for out_c, in_c, w in pairs:
            conv.weight[out_c, in_c, k, k] = w


def openpose_body():
    """bodypose_model whose stage-6 heatmaps are the image's redness (part 1, the neck) and greenness (parts 0, 2, 5,
    8, 11: nose, shoulders, hips), its part affinity fields pointing down for the limbs from the neck to those:
    a red square above a green one is a person of six parts. Everything else is zero."""
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    net = bodypose_model()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        keep = [(c, c, 1.0) for c in range(3)]  # B, G, R (the body network reads BGR in [-0.5, 0.5))
        for name, m in net.model0.named_children():
            if isinstance(m, torch.nn.Conv2d):
                _centre(m, keep)
                if name == "conv1_1":
                    m.bias[:3] = 0.5  # pixel / 256: non-negative, so every ReLU lets it through
        stage6_in = 38 + 19  # model6_2 reads cat(stage 5's PAFs, its heatmaps, model0's 128 channels)
        b, g, r = stage6_in, stage6_in + 1, stage6_in + 2
        heat = net.model6_2
        _centre(heat.Mconv1_stage6_L2, [(0, r, 1.0), (0, g, -1.0), (0, b, -1.0), (1, g, 1.0), (1, r, -1.0), (1, b, -1.0)])
        for i in range(2, 7):
            _centre(getattr(heat, f"Mconv{i}_stage6_L2"), [(0, 0, 1.0), (1, 1, 1.0)])
        _centre(heat.Mconv7_stage6_L2, [(1, 0, 1.5)] + [(part, 1, 1.5) for part in (0, 2, 5, 8, 11)])
        # PAF channels (x, y) of the limbs neck->right shoulder, left shoulder, right hip, left hip, nose: (0, 1)
        for y_channel in (13, 21, 1, 7, 29):
            net.model6_1.Mconv7_stage6_L1.bias[y_channel] = 1.0
    return net


def write_annotators(folder, seed: int = 0) -> None:
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import handpose_model
    from controlnet_aux.pidi.model import pidinet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    def strip_first(net):  # the CMU files name layers without the model0./model1_1. container
        return {k.split(".", 1)[1]: v for k, v in net.state_dict().items()}

    torch.save(strip_first(openpose_body()), folder / "body_pose_model.pth")
    torch.save(strip_first(handpose_model()), folder / "hand_pose_model.pth")
    torch.save(FaceNet().state_dict(), folder / "facenet.pth")
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    pidi = pidinet()
    with torch.no_grad():  # its classifier starts at 0.25 a weight: random edges all near sigmoid(0), a flat grey map
        pidi.classifier.weight.mul_(100)
    torch.save({"state_dict": {f"module.{k}": v for k, v in pidi.state_dict().items()}}, folder / "table5_pidinet.pth")
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")
    torch.save(DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).state_dict(),
               folder / "dpt_hybrid-midas-501f0c75.pt")


def build_map_reading_controlnet():
    """The helpers' tiny random ControlNet, its conditioning embedding's weights x5: as built there it changes the
    image but hardly reads its map (its biases drown the map: two maps, images within 1 of each other); like this,
    the map's content steers the image."""
    import torch

    from remote.server.demo_model import build_demo_pipeline
    from tests.helpers.model_files import build_tiny_controlnet

    net = build_tiny_controlnet(build_demo_pipeline().unet, seed=1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("controlnet_cond_embedding") and name.endswith("weight"):
                p.mul_(5)
    return net


# -- the server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def annot_home(tmp_path_factory):
    import remote.server  # noqa: F401  (first: lets PyPI's torchvision import beside a CPU torch, see torchvision_compat)

    pytest.importorskip("controlnet_aux")  # here, not at collection: only the worker that runs these pays its import
    from remote.server.demo_model import ensure_demo_model

    home = tmp_path_factory.mktemp("annotators")
    models = home / "models"
    ensure_demo_model(models)
    build_map_reading_controlnet().save_pretrained(models / "ControlNet" / "tiny_control")
    write_annotators(models / "Annotators")
    return home


@pytest.fixture(scope="module")
def cn(annot_home):
    from fastapi.testclient import TestClient

    from remote.server.app import ServerSettings, create_app
    from remote.server.controlnet import annotators

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")  # a fetch would fail the test
    app = create_app(ServerSettings(token=TOKEN, models_dir=annot_home / "models", state_dir=annot_home / ".orch",
                                    device="cpu", max_side=512))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client
    annotators._loaded.clear()  # the detectors (about 1 GB of weights) go with the app
    mp.undo()


def detect(cn, module: str, images=IMAGES):
    r = cn.post("/controlnet/detect", json={"controlnet_module": module, "controlnet_input_images": [b64_png(i) for i in images],
                                            "controlnet_processor_res": RES})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "Success"
    return [np.asarray(image_of(b).convert("RGB")) for b in r.json()["images"]]


@pytest.mark.parametrize("module", MODULES)
def test_detect_gives_a_map_at_the_processor_size_that_follows_the_image(cn, module):
    left, right = detect(cn, module)
    assert left.shape == right.shape == (*MAP, 3), "short side at processor_res, the image's aspect (not multiples of 64)"
    assert not np.array_equal(left, right), "two images, two maps"
    assert left.std() > 0 and right.std() > 0, "a map, not a flat image"


def test_openpose_draws_the_person_it_finds_where_it_is(cn):
    """The hand-built body network finds the figure: a skeleton drawn over it, nothing on the other side."""
    left, right = detect(cn, "openpose")
    half = MAP[1] // 2
    assert left[:, :half].any() and not left[:, half:].any()
    assert right[:, half:].any() and not right[:, :half].any()
    assert np.array_equal(detect(cn, "openpose", IMAGES[:1])[0], left), "the same image, the same map"


@pytest.mark.parametrize("module", MODULES)
def test_txt2img_with_the_module_follows_its_image_and_names_it(cn, module):
    outs = []
    for img in IMAGES:
        body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler",
                "alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "module": module, "model": "tiny_control",
                                                              "image": b64_png(img), "processor_res": RES,
                                                              "resize_mode": "Just Resize"}]}}}  # both figures in view
        r = cn.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert f'ControlNet 0: "Module: {module}, Model: tiny_control [' in info["infotexts"][0]
        assert f"Processor Res: {RES}," in info["infotexts"][0]
        (b64,) = r.json()["images"]
        outs.append(np.asarray(image_of(b64).convert("RGB"), dtype=np.int16))
    assert outs[0].shape == (64, 64, 3)
    assert np.abs(outs[0] - outs[1]).mean() > 1, "the unit's map (so its image) steers the image"


def test_a_file_that_is_not_the_detectors_is_a_422_naming_it(cn, annot_home, tmp_path):
    """Not a checkpoint of that network (here: PiDiNet's file where HED's belongs): a 422 naming the files, not a 500."""
    import shutil

    from remote.server.controlnet import annotators
    from remote.server.models.types import RequestError

    models = annot_home / "models"
    wrong = tmp_path / "models"
    (wrong / "Annotators").mkdir(parents=True)
    shutil.copy(models / "Annotators" / "table5_pidinet.pth", wrong / "Annotators" / "ControlNetHED.pth")
    module = next(m for m in annotators.MODULES if m.label == "softedge_hed")
    with pytest.raises(RequestError) as err:
        annotators.run(module, np.asarray(IMAGES[0]), RES, wrong / "Annotators")
    assert "ControlNetHED.pth" in str(err.value) and "did not load" in str(err.value)
