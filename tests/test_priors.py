"""Class-image generation with a pool of real Ray actors and the tiny model (64 px, 2 steps).

One reference set is made once by two actors; the other tests copy it and break it (delete,
truncate, grow, kill an actor) and check that what comes back is byte-identical to it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from raybooth.jobs.priors.job import ClassImageSet, ensure_class_images
from raybooth.jobs.priors.actor import plan_actors
from raybooth.jobs.priors.spec import build_spec, resolve_inputs, seed_for
from raybooth.platform.config import TrainConfig, load_config
from raybooth.platform.errors import ConfigError, ModelError, UserError

N = 6  # images in the reference set
BATCH = 2


def make_config(class_dir: str | Path, *overrides: str) -> TrainConfig:
    return load_config(
        None,
        [
            f"priors.class_data_dir={class_dir}",
            f"priors.num_class_images={N}",
            f"priors.batch_size={BATCH}",
            "priors.steps=2",
            "priors.num_actors=2",
            "priors.cpus_per_actor=1",
            "train.resolution=64",
            "subject.class_prompt=a photo of a dog",
            *overrides,
        ],
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns): a rewritten file (even with equal bytes) gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


_REFERENCE: dict[str, object] = {}


@pytest.fixture
def reference(ray_local, tmp_path_factory) -> tuple[ClassImageSet, dict[str, bytes]]:
    """The set made once by two actors, and a copy of its bytes taken right after."""
    if not _REFERENCE:
        root = tmp_path_factory.mktemp("class-images")
        result = ensure_class_images(make_config(root), progress=False)
        _REFERENCE["set"] = result
        _REFERENCE["bytes"] = {p.name: p.read_bytes() for p in result.images}
    return _REFERENCE["set"], _REFERENCE["bytes"]  # type: ignore[return-value]


def copy_set(result: ClassImageSet, dest_root: Path) -> Path:
    shutil.copytree(result.directory, dest_root / result.identity)
    return dest_root / result.identity


@pytest.mark.timeout(180)
def test_several_actors_fill_the_set(reference):
    result, _ = reference
    assert result.generated == N and result.num_actors == 2 and result.reused == 0
    assert result.directory.name == result.identity
    assert [p.name for p in result.images] == [f"{i:06d}.png" for i in range(N)]
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["identity"] == result.identity
    inputs = manifest["inputs"]
    assert inputs["prompt"] == "a photo of a dog" and inputs["steps"] == 2
    assert inputs["model_ref"] == "tiny" and inputs["model_revision"]
    assert inputs["resolution"] == 64 and inputs["seed"] == 0
    for i, path in enumerate(result.images):
        entry = manifest["images"][str(i)]
        assert entry["sha256"] == digest(path)
        assert entry["seed"] == seed_for(0, i)
        with Image.open(path) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    # Distinct seeds give distinct images: no index was written with another's content.
    assert len({digest(p) for p in result.images}) == N
    # Nothing but the images and the manifest (no temporary files left behind).
    assert sorted(p.name for p in result.directory.iterdir()) == sorted(
        [p.name for p in result.images] + ["manifest.json"]
    )


@pytest.mark.timeout(60)
def test_rerun_does_no_generation_work(reference):
    result, _ = reference
    before = snapshot(result.directory)
    t0 = time.perf_counter()
    again = ensure_class_images(make_config(result.directory.parent), progress=False)
    elapsed = time.perf_counter() - t0
    assert again.generated == 0 and again.num_actors == 0 and again.reused == N
    assert again.identity == result.identity and again.images == result.images
    assert snapshot(result.directory) == before  # not even the manifest was rewritten
    assert elapsed < 10, f"a rerun with nothing to make took {elapsed:.1f} s"


@pytest.mark.timeout(180)
def test_deleted_and_corrupt_images_come_back_identical(reference, tmp_path):
    result, original = reference
    directory = copy_set(result, tmp_path)
    (directory / "000001.png").unlink()
    truncated = directory / "000002.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    flipped = directory / "000004.png"  # same size, one byte changed: only the checksum sees it
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    untouched = {n: s for n, s in snapshot(directory).items() if n in {"000000.png", "000003.png", "000005.png"}}

    fixed = ensure_class_images(make_config(tmp_path, "priors.num_actors=1"), progress=False)

    assert fixed.identity == result.identity
    assert fixed.generated == 3 and fixed.corrupt == 2 and fixed.reused == 3
    for path in fixed.images:
        assert path.read_bytes() == original[path.name], f"{path.name} differs from the original"
    after = snapshot(directory)
    assert all(after[n] == s for n, s in untouched.items()), "an intact image was rewritten"


@pytest.mark.timeout(180)
def test_growing_the_set_adds_only_new_indices_through_a_storage_uri(reference, tmp_path):
    """Ask for more images of a set kept behind a `file://` URI (the pyarrow storage path that
    `s3://` also takes): only the new indices are made; the old files are not touched. Two callers
    asking at once (parallel trials) make them once: the second waits and reuses."""
    result, original = reference
    directory = copy_set(result, tmp_path)
    before = snapshot(directory)

    config = make_config(tmp_path.as_uri(), f"priors.num_class_images={N + 3}")
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        results = list(executor.map(lambda _: ensure_class_images(config, progress=False), range(2)))
    grown = max(results, key=lambda r: r.generated)

    assert sorted(r.generated for r in results) == [0, 3], "the new images were made twice"
    assert grown.identity == result.identity and grown.reused == N
    assert grown.uri == f"{tmp_path.as_uri()}/{result.identity}"
    assert [p.name for p in grown.images] == [f"{i:06d}.png" for i in range(N + 3)]
    after = snapshot(directory)
    assert all(after[n] == before[n] for n in original), "an existing image was rewritten"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(int(k) for k in manifest["images"]) == list(range(N + 3))
    for path in grown.images:
        assert manifest["images"][str(int(path.stem))]["sha256"] == digest(path)
    # Asking for fewer again serves the first ones and makes nothing.
    fewer = ensure_class_images(make_config(tmp_path.as_uri(), "priors.num_class_images=4"), progress=False)
    assert fewer.generated == 0 and len(fewer.images) == 4


@pytest.mark.timeout(240)
def test_killed_actor_is_replaced_and_nothing_is_lost_or_written_twice(reference, tmp_path):
    import ray

    result, original = reference
    writes: list[int] = []
    killed: list[object] = []

    def kill_after_first_batch(event) -> None:
        writes.extend(event.indices)
        if not killed:
            # The actor holding the most work: at least one of its blocks is still unfinished.
            victim = max(event.pool.slots, key=lambda slot: len(slot.blocks)).actor
            ray.kill(victim, no_restart=True)
            killed.append(victim)

    total = 8
    made = ensure_class_images(
        make_config(tmp_path, f"priors.num_class_images={total}"),
        progress=False,
        on_batch_written=kill_after_first_batch,
    )

    assert killed and made.actor_replacements >= 1
    counts = collections.Counter(writes)
    assert sorted(counts) == list(range(total)), f"indices written: {sorted(counts)}"
    assert max(counts.values()) == 1, f"written twice: {[i for i, c in counts.items() if c > 1]}"
    assert made.generated == total and len(made.images) == total
    manifest = json.loads((made.directory / "manifest.json").read_text())
    assert all(manifest["images"][str(i)]["sha256"] == digest(p) for i, p in enumerate(made.images))
    # Same identity as the reference set (actor count and set size are not part of it), and the
    # same bytes for the indices both have: the replacement actor made exactly the same images.
    assert made.identity == result.identity
    for path in made.images[:N]:
        assert path.read_bytes() == original[path.name]


def test_bad_inputs_fail_before_any_actor_starts(tmp_path):
    class_dir = tmp_path / "never-created"
    with pytest.raises(ConfigError) as empty:
        ensure_class_images(make_config(class_dir, "subject.class_prompt=  "), progress=False)
    assert empty.value.field == "subject.class_prompt" and "class_prompt" in empty.value.message

    t0 = time.perf_counter()
    with pytest.raises(ModelError) as bad_model:
        ensure_class_images(make_config(class_dir, "model=nobody/no-such-model"), progress=False)
    assert "nobody/no-such-model" in bad_model.value.message
    assert time.perf_counter() - t0 < 30

    with pytest.raises(UserError) as bad_scheduler:
        ensure_class_images(make_config(class_dir, "priors.scheduler=eulr"), progress=False)
    assert bad_scheduler.value.field == "priors.scheduler"
    assert not class_dir.exists()


@pytest.mark.timeout(120)
def test_model_that_fails_to_load_in_the_actors_is_a_clear_error(ray_local, tiny_path, tmp_path):
    """A local model folder that looks right (model_index.json) but lacks its UNet weights: the
    actor cannot load it, and the driver gets the loader's error, not an endless restart loop."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_path, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError) as err:
        ensure_class_images(make_config(tmp_path / "sets", f"model={broken}", "priors.num_actors=1"),
                            progress=False)
    assert "broken-model" in err.value.message, err.value.message


@pytest.mark.timeout(60)
def test_cli_reports_the_set_and_rejects_a_typo(reference, tmp_path, capsys):
    from raybooth.cli import main

    result, _ = reference
    config = tmp_path / "priors.yaml"
    config.write_text(
        "subject:\n  class_prompt: a photo of a dog\n"
        f"priors:\n  class_data_dir: {result.directory.parent}\n  num_class_images: {N}\n"
        f"  batch_size: {BATCH}\n  steps: 2\ntrain:\n  resolution: 64\n"
    )
    assert main(["priors", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert result.identity in out and "0 generated" in out and f"{N} reused" in out

    assert main(["priors", "--config", str(config), "--set", "priors.num_clas_images=3"]) == 2
    err = capsys.readouterr().err
    assert "priors.num_clas_images" in err and "num_class_images" in err


def test_identity_covers_what_changes_pixels_and_nothing_else(tiny_path):
    def identity(*overrides: str) -> str:
        config = make_config("/unused", *overrides)
        return build_spec(config, resolve_inputs(config), use_gpu=False).identity

    base = identity()
    # Same pixels: same set.
    assert identity("priors.num_class_images=500", "priors.num_actors=7", "priors.class_data_dir=/x") == base
    assert identity("subject.class_prompt=  a photo of a dog ") == base
    # Different pixels: a different set.
    changed = [
        identity("subject.class_prompt=a photo of a cat"),
        identity("priors.negative_prompt=blurry"),
        identity("priors.steps=3"),
        identity("priors.guidance_scale=5"),
        identity("priors.scheduler=euler"),
        identity("priors.seed=1"),
        identity("priors.resolution=32"),
        identity("priors.batch_size=4"),
        identity("model=tiny-inpainting"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    # On the CPU the thread count changes low bits, so it is part of a CPU set's identity...
    assert identity("priors.cpus_per_actor=2") != base
    # ...but not of a GPU set's, and a GPU set is never mixed with a CPU one.
    def gpu_identity(*overrides: str) -> str:
        config = make_config("/unused", *overrides)
        return build_spec(config, resolve_inputs(config), use_gpu=True).identity

    assert gpu_identity() != base
    assert gpu_identity("priors.cpus_per_actor=2") == gpu_identity()


def test_actor_count_follows_gpus_then_cpus():
    def plan(num_actors="auto", blocks=100, cpus=1.0, gpus_per=1.0, total_gpus=0.0, free_cpus=4.0):
        return plan_actors(num_actors, blocks=blocks, cpus_per_actor=cpus, gpus_per_actor=gpus_per,
                           total_gpus=total_gpus, available_cpus=free_cpus)

    one_per_gpu = plan(total_gpus=4)
    assert one_per_gpu.num_actors == 4 and one_per_gpu.use_gpu and one_per_gpu.num_gpus == 1
    assert plan(total_gpus=2, gpus_per=0.5).num_actors == 4  # small models share a GPU
    cpu = plan(free_cpus=6, cpus=2)
    assert cpu.num_actors == 3 and not cpu.use_gpu and cpu.num_gpus == 0
    assert plan(free_cpus=6, blocks=2).num_actors == 2  # never more actors than work
    assert plan(free_cpus=0).num_actors == 1  # at least one, which waits for a CPU
    assert plan(num_actors=3, total_gpus=8).num_actors == 3
    assert not plan(total_gpus=2, gpus_per=0).use_gpu  # gpus_per_actor 0: CPU actors
