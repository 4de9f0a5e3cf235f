"""The forget and remain sets of a Stable Diffusion prompt, built from the model's own samples.

The paper's SD experiment (following Alberti et al.) samples 128 images for a prompt whose
training image the model memorised, clusters them, and calls the cluster that copies the training
image the forget set and the rest the remain set. Here every sample and the training image are
embedded with a descriptor and split by one of two rules, both on the similarity s(i) of sample i
to the training image and a threshold τ:

- `threshold` (default): sample i is forgotten when s(i) > τ.
- `cluster`: single-linkage clustering of the training image and the samples cut at τ (two images
  are linked when their similarity exceeds τ); the forget set is the training image's cluster,
  i.e. the threshold set plus every sample linked to it through a chain of copies. It also takes
  copies that drifted (shifted, recoloured) a little further than τ from the training image but
  lie within τ of another copy, which is what clustering the samples first buys; it is always a
  superset of the threshold set.

τ defaults to 0.5 for SSCD (the usual copy threshold of SSCD scores). Without the SSCD weights the
offline stand-in is `pixel_cosine`, the cosine of the raw images in [−1, 1]: it is NOT SSCD, it is
named in every file, and its default τ is 0.95, because distinct images can score high on it:
among the first 20,000 Fashion-MNIST training images the most similar other image to the paper's
T-shirt scores 0.923 (scripts/calibrate_pixel_cosine.py). Other descriptors need --threshold.

The training image is resized as the pipeline's image processor would before it is compared, and
that is recorded. Each prompt's folder holds forget/ and remain/ (PNG, named by sampling seed),
training.png, contact_sheet.png, data.npz with forget.txt (`retrack unlearn --data DIR/data.npz
--forget @DIR/forget.txt --prompt P` consumes them as they are) and sets.json.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrack.backends import family_of, stable_diffusion
from retrack.backends.stable_diffusion import (
    load_text_model,
    pixel_images,
    preprocessing,
    require_sd_extra,
    with_prompt,
)
from retrack.data import ImageSet, read_image_file
from retrack.errors import UserError, require
from retrack.grid import grid_image
from retrack.metrics.copies import DESCRIPTOR_COPY_THRESHOLDS
from retrack.metrics.similarity import EmbeddingDescriptor, make_descriptor
from retrack.runrecord import atomic_directory, check_output, environment_record, write_json
from retrack.sampling import sample_seeds
from retrack.validation import (
    POSITIVE_INT,
    SEED,
    Bool,
    Choice,
    Device,
    Float,
    Optional,
    Text,
    Validated,
    option,
    read_text,
)

RULES = ("threshold", "cluster")
OFFLINE_NOTE = ("pixel_cosine is an offline stand-in for SSCD: the cosine of the raw images in [-1, 1], not a "
                "copy-detection descriptor; its scores are not SSCD scores. Pass --sscd for the paper's descriptor.")
SETS, INDEX, SHEET, TRAINING, DATA, FORGET_FILE = (
    "sets.json", "index.json", "contact_sheet.png", "training.png", "data.npz", "forget.txt")
FRAME = 3  # contact sheet: border width in pixels
COLOURS = {"training": (0, 90, 255), "forget": (230, 0, 0), "remain": (215, 215, 215)}


@dataclass(frozen=True)
class SetsConfig(Validated):
    """Every setting of `retrack sd-sets`; each field is the flag of the same name."""

    model: str = option(Text(), help="text-to-image pipeline folder or hub id (SD, SDXL, SD3, Flux)")
    out: str = option(Text(), help="output folder")
    prompt: str | None = option(Optional(Text()), None, help="the prompt (with --image)")
    image: str | None = option(Optional(Text()), None,
                               help="the training image the prompt may regurgitate (with --prompt)")
    prompts: str | None = option(Optional(Text()), None,
                                 help="many prompts instead: a .csv with columns prompt,image or a .jsonl of objects "
                                 "with keys prompt, image (image paths relative to the file); each gets DIR/<slug>/")
    samples: int = option(POSITIVE_INT, 128, help="images sampled per prompt")
    steps: int = option(POSITIVE_INT, 50, help="sampling steps")
    guidance: float = option(Float(0.0), 7.5, help="classifier-free guidance scale")
    seed: int = option(SEED, 0, help="sampling seed; sample i uses generator seed seed·1000003 + i")
    sampler: str = option(Choice("ddim", "ddpm"), "ddim", help="ddim or ddpm")
    batch_size: int = option(POSITIVE_INT, 16, help="images per pipeline call")
    sscd: str | None = option(Optional(Text()), None, help="the SSCD TorchScript file (sscd_disc_mixup); without "
                              "it the offline pixel_cosine descriptor is used")
    descriptor: str | None = option(Optional(Text()), None, help="sscd, pixel_cosine, ssim or a TorchScript file "
                                    "(default: sscd with --sscd, else pixel_cosine)")
    rule: str = option(Choice(*RULES), "threshold",
                       help="threshold: similarity to the training image > --threshold; cluster: the training "
                       "image's single-linkage cluster at --threshold (a superset)")
    threshold: float | None = option(Optional(Float(0.0, 1.0, max_open=True)), None,
                                     help="copy threshold in [0, 1) (default: 0.5 for sscd, 0.95 for pixel_cosine; "
                                     "others need it)")
    device: str | None = option(Optional(Device()), None, help="torch device (default: cuda if available, else cpu)")
    overwrite: bool = option(Bool(), False, help="replace an existing --out")


@dataclass(frozen=True)
class Job:
    """One prompt and its training image; `folder` is its subfolder ('' for a single prompt)."""

    prompt: str
    image: Path
    folder: str = ""


# ---------------------------------------------------------------------------------------------
# The rule: pure functions of similarities
# ---------------------------------------------------------------------------------------------


def forget_mask(to_training: np.ndarray, threshold: float, rule: str = "threshold",
                among: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool: the samples in the forget set.

    `to_training` is each sample's similarity to the training image; `among` (N, N) the samples'
    similarities to each other, needed by the cluster rule only (see the module docstring).
    """
    mask = np.asarray(to_training) > threshold
    if rule == "threshold":
        return mask
    require(rule == "cluster", f"--rule must be one of {', '.join(RULES)}, got {rule!r}.")
    linked = np.asarray(among) > threshold
    frontier = mask.copy()
    while frontier.any():  # breadth-first search from the training image's direct copies
        new = linked[frontier].any(0) & ~mask
        mask |= new
        frontier = new
    return mask


def rule_text(rule: str, threshold: float, descriptor: str) -> str:
    if rule == "threshold":
        return f"forget: {descriptor} similarity to the training image > {threshold:g}"
    return (f"forget: the training image's single-linkage cluster at {descriptor} similarity > {threshold:g} "
            "(a sample joins when it is linked to the training image or to a sample already in it)")


def similarities(descriptor, training: np.ndarray, samples: np.ndarray,
                 among: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Each sample's similarity to the training image and, if `among`, to each other sample;
    embedding descriptors embed every image once."""

    if isinstance(descriptor, EmbeddingDescriptor):
        e = descriptor.embed(np.concatenate([training[None], samples]))
        sim = (e[1:] @ e.T).numpy()
        return sim[:, 0], (sim[:, 1:] if among else None)
    to_training = descriptor.cross(samples, training[None])[:, 0]
    return to_training, (descriptor.cross(samples, samples) if among else None)


# ---------------------------------------------------------------------------------------------
# Inputs: the prompts file and the training images
# ---------------------------------------------------------------------------------------------


def read_prompts(path: Path) -> list[Job]:
    """Rows of a CSV (header with columns prompt,image) or JSONL file (objects with keys prompt,
    image); relative image paths are relative to the file's folder."""

    text = read_text(path, "--prompts file")
    rows: list[tuple[int, Any]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"--prompts {str(path)!r} line {n} is not JSON ({e.msg}).") from None
    else:
        require(path.suffix.lower() == ".csv", f"--prompts {str(path)!r} must be a .csv or .jsonl file.")
        reader = csv.DictReader(text.splitlines())
        found = reader.fieldnames or []
        for column in ("prompt", "image"):
            require(column in found, f"--prompts {str(path)!r} has no {column!r} column in its header "
                                     f"(found: {', '.join(found) or 'nothing'}); it needs prompt,image.")
        rows = [(n, row) for n, row in enumerate(reader, 2)]
    jobs = [_job(path, n, row) for n, row in rows]
    require(bool(jobs), f"--prompts {str(path)!r} holds no prompts.")
    return [replace(j, folder=f) for j, f in zip(jobs, slugs([j.prompt for j in jobs]), strict=True)]


def _job(path: Path, line: int, row: Any) -> Job:
    where = f"--prompts {str(path)!r} line {line}"
    require(isinstance(row, dict), f"{where} must be an object with keys prompt and image.")
    for key in ("prompt", "image"):
        require(key in row, f"{where} has no {key!r} (it needs prompt and image).")
        value = row[key]
        require(isinstance(value, str) and value.strip() != "", f"{where}: {key!r} must be a non-empty string.")
    image = Path(row["image"])
    return Job(row["prompt"], image if image.is_absolute() else path.parent / image)


def slugs(prompts: list[str]) -> list[str]:
    """A folder name per prompt: lower-case letters and digits joined by '-', at most 48
    characters, made unique by a suffix -2, -3, ..."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        base = re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-")[:48].strip("-") or "prompt"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def read_training_image(path: Path, flag: str) -> np.ndarray:
    """uint8 (H, W, C) pixels of an image file, or one sentence saying why not."""

    require(path.is_file(), f"{flag}: training image {str(path)!r} does not exist.")
    return read_image_file(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The contact sheet
# ---------------------------------------------------------------------------------------------


def contact_sheet(training: np.ndarray, samples: np.ndarray, forget: np.ndarray, tile: int = 96,
                  ncol: int = 16):
    """The training image (blue frame), then every sample in seed order, the forget set framed
    red and the remain set light grey; each image scaled so that its height is `tile` pixels."""


    h, w = samples.shape[1:3]
    size = (max(1, round(tile * w / h)), tile)
    kinds = ["training"] + ["forget" if f else "remain" for f in forget]
    tiles = []
    for im, kind in zip([training, *samples], kinds, strict=True):
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB")
        pil = pil.resize(size, Image.NEAREST if tile >= h else Image.LANCZOS)
        framed = np.empty((size[1] + 2 * FRAME, size[0] + 2 * FRAME, 3), dtype=np.uint8)
        framed[:] = COLOURS[kind]
        framed[FRAME:-FRAME, FRAME:-FRAME] = np.asarray(pil)
        tiles.append(framed)
    return grid_image(np.stack(tiles), ncol=min(ncol, len(tiles)))


# ---------------------------------------------------------------------------------------------
# Resolving the settings, then the work
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A checked configuration: the jobs, the descriptor (loaded) and its threshold."""

    cfg: SetsConfig
    jobs: list[Job]
    descriptor: Any
    threshold: float


def resolve_sets(cfg: SetsConfig) -> Plan:
    """Everything that can be checked before the pipeline loads: the model's kind, the prompts and
    their images, the descriptor's weights, the threshold and a writable, new output."""

    if cfg.prompts is not None:
        require(cfg.prompt is None and cfg.image is None,
                "--prompts replaces --prompt and --image; give either --prompts FILE or --prompt and --image.")
    else:
        require(cfg.prompt is not None and cfg.image is not None,
                "sd-sets needs --prompt and --image (the training image), or --prompts FILE with columns prompt,image.")
    family = family_of(cfg.model)
    require(family is None or family.conditioned,
            f"sd-sets samples a text-to-image StableDiffusionPipeline under a prompt, but --model "
            f"{cfg.model!r} is an unconditional pixel model (retrack audit finds what it copies).")
    if family is not None:
        family.check_settings(asdict(cfg), "sd-sets")
    require_sd_extra()
    if cfg.prompts is not None:
        prompts = Path(cfg.prompts)
        require(prompts.is_file(), f"--prompts: file {cfg.prompts!r} does not exist.")
        jobs = read_prompts(prompts)
    else:
        jobs = [Job(str(cfg.prompt), Path(str(cfg.image)))]
    for job in jobs:
        read_training_image(job.image, "--prompts" if cfg.prompts else "--image")
    name = cfg.descriptor or ("sscd" if cfg.sscd else "pixel_cosine")
    require(cfg.sscd is None or name == "sscd", f"--sscd is the sscd descriptor's file; --descriptor {name} "
                                                "does not use it.")
    threshold = cfg.threshold if cfg.threshold is not None else DESCRIPTOR_COPY_THRESHOLDS.get(name)
    require(threshold is not None, f"--descriptor {name} has no default copy threshold; pass --threshold.")
    device = Device()(cfg.device)
    descriptor = make_descriptor(name, cfg.sscd, device=device)
    inputs = [cfg.model, *(j.image for j in jobs), *(p for p in (cfg.prompts, cfg.sscd) if p is not None)]
    check_output(Path(cfg.out), cfg.overwrite, [Path(p) for p in inputs if Path(p).exists()])
    return Plan(replace(cfg, device=device, descriptor=name), jobs, descriptor, float(threshold))


def sd_sets(model: str, out: str, progress: bool = True, **settings: Any) -> list[dict[str, Any]]:
    """Sample each prompt's images, split them into forget and remain sets, write them under `out`.

    Args:
        model: a StableDiffusionPipeline folder or hub id.
        out: the output folder, written atomically.
        **settings: any other field of SetsConfig (prompt and image, or prompts; samples, steps,
            guidance, seed, descriptor, sscd, rule, threshold, ...).
    Returns:
        Each prompt's sets.json record.
    """
    SetsConfig.check_keys(settings, "sd-sets setting")
    return run_sets(resolve_sets(SetsConfig(model=model, out=out, **settings)), progress)


def run_sets(plan: Plan, progress: bool = True) -> list[dict[str, Any]]:
    """Load the pipeline once, and write each prompt's sets into the (temporary) output folder;
    the folder appears under its name only once every prompt is done."""

    cfg, out = plan.cfg, Path(plan.cfg.out)
    records: list[dict[str, Any]] = []
    with atomic_directory(out) as tmp:
        model = None
        for job in plan.jobs:
            model = load_text_model(cfg.model, job.prompt, str(cfg.device)) if model is None \
                else with_prompt(model, job.prompt)
            record = build_sets(model, job, plan, tmp / job.folder, out / job.folder, progress)
            write_json(tmp / job.folder / SETS, {**record, **environment_record(cfg)})
            records.append(record)
        if cfg.prompts is not None:
            index = [{"prompt": j.prompt, "image": str(j.image), "folder": j.folder,
                      "forget": r["forget"]["count"], "remain": r["remain"]["count"],
                      "max_similarity": max(r["similarity"])} for j, r in zip(plan.jobs, records, strict=True)]
            write_json(tmp / INDEX, {"descriptor": cfg.descriptor, "rule": records[0]["rule"], "prompts": index,
                                     **environment_record(cfg)})
    return records


def build_sets(model, job: Job, plan: Plan, folder: Path, final: Path, progress: bool) -> dict[str, Any]:
    """Sample one prompt, split its samples, and write everything but sets.json into `folder`
    (which will be renamed to `final`); returns the sets.json record."""

    cfg = plan.cfg
    raw = read_training_image(job.image, "--image")
    training = pixel_images(model.pipeline, raw[None])[0]
    samples = stable_diffusion.sample_text(model, cfg.samples, cfg.steps, cfg.sampler, cfg.seed, cfg.batch_size,
                                           cfg.guidance, progress)
    seeds = sample_seeds(cfg.seed, 0, cfg.samples)
    to_training, among = similarities(plan.descriptor, training, samples, among=cfg.rule == "cluster")
    forget = forget_mask(to_training, plan.threshold, cfg.rule, among)
    names = image_names(seeds)
    sets = {}
    for part, members in (("forget", np.flatnonzero(forget)), ("remain", np.flatnonzero(~forget))):
        (folder / part).mkdir(parents=True)
        for i in members:
            _save_png(samples[i], folder / part / names[i])
        sets[part] = {"count": len(members), "indices": members.tolist(), "seeds": [seeds[i] for i in members],
                      "files": [f"{part}/{names[i]}" for i in members]}
    _save_png(training, folder / TRAINING)
    contact_sheet(training, samples, forget).save(folder / SHEET, format="PNG")
    np.savez_compressed(folder / DATA, images=samples, seeds=np.array(seeds, dtype=np.uint64),
                        similarity=to_training, forget=forget)
    rule = {"name": cfg.rule, "threshold": plan.threshold, "text": rule_text(cfg.rule, plan.threshold, cfg.descriptor)}
    (folder / FORGET_FILE).write_text(f"# forget set of {final / DATA} for the prompt {job.prompt!r}; {rule['text']}\n"
                                      + "".join(f"{i}\n" for i in sets["forget"]["indices"]), encoding="utf-8")
    _warn_if_one_sided(job.prompt, sets, float(to_training.max()))
    return {
        "prompt": model.prompt, "model": _model_name(cfg.model), "pipeline": type(model.pipeline).__name__,
        "sampling": {"samples": cfg.samples, "steps": cfg.steps, "guidance": cfg.guidance, "sampler": cfg.sampler,
                     "seed": cfg.seed, "size": list(samples.shape[1:3])},
        "seeds": seeds, "similarity": to_training.tolist(),
        "descriptor": cfg.descriptor, "descriptor_note": _descriptor_note(cfg),
        "rule": rule,
        "training_image": {"path": str(job.image), "sha256": file_sha256(job.image), "size": list(raw.shape[:2]),
                           "preprocessing": preprocessing(model.pipeline, ImageSet(raw[None], str(job.image))),
                           "file": TRAINING},
        **sets,
        "unlearn": {"data": DATA, "forget": f"@{FORGET_FILE}",
                    "command": _unlearn_command(cfg.model, job.prompt, final)},
    }


def image_names(seeds: list[int]) -> list[str]:
    """seed-<seed>.png, zero-padded to one width so that file order is seed order."""
    width = len(str(max(seeds)))
    return [f"seed-{s:0{width}d}.png" for s in seeds]


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def _descriptor_note(cfg: SetsConfig) -> str:
    if cfg.descriptor == "pixel_cosine":
        return OFFLINE_NOTE
    if cfg.descriptor == "sscd":
        return f"SSCD from the TorchScript file {cfg.sscd!r} (sha256 {file_sha256(Path(str(cfg.sscd)))})"
    return f"descriptor {cfg.descriptor!r}"


def _model_name(model: str) -> str:
    return str(Path(model).resolve()) if Path(model).exists() else model


def _unlearn_command(model: str, prompt: str, final: Path) -> str:
    q = shlex.quote
    return (f"retrack unlearn --model {q(model)} --prompt {q(prompt)} --data {q(str(final / DATA))} "
            f"--forget {q('@' + str(final / FORGET_FILE))} --out {q(str(final) + '-unlearned')}")


def _warn_if_one_sided(prompt: str, sets: dict[str, Any], best: float) -> None:
    if sets["forget"]["count"] == 0:
        print(f"retrack: warning: no sample of {prompt!r} copies its training image (highest similarity "
              f"{best:.3f}); its forget set is empty and there is nothing to unlearn.", file=sys.stderr)
    elif sets["remain"]["count"] == 0:
        print(f"retrack: warning: every sample of {prompt!r} copies its training image; its remain set is "
              "empty, so ReTrack has no neighbours to retarget to.", file=sys.stderr)
