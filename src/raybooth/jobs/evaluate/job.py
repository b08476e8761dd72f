"""The evaluation job: check everything on the driver, generate and embed on a pool of Ray actors,
compute the paper's metrics, write `evaluation.json`, the images and a grid.

    from raybooth.jobs.evaluate.job import evaluate_config
    result = evaluate_config(config)          # EvaluateConfig -> EvaluationResult
    result.report.metrics["dino"].mean, result.path

`run_evaluation` is the same with the pieces passed in (what the end-of-training hook calls).
Every bad input (subject folder, prompt set, model, encoders, sizes) is a UserError raised before
Ray starts. Image k of every prompt uses seed `evaluation.seed + k` (the paper's N images per
prompt); blocks of `evaluation.batch_size` images are fixed by the driver, so reruns are equal.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raybooth.jobs.evaluate import metrics as M
from raybooth.jobs.evaluate.actor import REAL_BLOCK, EmbedTask, EmbeddedImage, EvalSpec, GenerateTask, encode_png
from raybooth.jobs.evaluate.config import EvaluateConfig
from raybooth.jobs.evaluate.encoders import CLIP, DINO, ResolvedEncoder, resolve_encoder
from raybooth.jobs.evaluate.prompts import EvalPrompt, build_prompts
from raybooth.jobs.evaluate.toy_scores import is_toy_model
from raybooth.jobs.evaluate.report import (
    CLIP_I,
    CLIP_T,
    GRID_FILE,
    IMAGES_DIR,
    REPORT_FILE,
    EvaluationReport,
    ImageRecord,
    PromptResult,
)
from raybooth.platform.config import EvaluationSection, ModelOptions, SubjectConfig
from raybooth.platform.errors import ConfigError, ImageError, ModelError
from raybooth.platform.images import list_images, open_image
from raybooth.platform.models import ResolvedModel, resolve_model
from raybooth.platform.paths import write_json_atomic
from raybooth.platform.schedulers import check_scheduler

log = logging.getLogger("raybooth.evaluate")
SUBJECT_FIELD = "subject.instance_data_dir"


@dataclass
class EvalInputs:
    """What the driver checked and resolved before Ray starts."""

    resolved: ResolvedModel | None  # None: not checked (see check_inputs)
    lora: str | None
    dino: ResolvedEncoder
    clip: ResolvedEncoder
    prompts: list[EvalPrompt]
    real_paths: list[Path]
    real_pngs: list[bytes]
    output_dir: Path | None


@dataclass
class EvaluationResult:
    report: EvaluationReport
    path: Path  # evaluation.json


def _real_images(folder: str) -> tuple[list[Path], list[bytes]]:
    path = Path(folder).expanduser().resolve()
    try:
        files = list_images(path, SUBJECT_FIELD)
    except ImageError as exc:
        raise ImageError(
            f"{exc.message}. The evaluation compares generated images with the subject's own "
            "photos: point subject.instance_data_dir (or --subject-dir) at them.",
            field=SUBJECT_FIELD,
        ) from None
    pngs, bad = [], []
    for file in files:
        try:
            pngs.append(encode_png(open_image(file, name=str(file))))
        except ImageError as exc:
            bad.append(exc.message)
    if bad:
        raise ImageError(
            f"{SUBJECT_FIELD}: {len(bad)} of {len(files)} subject image(s) cannot be read: "
            f"{'; '.join(bad)}. Fix or remove them.",
            field=SUBJECT_FIELD,
        )
    return files, pngs


def _check_lora(lora: str | None) -> str | None:
    if not lora:
        return None
    path = Path(lora).expanduser().resolve()
    if not (path / "pytorch_lora_weights.safetensors").is_file():
        raise ModelError(
            f"lora: {path} holds no pytorch_lora_weights.safetensors (the LoRA export of "
            "`raybooth train` with train.mode=lora)",
            field="lora",
        )
    return str(path)


def check_inputs(
    *,
    model: str,
    model_options: ModelOptions,
    lora: str | None,
    subject: SubjectConfig,
    evaluation: EvaluationSection,
    output_dir: str | Path | None,
    resolved: ResolvedModel | None = None,
    check_model: bool = True,
) -> EvalInputs:
    """Every check that can fail on the user's input, on the driver — before Ray, any actor or GPU.

    `check_model=False` skips the model (a training run checks the evaluation section before the
    model it will judge exists); `output_dir=None` creates nothing."""
    ev = evaluation
    prompts = build_prompts(
        prompt_set=ev.prompt_set, prompts=ev.prompts, identifier=subject.identifier,
        class_noun=ev.class_noun, instance_prompt=subject.instance_prompt,
    )
    if ev.images_per_prompt < 1:  # the schema says so too; a trial's override may bypass it
        raise ConfigError("evaluation.images_per_prompt must be at least 1", field="evaluation.images_per_prompt")
    if ev.resolution is not None and (ev.resolution < 8 or ev.resolution % 8):
        raise ConfigError(
            f"evaluation.resolution must be a positive multiple of 8 (got {ev.resolution})",
            field="evaluation.resolution",
        )
    check_scheduler(ev.scheduler, field="evaluation.scheduler")
    real_paths, real_pngs = _real_images(subject.instance_data_dir)
    if resolved is None and check_model:
        resolved = resolve_model(model, model_options)
    lora_path = _check_lora(lora)
    dino = resolve_encoder(ev.dino_encoder, DINO, model_options, ev.dino_revision)
    clip = resolve_encoder(ev.clip_encoder, CLIP, model_options, ev.clip_revision)
    out = Path(output_dir).expanduser().resolve() if output_dir is not None else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output_dir: cannot create {out}: {exc.strerror}", field="output_dir") from None
    return EvalInputs(resolved, lora_path, dino, clip, prompts, real_paths, real_pngs, out)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def build_spec(inputs: EvalInputs, evaluation: EvaluationSection, *, use_gpu: bool) -> EvalSpec:
    from raybooth.jobs.priors.spec import _pinned_ref, local_fingerprint

    resolved = inputs.resolved
    revision = local_fingerprint(resolved.path) if resolved.kind == "local" else resolved.revision
    return EvalSpec(
        model_ref=_pinned_ref(resolved),
        model_kind=resolved.kind,
        model_revision=revision,
        lora=inputs.lora,
        dino=inputs.dino,
        clip=inputs.clip,
        resolution=evaluation.resolution,
        steps=evaluation.steps,
        guidance_scale=float(evaluation.guidance_scale),
        scheduler=evaluation.scheduler,
        device="cuda" if use_gpu else "cpu",
        dtype="fp16" if use_gpu else "fp32",
        cpu_threads=None if use_gpu else max(1, int(evaluation.cpus_per_actor)),
    )


def plan_work(inputs: EvalInputs, evaluation: EvaluationSection) -> dict[int, GenerateTask | EmbedTask]:
    """The blocks: the real images, then the generated images in fixed batches (index i is image
    k = i % N of prompt i // N, seed `seed + k`)."""
    n = evaluation.images_per_prompt
    flat = [(pi * n + k, p, evaluation.seed + k) for pi, p in enumerate(inputs.prompts) for k in range(n)]
    work: dict[int, GenerateTask | EmbedTask] = {
        REAL_BLOCK: EmbedTask(list(range(len(inputs.real_pngs))), list(inputs.real_pngs))
    }
    size = evaluation.batch_size
    for b, start in enumerate(range(0, len(flat), size)):
        chunk = flat[start : start + size]
        work[b] = GenerateTask(
            indices=[i for i, _, _ in chunk],
            prompts=[p.prompt for _, p, _ in chunk],
            class_prompts=[p.class_prompt for _, p, _ in chunk],
            seeds=[s for _, _, s in chunk],
        )
    return work


def check_fits(plan, cluster: dict[str, float]) -> None:
    """An explicit actor count the cluster cannot hold is an error, not a job that waits forever."""
    kind, per, field = ("GPU", plan.num_gpus, "evaluation.gpus_per_actor") if plan.use_gpu else (
        "CPU", plan.num_cpus, "evaluation.cpus_per_actor")
    have = float(cluster.get(kind, 0.0))
    if plan.num_actors * per > have + 1e-9:
        raise ConfigError(
            f"evaluation.num_actors: {plan.num_actors} actor(s) x {per:g} {kind} need "
            f"{plan.num_actors * per:g} {kind}s but the cluster has {have:g}; lower "
            f"evaluation.num_actors (or 'auto'), or {field}",
            field="evaluation.num_actors",
        )


def run_pool(spec: EvalSpec, options: ModelOptions, evaluation: EvaluationSection, work: dict, *, progress: bool):
    """Run `work` on a pool of evaluation actors: ({real index: result}, {gen index: result},
    execution facts, timings)."""
    import ray
    from tqdm.auto import tqdm

    from raybooth.jobs.evaluate.pool import EvalPool, plan_actors
    from raybooth.platform.devices import free_cpus

    timings: dict[str, float] = {}
    plan = plan_actors(
        evaluation.num_actors,
        blocks=len(work),
        cpus_per_actor=evaluation.cpus_per_actor,
        gpus_per_actor=evaluation.gpus_per_actor,
        total_gpus=_cluster_gpus(),
        available_cpus=free_cpus(),
    )
    check_fits(plan, ray.cluster_resources())
    total = sum(len(t.indices) for k, t in work.items() if k != REAL_BLOCK)
    log.info("evaluation: %d images to generate and embed, %s", total, plan.describe())
    real: dict[int, EmbeddedImage] = {}
    generated: dict[int, EmbeddedImage] = {}
    t0 = time.perf_counter()
    pool = EvalPool(spec, options, plan)
    bar = tqdm(total=total, unit="img", desc="evaluation", disable=not progress)
    try:
        pool.wait_ready()
        timings["actors_ready_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()

        def on_result(results: list[EmbeddedImage]) -> None:
            for item in results:
                (generated if item.png is not None else real)[item.index] = item
            bar.update(sum(1 for item in results if item.png is not None))

        pool.run(work, on_result)
        timings["generate_embed_s"] = time.perf_counter() - t1
    finally:
        pool.shutdown()
        bar.close()
    execution = {"num_actors": plan.num_actors, "device": spec.device, "dtype": spec.dtype,
                 "cpu_threads": spec.cpu_threads, "actor_replacements": pool.replacements}
    return real, generated, execution, timings


def _grid(rows: list[list[bytes]], labels: list[str], cell: int) -> Any:
    import io

    from PIL import Image, ImageDraw

    band = 12
    cols = max(len(r) for r in rows)
    width = max(cols * cell, 320)  # room for the prompt above each row
    grid = Image.new("RGB", (width, len(rows) * (cell + band)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        y = r * (cell + band)
        draw.text((2, y), label[: width // 6], fill="black")
        for c, png in enumerate(row):
            img = Image.open(io.BytesIO(png)).convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC)
            grid.paste(img, (c * cell, y + band))
    return grid


def build_report(
    inputs: EvalInputs,
    evaluation: EvaluationSection,
    real: dict[int, EmbeddedImage],
    generated: dict[int, EmbeddedImage],
    *,
    image_files: dict[int, str],
    execution: dict[str, Any],
    timings: dict[str, float],
    toy: str | None = None,
) -> EvaluationReport:
    """The metrics from the embeddings (no models here). `toy`: the identifier, when the toy
    judge's scores are wanted (a toy-based model)."""
    n = evaluation.images_per_prompt
    order = sorted(generated)
    real_order = sorted(real)
    real_dino = np.stack([real[i].dino for i in real_order])
    real_clip = np.stack([real[i].clip for i in real_order])
    gen_dino = np.stack([generated[i].dino for i in order])
    gen_clip = np.stack([generated[i].clip for i in order])
    gen_text = np.stack([generated[i].text for i in order])
    scores: dict[str, np.ndarray] = {
        DINO: M.pairwise_scores(gen_dino, real_dino),
        CLIP_I: M.pairwise_scores(gen_clip, real_clip),
        CLIP_T: M.text_scores(gen_clip, gen_text),
    }
    samples, seed = evaluation.bootstrap_samples, evaluation.seed
    baseline = {}
    if len(real_order) >= 2:
        baseline = {
            "dino": M.bootstrap(M.real_baseline_scores(real_dino), samples=samples, seed=seed),
            CLIP_I: M.bootstrap(M.real_baseline_scores(real_clip), samples=samples, seed=seed),
        }
    extras: list[dict[str, Any]] = [{} for _ in order]
    if toy is not None:
        from raybooth.jobs.evaluate import toy_scores as T

        rows = [(inputs.prompts[i // n], generated[i].png) for i in order]
        subject, prompt, readings = T.score_images(
            T.decode_rgb([png for _, png in rows]), [p.prompt for p, _ in rows], [p.class_prompt for p, _ in rows], toy)
        scores[T.TOY_SUBJECT], scores[T.TOY_PROMPT] = subject, prompt
        extras = [{"toy_reading": r} for r in readings]
        baseline[T.TOY_SUBJECT] = M.bootstrap(T.real_subject_scores(T.decode_rgb(inputs.real_pngs)), samples=samples, seed=seed)
    metrics = {}
    for name, s in scores.items():
        known = s[~np.isnan(s)]
        if known.size:  # a judge score the prompts give nothing to read has no estimate
            metrics[name] = M.bootstrap(known, samples=samples, seed=seed)
    paper = (DINO, CLIP_I, CLIP_T)
    records: list[ImageRecord] = []
    for row, i in enumerate(order):
        p = inputs.prompts[i // n]
        others = {name: _number(s[row]) for name, s in scores.items() if name not in paper}
        records.append(ImageRecord(
            index=i, prompt_index=i // n, prompt=p.prompt, class_prompt=p.class_prompt,
            category=p.category, seed=evaluation.seed + i % n, file=image_files[i],
            **{name: float(scores[name][row]) for name in paper}, extra={**others, **extras[row]},
        ))
    prompt_of = np.asarray([i // n for i in order])
    categories = np.asarray([inputs.prompts[i // n].category for i in order])
    per_prompt = []
    for pi, p in enumerate(inputs.prompts):
        mask = prompt_of == pi
        per_prompt.append(PromptResult(
            prompt=p.prompt, class_prompt=p.class_prompt, category=p.category,
            values={name: _mean(s[mask]) for name, s in scores.items()},
            files=[r.file for r in records if r.prompt_index == pi],
        ))
    per_category = {
        cat: {name: _mean(s[categories == cat]) for name, s in scores.items()}
        for cat in sorted(set(categories.tolist()))
    }
    settings = evaluation.model_dump()
    settings["prompts"] = [p.prompt for p in inputs.prompts]
    return EvaluationReport(
        model={**inputs.resolved.describe(), "lora": inputs.lora},
        encoders={DINO: inputs.dino.describe(), CLIP: inputs.clip.describe()},
        settings=settings,
        metrics=metrics,
        baseline=baseline,
        per_prompt=per_prompt,
        per_category=per_category,
        images=records,
        real_images=[str(p) for p in inputs.real_paths],
        counts={"prompts": len(inputs.prompts), "images_per_prompt": n, "generated": len(order),
                "real": len(real_order)},
        timings={k: round(v, 3) for k, v in timings.items()},
        execution=execution,
    )


def _number(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _mean(values: np.ndarray) -> float | None:
    """The mean of the known values (JSON has no NaN: None when there are none)."""
    known = values[~np.isnan(values)]
    return float(known.mean()) if known.size else None


def write_outputs(inputs: EvalInputs, generated: dict[int, EmbeddedImage], evaluation: EvaluationSection) -> dict[int, str]:
    """images/p<prompt>-<k>.png and grid.png (first row: the real images; then a row per prompt)."""
    from raybooth.platform.paths import replace_into

    n = evaluation.images_per_prompt
    out = inputs.output_dir
    images_dir = out / IMAGES_DIR
    if images_dir.exists():
        shutil.rmtree(images_dir)  # a smaller rerun must not leave stale images beside the report
    images_dir.mkdir(parents=True)
    files = {}
    for i, item in generated.items():
        rel = f"{IMAGES_DIR}/p{i // n:02d}-{i % n:02d}.png"
        (out / rel).write_bytes(item.png)
        files[i] = rel
    rows = [inputs.real_pngs[: max(n, 1)]]
    labels = ["real images (the subject)"]
    for pi, p in enumerate(inputs.prompts):
        rows.append([generated[pi * n + k].png for k in range(n)])
        labels.append(p.class_prompt)
    cell = min(128, evaluation.resolution or 128)
    grid = _grid(rows, labels, cell)
    replace_into(out / GRID_FILE, lambda tmp: grid.save(tmp))
    return files


def run_evaluation(
    *,
    model: str,
    model_options: ModelOptions,
    lora: str | None,
    subject: SubjectConfig,
    evaluation: EvaluationSection,
    output_dir: str | Path,
    progress: bool = True,
    resolved: ResolvedModel | None = None,
    toy_based: bool | None = None,
) -> EvaluationResult:
    """Check, run on Ray actors, write `<output_dir>/evaluation.json`; returns the typed report.
    `toy_based`: add the toy judge's scores (None: when the model or the prompt set is the toy's)."""
    t0 = time.perf_counter()
    inputs = check_inputs(model=model, model_options=model_options, lora=lora, subject=subject,
                          evaluation=evaluation, output_dir=output_dir, resolved=resolved)
    timings = {"validate_s": time.perf_counter() - t0}
    import ray

    if not ray.is_initialized():
        t1 = time.perf_counter()
        ray.init()  # RAY_ADDRESS (a cluster, a RayJob) is honoured; otherwise a local instance
        timings["ray_init_s"] = time.perf_counter() - t1
    use_gpu = _cluster_gpus() > 0 and evaluation.gpus_per_actor > 0
    spec = build_spec(inputs, evaluation, use_gpu=use_gpu)
    options = model_options.model_copy()
    if spec.model_kind == "hub" and spec.model_revision:
        options.revision = spec.model_revision  # every actor loads the commit the driver resolved
    work = plan_work(inputs, evaluation)
    real, generated, execution, pool_timings = run_pool(spec, options, evaluation, work, progress=progress)
    timings.update(pool_timings)
    t2 = time.perf_counter()
    files = write_outputs(inputs, generated, evaluation)
    if toy_based is None:
        toy_based = is_toy_model(inputs.resolved.kind, inputs.resolved.path, evaluation.prompt_set,
                                 evaluation.prompts is not None)
    toy = subject.identifier if toy_based else None
    report = build_report(inputs, evaluation, real, generated, image_files=files, execution=execution,
                          timings={}, toy=toy)
    timings["metrics_and_files_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    work_s = timings.get("generate_embed_s") or 0.0
    timings["images_per_second"] = len(generated) / work_s if work_s else 0.0
    report.timings = {k: round(v, 3) for k, v in timings.items()}
    path = inputs.output_dir / REPORT_FILE
    write_json_atomic(path, report.to_json())
    log.info("evaluation: %s", ", ".join(f"{k} {v.mean:.4f}" for k, v in report.metrics.items()))
    return EvaluationResult(report=report, path=path)


def evaluate_config(config: EvaluateConfig, *, progress: bool = True) -> EvaluationResult:
    return run_evaluation(
        model=config.model, model_options=config.model_options, lora=config.lora,
        subject=config.subject, evaluation=config.evaluation, output_dir=config.output_dir,
        progress=progress,
    )
