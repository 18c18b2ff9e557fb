"""The page's server side in-process: its files behind auth, the one-time link and the cookie, the
origin check, the queue (order, cancel), the gallery of kept outputs (paging, search, thumbnails,
parameters), png-info for a dropped image. One app on the demo model for the module."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from remote.server.app import ServerSettings, create_app
from remote.server.deps import make_session, session_cookie_name

pytestmark = pytest.mark.slow

TOKEN = "ui-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
UI = Path(__file__).resolve().parents[2] / "remote" / "server" / "ui"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("ui")


@pytest.fixture(scope="module")
def client(home):
    app = create_app(ServerSettings(token=TOKEN, models_dir=home / "models", state_dir=home / ".orch", device="cpu"))
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1:7860") as c:
        deadline = time.monotonic() + 300
        while c.get("/healthz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/healthz").json()["status"] == "ready"
        yield c


@pytest.fixture
def anon(client):
    """The same client with no cookie left from an earlier test."""
    client.cookies.clear()
    yield client
    client.cookies.clear()


def small(**kw):
    return {"prompt": "a lighthouse", "steps": 1, "width": 64, "height": 64, "seed": 5, **kw}


def png_b64(color=(200, 30, 30), size=(64, 64), text: str | None = None) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def sign_in(client) -> str:
    link = client.post("/ui/api/login-link", headers=BEARER).json()
    r = client.get(link["path"], follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    return r.headers["set-cookie"]


def wait_jobs(client, ids, headers=BEARER, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = client.get("/ui/api/queue", headers=headers).json()
        done = {j["id"]: j for j in snap["finished"]}
        if all(i in done for i in ids):
            return done
        time.sleep(0.05)
    raise AssertionError(f"jobs {ids} did not finish: {snap}")


# -- the page and signing in -----------------------------------------------------------------------

def test_the_page_is_refused_without_the_token_and_served_with_basic_auth(anon):
    r = anon.get("/")
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="orch"'
    assert "orch open" in r.json()["detail"]
    assert anon.get("/app.js").status_code == 401
    basic = {"Authorization": "Basic " + base64.b64encode(f"orch:{TOKEN}".encode()).decode()}
    page = anon.get("/", headers=basic)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="app.js"' in page.text and "Generate" in page.text
    assert anon.get("/app.js", headers=basic).status_code == 200
    assert anon.get("/style.css", headers=basic).status_code == 200
    status = anon.get("/ui/api/status", headers=basic).json()
    assert status["status"] == "ready" and status["model"] == "orch-demo-tiny-sd15" and status["device"] == "cpu"
    # An unknown path is the API's JSON 404, not a file listing or an HTML page.
    missing = anon.get("/nope.txt", headers=basic)
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"


def test_the_first_load_is_under_150_kb_and_needs_nothing_from_the_internet():
    total = sum((UI / name).stat().st_size for name in ("index.html", "app.js", "style.css"))
    assert total < 150_000, f"first load is {total} bytes"
    for name in ("index.html", "app.js", "style.css"):
        text = (UI / name).read_text()
        assert "http://" not in text and "https://" not in text, f"{name} refers to another site"


def test_a_one_time_link_sets_an_httponly_strict_cookie_once(anon):
    assert anon.post("/ui/api/login-link").status_code == 401
    link = anon.post("/ui/api/login-link", headers=BEARER).json()
    assert link["expires_in"] <= 300 and TOKEN not in link["path"]
    r = anon.get(link["path"], follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(session_cookie_name(TOKEN) + "=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and TOKEN not in cookie
    assert anon.get("/").status_code == 200, "the cookie opens the page"
    assert anon.get("/sdapi/v1/sd-models").status_code == 200, "and the API the page calls"
    assert anon.post("/ui/api/login-link").status_code == 401, "the cookie cannot make new links"
    anon.cookies.clear()
    again = anon.get(link["path"], follow_redirects=False)
    assert again.status_code == 401 and "orch open" in again.text, "a link works once"
    assert anon.get("/").status_code == 401


def test_a_forged_or_expired_cookie_is_refused(anon):
    name = session_cookie_name(TOKEN)
    for value in ("123.abc", make_session("another-token"), make_session(TOKEN, now=time.time() - 8 * 24 * 3600), "x"):
        anon.cookies.set(name, value)
        assert anon.get("/sdapi/v1/sd-models").status_code == 401, value
    anon.cookies.set(name, make_session(TOKEN))
    assert anon.get("/sdapi/v1/sd-models").status_code == 200


def test_a_request_from_another_origin_is_refused_even_with_the_cookie(anon):
    sign_in(anon)
    job = {"kind": "txt2img", "request": small(steps=1)}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "http://127.0.0.1:9999"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:9999"},
                    {}):  # no Origin at all on a POST: not the page (a browser always sends one)
        r = anon.post("/ui/api/queue", json=job, headers=headers)
        assert r.status_code == 403, (headers, r.text)
        assert "refused" in r.json()["detail"]
    assert anon.post("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"}).status_code == 403
    # The token does not make a foreign page's request acceptable either (a browser replays cached Basic credentials).
    assert anon.get("/sdapi/v1/sd-models", headers={**BEARER, "Origin": "http://evil.example"}).status_code == 403
    same = anon.post("/ui/api/queue", json=job, headers={"Origin": "http://127.0.0.1:7860", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 202, same.text
    wait_jobs(anon, [same.json()["id"]], headers={})


# -- the queue -----------------------------------------------------------------------------------

def test_queued_jobs_run_in_order_can_be_moved_and_cancelled(client):
    engine = client.app.state.server.engine
    gate = threading.Event()
    # The GPU worker is held by a job that waits on `gate`: the queue's first job waits on the worker, the rest in the queue.
    blocker = threading.Thread(target=engine.call, args=(gate.wait,), daemon=True)
    blocker.start()
    time.sleep(0.2)
    try:
        ids = []
        for prompt in ("first", "second", "third", "fourth"):
            r = client.post("/ui/api/queue", json={"kind": "txt2img", "request": small(prompt=prompt)}, headers=BEARER)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 10
        while (client.get("/ui/api/queue", headers=BEARER).json()["running"] or {}).get("id") != ids[0]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        snap = client.get("/ui/api/queue", headers=BEARER).json()
        assert [j["id"] for j in snap["waiting"]] == ids[1:] and [j["position"] for j in snap["waiting"]] == [0, 1, 2]
        # The fourth goes first; the second is cancelled before it runs; the running one cannot be moved.
        moved = client.post(f"/ui/api/queue/{ids[3]}/move", json={"to": 0}, headers=BEARER)
        assert [j["id"] for j in moved.json()["waiting"]] == [ids[3], ids[1], ids[2]]
        assert client.delete(f"/ui/api/queue/{ids[1]}", headers=BEARER).json()["result"] == "cancelled"
        assert client.post(f"/ui/api/queue/{ids[0]}/move", json={"to": 1}, headers=BEARER).status_code == 409
        assert client.post("/ui/api/queue/nope/move", json={"to": 1}, headers=BEARER).status_code == 404
        assert client.post(f"/ui/api/queue/{ids[2]}/move", json={"to": -1}, headers=BEARER).status_code == 422
    finally:
        gate.set()
    done = wait_jobs(client, [ids[0], ids[2], ids[3]])
    assert done[ids[1]]["state"] == "cancelled" and done[ids[1]]["images"] == []
    order = sorted((ids[0], ids[2], ids[3]), key=lambda i: done[i]["started"])
    assert order == [ids[0], ids[3], ids[2]], "the moved job ran before the one it passed"
    for i in (ids[0], ids[2], ids[3]):
        assert done[i]["state"] == "done" and len(done[i]["images"]) == 1 and done[i]["seeds"] == [5]
        info = client.get(f"/ui/api/images/{done[i]['images'][0]}/info", headers=BEARER).json()
        assert info["fields"]["prompt"] == done[i]["prompt"]


def test_cancelling_the_running_job_stops_it_and_the_queue_goes_on(client):
    slow = client.post("/ui/api/queue", json={"kind": "txt2img", "request": small(prompt="slow", steps=400, width=128, height=128)},
                       headers=BEARER).json()
    after = client.post("/ui/api/queue", json={"kind": "txt2img", "request": small(prompt="after")}, headers=BEARER).json()
    deadline = time.monotonic() + 30
    while client.get("/sdapi/v1/progress", headers=BEARER).json()["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, "the slow job never started stepping"
        time.sleep(0.02)
    assert client.delete(f"/ui/api/queue/{slow['id']}", headers=BEARER).json()["result"] == "stopping"
    done = wait_jobs(client, [slow["id"], after["id"]], timeout=60)
    assert done[slow["id"]]["state"] == "cancelled" and done[slow["id"]]["images"] == []
    assert done[after["id"]]["state"] == "done" and len(done[after["id"]]["images"]) == 1


def test_a_bad_job_is_refused_when_added_naming_the_field(client):
    r = client.post("/ui/api/queue", json={"kind": "txt2img", "request": small(steps=0)}, headers=BEARER)
    assert r.status_code == 422 and "request.steps" in r.json()["detail"]
    r = client.post("/ui/api/queue", json={"kind": "img2img", "request": small()}, headers=BEARER)
    assert r.status_code == 422 and "init_images" in r.json()["detail"]
    r = client.post("/ui/api/queue", json={"kind": "upscale", "request": {}}, headers=BEARER)
    assert r.status_code == 422 and "kind" in r.json()["detail"]
    # One the server can only judge when it runs (an unknown sampler) fails as a job, with the reason.
    job = client.post("/ui/api/queue", json={"kind": "txt2img", "request": small(sampler_name="Nope")}, headers=BEARER).json()
    failed = wait_jobs(client, [job["id"]])[job["id"]]
    assert failed["state"] == "failed" and "sampler" in failed["error"]


def test_an_inpaint_job_keeps_an_inpaint_image(client):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    req = small(init_images=[png_b64()], mask=base64.b64encode(buf.getvalue()).decode(), denoising_strength=0.9, steps=2)
    job = client.post("/ui/api/queue", json={"kind": "img2img", "request": req}, headers=BEARER).json()
    assert job["kind"] == "inpaint"
    done = wait_jobs(client, [job["id"]])[job["id"]]
    assert done["state"] == "done", done
    info = client.get(f"/ui/api/images/{done['images'][0]}/info", headers=BEARER).json()
    assert info["kind"] == "inpaint" and "Mask blur" in info["infotext"]
    img = Image.open(io.BytesIO(client.get(f"/ui/api/images/{done['images'][0]}", headers=BEARER).content))
    assert img.getpixel((2, 2)) == (200, 30, 30), "outside the mask the original stays"


# -- the gallery ---------------------------------------------------------------------------------

def test_api_generations_are_kept_and_listed_newest_first_with_parameters(client, home):
    before = client.get("/ui/api/gallery", headers=BEARER).json()["total"]
    r = client.post("/sdapi/v1/txt2img", json=small(prompt="kept by the api", seed=42, batch_size=2), headers=BEARER)
    assert r.status_code == 200
    assert "warnings" in json.loads(r.json()["info"])
    deadline = time.monotonic() + 10
    while client.get("/ui/api/gallery", headers=BEARER).json()["total"] < before + 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page = client.get("/ui/api/gallery?limit=2", headers=BEARER).json()
    assert [i["seed"] for i in page["items"]] == [43, 42] and page["items"][0]["prompt"] == "kept by the api"
    first = page["items"][1]
    data = client.get(f"/ui/api/images/{first['id']}", headers=BEARER)
    assert data.headers["content-type"] == "image/png"
    assert base64.b64decode(r.json()["images"][0]) == data.content, "the very bytes the client got"
    assert (home / ".orch" / "outputs" / "txt2img-images").is_dir()
    dl = client.get(f"/ui/api/images/{first['id']}?download=1", headers=BEARER)
    assert dl.headers["content-disposition"].startswith("attachment;")
    thumb = client.get(f"/ui/api/images/{first['id']}/thumb", headers=BEARER)
    assert thumb.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(thumb.content)).size == (64, 64)
    info = client.get(f"/ui/api/images/{first['id']}/info", headers=BEARER).json()
    assert info["fields"]["seed"] == 42 and info["fields"]["steps"] == 1 and info["fields"]["sampler_name"]
    assert info["fields"]["sd_model_checkpoint"] == "orch-demo-tiny-sd15"
    assert info["parameters"]["Size-1"] == 64
    # Paging: the next page starts after the last one seen; a made-up cursor is a 422.
    nxt = client.get(f"/ui/api/gallery?limit=2&cursor={page['next']}", headers=BEARER).json()
    assert nxt["items"] and nxt["items"][0]["id"] not in {i["id"] for i in page["items"]}
    assert client.get("/ui/api/gallery?cursor=garbage", headers=BEARER).status_code == 422
    found = client.get("/ui/api/gallery?q=kept by the", headers=BEARER).json()
    assert found["total"] == 2 and all("kept by the api" == i["prompt"] for i in found["items"])
    assert client.get("/ui/api/images/999999/info", headers=BEARER).status_code == 404
    # A1111's opt-out keeps nothing.
    total = client.get("/ui/api/gallery", headers=BEARER).json()["total"]
    client.post("/sdapi/v1/txt2img", json=small(do_not_save_samples=True), headers=BEARER)
    time.sleep(0.3)
    assert client.get("/ui/api/gallery", headers=BEARER).json()["total"] == total


def test_png_info_of_a_dropped_image_gives_the_form_fields(client):
    text = "a red square\nNegative prompt: blue\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 99, " \
           "Size: 96x64, Model: mymodel, Denoising strength: 0.4, Hires upscale: 2, Hires upscaler: Latent"
    r = client.post("/ui/api/png-info", json={"image": "data:image/png;base64," + png_b64(text=text)}, headers=BEARER).json()
    assert r["infotext"] == text
    f = r["fields"]
    assert (f["prompt"], f["negative_prompt"], f["steps"], f["sampler_name"], f["scheduler"], f["cfg_scale"], f["seed"],
            f["width"], f["height"], f["sd_model_checkpoint"], f["enable_hr"], f["hr_upscaler"]) == \
        ("a red square", "blue", 12, "DPM++ 2M", "Karras", 6.5, 99, 96, 64, "mymodel", True, "Latent")
    assert client.post("/ui/api/png-info", json={"image": "bm90IGFuIGltYWdl"}, headers=BEARER).status_code == 422


def test_images_copied_into_outputs_are_indexed(tmp_path):
    from remote.server.gallery import Gallery

    root = tmp_path / "outputs"
    (root / "mine").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "mine" / "a.png", pnginfo=_text("copied in\nSteps: 3, Sampler: Euler, Seed: 7, Size: 64x64"))
    (root / "mine" / "notes.txt").write_text("not an image")
    (root / "mine" / "broken.png").write_bytes(b"not a png")
    g = Gallery(root)
    assert g.scan() == 1 and g.scan() == 0
    item = g.page()["items"][0]
    assert item["prompt"] == "copied in" and item["seed"] == 7 and item["name"] == "a.png"
    (root / "mine" / "a.png").unlink()
    entry = g.get(item["id"])
    assert g.file(entry) is None and g.page()["total"] == 0, "a vanished file leaves the index"
    g.close()


def _text(text):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def test_listing_a_page_of_50000_images_is_fast(tmp_path):
    """The index answers from a b-tree: the first page, a deep page and a search, at 50,000 images."""
    from remote.server.gallery import Gallery

    g = Gallery(tmp_path / "outputs")
    now = time.time()
    rows = [(f"txt2img-images/d/{i:06d}.png", now - 50_000 + i, "txt2img", 512, 512, i, "sd15", f"prompt number {i}", "", 1000)
            for i in range(50_000)]
    with g._lock:
        g._db.execute("BEGIN")
        g._db.executemany("INSERT INTO images (path, created, kind, width, height, seed, model, prompt, infotext, bytes) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        g._db.execute("COMMIT")
    timings = {}
    t = time.perf_counter()
    first = g.page(60)
    timings["first"] = time.perf_counter() - t
    assert first["total"] == 50_000 and first["items"][0]["seed"] == 49_999
    cursor = first["next"]
    for _ in range(400):  # 24,000 images down
        cursor = g.page(60, cursor)["next"]
    t = time.perf_counter()
    deep = g.page(60, cursor)
    timings["deep"] = time.perf_counter() - t
    assert deep["items"][0]["seed"] == 49_999 - 60 * 401
    t = time.perf_counter()
    found = g.page(60, query="number 4999")
    timings["search"] = time.perf_counter() - t
    assert found["total"] == 11  # 4999 and 49990-49999
    print(f"gallery at 50,000 images: {', '.join(f'{k} {v * 1000:.1f} ms' for k, v in timings.items())}")
    assert timings["first"] < 0.25 and timings["deep"] < 0.25 and timings["search"] < 0.5, timings
    g.close()


def test_images_are_not_kept_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    from remote.server import gallery as gallery_module

    g = gallery_module.Gallery(tmp_path / "outputs")
    image = Image.new("RGB", (8, 8))
    assert len(g.add_generated([image], [], ["x\nSteps: 1, Seed: 1"], [1], "png", "txt2img")) == 1
    monkeypatch.setattr(gallery_module, "MIN_FREE_BYTES", 1 << 62)
    assert g.add_generated([image], [], ["x\nSteps: 1, Seed: 2"], [2], "png", "txt2img") == []
    assert g.count() == 1
    g.close()
