"""What `retrack experiment` costs on top of the work it drives: one run through the runner
(config checks, data and model digests, fingerprint, metrics.json, the merged table) against the
same unlearn() + evaluate() called directly, interleaved, median of --repeats.

    python bench/bench_runner.py [--repeats 5] [--steps 20] [--samples 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def tiny_model(path: Path, size: int) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).save_pretrained(path / "unet")
    DDPMScheduler().save_pretrained(path / "scheduler")
    return path


def direct(model: Path, data: Path, out: Path, a: argparse.Namespace) -> None:
    from retrack.api import unlearn
    from retrack.evaluate import evaluate

    unlearn(str(model), str(data), "0,1", str(out / "model"), progress=False, method="retrack", seed=0,
            steps=a.steps, batch_size=a.batch_size, k=10, cache_dir=str(out / "cache"))
    evaluate(str(out / "model"), str(data), "0,1", ["copies"], progress=False, save_samples=out / "s.npz",
             seed=0, num_samples=a.samples, steps=10, sampler="ddim", batch_size=a.samples, copy_threshold=5.0)


def runner(config: Path, out: Path) -> None:
    from retrack.experiments import load_config, run_experiment

    run_experiment(load_config(config, [f"out={out}"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="unlearning steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--size", type=int, default=16, help="image side")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (more than the free cores makes every timing noise)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_runner."))
    model = tiny_model(root / "model", a.size)
    data = root / "data.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (500, a.size, a.size), dtype=np.uint8))
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "data": str(data), "targets": {"indices": [0, 1]}, "seeds": [0],
        "pretrained": False, "methods": {"retrack": {"k": 10}},
        "train": {"steps": a.steps, "batch_size": a.batch_size}, "metrics": {"copies": {"copy_threshold": 5.0}},
        "sampling": {"samples": a.samples, "steps": 10, "sampler": "ddim", "batch_size": a.samples}}))
    times: dict[str, list[float]] = {"direct": [], "runner": []}
    for rep in range(a.repeats + 1):  # the first pair warms caches and imports up, and is dropped
        for name in ("direct", "runner"):
            out = root / f"{name}{rep}"
            start = time.perf_counter()
            direct(model, data, out, a) if name == "direct" else runner(config, out)
            if rep:
                times[name].append(time.perf_counter() - start)
    d, r = statistics.median(times["direct"]), statistics.median(times["runner"])
    print(f"one run, {a.steps} ReTrack steps (batch {a.batch_size}, {a.size}×{a.size}), "
          f"{a.samples} samples; {a.threads} torch thread(s); median of {a.repeats}, interleaved")
    print(f"direct unlearn() + evaluate(): {d:.3f} s")
    print(f"retrack experiment runner:     {r:.3f} s")
    print(f"runner overhead: {100 * (r - d) / d:+.2f}% (target < 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
