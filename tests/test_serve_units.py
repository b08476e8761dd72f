"""Serve pieces that need no running Serve: config files, app args, request limits, grouping of
a batch into pipeline calls, the model catalogue and API keys. (tests/test_serve_app.py and
friends test the same over real HTTP.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from raybooth.platform.errors import ConfigError, ModelError, UserError
from raybooth.serve_apps.auth import ApiKeys
from raybooth.serve_apps.catalog import Catalog
from raybooth.serve_apps.deploy import check_serve_config, load_serve_config, with_http
from raybooth.serve_apps.batching import ImageJob, group_jobs, images_in, run_group
from raybooth.serve_apps.schemas import EditRequest, GenerationRequest, check_generation, parse_request
from raybooth.serve_apps.settings import AuthSettings, Defaults, Limits, load_args

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml", "toy.yaml"])
def test_shipped_serve_configs_are_valid_for_serve_and_raybooth(name):
    config = load_serve_config(REPO / "configs" / "serve" / name)
    app = config["applications"][0]
    args = load_args(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Ingress", "TextToImage", "Inpainting"}
    for model in ("TextToImage", "Inpainting"):
        dep = deployments[model]
        assert dep["autoscaling_config"]["min_replicas"] == 1
        assert dep["max_queued_requests"] > 0 and dep["max_ongoing_requests"] >= dep["user_config"]["max_batch_size"]
    if name == "gpu.yaml":
        assert all(deployments[m]["ray_actor_options"]["num_gpus"] == 1 for m in ("TextToImage", "Inpainting"))
        assert deployments["TextToImage"]["autoscaling_config"]["max_replicas"] > 1
        assert args.text_to_image[0].dtype == "fp16" and args.inpainting[0].dtype == "fp16"
        assert "inpainting" in args.inpainting[0].model and args.auth.required
    else:
        assert config["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 330}
        base = "toy" if name == "toy.yaml" else "tiny"
        assert args.text_to_image[0].model == base and args.inpainting[0].model == f"{base}-inpainting"
    assert with_http(config, port=9)["http_options"]["port"] == 9 and config["http_options"]["port"] != 9


def test_config_mistakes_are_explained_with_the_key():
    base = yaml.safe_load((REPO / "configs" / "serve" / "local.yaml").read_text())
    bad = yaml.safe_load(yaml.safe_dump(base))
    bad["applications"][0]["args"]["text_to_image"][0]["max_loaded_subjcts"] = 3
    with pytest.raises(ConfigError, match="max_loaded_subjcts.*did you mean 'max_loaded_subjects'"):
        check_serve_config(bad, "x.yaml")
    bad = yaml.safe_load(yaml.safe_dump(base))
    bad["applications"][0]["deployments"][1]["max_ongoing_requests"] = "many"
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        check_serve_config(bad, "x.yaml")
    with pytest.raises(ConfigError, match="subject name"):
        load_args({"text_to_image": [{"model": "tiny", "subjects": {"../x": "/tmp/a"}}]})
    with pytest.raises(ConfigError, match="used twice"):
        load_args({"text_to_image": [{"model": "tiny", "subjects": {"tiny": "/tmp/a"}}]})
    with pytest.raises(ConfigError, match="give `name:`"):
        load_args({"text_to_image": [{"model": "models:/dog@prod"}]})
    with pytest.raises(ConfigError, match="deployment names used twice"):
        load_args({"text_to_image": [{"name": "a", "model": "tiny"}, {"name": "b", "model": "tiny", "deployment": "TextToImage"}]})


def test_catalog_routes_names_and_refuses_everything_else():
    args = load_args({
        "text_to_image": [{"name": "tiny", "model": "tiny", "subjects": {"rex": "/x"}},
                          {"name": "full", "model": "/models/full"}],
        "inpainting": [{"name": "tiny-inpainting", "model": "tiny-inpainting"}],
    })
    catalog = Catalog(args)
    assert catalog.resolve("text-to-image", None).name == "tiny"
    rex = catalog.resolve("text-to-image", "rex")
    assert (rex.deployment, rex.subject, rex.base) == ("TextToImage", "rex", "tiny")
    assert catalog.resolve("text-to-image", "full").deployment == "TextToImage-full"
    with pytest.raises(ModelError, match="served for inpainting") as err:
        catalog.resolve("text-to-image", "tiny-inpainting")
    assert err.value.field == "model"
    for name in ("/models/full", "../etc", "models:/rex@prod", "x" * 500):
        with pytest.raises(ModelError):
            catalog.resolve("text-to-image", name)
    assert Catalog(load_args({"inpainting": []})).defaults["inpainting"] is None


def test_request_limits_and_defaults():
    limits, defaults = Limits(max_images=4, max_steps=50, max_side=256), Defaults(steps=7)
    req = parse_request(GenerationRequest, {"prompt": "a dog", "seed": 3, "n": 2})
    params = check_generation(req, limits, defaults)
    assert (params["steps"], params["seed"], params["n"], params["scheduler"]) == (7, 3, 2, "ddim")
    assert check_generation(parse_request(GenerationRequest, {"prompt": "a"}), limits, defaults)["seed"] >= 0
    for body, field in [({"prompt": "a", "n": 5}, "n"), ({"prompt": "a", "steps": 51}, "steps"),
                        ({"prompt": "a", "width": 12}, "width"), ({"prompt": "a", "height": 512}, "height"),
                        ({"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale"),
                        ({"prompt": "a", "scheduler": "x"}, "scheduler")]:
        with pytest.raises(UserError) as err:
            check_generation(parse_request(GenerationRequest, body), limits, defaults)
        assert err.value.field == field
    with pytest.raises(UserError) as err:
        parse_request(EditRequest, {"prompt": "a", "mask": "x"})
    assert err.value.field == "image"  # the mask is optional (OpenAI: the image's transparency)


def _job(**kw) -> ImageJob:
    base = dict(task="text-to-image", prompt="p", seeds=[1], steps=4, guidance_scale=7.5, scheduler="ddim")
    return ImageJob(**{**base, **kw})


def test_a_batch_is_grouped_by_what_one_pipeline_call_must_share():
    jobs = [_job(), _job(prompt="q", seeds=[2, 3]), _job(steps=5), _job(subject="rex"), _job(guidance_scale=3),
            _job(width=128, height=64), _job(scheduler="euler"), _job(negative_prompt="blurry")]
    assert images_in(jobs) == 9
    groups = group_jobs(jobs)
    assert groups[0] == [0, 1, 7]  # prompts, seeds, n and negative prompts may differ
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 1, 3]
    img = Image.new("RGB", (96, 64))
    edits = [_job(task="inpainting", image=img, mask=img.convert("L")),
             _job(task="inpainting", image=img.resize((64, 64)), mask=img.convert("L")),
             _job(task="inpainting", image=img, mask=img.convert("L"), strength=0.5),
             _job(task="inpainting", image=img.resize((64, 64)), mask=img.convert("L"), crop_margin=8),
             _job(task="inpainting", image=img, mask=img.convert("L"), crop_margin=8)]
    # Whole-image inpainting runs at the image's size; crop-to-mask at the model's size.
    assert group_jobs(edits) == [[0], [1], [2], [3, 4]]
    split = _job(seeds=list(range(10))).split(4)
    assert [j.seeds for j in split] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_grouped_calls_give_each_job_its_own_images(tiny_path):
    from raybooth.platform.pipelines import DiffusionRunner

    runner = DiffusionRunner("tiny")
    a, b = _job(prompt="a red robot", seeds=[5], steps=2), _job(prompt="a blue car", seeds=[8, 9], steps=2,
                                                               negative_prompt="blurry")
    together = run_group(runner, [a, b], None)
    assert [len(x) for x in together] == [1, 2]
    alone_a = run_group(runner, [a], None)[0][0]
    alone_b = run_group(runner, [b], None)[0]
    diff = lambda x, y: np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int)).max()  # noqa: E731
    assert diff(together[0][0], alone_a) <= 1
    assert diff(together[1][0], alone_b[0]) <= 1 and diff(together[1][1], alone_b[1]) <= 1


def test_api_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("RB_TEST_KEYS", "k" * 20 + ", " + "j" * 20)
    keys = ApiKeys(AuthSettings(api_keys_env="RB_TEST_KEYS"))
    assert keys.enabled
    assert keys.check("Bearer " + "k" * 20) and keys.check("bearer " + "j" * 20)
    for header in (None, "", "Bearer", "Bearer " + "k" * 19, "Basic " + "k" * 20, "k" * 20, "Bearer " + "k" * 21):
        assert not keys.check(header), header
    monkeypatch.setenv("RB_TEST_SHORT", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        ApiKeys(AuthSettings(api_keys_env="RB_TEST_SHORT"))
    monkeypatch.delenv("RB_TEST_NONE", raising=False)
    assert ApiKeys(AuthSettings(api_keys_env="RB_TEST_NONE")).check(None)  # no keys: open
    with pytest.raises(ConfigError, match="required"):
        ApiKeys(AuthSettings(api_keys_env="RB_TEST_NONE", required=True))
    with pytest.raises(ConfigError, match="cannot be read"):
        ApiKeys(AuthSettings(api_keys_env="RB_TEST_NONE", api_keys_file=str(tmp_path / "missing")))
