"""The settings of the evaluation during fine-tuning, declared once and resolved once.

They are `retrack evaluate`'s settings under the names `retrack unlearn` gives them (--eval-every,
--eval-metrics, ..., and the instruments' own flags). `resolve` fills what the model's family
decides and what `evaluate` derives (descriptor, copy threshold) and checks every file before
anything loads, so the run record shows what was measured; `evaluate_config` is then a plain
translation that the run uses as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from retrack.backends import Backend
from retrack.errors import require
from retrack.evaluate import EvaluateConfig, MetricNames, resolved, target_files
from retrack.metrics import registry
from retrack.monitor import StopAt
from retrack.validation import POSITIVE_INT, SEED, Choice, Float, Optional, Text, Validated, flag_of, option

HOW = ("metrics on the model as it trains, at steps 0, N, 2N, ... and after the last step, each time from the "
       "same sampling seeds; written to retrack_log.json (entries with kind 'eval') and drawn in "
       "eval_curves.png. The run's weights are the same as without evaluation. A text-to-image model "
       "(--prompt) is sampled through its pipeline under the prompt, as `retrack evaluate --prompt` does.")


@dataclass(frozen=True)
class TrainingEvaluation(Validated):
    """What to measure while a model unlearns, and when to stop. None in metrics, samples and
    copy_rule means the model family's default; every other field is inert without `every`."""

    every: int | None = option(Optional(POSITIVE_INT), None, flag="--eval-every",
                               help="evaluate every N optimiser steps (default: never)")
    metrics: tuple[str, ...] | None = option(
        Optional(MetricNames("--eval-metrics", during_training=True)), None, flag="--eval-metrics",
        help="comma-separated, from: similarity (mean descriptor similarity of the samples to the forget image), "
        "copies, fid, is, nll, reconstruction, clipiqa (text-to-image models: similarity, copies, fid, is, "
        "clipiqa); default: copies for pixel models, similarity,copies for text-to-image models (and clipiqa "
        "with --eval-clip)")
    samples: int | None = option(Optional(POSITIVE_INT), None, flag="--eval-samples",
                                 help="samples drawn at each evaluation (default 256; 16 with --prompt, the "
                                 "paper's SD protocol)")
    steps: int = option(POSITIVE_INT, 50, flag="--eval-steps", help="DDIM steps of each evaluation sample")
    seed: int = option(SEED, 0, flag="--eval-seed", help="seed of the evaluation samples (the same at every step)")
    guidance: float = option(Float(0.0), 7.5, flag="--eval-guidance",
                             help="--prompt: classifier-free guidance of the evaluation samples")
    target: str | None = option(Optional(Text()), None, flag="--eval-target",
                                help="--prompt: the training image file(s) (comma-separated) that similarity and "
                                "copies compare the samples with (default: the forget images)")
    stop_at: tuple[str, float] | None = option(
        Optional(StopAt()), None,
        help="METRIC=VALUE: stop at the first evaluation where a forgetting metric reaches VALUE (similarity, "
        "copies and reconstruction at or below it, nll at or above), e.g. copies=0 or similarity=0.3")
    copy_rule: str | None = option(Optional(Choice("l2", "descriptor")), None,
                                   help="copies: 'l2' (the paper's L2 distance rule; the default for pixel "
                                   "models) or 'descriptor' (similarity above --copy-threshold; the default "
                                   "with --prompt)")
    copy_threshold: float | None = option(Optional(Float()), None,
                                          help="copies: L2 distance in [0,1] pixels (default 10, for 1×28×28 "
                                          "images only) or similarity (descriptor rule, default 0.5 for sscd, "
                                          "0.95 for pixel_cosine)")
    descriptor: str | None = option(Optional(Text()), None,
                                    help="descriptor of similarity, the copy rule and reconstruction (default: "
                                    "sscd with --sscd, else pixel_cosine; the name is recorded with every value)")
    sscd: str | None = option(Optional(Text()), None, help="SSCD TorchScript file (sscd_disc_mixup)")
    fid_features: str | None = option(Optional(Text()), None,
                                      help="FID feature space: 'mnist' (the shipped digit classifier, 28×28 "
                                      "grey) or a TorchScript file (default: Inception from --inception)")
    inception: str | None = option(Optional(Text()), None, help="Inception weights file for FID/IS")
    classifier: str | None = option(Optional(Text()), None, help="IS logits: 'mnist' or a TorchScript file")
    clip: str | None = option(Optional(Text()), None, flag="--eval-clip",
                              help="local transformers CLIP folder for CLIP-IQA (torchmetrics would download "
                              "its weights; nothing is downloaded here)")

    def check_inert(self) -> None:
        """Settings that cannot act are refused: without `every` none of them does anything."""
        if self.every is not None:
            return
        given = [f for f in fields(self) if getattr(self, f.name) != f.default]
        require(not given, f"{flag_of(given[0])} acts only at evaluations during fine-tuning; add --eval-every N."
                if given else "")

    def with_defaults(self, family: type[Backend]) -> TrainingEvaluation:
        """The family's defaults where a setting is left unset, and the metrics checked against
        what the family can measure (its settings check reads the filled values)."""
        self.check_inert()
        if self.every is None:
            return self
        flat = self.settings()
        ev = type(self).from_settings({**flat, **{k: v for k, v in family.eval_defaults(self.clip).items()
                                                  if flat[k] is None}})
        for path in target_files(ev.target):
            require(path.is_file(), f"--eval-target {str(path)!r} is not an image file.")
        family.check_metrics(ev.metrics, "--eval-metrics", registry.during_training())
        if ev.stop_at is not None:
            metric = ev.stop_at[0]
            require(metric in ev.metrics, f"--stop-at {metric} needs {metric} among --eval-metrics "
                                          f"(now {','.join(ev.metrics)}).")
        return ev

    def resolve(self, device: str, prompt: str | None) -> TrainingEvaluation:
        """Every weight file named before anything loads, and what `evaluate` derives (descriptor,
        copy threshold) filled in, so the run record shows what was measured."""
        if self.every is None:
            return self
        require("clipiqa" not in self.metrics or self.clip is not None,
                "CLIP-IQA needs a local CLIP model: pass --eval-clip PATH (a transformers CLIP folder).")
        require(self.clip is None or Path(self.clip).exists(), f"--eval-clip {self.clip!r} does not exist.")
        full = resolved(self.evaluate_config(device, prompt))
        return replace(self, descriptor=full.descriptor, copy_threshold=full.copy_threshold)

    def evaluate_config(self, device: str, prompt: str | None) -> EvaluateConfig:
        """These settings as `retrack evaluate` takes them."""
        return EvaluateConfig(
            metrics=self.metrics, seed=self.seed, num_samples=self.samples, steps=self.steps,
            copy_rule=self.copy_rule, copy_threshold=self.copy_threshold, descriptor=self.descriptor,
            sscd=self.sscd, fid_features=self.fid_features, inception=self.inception, classifier=self.classifier,
            clip=self.clip, device=device, prompt=prompt, guidance=self.guidance, target=self.target)
