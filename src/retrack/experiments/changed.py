"""What unlearning changed besides the forgotten image, for every run, from the saved samples.

Every row of an experiment samples with the same per-sample seeds as the pretrained row, so sample
i of a run and sample i of the pretrained run start from the same noise. `changed.md` gives, per
row and seed, the fraction of samples that differ visibly from the pretrained model's (pixel RMS
difference > 0.1, `retrack.metrics.reference`), leaving out those that copied the forgotten image
before (they are meant to change). Vanilla fine-tuning sets the floor: what 50 steps of plain
fine-tuning on the remaining data change anyway. Nothing is sampled again.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from retrack.experiments.nearest import distances_to
from retrack.metrics.reference import changed_samples

CHANGED_MD = "changed.md"


def changed_fractions(samples: Mapping[str, Mapping[int, np.ndarray]], baseline: str, target: np.ndarray,
                      copy_threshold: float) -> dict[str, dict[int, float]]:
    """row → seed → visibly changed fraction against the baseline row's samples of that seed."""

    before = samples.get(baseline, {})
    copies = {seed: distances_to(x, target) < copy_threshold for seed, x in before.items()}
    found: dict[str, dict[int, float]] = {}
    for label, per_seed in samples.items():
        if label == baseline:
            continue
        for seed, after in per_seed.items():
            if seed in before and before[seed].shape == after.shape:
                found.setdefault(label, {})[seed] = changed_samples(after, before[seed], copies[seed])["value"]
    return found


def changed_markdown(found: Mapping[str, Mapping[int, float]], baseline: str) -> str:
    seeds = sorted({s for per_seed in found.values() for s in per_seed})
    lines = [f"| row (samples visibly changed from the {baseline} model's, same seeds) | "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for label, per_seed in found.items():
        cells = [f"{100 * per_seed[s]:.1f}%" if s in per_seed else "–" for s in seeds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * float(np.mean(list(per_seed.values()))):.1f}% |")
    return "\n".join(lines) + "\n"
