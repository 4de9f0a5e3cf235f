"""evaluate(): the paper's metrics of one model against one forget set, as one JSON-able dict.

Protocol (REFERENCE.md, "Evaluation protocols"): NLL and the reconstruction probe are measured on
the forget images (each distinct image once: the MNIST T-shirt set holds 606 copies of one
image); samples are drawn once and shared by similarity, copies, FID, IS and CLIP-IQA; copies are
counted against the forget images (or, for a text-to-image model, the training image files given
as `target`) and removed before FID/IS; FID's real set is the remain set. `similarity` is the
paper's SD measure: the mean descriptor similarity of the samples to the image being forgotten.
Every weight file is a local path, and every missing one is reported before any long work starts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrack.data import ForgetSpec, ImageSet, check_forget_file, image_digest, load_images, parse_forget, split
from retrack.errors import require
from retrack.metrics.likelihood import FLOW_CONVENTIONS
from retrack.models import LoadedModel, load_model, model_layout, require_kind
from retrack.validation import (
    POSITIVE_INT,
    SEED,
    Bool,
    Check,
    Choice,
    Device,
    Float,
    Optional,
    Text,
    Validated,
    option,
)

METRICS = ("nll", "reconstruction", "similarity", "copies", "fid", "is", "clipiqa", "fid_reference",
           "nll_reference", "changed")
TEXT_METRICS = ("similarity", "copies", "fid", "is", "clipiqa")  # what a text-to-image model's samples support
SAMPLE_METRICS = ("similarity", "copies", "fid", "is", "clipiqa", "fid_reference", "changed")
REFERENCE_METRICS = ("fid_reference", "nll_reference")


class MetricNames(Check):
    """'nll,fid' or a list of metric names, each known and named once (messages name `flag`)."""

    def __init__(self, flag: str = "--metrics", allowed: tuple[str, ...] = METRICS) -> None:
        self.flag, self.allowed = flag, allowed

    def describe(self) -> str:
        return "comma-separated metrics from " + ", ".join(self.allowed)

    def __call__(self, value: Any, name: str | None = None) -> tuple[str, ...]:
        return parse_metrics(value, self.flag, self.allowed)


_FILE_OR_NAME = Optional(Text())


@dataclass(frozen=True)
class EvaluateConfig(Validated):
    """Every setting of one evaluation; each is a flag of `retrack evaluate` of the same name."""

    metrics: tuple[str, ...] = option(MetricNames(), ("nll", "copies", "fid", "is"))
    seed: int = option(SEED, 0)
    num_samples: int = option(POSITIVE_INT, 1000)
    steps: int = option(POSITIVE_INT, 50)
    sampler: str = option(Choice("ddpm", "ddim"), "ddim")
    batch_size: int = option(POSITIVE_INT, 64)
    descriptor: str | None = option(_FILE_OR_NAME, None)  # None: sscd when --sscd is given, else pixel_cosine
    sscd: str | None = option(_FILE_OR_NAME, None)
    inception: str | None = option(_FILE_OR_NAME, None)
    classifier: str | None = option(_FILE_OR_NAME, None)  # IS logits: "mnist" or TorchScript
    fid_features: str | None = option(_FILE_OR_NAME, None)  # None: Inception; "mnist" or TorchScript
    clip: str | None = option(_FILE_OR_NAME, None)
    probes: int = option(POSITIVE_INT, 1)
    dequantize: bool = option(Bool(), False)
    nll_schedule: str = option(Choice(*FLOW_CONVENTIONS), "model")  # the model's own ᾱ, or score-sde
    t_start: int | None = option(Optional(POSITIVE_INT), None)  # reconstruction start; None: T/4
    copy_rule: str = option(Choice("l2", "descriptor"), "l2")
    copy_threshold: float | None = option(Optional(Float()), None)  # None: 10 (l2, 28×28); 0.5 sscd, 0.95 pixel_cosine
    is_splits: int = option(POSITIVE_INT, 10)
    reference_model: str | None = option(_FILE_OR_NAME, None)  # retrained without the forget images
    pretrained_model: str | None = option(_FILE_OR_NAME, None)  # before unlearning; None: its run record's
    visible_rms: float = option(Float(min=0.0, max=1.0, min_open=True), 0.1)  # changed: visible above
    device: str | None = option(Optional(Device()), None)
    prompt: str | None = option(Optional(Text()), None)  # text-to-image models: the prompt sampled under
    guidance: float = option(Float(0.0), 7.5)  # classifier-free guidance with --prompt
    target: str | None = option(_FILE_OR_NAME, None)  # --prompt: training image file(s); None: the forget images
    sample_cache: str | None = option(Optional(Text()), None)  # folder reusing a local companion's samples


def parse_metrics(spec: str | list[str] | tuple[str, ...], flag: str = "--metrics",
                  allowed: tuple[str, ...] = METRICS) -> tuple[str, ...]:
    """'nll,fid' or a list of names to a validated tuple, in the order given."""
    require(isinstance(spec, str | list | tuple), f"{flag} must be names like nll,fid, got {spec!r}.")
    names = [str(m).strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [m for m in names if m]
    require(bool(names), f"{flag} is empty; choose from " + ", ".join(allowed) + ".")
    bad = [m for m in names if m not in allowed]
    require(not bad, f"{flag}: unknown metric {bad[0]!r}; choose from {', '.join(allowed)}." if bad else "")
    require(len(set(names)) == len(names), f"{flag} names a metric twice: {','.join(names)}.")
    return tuple(names)


def resolved(cfg: EvaluateConfig) -> EvaluateConfig:
    """Fill defaults that depend on other settings and check everything a user can get wrong."""
    from retrack.metrics import quality

    m = cfg.metrics
    _check_text(cfg)
    if "fid" in m or "fid_reference" in m:
        require(cfg.fid_features is not None or cfg.inception is not None, quality.FID_NEEDS)
    for name in REFERENCE_METRICS:
        require(name not in m or cfg.reference_model is not None,
                f"{name} needs --reference-model PATH (the model retrained without the forget images).")
    if cfg.reference_model is not None and set(m) & set(REFERENCE_METRICS):
        model_layout(cfg.reference_model, "--reference-model")
    if cfg.pretrained_model is not None and "changed" in m:
        model_layout(cfg.pretrained_model, "--pretrained-model")
    if "is" in m:
        require(cfg.classifier is not None or cfg.inception is not None, quality.IS_NEEDS)
    if "clipiqa" in m:
        require(cfg.clip is not None, quality.CLIP_NEEDS)
    for flag, path in (("--sscd", cfg.sscd), ("--inception", cfg.inception), ("--clip", cfg.clip)):
        require(path is None or Path(path).exists(), f"{flag} {str(path)!r} does not exist.")
    for flag, spec in (("--classifier", cfg.classifier), ("--fid-features", cfg.fid_features)):
        require(spec in (None, "mnist") or Path(spec).is_file(),
                f"{flag} {spec!r} is neither 'mnist' nor an existing TorchScript file.")
    if cfg.copy_rule == "l2" and cfg.copy_threshold is not None:
        require(cfg.copy_threshold >= 0, f"--copy-threshold is an L2 distance for --copy-rule l2 and must be "
                                         f"≥ 0, got {cfg.copy_threshold}.")
    descriptor = cfg.descriptor or ("sscd" if cfg.sscd else "pixel_cosine")
    threshold = cfg.copy_threshold
    if threshold is None and cfg.copy_rule == "descriptor":
        from retrack.metrics.copies import DESCRIPTOR_COPY_THRESHOLDS, SSCD_COPY_THRESHOLD

        threshold = DESCRIPTOR_COPY_THRESHOLDS.get(descriptor, SSCD_COPY_THRESHOLD)
    return replace(cfg, descriptor=descriptor, copy_threshold=threshold, device=default_device(cfg.device))


def _check_text(cfg: EvaluateConfig) -> None:
    """With --prompt only the sample metrics apply: the likelihood and reconstruction probes are
    defined on pixel models here."""
    require(cfg.prompt is not None or cfg.guidance == 7.5, "--guidance is for text-to-image models with --prompt.")
    require(cfg.prompt is not None or cfg.target is None, "--target is for text-to-image models with --prompt.")
    if cfg.prompt is None:
        return
    for path in target_files(cfg.target):
        require(path.is_file(), f"--target {str(path)!r} is not an image file.")
    other = [name for name in cfg.metrics if name not in TEXT_METRICS]
    require(not other, f"--metrics {other[0] if other else ''} needs a pixel model; with --prompt choose from "
                       f"{', '.join(TEXT_METRICS)}.")
    from retrack.latent import require_sd_extra

    require_sd_extra()


def copy_threshold_for(cfg: EvaluateConfig, images: ImageSet) -> EvaluateConfig:
    """The paper's L2 threshold 10 holds for 28×28 grey images only; elsewhere it must be given,
    or every sample of a smaller image would count as a copy (and none of a larger one)."""
    if cfg.copy_threshold is not None or not set(cfg.metrics) & {"copies", "fid", "is", "changed"}:
        return cfg
    c, h, w = images.shape
    require(images.shape == (1, 28, 28),
            f"the default --copy-threshold 10 is the paper's L2 distance for 1×28×28 images, but these are "
            f"{c}×{h}×{w}; pass --copy-threshold (10·sqrt({c * h * w}/784) ≈ "
            f"{10 * (c * h * w / 784) ** 0.5:.3g} keeps the same per-pixel distance).")
    return replace(cfg, copy_threshold=10.0)


# ---------------------------------------------------------------------------------------------
# The instruments: descriptors and classifiers, loaded before any long work
# ---------------------------------------------------------------------------------------------


@dataclass
class Instruments:
    descriptor: Any = None  # metrics.similarity.Descriptor
    fid_features: torch.nn.Module | None = None  # None: Inception from --inception
    classifier: torch.nn.Module | None = None  # None: Inception from --inception
    fid_reference: Any = None  # metrics.quality.FrechetReference of the remain set, made on first use


def _module(spec: str, device: str, flag: str, kind: str) -> torch.nn.Module:
    """'mnist' (the shipped digit classifier's features or logits) or a TorchScript file."""
    from retrack.metrics.similarity import load_torchscript

    if spec == "mnist":
        from retrack.recipes.mnist_tshirt.classifier import (
            DigitFeatures,
            DigitLogits,
            load_digit_classifier,
        )

        clf = load_digit_classifier(device)
        return DigitFeatures(clf) if kind == "features" else DigitLogits(clf)
    return load_torchscript(spec, torch.device(device), what=flag)


def load_instruments(cfg: EvaluateConfig) -> Instruments:
    from retrack.metrics.similarity import make_descriptor

    found = Instruments()
    uses_copies = any(m in cfg.metrics for m in ("copies", "fid", "is", "changed"))
    if {"reconstruction", "similarity"} & set(cfg.metrics) or (cfg.copy_rule == "descriptor" and uses_copies):
        found.descriptor = make_descriptor(cfg.descriptor, cfg.sscd, cfg.batch_size, cfg.device)
    if ("fid" in cfg.metrics or "fid_reference" in cfg.metrics) and cfg.fid_features is not None:
        found.fid_features = _module(cfg.fid_features, cfg.device, "--fid-features", "features")
    if "is" in cfg.metrics and cfg.classifier is not None:
        found.classifier = _module(cfg.classifier, cfg.device, "--classifier", "logits")
    return found


# ---------------------------------------------------------------------------------------------
# One evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the metrics share: the model, the distinct forget images, the remain set, samples."""

    cfg: EvaluateConfig
    loaded: LoadedModel
    targets: np.ndarray  # distinct forget images, uint8 (M, H, W, C)
    remain: np.ndarray
    tools: Instruments
    progress: bool
    reference: LoadedModel | None = None  # retrained without the forget images
    pretrained: LoadedModel | None = None  # before unlearning
    target_name: str = "forget"  # what `targets` are: the forget images, or the files of --target
    _samples: np.ndarray | None = None
    _copies: Any = None

    def sample_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"seed": c.seed, "num_samples": c.num_samples, "steps": c.steps,
                "sampler": c.sampler}

    def samples(self) -> np.ndarray:
        if self._samples is None:
            self._samples = self.draw(self.loaded)
        return self._samples

    def draw(self, loaded: LoadedModel) -> np.ndarray:
        """Samples of any model with this run's seeds: sample i starts from the same noise."""
        from retrack.sampling import sample

        c = self.cfg
        return sample(loaded.denoiser, dict(loaded.scheduler.config), c.num_samples, c.steps,
                      c.sampler, c.seed, c.batch_size, self.progress)

    def companion_samples(self, loaded: LoadedModel) -> np.ndarray:
        """Samples of a second model (retrained, pretrained) with this run's seeds, reused from
        `sample_cache` when the same local model made them with the same settings before: every
        row of an experiment compares with the same retrained samples, which would otherwise
        double the cost of each run. A missing, foreign or damaged entry is simply redrawn."""
        from retrack.neighbours import save_cached_array

        path = self._cache_path(loaded)
        if path is not None:
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.dtype == np.uint8 and len(cached) == self.cfg.num_samples:
                    return cached
            except Exception:  # noqa: BLE001 - an unreadable entry only costs a redraw
                pass
        images = self.draw(loaded)
        if path is not None:
            save_cached_array(path, images)
        return images

    def _cache_path(self, loaded: LoadedModel) -> Path | None:
        source = getattr(loaded, "source", None)
        if self.cfg.sample_cache is None or source is None or not Path(source).is_dir():
            return None
        return companion_cache_path(self.cfg.sample_cache, source, self.sample_settings(), self.cfg.batch_size,
                                    str(self.cfg.device))

    def copies(self):
        """Copies of the forget images among the samples (computed once, also for FID/IS)."""
        if self._copies is None:
            from retrack.metrics.copies import copies_descriptor, copies_l2

            c = self.cfg
            if c.copy_rule == "l2":
                self._copies = copies_l2(self.samples(), self.targets, c.copy_threshold)
            else:
                self._copies = copies_descriptor(self.samples(), self.targets,
                                                 self.tools.descriptor, c.copy_threshold)
        return self._copies

    def kept(self) -> np.ndarray:
        return self.samples()[~self.copies().is_copy]


def _nll(run: _Run, loaded: LoadedModel | None = None) -> dict[str, Any]:
    from retrack.metrics.likelihood import BPD_OFFSET, nll_bits_per_dim

    c = run.cfg
    bpd = nll_bits_per_dim((loaded or run.loaded).denoiser, run.targets, dequantize=c.dequantize,
                           probes=c.probes, seed=c.seed, batch_size=c.batch_size,
                           schedule=c.nll_schedule, progress=run.progress)
    return {"unit": "bits/dim", "mean": float(bpd.mean()), "per_image": bpd.tolist(),
            "settings": {"seed": c.seed, "probes": c.probes, "dequantize": c.dequantize,
                         "offset": BPD_OFFSET, "rtol": 1e-5, "atol": 1e-5, "t_start": 1e-5,
                         "divergence": "hutchinson", "schedule": c.nll_schedule}}


def _reconstruction(run: _Run) -> dict[str, Any]:
    from retrack.metrics.similarity import reconstruction_similarity

    c = run.cfg
    res = reconstruction_similarity(run.loaded.denoiser, dict(run.loaded.scheduler.config),
                                    run.targets, run.tools.descriptor, c.t_start, c.seed,
                                    c.batch_size, run.progress)
    out = res.summary()
    out["settings"] = {"seed": c.seed, "descriptor": res.descriptor, "t_start": res.t_start,
                       "sampler": "ddpm"}
    return out


def _copies(run: _Run) -> dict[str, Any]:
    return {**run.copies().summary(), "targets": run.target_name, "settings": run.sample_settings()}


def _similarity(run: _Run) -> dict[str, Any]:
    """Each sample's similarity to the most similar target, averaged: with one target, the paper's
    "mean SSCD between the samples and the training image" (higher = remembered)."""
    d = run.tools.descriptor
    per_sample = d.cross(run.samples(), run.targets).max(axis=1)
    return {"mean": float(per_sample.mean()), "descriptor": d.name, "per_sample": per_sample.tolist(),
            "num_samples": len(per_sample), "targets": run.target_name, "num_targets": len(run.targets),
            "settings": run.sample_settings()}


def _fid(run: _Run) -> dict[str, Any]:
    from retrack.metrics.quality import FrechetReference

    c, kept = run.cfg, run.kept()
    found = {"real": "remain", "num_real": len(run.remain), "num_generated": len(kept),
             "excluded_copies": int(run.copies().is_copy.sum()), "features": c.fid_features or "inception",
             "settings": run.sample_settings()}
    if len(kept) < 2:
        return {"value": None, "undefined": _too_few(run, "FID", 2), **found}
    if run.tools.fid_reference is None:  # the remain set's features, once for every evaluation
        run.tools.fid_reference = FrechetReference(run.remain, run.tools.fid_features, c.inception,
                                                   c.batch_size, c.device, run.progress)
    return {"value": run.tools.fid_reference(kept, run.progress), **found}


def _is(run: _Run) -> dict[str, Any]:
    from retrack.metrics.quality import inception_score

    c, kept = run.cfg, run.kept()
    found = {"splits": c.is_splits, "num_generated": len(kept), "excluded_copies": int(run.copies().is_copy.sum()),
             "classifier": c.classifier or "inception", "settings": run.sample_settings()}
    if len(kept) < c.is_splits:
        return {"mean": None, "std": None, "undefined": _too_few(run, "IS", c.is_splits), **found}
    mean, std = inception_score(kept, run.tools.classifier, c.inception, c.is_splits,
                                c.batch_size, c.device, c.seed, run.progress)
    return {"mean": mean, "std": std, **found}


def _too_few(run: _Run, metric: str, needed: int) -> str:
    """Why a quality metric has no value: a destroyed model whose samples all look like the forget
    images leaves nothing to score once the copies are set aside. Undefined, not an error, so an
    experiment over many methods records it and goes on."""
    copies = int(run.copies().is_copy.sum())
    return (f"only {run.cfg.num_samples - copies} of {run.cfg.num_samples} samples are left once the {copies} "
            f"that count as copies of the forget images are set aside; {metric} needs {needed}.")


def _clipiqa(run: _Run) -> dict[str, Any]:
    from retrack.metrics.quality import clip_iqa

    c = run.cfg
    value = clip_iqa(run.samples(), c.clip, batch_size=c.batch_size, device=c.device,
                     progress=run.progress)
    return {"mean": value, "prompt": "quality", "num_generated": c.num_samples,
            "settings": run.sample_settings()}


def _fid_reference(run: _Run) -> dict[str, Any]:
    """FID between this model's samples and the retrained model's, every sample kept: a T-shirt
    the retrained model never draws counts against the model under test."""
    from retrack.metrics.quality import frechet_distance

    c = run.cfg
    value = frechet_distance(run.companion_samples(run.reference), run.samples(), run.tools.fid_features,
                             c.inception, c.batch_size, c.device, run.progress)
    return {"value": value, "real": "reference model's samples", "reference_model": c.reference_model,
            "num_generated": c.num_samples, "features": c.fid_features or "inception",
            "settings": run.sample_settings()}


def _nll_reference(run: _Run) -> dict[str, Any]:
    """The forget images' NLL under the retrained model: the value unlearning should reach."""
    return {**_nll(run, run.reference), "reference_model": run.cfg.reference_model}


def _changed(run: _Run) -> dict[str, Any]:
    from retrack.metrics.copies import copies_descriptor, copies_l2
    from retrack.metrics.reference import changed_samples

    c = run.cfg
    before = run.companion_samples(run.pretrained)
    if c.copy_rule == "l2":
        before_copy = copies_l2(before, run.targets, c.copy_threshold).is_copy
    else:
        before_copy = copies_descriptor(before, run.targets, run.tools.descriptor, c.copy_threshold).is_copy
    out = changed_samples(run.samples(), before, before_copy, c.visible_rms)
    return {**out, "pretrained_model": c.pretrained_model, "settings": run.sample_settings()}


RUNNERS = {"nll": _nll, "reconstruction": _reconstruction, "similarity": _similarity, "copies": _copies, "fid": _fid,
           "is": _is, "clipiqa": _clipiqa, "fid_reference": _fid_reference,
           "nll_reference": _nll_reference, "changed": _changed}


def _check_timesteps(cfg: EvaluateConfig, T: int) -> None:
    """Settings bounded by the model's own number of timesteps, checked before any metric runs."""
    if set(cfg.metrics) & set(SAMPLE_METRICS):
        require(cfg.steps <= T, f"--steps must be in 1..{T} for this model, got {cfg.steps}.")
    if "reconstruction" in cfg.metrics and cfg.t_start is not None:
        require(cfg.t_start < T, f"--t-start must be in 1..{T - 1} for this model, got {cfg.t_start}.")


def _companion(path: str, flag: str, what: str, want: tuple[int, ...], device: str) -> LoadedModel:
    """A second model compared sample by sample with the one under test: same image shape."""
    other = load_model(path, device)
    got = other.denoiser.sample_shape
    require(got == want, f"the {what} model {str(path)!r} makes {_fmt(got)} images (C×H×W) but the "
                         f"model under test makes {_fmt(want)}; pass a {flag} of the same shape.")
    return other


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def _pretrained_of(model: Any) -> str:
    """The model an unlearned model started from, as its retrack_run.json records it."""
    import json

    record = Path(str(model)) / "retrack_run.json" if not isinstance(model, LoadedModel) else None
    require(record is not None and record.is_file(),
            "changed needs --pretrained-model PATH (the model before unlearning): the model under "
            "test has no retrack_run.json naming it.")
    source = json.loads(record.read_text())["config"]["model"]
    require(Path(source).exists(), f"changed: the pretrained model {source!r} named in {str(record)!r} "
                                   "does not exist here; pass --pretrained-model PATH.")
    return source


def distinct(images: np.ndarray) -> np.ndarray:
    """Each distinct image once, in order of first appearance."""
    seen: dict[str, int] = {}
    for i, im in enumerate(images):
        seen.setdefault(image_digest(im), i)
    return images[sorted(seen.values())]


def evaluate(
    model: str | Path | LoadedModel,
    data: str | Path | ImageSet,
    forget: str | list[int] | np.ndarray,
    metrics: str | list[str] | tuple[str, ...] = ("nll", "copies", "fid", "is"),
    progress: bool = True,
    save_samples: str | Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The paper's metrics of `model` for the `forget` images of `data`.

    Args:
        model: diffusers folder or hub id (loaded on `device`), or an already loaded model.
        data: image folder, .npz, torchvision-style folder, or an ImageSet.
        forget: "17,42", "@indices.txt", image paths, or a list of indices.
        metrics: any of nll, reconstruction, copies, fid, is, clipiqa ("nll,fid" or a list).
        save_samples: where to keep the drawn samples (uint8 `images` in an .npz), if any were drawn.
        **settings: any other field of EvaluateConfig (seed, num_samples, steps, descriptor, ...).
    Returns:
        {metric name: {its values..., "settings": {what it was computed with}}}.
    """
    EvaluateConfig.check_keys(settings, "evaluate setting")
    if isinstance(model, LoadedModel):
        settings["device"] = str(next(model.denoiser.parameters()).device)
    cfg = resolved(EvaluateConfig(metrics=metrics, **settings))
    return run_evaluate(model, data, check_inputs(model, data, forget, cfg.prompt), cfg, progress,
                        save_samples)


def check_inputs(model: Any, data: Any, forget: Any, prompt: str | None = None) -> str:
    """Model kind, data path and forget spec checked without loading anything; returns the spec."""
    spec = ForgetSpec()(forget, "--forget")
    if not isinstance(model, LoadedModel):
        require_kind(model, prompt)
    if not isinstance(data, ImageSet):
        require(Path(data).exists(), f"--data: data path {str(data)!r} does not exist.")
    check_forget_file(spec)
    return spec


def run_evaluate(model: str | Path | LoadedModel, data: str | Path | ImageSet, forget: str,
                 cfg: EvaluateConfig, progress: bool = True,
                 save_samples: str | Path | None = None) -> dict[str, Any]:
    """The expensive part, on a resolved config: instruments, data, model, then each metric."""
    images = data if isinstance(data, ImageSet) else load_images(data)
    if cfg.prompt is not None:
        return _run_text(model, images, forget, cfg, progress)
    cfg = copy_threshold_for(cfg, images)
    tools = load_instruments(cfg)
    parts = split(images, parse_forget(forget, images))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, cfg.device)
    _check_timesteps(cfg, int(loaded.scheduler.config.num_train_timesteps))
    want = loaded.denoiser.sample_shape
    require(images.shape == want, f"the data's images are {images.shape} (C, H, W) but the model "
                                  f"takes {want}.")
    run = _Run(cfg, loaded, distinct(images.images[parts.forget]), images.images[parts.remain],
               tools, progress)
    if any(m in cfg.metrics for m in REFERENCE_METRICS):
        run.reference = _companion(cfg.reference_model, "--reference-model", "reference", want, cfg.device)
    if "changed" in cfg.metrics:
        pretrained = cfg.pretrained_model or _pretrained_of(model)
        cfg = run.cfg = replace(cfg, pretrained_model=str(pretrained))
        run.pretrained = _companion(pretrained, "--pretrained-model", "pretrained", want, cfg.device)
    results = {name: RUNNERS[name](run) for name in cfg.metrics}
    if save_samples is not None and run._samples is not None:
        np.savez_compressed(save_samples, images=run._samples)
    return results


@dataclass
class _TextRun(_Run):
    """A text-to-image model's run: samples come from the pipeline under the prompt, and the
    training images are compared as the pipeline sees them (resized, RGB)."""

    def sample_settings(self) -> dict[str, Any]:
        return {**super().sample_settings(), "prompt": self.cfg.prompt, "guidance": self.cfg.guidance}

    def draw(self, loaded: Any) -> np.ndarray:
        from retrack.latent import sample_text

        c = self.cfg
        return sample_text(loaded, c.num_samples, c.steps, c.sampler, c.seed, c.batch_size, c.guidance,
                           self.progress)


def target_files(spec: str | None) -> list[Path]:
    """--target: comma-separated image files (the training images a text model must forget)."""
    return [] if spec is None else [Path(p.strip()) for p in str(spec).split(",") if p.strip()]


@dataclass
class TextTargets:
    """What a text-to-image model's samples are compared with, at the pipeline's image size."""

    targets: np.ndarray  # uint8 (M, h, w, 3): the --target files, or the distinct forget images
    remain: np.ndarray  # uint8 remain images (FID's real set), empty unless FID needs them
    name: str  # "forget" or the --target files
    pixels: ImageSet  # the targets as an ImageSet (for the copy threshold's size check)


def text_targets(pipe: Any, images: ImageSet, parts: Any, cfg: EvaluateConfig) -> TextTargets:
    """The training images as the pipeline sees them (resized, RGB): the --target files when given,
    else the distinct forget images; the remain set only when FID will read it."""
    from retrack.data import read_image_file
    from retrack.latent import pixel_images

    files = target_files(cfg.target)
    if files:
        raw = [read_image_file(f) for f in files]
        targets = np.concatenate([pixel_images(pipe, im[None]) for im in raw])
        name = ",".join(str(f) for f in files)
    else:
        targets, name = distinct(pixel_images(pipe, images.images[parts.forget])), "forget"
    wants_remain = bool({"fid", "fid_reference"} & set(cfg.metrics))
    remain = pixel_images(pipe, images.images[parts.remain]) if wants_remain else targets[:0]
    return TextTargets(targets, remain, name, ImageSet(targets, name))


def _run_text(model: str | Path, images: ImageSet, forget: str, cfg: EvaluateConfig,
              progress: bool) -> dict[str, Any]:
    from retrack.latent import load_text_model

    parts = split(images, parse_forget(forget, images))
    loaded = load_text_model(str(model), cfg.prompt, cfg.device)
    found = text_targets(loaded.pipeline, images, parts, cfg)
    cfg = copy_threshold_for(cfg, found.pixels)
    return measure(cfg, loaded, found.targets, found.remain, load_instruments(cfg), progress, found.name)


def measure(cfg: EvaluateConfig, loaded: Any, targets: np.ndarray, remain: np.ndarray,
            tools: Instruments, progress: bool = True, target_name: str = "forget") -> dict[str, Any]:
    """The metrics of `cfg` that need no second model, on `loaded` (a LoadedModel, or a
    latent.TextModel sampled under its prompt) as it is now: `retrack evaluate` and the evaluation
    during fine-tuning both come here; the instruments and the remain set's FID features are reused
    across calls."""
    require(not set(cfg.metrics) & {*REFERENCE_METRICS, "changed"}, "measure() takes no reference metrics.")
    cls = _Run if isinstance(loaded, LoadedModel) else _TextRun
    run = cls(cfg, loaded, targets, remain, tools, progress, target_name=target_name)
    return {name: RUNNERS[name](run) for name in cfg.metrics}


class _CallableModule(types.ModuleType):
    """`retrack.evaluate` is this module once anything imported it (Python sets submodules as
    package attributes, hiding the lazy function); calling it still runs evaluate()."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return evaluate(*args, **kwargs)


def default_device(device: str | None) -> str:
    """The device evaluation runs on when none is given; part of the sample cache's key, so the
    experiment's readers of that cache resolve it here too."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def companion_cache_path(cache: str | Path, source: str | Path, sample_settings: dict[str, Any], batch_size: int,
                         device: str) -> Path:
    """Where `sample_cache` keeps a local model's samples: keyed by its weights and every setting
    that changes them, so a reader (the experiment's nearest-sample figure) finds them again."""
    from retrack.runrecord import tree_sha256

    key = {"model": tree_sha256(Path(source)), **sample_settings, "batch_size": batch_size, "device": device}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache) / f"samples-{digest}.npy"


sys.modules[__name__].__class__ = _CallableModule
