"""evaluate(): the paper's metrics of one model against one forget set, as one JSON-able dict.

Protocol (docs/metrics.md, "The evaluation protocols, as formulas"): NLL and the reconstruction
probe are measured on the forget images (each distinct image once: the MNIST T-shirt set holds
606 copies of one image); samples are drawn once and shared by similarity, copies, FID, IS and
CLIP-IQA; copies are counted against the forget images (or, for a text-to-image model, the training image files given
as `target`) and removed before FID/IS; FID's real set is the remain set. `similarity` is the
paper's SD measure: the mean descriptor similarity of the samples to the image being forgotten.
Every weight file is a local path, and every missing one is reported before any long work starts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrack.backends import Backend, LoadOptions, MetricImages, detect, family_of, load
from retrack.data import ForgetSpec, ImageSet, Split, check_forget_file, load_images, parse_forget, split
from retrack.errors import require
from retrack.metrics import quality, registry
from retrack.metrics.copies import (
    DESCRIPTOR_COPY_THRESHOLDS,
    SSCD_COPY_THRESHOLD,
    CopyResult,
    copies_descriptor,
    copies_l2,
)
from retrack.metrics.likelihood import FLOW_CONVENTIONS
from retrack.metrics.similarity import load_torchscript, make_descriptor
from retrack.neighbours import save_cached_array
from retrack.runrecord import tree_sha256
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
    default_device,
    load_json,
    option,
)


class MetricNames(Check):
    """'nll,fid' or a list of metric names, each registered and named once (messages name `flag`);
    `during_training` allows only those that need no second model."""

    def __init__(self, flag: str = "--metrics", during_training: bool = False) -> None:
        self.flag, self.during_training = flag, during_training

    @property
    def allowed(self) -> tuple[str, ...]:
        return registry.during_training() if self.during_training else registry.metric_names()

    def describe(self) -> str:
        return "comma-separated metrics from " + ", ".join(self.allowed)

    def __call__(self, value: Any, name: str | None = None) -> tuple[str, ...]:
        return parse_metrics(value, self.flag, self.allowed)


_FILE_OR_NAME = Optional(Text())


HELP_METRICS = ("comma-separated: nll (bits/dim of the forget images), reconstruction (similarity after "
                "noising to T/4 and denoising), similarity (mean descriptor similarity of the samples to the most "
                "similar forget image), copies (fraction of samples copying a forget image), fid (vs the remain "
                "set), is, clipiqa; against a model retrained without the forget images (--reference-model): "
                "fid_reference (FID between the two models' samples), nll_reference (the forget images' NLL under "
                "it: the target); changed (fraction of samples of the same seeds that differ visibly from the "
                "pretrained model's); membership_loss, membership_secmi, membership_pia (the forget images' mean "
                "membership score, higher = less like a training image; calibrated verdicts: retrack verify)")


@dataclass(frozen=True)
class EvaluateConfig(Validated):
    """Every setting of one evaluation; each is a flag of `retrack evaluate` of the same name."""

    metrics: tuple[str, ...] = option(MetricNames(), ("nll", "copies", "fid", "is"), help=HELP_METRICS)
    seed: int = option(SEED, 0, help="seed of samples, probes and reconstruction noise")
    num_samples: int = option(POSITIVE_INT, 1000, help="samples for copies, fid, is, clipiqa")
    steps: int = option(POSITIVE_INT, 50, help="sampling steps")
    sampler: str = option(Choice("ddpm", "ddim"), "ddim", help="reverse process: ddpm or ddim")
    batch_size: int = option(POSITIVE_INT, 64, help="images per forward pass")
    descriptor: str | None = option(_FILE_OR_NAME, None,
                                    help="similarity, reconstruction and the descriptor copy rule: sscd, ssim, "
                                    "pixel_cosine or a TorchScript file; unset: sscd if --sscd is given, else "
                                    "pixel_cosine")
    sscd: str | None = option(_FILE_OR_NAME, None, help="sscd_disc_mixup TorchScript file")
    inception: str | None = option(_FILE_OR_NAME, None,
                                   help="torch-fidelity Inception weights (pt_inception-2015-12-05) for fid/is")
    classifier: str | None = option(_FILE_OR_NAME, None,
                                    help="IS classifier instead of Inception: 'mnist' (shipped digit classifier) or "
                                    "a TorchScript file mapping uint8 (N,C,H,W) to logits")
    fid_features: str | None = option(_FILE_OR_NAME, None,
                                      help="FID features instead of Inception: 'mnist' or a TorchScript file mapping "
                                      "uint8 (N,C,H,W) to (N,F)")
    clip: str | None = option(_FILE_OR_NAME, None, help="local transformers CLIP folder for clipiqa")
    prompt: str | None = option(Optional(Text()), None,
                                help="text-to-image models: the prompt the samples are drawn under (metrics: "
                                "similarity, copies, fid, is, clipiqa; the training images are resized to the "
                                "pipeline's size first)")
    guidance: float = option(Float(0.0), 7.5, help="classifier-free guidance scale with --prompt")
    target: str | None = option(_FILE_OR_NAME, None,
                                help="with --prompt: the training image file(s) (comma-separated) that similarity "
                                "and copies compare the samples with (default: the forget images of --data)")
    probes: int = option(POSITIVE_INT, 1, help="Hutchinson probes per image for nll")
    dequantize: bool = option(Bool(), False, help="uniform dequantisation for nll")
    nll_schedule: str = option(Choice(*FLOW_CONVENTIONS), "model",
                               help="continuous schedule of the nll ODE: model (passes through the model's own ᾱ_t "
                               "at every timestep) or score-sde (the score-SDE code's VP-SDE, β linear from T·β_1 to "
                               "T·β_T, label t·(T−1); for comparison with figures computed that way)")
    t_start: int | None = option(Optional(POSITIVE_INT), None, help="reconstruction start timestep (default T/4)")
    copy_rule: str | None = option(Optional(Choice("l2", "descriptor")), None,
                                   help="l2: L2 over [0,1] pixels below the threshold (paper; the default for pixel "
                                   "models); descriptor: --descriptor similarity above it (the default with --prompt)")
    copy_threshold: float | None = option(Optional(Float()), None,
                                          help="copy threshold (default 10 for l2, the paper's value for 1x28x28 "
                                          "images: other sizes must set it; descriptor rule: 0.5 for sscd, 0.95 for "
                                          "pixel_cosine)")
    is_splits: int = option(POSITIVE_INT, 10, help="splits of the Inception Score")
    reference_model: str | None = option(_FILE_OR_NAME, None,
                                         help="fid_reference, nll_reference: the model retrained without the forget "
                                         "images (same recipe, seed and steps); its images must have the tested "
                                         "model's shape")
    pretrained_model: str | None = option(_FILE_OR_NAME, None,
                                          help="changed: the model before unlearning (default: the one the tested "
                                          "model's retrack_run.json names)")
    visible_rms: float = option(Float(min=0.0, max=1.0, min_open=True), 0.1,
                                help="changed: a sample differs visibly from the pretrained model's when the RMS of "
                                "their pixel difference in [0, 1] exceeds this (L2 > RMS·√D; 2.8 at 28×28)")
    device: str | None = option(Optional(Device()), None, help="torch device (default: cuda if available, else cpu)")
    # Not a flag: a folder where a run reuses a local companion model's samples (experiments).
    sample_cache: str | None = option(Optional(Text()), None)


def parse_metrics(spec: str | list[str] | tuple[str, ...], flag: str = "--metrics",
                  allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """'nll,fid' or a list of names to a validated tuple, in the order given."""
    allowed = registry.metric_names() if allowed is None else allowed
    require(isinstance(spec, str | list | tuple), f"{flag} must be names like nll,fid, got {spec!r}.")
    names = [str(m).strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [m for m in names if m]
    require(bool(names), f"{flag} is empty; choose from " + ", ".join(allowed) + ".")
    bad = [m for m in names if m not in allowed]
    require(not bad, f"{flag}: unknown metric {bad[0]!r}; choose from {', '.join(allowed)}." if bad else "")
    require(len(set(names)) == len(names), f"{flag} names a metric twice: {','.join(names)}.")
    return tuple(names)


def resolved(cfg: EvaluateConfig, family: type[Backend] | None = None) -> EvaluateConfig:
    """Fill defaults that depend on other settings and check everything a user can get wrong;
    with the model's family, also what that family cannot be measured with."""
    m = cfg.metrics
    if family is not None:
        family.check_settings(asdict(cfg), "evaluate")
        family.check_metrics(m, "--metrics", registry.metric_names())
    for path in target_files(cfg.target):
        require(path.is_file(), f"--target {str(path)!r} is not an image file.")
    _check_instruments(cfg)
    for name in m:
        companion = registry.get(name).companion
        require(companion != "reference" or cfg.reference_model is not None,
                f"{name} needs --reference-model PATH (the model retrained without the forget images).")
        if companion == "reference":
            family_of(cfg.reference_model, "--reference-model")
        if companion == "pretrained" and cfg.pretrained_model is not None:
            family_of(cfg.pretrained_model, "--pretrained-model")
    if cfg.copy_rule is None:  # the family's own rule, as the evaluation during fine-tuning uses
        rule = family.eval_defaults(None)["copy_rule"] if family is not None else \
            ("descriptor" if cfg.prompt is not None else "l2")
        cfg = replace(cfg, copy_rule=rule)
    if cfg.copy_rule == "l2" and cfg.copy_threshold is not None:
        require(cfg.copy_threshold >= 0, f"--copy-threshold is an L2 distance for --copy-rule l2 and must be "
                                         f"≥ 0, got {cfg.copy_threshold}.")
    descriptor = cfg.descriptor or ("sscd" if cfg.sscd else "pixel_cosine")
    threshold = cfg.copy_threshold
    if threshold is None and cfg.copy_rule == "descriptor":
        threshold = DESCRIPTOR_COPY_THRESHOLDS.get(descriptor, SSCD_COPY_THRESHOLD)
    return replace(cfg, descriptor=descriptor, copy_threshold=threshold, device=default_device(cfg.device))


def _check_instruments(cfg: EvaluateConfig) -> None:
    """Every weight file the metrics will read, named before anything loads."""
    m = cfg.metrics
    if "fid" in m or "fid_reference" in m:
        require(cfg.fid_features is not None or cfg.inception is not None, quality.FID_NEEDS)
    if "is" in m:
        require(cfg.classifier is not None or cfg.inception is not None, quality.IS_NEEDS)
    if "clipiqa" in m:
        require(cfg.clip is not None, quality.CLIP_NEEDS)
    for flag, path in (("--sscd", cfg.sscd), ("--inception", cfg.inception), ("--clip", cfg.clip)):
        require(path is None or Path(path).exists(), f"{flag} {str(path)!r} does not exist.")
    names = registry.instrument_names()
    for flag, spec in (("--classifier", cfg.classifier), ("--fid-features", cfg.fid_features)):
        require(spec is None or spec in names or Path(spec).is_file(),
                f"{flag} {spec!r} is neither {' nor '.join(repr(n) for n in names)} nor an existing "
                "TorchScript file.")


def copy_threshold_for(cfg: EvaluateConfig, images: ImageSet) -> EvaluateConfig:
    """The paper's L2 threshold 10 holds for 28×28 grey images only; elsewhere it must be given,
    or every sample of a smaller image would count as a copy (and none of a larger one)."""
    if cfg.copy_threshold is not None or not registry.finds_copies(cfg.metrics):
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
    checked: set[str] = field(default_factory=set)  # the custom networks tried on the measured image size


def _module(spec: str, device: str, flag: str, kind: str) -> torch.nn.Module:
    """A registered instrument (e.g. 'mnist', the shipped digit classifier) or a TorchScript file."""
    if spec in registry.instrument_names():
        return registry.load_instrument(spec, kind, device)
    return load_torchscript(spec, torch.device(device), what=flag)


def load_instruments(cfg: EvaluateConfig) -> Instruments:
    found = Instruments()
    uses_copies = registry.finds_copies(cfg.metrics)
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
class MetricRun:
    """What the metrics share: the model, the distinct forget images, the remain set, samples."""

    cfg: EvaluateConfig
    loaded: Backend
    targets: np.ndarray  # distinct forget images, uint8 (M, H, W, C)
    remain: np.ndarray
    tools: Instruments
    progress: bool
    reference: Backend | None = None  # retrained without the forget images
    pretrained: Backend | None = None  # before unlearning
    target_name: str = "forget"  # what `targets` are: the forget images, or the files of --target
    _samples: np.ndarray | None = None
    _copies: Any = None

    def sample_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"seed": c.seed, "num_samples": c.num_samples, "steps": c.steps,
                "sampler": c.sampler, **self.loaded.sample_settings(c.guidance)}

    def instrument(self, name: str) -> torch.nn.Module | None:
        """A custom FID feature network or IS classifier (`name`: fid_features or classifier),
        tried once on two blank images of the measured size before any sample is drawn for it: one
        that cannot take them (--fid-features mnist is made for 28×28) is one sentence."""
        module = getattr(self.tools, name)
        if module is not None and name not in self.tools.checked:
            flag = {"fid_features": "--fid-features", "classifier": "--classifier"}[name]
            _, h, w, c = self.targets.shape
            quality.check_takes(module, (c, h, w), f"{flag} {getattr(self.cfg, name)!r}", self.cfg.device)
            self.tools.checked.add(name)
        return module

    def samples(self) -> np.ndarray:
        if self._samples is None:
            self._samples = self.draw(self.loaded)
        return self._samples

    def draw(self, model: Backend) -> np.ndarray:
        """Samples of any model with this run's seeds: sample i starts from the same noise."""
        c = self.cfg
        return model.sample(c.num_samples, c.steps, c.sampler, c.seed, c.batch_size, c.guidance, self.progress)

    def companion_samples(self, model: Backend) -> np.ndarray:
        """Samples of a second model (retrained, pretrained) with this run's seeds, reused from
        `sample_cache` when the same local model made them with the same settings before: every
        row of an experiment compares with the same retrained samples, which would otherwise
        double the cost of each run. A missing, foreign or damaged entry is simply redrawn."""
        path = self._cache_path(model)
        if path is not None:
            try:  # the header first (a memory map): a forged shape allocates nothing
                cached = np.load(path, mmap_mode="r", allow_pickle=False)
                if isinstance(cached, np.ndarray) and cached.dtype == np.uint8 and cached.ndim == 4 \
                        and len(cached) == self.cfg.num_samples:
                    return np.array(cached)
            except Exception:  # noqa: BLE001 - an unreadable entry only costs a redraw
                pass
        images = self.draw(model)
        if path is not None:
            save_cached_array(path, images)
        return images

    def _cache_path(self, model: Backend) -> Path | None:
        if self.cfg.sample_cache is None or not Path(model.source).is_dir():
            return None
        return companion_cache_path(self.cfg.sample_cache, model.source, self.sample_settings(), self.cfg.batch_size,
                                    str(self.cfg.device))

    def find_copies(self, images: np.ndarray) -> CopyResult:
        """Which of `images` copy a target, by the configured rule."""
        c = self.cfg
        if c.copy_rule == "l2":
            return copies_l2(images, self.targets, c.copy_threshold)
        return copies_descriptor(images, self.targets, self.tools.descriptor, c.copy_threshold)

    def copies(self) -> CopyResult:
        """Copies of the forget images among the samples (computed once, also for FID/IS)."""
        if self._copies is None:
            self._copies = self.find_copies(self.samples())
        return self._copies

    def kept(self) -> np.ndarray:
        return self.samples()[~self.copies().is_copy]


def _check_timesteps(cfg: EvaluateConfig, T: int) -> None:
    """Settings bounded by the model's own number of timesteps, checked before any metric runs."""
    if any(registry.get(m).samples for m in cfg.metrics):
        require(cfg.steps <= T, f"--steps must be in 1..{T} for this model, got {cfg.steps}.")
    if "reconstruction" in cfg.metrics and cfg.t_start is not None:
        require(cfg.t_start < T, f"--t-start must be in 1..{T - 1} for this model, got {cfg.t_start}.")


def _companion(run: MetricRun, path: str, flag: str, what: str) -> Backend:
    """A second model compared sample by sample with the one under test: same family, same shape."""
    other = type(run.loaded).load(path, run.cfg.device, LoadOptions(prompt=run.cfg.prompt))
    got, want = other.denoiser.sample_shape, run.loaded.denoiser.sample_shape
    require(got == want, f"the {what} model {str(path)!r} makes {_fmt(got)} images (C×H×W) but the "
                         f"model under test makes {_fmt(want)}; pass a {flag} of the same shape.")
    return other


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def _pretrained_of(model: Any) -> str:
    """The model an unlearned model started from, as its retrack_run.json records it."""
    record = Path(str(model)) / "retrack_run.json" if not isinstance(model, Backend) else None
    require(record is not None and record.is_file(),
            "changed needs --pretrained-model PATH (the model before unlearning): the model under "
            "test has no retrack_run.json naming it.")
    saved = load_json(record, "run record")
    config = saved.get("config") if isinstance(saved, dict) else None
    source = config.get("model") if isinstance(config, dict) else None
    require(isinstance(source, str) and source != "",
            f"changed: the run record {str(record)!r} names no model it started from; pass --pretrained-model PATH.")
    require(Path(source).exists(), f"changed: the pretrained model {source!r} named in {str(record)!r} "
                                   "does not exist here; pass --pretrained-model PATH.")
    return source


def family_for(model: str | Path | Backend, prompt: str | None) -> type[Backend]:
    """The family of a model given by path (detected, the prompt checked) or already loaded."""
    return type(model) if isinstance(model, Backend) else detect(model, prompt)


def evaluate(
    model: str | Path | Backend,
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
        metrics: any registered metric (nll, reconstruction, copies, fid, is, clipiqa, ...; "nll,fid"
            or a list).
        save_samples: where to keep the drawn samples (uint8 `images` in an .npz), if any were drawn.
        **settings: any other field of EvaluateConfig (seed, num_samples, steps, descriptor, ...).
    Returns:
        {metric name: {its values..., "settings": {what it was computed with}}}.
    """
    EvaluateConfig.check_keys(settings, "evaluate setting")
    if isinstance(model, Backend):
        settings["device"] = str(model.device)
    cfg = EvaluateConfig(metrics=metrics, **settings)
    cfg = resolved(cfg, family_for(model, cfg.prompt))
    return run_evaluate(model, data, check_inputs(data, forget), cfg, progress, save_samples)


def check_inputs(data: Any, forget: Any) -> str:
    """Data path and forget spec checked without loading anything; returns the spec."""
    spec = ForgetSpec()(forget, "--forget")
    if not isinstance(data, ImageSet):
        require(Path(data).exists(), f"--data: data path {str(data)!r} does not exist.")
    check_forget_file(spec)
    return spec


def run_evaluate(model: str | Path | Backend, data: str | Path | ImageSet, forget: str,
                 cfg: EvaluateConfig, progress: bool = True,
                 save_samples: str | Path | None = None) -> dict[str, Any]:
    """The expensive part, on a resolved config: instruments, data, model, then each metric."""
    if isinstance(data, ImageSet):
        images = data
    else:  # a folder of mixed sizes, for a family that resizes, as its pipeline resizes them
        source = model.source if isinstance(model, Backend) else str(model)
        images = load_images(data, family_for(model, cfg.prompt).image_size(source))
    parts = split(images, parse_forget(forget, images))
    tools = load_instruments(cfg)
    loaded = model if isinstance(model, Backend) else load(str(model), cfg.device, LoadOptions(prompt=cfg.prompt))
    _check_timesteps(cfg, loaded.num_timesteps)
    want = loaded.denoiser.sample_shape
    require(loaded.resizes_images or images.shape == want,
            f"the data's images are {images.shape} (C, H, W) but the model takes {want}.")
    found = metric_images(loaded, images, parts, cfg)
    cfg = copy_threshold_for(cfg, found.pixels)
    run = MetricRun(cfg, loaded, found.targets, found.remain, tools, progress, target_name=found.name)
    companions = {registry.get(m).companion for m in cfg.metrics}
    if "reference" in companions:
        run.reference = _companion(run, cfg.reference_model, "--reference-model", "reference")
    if "pretrained" in companions:
        pretrained = cfg.pretrained_model or _pretrained_of(model)
        cfg = run.cfg = replace(cfg, pretrained_model=str(pretrained))
        run.pretrained = _companion(run, pretrained, "--pretrained-model", "pretrained")
    results = {name: registry.get(name).measure(run) for name in cfg.metrics}
    if save_samples is not None and run._samples is not None:
        np.savez_compressed(save_samples, images=run._samples)
    return results


def target_files(spec: str | None) -> list[Path]:
    """--target: comma-separated image files (the training images a text model must forget)."""
    return [] if spec is None else [Path(p.strip()) for p in str(spec).split(",") if p.strip()]


def metric_images(model: Backend, images: ImageSet, parts: Split, cfg: EvaluateConfig) -> MetricImages:
    """What the samples are compared with, as the model draws them; the remain set only when a
    metric reads it (for a text-to-image model it is resized image by image)."""
    wants_remain = any(registry.get(m).remain for m in cfg.metrics)
    return model.metric_images(images, parts.forget, parts.remain if wants_remain else None,
                               target_files(cfg.target))


def measure(cfg: EvaluateConfig, loaded: Backend, targets: np.ndarray, remain: np.ndarray,
            tools: Instruments, progress: bool = True, target_name: str = "forget") -> dict[str, Any]:
    """The metrics of `cfg` that need no second model, on `loaded` as it is now: `retrack evaluate`
    and the evaluation during fine-tuning both come here; the instruments and the remain set's FID
    features are reused across calls."""
    require(all(registry.get(m).companion is None for m in cfg.metrics), "measure() takes no reference metrics.")
    run = MetricRun(cfg, loaded, targets, remain, tools, progress, target_name=target_name)
    return {name: registry.get(name).measure(run) for name in cfg.metrics}


class _CallableModule(types.ModuleType):
    """`retrack.evaluate` is this module once anything imported it (Python sets submodules as
    package attributes, hiding the lazy function); calling it still runs evaluate()."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return evaluate(*args, **kwargs)


def companion_cache_path(cache: str | Path, source: str | Path, sample_settings: dict[str, Any], batch_size: int,
                         device: str) -> Path:
    """Where `sample_cache` keeps a local model's samples: keyed by its weights and every setting
    that changes them, so a reader (the experiment's nearest-sample figure) finds them again."""
    key = {"model": tree_sha256(Path(source)), **sample_settings, "batch_size": batch_size, "device": device}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache) / f"samples-{digest}.npy"


sys.modules[__name__].__class__ = _CallableModule
