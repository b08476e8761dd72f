"""Model references: tiny models, local directories, the Hub offline, safetensors only."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from raybooth.platform.config import ModelOptions
from raybooth.platform.errors import ModelError
from raybooth.platform.models import check_model_ref, load_components, resolve_model
from raybooth.platform.pipelines import DiffusionRunner
from raybooth.platform.generation import GenerationParams

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tmp_path: Path, source: Path, repo_id: str = "acme/tiny-sd") -> Path:
    """Lay out a Hugging Face Hub cache holding `source` as `repo_id` at revision main."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    return cache


def test_tiny_models_have_the_sd_layout(tiny_path, tiny_inpainting_path):
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert list(tiny_path.glob("unet/*.safetensors")) and not list(tiny_path.rglob("*.bin"))
    unet9 = json.loads((tiny_inpainting_path / "unet" / "config.json").read_text())
    assert unet9["in_channels"] == 9
    assert resolve_model("tiny").path == tiny_path  # built once, then reused


def test_tiny_model_is_deterministic_across_builds(tiny_path, tmp_path, monkeypatch):
    from raybooth.platform.tiny import tiny_model_path

    monkeypatch.setenv("RAYBOOTH_HOME", str(tmp_path))
    other = tiny_model_path("tiny")
    assert other != tiny_path
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (other / name).read_bytes() == (tiny_path / name).read_bytes()


def test_local_directory_reference(tiny_path, tmp_path):
    local = tmp_path / "my-model"
    shutil.copytree(tiny_path, local)
    resolved = resolve_model(str(local))
    assert resolved.kind == "local" and resolved.path == local.resolve()
    comps = load_components(resolved)
    assert comps["unet"].config.in_channels == 4


def test_hub_id_loads_offline_from_a_laid_out_cache(tiny_path, tmp_path):
    cache = hub_cache(tmp_path, tiny_path)
    options = ModelOptions(cache_dir=str(cache), local_files_only=True)
    resolved = resolve_model("acme/tiny-sd", options)
    assert resolved.kind == "hub"
    assert resolved.revision == COMMIT  # the commit the revision resolved to is recorded
    runner = DiffusionRunner(resolved)
    image = runner.text_to_image(["a photo"], [1], GenerationParams(steps=2))[0]
    assert image.size == (64, 64)
    # Same weights as the tiny model itself: the Hub path loads through the same from_pretrained.
    reference = DiffusionRunner("tiny").text_to_image(["a photo"], [1], GenerationParams(steps=2))[0]
    assert image.tobytes() == reference.tobytes()


def test_hub_revision_and_missing_model_offline(tiny_path, tmp_path):
    cache = hub_cache(tmp_path, tiny_path)
    options = ModelOptions(cache_dir=str(cache), local_files_only=True, revision=COMMIT)
    assert resolve_model("acme/tiny-sd", options).revision == COMMIT
    with pytest.raises(ModelError, match=r"offline mode is on.*huggingface-cli download acme/absent"):
        resolve_model("acme/absent", ModelOptions(cache_dir=str(cache), local_files_only=True))


def _pickle_only(tiny_path: Path, dest: Path) -> Path:
    shutil.copytree(tiny_path, dest)
    from safetensors.torch import load_file

    unet = dest / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    return dest


def test_pickle_checkpoints_are_refused_unless_opted_in(tiny_path, tmp_path):
    local = _pickle_only(tiny_path, tmp_path / "pickled")
    with pytest.raises(ModelError, match=r"pickle checkpoint.*allow_pickle"):
        resolve_model(str(local))
    resolved = resolve_model(str(local), ModelOptions(allow_pickle=True))
    comps = load_components(resolved)
    assert comps["unet"].config.in_channels == 4


def test_pickle_only_hub_model_is_refused(tiny_path, tmp_path):
    local = _pickle_only(tiny_path, tmp_path / "pickled")
    cache = hub_cache(tmp_path, local, "acme/pickled")
    with pytest.raises(ModelError, match="allow_pickle"):
        resolve_model("acme/pickled", ModelOptions(cache_dir=str(cache), local_files_only=True))


@pytest.mark.parametrize("bad", ["", "   ", "../../etc/passwd", "a/b/c", "http://x/y", "tiny;rm"])
def test_bad_references_are_rejected_before_any_loader(bad):
    with pytest.raises(ModelError):
        check_model_ref(bad)


def test_not_a_pipeline_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        resolve_model(str(tmp_path / "empty"))
