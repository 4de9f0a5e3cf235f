"""One run of the MNIST T-shirt experiment: unlearn (or not), sample, measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrack.runrecord import write_json


class MnistTshirtRunner:
    """Builds the data once, then runs RunSpecs against the shipped (or configured) model."""

    def __init__(self, cfg, out: Path, model: str | None = None):
        from retrack.recipes.mnist_tshirt.demo import SHIPPED_MODEL, write_data

        self.cfg = cfg
        self.model = str(model or SHIPPED_MODEL)
        self.data = write_data(out)
        self.cache = out / "cache"

    def run(self, spec, run_dir: Path) -> dict[str, Any]:
        from retrack.api import unlearn

        run_dir.mkdir(parents=True, exist_ok=True)
        model = self.model
        if spec.method is not None:
            model = str(run_dir / "model")
            unlearn(self.model, str(self.data.data_path), f"@{self.data.forget_path}", model, method=spec.method,
                    seed=spec.seed, cache_dir=str(self.cache), **self.cfg.train, **spec.hyper)
        metrics = self.evaluate(Path(model), spec.seed, run_dir)
        return {**metrics, "method": spec.label, "seed": spec.seed, "hyper": spec.hyper}

    def evaluate(self, model: Path, seed: int, run_dir: Path) -> dict[str, float]:
        from retrack.recipes.mnist_tshirt.evaluation import evaluate_model

        cfg = self.cfg
        metrics, samples = evaluate_model(str(model), self.data.tshirt, self.data.remain, cfg.samples,
                                          cfg.sampling_steps, cfg.sampler, seed, cfg.nll)
        np.savez_compressed(run_dir / "samples.npz", images=samples)
        write_json(run_dir / "settings.json", {"samples": cfg.samples, "sampling_steps": cfg.sampling_steps,
                                               "sampler": cfg.sampler, "seed": seed, "model": str(model)})
        return metrics
