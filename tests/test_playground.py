"""The playground page in a real browser: Debian's Chromium driven by Playwright, against a real
Serve app on the tiny models (one app for the module, on 127.0.0.1).

Controls are found by role and label, as a screen reader finds them. Each test leaves a
screenshot in `<tmp>/screenshots/` (or in $RAYBOOTH_SCREENSHOTS when set).
"""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from _serve_support import free_port, serve_config, start_app, stop_serve

CHROMIUM = "/usr/bin/chromium"
API_KEY = "pg-" + uuid.uuid4().hex  # at least 16 characters, as the server requires
MLFLOW_UI = "http://127.0.0.1:5000"

# Starting Serve is most of the time: ~20 s on an idle box, minutes on a loaded 2-core one.
pytestmark = [pytest.mark.timeout(540)]

try:
    from playwright import sync_api
except ImportError:  # the unit tests below still run; the browser tests skip
    sync_api = None
else:
    sync_api.expect.set_options(timeout=60_000)  # a generation on two busy cores can take a while


def expect(*args, **kwargs):
    return sync_api.expect(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Without a browser: what the page is told, and what the package ships


def test_the_page_and_its_assets_ship_inside_the_package():
    from raybooth.serve_apps.playground import ASSETS, _read

    page = _read("index.html").decode()
    for path, (name, _) in ASSETS.items():
        assert _read(name), name
        assert f'"{path}"' in page, f"index.html does not load {path}"
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere


def test_page_config_and_the_mlflow_link_setting():
    from raybooth.platform.errors import ConfigError
    from raybooth.serve_apps.playground import page_config
    from raybooth.serve_apps.settings import load_args

    config = page_config(load_args({"mlflow_ui_url": MLFLOW_UI, "limits": {"max_images": 3}}))
    assert config["mlflow_ui_url"] == MLFLOW_UI and config["limits"]["max_images"] == 3
    assert "ddim" in config["schedulers"] and config["defaults"]["steps"] >= 1
    assert page_config(load_args({}))["mlflow_ui_url"] is None
    with pytest.raises(ConfigError, match="mlflow_ui_url"):
        load_args({"mlflow_ui_url": "javascript:alert(1)"})


# ---------------------------------------------------------------------------------------------
# In the browser


@pytest.fixture(scope="module")
def chromium() -> str:
    if sync_api is None:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    return CHROMIUM


@pytest.fixture(scope="module")
def served(chromium, tmp_path_factory, tiny_path, tiny_inpainting_path):
    from raybooth.serve_apps.sample_subjects import make_sample_subject

    root = tmp_path_factory.mktemp("playground")
    subjects = {name: str(make_sample_subject(root / name, seed)) for name, seed in (("alpha", 11), ("beta", 12))}
    keys_file = root / "api-keys.txt"
    keys_file.write_text("")  # empty: the API is open; a test writes a key to close it (re-read per request)
    args = {
        "text_to_image": [{"name": "tiny", "model": "tiny", "subjects": subjects, "warmup_steps": 1}],
        "inpainting": [{"name": "tiny-inpainting", "model": "tiny-inpainting", "warmup_steps": 1}],
        "limits": {"max_images": 4, "max_steps": 20, "max_side": 256},
        "auth": {"api_keys_env": f"RAYBOOTH_TEST_UNSET_{uuid.uuid4().hex[:8]}", "api_keys_file": str(keys_file)},
        "defaults": {"steps": 3},
        "mlflow_ui_url": MLFLOW_UI,
    }
    model_options = {"max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.5},
                     "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}}
    deployments = [
        {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}},
        {"name": "TextToImage", **model_options},
        {"name": "Inpainting", **model_options},
    ]
    url = start_app(serve_config(args, deployments, free_port()), timeout_s=420)
    yield SimpleNamespace(url=url, keys_file=keys_file)
    stop_serve()


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    wanted = os.environ.get("RAYBOOTH_SCREENSHOTS")
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, served, shots, request):
    """A fresh tab on the playground. Afterwards: a screenshot, and checks that the page made no
    request off this server and threw no uncaught error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    off_server: list[str] = []
    crashes: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((served.url, "blob:", "data:")) else off_server.append(r.url))
    page.on("pageerror", lambda exc: crashes.append(str(exc)))
    page.goto(served.url + "/")
    yield page
    page.screenshot(path=str(shots / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not off_server, f"the page reached beyond the server: {off_server}"
    assert not crashes, f"uncaught errors in the page: {crashes}"


# ---------------------------------------------------------------------------------------------
# Helpers


def panel(page, name: str):
    return page.get_by_role("tabpanel", name=name)


def results(page):
    return page.get_by_role("list", name="Result images").get_by_role("listitem")


def wait_for_models(page) -> None:
    expect(panel(page, "Generate").get_by_label("Model or subject")).to_have_value("tiny")


def generate(page, prompt: str, n: int = 1, **fields) -> None:
    form = panel(page, "Generate")
    form.get_by_label("Prompt", exact=True).fill(prompt)
    form.get_by_label("Images").fill(str(n))
    for label, value in fields.items():
        form.get_by_label(label).fill(str(value))
    form.get_by_role("button", name="Generate").click()


def shot(page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def image_bytes(item) -> bytes:
    """The bytes behind a result's <img> (its blob: URL), as the page holds them."""
    b64 = item.get_by_role("img").evaluate(
        """async (img) => {
            const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let s = ""; for (const b of buf) s += String.fromCharCode(b);
            return btoa(s);
        }"""
    )
    return base64.b64decode(b64)


def pixels(data: bytes, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode)).astype(np.int16)


def data_url_bytes(value: str) -> bytes:
    return base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value)


# ---------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_generate_two_images_gives_two_results_with_seeds(page, served):
    expect(page.get_by_role("link", name="API docs")).to_have_attribute("href", "/docs")
    expect(page.get_by_role("link", name="MLflow UI")).to_have_attribute("href", MLFLOW_UI)
    wait_for_models(page)

    generate(page, "a photo of a red ball on the grass", n=2)
    items = results(page)
    expect(items).to_have_count(2)
    expect(panel(page, "Generate").get_by_role("status")).to_contain_text("2 images in")
    seeds = [int(items.nth(i).get_attribute("data-seed")) for i in range(2)]
    assert seeds[1] == seeds[0] + 1  # image k uses seed + k
    for i, seed in enumerate(seeds):
        item = items.nth(i)
        expect(item).to_contain_text(f"Seed {seed}")
        expect(item).to_contain_text("3 steps")
        expect(item.get_by_role("link", name=f"Download seed {seed}")).to_have_attribute(
            "download", f"raybooth-tiny-{seed}.png")
        expect(item.get_by_role("button", name=f"Reuse seed {seed}")).to_be_visible()
        expect(item.get_by_role("button", name=f"Inpaint this (seed {seed})")).to_be_visible()
        assert pixels(image_bytes(item)).shape == (64, 64, 3)

    with page.expect_download() as download:
        items.nth(0).get_by_role("link", name=f"Download seed {seeds[0]}").click()
    assert download.value.suggested_filename == f"raybooth-tiny-{seeds[0]}.png"
    assert Path(download.value.path()).read_bytes() == image_bytes(items.nth(0))


@pytest.mark.ray
def test_reuse_seed_gives_the_same_image_bytes(page, served):
    wait_for_models(page)
    generate(page, "a blue cube")
    items = results(page)
    expect(items).to_have_count(1)
    seed = items.nth(0).get_attribute("data-seed")
    first = image_bytes(items.nth(0))

    items.nth(0).get_by_role("button", name=f"Reuse seed {seed}").click()
    form = panel(page, "Generate")
    expect(form.get_by_role("radio", name="Fixed")).to_be_checked()
    expect(form.get_by_label("Seed value")).to_have_value(seed)
    expect(form.get_by_label("Seed value")).to_be_focused()
    with page.expect_request("**/v1/images/generations") as sent:
        form.get_by_role("button", name="Generate").click()
    assert json.loads(sent.value.post_data)["seed"] == int(seed)
    expect(items).to_have_count(2)
    newest = items.nth(0)
    assert newest.get_attribute("data-seed") == seed
    assert image_bytes(newest) == first


@pytest.mark.ray
def test_paint_a_mask_and_inpaint_keeps_the_unpainted_pixels(page, served, tmp_path, shots):
    wait_for_models(page)
    # A scene with structure everywhere (so an unchanged pixel means something).
    yy, xx = np.mgrid[0:64, 0:64]
    scene = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    source = tmp_path / "scene.png"
    Image.fromarray(scene).save(source)

    page.get_by_role("tab", name="Generate").focus()  # the tabs work by keyboard
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Inpaint")).to_be_focused()
    form = panel(page, "Inpaint")
    form.get_by_label("Image to edit").set_input_files(str(source))
    canvas = form.get_by_role("img", name="Mask")
    expect(canvas).to_have_js_property("width", 64)

    # Paint a stroke across the middle, then erase a dab at its left end.
    form.get_by_label("Brush size").fill("60")
    box = canvas.bounding_box()
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x0 + w * 0.3, y0 + h * 0.5)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x0 + w * (0.3 + 0.04 * step), y0 + h * 0.5)
    page.mouse.up()
    form.get_by_role("radio", name="Eraser").check()
    page.mouse.click(x0 + w * 0.3, y0 + h * 0.5)
    form.get_by_role("radio", name="Brush").check()

    form.get_by_label("Prompt", exact=True).fill("a red barn")
    form.get_by_label("Crop margin").fill("8")
    with page.expect_request("**/v1/images/edits") as sent:
        form.get_by_role("button", name="Inpaint").click()
    body = json.loads(sent.value.post_data)
    assert data_url_bytes(body["image"]) == source.read_bytes()  # the file itself, not a re-encoding
    mask = pixels(data_url_bytes(body["mask"]), "L")
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    painted = mask == 255
    assert painted[32, 40] and not painted[5, 5] and not painted[32, 19], "the mask is not where it was painted"
    assert body["crop_margin"] == 8 and body["model"] == "tiny-inpainting"

    items = results(page)
    expect(items).to_have_count(1)
    item = items.nth(0)
    assert item.get_attribute("data-task") == "inpainting"
    out = pixels(image_bytes(item))
    original = scene.astype(np.int16)
    assert out.shape == original.shape
    assert (out[~painted] == original[~painted]).all(), "a pixel outside the painted area changed"
    assert np.abs(out[painted] - original[painted]).mean() > 5, "the painted area was not repainted"
    shot(page, shots, "inpaint-result")

    # "Inpaint this" on the result: it becomes the image to edit, with a clean mask.
    seed = item.get_attribute("data-seed")
    item.get_by_role("button", name=f"Inpaint this (seed {seed})").click()
    expect(page.get_by_role("tab", name="Inpaint")).to_have_attribute("aria-selected", "true")
    expect(canvas).to_be_focused()
    # Keyboard painting: Space paints a dab under the brush, Invert flips the mask.
    page.keyboard.press("Space")
    assert canvas.evaluate("c => c.getContext('2d').getImageData(32, 32, 1, 1).data[3]") == 255
    form.get_by_role("button", name="Invert mask").click()
    assert canvas.evaluate("c => c.getContext('2d').getImageData(32, 32, 1, 1).data[3]") == 0
    assert canvas.evaluate("c => c.getContext('2d').getImageData(1, 1, 1, 1).data[3]") == 255
    form.get_by_role("button", name="Clear mask").click()
    assert canvas.evaluate("c => c.getContext('2d').getImageData(1, 1, 1, 1).data[3]") == 0


@pytest.mark.ray
def test_empty_prompt_shows_the_api_message_at_the_prompt_field(page, served, shots):
    api = requests.post(served.url + "/v1/images/generations", json={"prompt": ""}, timeout=30)
    assert api.status_code == 400
    error = api.json()["error"]
    assert (error.get("field") or error.get("param")) == "prompt"

    wait_for_models(page)
    form = panel(page, "Generate")
    form.get_by_role("button", name="Generate").click()
    prompt = form.get_by_label("Prompt", exact=True)
    expect(prompt).to_have_attribute("aria-invalid", "true")
    expect(prompt).to_have_accessible_description(error["message"])
    expect(prompt).to_be_focused()
    expect(results(page)).to_have_count(0)
    shot(page, shots, "empty-prompt-error")
    # Typing clears the message.
    prompt.fill("a green pyramid")
    expect(prompt).not_to_have_attribute("aria-invalid", "true")

    # Another field: the page does not second-guess the server's limits, it shows them.
    api = requests.post(served.url + "/v1/images/generations", json={"prompt": "a", "steps": 999}, timeout=30)
    assert api.status_code == 400
    steps = form.get_by_label("Steps")
    steps.fill("999")
    form.get_by_role("button", name="Generate").click()
    expect(steps).to_have_accessible_description(api.json()["error"]["message"])
    expect(prompt).not_to_have_attribute("aria-invalid", "true")
    expect(results(page)).to_have_count(0)


@pytest.mark.ray
def test_api_key_asked_on_401_then_requests_succeed(page, served, shots):
    served.keys_file.write_text(API_KEY + "\n")
    try:
        page.reload()  # the model list now answers 401
        dialog = page.get_by_role("dialog", name="API key")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text("This server needs an API key")
        dialog.get_by_label("API key").fill("not-the-key-" + "x" * 8)
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_contain_text("did not accept")  # asked again
        shot(page, shots, "api-key-dialog")
        dialog.get_by_label("API key").fill(API_KEY)
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_be_hidden()
        wait_for_models(page)

        with page.expect_request("**/v1/images/generations") as sent:
            generate(page, "a yellow star")
        assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"
        expect(results(page)).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('raybooth.apiKey')") == API_KEY
        assert page.evaluate("localStorage.length") == 0
        expect(page.get_by_role("button", name="API key (set)")).to_be_visible()
    finally:
        served.keys_file.write_text("")


@pytest.mark.ray
def test_a_subject_chosen_from_the_list_is_what_the_request_names(page, served):
    wait_for_models(page)
    select = panel(page, "Generate").get_by_label("Model or subject")
    options = select.locator("option").all_inner_texts()
    assert options == ["tiny", "alpha (subject on tiny)", "beta (subject on tiny)"]
    select.select_option(label="beta (subject on tiny)")
    with page.expect_request("**/v1/images/generations") as sent:
        generate(page, "a photo of sks toy")
    assert json.loads(sent.value.post_data)["model"] == "beta"
    items = results(page)
    expect(items).to_have_count(1)
    assert items.nth(0).get_attribute("data-model") == "beta"
    expect(items.nth(0)).to_contain_text("beta")


@pytest.mark.ray
def test_busy_state_cancel_and_retry_after_503(page, served):
    """Network behaviour the server is too quick to show on its own: a request held open (busy
    state, cancel) and a 503 with Retry-After (the page waits, then retries by itself)."""
    wait_for_models(page)
    form = panel(page, "Generate")
    button = form.get_by_role("button", name="Generate")
    status = form.get_by_role("status")

    held = []
    page.route("**/v1/images/generations", lambda route: held.append(route))  # never answered
    # By keyboard: Ctrl+Enter in the prompt sends, Enter on Cancel cancels.
    form.get_by_label("Prompt", exact=True).fill("a slow request")
    form.get_by_label("Prompt", exact=True).press("Control+Enter")
    expect(button).to_be_disabled()
    expect(status).to_contain_text("Generating…")
    expect(status).to_contain_text(" s")
    form.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")
    expect(status).to_have_text("Cancelled")
    expect(button).to_be_enabled()
    expect(button).to_be_focused()  # focus is not lost with the disabled Cancel button
    page.unroute("**/v1/images/generations")

    calls = []

    def busy_once(route):
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/json"},
                          body=json.dumps({"error": {"code": "overloaded", "message": "the queue is full",
                                                     "field": None}}))
        else:
            route.continue_()

    page.route("**/v1/images/generations", busy_once)
    button.click()
    expect(status).to_contain_text("busy; retrying in 1 s")
    expect(results(page)).to_have_count(1)
    assert len(calls) == 2
