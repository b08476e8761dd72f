"""Evaluation (DINO, CLIP-I, CLIP-T): the numbers equal a direct transformers computation, bad
input fails before Ray, the job runs on two actors and is deterministic, Hub encoders load offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raybooth.jobs.evaluate import metrics as M
from raybooth.jobs.evaluate.encoders import CLIP, DINO, load_encoder, resolve_encoder
from raybooth.jobs.evaluate.prompts import PROMPT_SETS, build_prompts
from raybooth.platform.config import ModelOptions
from raybooth.platform.errors import ModelError
from raybooth.platform.images import list_images, open_image

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "demo-subject"
TINY_CONFIG = REPO / "configs" / "evaluate" / "tiny.yaml"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
pytestmark = pytest.mark.timeout(300)


def fixed_images() -> list[Image.Image]:
    """Images of different sizes and aspect ratios (the resize and centre crop both matter)."""
    rng = np.random.default_rng(7)
    sizes = [(64, 64), (80, 48), (40, 96), (33, 50)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def real_images() -> list[Image.Image]:
    return [open_image(p) for p in list_images(SUBJECT, "subject")]


# ---------------------------------------------------------------------------------------------
# The direct computation: transformers' own processors and models, nothing of raybooth's


def direct_dino(path: Path, images: list[Image.Image]) -> torch.Tensor:
    from transformers import ViTImageProcessorPil, ViTModel

    processor = ViTImageProcessorPil.from_pretrained(path)
    model = ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixels).last_hidden_state[:, 0]


def direct_clip(path: Path, images: list[Image.Image], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    processor = CLIPImageProcessorPil.from_pretrained(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    model = CLIPModel.from_pretrained(path).eval()
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels)
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        txt = model.get_text_features(**tokens)
    pooled = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output  # noqa: E731
    return pooled(img), pooled(txt)


def cos_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return float((a @ b.T).mean())


@pytest.fixture(scope="module")
def encoders():
    dino = resolve_encoder("tiny-dino", DINO)
    clip = resolve_encoder("tiny-clip", CLIP)
    return dino, clip, load_encoder(dino), load_encoder(clip)


def test_each_metric_equals_a_direct_transformers_computation(encoders):
    dino_ref, clip_ref, dino, clip = encoders
    generated, real = fixed_images(), real_images()
    texts = ["a robot toy in the jungle", "a red robot toy", "a robot toy on the beach", "a shiny robot toy"]

    # Preprocessing without torchvision matches transformers' image processors pixel for pixel.
    from transformers import CLIPImageProcessorPil, ViTImageProcessorPil

    for ours, theirs in ((dino, ViTImageProcessorPil), (clip, CLIPImageProcessorPil)):
        expected = theirs.from_pretrained(ours.resolved.path)(images=generated, return_tensors="pt")["pixel_values"]
        assert torch.allclose(ours.preprocess(generated), expected, atol=1e-6)

    d_gen, d_real = direct_dino(Path(dino_ref.path), generated), direct_dino(Path(dino_ref.path), real)
    c_gen, c_txt = direct_clip(Path(clip_ref.path), generated, texts)
    c_real, _ = direct_clip(Path(clip_ref.path), real, texts[:1])
    expected_clip_t = float(torch.nn.functional.cosine_similarity(c_gen.double(), c_txt.double()).mean())

    dino_value = M.dino_score(dino.embed_images(generated), dino.embed_images(real))
    clip_i_value = M.clip_i_score(clip.embed_images(generated), clip.embed_images(real))
    clip_t_value = M.clip_t_score(clip.embed_images(generated), clip.embed_texts(texts))
    assert dino_value == pytest.approx(cos_mean(d_gen, d_real), abs=1e-5)
    assert clip_i_value == pytest.approx(cos_mean(c_gen, c_real), abs=1e-5)
    assert clip_t_value == pytest.approx(expected_clip_t, abs=1e-5)


def test_an_image_set_against_itself_scores_one(encoders):
    _, _, dino, clip = encoders
    image = real_images()[0]
    same = [image, image.copy(), image.copy()]
    assert M.dino_score(dino.embed_images(same), dino.embed_images(same)) == pytest.approx(1.0, abs=1e-6)
    assert M.clip_i_score(clip.embed_images(same), clip.embed_images(same)) == pytest.approx(1.0, abs=1e-6)
    # Distinct images: the all-pairs mean includes each image with itself (1.0); the real-vs-real
    # baseline leaves those pairs out, so it is lower.
    reals = dino.embed_images(real_images())
    assert M.real_baseline_scores(reals).mean() < M.dino_score(reals, reals) <= 1.0


def test_changing_the_prompt_changes_clip_t_and_not_clip_i(encoders):
    _, _, _, clip = encoders
    generated, real = fixed_images(), clip.embed_images(real_images())
    images = clip.embed_images(generated)
    a = M.clip_t_score(images, clip.embed_texts(["a robot toy in the jungle"] * 4))
    b = M.clip_t_score(images, clip.embed_texts(["a purple wizard outfit on a dog"] * 4))
    assert abs(a - b) > 1e-4
    assert M.clip_i_score(images, real) == M.clip_i_score(clip.embed_images(generated), real)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    scores = np.random.default_rng(0).normal(0.7, 0.1, 40)
    first = M.bootstrap(scores, samples=500, seed=3)
    assert first == M.bootstrap(scores, samples=500, seed=3)
    assert first.low < first.mean < first.high and first.n == 40
    assert first.mean == pytest.approx(scores.mean())


def test_paper_prompt_sets_and_identifier_removal():
    obj = build_prompts(prompt_set="object", prompts=None, identifier="sks", class_noun="backpack",
                        instance_prompt="a photo of sks backpack")
    live = build_prompts(prompt_set="live", prompts=None, identifier="sks", class_noun=None,
                         instance_prompt="a photo of sks dog")
    assert len(obj) == len(live) == 25 and set(PROMPT_SETS) == {"object", "live", "toy"}
    assert [p.category for p in obj].count("recontextualisation") == 20
    assert [p.category for p in live].count("accessorisation") == 10
    assert obj[0].prompt == "a sks backpack in the jungle" and obj[0].class_prompt == "a backpack in the jungle"
    assert live[-1].prompt == "a cube shaped sks dog" and live[-1].class_prompt == "a cube shaped dog"
    custom = build_prompts(prompt_set="object", prompts=["sks robot toy, on a beach"], identifier="sks",
                           class_noun=None, instance_prompt="a photo of sks robot toy")
    assert custom[0].class_prompt == "robot toy, on a beach"


# ---------------------------------------------------------------------------------------------
# Bad input: one paragraph naming the field or file, exit 2, before Ray starts


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from raybooth.cli import main

    code = main(["evaluate", "--config", str(TINY_CONFIG), "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda tmp: ["--subject-dir", str(tmp)], r"subject.instance_data_dir: no images in"),
        (lambda tmp: ["--subject-dir", str(_broken_subject(tmp))], r"robot-9.png.*corrupt|robot-9.png.*not a supported"),
        (lambda tmp: ["--set", "evaluation.prompts=null", "--set", "evaluation.prompt_set=animals"],
         r"evaluation.prompt_set 'animals' is not a prompt set"),
        (lambda tmp: ["--set", "evaluation.dino_encoder=tiny"], r"evaluation.dino_encoder: 'tiny' is a diffusion pipeline"),
        (lambda tmp: ["--set", f"evaluation.clip_encoder={_tiny_dino_dir()}"],
         r"evaluation.clip_encoder: .* is a 'vit' model, not an image encoder"),
        (lambda tmp: ["--set", "evaluation.images_per_prompt=0"], r"evaluation.images_per_prompt.*greater than or equal to 1"),
    ],
    ids=["empty-folder", "unreadable-image", "unknown-prompt-set", "encoder-is-a-pipeline",
         "clip-encoder-is-not-clip", "images-per-prompt-0"],
)
def test_bad_input_is_one_paragraph_exit_2_before_ray(make_args, expected, tmp_path, capsys):
    import re

    import ray

    was_running = ray.is_initialized()
    code, out, err = _run_cli([*make_args(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2, (out, err)
    message = err.strip()
    assert message.startswith("raybooth evaluate: error:") and "\n" not in message
    assert re.search(expected, message), message
    assert ray.is_initialized() == was_running  # no Ray started for a bad input
    assert not (tmp_path / "out" / "evaluation.json").exists()


def _broken_subject(tmp: Path) -> Path:
    folder = tmp / "subject"
    shutil.copytree(SUBJECT, folder)
    (folder / "robot-9.png").write_bytes((folder / "robot-0.png").read_bytes()[:200])
    return folder


def _tiny_dino_dir() -> Path:
    from raybooth.platform.encoders_tiny import tiny_encoder_path

    return tiny_encoder_path("tiny-dino")


# ---------------------------------------------------------------------------------------------
# Hub references offline, on a laid-out cache


def hub_cache(tmp_path: Path, source: Path, repo_id: str) -> Path:
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    return cache


def test_hub_encoders_load_offline_from_a_laid_out_cache_and_refuse_pickle(encoders, tmp_path):
    from raybooth.platform.encoders_tiny import tiny_encoder_path

    _, _, dino, clip = encoders
    hub_cache(tmp_path, tiny_encoder_path("tiny-dino"), "facebook/dino-vits16")
    cache = hub_cache(tmp_path, tiny_encoder_path("tiny-clip"), "openai/clip-vit-base-patch32")
    options = ModelOptions(cache_dir=str(cache), local_files_only=True)
    images = fixed_images()
    for ref, role, tiny in (("facebook/dino-vits16", DINO, dino), ("openai/clip-vit-base-patch32", CLIP, clip)):
        resolved = resolve_encoder(ref, role, options)
        assert resolved.kind == "hub" and resolved.revision == COMMIT  # the commit is recorded
        assert np.array_equal(load_encoder(resolved).embed_images(images), tiny.embed_images(images))
    with pytest.raises(ModelError, match=r"offline mode is on.*huggingface-cli download acme/absent"):
        resolve_encoder("acme/absent", DINO, options)

    # A checkpoint with only pickle weights is refused unless the user opts in.
    snapshot = cache / "models--facebook--dino-vits16" / "snapshots" / COMMIT
    from safetensors.torch import load_file

    torch.save(load_file(snapshot / "model.safetensors"), snapshot / "pytorch_model.bin")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle"):
        resolve_encoder("facebook/dino-vits16", DINO, options)
    opted_in = ModelOptions(cache_dir=str(cache), local_files_only=True, allow_pickle=True)
    loaded = load_encoder(resolve_encoder("facebook/dino-vits16", DINO, opted_in))
    assert np.allclose(loaded.embed_images(images), dino.embed_images(images), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The job on Ray actors


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_path):
    """configs/evaluate/tiny.yaml (2 actors) through the Python entry point."""
    import ray

    from raybooth.jobs.evaluate.config import EvaluateConfig
    from raybooth.jobs.evaluate.job import evaluate_config
    from raybooth.platform.config import load_config
    from conftest import RAY_CPUS

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    out = tmp_path_factory.mktemp("eval-a")
    config = load_config(TINY_CONFIG, [f"output_dir={out}"], schema=EvaluateConfig)
    return evaluate_config(config, progress=False)


def test_job_on_two_actors_writes_report_images_and_grid(first_run):
    report, folder = first_run.report, first_run.path.parent
    assert report.execution["num_actors"] == 2 and report.execution["actor_replacements"] == 0
    assert report.counts == {"prompts": 4, "images_per_prompt": 2, "generated": 8, "real": 5}
    assert set(report.metrics) == {"dino", "clip_i", "clip_t"} and set(report.baseline) == {"dino", "clip_i"}
    for est in report.metrics.values():
        assert est.low <= est.mean <= est.high and est.n == 8
    assert [p.class_prompt for p in report.per_prompt][:2] == ["a robot toy in the jungle", "a robot toy on the beach"]
    assert report.encoders["dino"]["revision"] == "v1" and report.model["model_kind"] == "tiny"
    assert {r.seed for r in report.images} == {0, 1}  # image k of every prompt uses seed + k
    for record in report.images:
        assert (folder / record.file).is_file()
    grid = Image.open(folder / "grid.png")
    assert grid.height >= 5 * 64  # a row of real images, then one row per prompt
    on_disk = json.loads(first_run.path.read_text())
    assert on_disk["metrics"]["dino"]["mean"] == report.metrics["dino"].mean


def test_job_metrics_equal_a_direct_computation_on_its_own_images(first_run):
    """The whole pipeline (actors, PNG round trip, preprocessing, metrics) against transformers
    run here on the images the job wrote."""
    report, folder = first_run.report, first_run.path.parent
    generated = [Image.open(folder / r.file).convert("RGB") for r in report.images]
    texts = [r.class_prompt for r in report.images]
    dino_path = Path(resolve_encoder("tiny-dino", DINO).path)
    clip_path = Path(resolve_encoder("tiny-clip", CLIP).path)
    c_gen, c_txt = direct_clip(clip_path, generated, texts)
    c_real, _ = direct_clip(clip_path, real_images(), texts[:1])
    assert report.metrics["dino"].mean == pytest.approx(
        cos_mean(direct_dino(dino_path, generated), direct_dino(dino_path, real_images())), abs=1e-5)
    assert report.metrics["clip_i"].mean == pytest.approx(cos_mean(c_gen, c_real), abs=1e-5)
    expected_t = torch.nn.functional.cosine_similarity(c_gen.double(), c_txt.double())
    assert report.metrics["clip_t"].mean == pytest.approx(float(expected_t.mean()), abs=1e-5)
    assert [r.clip_t for r in report.images] == pytest.approx(expected_t.tolist(), abs=1e-5)


def test_same_config_twice_gives_the_same_values_and_the_cli_prints_the_path_last(first_run, tmp_path, capsys):
    code, out, err = _run_cli(["--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1])
    assert path == tmp_path / "b" / "evaluation.json"
    first, second = json.loads(first_run.path.read_text()), json.loads(path.read_text())
    for key in ("metrics", "baseline", "per_prompt", "per_category", "counts", "encoders"):
        assert first[key] == second[key], key
    assert [r["dino"] for r in first["images"]] == [r["dino"] for r in second["images"]]
    for r in first["images"]:  # byte-identical images
        assert (first_run.path.parent / r["file"]).read_bytes() == (path.parent / r["file"]).read_bytes()


def test_quick_mode_needs_the_class_noun_and_an_oversized_pool_is_an_error(tmp_path, capsys):
    from raybooth.cli import main
    from raybooth.jobs.evaluate.job import check_fits
    from raybooth.jobs.evaluate.pool import ActorPlan
    from raybooth.platform.errors import ConfigError

    code = main(["evaluate", "--model", "tiny", "--subject-dir", str(SUBJECT), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--class-noun is needed with --subject-dir" in err and "\n" not in err

    check_fits(ActorPlan(num_actors=2, num_cpus=1, num_gpus=0, use_gpu=False), {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"2 actor\(s\) x 1 GPU need 2 GPUs but the cluster has 1"):
        check_fits(ActorPlan(num_actors=2, num_cpus=1, num_gpus=1, use_gpu=True), {"CPU": 16.0, "GPU": 1.0})


# ---------------------------------------------------------------------------------------------
# The toy world's judge as metrics


def test_toy_judge_scores_read_the_subject_and_the_prompt():
    from raybooth.jobs.evaluate.actor import encode_png
    from raybooth.jobs.evaluate.toy_scores import decode_rgb, requested, score_images
    from raybooth.platform.toy.subject import SUBJECT, render_subject
    from raybooth.platform.toy.world import Scene, render

    assert requested("a yellow square on a white background") == {
        "background": "white", "shape": "square", "colour": "yellow"}
    images = [
        encode_png(render_subject(SUBJECT, "green", 0.6)),  # the subject, where it was asked
        encode_png(render_subject(SUBJECT, "black", 0.6)),  # the subject, on the wrong background
        encode_png(render(Scene(colour="yellow", shape="square", background="white"))),  # not the subject
    ]
    prompts = ["a sks circle on a green background", "a sks circle on a green background",
               "a yellow square on a white background"]
    subject, prompt, readings = score_images(decode_rgb(images), prompts, [p.replace("sks ", "") for p in prompts], "sks")
    assert subject[0] > 0.9 and subject[1] > 0.9 and subject[2] == 0.0
    assert prompt.tolist() == [1.0, 0.0, 1.0]
    assert readings[2]["colour"] == "yellow" and readings[2]["shape"] == "square"


def test_toy_model_report_has_the_judge_scores(first_run, tmp_path):
    """configs/evaluate/toy.yaml, cut down: the toy model, the toy prompt set, one actor."""
    from raybooth.jobs.evaluate.config import EvaluateConfig
    from raybooth.jobs.evaluate.job import evaluate_config
    from raybooth.platform.config import load_config

    config = load_config(REPO / "configs" / "evaluate" / "toy.yaml",
                         [f"output_dir={tmp_path}", "evaluation.images_per_prompt=1",
                          "evaluation.num_actors=1", "evaluation.steps=10",
                          f"subject.instance_data_dir={REPO / 'examples' / 'toy-subject'}"],
                         schema=EvaluateConfig)
    report = evaluate_config(config, progress=False).report
    assert {"dino", "clip_i", "clip_t", "toy_subject", "toy_prompt"} == set(report.metrics)
    assert report.baseline["toy_subject"].mean > 0.9  # the subject's own photos are the subject
    assert 0.0 <= report.metrics["toy_prompt"].mean <= 1.0 and report.counts["generated"] == 4
    assert all("toy_reading" in r.extra and "toy_subject" in r.extra for r in report.images)
    assert all(set(p.values) == set(report.metrics) for p in report.per_prompt)
