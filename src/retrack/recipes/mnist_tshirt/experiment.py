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
        self.data_path, self.forget_path, self.tshirt = write_data(out)
        with np.load(self.data_path) as z:
            images = z["images"]
        self.remain = np.delete(images, np.loadtxt(self.forget_path, dtype=np.int64, ndmin=1), axis=0)
        self.cache = out / "cache"

    def run(self, spec, run_dir: Path) -> dict[str, Any]:
        from retrack.api import unlearn

        run_dir.mkdir(parents=True, exist_ok=True)
        model = self.model
        if spec.method is not None:
            model = str(run_dir / "model")
            unlearn(self.model, str(self.data_path), f"@{self.forget_path}", model, method=spec.method,
                    seed=spec.seed, cache_dir=str(self.cache), **self.cfg.train, **spec.hyper)
        metrics = self.evaluate(Path(model), spec.seed, run_dir)
        return {**metrics, "method": spec.label, "seed": spec.seed, "hyper": spec.hyper}

    def evaluate(self, model: Path, seed: int, run_dir: Path) -> dict[str, float]:
        from retrack.models import load_model
        from retrack.recipes.mnist_tshirt.evaluation import sample_metrics, tshirt_nll
        from retrack.sampling import sample

        loaded = load_model(model, "cpu")
        samples = sample(loaded.denoiser, loaded.scheduler.config, self.cfg.samples, self.cfg.sampling_steps,
                         self.cfg.sampler, seed)
        np.savez_compressed(run_dir / "samples.npz", images=samples)
        metrics = sample_metrics(samples, self.tshirt, self.remain)
        if self.cfg.nll:
            metrics["nll"] = tshirt_nll(loaded.denoiser, self.tshirt, seed=seed)
        write_json(run_dir / "settings.json", {"samples": self.cfg.samples, "sampling_steps": self.cfg.sampling_steps,
                                               "sampler": self.cfg.sampler, "seed": seed, "model": str(model)})
        return metrics
