"""The Serve app over real HTTP (tiny models): batching, determinism, LoRA subjects on one
replica, a full model as its own deployment, inpainting, and 4xx for every kind of bad input.

One app for the whole module (starting Serve costs ~20 s): a TextToImage deployment with three
sample LoRA subjects (at most two loaded at once), a second text-to-image deployment serving a
local copy of the tiny model (as a fully fine-tuned model would be served), and Inpainting.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from _serve_support import decode_png, generate, png_b64, serve_config, start_app, stop_serve, wait_until, free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

MAX_INPUT_PIXELS = 128 * 128
MAX_BODY = 300_000


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_path, tiny_inpainting_path):
    from raybooth.serve_apps.sample_subjects import make_sample_subject

    root = tmp_path_factory.mktemp("serve-app")
    subjects = {name: str(make_sample_subject(root / name, seed)) for name, seed in
                (("alpha", 11), ("beta", 12), ("gamma", 13))}
    full = root / "tiny-full"
    shutil.copytree(tiny_path, full)  # a local diffusers folder, as a full fine-tune exports
    args = {
        "text_to_image": [
            {"name": "tiny", "model": "tiny", "subjects": subjects, "max_loaded_subjects": 2, "warmup_steps": 1},
            {"name": "tiny-full", "model": str(full), "deployment": "TextToImageFull", "warmup_steps": 0},
        ],
        "inpainting": [{"name": "tiny-inpainting", "model": "tiny-inpainting", "warmup_steps": 1}],
        "limits": {"max_body_bytes": MAX_BODY, "max_prompt_chars": 200, "max_images": 4, "max_steps": 50,
                   "max_side": 256, "max_input_pixels": MAX_INPUT_PIXELS},
        # A variable nobody sets: these tests run with auth off whatever the environment holds.
        "auth": {"api_keys_env": f"RAYBOOTH_TEST_UNSET_{uuid.uuid4().hex[:8]}"},
        "defaults": {"steps": 4},
    }
    model_options = {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.5},
                     "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.5}}
    deployments = [
        {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}},
        {"name": "TextToImage", **model_options},
        {"name": "TextToImageFull", **model_options},
        {"name": "Inpainting", **model_options},
    ]
    url = start_app(serve_config(args, deployments, free_port()))
    yield SimpleNamespace(url=url, subjects=subjects)
    stop_serve()


def _json(resp: requests.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), resp.text[:200]
    return resp.json()


def _t2i_info() -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("TextToImage", app_name="raybooth")
    return handle.info.remote().result(timeout_s=30)


# ---------------------------------------------------------------------------------------------


def test_health_models_and_docs_are_served(served):
    health = requests.get(served.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"

    models = _json(requests.get(served.url + "/v1/models", timeout=10))["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["tiny"]["task"] == "text-to-image" and by_id["tiny"]["kind"] == "model"
    for subject in ("alpha", "beta", "gamma"):
        assert by_id[subject]["kind"] == "subject" and by_id[subject]["base_model"] == "tiny"
    assert by_id["tiny-full"]["deployment"] == "TextToImageFull"
    assert by_id["tiny-inpainting"]["task"] == "inpainting"
    # No server paths leak into the listing.
    assert not any(path in json.dumps(models) for path in served.subjects.values())

    spec = requests.get(served.url + "/openapi.json", timeout=10).json()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/healthz"} <= set(spec["paths"])
    edit_body = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(edit_body)
    assert requests.get(served.url + "/docs", timeout=10).status_code == 200


def test_generation_returns_images_seeds_parameters_and_timings(served):
    resp = generate(served.url, prompt="a photo of a toy robot", n=2, steps=3)
    assert resp.status_code == 200, resp.text
    body = _json(resp)
    assert resp.headers.get("x-request-id") == body["request_id"]
    seeds = [d["seed"] for d in body["data"]]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1  # made up, returned, image k = seed + k
    assert body["model"] == "tiny"
    params = body["parameters"]
    assert (params["steps"], params["width"], params["height"], params["scheduler"]) == (3, 64, 64, "ddim")
    assert params["guidance_scale"] == 7.5 and params["seed"] == seeds[0]
    assert body["batch_size"] >= 2 and body["timings"]["inference_s"] > 0
    assert body["timings"]["queue_s"] >= 0 and body["timings"]["total_s"] >= body["timings"]["inference_s"]
    first = [decode_png(d["b64_json"]) for d in body["data"]]
    assert first[0].shape == (64, 64, 3)

    again = _json(generate(served.url, prompt="a photo of a toy robot", n=2, steps=3, seed=seeds[0]))
    for a, b in zip(first, [decode_png(d["b64_json"]) for d in again["data"]]):
        assert np.abs(a - b).max() <= 1

    png = generate(served.url, prompt="a photo of a toy robot", steps=3, seed=seeds[0], response_format="png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-seed"] == str(seeds[0])
    image = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(np.int16)
    assert np.abs(image - first[0]).max() <= 1


def test_concurrent_requests_are_batched_and_seed_gives_same_image_alone_or_batched(served):
    target = dict(prompt="a red lighthouse", seed=1234, steps=4, negative_prompt="blurry")
    alone = _json(generate(served.url, **target))
    assert alone["batch_size"] == 1
    reference = decode_png(alone["data"][0]["b64_json"])

    # 8 images in all (the batch limit), sent at once: other prompts and seeds, a request of two
    # images, and one with another step count (same batch, its own pipeline call).
    others = [dict(prompt=f"a toy number {i}", seed=i, steps=4) for i in range(4)]
    others += [dict(prompt="a different group", seed=99, steps=3), dict(prompt="two images", seed=7, steps=4, n=2)]
    bodies = [target, *others]
    for attempt in range(3):  # a loaded machine can spread arrivals past the batch window: retry
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: generate(served.url, **b), bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
        results = [_json(r) for r in responses]
        if results[0]["batch_size"] > 1:
            break
    assert max(r["batch_size"] for r in results) > 1
    batched = results[0]
    assert batched["batch_size"] > 1, "the target request never shared a batch"
    # Same request and seed: the same image, whatever else shared the batch (CPU: max 1/255).
    diff = np.abs(decode_png(batched["data"][0]["b64_json"]) - reference).max()
    assert diff <= 1, f"batched image differs from the solo one by {diff}/255"
    two = results[-1]
    assert [d["seed"] for d in two["data"]] == [7, 8]
    group_sizes = {r["group_size"] for r in results}
    assert any(r["group_size"] < r["batch_size"] for r in results) or len(group_sizes) > 1


def test_two_subjects_share_one_replica_and_lru_eviction_keeps_outputs(served):
    prompt = dict(prompt="a photo of sks toy", seed=5, steps=4)
    base = _json(generate(served.url, **prompt))
    alpha = _json(generate(served.url, model="alpha", **prompt))
    beta = _json(generate(served.url, model="beta", **prompt))
    assert alpha["model"] == "alpha" and beta["model"] == "beta"
    assert base["replica"] == alpha["replica"] == beta["replica"]  # one replica, one base pipeline
    images = {name: decode_png(r["data"][0]["b64_json"]) for name, r in
              (("base", base), ("alpha", alpha), ("beta", beta))}
    assert np.abs(images["alpha"] - images["base"]).mean() > 2
    assert np.abs(images["beta"] - images["base"]).mean() > 2
    assert np.abs(images["alpha"] - images["beta"]).mean() > 2
    assert set(_t2i_info()["loaded_subjects"]) == {"alpha", "beta"}

    # A third subject evicts the least recently used (alpha): at most 2 stay loaded.
    gamma = _json(generate(served.url, model="gamma", **prompt))
    assert np.abs(decode_png(gamma["data"][0]["b64_json"]) - images["alpha"]).mean() > 2
    assert set(_t2i_info()["loaded_subjects"]) == {"beta", "gamma"}
    # alpha comes back on demand and draws exactly what it drew before; the base is untouched.
    alpha_again = _json(generate(served.url, model="alpha", **prompt))
    assert np.abs(decode_png(alpha_again["data"][0]["b64_json"]) - images["alpha"]).max() <= 1
    base_again = _json(generate(served.url, **prompt))
    assert np.abs(decode_png(base_again["data"][0]["b64_json"]) - images["base"]).max() <= 1

    # Concurrent requests for two subjects: batches never mix subjects, each gets its own look.
    bodies = [dict(model="alpha", **prompt), dict(model="beta", **prompt)] * 2
    with cf.ThreadPoolExecutor(4) as pool:
        mixed = [_json(r) for r in pool.map(lambda b: generate(served.url, **b), bodies)]
    for body, name in zip(mixed, ["alpha", "beta"] * 2):
        assert np.abs(decode_png(body["data"][0]["b64_json"]) - images[name]).max() <= 1


def test_a_full_model_is_its_own_deployment(served):
    prompt = dict(prompt="a photo of a toy robot", seed=21, steps=3)
    tiny = _json(generate(served.url, **prompt))
    full = _json(generate(served.url, model="tiny-full", **prompt))
    assert full["model"] == "tiny-full" and full["replica"] != tiny["replica"]
    # The folder is a copy of tiny: the same weights give the same image.
    assert np.abs(decode_png(full["data"][0]["b64_json"]) - decode_png(tiny["data"][0]["b64_json"])).max() <= 1


def _scene() -> tuple[Image.Image, Image.Image]:
    img = Image.new("RGB", (96, 64), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 42, 96, 64], fill=(90, 160, 70))
    d.rectangle([30, 28, 58, 48], fill=(180, 80, 60))
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle([24, 12, 64, 50], fill=255)
    return img, mask


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_inpainting_keeps_unmasked_pixels_multipart_and_json(served):
    img, mask = _scene()
    fields = {"prompt": "a red barn", "seed": "3", "steps": "4", "crop_margin": "8"}
    multipart = requests.post(
        served.url + "/v1/images/edits", data=fields, timeout=120,
        files={"image": ("scene.png", _png(img), "image/png"), "mask": ("mask.png", _png(mask), "image/png")},
    )
    assert multipart.status_code == 200, multipart.text
    body = _json(multipart)
    assert body["model"] == "tiny-inpainting"
    out = decode_png(body["data"][0]["b64_json"])
    original = np.asarray(img).astype(np.int16)
    keep = np.asarray(mask) == 0
    assert out.shape == original.shape
    assert (out[keep] == original[keep]).all(), "a pixel outside the mask changed"
    assert np.abs(out[~keep] - original[~keep]).mean() > 5, "the masked area was not repainted"

    as_json = requests.post(served.url + "/v1/images/edits", timeout=120, json={
        "prompt": "a red barn", "seed": 3, "steps": 4, "crop_margin": 8,
        "image": png_b64(img), "mask": "data:image/png;base64," + png_b64(mask),
    })
    assert as_json.status_code == 200, as_json.text
    assert np.abs(decode_png(_json(as_json)["data"][0]["b64_json"]) - out).max() <= 1


# ---------------------------------------------------------------------------------------------
# Bad input: always a 4xx JSON error that names the field; never a 500.

_LONG = "x" * 201
BAD_GENERATIONS = [
    ("missing prompt", {"seed": 1}, 400, "prompt"),
    ("empty prompt", {"prompt": "  "}, 400, "prompt"),
    ("unknown field", {"prompt": "a", "promt": "b"}, 400, "promt"),
    ("prompt too long", {"prompt": _LONG}, 400, "prompt"),
    ("negative too long", {"prompt": "a", "negative_prompt": _LONG}, 400, "negative_prompt"),
    ("prompt not text", {"prompt": 12}, 400, "prompt"),
    ("n zero", {"prompt": "a", "n": 0}, 400, "n"),
    ("n too many", {"prompt": "a", "n": 5}, 400, "n"),
    ("n not int", {"prompt": "a", "n": 1.5}, 400, "n"),
    ("steps zero", {"prompt": "a", "steps": 0}, 400, "steps"),
    ("steps too many", {"prompt": "a", "steps": 51}, 400, "steps"),
    ("guidance negative", {"prompt": "a", "guidance_scale": -1}, 400, "guidance_scale"),
    ("guidance too big", {"prompt": "a", "guidance_scale": 31}, 400, "guidance_scale"),
    ("width not multiple of 8", {"prompt": "a", "width": 60}, 400, "width"),
    ("height over the limit", {"prompt": "a", "height": 264}, 400, "height"),
    ("unknown scheduler", {"prompt": "a", "scheduler": "warp"}, 400, "scheduler"),
    ("negative seed", {"prompt": "a", "seed": -1}, 400, "seed"),
    ("png with n>1", {"prompt": "a", "n": 2, "response_format": "png"}, 400, "response_format"),
    ("bad response_format", {"prompt": "a", "response_format": "jpeg"}, 400, "response_format"),
    ("unknown model", {"prompt": "a", "model": "sdxl"}, 404, "model"),
    ("a path as model", {"prompt": "a", "model": "../../etc/passwd"}, 404, "model"),
    ("registry ref as model", {"prompt": "a", "model": "models:/x@prod"}, 404, "model"),
    ("inpainting model for t2i", {"prompt": "a", "model": "tiny-inpainting"}, 404, "model"),
]


@pytest.mark.parametrize("case,body,status,field", BAD_GENERATIONS, ids=[c[0] for c in BAD_GENERATIONS])
def test_bad_generation_requests_get_4xx_naming_the_field(served, case, body, status, field):
    resp = requests.post(served.url + "/v1/images/generations", json=body, timeout=30)
    assert resp.status_code == status, (case, resp.status_code, resp.text)
    err = _json(resp)["error"]
    assert err["field"] == field, (case, err)
    assert err["code"] and len(err["message"]) > 10


def _post_raw(url: str, data: bytes, content_type: str) -> requests.Response:
    return requests.post(url, data=data, headers={"Content-Type": content_type}, timeout=30)


def test_malformed_bodies_routes_and_sizes_get_4xx(served):
    gen = served.url + "/v1/images/generations"
    cases = [
        (_post_raw(gen, b"{not json", "application/json"), 400, "invalid_json"),
        (_post_raw(gen, b"[1, 2]", "application/json"), 400, "invalid_request"),
        (_post_raw(gen, b"", "application/json"), 400, "invalid_request"),
        (_post_raw(gen, b"prompt=a", "text/plain"), 415, "unsupported_media_type"),
        (requests.post(gen, json={"prompt": "a", "negative_prompt": "y" * MAX_BODY}, timeout=30), 413,
         "payload_too_large"),
        (requests.get(gen, timeout=30), 405, "method_not_allowed"),
        (requests.get(served.url + "/v1/nothing-here", timeout=30), 404, "not_found"),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, (code, resp.status_code, resp.text[:300])
        assert _json(resp)["error"]["code"] == code


def test_bad_inpainting_inputs_get_4xx_naming_the_field(served):
    edits = served.url + "/v1/images/edits"
    img, mask = _scene()
    good = {"image": ("i.png", _png(img), "image/png"), "mask": ("m.png", _png(mask), "image/png")}

    def multipart(files, **fields):
        return requests.post(edits, data={"prompt": "a barn", "steps": "2", **fields}, files=files, timeout=60)

    def as_json(**body):
        return requests.post(edits, json={"prompt": "a barn", "steps": 2, **body}, timeout=60)

    big = Image.new("RGB", (200, 200), (10, 20, 30))  # 40000 pixels > 128*128
    cases = [
        ("undecodable image", multipart({**good, "image": ("i.png", b"this is not an image", "image/png")}), 400, "image"),
        ("truncated image", multipart({**good, "image": ("i.png", _png(img)[:60], "image/png")}), 400, "image"),
        ("mask of another size", multipart({**good, "mask": ("m.png", _png(mask.resize((32, 32))), "image/png")}), 400, "mask"),
        ("too many pixels", multipart({"image": ("i.png", _png(big), "image/png"),
                                       "mask": ("m.png", _png(big.convert("L")), "image/png")}), 413, "image"),
        ("missing mask", multipart({"image": good["image"]}), 400, "mask"),
        ("extra file", multipart({**good, "other": ("o.png", b"x", "image/png")}), 400, "other"),
        ("strength zero", multipart(good, strength="0"), 400, "strength"),
        ("strength not a number", multipart(good, strength="strong"), 400, "strength"),
        ("mask blur negative", multipart(good, mask_blur="-1"), 400, "mask_blur"),
        ("crop margin negative", multipart(good, crop_margin="-4"), 400, "crop_margin"),
        ("unknown scheduler", multipart(good, scheduler="warp"), 400, "scheduler"),
        ("t2i-only subject", multipart(good, model="alpha"), 404, "model"),
        ("bad base64", as_json(image="!!!not base64!!!", mask=png_b64(mask)), 400, "image"),
        ("base64 of junk", as_json(image=png_b64(img), mask="aGVsbG8gd29ybGQ="), 400, "mask"),
        ("json without image", as_json(mask=png_b64(mask)), 400, "image"),
    ]
    for case, resp, status, field in cases:
        assert resp.status_code == status, (case, resp.status_code, resp.text[:300])
        err = _json(resp)["error"]
        assert err["field"] == field, (case, err)


def test_each_request_logs_one_json_line_with_its_request_id(served):
    import ray

    request_id = f"test-{uuid.uuid4().hex}"
    resp = generate(served.url, prompt="a log line", steps=2, seed=1, headers={"X-Request-ID": request_id})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == request_id
    bad = requests.post(served.url + "/v1/images/generations", json={"prompt": "a", "steps": 0},
                        headers={"X-Request-ID": request_id + "-bad"}, timeout=30)
    assert bad.status_code == 400

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def lines() -> list[dict]:
        found = []
        for path in logs.glob("replica_raybooth_Ingress_*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if '"event": "http_request"' in line and request_id in line:
                    found.append(json.loads(line[line.index("{"):]))
        return found

    assert wait_until(lambda: len(lines()) >= 2, 20), f"no log lines for {request_id} in {logs}"
    entries = {e["request_id"]: e for e in lines()}
    ok = entries[request_id]
    assert ok["status"] == 200 and ok["path"] == "/v1/images/generations" and ok["model"] == "tiny"
    assert ok["batch_size"] >= 1 and ok["latency_ms"] > 0 and "inference_s" in ok
    assert entries[request_id + "-bad"]["status"] == 400
    assert sum(1 for e in lines() if e["request_id"] == request_id) == 1


def test_prometheus_metrics_count_images_batches_and_requests(served):
    import urllib.request

    import ray

    assert generate(served.url, prompt="metrics", steps=2, seed=2, n=2).status_code == 200
    assert generate(served.url, prompt="metrics", steps=2, seed=2, model="beta").status_code == 200
    assert generate(served.url, prompt="metrics", steps=0).status_code == 400
    port = ray._private.worker._global_node.metrics_export_port
    wanted = ["ray_raybooth_images_generated_total", "ray_raybooth_batch_images_bucket",
              "ray_raybooth_inference_seconds_count", "ray_raybooth_queue_seconds_count",
              "ray_raybooth_http_requests_total", "ray_raybooth_subject_loads_total"]
    text = ""

    def series(name: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(name)]

    def exported() -> bool:
        # Ray pushes metrics every few seconds: wait until this test's requests show.
        nonlocal text
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        images = [line for line in series("ray_raybooth_images_generated_total") if 'model="tiny"' in line]
        return (all(name in text for name in wanted)
                and sum(float(line.rsplit(" ", 1)[1]) for line in images) >= 2
                and any('status="400"' in line for line in series("ray_raybooth_http_requests_total"))
                and any('model="beta"' in line for line in series("ray_raybooth_images_generated_total")))

    assert wait_until(exported, 60, poll_s=2), [n for n in wanted if n not in text] or text[-3000:]
