"""`raybooth toy build`: VAE -> text-to-image (text encoder + UNet) -> inpainting UNet.

Writes the shared weights in the layout `raybooth.platform.toy.models` assembles from (fp16
safetensors), plus `build.json` and `BUILD.md`: the command, the seed, the versions, and the judge's
curves over training. Each stage saves as soon as it ends, and `--skip-t2i` continues from a saved
text-to-image stage, so a stopped build loses at most the stage it was in.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform as std_platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from raybooth.jobs.toy.inpainting import InpaintConfig, train_inpainting
from raybooth.jobs.toy.text_to_image import T2IConfig, train_text_to_image
from raybooth.jobs.toy.vae import fold_normalisation, pin_posterior, reconstruction_accuracy, train_vae
from raybooth.platform.paths import write_json_atomic
from raybooth.platform.toy.architecture import make_tokenizer
from raybooth.platform.toy.models import BUILD_FILE, UNET_FOLDERS

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    out: Path
    seed: int = 0
    vae_steps: int = 2000
    t2i: T2IConfig = field(default_factory=T2IConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    threads: int = 1
    skip_t2i: bool = False


def save_fp16(module: torch.nn.Module, folder: Path) -> None:
    # fp16 halves the repository size; the models are assembled in fp32 on first use.
    copy.deepcopy(module).to(torch.float16).save_pretrained(folder, safe_serialization=True)


def weights_digest(out: Path) -> str:
    """The build id: a digest of every weights file, so new weights always get a new id (and a new
    assembled folder under $RAYBOOTH_HOME/models, never a stale one)."""
    h = hashlib.sha256()
    for path in sorted(out.rglob("*.safetensors")):
        h.update(path.relative_to(out).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def load_stage(out: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    f32 = torch.float32
    return (AutoencoderKL.from_pretrained(out / "vae", torch_dtype=f32).eval(),
            CLIPTextModel.from_pretrained(out / "text_encoder", dtype=f32).eval(),
            UNet2DConditionModel.from_pretrained(out / UNET_FOLDERS["toy"], torch_dtype=f32).eval())


def write_record(cfg: BuildConfig, record: dict) -> None:
    write_json_atomic(cfg.out / BUILD_FILE, record)
    lines = [
        "# The toy models' build record",
        "",
        f"Command: `{record['command']}`  ",
        f"Seed: {record['seed']}, build id (weights digest) `{record['build']}`, torch {record['torch']}, "
        f"{record['threads']} thread(s) on {record['machine']}.",
        f"Wall-clock seconds per stage: {record.get('timings_s')} (2 shared CPU cores).",
        "",
        f"VAE reconstruction, as the judge reads it (the ceiling of every score below): "
        f"{(record.get('vae') or {}).get('reconstruction')}",
        "",
        "Judge accuracy over training (EMA weights, guidance "
        f"{cfg.t2i.guidance_scale}, {cfg.t2i.eval_steps} DDIM steps, {cfg.t2i.eval_captions} held-out captions):",
        "",
        "| step | seconds | loss | background | object colour | shape |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in record.get("t2i_curve", []):
        loss = "" if p["loss"] is None else f"{p['loss']:.4f}"
        lines.append(f"| {p['step']} | {p['seconds']} | {loss} | {p['background']:.2f} | {p['colour']:.2f} | {p['shape']:.2f} |")
    lines += ["", "Inpainting (object masked, repainted as `a {colour} {shape}`):", "",
              "| step | seconds | colour inside mask | outside unchanged |", "|---:|---:|---:|---:|"]
    for p in record.get("inpaint_curve", []):
        lines.append(f"| {p['step']} | {p['seconds']} | {p['colour_inside']:.2f} | {p['unchanged_outside']:.2f} |")
    if record.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in record["notes"]]
    (cfg.out / "BUILD.md").write_text("\n".join(lines) + "\n")


def build(cfg: BuildConfig, argv: list[str] | None = None) -> dict:
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    record: dict = {
        "build": None,  # the weights' digest, set when they are saved
        "command": "raybooth toy " + " ".join(shlex.quote(a) for a in (argv or sys.argv[2:])),
        "seed": cfg.seed,
        "torch": torch.__version__,
        "threads": cfg.threads,
        "machine": f"{std_platform.machine()} {std_platform.processor() or ''}".strip(),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "timings_s": {},
    }
    if cfg.skip_t2i:
        previous = json.loads((cfg.out / BUILD_FILE).read_text())
        for key in ("vae", "t2i_curve", "timings_s"):
            record[key] = previous.get(key, record.get(key))
        record["command"] = previous["command"] + " ; raybooth toy " + " ".join(argv or sys.argv[2:])
        vae, text_encoder, unet = load_stage(cfg.out)
    else:
        t0 = time.perf_counter()
        vae, vae_curve = train_vae(cfg.seed, cfg.vae_steps)
        stats = fold_normalisation(vae, cfg.seed + 3)
        pin_posterior(vae)
        record["vae"] = {"curve": vae_curve, **stats,
                         "reconstruction": reconstruction_accuracy(vae, cfg.seed + 4)}
        record["timings_s"]["vae"] = round(time.perf_counter() - t0, 1)
        log.info("vae %s", {k: v for k, v in record["vae"].items() if k != "curve"})
        save_fp16(vae, cfg.out / "vae")

        def on_t2i_eval(curve: list[dict]) -> None:
            record["t2i_curve"] = curve
            write_record(cfg, record)

        t0 = time.perf_counter()
        text_encoder, unet, curve = train_text_to_image(vae, tokenizer, cfg.seed, cfg.t2i, on_t2i_eval)
        record["t2i_curve"] = curve
        record["timings_s"]["text_to_image"] = round(time.perf_counter() - t0, 1)
        save_fp16(text_encoder, cfg.out / "text_encoder")
        save_fp16(unet, cfg.out / UNET_FOLDERS["toy"])
        write_record(cfg, record)

    def on_inpaint_eval(curve: list[dict]) -> None:
        record["inpaint_curve"] = curve
        write_record(cfg, record)

    t0 = time.perf_counter()
    inpaint_unet, curve = train_inpainting(vae, text_encoder, tokenizer, unet, cfg.seed, cfg.inpaint,
                                           on_inpaint_eval)
    record["inpaint_curve"] = curve
    record["timings_s"]["inpainting"] = round(time.perf_counter() - t0, 1)
    save_fp16(inpaint_unet, cfg.out / UNET_FOLDERS["toy-inpainting"])
    record["build"] = weights_digest(cfg.out)
    write_record(cfg, record)
    return record
