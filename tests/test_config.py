"""Configuration: YAML + typed overrides, errors that name the file, the key and the fix."""

from pathlib import Path

import pytest

from raybooth.platform.config import TrainConfig, flatten, load_config, with_overrides
from raybooth.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  max_steps: 7\n  learning_rate: 1.0e-4\n"))
    assert cfg.train.max_steps == 7
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.model == "tiny"


def test_overrides_are_typed_by_the_schema(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  max_steps: 7\n"),
        [
            "train.max_steps=12",
            "train.learning_rate=1e-5",  # YAML 1.1 reads this as a string; the schema makes it a float
            "train.mixed_precision=bf16",
            "scaling.use_gpu=true",
            "run.name=yes",  # a string field keeps the literal text
            "priors.num_actors=auto",
            "model_options.revision=null",
        ],
    )
    assert cfg.train.max_steps == 12
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == pytest.approx(1e-5)
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.scaling.use_gpu is True
    assert cfg.run.name == "yes"
    assert cfg.priors.num_actors == "auto"
    assert cfg.model_options.revision is None


def test_unknown_key_names_file_path_and_nearest(tmp_path):
    path = write(tmp_path, "train:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.learnig_rate" in msg and "did you mean 'learning_rate'" in msg


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match=r"--set train.max_step.*did you mean 'max_steps'"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["train.max_steps"])


def test_wrong_type_names_key_and_expectation(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  max_steps: many\n"))
    assert "'train.max_steps'" in str(err.value) and "integer" in str(err.value)
    with pytest.raises(ConfigError, match=r"'train.mixed_precision'.*'no', 'fp16' or 'bf16'"):
        load_config(None, ["train.mixed_precision=fp8"])


def test_semantic_checks():
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(None, ["train.resolution=100"])
    with pytest.raises(ConfigError, match="identifier token 'sks'"):
        load_config(None, ["subject.instance_prompt=a photo of a dog"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_flatten_and_with_overrides_for_sweeps():
    cfg = TrainConfig()
    flat = flatten(cfg)
    assert flat["train.learning_rate"] == cfg.train.learning_rate
    tuned = with_overrides(cfg, {"train.learning_rate": 2e-4, "train.lora_rank": 8})
    assert tuned.train.learning_rate == 2e-4 and tuned.train.lora_rank == 8
    assert cfg.train.lora_rank != 8  # the original is untouched
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        with_overrides(cfg, {"train.lora_rnk": 8})


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")))
def test_shipped_train_configs_validate(path):
    load_config(path)


def test_relative_paths_are_made_absolute_for_processes_that_run_elsewhere(tmp_path):
    """A Tune trial runs in its own folder: the sweep hands it the base config with the relative
    local paths made absolute where they were written; URIs, Hub ids and built-in names stay."""
    from raybooth.jobs.train.inputs import with_absolute_paths
    from raybooth.platform.config import TrainConfig, with_overrides

    (tmp_path / "my-model").mkdir()
    config = with_overrides(TrainConfig(), {
        "model": "my-model", "subject.instance_data_dir": "examples/toy-subject",
        "priors.class_data_dir": "s3://bucket/classes", "run.storage_path": "runs",
        "run.resume_from": "latest",
        "evaluation": {"dino_encoder": "facebook/dino-vits16", "clip_encoder": "tiny-clip"}})
    out = with_absolute_paths(config, tmp_path)
    assert out.model == str(tmp_path / "my-model")
    assert out.subject.instance_data_dir == str(tmp_path / "examples" / "toy-subject")
    assert out.run.storage_path == str(tmp_path / "runs")
    assert out.priors.class_data_dir == "s3://bucket/classes"
    assert out.run.resume_from == "latest"
    assert out.evaluation.dino_encoder == "facebook/dino-vits16" and out.evaluation.clip_encoder == "tiny-clip"
    (tmp_path / "toy").mkdir()  # a folder named like a built-in model: the built-in wins, as in resolve_model
    assert with_absolute_paths(with_overrides(config, {"model": "toy"}), tmp_path).model == "toy"
    assert with_absolute_paths(out, tmp_path / "elsewhere") == out  # already absolute: unchanged
