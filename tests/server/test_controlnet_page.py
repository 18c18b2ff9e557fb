"""The page's ControlNet panel in headless Chromium (Debian's, driven by Playwright) against a real
server (uvicorn on 127.0.0.1, the demo model on the CPU) whose models/ControlNet holds tiny
random-weight ControlNets: tick the panel open, upload a control image, pick module canny and the
tiny model, preview the map (cv2's Canny of the image, at the resolution the generation uses),
generate with the unit (its infotext in the viewer), and with the panel unticked the page sends no
unit at all."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.test_page import LONG, browser  # noqa: F401 (a fixture: headless Chromium)
from tests.server.conftest import TOKEN
from tests.server.test_controlnet import cn_home, shapes_image  # noqa: F401 (a fixture: models/ with tiny ControlNets)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(cn_home):  # noqa: F811
    import uvicorn

    from remote.server.app import ServerSettings, create_app
    from tests.helpers.net import free_port, wait_listening

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a config fetch would fail the test
        app = create_app(ServerSettings(token=TOKEN, models_dir=cn_home / "models", state_dir=cn_home / ".orch", device="cpu",
                                        max_side=512))
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        assert wait_listening(port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as api:
            yield base, api
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def page(server, browser):  # noqa: F811
    base, api = server
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    link = api.post("/ui/api/login-link")  # what `orch open` opens
    assert link.status_code == 200, link.text
    page.goto(base + link.json()["path"])
    page.wait_for_selector("#status.ready", timeout=LONG)
    page.wait_for_function("() => [...document.querySelectorAll('#cn_model option')].some(o => o.textContent === 'tiny_canny')"
                           " && document.querySelectorAll('#sampler option').length > 10", timeout=LONG)
    # Small and short: 64x64, 2 steps, a fixed seed.
    for field, value in (("width", "64"), ("height", "64"), ("steps", "2"), ("seed", "7"), ("prompt", "a cat")):
        page.fill(f"#{field}", value)
    page.select_option("#sampler", "Euler")
    yield page
    assert not errors, errors
    context.close()


def data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def generate(page, prompt: str) -> tuple[dict, str]:
    """Generate from the page: the job the page posted, and the new image's parameters as its viewer shows them."""
    page.fill("#prompt", prompt)
    with page.expect_request(lambda r: r.url.endswith("/ui/api/queue") and r.method == "POST") as sent:
        page.click("#generate")
    page.wait_for_function("p => [...document.querySelectorAll('#queue .job.done')].some(j => j.textContent.includes(p))",
                           arg=prompt, timeout=LONG)
    assert page.text_content("#form-error") == ""
    job_id = page.locator("#queue .job.done", has_text=prompt).first.get_attribute("data-id")
    page.locator(f"#queue .job[data-id='{job_id}'] .tile").first.click()
    page.wait_for_function("() => document.querySelector('#viewer-params').textContent.includes('Steps:')", timeout=LONG)
    params = page.text_content("#viewer-params")
    page.click("#viewer-close")
    return sent.value.post_data_json, params


def test_upload_a_control_image_choose_canny_and_preview_the_map(page, tmp_path):
    import cv2

    assert not page.is_visible("#cn-file"), "the panel starts closed"
    page.check("#cn_enabled")
    assert page.get_attribute("#controlnet", "open") is not None and page.is_visible("#cn-file"), "ticking it opens the panel"
    shapes = tmp_path / "shapes.png"
    shapes_image(64).save(shapes)
    page.set_input_files("#cn-file", str(shapes))
    page.wait_for_function("() => { const i = document.querySelector('#cn-image'); return !i.hidden && i.complete && i.naturalWidth > 0 }",
                           timeout=LONG)
    assert np.array_equal(data_url_image(page.get_attribute("#cn-image", "src")), np.asarray(shapes_image(64)))
    page.select_option("#cn_module", "canny")
    page.select_option("#cn_model", label="tiny_canny")
    with page.expect_response(lambda r: r.url.endswith("/controlnet/detect")) as answer:
        page.click("#cn-preview")
    assert answer.value.status == 200, answer.value.text()
    page.wait_for_function("() => { const i = document.querySelector('#cn-map'); return !i.hidden && i.complete && i.naturalWidth > 0 }",
                           timeout=LONG)
    assert page.text_content("#form-error") == ""
    shown = data_url_image(page.get_attribute("#cn-map", "src"))
    assert set(np.unique(shown)) <= {0, 255} and shown.max() == 255, "a black and white map"
    assert not np.array_equal(shown, np.asarray(shapes_image(64)))
    # The map the generation will use: Canny at the pixel-perfect resolution of a 64x64 image for 64x64 (64 itself).
    edges = cv2.Canny(np.asarray(shapes_image(64)), 100, 200)
    assert shown.shape == (64, 64, 3), shown.shape
    assert np.array_equal(shown[:, :, 0], edges)


def test_generate_with_the_unit_and_its_infotext_then_without_it(page, server):
    _, api = server
    sent, params = generate(page, "a cat steered")
    (unit,) = sent["request"]["alwayson_scripts"]["controlnet"]["args"]
    assert unit["enabled"] is True and unit["module"] == "canny" and unit["model"].startswith("tiny_canny [")
    assert np.array_equal(data_url_image(unit["image"]), np.asarray(shapes_image(64)))
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in params
    assert "Processor Res: 64, Threshold A: 100" in params and "Pixel Perfect: True" in params  # what the preview used

    page.uncheck("#cn_enabled")
    sent, params = generate(page, "a cat free")
    assert "alwayson_scripts" not in sent["request"], sent["request"].get("alwayson_scripts")
    assert "ControlNet" not in params

    # The same seed: only the unit tells the two images apart.
    jobs = {j["prompt"]: j for j in api.get("/ui/api/queue").json()["finished"]}
    steered, free = (np.asarray(Image.open(io.BytesIO(api.get(f"/ui/api/images/{jobs[p]['images'][0]}").content)).convert("RGB"),
                                np.int16) for p in ("a cat steered", "a cat free"))
    assert jobs["a cat steered"]["seeds"] == jobs["a cat free"]["seeds"] == [7]
    assert np.abs(steered - free).mean() > 1, "the unit changed the image"
